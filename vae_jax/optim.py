"""The optimizer: learning-rate schedules, the optax chain, and a parameter EMA in its state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vae_jax import config as config_lib

Params = object


def _iwae_schedule(lr: float, steps_per_epoch: int) -> optax.Schedule:
  """Burda et al. (2015), section 5: 3**i epochs at lr * 10**(-i/7), i = 0..7."""
  boundaries, epoch = {}, 0
  for i in range(7):
    epoch += 3**i
    boundaries[epoch * steps_per_epoch] = 10 ** (-1 / 7)
  return optax.piecewise_constant_schedule(lr, boundaries)


# config.optimizer.schedule -> (config, peak learning rate, steps per epoch) -> learning rate
# or schedule. The peak is config.optimizer.learning_rate, or a traced scalar (one model of a
# sweep over the learning rate): every schedule is arithmetic on it.
SCHEDULES = {
  "constant": lambda c, lr, spe: lr,
  # To 0 over the run: num_train_steps when set, else num_epochs epochs.
  "cosine": lambda c, lr, spe: optax.cosine_decay_schedule(
    lr, decay_steps=c.num_train_steps or c.num_epochs * spe
  ),
  "exponential": lambda c, lr, spe: optax.exponential_decay(
    lr, spe, c.optimizer.decay_rate, staircase=True
  ),
  "iwae": lambda c, lr, spe: _iwae_schedule(lr, spe),
}


def learning_rate_schedule(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  learning_rate: float | jax.Array | None = None,
) -> float | jax.Array | optax.Schedule:
  """``config.optimizer``'s learning rate: a number, or a function of the step.

  ``learning_rate`` replaces ``config.optimizer.learning_rate`` (the schedule's peak)
  when given, e.g. as a traced scalar.

  Raises:
    config.ConfigError: an unknown schedule.
  """
  config_lib.check_choice("optimizer.schedule", config.optimizer.schedule)
  if learning_rate is None:
    learning_rate = config.optimizer.learning_rate
  return SCHEDULES[config.optimizer.schedule](config, learning_rate, steps_per_epoch)


class ParamEmaState(NamedTuple):
  """State of ``param_ema``: the moving average of the parameters."""

  ema: Params


def param_ema(decay: float) -> optax.GradientTransformation:
  """An optax transformation that leaves the updates alone and keeps an EMA of
  the parameters after each update: ``ema = decay * ema + (1 - decay) * params``.

  Last in a chain, it sees the final updates, so the average is of the
  parameters the step produces; it starts at the initial parameters. Keeping it
  in the optimizer state means it is checkpointed, restored and (under
  ``nonfinite_policy="skip"``) rolled back with everything else.

  Raises:
    ValueError: ``decay`` outside ``[0, 1)``.
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"The EMA decay must be in [0, 1), got {decay}.")

  def init(params):
    # A copy, not the params' own buffers: the state is donated leaf by leaf.
    return ParamEmaState(jax.tree.map(lambda p: jnp.array(p, copy=True), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("param_ema needs the parameters: call update(updates, state, params).")
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
    return updates, ParamEmaState(ema)

  return optax.GradientTransformation(init, update)


def normalize_each_gradient(eps: float = 1e-7) -> optax.GradientTransformation:
  """Divides each parameter's gradient by its own L2 norm: ``g / (||g|| + eps)``.

  The first step of the VampPrior code's ``AdamNormGrad`` (Tomczak & Welling
  2018, utils/optimizer.py), which then applies Adam to the normalized gradient.
  """

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: g / (jnp.sqrt(jnp.sum(jnp.square(g))) + eps), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# config.optimizer.name -> (optimizer fields, learning rate) -> optax transformation.
OPTIMIZERS = {
  "adam": lambda o, lr: optax.adam(lr),
  "adam_iwae": lambda o, lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-4),  # Burda et al. 2015.
  # Tomczak & Welling (2018)'s code: utils/optimizer.py.
  "adam_normgrad": lambda o, lr: optax.chain(normalize_each_gradient(), optax.adam(lr)),
  "adamw": lambda o, lr: optax.adamw(lr, weight_decay=o.weight_decay),
  "sgd": lambda o, lr: optax.sgd(lr, momentum=o.momentum or None),
  "rmsprop": lambda o, lr: optax.rmsprop(lr),
}


def make_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int = 1,
  learning_rate: float | jax.Array | None = None,
) -> optax.GradientTransformation:
  """``config.optimizer`` as an optax chain: clipping, the optimizer with its
  learning-rate schedule (epochs are ``steps_per_epoch`` steps), and the EMA.

  ``learning_rate`` replaces ``config.optimizer.learning_rate`` when given: a traced
  scalar gives one model of a sweep over the learning rate. The optimizer's state does
  not depend on it (same tree, shapes and initial values), so every model of such a
  sweep starts from the single run's state.

  Raises:
    config.ConfigError: an unknown optimizer or schedule.
  """
  o = config.optimizer
  config_lib.check_choice("optimizer.name", o.name)
  opt = OPTIMIZERS[o.name](o, learning_rate_schedule(config, steps_per_epoch, learning_rate))
  if o.grad_clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
  if o.ema_decay is not None:
    opt = optax.chain(opt, param_ema(o.ema_decay))
  return opt


# config.objective -> (config) -> the optimizer of its auxiliary network (objectives.auxiliary).
AUXILIARY_OPTIMIZERS = {
  # disentanglement_lib's FactorVAE discriminator: Adam(1e-4, b1 = 0.5, b2 = 0.9, eps 1e-8).
  "factor_vae": lambda c: optax.adam(
    c.factor_vae.learning_rate, b1=c.factor_vae.b1, b2=c.factor_vae.b2, eps=1e-8
  ),
}


def with_auxiliary(
  model_optimizer: optax.GradientTransformation,
  name: str,
  auxiliary_optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """One optimizer for the VAE's parameters and an auxiliary network's (``params[name]``):
  ``optax.multi_transform`` applies ``auxiliary_optimizer`` to that subtree and
  ``model_optimizer`` to the rest, each with its own state, in one update."""

  def labels(params):
    return {key: "auxiliary" if key == name else "model" for key in params}

  return optax.multi_transform({"model": model_optimizer, "auxiliary": auxiliary_optimizer}, labels)


def eval_params(opt_state: optax.OptState, params: Params) -> Params:
  """The parameters to evaluate: the EMA if the optimizer keeps one, else ``params``."""
  if isinstance(opt_state, tuple) and opt_state:
    last = opt_state[-1]
    if isinstance(last, ParamEmaState):
      return last.ema
  return params
