"""The optimizer: learning-rate schedules, the optax chain, and a parameter EMA in its state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

Params = object

OPTIMIZERS = ("adam", "adam_iwae", "adam_normgrad", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "exponential", "iwae")


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> float | optax.Schedule:
  """``config.optimizer``'s learning rate: a float, or a function of the step."""
  o = config.optimizer
  lr = o.learning_rate
  if o.schedule == "constant":
    return lr
  if o.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=config.num_epochs * steps_per_epoch)
  if o.schedule == "exponential":
    return optax.exponential_decay(lr, steps_per_epoch, o.decay_rate, staircase=True)
  if o.schedule == "iwae":
    # Burda et al. (2015), section 5: 3**i epochs at lr * 10**(-i/7), i = 0..7.
    boundaries, epoch = {}, 0
    for i in range(7):
      epoch += 3**i
      boundaries[epoch * steps_per_epoch] = 10 ** (-1 / 7)
    return optax.piecewise_constant_schedule(lr, boundaries)
  raise ValueError(f"Unknown config.optimizer.schedule {o.schedule!r}; use one of {SCHEDULES}.")


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


def make_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
  """``config.optimizer`` as an optax chain: clipping, the optimizer with its
  learning-rate schedule (epochs are ``steps_per_epoch`` steps), and the EMA."""
  o = config.optimizer
  lr = learning_rate_schedule(config, steps_per_epoch)
  if o.name == "adam":
    opt = optax.adam(lr)
  elif o.name == "adam_iwae":  # Burda et al. (2015): Adam with eps = 1e-4.
    opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-4)
  elif o.name == "adam_normgrad":  # Tomczak & Welling (2018)'s code: utils/optimizer.py.
    opt = optax.chain(normalize_each_gradient(), optax.adam(lr))
  elif o.name == "adamw":
    opt = optax.adamw(lr, weight_decay=o.weight_decay)
  elif o.name == "sgd":
    opt = optax.sgd(lr, momentum=o.momentum or None)
  elif o.name == "rmsprop":
    opt = optax.rmsprop(lr)
  else:
    raise ValueError(f"Unknown config.optimizer.name {o.name!r}; choose one of {OPTIMIZERS}.")
  if o.grad_clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
  if o.ema_decay is not None:
    opt = optax.chain(opt, param_ema(o.ema_decay))
  return opt


def eval_params(opt_state: optax.OptState, params: Params) -> Params:
  """The parameters to evaluate: the EMA if the optimizer keeps one, else ``params``."""
  if isinstance(opt_state, tuple) and opt_state:
    last = opt_state[-1]
    if isinstance(last, ParamEmaState):
      return last.ema
  return params
