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
import functools
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
  )


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything a run computes, built from a config.

  Attributes:
    model: the model's pure functions (its ``likelihood`` is ``p(x | z)``).
    optimizer: the optax optimizer.
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

  def init_state(self) -> TrainState:
    # Jitted: Flax's init run eagerly compiles each of its small ops separately.
    init = jax.jit(
      functools.partial(
        step_lib.initial_state, self.model, self.optimizer, event_shape=self.event_shape
      ),
      out_shardings=self.replicated,
    )
    return init(self.keys[step_lib.KEY_INIT])

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: the target a checkpoint restores into,
    whatever device count wrote it."""
    return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
      jax.eval_shape(self.init_state),
    )

  def loss_fn(self, beta: float | Array) -> objectives.LossFn:
    """The objective's ``loss_fn(params, x, key, step)`` with KL weight ``beta``."""
    return objectives.make_loss_fn(self.model, self.spec, beta)

  def device_feed(
    self, config: ml_collections.ConfigDict, splits: input_pipeline.Splits, sharding
  ) -> input_pipeline.DeviceFeed:
    """The training split of ``splits`` in device memory, in the order and with the
    preprocessing draws of this run's keys (``config.seed``'s)."""
    images = jax.device_put(splits.train.images, sharding)
    return input_pipeline.DeviceFeed(
      images=images,
      batch_size=config.batch_size,
      binarization=config.binarization,
      binarize_key=self.keys[step_lib.KEY_BINARIZE],
      permutations=input_pipeline.Permutations(
        self.keys[step_lib.KEY_SHUFFLE], images.shape[0], sharding
      ),
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
  optimizer = optim.make_optimizer(config, steps_per_epoch)
  spec = objective_spec(config, steps_per_epoch)
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
  model: Model, params: Params, test_x: Array, key: Array, n: int, writer, step: int
) -> None:
  """``n`` prior samples and reconstructions of ``params`` as image grids."""
  if not n:
    return
  samples = _jit_prior_samples(model, params, key, n)
  writer.write_image(step, "prior_samples", writers.image_grid(np.asarray(samples)))
  originals = test_x[: max(n // 2, 1)]
  recs = _jit_reconstructions(model, params, originals)
  pairs = writers.interleave(originals, recs)
  columns = 2 * max(1, int(np.sqrt(n // 2)))
  writer.write_image(step, "reconstructions", writers.image_grid(pairs, columns=columns))


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
    return f" in model {m.name} (beta={m.beta:g}, seed={m.seed})"

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
      writer.write_scalars(step, "test", {**scalars, "neg_elbo": -scalars["elbo"]})
      sample_key = step_lib.run_keys(model_id.seed)[step_lib.KEY_SAMPLES]
      write_images(
        self.trainer.model,
        self.model_params(params, i),
        self.evaluation.test,
        sample_key,
        self.config.num_image_samples,
        writer,
        step,
      )
      writer.flush()
    self._log_test(step, test)
    if self.early is None:
      return False
    val = self.scores(params, self.evaluation.validation, "validation")
    for i, writer in enumerate(out):
      scalars = {k: float(v[i]) for k, v in val.items()}
      writer.write_scalars(step, "validation", {**scalars, "neg_elbo": -scalars["elbo"]})
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
      logging.info(
        "step %d: test ELBO %.3f (reconstruction %.3f, KL %.3f) nats",
        step,
        float(test["elbo"][0]),
        float(test["reconstruction"][0]),
        float(test["kl"][0]),
      )
      return
    each = ", ".join(
      f"{m.name} {float(e):.2f}" for m, e in zip(self.models, test["elbo"], strict=True)
    )
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
