"""What a run computes, built once from a config, and what single runs and sweeps share.

* ``build_trainer(config, event_shape, num_train)`` -> ``Trainer``: the model, the
  optimizer, the objective, the jitted train step, the full-split evaluation, the PRNG
  keys, the execution plan and the device mesh: the same objects for training, sweeps,
  evaluation and benchmarks.
* ``Program``: the ``loop.Program`` parts that a single run (``train.SingleRun``) and a
  sweep (``sweep.Sweep``) share: the evaluation at each boundary (test ELBO, images,
  validation), the best parameters and early stopping, and how messages name a model.
  A subclass says only how its state holds its models (one, or ``M`` stacked).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from vae_jax import config as config_lib
from vae_jax import (
  datasets,
  early_stopping,
  estimators,
  execution,
  input_pipeline,
  models,
  objectives,
  optim,
  writers,
)
from vae_jax import step as step_lib
from vae_jax import workdir as workdir_lib
from vae_jax.models import Model, Params
from vae_jax.step import TrainState

Array = jax.Array
Metrics = dict[str, Array]
# The key of a sweep's traced hyperparameters (sweep.SweepKeys.hyper) that holds each
# model's learning rate; every other key is an objectives.Spec field.
LEARNING_RATE = "learning_rate"


def objective_spec(config: ml_collections.ConfigDict, steps_per_epoch: int) -> objectives.Spec:
  """``config``'s objective, its schedules converted from epochs to steps."""
  return objectives.Spec(
    objective=config.objective,
    num_samples=config.num_samples,
    gradient_estimator=config.gradient_estimator,
    free_bits=config.free_bits,
    warmup_steps=round(config.kl_warmup_epochs * steps_per_epoch),
    capacity_nats=config.capacity_nats,
    capacity_steps=max(1, round(config.capacity_epochs * steps_per_epoch)),
    dataset_size=steps_per_epoch * config.batch_size,
    num_groups=config.num_groups,
    ciwae_beta=config.ciwae_beta,
    gamma=config.factor_vae.gamma,
    discriminator_hidden=tuple(config.factor_vae.hidden),
    lambda_od=config.dip_vae.lambda_od,
    lambda_d=dip_lambda_d(config),
  )


def dip_lambda_d(config: ml_collections.ConfigDict) -> float:
  """DIP-VAE's ``lambda_d``: the config's, or by default ``10 lambda_od`` for DIP-VAE-I and
  ``lambda_od`` for DIP-VAE-II (Kumar et al. 2018; disentanglement_lib's gin configs)."""
  d = config.dip_vae
  if d.lambda_d is not None:
    return float(d.lambda_d)
  return dip_lambda_d_factor(config.objective) * d.lambda_od


def dip_lambda_d_factor(objective: str) -> float:
  """``lambda_d / lambda_od`` by default: 10 for DIP-VAE-I, 1 for DIP-VAE-II."""
  return 10.0 if objective == "dip_vae_i" else 1.0


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything a run computes, built from a config.

  Attributes:
    model: the model's pure functions (its ``likelihood`` is ``p(x | z)``).
    optimizer: the optax optimizer.
    optimizer_with_learning_rate: the same optimizer with another (peak) learning rate, a
      traced scalar for one model of a sweep over ``optimizer.learning_rate``.
    spec: the objective and its options, with schedules in steps.
    plan: how the run executes on its platform (``execution.plan``).
    train_step: the pure ``train_step(state, batch, key)`` of ``config.beta``.
    eval_fn: the jitted full-split ELBO (see ``estimators.make_eval_fn``).
    keys: PRNG keys by purpose (``step.KEY_INIT``, ``step.KEY_EPS``, ...).
    steps_per_epoch: full batches per epoch (the remainder is dropped).
    total_steps: steps of the whole run (``num_train_steps``, else ``num_epochs`` epochs).
    chunk_len: steps per dispatch (the plan's, at most an epoch).
    event_shape: shape of one example.
    mesh: the devices the batch is split over.
  """

  model: Model
  optimizer: optax.GradientTransformation
  optimizer_with_learning_rate: Callable[[Array], optax.GradientTransformation]
  spec: objectives.Spec
  plan: execution.Plan
  train_step: Callable[[TrainState, Array, Array], tuple[TrainState, Metrics]]
  eval_fn: Callable[[Params, Array, Array], dict[str, Array]]
  keys: dict[int, Array]
  steps_per_epoch: int
  total_steps: int
  chunk_len: int
  event_shape: tuple[int, ...]
  mesh: jax.sharding.Mesh

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    """Sharding of the state, the datasets and the permutations: a copy per device."""
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    """Each batch split over the devices along its batch axis (data parallelism)."""
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

  @property
  def stream_sharding(self) -> jax.sharding.NamedSharding:
    """A streamed dispatch's batches ``[chunk_len, B, ...]``, split along the batch axis."""
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "data"))

  def init_state(self) -> TrainState:
    # Jitted: Flax's init run eagerly compiles each of its small ops separately.
    init = jax.jit(self.new_state, out_shardings=self.replicated)
    return init(self.keys[step_lib.KEY_INIT])

  def new_state(self, key: Array) -> TrainState:
    """The state at step 0 from ``key`` (the objective's auxiliary network included): the
    one function single runs and every model of a sweep (vmapped) start from."""
    return step_lib.initial_state(
      self.model, self.optimizer, key, self.event_shape, objectives.auxiliary(self.spec)
    )

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: the target a checkpoint restores into,
    whatever device count wrote it."""
    return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
      jax.eval_shape(self.init_state),
    )

  def loss_fn(
    self, beta: float | Array, hyper: dict[str, Array] | None = None
  ) -> objectives.LossFn:
    """The objective's ``loss_fn(params, x, key, step)`` with KL weight ``beta`` and, for a
    model of a sweep over another field, that field's traced value: ``hyper`` maps
    ``objectives.Spec`` fields (and ``learning_rate``, which ``optimizer_for`` reads) to
    scalars."""
    spec_values = {k: v for k, v in (hyper or {}).items() if k != LEARNING_RATE}
    return objectives.make_loss_fn(self.model, self.spec, beta, spec_values)

  def optimizer_for(self, hyper: dict[str, Array] | None = None) -> optax.GradientTransformation:
    """The optimizer, with ``hyper[LEARNING_RATE]`` as its learning rate when a sweep varies
    it; the state it updates is the same in either case."""
    if hyper and LEARNING_RATE in hyper:
      return self.optimizer_with_learning_rate(hyper[LEARNING_RATE])
    return self.optimizer

  def feed(
    self,
    config: ml_collections.ConfigDict,
    splits: input_pipeline.Splits,
    sharding,
    stream_sharding: jax.sharding.Sharding | None = None,
  ) -> input_pipeline.Feed:
    """The training split's feed, in the order and with the preprocessing draws of this
    run's keys (``config.seed``'s): in device memory (placed with ``sharding``) where
    ``splits`` holds it, else streamed (each dispatch's batches placed with
    ``stream_sharding``; default: split along the batch axis over this trainer's mesh)."""
    shuffle_key, binarize_key = self.keys[step_lib.KEY_SHUFFLE], self.keys[step_lib.KEY_BINARIZE]
    if splits.train is not None:
      images = jax.device_put(splits.train.images, sharding)
      labels = None
      if self.model.num_classes:  # A conditional VAE's batches are (x, labels).
        labels = jax.device_put(np.asarray(splits.train.labels, np.int32), sharding)
      return input_pipeline.DeviceFeed(
        images=images,
        batch_size=config.batch_size,
        binarization=config.binarization,
        binarize_key=binarize_key,
        permutations=input_pipeline.Permutations(shuffle_key, images.shape[0], sharding),
        bits=config.data.bits,
        labels=labels,
      )
    return input_pipeline.StreamFeed(
      path=splits.stream_file,
      event_shape=splits.event_shape,
      num_examples=splits.num_train,
      batch_size=config.batch_size,
      binarization=config.binarization,
      bits=config.data.bits,
      shuffle_key=shuffle_key,
      binarize_key=binarize_key,
      sharding=stream_sharding or self.stream_sharding,
      chunk_len=self.chunk_len,
      total_steps=self.total_steps,
      read_threads=config.data.read_threads,
    )

  def make_chunk(self, batch_fn, train_step=None, batch_sharding=None):
    """The jitted multi-step call of ``train_step`` (default: this trainer's) fed by
    ``batch_fn`` (a feed's ``batch``); see ``step.make_train_chunk``."""
    return step_lib.make_train_chunk(
      train_step or self.train_step,
      batch_fn,
      chunk_len=self.chunk_len,
      batch_sharding=batch_sharding,
    )


def build_trainer(config: ml_collections.ConfigDict, event_shape, num_train: int) -> Trainer:
  """Builds the model, optimizer, objective, step and evaluation of a validated ``config``
  for a training split of ``num_train`` examples of ``event_shape``.

  Raises:
    config.ConfigError: the config does not fit the data or devices.
  """
  event_shape = tuple(event_shape)
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(
      f"config.batch_size={config.batch_size} exceeds the {num_train} training examples."
    )
  mesh = step_lib.make_mesh(config.num_devices)
  if config.batch_size % mesh.size:
    raise config_lib.ConfigError(
      f"config.batch_size={config.batch_size} is not divisible by the {mesh.size} devices "
      "it is split over. Choose a multiple, or set config.num_devices."
    )
  plan = execution.plan(config, mesh.devices.flat[0].platform)
  model = models.make_model(config, event_shape)
  spec = objective_spec(config, steps_per_epoch)
  aux = objectives.auxiliary(spec)

  def optimizer_with_learning_rate(learning_rate):
    optimizer = optim.make_optimizer(config, steps_per_epoch, learning_rate)
    if aux is None:
      return optimizer
    return optim.with_auxiliary(
      optimizer, aux.name, optim.AUXILIARY_OPTIMIZERS[config.objective](config)
    )

  optimizer = optimizer_with_learning_rate(config.optimizer.learning_rate)
  train_step = step_lib.make_train_step(
    objectives.make_loss_fn(model, spec, config.beta),
    optimizer,
    skip_nonfinite=config.nonfinite_policy == "skip",
    matmul_precision=config.matmul_precision,
    grad_norm_every=config.log_every_steps,
  )
  eval_fn = estimators.make_eval_fn(
    model,
    config.eval_batch_size,
    deterministic=config.objective == "autoencoder",
    unroll=plan.unroll_loops,
  )
  return Trainer(
    model=model,
    optimizer=optimizer,
    optimizer_with_learning_rate=optimizer_with_learning_rate,
    spec=spec,
    plan=plan,
    train_step=train_step,
    eval_fn=eval_fn,
    keys=step_lib.run_keys(config.seed),
    steps_per_epoch=steps_per_epoch,
    total_steps=config.num_train_steps or config.num_epochs * steps_per_epoch,
    chunk_len=min(plan.steps_per_dispatch, steps_per_epoch),
    event_shape=event_shape,
    mesh=mesh,
  )


def log_plan(trainer: Trainer) -> None:
  """The run's devices and execution plan, in two lines."""
  logging.info("Data-parallel over %d device(s): %s", trainer.mesh.size, trainer.mesh.devices)
  logging.info(
    "%d train step(s) per dispatch (%s)%s.",
    trainer.chunk_len,
    trainer.plan.reason,
    "; the evaluation's short loops unrolled" if trainer.plan.unroll_loops else "",
  )


# --------------------------------------------------------------------------
# What single runs and sweeps share.


_jit_prior_samples = jax.jit(models.prior_samples, static_argnums=(0, 3))
_jit_reconstructions = jax.jit(models.reconstructions, static_argnums=0)


def write_images(
  model: Model,
  params: Params,
  test_x: Array,
  key: Array,
  n: int,
  writer,
  step: int,
  shown: np.ndarray | None = None,
) -> None:
  """``n`` prior samples and reconstructions of ``params`` as image grids.

  The reconstructions grid alternates rows: a row of test images, then the row of their
  reconstructions. The test images are ``shown`` (the data as they are) where given, else
  ``test_x`` (as the model reads them). A conditional VAE's prior samples are drawn per
  class, one column per class (``models.prior_samples``), and its ``test_x`` is
  ``(x, labels)``.
  """
  if not n:
    return
  samples = _jit_prior_samples(model, params, key, n)
  columns = model.num_classes or None
  writer.write_image(
    step, "prior_samples", writers.image_grid(np.asarray(samples), columns=columns)
  )
  columns = max(1, int(np.sqrt(n)))
  count = max(n // 2 // columns, 1) * columns
  originals = jax.tree.map(lambda a: a[:count], test_x)
  recs = np.asarray(_jit_reconstructions(model, params, originals))
  inputs = np.asarray(models.images_of(originals) if shown is None else shown[:count])
  rows = [a[i : i + columns] for i in range(0, count, columns) for a in (inputs, recs)]
  grid = writers.image_grid(np.concatenate(rows), columns=columns)
  writer.write_image(step, "reconstructions", grid)


class ModelId(NamedTuple):
  """Who a model of a program is: its name (``""`` for a single run), seed and beta."""

  name: str
  seed: int
  beta: float


class Program:
  """The parts of a ``loop.Program`` that single runs and sweeps share.

  A subclass sets ``self.models`` (one ``ModelId`` per model) and implements
  ``abstract_state``, ``init_state``, ``run_chunk``, ``num_skipped``, and:

  * ``eval_params(state)``: the parameters to evaluate (the EMA where one is kept),
    stacked over models for a sweep;
  * ``scores(params, x, split)``: the ELBO parts of each model on ``x``,
    ``{name: [M] array}``;
  * ``model_params(params, i)``: model ``i``'s parameters;
  * ``abstract_params()``: the evaluated parameters' shapes, a best checkpoint's target.

  Attributes the loop reads: ``workdir``, ``total_steps``, ``steps_per_epoch``,
  ``chunk_len``, ``batch_size``, ``writer_dirs``.
  """

  stacked: bool  # Whether the state holds M models stacked along a leading axis.

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    trainer: Trainer,
    evaluation: input_pipeline.EvalData,
    models_: Sequence[ModelId],
    sharding,
  ):
    self.config, self.workdir, self.trainer, self.evaluation = config, workdir, trainer, evaluation
    self.models = tuple(models_)
    self.sharding = sharding
    self.total_steps = trainer.total_steps
    self.steps_per_epoch = trainer.steps_per_epoch
    self.chunk_len = trainer.chunk_len
    self.batch_size = config.batch_size
    self.writer_dirs = tuple(
      f"{workdir_lib.MODELS}/{m.name}" if self.stacked else "" for m in self.models
    )
    self.early: early_stopping.EarlyStopping | None = None

  def describe(self, i: int) -> str:
    """How a message names model ``i`` (nothing for a single run)."""
    if not self.stacked:
      return ""
    m = self.models[i]
    swept = config_lib.swept_value(self.config, m.name)
    value = f"beta={m.beta:g}" if swept is None else f"{swept[0]}={swept[1]:g}"
    return f" in model {m.name} ({value}, seed={m.seed})"

  def bits_per_dim(self, elbo: float) -> float | None:
    """``-elbo`` (nats per example) in bits per dimension, where the likelihood makes it
    one (``Likelihood.bits_per_dim``): then an upper bound on the data's bits/dim."""
    return self.trainer.model.likelihood.bits_per_dim(
      -elbo,
      math.prod(self.trainer.event_shape),
      binarization=self.config.binarization,
      binary_data=self.config.dataset in datasets.BINARY_DATASETS,
      bits=self.config.data.bits,
    )

  def with_bits_per_dim(self, scalars: dict[str, float]) -> dict[str, float]:
    """``scalars`` with ``bits_per_dim`` (of their ``elbo``) added where it means something."""
    if "elbo" in scalars and (bits := self.bits_per_dim(scalars["elbo"])) is not None:
      return {**scalars, "bits_per_dim": bits}
    return scalars

  def start(self, state, resumed: bool, out) -> bool:
    """Opens the best checkpoint; returns whether the resumed run had already stopped."""
    del out
    if self.evaluation.validation is None:
      return False
    step = int(state.step)
    self.early = early_stopping.EarlyStopping(
      self.config,
      self.steps_per_epoch,
      self.workdir / workdir_lib.BEST,
      self.abstract_params(),
      self.sharding,
      resumed_step=step if resumed else None,
      num_models=len(self.models) if self.stacked else None,
    )
    if self.early.already_stopped(step):
      logging.info("This run stopped early at step %d (best: step %d).", step, self.early.best.step)
      return True
    return False

  def evaluate(self, step: int, state, out) -> bool:
    """Test ELBO and images of every model; with a validation split, the best parameters
    and early stopping. Returns whether to stop."""
    params = self.eval_params(state)
    test = self.scores(params, self.evaluation.test, "test")
    for i, (model_id, writer) in enumerate(zip(self.models, out, strict=True)):
      scalars = {k: float(v[i]) for k, v in test.items()}
      scalars = self.with_bits_per_dim({**scalars, "neg_elbo": -scalars["elbo"]})
      writer.write_scalars(step, "test", scalars)
      sample_key = step_lib.run_keys(model_id.seed)[step_lib.KEY_SAMPLES]
      write_images(
        self.trainer.model,
        self.model_params(params, i),
        self.evaluation.test,
        sample_key,
        self.config.num_image_samples,
        writer,
        step,
        self.evaluation.shown,
      )
      writer.flush()
    self._log_test(step, test)
    if self.early is None:
      return False
    val = self.scores(params, self.evaluation.validation, "validation")
    for i, writer in enumerate(out):
      scalars = {k: float(v[i]) for k, v in val.items()}
      scalars = self.with_bits_per_dim({**scalars, "neg_elbo": -scalars["elbo"]})
      writer.write_scalars(step, "validation", scalars)
    better, stop = self.early.update(step, np.asarray(val["elbo"]), params)
    if better.any():
      which = (
        ""
        if not self.stacked
        else " of " + ", ".join(m.name for m, b in zip(self.models, better, strict=True) if b)
      )
      elbos = ", ".join(f"{e:.3f}" for e, b in zip(val["elbo"], better, strict=True) if b)
      logging.info("step %d: best validation ELBO so far%s: %s", step, which, elbos)
    if stop:
      best = self.early.best
      logging.info(
        "Early stopping at step %d: no better validation ELBO for %d epochs%s (best at "
        "step %s, saved in %s).",
        step,
        self.early.patience_epochs,
        " in any model" if self.stacked else "",
        ", ".join(str(int(s)) for s in np.atleast_1d(best.steps)),
        self.early.directory,
      )
    return stop

  def _log_test(self, step: int, test: dict[str, np.ndarray]) -> None:
    if not self.stacked:
      bits = self.bits_per_dim(float(test["elbo"][0]))
      logging.info(
        "step %d: test ELBO %.3f (reconstruction %.3f, KL %.3f) nats%s",
        step,
        float(test["elbo"][0]),
        float(test["reconstruction"][0]),
        float(test["kl"][0]),
        f", {bits:.4f} bits/dim" if bits is not None else "",
      )
      return

    def one(name: str, elbo: float) -> str:
      bits = self.bits_per_dim(elbo)
      return f"{name} {elbo:.2f}" + (f" ({bits:.3f} bits/dim)" if bits is not None else "")

    each = ", ".join(one(m.name, float(e)) for m, e in zip(self.models, test["elbo"], strict=True))
    logging.info("step %d: test ELBO (nats) per model: %s", step, each)

  def close(self) -> None:
    if self.early is not None:
      self.early.close()

  # To implement.
  def eval_params(self, state) -> Params:
    raise NotImplementedError

  def scores(self, params: Params, x: Array, split: str) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def model_params(self, params: Params, i: int) -> Params:
    raise NotImplementedError

  def abstract_params(self) -> Any:
    raise NotImplementedError
