"""The device side of training: keys, the train state, the jitted step and multi-step chunk.

* The train state is a plain pytree ``TrainState(step, params, opt_state, num_skipped)``.
* ``train_step(state, batch, key)`` is pure; the eps key of step ``s`` is
  ``fold_in(key, s)``, so a resumed run draws exactly the noise an
  uninterrupted one would, with no RNG state to checkpoint.
* One jitted call (``make_train_chunk``) runs up to ``chunk_len`` steps with
  ``lax.scan``, each taking its batch from the feed (``input_pipeline``: gathered from
  the training split in device memory, or streamed from the host) by its step number.
  Batches depend only on ``(seed, step)``, so resume sees the same batches too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax import config as config_lib
from vae_jax.models import Model, Params

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


def initial_state(
  model: Model,
  optimizer: optax.GradientTransformation,
  key: Array,
  event_shape,
  auxiliary=None,
) -> TrainState:
  """A fresh ``TrainState`` at step 0: params from ``model.init(key, ...)``, and those of the
  objective's ``auxiliary`` network (``objectives.Auxiliary``), if any, from
  ``fold_in(key, 1)`` as ``params[auxiliary.name]``."""
  params = model.init(key, jnp.zeros((1, *event_shape), jnp.float32))
  if auxiliary is not None:
    params = {**params, auxiliary.name: auxiliary.init(jax.random.fold_in(key, 1), model)}
  # Two arrays, not one shared: the state is donated leaf by leaf.
  return TrainState(
    jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((), jnp.int32)
  )


def make_train_step(
  loss_fn: Callable[[Params, Array, Array, Array], tuple[Array, Metrics]],
  optimizer: optax.GradientTransformation,
  skip_nonfinite: bool = False,
  matmul_precision: str = "default",
  grad_norm_every: int = 1,
) -> Callable[[TrainState, Array, Array], tuple[TrainState, Metrics]]:
  """Returns the pure ``train_step(state, batch, key) -> (state, metrics)``.

  ``loss_fn(params, x, key, step) -> (loss, metrics)`` (``objectives.make_loss_fn``).
  ``batch: [batch, *event_shape]`` preprocessed data. ``key`` is the run's eps
  key; the step folds in its own step number. Jit it with
  ``jax.jit(train_step, donate_argnums=0)``.

  With ``skip_nonfinite``, every step's loss, gradient and update are checked;
  a step where any is NaN/Inf leaves params and optimizer state unchanged (the
  step counter still advances, so the data order is unaffected) and increments
  ``num_skipped``. Otherwise ``metrics["finite"]`` is the loss's finiteness: a
  non-finite gradient or update makes the parameters, and so the next step's
  loss, non-finite, and the caller stops on it (``loop.save`` checks the whole
  state before any save). Each full pass over the gradients costs about 10% of
  a small model's step on CPU, so then ``metrics["grad_norm"]`` is computed only
  on steps ``s`` with ``(s + 1) % grad_norm_every == 0`` (NaN on the others).

  ``matmul_precision`` other than ``"default"`` is the matmul precision the step
  is traced with (``jax.default_matmul_precision``; it matters on GPUs and TPUs).
  """

  def train_step(state: TrainState, batch: Array, key: Array) -> tuple[TrainState, Metrics]:
    if matmul_precision == "default":
      return _step(state, batch, key)
    with jax.default_matmul_precision(matmul_precision):
      return _step(state, batch, key)

  def _step(state: TrainState, batch: Array, key: Array) -> tuple[TrainState, Metrics]:
    step_key = jax.random.fold_in(key, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, step_key, state.step)
    # optax's transformations mix dtypes (Adam's decay ** int32 count) and need the
    # standard promotion rules; everything of vae_jax runs under strict ones too.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    num_skipped = state.num_skipped
    if not skip_nonfinite:
      sampled = (state.step + 1) % grad_norm_every == 0
      metrics["grad_norm"] = jax.lax.cond(
        sampled, optax.tree.norm, lambda g: jnp.full((), jnp.nan, jnp.float32), grads
      )
      metrics["finite"] = jnp.isfinite(metrics["loss"])
    else:
      metrics["grad_norm"] = optax.tree.norm(grads)
      # A finite gradient can still give a non-finite update (a NaN learning rate,
      # an optimizer state gone bad): the update is checked too.
      update_norm = optax.tree.norm(updates)
      finite = (
        jnp.isfinite(metrics["loss"])
        & jnp.isfinite(metrics["grad_norm"])
        & jnp.isfinite(update_norm)
      )
      metrics["finite"] = finite
      keep = functools.partial(jnp.where, finite)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
      num_skipped = num_skipped + (~finite).astype(jnp.int32)
    return TrainState(state.step + 1, params, opt_state, num_skipped), metrics

  return train_step


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D mesh named ``data`` over the first ``num_devices`` devices (0: all).

  Raises:
    config.ConfigError: more devices asked for than are visible.
  """
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise config_lib.ConfigError(
      f"config.num_devices={num_devices}, but {len(devices)} devices are visible "
      f"({devices[0].platform}); use 0 for all of them."
    )
  return jax.sharding.Mesh(np.asarray(devices[: num_devices or len(devices)]), ("data",))


def make_train_chunk(
  train_step: Callable[[TrainState, Array, Array], tuple[TrainState, Metrics]],
  batch_fn: Callable[[Any, Array], Array],
  *,
  chunk_len: int,
  batch_sharding: jax.sharding.Sharding | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
  """One jitted call that runs up to ``chunk_len`` train steps on device.

  ``batch_fn(feed_inputs, step) -> [batch, *event_shape]`` gives the preprocessed batch
  of train step ``step`` from what the feed passed in (``input_pipeline``'s feeds).
  With ``batch_sharding`` (e.g. ``NamedSharding(mesh, P("data"))``) each batch is
  split over the devices along its batch axis, and XLA runs the step data-parallel
  (gradients are all-reduced); the state stays replicated. The math is that of one
  device, up to the order of float reductions.

  Returns ``chunk(state, feed_inputs, num_active, eps_key) -> (state, metrics)``: only
  the first ``num_active`` steps run; the rest pass the state through, so any number
  of steps up to ``chunk_len`` reuses one compiled program. ``metrics`` are
  ``[chunk_len]`` arrays; entries past ``num_active`` are zeros. ``eps_key`` is passed
  to the step as its key (a sweep passes its per-model keys there).

  Raises:
    ValueError: ``chunk_len < 1``.
  """
  if chunk_len < 1:
    raise ValueError(f"chunk_len must be >= 1, got {chunk_len}.")

  def chunk(state, feed_inputs, num_active, eps_key):
    def run(state):
      batch = batch_fn(feed_inputs, state.step)
      if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
      return train_step(state, batch, eps_key)

    if chunk_len == 1:  # One step, outside any loop or conditional (see vae_jax.execution).
      state, metrics = run(state)
      return _replicated(state, jax.tree.map(lambda m: m[None], metrics))

    metrics_shape = jax.eval_shape(run, state)[1]

    def body(state, i):
      def skip(state):
        return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)

      return jax.lax.cond(i < num_active, run, skip, state)

    state, metrics = jax.lax.scan(body, state, jnp.arange(chunk_len))
    return _replicated(state, metrics)

  def _replicated(state, metrics):
    if batch_sharding is not None:  # Every host can read every output.
      replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
      state, metrics = jax.lax.with_sharding_constraint((state, metrics), replicated)
    return state, metrics

  return jax.jit(chunk, donate_argnums=0)
