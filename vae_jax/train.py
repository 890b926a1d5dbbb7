"""A single training run: ``train_and_evaluate(config, workdir)``.

``build_trainer`` turns a config into the objects every program shares (model,
likelihood, optimizer, objective, jitted step and chunk, evaluation);
``SingleRun`` plugs them into ``loop.run``, with the test ELBO and images at
each evaluation and, with a validation split, the best parameters in
``WORKDIR/best`` and early stopping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from vae_jax import (
  checkpointing,
  input_pipeline,
  likelihood,
  locks,
  loop,
  models,
  objectives,
  optim,
  writers,
)
from vae_jax import config as config_lib
from vae_jax import step as step_lib
from vae_jax.models import Model, Params
from vae_jax.step import TrainState

Array = jax.Array
Metrics = dict[str, Array]

BEST_DIR = "best"
# Seed of the validation split's fixed binarization (the test split uses
# input_pipeline.EVAL_BINARIZATION_SEED).
VALIDATION_SEED = 1


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything a run computes, built from a config: the same objects for training,
  sweeps, evaluation and benchmarks.

  Attributes:
    model: the model's pure functions.
    optimizer: the optax optimizer.
    log_likelihood_fn: ``(decoded, x) -> [batch]`` of the config's likelihood.
    spec: the objective and its options, with schedules in steps.
    train_step: the pure ``train_step(state, batch, key)`` of ``config.beta``.
    train_chunk: the jitted multi-step call (see ``step.make_train_chunk``).
    eval_fn: the jitted full-split ELBO (see ``likelihood.make_eval_fn``).
    keys: PRNG keys by purpose (``step.KEY_INIT``, ``step.KEY_EPS``, ...).
    steps_per_epoch: full batches per epoch (the remainder is dropped).
    chunk_len: steps per dispatch.
    event_shape: shape of one example.
    mesh: the devices the batch is split over.
  """

  model: Model
  optimizer: optax.GradientTransformation
  log_likelihood_fn: Callable[[Array, Array], Array]
  spec: objectives.Spec
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
    return objectives.make_loss_fn(self.model, self.log_likelihood_fn, self.spec, beta)


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


def split_validation(
  images: np.ndarray, config: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray | None]:
  """``(train, validation)``: the last ``config.validation_examples`` of the
  training split (in file order, the same for every seed) are held out.

  Raises:
    ValueError: the split would leave no training example.
  """
  v = config.validation_examples
  if v == 0:
    return images, None
  if not 0 < v < len(images):
    raise ValueError(
      f"config.validation_examples={v} must be in [0, {len(images)}) for this training split."
    )
  return images[:-v], images[-v:]


def build_trainer(config: ml_collections.ConfigDict, event_shape, num_train: int) -> Trainer:
  """Builds the model, optimizer, objective, step, chunk and evaluation of ``config``.

  Raises:
    ValueError: the config is invalid, or does not fit the data or devices.
  """
  config_lib.validate(config)
  event_shape = tuple(event_shape)
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(
      f"config.batch_size={config.batch_size} exceeds the {num_train} training examples."
    )
  mesh = step_lib.make_mesh(config.num_devices)
  platform = mesh.devices.flat[0].platform
  kind = config.model.kind
  chunk_len = step_lib.chunk_len_for(config.steps_per_dispatch, steps_per_epoch, kind, platform)
  if chunk_len < min(config.steps_per_dispatch, steps_per_epoch):
    logging.info(
      "A convolutional model on CPU: one train step per dispatch (see step.chunk_len_for)."
    )
  if config.batch_size % mesh.size:
    raise ValueError(
      f"config.batch_size={config.batch_size} is not divisible by the {mesh.size} devices "
      "it is split over. Choose a multiple, or set config.num_devices."
    )
  model = models.make_model(config, event_shape)
  m = config.model
  ll_fn = objectives.make_log_likelihood_fn(m.likelihood, len(event_shape), m.gaussian_variance)
  optimizer = optim.make_optimizer(config, steps_per_epoch)
  spec = objective_spec(config, steps_per_epoch)
  loss_fn = objectives.make_loss_fn(model, ll_fn, spec, config.beta)
  skip = config.nonfinite_policy == "skip"
  train_step = step_lib.make_train_step(
    loss_fn,
    optimizer,
    skip_nonfinite=skip,
    matmul_precision=config.matmul_precision,
    grad_norm_every=config.log_every_steps,
  )
  train_chunk = step_lib.make_train_chunk(
    train_step,
    chunk_len=chunk_len,
    batch_size=config.batch_size,
    steps_per_epoch=steps_per_epoch,
    binarization=config.binarization,
    batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
  )
  eval_fn = likelihood.make_eval_fn(
    model,
    ll_fn,
    config.eval_batch_size,
    deterministic=config.objective == "autoencoder",
    unroll=models.keep_out_of_loops(kind, platform),
  )
  return Trainer(
    model=model,
    optimizer=optimizer,
    log_likelihood_fn=ll_fn,
    spec=spec,
    train_step=train_step,
    train_chunk=train_chunk,
    eval_fn=eval_fn,
    keys=step_lib.run_keys(config.seed),
    steps_per_epoch=steps_per_epoch,
    chunk_len=chunk_len,
    event_shape=event_shape,
    mesh=mesh,
  )


# --------------------------------------------------------------------------
# Data on device, and the best parameters on validation.


@dataclasses.dataclass
class Data:
  """A run's splits: the training images (uint8, on device) and the preprocessed
  test and validation splits (float32, on device; validation may be ``None``)."""

  train_images: Array
  test_x: Array
  val_x: Array | None


def load_data(config: ml_collections.ConfigDict) -> dict[str, input_pipeline.Split]:
  """The dataset of ``config``, prepared once by process 0 and read by every process."""
  is_main = jax.process_index() == 0
  if is_main:
    data = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  if jax.process_count() > 1:  # The others read what process 0 prepared.
    multihost_utils.sync_global_devices("vae_jax: data prepared")
    if not is_main:
      data = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  return data


def device_data(
  config: ml_collections.ConfigDict, splits: dict[str, input_pipeline.Split], sharding
) -> Data:
  """The run's splits on device: training images, test and validation preprocessed once.

  Raises:
    ValueError: the preprocessed data lies outside [0, 1], where the Bernoulli and
      continuous Bernoulli likelihoods are defined.
  """
  train_np, val_np = split_validation(splits["train"].images, config)
  test_x = input_pipeline.eval_images(splits["test"].images, config.binarization)
  low, high = float(test_x.min()), float(test_x.max())
  if config.model.likelihood.endswith("bernoulli") and not 0.0 <= low <= high <= 1.0:
    raise ValueError(
      f"The preprocessed test images span [{low}, {high}], but config.model.likelihood="
      f"{config.model.likelihood!r} is defined for data in [0, 1]. Check the dataset and "
      "config.binarization."
    )
  caveat = config_lib.likelihood_caveat(config)
  if caveat:
    logging.warning("%s", caveat)
  val_x = None
  if val_np is not None:
    val_x = input_pipeline.eval_images(val_np, config.binarization, seed=VALIDATION_SEED)
    val_x = jax.device_put(val_x, sharding)
  return Data(jax.device_put(train_np, sharding), jax.device_put(test_x, sharding), val_x)


class BestCheckpoint:
  """The parameters with the best validation ELBO so far, in ``directory``.

  One Orbax checkpoint ``{"params", "elbo"}`` named by its step, replaced
  atomically when a better one comes: the value and the parameters cannot
  disagree after a crash. Each save completes before the train state of the
  same step is saved, so a resumed run never lacks a best it has passed.
  For a sweep, ``params`` are stacked over models and ``elbo`` and ``step``
  are ``[M]``: each model keeps its own best.

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
    num_models: int | None = None,
  ) -> None:
    self._sharding = sharding
    self._stacked = num_models is not None
    target = self.target(abstract_params, sharding, num_models)
    self._ckpt = checkpointing.Checkpointer(directory, max_to_keep=1)
    shape = (num_models,) if self._stacked else ()
    self.steps = np.full(shape, -1)
    self.elbos = np.full(shape, -np.inf)
    self._params = None
    restored = self._ckpt.restore_latest(target)
    if restored is None:
      return
    step, tree = restored
    if resumed_step is not None and step <= resumed_step:
      self.elbos = np.asarray(tree["elbo"], np.float64)
      self.steps = np.asarray(tree["step"]) if self._stacked else np.asarray(step)
      self._params = tree["params"]
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
  def target(abstract_params: Params, sharding, num_models: int | None = None) -> dict[str, Any]:
    """The saved tree's structure, for restoring it: ``{"params", "elbo"}`` (and
    ``"step"`` for a sweep, whose ``elbo`` and ``step`` are ``[M]``)."""
    if num_models is None:
      return {
        "params": abstract_params,
        "elbo": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding),
      }
    vector = functools.partial(jax.ShapeDtypeStruct, (num_models,), sharding=sharding)
    return {"params": abstract_params, "elbo": vector(jnp.float32), "step": vector(jnp.int32)}

  @property
  def step(self) -> int:
    """The step of the best parameters (the earliest over models, for a sweep)."""
    return int(np.min(self.steps))

  def update(self, step: int, elbo: float | np.ndarray, params: Params) -> np.ndarray:
    """Saves ``params`` where ``elbo`` beats the best so far; returns where it did."""
    better = np.asarray(elbo, np.float64) > self.elbos  # NaN never wins.
    if not better.any():
      return better
    if self._stacked:
      if self._params is None:
        self._params = params
      keep = jax.device_put(jnp.asarray(better), self._sharding)
      self._params = jax.tree.map(
        lambda new, old: jnp.where(keep.reshape(-1, *([1] * (new.ndim - 1))), new, old),
        params,
        self._params,
      )
      self.steps = np.where(better, step, self.steps)
      self.elbos = np.where(better, elbo, self.elbos)
      tree = {
        "params": self._params,
        "elbo": jax.device_put(jnp.asarray(self.elbos, jnp.float32), self._sharding),
        "step": jax.device_put(jnp.asarray(self.steps, jnp.int32), self._sharding),
      }
    else:
      self.steps, self.elbos = np.asarray(step), np.asarray(float(elbo))
      tree = {"params": params, "elbo": jax.device_put(jnp.float32(elbo), self._sharding)}
    self._ckpt.save(step, tree)
    self._ckpt.wait()  # Committed before the train state of this step is saved.
    return better

  def close(self) -> None:
    self._ckpt.close()


def patience_exhausted(
  step: int, best_steps: np.ndarray, warmup_end: int, patience_steps: int
) -> bool:
  """Whether every model has gone ``patience_steps`` without a better validation ELBO,
  counting from its best step but not from before the KL warm-up ends."""
  if not patience_steps:
    return False
  since = step - np.maximum(np.asarray(best_steps), warmup_end)
  return bool(np.all(since >= patience_steps))


# --------------------------------------------------------------------------
# The program.


_jit_prior_samples = jax.jit(models.prior_samples, static_argnums=(0, 3, 4))
_jit_reconstructions = jax.jit(models.reconstructions, static_argnums=(0, 3))


def write_images(config, model, params, test_x, key, writer, step) -> None:
  """Prior samples and reconstructions of ``params`` as image grids (``num_image_samples``)."""
  n = config.num_image_samples
  if not n:
    return
  likelihood_name = config.model.likelihood
  samples = _jit_prior_samples(model, params, key, n, likelihood_name)
  writer.write_image(step, "prior_samples", writers.image_grid(np.asarray(samples)))
  originals = test_x[: max(n // 2, 1)]
  recs = _jit_reconstructions(model, params, originals, likelihood_name)
  pairs = writers.interleave(originals, recs)
  columns = 2 * max(1, int(np.sqrt(n // 2)))
  writer.write_image(step, "reconstructions", writers.image_grid(pairs, columns=columns))


def log_test(step: int, scalars: dict[str, float], prefix: str = "") -> None:
  logging.info(
    "step %d: %stest ELBO %.3f (reconstruction %.3f, KL %.3f) nats",
    step,
    prefix,
    scalars["elbo"],
    scalars["reconstruction"],
    scalars["kl"],
  )


class SingleRun:
  """One model: ``loop.Program`` of ``config`` on ``data``."""

  def __init__(self, config: ml_collections.ConfigDict, trainer: Trainer, data: Data):
    self.config, self.trainer, self.data = config, trainer, data
    self.steps_per_epoch = trainer.steps_per_epoch
    self.total_steps = config.num_epochs * trainer.steps_per_epoch
    self.chunk_len = trainer.chunk_len
    self.batch_size = config.batch_size
    self.writer_dirs = ("",)
    self.best: BestCheckpoint | None = None
    self.workdir: pathlib.Path | None = None
    self.perms = step_lib.Permutations(
      trainer.keys[step_lib.KEY_SHUFFLE], data.train_images.shape[0], trainer.replicated
    )

  def abstract_state(self) -> TrainState:
    return self.trainer.abstract_state()

  def init_state(self) -> TrainState:
    return self.trainer.init_state()

  def run_chunk(self, state: TrainState, step: int, num_steps: int):
    t = self.trainer
    epoch = step // t.steps_per_epoch
    return t.train_chunk(
      state,
      self.data.train_images,
      self.perms(epoch),
      epoch,
      num_steps,
      t.keys[step_lib.KEY_EPS],
      t.keys[step_lib.KEY_BINARIZE],
    )

  def num_skipped(self, state: TrainState) -> np.ndarray:
    return np.asarray([int(state.num_skipped)])

  def describe(self, model: int) -> str:
    del model
    return ""

  def start(self, state: TrainState, resumed: bool, out) -> bool:
    if self.data.val_x is None:
      return False
    step = int(state.step)
    self.best = BestCheckpoint(
      self.workdir / BEST_DIR,
      self.trainer.abstract_state().params,
      self.trainer.replicated,
      resumed_step=step if resumed else None,
    )
    # Checked where the loop checks it, after an evaluation: a run killed between
    # evaluations goes on to the next one, as it would have without the kill.
    eval_every = self.config.eval_every_steps or self.steps_per_epoch
    if self.best.step >= 0 and step % eval_every == 0 and self._exhausted(step):
      logging.info("This run stopped early at step %d (best: step %d).", step, self.best.step)
      return True
    return False

  def _exhausted(self, step: int) -> bool:
    c, spe = self.config, self.steps_per_epoch
    return patience_exhausted(
      step,
      self.best.steps,
      round(c.kl_warmup_epochs * spe),
      c.early_stopping_patience_epochs * spe,
    )

  def evaluate(self, step: int, state: TrainState, out) -> bool:
    t, writer = self.trainer, out[0]
    params = optim.eval_params(state.opt_state, state.params)
    scalars = jax.device_get(t.eval_fn(params, self.data.test_x, t.keys[step_lib.KEY_EVAL]))
    scalars = {k: float(v) for k, v in scalars.items()}
    writer.write_scalars(step, "test", {**scalars, "neg_elbo": -scalars["elbo"]})
    log_test(step, scalars)
    write_images(
      self.config, t.model, params, self.data.test_x, t.keys[step_lib.KEY_SAMPLES], writer, step
    )
    writer.flush()
    if self.best is None:
      return False
    val_key = jax.random.fold_in(t.keys[step_lib.KEY_EVAL], 1)
    val = jax.device_get(t.eval_fn(params, self.data.val_x, val_key))
    val = {k: float(v) for k, v in val.items()}
    writer.write_scalars(step, "validation", {**val, "neg_elbo": -val["elbo"]})
    if self.best.update(step, val["elbo"], params).any():
      logging.info("step %d: best validation ELBO so far, %.3f", step, val["elbo"])
    stop = self._exhausted(step)
    if stop:
      logging.info(
        "Early stopping at step %d: no better validation ELBO for %d epochs (best %.3f at "
        "step %d, saved in %s).",
        step,
        self.config.early_stopping_patience_epochs,
        float(self.best.elbos),
        self.best.step,
        self.workdir / BEST_DIR,
      )
    return stop

  def close(self) -> None:
    if self.best is not None:
      self.best.close()


def check_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """``workdir`` as a path, if it is a directory or does not exist yet.

  Raises:
    ValueError: it is a file.
  """
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir={workdir} is a file; give a directory (new or a run's).")
  return workdir


def prepare_workdir(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, allow_config_change: bool
) -> pathlib.Path:
  """Checks ``workdir`` before anything is loaded or created there.

  Raises:
    ValueError: ``workdir`` is a file, or holds a run of another config
      (unless ``allow_config_change``; the differences are then logged).
  """
  workdir = check_workdir(workdir)
  diffs = config_lib.check_resume(config, workdir, allow_config_change)
  if diffs:
    logging.warning("Config changed on resume (allowed by the caller):\n%s", "\n".join(diffs))
  return workdir


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> TrainState:
  """Trains (or resumes) the VAE of ``config`` in ``workdir``; returns the final state.

  Raises:
    loop.Preempted: SIGTERM arrived; a checkpoint of the current step was saved.
    loop.NonFiniteError: a non-finite loss, gradient or update (policy ``stop``,
      or more than ``config.max_nonfinite_skips`` skipped steps under ``skip``).
    ValueError: the config is invalid, or differs from the workdir's run
      (unless ``allow_config_change``).
  """
  config_lib.validate(config)
  workdir = prepare_workdir(config, workdir, allow_config_change)
  with lock_workdir(workdir):
    splits = load_data(config)
    train_np, _ = split_validation(splits["train"].images, config)
    trainer = build_trainer(config, train_np.shape[1:], len(train_np))
    logging.info("Data-parallel over %d device(s): %s", trainer.mesh.size, trainer.mesh.devices)
    program = SingleRun(config, trainer, device_data(config, splits, trainer.replicated))
    del splits, train_np  # The device holds the data now; free the host copies.
    program.workdir = workdir
    return loop.run(program, config, workdir)


def lock_workdir(workdir: pathlib.Path):
  """Holds ``workdir``'s lock (process 0 of a multi-host run): a second run of the same
  workdir stops at once, naming the first, before it reads or writes anything there."""
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  return locks.exclusive(workdir / ".lock", wait=False, what=f"The workdir {workdir}")
