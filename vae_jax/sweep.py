"""Sweeps: M models with different ``(beta, seed)`` trained by one compiled program.

Design, in short:

* The per-model step is the core one, unchanged:
  ``train.make_train_step(train.make_loss_fn(model, ll_fn, beta, ...), optimizer)``,
  built inside a function that ``jax.vmap`` maps over the model axis with
  ``beta`` a traced scalar (``train.make_loss_fn`` accepts one). Parameters,
  optimizer states and step counters are stacked along a leading model axis:
  ``SweepState(step, models)`` where ``models`` is a ``train.TrainState``
  whose every leaf is ``[M, ...]``, so ``models[i]`` is a single run's state.
* The multi-step device loop is the core one too: ``train.make_train_chunk``
  runs the vmapped step under ``lax.scan``, gathering each batch from the
  epoch permutation and binarizing it on the device, once for all models.
* Keys. Model ``i`` with seed ``s_i`` draws its init and eps keys exactly as a
  single run with ``config.seed = s_i``: ``fold_in(key(s_i), KEY_INIT)`` and
  ``fold_in(key(s_i), KEY_EPS)`` (its test-ELBO key likewise from
  ``KEY_EVAL``). The *data* (shuffling and dynamic binarization) is one stream
  shared by all models, from ``config.seed`` (``KEY_SHUFFLE``,
  ``KEY_BINARIZE``): every model sees the same batches in the same order, so
  differences between models come from beta and seed alone, and the batch is
  gathered and binarized once per step rather than M times. Hence model ``i``
  is *exactly* ``train.train_and_evaluate`` of the config with
  ``beta = beta_i`` and ``seed = s_i`` whenever ``s_i == config.seed`` (the
  default grid uses one seed), and otherwise exactly that run with its data
  keys taken from ``config.seed``. ``tests/test_sweep.py`` checks both.
* Devices. With more than one device the model axis is sharded over a
  ``jax.sharding.Mesh`` axis ``"model"`` of ``gcd(M, devices)`` devices; any
  devices left over form a ``"batch"`` axis over which the shared batch is
  sharded (data parallelism inside each model). Single device: no mesh.
* Resume. The stacked state is one pytree saved by ``checkpointing.Checkpointer``;
  as in a single run nothing random is carried between steps, so a resumed
  sweep is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vae_jax import checkpointing, input_pipeline, losses, train, writers
from vae_jax.models import Model, Params

Array = jax.Array
Metrics = dict[str, Array]


class SweepState(NamedTuple):
  step: Array  # int32 scalar, shared: the chunk indexes the data with it.
  models: train.TrainState  # Every leaf [M, ...]; models.step[i] == step.


class SweepKeys(NamedTuple):
  """What differs between models besides their state: one entry per model."""

  eps: Array  # [M] typed PRNG keys: fold_in(key(seed_i), KEY_EPS).
  beta: Array  # [M] float32.


def model_keys(seed: int) -> dict[int, Array]:
  """A single run's keys by purpose (``train.KEY_*``) for ``config.seed = seed``."""
  return train.run_keys(seed)


class Schedule(NamedTuple):
  """How the KL term is weighted over training (``config.sweep.schedule``).

  Attributes:
    kind: ``"constant"``: the beta-ELBO with the model's beta throughout (the
      core loss; model ``i`` is its single run). ``"warmup"``: linear KL
      warm-up, ``beta_t = beta * min(1, t / warmup_steps)`` at step ``t``.
      ``"capacity"``: Burgess et al. (2018),
      ``loss = -E_q log p(x|z) + gamma * |KL - C_t|`` with the model's beta as
      ``gamma`` and ``C_t = capacity_nats * min(1, t / capacity_steps)``
      (KL and reconstruction are batch means).
    warmup_steps: steps of the warm-up (``"warmup"``).
    capacity_nats: the final capacity ``C`` in nats (``"capacity"``).
    capacity_steps: steps over which ``C`` grows from 0 (``"capacity"``).
  """

  kind: str = "constant"
  warmup_steps: int = 1
  capacity_nats: float = 25.0
  capacity_steps: int = 1


SCHEDULES = ("constant", "warmup", "capacity")


def make_capacity_loss_fn(
  model: Model,
  log_likelihood_fn: losses.LogLikelihoodFn,
  gamma: float | Array,
  capacity: float | Array,
  num_samples: int,
) -> Callable[[Params, Array, Array], tuple[Array, Metrics]]:
  """``loss_fn(params, x, key) -> (loss, metrics)`` of Burgess et al. (2018).

  ``loss = -mean(reconstruction) + gamma * |mean(KL) - capacity|`` in nats, with
  the same metrics as ``train.make_loss_fn`` (``elbo`` is the beta=1 bound) and
  ``capacity`` added.
  """

  # The core ELBO loss supplies the batch-mean reconstruction and KL (its own
  # loss value, the beta=1 bound, is unused here and compiled away).
  elbo_loss_fn = train.make_loss_fn(model, log_likelihood_fn, 1.0, num_samples)

  def loss_fn(params: Params, x: Array, key: Array) -> tuple[Array, Metrics]:
    _, metrics = elbo_loss_fn(params, x, key)
    loss = -metrics["reconstruction"] + gamma * jnp.abs(metrics["kl"] - capacity)
    return loss, {**metrics, "loss": loss, "capacity": jnp.asarray(capacity, jnp.float32)}

  return loss_fn


def make_sweep_step(
  model: Model,
  log_likelihood_fn: losses.LogLikelihoodFn,
  optimizer: optax.GradientTransformation,
  *,
  num_samples: int,
  objective: str = "elbo",
  skip_nonfinite: bool = False,
  batch_sharding: NamedSharding | None = None,
  schedule: Schedule | None = None,
) -> Callable[[SweepState, Array, SweepKeys], tuple[SweepState, Metrics]]:
  """Returns ``sweep_step(state, batch, keys) -> (state, metrics)``, the core step vmapped.

  Args:
    model, log_likelihood_fn, optimizer, num_samples, objective, skip_nonfinite:
      as for ``train.make_loss_fn`` and ``train.make_train_step``.
    batch_sharding: where the shared batch lives when a ``"batch"`` mesh axis exists.
    schedule: the KL weighting over training (default: constant beta).

  The returned step takes ``batch: [batch, *event_shape]`` (one batch, seen by
  every model) and ``keys`` with ``[M]`` entries, and returns ``metrics`` of
  ``[M]`` arrays. It has the signature ``train.make_train_chunk`` expects,
  with the ``SweepKeys`` in place of the eps key.
  """

  schedule = schedule or Schedule()
  if schedule.kind not in SCHEDULES:
    raise ValueError(f"Unknown config.sweep.schedule {schedule.kind!r}; use one of {SCHEDULES}.")

  def one_model(state: train.TrainState, batch: Array, eps_key: Array, beta: Array):
    # The loss of step t is built from traced t and beta; the step is the core one.
    t = state.step.astype(jnp.float32)
    if schedule.kind == "capacity":
      capacity = schedule.capacity_nats * jnp.minimum(1.0, t / schedule.capacity_steps)
      loss_fn = make_capacity_loss_fn(model, log_likelihood_fn, beta, capacity, num_samples)
    else:
      if schedule.kind == "warmup":
        beta = beta * jnp.minimum(1.0, t / schedule.warmup_steps)
      loss_fn = train.make_loss_fn(model, log_likelihood_fn, beta, num_samples, objective)
    return train.make_train_step(loss_fn, optimizer, skip_nonfinite)(state, batch, eps_key)

  def sweep_step(state: SweepState, batch: Array, keys: SweepKeys) -> tuple[SweepState, Metrics]:
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    models, metrics = jax.vmap(one_model, in_axes=(0, None, 0, 0))(
      state.models, batch, keys.eps, keys.beta
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
    base: the single-run ``train.Trainer`` of ``config`` (model, optimizer,
      likelihood, evaluation, data keys of ``config.seed``, steps per epoch).
    betas: ``[M]`` the models' betas.
    seeds: ``[M]`` the models' seeds.
    keys: the per-model ``SweepKeys``, placed on the mesh.
    eval_keys: ``[M]`` each model's test-ELBO key (as its single run's).
    init_keys: ``[M]`` each model's init key (as its single run's).
    sweep_chunk: the jitted multi-step call, ``train.make_train_chunk`` of the
      vmapped step; the same signature with ``SweepState`` and ``SweepKeys``.
    eval_fn: ``(stacked params, x, eval_keys) -> {name: [M]}``.
    mesh: the device mesh, or ``None`` on one device.
  """

  base: train.Trainer
  betas: tuple[float, ...]
  seeds: tuple[int, ...]
  keys: SweepKeys
  eval_keys: Array
  init_keys: Array
  sweep_chunk: Callable[..., tuple[SweepState, Metrics]]
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
    b = self.base
    init_one = functools.partial(
      train.initial_state, b.model, b.optimizer, event_shape=b.event_shape
    )
    return SweepState(jnp.zeros((), jnp.int32), jax.vmap(init_one)(init_keys))

  def state_shape(self):
    """The stacked state's shapes and dtypes, with shardings: a restore target."""
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

  def replicated(self, x):
    """``x`` placed whole on every device of the mesh (or just on the device)."""
    if self.mesh is None:
      return jax.device_put(x)
    return jax.device_put(x, NamedSharding(self.mesh, P()))


def sweep_grid(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[int, ...]]:
  """``(betas, seeds)`` of ``config.sweep``, one pair per model; a single seed is shared."""
  if "sweep" not in config:
    raise ValueError("The config has no `sweep` field; start from configs/beta_sweep.py.")
  betas = tuple(float(b) for b in config.sweep.betas)
  seeds = tuple(int(s) for s in config.sweep.seeds)
  if not betas:
    raise ValueError("config.sweep.betas is empty; give at least one beta.")
  if len(seeds) == 1:
    seeds = seeds * len(betas)
  if len(seeds) != len(betas):
    raise ValueError(
      f"config.sweep.seeds has {len(seeds)} entries for {len(betas)} betas; give one seed "
      "(shared) or one per beta."
    )
  if any(b < 0 for b in betas):
    raise ValueError(f"config.sweep.betas must all be >= 0, got {betas}.")
  names = [model_name(b, s) for b, s in zip(betas, seeds, strict=True)]
  if len(set(names)) != len(names):
    raise ValueError(f"config.sweep has repeated (beta, seed) pairs: {names}; make them unique.")
  if config.objective == "iwae" and any(b != 1.0 for b in betas):
    raise ValueError("The IWAE bound has no KL weight: a sweep over beta needs objective='elbo'.")
  return betas, seeds


def sweep_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The ``Schedule`` of ``config.sweep`` (fields absent: constant beta)."""
  c = config.sweep
  schedule = Schedule(
    kind=c.get("schedule", "constant"),
    warmup_steps=int(c.get("warmup_steps", 1)),
    capacity_nats=float(c.get("capacity_nats", 25.0)),
    capacity_steps=int(c.get("capacity_steps", 1)),
  )
  if schedule.kind not in SCHEDULES:
    raise ValueError(f"Unknown config.sweep.schedule {schedule.kind!r}; use one of {SCHEDULES}.")
  if schedule.warmup_steps < 1 or schedule.capacity_steps < 1 or schedule.capacity_nats < 0:
    raise ValueError(
      "config.sweep.warmup_steps and capacity_steps must be >= 1 and capacity_nats >= 0."
    )
  if schedule.kind == "capacity" and config.objective != "elbo":
    raise ValueError("config.sweep.schedule='capacity' needs config.objective='elbo'.")
  return schedule


def build_sweep_trainer(
  config: ml_collections.ConfigDict,
  event_shape,
  num_train: int,
  *,
  devices: Sequence | None = None,
) -> SweepTrainer:
  """Builds the vmapped step, chunk, evaluation, keys and mesh of a sweep config."""
  betas, seeds = sweep_grid(config)
  unsupported = {
    "kl_warmup_epochs": "use config.sweep.schedule='warmup'",
    "free_bits": "not available in sweeps",
    "validation_examples": "sweeps evaluate on the test split only",
    "early_stopping_patience_epochs": "sweeps run a fixed number of epochs",
  }
  for field, what in unsupported.items():
    if config[field]:
      raise ValueError(f"config.{field}={config[field]} in a sweep: {what}; set it to 0.")
  if config.gradient_estimator != "plain" or config.optimizer.ema_decay is not None:
    raise ValueError(
      "Sweeps train with config.gradient_estimator='plain' and no config.optimizer.ema_decay."
    )
  base = train.build_trainer(config, event_shape, num_train)
  mesh = sweep_mesh(len(betas), config.batch_size, devices)
  batch_sharding = None
  if mesh is not None and mesh.shape["batch"] > 1:
    batch_sharding = NamedSharding(mesh, P("batch"))
  step = make_sweep_step(
    base.model,
    base.log_likelihood_fn,
    base.optimizer,
    num_samples=config.num_samples,
    objective=config.objective,
    skip_nonfinite=config.nonfinite_policy == "skip",
    batch_sharding=batch_sharding,
    schedule=sweep_schedule(config),
  )
  chunk = train.make_train_chunk(
    step,
    chunk_len=base.chunk_len,
    batch_size=config.batch_size,
    steps_per_epoch=base.steps_per_epoch,
    binarization=config.binarization,
  )
  per_seed = {s: model_keys(s) for s in set(seeds)}
  stack = lambda tag: jnp.stack([per_seed[s][tag] for s in seeds])  # noqa: E731
  keys = SweepKeys(eps=stack(train.KEY_EPS), beta=jnp.asarray(betas, jnp.float32))
  eval_keys, init_keys = stack(train.KEY_EVAL), stack(train.KEY_INIT)
  if mesh is not None:
    on_models = NamedSharding(mesh, P("model"))
    keys = jax.device_put(keys, on_models)
    eval_keys, init_keys = jax.device_put((eval_keys, init_keys), on_models)
  eval_fn = jax.jit(jax.vmap(base.eval_fn, in_axes=(0, None, 0)))
  return SweepTrainer(
    base=base,
    betas=betas,
    seeds=seeds,
    keys=keys,
    eval_keys=eval_keys,
    init_keys=init_keys,
    sweep_chunk=chunk,
    eval_fn=eval_fn,
    mesh=mesh,
  )


def model_state(state: SweepState, i: int) -> train.TrainState:
  """Model ``i``'s ``train.TrainState``, as its single run would hold it."""
  return jax.tree.map(lambda x: x[i], state.models)


def model_name(beta: float, seed: int) -> str:
  return f"beta_{beta:g}_seed_{seed}"


def run_steps(
  trainer: SweepTrainer,
  state: SweepState,
  images: Array,
  num_steps: int,
  perms_from: Callable[[int], Array] | None = None,
) -> tuple[SweepState, list[tuple[int, int, Metrics]]]:
  """Runs ``num_steps`` steps from ``state`` in chunks; returns the state and device metrics.

  ``images`` is the training split (uint8, on device). The metrics stay on
  the device: ``(first step, steps, {name: [chunk_len, M]})`` per chunk.
  """
  b = trainer.base
  num_train = images.shape[0]
  if perms_from is None:
    perm_fn = jax.jit(train.epoch_permutation, static_argnums=2)

    def perms_from(epoch: int) -> Array:
      shuffle = b.keys[train.KEY_SHUFFLE]
      return trainer.replicated(
        jnp.stack([perm_fn(shuffle, epoch, num_train), perm_fn(shuffle, epoch + 1, num_train)])
      )

  step, end, pending = int(state.step), int(state.step) + num_steps, []
  while step < end:
    n = min(end - step, b.chunk_len)
    epoch = step // b.steps_per_epoch
    state, metrics = trainer.sweep_chunk(
      state, images, perms_from(epoch), epoch, n, trainer.keys, b.keys[train.KEY_BINARIZE]
    )
    pending.append((step, n, metrics))
    step += n
  return state, pending


def _check_finite(
  rows: dict[str, np.ndarray],
  first_step: int,
  trainer: SweepTrainer,
  config: ml_collections.ConfigDict,
  num_skipped: np.ndarray,
) -> None:
  """Applies the non-finite policy to host metrics ``{name: [steps, M]}``.

  ``num_skipped: [M]`` is each model's count of skipped steps so far (policy
  ``skip`` stops once any model exceeds ``config.max_nonfinite_skips``).
  """
  bad = ~rows["finite"].astype(bool)
  if not bad.any():
    return
  step_i, model_i = np.argwhere(bad)[0]
  where = (
    f"at step {first_step + int(step_i)} in model {int(model_i)} "
    f"(beta={trainer.betas[model_i]}, seed={trainer.seeds[model_i]})"
  )
  if config.nonfinite_policy == "skip":
    logging.warning("Skipped non-finite steps per model: %s (first %s).", bad.sum(0), where)
    if np.all(num_skipped <= config.max_nonfinite_skips):
      return
    raise train.NonFiniteError(
      f"Skipped steps per model {num_skipped.tolist()} exceed config.max_nonfinite_skips="
      f"{config.max_nonfinite_skips}; the first of the last batch was {where}. Nothing "
      "non-finite was saved. Lower config.optimizer.learning_rate or set "
      "config.optimizer.grad_clip_norm."
    )
  raise train.NonFiniteError(
    f"Non-finite loss or gradient {where}. The sweep stopped before saving it. Lower "
    "config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, or set "
    "config.nonfinite_policy='skip'; then run the same command to resume."
  )


def train_sweep(
  config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> SweepState:
  """Trains (or resumes) every model of ``config.sweep`` in ``workdir``; returns the state.

  Writes ``workdir/config.json``, ``workdir/checkpoints/<step>/`` (the stacked
  state) and, per model, ``workdir/models/beta_<b>_seed_<s>/metrics.jsonl`` and
  TensorBoard files with the same rows as a single run's (train rows are means
  since the previous row; test rows the beta=1 ELBO on the test split).

  Raises:
    train.Preempted: SIGTERM arrived; a checkpoint of the current step was saved.
    train.NonFiniteError: a non-finite loss or gradient under policy ``stop``.
    ValueError: the config is invalid or differs from the workdir's run.
  """
  sweep_grid(config)
  sweep_schedule(config)
  train.validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train.record_config(config, workdir, allow_config_change)

  data = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  num_train, *event_shape = data["train"].images.shape
  trainer = build_sweep_trainer(config, event_shape, num_train)
  b = trainer.base
  images = trainer.replicated(data["train"].images)
  test_x = trainer.replicated(input_pipeline.eval_images(data["test"].images, config.binarization))
  total_steps = config.num_epochs * b.steps_per_epoch
  eval_every = config.eval_every_steps or b.steps_per_epoch
  ckpt_every = config.checkpoint_every_steps or b.steps_per_epoch

  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
  names = [model_name(beta, s) for beta, s in zip(trainer.betas, trainer.seeds, strict=True)]
  model_writers = [writers.MetricWriter(workdir / "models" / n) for n in names]
  restored = checkpointer.restore_latest(trainer.state_shape())
  if restored is None:
    state, start = trainer.init_state(), -1
    logging.info("Starting a sweep of %d models in %s", trainer.num_models, workdir)
  else:
    start, state = restored
    logging.info("Resumed the sweep from checkpoint %d in %s", start, workdir)
  for w in model_writers:
    w.truncate_after(start)

  step = int(state.step)
  window: list[dict[str, np.ndarray]] = []
  window_seconds = 0.0
  clock = time.perf_counter()
  try:
    with train._SigtermFlag() as sigterm:
      last_saved = start if start else -1
      while step < total_steps:
        boundary = min(
          train._next_multiple(step, config.log_every_steps),
          train._next_multiple(step, eval_every),
          train._next_multiple(step, ckpt_every),
          total_steps,
        )
        first = step
        state, pending = run_steps(trainer, state, images, boundary - step)
        step = boundary
        host = jax.device_get([m for _, _, m in pending])
        rows = {
          k: np.concatenate([m[k][:n] for (_, n, _), m in zip(pending, host, strict=True)])
          for k in host[0]
        }
        num_skipped = np.asarray(jax.device_get(state.models.num_skipped))
        _check_finite(rows, first, trainer, config, num_skipped)
        if sigterm.raised:  # At a boundary: save this step (once) and stop.
          if step != last_saved:
            checkpointer.save(step, state)
          checkpointer.wait()
          raise train.Preempted(step)
        window.append(rows)
        window_seconds += time.perf_counter() - clock
        if step % config.log_every_steps == 0 or step == total_steps:
          for i, w in enumerate(model_writers):
            per_model = [{k: v[:, i] for k, v in r.items()} for r in window]
            scalars = train._window_scalars(per_model, window_seconds, config.batch_size)
            # Examples/s of the whole sweep: every model sees each example.
            scalars["sweep_examples_per_sec"] = scalars["examples_per_sec"] * trainer.num_models
            w.write_scalars(step, "train", scalars)
          window, window_seconds = [], 0.0
        if step % eval_every == 0 or step == total_steps:
          scores = jax.device_get(trainer.eval_fn(state.models.params, test_x, trainer.eval_keys))
          for i, w in enumerate(model_writers):
            scalars = {k: float(v[i]) for k, v in scores.items()}
            scalars["neg_elbo"] = -scalars["elbo"]
            w.write_scalars(step, "test", scalars)
            w.flush()
          elbos = zip(trainer.betas, scores["elbo"], strict=True)
          logging.info(
            "step %d: test ELBO per beta %s", step, {b: round(float(e), 2) for b, e in elbos}
          )
        if step % ckpt_every == 0 or step == total_steps:
          checkpointer.save(step, state)
          last_saved = step
        clock = time.perf_counter()
  finally:
    checkpointer.close()
    for w in model_writers:
      w.close()
  return state


def restore_sweep(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, event_shape, num_train: int
) -> tuple[int, SweepTrainer, SweepState]:
  """The latest checkpoint of a sweep's ``workdir``: ``(step, trainer, state)``."""
  trainer = build_sweep_trainer(config, event_shape, num_train)
  step, state = checkpointing.restore_latest_read_only(
    pathlib.Path(workdir) / "checkpoints", trainer.state_shape()
  )
  return step, trainer, state
