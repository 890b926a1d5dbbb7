"""Training: the jitted train step, the loop, evaluation, checkpoints and outputs.

Design, in short:

* The train state is a plain pytree ``TrainState(step, params, opt_state)``.
* ``train_step(state, batch, key)`` is pure; the eps key of step ``s`` is
  ``fold_in(key, s)``, so a resumed run draws exactly the noise an
  uninterrupted one would, with no RNG state to checkpoint.
* The whole training split sits in device memory as uint8. One jitted call
  (``make_train_chunk``) runs up to ``steps_per_dispatch`` steps with
  ``lax.scan``, gathering each batch from that epoch's permutation and
  binarizing it on device. Batches depend only on ``(seed, step)``, so resume
  sees the same batches too.
* Metrics stay on device until a log, eval or checkpoint boundary; there the
  loop checks them for non-finite values *before* anything is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from vae_jax import (
  checkpointing,
  config_defaults,
  evaluate,
  input_pipeline,
  losses,
  models,
  writers,
)
from vae_jax.models import Model, Params, make_model

Array = jax.Array
Metrics = dict[str, Array]

# Purposes of the keys folded out of jax.random.key(config.seed). Fixed tags
# (not a split into N) keep every stream unchanged when a purpose is added.
KEY_INIT, KEY_EPS, KEY_BINARIZE, KEY_SHUFFLE, KEY_EVAL, KEY_SAMPLES = range(6)


def run_keys(seed: int) -> dict[int, Array]:
  """The run's PRNG keys by purpose (``KEY_INIT``, ``KEY_EPS``, ...) for ``seed``."""
  root = jax.random.key(seed)
  return {
    tag: jax.random.fold_in(root, tag)
    for tag in (KEY_INIT, KEY_EPS, KEY_BINARIZE, KEY_SHUFFLE, KEY_EVAL, KEY_SAMPLES)
  }


class TrainState(NamedTuple):
  step: Array  # int32 scalar: the number of steps taken so far (skipped ones included).
  params: Params
  opt_state: optax.OptState
  num_skipped: Array  # int32 scalar: steps whose update was dropped as non-finite.


# A run stopped by SIGTERM (preemption) exits with this code after saving a
# checkpoint of its current step; the same command resumes it. It is the
# shell's code for "terminated by SIGTERM", which schedulers treat as preempted.
EXIT_CODE_PREEMPTED = 143


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN or infinite; nothing of it was checkpointed."""


class Preempted(Exception):  # noqa: N818 - it is an outcome, not a failure.
  """SIGTERM arrived; a checkpoint of ``step`` was written and the run stopped."""

  def __init__(self, step: int):
    super().__init__(f"Stopped by SIGTERM after saving a checkpoint at step {step}.")
    self.step = step


class _SigtermFlag:
  """Turns SIGTERM into a flag that the loop checks between dispatches."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------
# Building blocks.


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
    if not 0 < o.decay_rate <= 1:
      raise ValueError(f"config.optimizer.decay_rate must be in (0, 1], got {o.decay_rate}.")
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
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"config.optimizer.ema_decay must be in [0, 1), got {decay}.")

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
    raise ValueError(
      f"Unknown config.optimizer.name {o.name!r}; choose adam, adam_iwae, adam_normgrad, adamw, "
      "sgd or rmsprop."
    )
  if o.grad_clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
  if o.ema_decay is not None:
    opt = optax.chain(opt, param_ema(o.ema_decay))
  return opt


def eval_params(state: TrainState) -> Params:
  """The parameters to evaluate: the EMA if the optimizer keeps one, else ``params``."""
  if isinstance(state.opt_state, tuple) and state.opt_state:
    last = state.opt_state[-1]
    if isinstance(last, ParamEmaState):
      return last.ema
  return state.params


def kl_weight(beta: float | Array, warmup_steps: int, step: Array) -> Array:
  """``beta * min(1, step / warmup_steps)``: linear KL warm-up (``warmup_steps=0``: beta)."""
  if warmup_steps <= 0:
    return jnp.asarray(beta, jnp.float32)
  return beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def make_log_likelihood_fn(
  config: ml_collections.ConfigDict, event_ndims: int
) -> losses.LogLikelihoodFn:
  m = config.model
  if m.likelihood == "bernoulli":
    return functools.partial(losses.bernoulli_log_likelihood, event_ndims=event_ndims)
  if m.likelihood in ("gaussian", "gaussian_learned") and m.gaussian_variance <= 0:
    raise ValueError(f"config.model.gaussian_variance must be > 0, got {m.gaussian_variance}.")
  if m.likelihood == "gaussian":
    return functools.partial(
      losses.gaussian_log_likelihood, variance=m.gaussian_variance, event_ndims=event_ndims
    )
  if m.likelihood == "gaussian_learned":
    return functools.partial(losses.gaussian_log_likelihood_learned, event_ndims=event_ndims)
  raise ValueError(
    f"Unknown config.model.likelihood {m.likelihood!r}; use bernoulli, gaussian or "
    "gaussian_learned."
  )


OBJECTIVES = ("elbo", "iwae", "autoencoder")
GRADIENT_ESTIMATORS = ("plain", "dreg")


def make_loss_fn(
  model: Model,
  log_likelihood_fn: losses.LogLikelihoodFn,
  beta: float | Array,
  num_samples: int,
  objective: str = "elbo",
  *,
  free_bits: float = 0.0,
  gradient_estimator: str = "plain",
) -> Callable[[Params, Array, Array], tuple[Array, Metrics]]:
  """``loss_fn(params, x, key) -> (loss, metrics)``: batch means, in nats.

  Works for every model (one or two stochastic layers): the latents come from
  ``model.posterior`` with ``eps ~ N(0, I)`` drawn from ``key``.

  ``objective="elbo"``: the negative beta-ELBO with ``num_samples`` samples;
  the KL is in closed form where the model has one (a layer with prior
  N(0, I)). With ``free_bits > 0`` the KL term is
  ``losses.free_bits_kl`` (per dimension, batch-averaged; Kingma et al. 2016).
  ``objective="iwae"``: the negative importance-weighted bound with
  ``k = num_samples`` (Burda et al. 2015; ``k = 1`` is the single-sample ELBO);
  ``beta`` must be 1. ``gradient_estimator="dreg"`` gives it the
  doubly-reparameterized gradient (``losses.dreg_iw_bound``). Its ``elbo``
  metric is the mean log-weight (an ELBO estimate from the same samples).
  ``objective="autoencoder"``: the deterministic autoencoder baseline, decoding
  the encoder's mean with no noise and no KL; its loss is the negative
  reconstruction log-likelihood (``kl`` is reported as 0 and ``elbo`` is not a
  bound, only the reconstruction term).

  Metrics: ``loss``, ``elbo`` (the beta=1 bound), ``reconstruction``
  (``E_q log p(x|z)``; for ``iwae``, the mean log-weight plus ``kl``, so that
  ``elbo`` is the mean log-weight) and ``kl`` (the true KL, whatever the free
  bits).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"Unknown config.objective {objective!r}; use one of {OBJECTIVES}.")
  if gradient_estimator not in GRADIENT_ESTIMATORS:
    raise ValueError(
      f"Unknown config.gradient_estimator {gradient_estimator!r}; use one of {GRADIENT_ESTIMATORS}."
    )
  if objective == "iwae" and not isinstance(beta, jax.Array) and beta != 1.0:
    raise ValueError(f"config.beta={beta}, but the IWAE bound has no KL weight; use beta=1.")
  if gradient_estimator == "dreg" and objective != "iwae":
    raise ValueError("config.gradient_estimator='dreg' is for config.objective='iwae'.")
  if free_bits and objective != "elbo":
    raise ValueError("config.free_bits applies to the ELBO's KL; use config.objective='elbo'.")

  def loss_fn(params: Params, x: Array, key: Array) -> tuple[Array, Metrics]:
    if objective == "autoencoder":
      mean, _ = model.encode(params, x)
      reconstruction = log_likelihood_fn(model.decode(params, mean), x)
      kl = jnp.zeros_like(reconstruction)
      loss = -jnp.mean(reconstruction)
    else:
      eps = jax.random.normal(key, (num_samples, x.shape[0], model.latents))
      log_w, log_px_z, post = models.log_weights(model, params, x, eps, log_likelihood_fn)
      reconstruction = jnp.mean(log_px_z, axis=0)
      kl = jnp.mean(post.kl, axis=0)
      if objective == "iwae":
        if gradient_estimator == "dreg":
          # Encoder gradients only through z (decoder and q's parameters fixed);
          # decoder gradients with z fixed. Same values, two gradient paths.
          enc_only = {
            "encoder": params["encoder"],
            "decoder": jax.lax.stop_gradient(params["decoder"]),
          }
          log_w_enc = models.log_weights(
            model, enc_only, x, eps, log_likelihood_fn, stop_density_gradient=True
          ).log_w
          dec_only = {
            "encoder": jax.lax.stop_gradient(params["encoder"]),
            "decoder": params["decoder"],
          }
          log_w_dec = models.log_weights(model, dec_only, x, eps, log_likelihood_fn).log_w
          bound = losses.dreg_iw_bound(log_w_enc, log_w_dec)
        else:
          bound = losses.iw_bound_from_log_weights(log_w, axis=0)
        loss = -jnp.mean(bound)
        reconstruction = jnp.mean(log_w, axis=0) + kl  # So that elbo = mean log-weight.
      elif free_bits:
        loss = -jnp.mean(reconstruction) + beta * losses.free_bits_kl(post.kl_per_dim, free_bits)
      else:
        loss = -jnp.mean(reconstruction - beta * kl)
    metrics = {
      "loss": loss,
      "elbo": jnp.mean(reconstruction - kl),  # The beta=1 bound, for comparison.
      "reconstruction": jnp.mean(reconstruction),
      "kl": jnp.mean(kl),
    }
    return loss, metrics

  return loss_fn


def make_train_step(
  loss_fn: Callable[[Params, Array, Array], tuple[Array, Metrics]],
  optimizer: optax.GradientTransformation,
  skip_nonfinite: bool = False,
) -> Callable[[TrainState, Array, Array], tuple[TrainState, Metrics]]:
  """Returns the pure ``train_step(state, batch, key) -> (state, metrics)``.

  ``batch: [batch, *event_shape]`` preprocessed data. ``key`` is the run's eps
  key; the step folds in its own step number. Jit it with
  ``jax.jit(train_step, donate_argnums=0)``.

  With ``skip_nonfinite``, a step whose loss or gradient is NaN/Inf leaves
  params and optimizer state unchanged (the step counter still advances, so
  the data order is unaffected) and increments ``num_skipped``. Otherwise the
  update is applied and the caller is expected to stop on ``metrics["finite"]``.
  """

  def train_step(state: TrainState, batch: Array, key: Array) -> tuple[TrainState, Metrics]:
    step_key = jax.random.fold_in(key, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, step_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["finite"] = finite
    num_skipped = state.num_skipped
    if skip_nonfinite:
      keep = functools.partial(jnp.where, finite)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
      num_skipped = num_skipped + (~finite).astype(jnp.int32)
    return TrainState(state.step + 1, params, opt_state, num_skipped), metrics

  return train_step


def initial_state(
  model: Model, optimizer: optax.GradientTransformation, key: Array, event_shape
) -> TrainState:
  """A fresh ``TrainState`` at step 0 (params from ``model.init(key, ...)``)."""
  params = model.init(key, jnp.zeros((1, *event_shape), jnp.float32))
  # Two arrays, not one shared: the state is donated leaf by leaf.
  return TrainState(
    jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((), jnp.int32)
  )


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D mesh named ``data`` over the first ``num_devices`` devices (0: all)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(
      f"config.num_devices={num_devices}, but {len(devices)} devices are visible "
      f"({devices[0].platform}); use 0 for all of them."
    )
  return jax.sharding.Mesh(np.asarray(devices[: num_devices or len(devices)]), ("data",))


def epoch_permutation(shuffle_key: Array, epoch: int | Array, num_examples: int) -> Array:
  """The example order of ``epoch``: a function of the seed and epoch alone."""
  return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_examples)


def make_train_chunk(
  train_step: Callable[[TrainState, Array, Array], tuple[TrainState, Metrics]],
  *,
  chunk_len: int,
  batch_size: int,
  steps_per_epoch: int,
  binarization: str,
  batch_sharding: jax.sharding.Sharding | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
  """One jitted call that runs up to ``chunk_len`` train steps on device.

  With ``batch_sharding`` (e.g. ``NamedSharding(mesh, P("data"))``) each
  gathered batch is split over the devices along its batch axis, and XLA runs
  the step data-parallel (gradients are all-reduced); the state and images
  stay replicated. The math is that of one device, up to the order of float
  reductions.

  Returns ``chunk(state, images, perms, first_epoch, num_active, eps_key,
  bin_key) -> (state, metrics)``, where ``images: [n, h, w, c]`` uint8 is the
  whole training split, ``perms: [2, n]`` the permutations of epochs
  ``first_epoch`` and ``first_epoch + 1`` (a chunk spans at most two, since
  ``chunk_len <= steps_per_epoch``), and only the first ``num_active`` steps
  run; the rest pass the state through, so any number of steps up to
  ``chunk_len`` reuses one compiled program. ``metrics`` are ``[chunk_len]``
  arrays; entries past ``num_active`` are zeros.
  """
  if not 1 <= chunk_len <= steps_per_epoch:
    raise ValueError(f"chunk_len must be in [1, {steps_per_epoch}], got {chunk_len}.")

  def chunk(state, images, perms, first_epoch, num_active, eps_key, bin_key):
    def run(state):
      step = state.step
      order = perms[step // steps_per_epoch - first_epoch]
      idx = jax.lax.dynamic_slice(order, ((step % steps_per_epoch) * batch_size,), (batch_size,))
      batch = input_pipeline.preprocess(
        images[idx], binarization, jax.random.fold_in(bin_key, step)
      )
      if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
      return train_step(state, batch, eps_key)

    metrics_shape = jax.eval_shape(run, state)[1]

    def body(state, i):
      def skip(state):
        return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)

      return jax.lax.cond(i < num_active, run, skip, state)

    state, metrics = jax.lax.scan(body, state, jnp.arange(chunk_len))
    if batch_sharding is not None:  # Every host can read every output.
      replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
      state, metrics = jax.lax.with_sharding_constraint((state, metrics), replicated)
    return state, metrics

  return jax.jit(chunk, donate_argnums=0)


# --------------------------------------------------------------------------
# Config checks and the workdir's record of it.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with what to change for values the loop cannot use."""
  input_pipeline.check_binarization(config.binarization)
  for name in (
    "batch_size",
    "num_epochs",
    "steps_per_dispatch",
    "eval_batch_size",
    "keep_checkpoints",
    "num_samples",
    "log_every_steps",
  ):
    if config[name] < 1:
      raise ValueError(f"config.{name} must be a positive integer, got {config[name]}.")
  for name in ("eval_every_steps", "checkpoint_every_steps", "num_image_samples"):
    if config[name] < 0:
      raise ValueError(f"config.{name} must be >= 0 (0: once per epoch), got {config[name]}.")
  if config.nonfinite_policy not in ("stop", "skip"):
    raise ValueError(
      f"config.nonfinite_policy must be 'stop' or 'skip', got {config.nonfinite_policy!r}."
    )
  if config.objective == "iwae" and config.beta != 1.0:
    raise ValueError(f"config.beta={config.beta}, but the IWAE bound has no KL weight; use 1.")
  if config.beta < 0:
    raise ValueError(f"config.beta must be >= 0, got {config.beta}.")
  if config.objective not in OBJECTIVES:
    raise ValueError(f"Unknown config.objective {config.objective!r}; use one of {OBJECTIVES}.")
  if config.kl_warmup_epochs < 0 or config.free_bits < 0:
    raise ValueError("config.kl_warmup_epochs and config.free_bits must be >= 0.")
  if config.kl_warmup_epochs and config.objective != "elbo":
    raise ValueError("config.kl_warmup_epochs weights the ELBO's KL; use config.objective='elbo'.")
  if config.validation_examples < 0 or config.early_stopping_patience_epochs < 0:
    raise ValueError(
      "config.validation_examples and config.early_stopping_patience_epochs must be >= 0."
    )
  if config.early_stopping_patience_epochs and not config.validation_examples:
    raise ValueError(
      "config.early_stopping_patience_epochs needs a validation split: set "
      "config.validation_examples (e.g. 10000)."
    )
  if config.optimizer.schedule not in SCHEDULES:
    raise ValueError(
      f"Unknown config.optimizer.schedule {config.optimizer.schedule!r}; use one of {SCHEDULES}."
    )
  if config.model.prior == "vampprior" and config.gradient_estimator == "dreg":
    raise ValueError(
      "config.gradient_estimator='dreg' assumes a prior that does not depend on the encoder; "
      "the VampPrior does. Use gradient_estimator='plain' with model.prior='vampprior'."
    )
  if config.model.prior == "vampprior" and config.free_bits:
    raise ValueError(
      "config.free_bits needs a KL per latent dimension, which the VampPrior does not have; "
      "set free_bits=0 or model.prior='standard'."
    )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[str]:
  """Fields in which ``config`` differs from the run recorded in ``workdir/config.json``.

  Returns one ``"  field: workdir has A, now B"`` line per field, leaving out
  those allowed to change on resume (``config_defaults.RESUMABLE_CHANGES``). A
  field missing from an older ``config.json`` counts as its default, which is
  how that run behaved. No ``config.json``: no differences.
  """
  path = workdir / "config.json"
  if not path.exists():
    return []
  defaults = _flatten(json.loads(config_defaults.base_config().to_json()))
  saved = {**defaults, **_flatten(json.loads(path.read_text()))}
  now = _flatten(json.loads(config.to_json()))
  resumable = set(config_defaults.RESUMABLE_CHANGES)
  if "cosine" in (saved.get("optimizer.schedule"), now.get("optimizer.schedule")):
    resumable.discard("num_epochs")  # The cosine schedule decays over num_epochs.
  return [
    f"  {k}: workdir has {saved.get(k)!r}, now {now.get(k)!r}"
    for k in sorted(set(saved) | set(now))
    if saved.get(k) != now.get(k) and k not in resumable
  ]


def check_config(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, allow_change: bool = False
) -> None:
  """Refuses a workdir whose checkpoints belong to a run of another config.

  Differences (see ``config_differences``) raise ``ValueError`` naming them,
  unless ``allow_change`` (then they are logged). A workdir without any
  checkpoint has nothing to protect.
  """
  if not checkpointing.saved_steps(workdir / "checkpoints"):
    return
  diffs = config_differences(config, workdir)
  if diffs and allow_change:
    logging.warning("Config changed on resume (allowed by the caller):\n%s", "\n".join(diffs))
  elif diffs:
    raise ValueError(
      f"{workdir} holds a run with a different config:\n" + "\n".join(diffs) + "\n"
      "Resuming would mix two experiments. Use a new --workdir, the same config, or "
      "--allow_config_change if you mean to continue this run with the new values."
    )


def record_config(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, allow_change: bool = False
) -> None:
  """``check_config``, then ``write_config``."""
  check_config(config, workdir, allow_change)
  write_config(config, workdir)


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Records ``config`` as ``workdir/config.json`` (atomically)."""
  path = workdir / "config.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True) + "\n")
  tmp.replace(path)


# --------------------------------------------------------------------------
# The loop.


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything the loop runs, built from a config: the same objects for training,
  benchmarks and sweeps.

  Attributes:
    model: the model's pure functions.
    optimizer: the optax optimizer.
    log_likelihood_fn: ``(decoded, x) -> [batch]`` of the config's likelihood.
    train_step: the pure ``train_step(state, batch, key)``.
    train_chunk: the jitted multi-step call (see ``make_train_chunk``).
    eval_fn: the jitted full-split evaluation (see ``evaluate.make_eval_fn``).
    keys: PRNG keys by purpose (``KEY_INIT``, ``KEY_EPS``, ...).
    steps_per_epoch: full batches per epoch (the remainder is dropped).
    chunk_len: steps per dispatch.
    event_shape: shape of one example.
  """

  model: Model
  optimizer: optax.GradientTransformation
  log_likelihood_fn: losses.LogLikelihoodFn
  train_step: Callable[[TrainState, Array, Array], tuple[TrainState, Metrics]]
  train_chunk: Callable[..., tuple[TrainState, Metrics]]
  eval_fn: Callable[[Params, Array, Array], dict[str, Array]]
  keys: dict[int, Array]
  steps_per_epoch: int
  chunk_len: int
  event_shape: tuple[int, ...]
  mesh: jax.sharding.Mesh

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    """Sharding of the state, the datasets and the permutations: a copy per device."""
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def init_state(self) -> TrainState:
    # Jitted: Flax's init run eagerly compiles each of its small ops separately.
    init = jax.jit(
      functools.partial(initial_state, self.model, self.optimizer, event_shape=self.event_shape),
      out_shardings=self.replicated,
    )
    return init(self.keys[KEY_INIT])

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: the target a checkpoint restores into,
    whatever device count wrote it."""
    return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
      jax.eval_shape(self.init_state),
    )


def make_config_train_step(
  config: ml_collections.ConfigDict,
  model: Model,
  log_likelihood_fn: losses.LogLikelihoodFn,
  optimizer: optax.GradientTransformation,
  steps_per_epoch: int,
) -> Callable[[TrainState, Array, Array], tuple[TrainState, Metrics]]:
  """The train step of ``config``: its objective, free bits, estimator and KL warm-up."""
  loss_kwargs = {
    "num_samples": config.num_samples,
    "objective": config.objective,
    "free_bits": config.free_bits,
    "gradient_estimator": config.gradient_estimator,
  }
  skip = config.nonfinite_policy == "skip"
  warmup_steps = round(config.kl_warmup_epochs * steps_per_epoch)
  if warmup_steps <= 0:
    loss_fn = make_loss_fn(model, log_likelihood_fn, config.beta, **loss_kwargs)
    return make_train_step(loss_fn, optimizer, skip_nonfinite=skip)

  def warmup_step(state: TrainState, batch: Array, key: Array) -> tuple[TrainState, Metrics]:
    # The loss of step t is built with traced beta_t; the step is the plain one.
    beta = kl_weight(config.beta, warmup_steps, state.step)
    loss_fn = make_loss_fn(model, log_likelihood_fn, beta, **loss_kwargs)
    state, metrics = make_train_step(loss_fn, optimizer, skip_nonfinite=skip)(state, batch, key)
    return state, {**metrics, "beta": beta}

  return warmup_step


def split_validation(
  images: np.ndarray, config: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray | None]:
  """``(train, validation)``: the last ``config.validation_examples`` of the
  training split (in file order, the same for every seed) are held out."""
  v = config.validation_examples
  if v == 0:
    return images, None
  if not 0 < v < len(images):
    raise ValueError(
      f"config.validation_examples={v} must be in [0, {len(images)}) for this training split."
    )
  return images[:-v], images[-v:]


def build_trainer(config: ml_collections.ConfigDict, event_shape, num_train: int) -> Trainer:
  """Builds the model, optimizer, step, chunk and evaluation of ``config``."""
  validate_config(config)
  event_shape = tuple(event_shape)
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(
      f"config.batch_size={config.batch_size} exceeds the {num_train} training examples."
    )
  chunk_len = min(config.steps_per_dispatch, steps_per_epoch)
  mesh = make_mesh(config.num_devices)
  if config.batch_size % mesh.size:
    raise ValueError(
      f"config.batch_size={config.batch_size} is not divisible by the {mesh.size} devices "
      "it is split over. Choose a multiple, or set config.num_devices."
    )
  model = make_model(config, event_shape)
  ll_fn = make_log_likelihood_fn(config, len(event_shape))
  optimizer = make_optimizer(config, steps_per_epoch)
  train_step = make_config_train_step(config, model, ll_fn, optimizer, steps_per_epoch)
  train_chunk = make_train_chunk(
    train_step,
    chunk_len=chunk_len,
    batch_size=config.batch_size,
    steps_per_epoch=steps_per_epoch,
    binarization=config.binarization,
    batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
  )
  eval_fn = evaluate.make_eval_fn(
    model, ll_fn, config.eval_batch_size, deterministic=config.objective == "autoencoder"
  )
  keys = run_keys(config.seed)
  return Trainer(
    model=model,
    optimizer=optimizer,
    log_likelihood_fn=ll_fn,
    train_step=train_step,
    train_chunk=train_chunk,
    eval_fn=eval_fn,
    keys=keys,
    steps_per_epoch=steps_per_epoch,
    chunk_len=chunk_len,
    event_shape=event_shape,
    mesh=mesh,
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> TrainState:
  """Trains (or resumes) the VAE of ``config`` in ``workdir``; returns the final state.

  Raises:
    Preempted: SIGTERM arrived; a checkpoint of the current step was saved.
    NonFiniteError: a non-finite loss or gradient (policy ``stop``, or more
      than ``config.max_nonfinite_skips`` skipped steps under ``skip``).
    ValueError: the config is invalid, or differs from the workdir's run
      (unless ``allow_config_change``).
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  # In a multi-host run every process computes the same replicated values;
  # process 0 alone writes the config, metrics, images and progress bar.
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    check_config(config, workdir, allow_config_change)
    data = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  if jax.process_count() > 1:  # The others read what process 0 prepared.
    multihost_utils.sync_global_devices("vae_jax: data prepared")
    if not is_main:
      data = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  train_np, val_np = split_validation(data["train"].images, config)
  num_train, *event_shape = train_np.shape
  trainer = build_trainer(config, event_shape, num_train)
  logging.info("Data-parallel over %d device(s): %s", trainer.mesh.size, trainer.mesh.devices)
  train_images = jax.device_put(train_np, trainer.replicated)
  test_x = jax.device_put(
    input_pipeline.eval_images(data["test"].images, config.binarization), trainer.replicated
  )
  val_x = None
  if val_np is not None:
    val_x = jax.device_put(
      input_pipeline.eval_images(val_np, config.binarization, seed=VALIDATION_SEED),
      trainer.replicated,
    )
  model, keys, steps_per_epoch = trainer.model, trainer.keys, trainer.steps_per_epoch
  train_chunk, eval_fn, init_state = trainer.train_chunk, trainer.eval_fn, trainer.init_state
  total_steps = config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  ckpt_every = config.checkpoint_every_steps or steps_per_epoch
  chunk_len = trainer.chunk_len

  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
  writer = writers.MetricWriter(workdir) if is_main else writers.NullWriter()
  restored = checkpointer.restore_latest(trainer.abstract_state())
  if restored is None:
    state = init_state()
    writer.truncate_after(-1)
    logging.info("Starting a new run in %s", workdir)
  else:
    step, state = restored
    writer.truncate_after(step)
    logging.info("Resumed from checkpoint %d in %s", step, workdir)
  if is_main:  # Only once the checkpoints are known to fit this config.
    write_config(config, workdir)
  last_saved = -1 if restored is None else int(state.step)
  best = None
  if val_x is not None:
    best = BestCheckpoint(
      workdir / BEST_DIR,
      trainer.abstract_state().params,
      trainer.replicated,
      resumed_step=None if restored is None else int(state.step),
    )

  perm_fn = jax.jit(epoch_permutation, static_argnums=2, out_shardings=trainer.replicated)
  perms_cache: dict[int, Array] = {}

  def perms_from(epoch: int) -> Array:
    for e in list(perms_cache):
      if e < epoch:
        del perms_cache[e]
    for e in (epoch, epoch + 1):
      if e not in perms_cache:
        perms_cache[e] = perm_fn(keys[KEY_SHUFFLE], e, num_train)
    return jnp.stack([perms_cache[epoch], perms_cache[epoch + 1]])

  step = int(state.step)
  num_skipped = int(state.num_skipped)
  patience_steps = config.early_stopping_patience_epochs * steps_per_epoch
  # The patience runs from the best step, but not before the KL warm-up ends.
  patience_start = round(config.kl_warmup_epochs * steps_per_epoch)
  if best is not None and patience_steps and best.step >= 0:
    # Checked where the loop checks it, after an evaluation: a run killed between
    # evaluations goes on to the next one, as it would have without the kill.
    if step % eval_every == 0 and step - max(best.step, patience_start) >= patience_steps:
      logging.info("This run stopped early at step %d (best: step %d).", step, best.step)
      total_steps = step
  pending: list[tuple[int, int, Metrics]] = []  # (first step, num steps, device metrics)
  bar = tqdm.tqdm(
    total=total_steps,
    initial=step,
    disable=not (config.progress_bar and is_main),
    unit="step",
    dynamic_ncols=True,
  )
  window: list[dict[str, np.ndarray]] = []  # Host metrics since the last log row.
  window_seconds = 0.0  # Training time in the window, without evaluation or saving.
  clock = time.perf_counter()
  try:
    with _SigtermFlag() as sigterm:
      while step < total_steps:
        boundary = min(
          _next_multiple(step, config.log_every_steps),
          _next_multiple(step, eval_every),
          _next_multiple(step, ckpt_every),
          total_steps,
        )
        # One process alone may not stop mid-interval: the others would wait for it.
        while step < boundary and not (sigterm.raised and jax.process_count() == 1):
          n = min(boundary - step, chunk_len)
          epoch = step // steps_per_epoch
          state, metrics = train_chunk(
            state, train_images, perms_from(epoch), epoch, n, keys[KEY_EPS], keys[KEY_BINARIZE]
          )
          pending.append((step, n, metrics))
          step += n

        # Boundary: metrics come to the host, and are checked before any save.
        rows = _pull_and_check(pending, config, num_skipped, checkpointer.latest_step())
        num_skipped += int(np.sum(~rows["finite"]))
        pending.clear()
        if _any_process(sigterm.raised):  # Preempted: save this step and stop, all together.
          logging.warning("SIGTERM: saving checkpoint at step %d and stopping.", step)
          if step != last_saved:  # It may have been saved just before the signal.
            checkpointer.save(step, state)
          checkpointer.wait()
          raise Preempted(step)
        window.append(rows)
        window_seconds += time.perf_counter() - clock
        bar.update(len(rows["loss"]))
        if step % config.log_every_steps == 0 or step == total_steps:
          scalars = _window_scalars(window, window_seconds, config.batch_size)
          writer.write_scalars(step, "train", scalars)
          bar.set_postfix(
            loss=f"{scalars['loss']:.2f}", ex_per_s=f"{scalars['examples_per_sec']:.0f}"
          )
          window.clear()
          window_seconds = 0.0

        stop_early = False
        if step % eval_every == 0 or step == total_steps:
          logging.info("Evaluating at step %d", step)
          params = eval_params(state)
          _evaluate_and_write(config, model, params, eval_fn, test_x, keys, writer, step)
          if best is not None:
            val = jax.device_get(eval_fn(params, val_x, jax.random.fold_in(keys[KEY_EVAL], 1)))
            val = {k: float(v) for k, v in val.items()}
            writer.write_scalars(step, "validation", {**val, "neg_elbo": -val["elbo"]})
            if best.update(step, val["elbo"], params):
              logging.info("step %d: best validation ELBO so far, %.3f", step, val["elbo"])
            since = step - max(best.step, patience_start)
            stop_early = bool(patience_steps) and since >= patience_steps
        if step % ckpt_every == 0 or step == total_steps or stop_early:
          logging.info("Saving checkpoint at step %d", step)
          checkpointer.save(step, state)
          last_saved = step
        if stop_early:
          logging.info(
            "Early stopping at step %d: no better validation ELBO for %d epochs (best %.3f "
            "at step %d, saved in %s).",
            step,
            config.early_stopping_patience_epochs,
            best.elbo,
            best.step,
            workdir / BEST_DIR,
          )
          break
        clock = time.perf_counter()
  finally:
    bar.close()
    checkpointer.close()
    if best is not None:
      best.close()
    writer.close()
  return state


BEST_DIR = "best"
# Seed of the validation split's fixed binarization (the test split uses
# input_pipeline.EVAL_BINARIZATION_SEED).
VALIDATION_SEED = 1


class BestCheckpoint:
  """The parameters with the best validation ELBO so far, in ``directory``.

  One Orbax checkpoint ``{"params", "elbo"}`` named by its step, replaced
  atomically when a better one comes: the value and the parameters cannot
  disagree after a crash. Each save completes before the train state of the
  same step is saved, so a resumed run never lacks a best it has passed.
  Early stopping needs nothing else: the epochs since the best one follow
  from the current step.

  A best that the resumed run has not reached (saved after its latest
  checkpoint, or left by another run when this one starts fresh) belongs to
  no state this run holds: it is moved to ``<directory>_superseded_<time>``
  (kept, not deleted) and recomputed.
  """

  def __init__(
    self,
    directory: pathlib.Path,
    abstract_params: Params,
    sharding,
    resumed_step: int | None,
  ) -> None:
    self._sharding = sharding
    target = self.target(abstract_params, sharding)
    self._ckpt = checkpointing.Checkpointer(directory, max_to_keep=1)
    self.step, self.elbo = -1, -float("inf")
    restored = self._ckpt.restore_latest(target)
    if restored is None:
      return
    step, tree = restored
    if resumed_step is not None and step <= resumed_step:
      self.step, self.elbo = step, float(tree["elbo"])
      return
    self._ckpt.close()
    if jax.process_index() == 0:
      aside = directory.with_name(f"{directory.name}_superseded_{int(time.time())}")
      directory.rename(aside)
      logging.warning(
        "Best checkpoint %d is not from this run's past (resumed at step %s); moved it to %s.",
        step,
        resumed_step,
        aside,
      )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vae_jax: best checkpoint set aside")
    self._ckpt = checkpointing.Checkpointer(directory, max_to_keep=1)

  @staticmethod
  def target(abstract_params: Params, sharding) -> dict[str, Any]:
    """The saved tree's structure, for restoring it: ``{"params", "elbo"}``."""
    return {
      "params": abstract_params,
      "elbo": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding),
    }

  def update(self, step: int, elbo: float, params: Params) -> bool:
    """Saves ``params`` if ``elbo`` beats the best so far; returns whether it did."""
    if not elbo > self.elbo:  # NaN never wins.
      return False
    value = jax.device_put(jnp.asarray(elbo, jnp.float32), self._sharding)
    self._ckpt.save(step, {"params": params, "elbo": value})
    self._ckpt.wait()  # Committed before the train state of this step is saved.
    self.step, self.elbo = step, elbo
    return True

  def close(self) -> None:
    self._ckpt.close()


def _any_process(flag: bool) -> bool:
  """``flag`` of this process, or of any process in a multi-host run."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _window_scalars(window, seconds: float, batch_size: int) -> dict[str, float]:
  """Means of the logged window's per-step metrics, over the steps that were applied."""
  rows = {k: np.concatenate([w[k] for w in window]) for k in window[0]}
  finite = rows.pop("finite").astype(bool)
  scalars = {
    k: float(np.mean(v[finite])) if finite.any() else float("nan") for k, v in rows.items()
  }
  scalars["examples_per_sec"] = len(finite) * batch_size / seconds
  scalars["skipped_steps"] = float(np.sum(~finite))
  return scalars


def _pull_and_check(
  pending: list[tuple[int, int, Metrics]],
  config: ml_collections.ConfigDict,
  num_skipped: int,
  latest_checkpoint: int | None,
) -> dict[str, np.ndarray]:
  """Brings the metrics of finished chunks to the host and applies the non-finite policy."""
  if not pending:
    return {"loss": np.zeros(0), "finite": np.zeros(0, bool)}
  host = [(s, n, jax.device_get(m)) for s, n, m in pending]
  rows = {k: np.concatenate([m[k][:n] for _, n, m in host]) for k in host[0][2]}
  bad = ~rows["finite"].astype(bool)
  if not bad.any():
    return rows
  first = host[0][0] + int(np.argmax(bad))
  where = f"at step {first} (loss={rows['loss'][bad][0]}, grad_norm={rows['grad_norm'][bad][0]})"
  if config.nonfinite_policy == "skip":
    total = num_skipped + int(bad.sum())
    logging.warning("Skipped %d non-finite step(s), first %s.", int(bad.sum()), where)
    if total <= config.max_nonfinite_skips:
      return rows
    raise NonFiniteError(
      f"{total} non-finite steps were skipped, more than config.max_nonfinite_skips="
      f"{config.max_nonfinite_skips}; the last batch of them was {where}. Nothing non-finite "
      f"was saved; the latest checkpoint is step {latest_checkpoint}. Lower "
      "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
    )
  raise NonFiniteError(
    f"Non-finite loss or gradient {where}. The run stopped before saving it; the "
    f"latest checkpoint is step {latest_checkpoint}. Lower config.optimizer.learning_rate "
    "or set config.optimizer.grad_clip_norm (or config.nonfinite_policy='skip'), then run "
    "the same command to resume."
  )


_jit_prior_samples = jax.jit(evaluate.prior_samples, static_argnums=(0, 3, 4))
_jit_reconstructions = jax.jit(evaluate.reconstructions, static_argnums=(0, 3))


def _evaluate_and_write(config, model, params, eval_fn, test_x, keys, writer, step) -> None:
  scalars = jax.device_get(eval_fn(params, test_x, keys[KEY_EVAL]))
  scalars = {k: float(v) for k, v in scalars.items()}
  scalars["neg_elbo"] = -scalars["elbo"]
  writer.write_scalars(step, "test", scalars)
  logging.info(
    "step %d: test ELBO %.3f (reconstruction %.3f, KL %.3f) nats",
    step,
    scalars["elbo"],
    scalars["reconstruction"],
    scalars["kl"],
  )
  n = config.num_image_samples
  if n:
    likelihood = config.model.likelihood
    samples = _jit_prior_samples(model, params, keys[KEY_SAMPLES], n, likelihood)
    writer.write_image(step, "prior_samples", writers.image_grid(np.asarray(samples)))
    originals = test_x[: max(n // 2, 1)]
    recs = _jit_reconstructions(model, params, originals, likelihood)
    pairs = evaluate.interleave(originals, recs)
    columns = 2 * max(1, int(np.sqrt(n // 2)))
    writer.write_image(step, "reconstructions", writers.image_grid(pairs, columns=columns))
  writer.flush()
