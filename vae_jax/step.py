"""The device side of training: keys, the train state, the jitted step and multi-step chunk.

* The train state is a plain pytree ``TrainState(step, params, opt_state, num_skipped)``.
* ``train_step(state, batch, key)`` is pure; the eps key of step ``s`` is
  ``fold_in(key, s)``, so a resumed run draws exactly the noise an
  uninterrupted one would, with no RNG state to checkpoint.
* The whole training split sits in device memory as uint8. One jitted call
  (``make_train_chunk``) runs up to ``chunk_len`` steps with ``lax.scan``,
  gathering each batch from that epoch's permutation and binarizing it on
  device. Batches depend only on ``(seed, step)``, so resume sees the same
  batches too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax import input_pipeline, models
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
  model: Model, optimizer: optax.GradientTransformation, key: Array, event_shape
) -> TrainState:
  """A fresh ``TrainState`` at step 0 (params from ``model.init(key, ...)``)."""
  params = model.init(key, jnp.zeros((1, *event_shape), jnp.float32))
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
    ValueError: more devices asked for than are visible.
  """
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


class Permutations:
  """``perms(epoch) -> [2, n]``: the orders of ``epoch`` and ``epoch + 1``, as
  ``make_train_chunk`` takes them, computed on device once and cached (older
  epochs are dropped)."""

  def __init__(self, shuffle_key: Array, num_examples: int, sharding=None):
    self._key, self._n = shuffle_key, num_examples
    placed = {} if sharding is None else {"out_shardings": sharding}
    self._fn = jax.jit(epoch_permutation, static_argnums=2, **placed)
    self._cache: dict[int, Array] = {}

  def __call__(self, epoch: int) -> Array:
    for e in [e for e in self._cache if e < epoch]:
      del self._cache[e]
    for e in (epoch, epoch + 1):
      if e not in self._cache:
        self._cache[e] = self._fn(self._key, e, self._n)
    return jnp.stack([self._cache[epoch], self._cache[epoch + 1]])


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
  arrays; entries past ``num_active`` are zeros. ``eps_key`` is passed to the
  step as its key (a sweep passes its per-model keys there).

  Raises:
    ValueError: ``chunk_len`` outside ``[1, steps_per_epoch]``.
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

    if chunk_len == 1:  # One step, outside any loop or conditional (see chunk_len_for).
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


def chunk_len_for(steps_per_dispatch: int, steps_per_epoch: int, kind: str, platform: str) -> int:
  """Steps per dispatch: ``steps_per_dispatch``, at most an epoch, and 1 for a
  model that must stay out of loop bodies (``models.keep_out_of_loops``: a
  convolutional model on CPU, where the chunk's scan made its step 9x slower).
  At a fifth of a second per step the host's dispatch costs nothing.
  """
  if models.keep_out_of_loops(kind, platform):
    return 1
  return min(steps_per_dispatch, steps_per_epoch)
