"""Sweeps: M models with different ``(value, seed)`` trained by one compiled program.

``python -m vae_jax.main --config=configs/beta_sweep.py --workdir=W`` runs one
(any config with ``config.sweep.betas`` set, or ``config.sweep.field`` and
``config.sweep.field_values`` for an axis other than beta: a learning rate, free
bits, capacity, FactorVAE's gamma, DIP-VAE's lambdas; ``config.SWEEP_FIELDS``).
Design, in short:

* The per-model step is the single run's, unchanged: ``step.make_train_step``
  of ``objectives.make_loss_fn(model, spec, beta, hyper)`` with ``beta`` (or the
  swept field's value in ``hyper``; a learning rate by building the optimizer with
  it, ``trainer.Trainer.optimizer_for``) a traced scalar, mapped over the model axis by
  ``jax.vmap``. Parameters,
  optimizer states and step counters are stacked along a leading model axis:
  ``SweepState(step, models)`` where ``models`` is a ``step.TrainState``
  whose every leaf is ``[M, ...]``, so ``models[i]`` is a single run's state.
  Every objective option (DReG, free bits, KL warm-up, capacity, EMA) is the
  single run's.
* The multi-step device loop is ``step.make_train_chunk`` of the vmapped step,
  and the host loop is ``loop.run``, the single run's: the same checks,
  preemption, logging, evaluation, checkpoints and early stopping
  (``trainer.Program``).
* Keys. Model ``i`` with seed ``s_i`` draws its init, eps and evaluation keys
  exactly as a single run with ``config.seed = s_i``. The *data* (shuffling and
  dynamic binarization) is one stream shared by all models, from
  ``config.seed``: every model sees the same batches in the same order, so
  differences between models come from beta and seed alone, and the batch is
  gathered and binarized once per step rather than M times. Hence model ``i``
  is *exactly* the single run of the config with ``beta = beta_i`` and
  ``seed = s_i`` whenever ``s_i == config.seed``, and otherwise exactly that
  run with its data keys taken from ``config.seed``. ``tests/test_sweep.py``
  checks both.
* Devices. With more than one device the model axis is sharded over a
  ``jax.sharding.Mesh`` axis ``"model"`` of ``gcd(M, devices)`` devices; any
  devices left over form a ``"batch"`` axis over which the shared batch is
  sharded (data parallelism inside each model). Single device: no mesh.
* Validation and early stopping: each model keeps its best parameters (one
  stacked checkpoint in ``WORKDIR/best``); the sweep stops when every model
  has run out of patience.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vae_jax import config as config_lib
from vae_jax import input_pipeline, loop, objectives, optim, trainer
from vae_jax import step as step_lib
from vae_jax import workdir as workdir_lib
from vae_jax.models import Params
from vae_jax.step import TrainState

Array = jax.Array
Metrics = dict[str, Array]


class SweepState(NamedTuple):
  step: Array  # int32 scalar, shared: the chunk indexes the data with it.
  models: TrainState  # Every leaf [M, ...]; models.step[i] == step.


class SweepKeys(NamedTuple):
  """What differs between models besides their state: one entry per model."""

  eps: Array  # [M] typed PRNG keys: fold_in(key(seed_i), KEY_EPS).
  beta: Array  # [M] float32.
  # The swept field's values when it is not beta: {objectives.Spec field: [M] float32}, or
  # {trainer.LEARNING_RATE: [M] float32} for a sweep over the learning rate.
  hyper: dict[str, Array]


def make_sweep_step(
  base: trainer.Trainer,
  *,
  skip_nonfinite: bool = False,
  batch_sharding: NamedSharding | None = None,
  matmul_precision: str = "default",
  grad_norm_every: int = 1,
) -> Callable[[SweepState, Array, SweepKeys], tuple[SweepState, Metrics]]:
  """Returns ``sweep_step(state, batch, keys) -> (state, metrics)``, the single run's step
  vmapped over models, each with its own beta (traced) and eps key.

  ``batch: [batch, *event_shape]`` is one batch, seen by every model; ``metrics``
  are ``[M]`` arrays. It has the signature ``step.make_train_chunk`` expects,
  with the ``SweepKeys`` in place of the eps key.
  """

  def one_model(state: TrainState, batch: Array, eps_key: Array, beta: Array, hyper):
    step = step_lib.make_train_step(
      base.loss_fn(beta, hyper),
      base.optimizer_for(hyper),
      skip_nonfinite,
      matmul_precision,
      grad_norm_every,
    )
    return step(state, batch, eps_key)

  def sweep_step(state: SweepState, batch: Array, keys: SweepKeys) -> tuple[SweepState, Metrics]:
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    # Each model gets its own copy of the batch. With one shared batch, XLA computes the
    # first layer of all M models as one [batch, in] x [in, M * out] product, and its
    # weight gradient as [in, M, out], then transposes that (and the Adam moments that
    # follow) into the stacked [M, in, out] layout: three transposes of every model's
    # largest weight per step. A copy per model makes every product a batched product
    # over the model axis, with the single run's shapes; the copy is M x 400 KB.
    num_models = keys.beta.shape[0]
    batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_models, *a.shape)), batch)
    models, metrics = jax.vmap(one_model, in_axes=(0, 0, 0, 0, 0))(
      state.models, batches, keys.eps, keys.beta, keys.hyper
    )
    return SweepState(state.step + 1, models), metrics

  return sweep_step


def sweep_mesh(num_models: int, batch_size: int, devices: Sequence | None = None) -> Mesh | None:
  """A ``("model", "batch")`` mesh for ``num_models``, or ``None`` on one device.

  The model axis takes ``gcd(num_models, devices)`` devices (models are
  independent, so this axis costs no communication); the rest, if they divide
  ``batch_size``, shard each batch (costs a gradient all-reduce per step).
  """
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) == 1:
    return None
  model_par = math.gcd(num_models, len(devices))
  batch_par = len(devices) // model_par
  if batch_size % batch_par:
    batch_par = 1
  grid = np.asarray(devices[: model_par * batch_par]).reshape(model_par, batch_par)
  return Mesh(grid, ("model", "batch"))


@dataclasses.dataclass(frozen=True)
class SweepTrainer:
  """Everything a sweep runs, built from a config by ``build_sweep_trainer``.

  Attributes:
    base: the ``trainer.Trainer`` of ``config`` (model, optimizer, objective,
      evaluation, data keys of ``config.seed``, steps per epoch, plan).
    betas: ``[M]`` the models' betas.
    seeds: ``[M]`` the models' seeds.
    keys: the per-model ``SweepKeys``, placed on the mesh.
    eval_keys: ``[M]`` each model's test-ELBO key (as its single run's).
    init_keys: ``[M]`` each model's init key (as its single run's).
    sweep_step: the vmapped step, ``(SweepState, batch, SweepKeys) -> (SweepState,
      metrics)``; ``base.make_chunk(feed.batch, sweep_step)`` is its multi-step call.
    eval_fn: ``(stacked params, x, eval_keys) -> {name: [M]}``.
    mesh: the device mesh, or ``None`` on one device.
  """

  base: trainer.Trainer
  betas: tuple[float, ...]
  seeds: tuple[int, ...]
  names: tuple[str, ...]
  keys: SweepKeys
  eval_keys: Array
  init_keys: Array
  sweep_step: Callable[..., tuple[SweepState, Metrics]]
  eval_fn: Callable[[Params, Array, Array], dict[str, Array]]
  mesh: Mesh | None

  @property
  def num_models(self) -> int:
    return len(self.betas)

  def state_shardings(self, state_shape) -> SweepState | None:
    """Shardings of the stacked state: model axis split over ``"model"``, step replicated."""
    if self.mesh is None:
      return None
    stacked = NamedSharding(self.mesh, P("model"))
    return SweepState(
      step=NamedSharding(self.mesh, P()),
      models=jax.tree.map(lambda _: stacked, state_shape.models),
    )

  def _init(self, init_keys: Array) -> SweepState:
    return SweepState(jnp.zeros((), jnp.int32), jax.vmap(self.base.new_state)(init_keys))

  def state_shape(self):
    """The stacked state's shapes and dtypes, with shardings on a mesh: a restore target."""
    shape = jax.eval_shape(self._init, self.init_keys)
    shardings = self.state_shardings(shape)
    if shardings is None:
      return shape
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape, shardings
    )

  def init_state(self) -> SweepState:
    """Model ``i``'s params are ``model.init(init_keys[i])``, as in its single run."""
    shape = jax.eval_shape(self._init, self.init_keys)
    return jax.jit(self._init, out_shardings=self.state_shardings(shape))(self.init_keys)

  def sharding(self) -> NamedSharding | None:
    """Where replicated data lives: every device of the mesh (``None`` on one device)."""
    return None if self.mesh is None else NamedSharding(self.mesh, P())

  def stream_sharding(self) -> NamedSharding:
    """A streamed dispatch's batches ``[chunk_len, B, ...]``: split along the batch axis
    over the mesh's ``"batch"`` devices, a copy on each of its ``"model"`` devices."""
    if self.mesh is None:
      return self.base.stream_sharding
    return NamedSharding(self.mesh, P(None, "batch"))

  def replicated(self, x):
    """``x`` placed whole on every device of the mesh (or just on the device)."""
    return jax.device_put(x, self.sharding())


def swept_hyperparameters(
  config: ml_collections.ConfigDict, models: Sequence[config_lib.SweepModel]
) -> dict[str, Array]:
  """``{objectives.Spec field: [M] float32}``: each model's value of the swept field, when it
  is not beta (which ``SweepKeys.beta`` carries); ``{trainer.LEARNING_RATE: [M]}`` for the
  learning rate. Sweeping DIP-VAE's ``lambda_od`` with
  ``lambda_d`` left to its default sweeps the default with it (``trainer.dip_lambda_d``)."""
  field = config_lib.sweep_field(config)
  if field == "beta":
    return {}
  values = jnp.asarray([m.value for m in models], jnp.float32)
  if field == "optimizer.learning_rate":
    return {trainer.LEARNING_RATE: values}
  hyper = {objectives.SWEEP_SPEC_FIELDS[field]: values}
  if field == "dip_vae.lambda_od" and config.dip_vae.lambda_d is None:
    hyper["lambda_d"] = values * trainer.dip_lambda_d_factor(config.objective)
  return hyper


def build_sweep_trainer(
  config: ml_collections.ConfigDict,
  event_shape,
  num_train: int,
  *,
  devices: Sequence | None = None,
) -> SweepTrainer:
  """Builds the vmapped step, evaluation, keys and mesh of a validated sweep config.

  Raises:
    config.ConfigError: the config describes no sweep, or does not fit the data.
  """
  models = config_lib.sweep_models(config)
  betas, seeds = tuple(m.beta for m in models), tuple(m.seed for m in models)
  base = trainer.build_trainer(config, event_shape, num_train)
  mesh = sweep_mesh(len(betas), config.batch_size, devices)
  batch_sharding = None
  if mesh is not None and mesh.shape["batch"] > 1:
    batch_sharding = NamedSharding(mesh, P("batch"))
  sweep_step = make_sweep_step(
    base,
    skip_nonfinite=config.nonfinite_policy == "skip",
    batch_sharding=batch_sharding,
    matmul_precision=config.matmul_precision,
    grad_norm_every=config.log_every_steps,
  )
  per_seed = {s: step_lib.run_keys(s) for s in set(seeds)}
  stack = lambda tag: jnp.stack([per_seed[s][tag] for s in seeds])  # noqa: E731
  keys = SweepKeys(
    eps=stack(step_lib.KEY_EPS),
    beta=jnp.asarray(betas, jnp.float32),
    hyper=swept_hyperparameters(config, models),
  )
  eval_keys, init_keys = stack(step_lib.KEY_EVAL), stack(step_lib.KEY_INIT)
  if mesh is not None:
    on_models = NamedSharding(mesh, P("model"))
    keys = jax.device_put(keys, on_models)
    eval_keys, init_keys = jax.device_put((eval_keys, init_keys), on_models)
  eval_fn = jax.jit(jax.vmap(base.eval_fn, in_axes=(0, None, 0)))
  return SweepTrainer(
    base=base,
    betas=betas,
    seeds=seeds,
    names=tuple(m.name for m in models),
    keys=keys,
    eval_keys=eval_keys,
    init_keys=init_keys,
    sweep_step=sweep_step,
    eval_fn=eval_fn,
    mesh=mesh,
  )


def run_steps(
  built: SweepTrainer,
  state: SweepState,
  feed: input_pipeline.Feed,
  num_steps: int,
  chunk=None,
) -> tuple[SweepState, Metrics]:
  """``num_steps`` steps of every model from ``state`` in chunks (for benchmarks and tests);
  returns the state and the last chunk's device metrics. ``chunk``: a compiled multi-step
  call to reuse (default: a new one)."""
  chunk = chunk or built.base.make_chunk(feed.batch, built.sweep_step)
  step, end, metrics = int(state.step), int(state.step) + num_steps, None
  while step < end:
    n = min(end - step, built.base.chunk_len)
    state, metrics = chunk(state, feed.inputs(step, n), n, built.keys)
    step += n
  return state, metrics


def model_state(state: SweepState, i: int) -> TrainState:
  """Model ``i``'s ``step.TrainState``, as its single run would hold it."""
  return jax.tree.map(lambda x: x[i], state.models)


def eval_params(state: SweepState) -> Params:
  """The stacked parameters to evaluate (each model's EMA if the optimizer keeps one)."""
  return optim.eval_params(state.models.opt_state, state.models.params)


class Sweep(trainer.Program):
  """Every model of ``config.sweep``: the ``loop.Program`` of a sweep in ``workdir``."""

  stacked = True

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    built: SweepTrainer,
    feed: input_pipeline.Feed,
    evaluation: input_pipeline.EvalData,
  ):
    ids = [
      trainer.ModelId(name, seed, beta)
      for name, seed, beta in zip(built.names, built.seeds, built.betas, strict=True)
    ]
    super().__init__(config, workdir, built.base, evaluation, ids, built.sharding())
    self.sweep, self.feed = built, feed
    self.chunk = built.base.make_chunk(feed.batch, built.sweep_step)

  def abstract_state(self):
    return self.sweep.state_shape()

  def init_state(self) -> SweepState:
    return self.sweep.init_state()

  def run_chunk(self, state: SweepState, step: int, num_steps: int):
    return self.chunk(state, self.feed.inputs(step, num_steps), num_steps, self.sweep.keys)

  def num_skipped(self, state: SweepState) -> np.ndarray:
    return np.asarray(jax.device_get(state.models.num_skipped))

  def eval_params(self, state: SweepState) -> Params:
    return eval_params(state)

  def scores(self, params: Params, x, split: str) -> dict[str, np.ndarray]:
    keys = self.sweep.eval_keys
    if split == "validation":
      keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    scores = jax.device_get(self.sweep.eval_fn(params, x, keys))
    return {k: np.asarray(v) for k, v in scores.items()}

  def model_params(self, params: Params, i: int) -> Params:
    return jax.tree.map(lambda x: x[i], params)

  def abstract_params(self):
    return self.sweep.state_shape().models.params


def train_sweep(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, allow_config_change: bool = False
) -> SweepState:
  """Trains (or resumes) every model of ``config.sweep`` in ``workdir``; returns the state.

  Writes ``workdir/config.json``, ``workdir/checkpoints/<step>/`` (the stacked
  state) and, per model, ``workdir/models/beta_<b>_seed_<s>/metrics.jsonl`` and
  TensorBoard files with the same rows as a single run's.

  Raises:
    loop.Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was saved.
    loop.NonFiniteError: a non-finite loss, gradient or update under policy ``stop``.
    config.ConfigError: the config is invalid or differs from the workdir's run.
  """
  config_lib.validate(config)
  workdir = workdir_lib.prepare(config, workdir, allow_config_change)
  logging.info(
    "Config (the fields that differ from vae_jax.config.base_config()):\n%s",
    config_lib.describe(config),
  )
  with workdir_lib.lock(workdir):
    splits = input_pipeline.load_splits(config)
    built = build_sweep_trainer(config, splits.event_shape, splits.num_train)
    logging.info("Sweep of %d models on %s", built.num_models, built.mesh or jax.devices()[0])
    trainer.log_plan(built.base)
    sharding = built.sharding()
    evaluation = input_pipeline.eval_data(config, splits, sharding, built.base.model.likelihood)
    feed = built.base.feed(config, splits, sharding, built.stream_sharding())
    del splits  # The device holds the data now (or the feed reads it); free the host copies.
    return loop.run(Sweep(config, workdir, built, feed, evaluation), config)
