"""The host loop shared by single runs and sweeps: dispatch, check, log, evaluate, save.

A ``Program`` (``train.SingleRun``, ``sweep.Sweep``) says what runs on the
device; this loop decides when. Its guarantees hold for every program:

* the workdir's ``config.json`` is written only after its checkpoints restored;
* metrics come to the host at each log, eval or checkpoint boundary and are
  checked there (the non-finite policy) *before* anything is saved;
* SIGTERM (preemption) and SIGINT (Ctrl-C) are acted on within one dispatch, by every
  process together (in a multi-host run all processes agree after each dispatch): the
  current step is saved and ``Preempted`` raised; the same command resumes. A second
  Ctrl-C stops at once (``KeyboardInterrupt``), losing the steps since the last
  checkpoint;
* a run that has already reached its end says so and changes nothing;
* evaluation at its boundaries may stop the run early (the program decides);
* metrics rows are written per model: one writer per ``Program.writer_dirs``.
"""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from vae_jax import checkpointing, files, process, writers
from vae_jax import workdir as workdir_lib
from vae_jax.errors import UserError

PyTree = Any
Metrics = dict[str, jax.Array]

# A run stopped by a signal exits with the shell's code for it after saving a checkpoint
# of its current step; the same command resumes it. Schedulers treat 143 (SIGTERM) as
# preempted; 130 is Ctrl-C (SIGINT).
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
EXIT_CODE_PREEMPTED = EXIT_CODES[signal.SIGTERM]


class NonFiniteError(UserError, FloatingPointError):
  """A loss, gradient or update became NaN or infinite; nothing of it was checkpointed."""


class Preempted(Exception):  # noqa: N818 - it is an outcome, not a failure.
  """SIGTERM or SIGINT arrived; a checkpoint of ``step`` was written and the run stopped."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
    super().__init__(f"Stopped by {name} after saving a checkpoint at step {step}.")
    self.step = step
    self.exit_code = EXIT_CODES.get(signum, 128 + int(signum))


class Program(Protocol):
  """What a run plugs into ``run``.

  Attributes:
    workdir: the run's directory.
    total_steps: steps of the whole run.
    steps_per_epoch: for intervals of 0 ("once per epoch").
    chunk_len: the most steps one dispatch runs.
    batch_size: examples per step (per model), for examples/s.
    writer_dirs: one subdirectory of the workdir per model ("" for a single run).
  """

  workdir: pathlib.Path
  total_steps: int
  steps_per_epoch: int
  chunk_len: int
  batch_size: int
  writer_dirs: tuple[str, ...]

  def abstract_state(self) -> PyTree:
    """Shapes, dtypes and shardings of the state: the restore target."""

  def init_state(self) -> PyTree:
    """The state at step 0."""

  def start(self, state: PyTree, resumed: bool, out: list[writers.MetricWriter]) -> bool:
    """Prepares evaluation for ``state``; returns whether the run already stopped early."""

  def run_chunk(self, state: PyTree, step: int, num_steps: int) -> tuple[PyTree, Metrics]:
    """Runs ``num_steps <= chunk_len`` steps; metrics ``{name: [chunk_len] or [chunk_len, M]}``."""

  def num_skipped(self, state: PyTree) -> np.ndarray:
    """``[M]`` steps skipped as non-finite so far, per model."""

  def describe(self, model: int) -> str:
    """How a message names model ``model`` ("" for a single run)."""

  def with_bits_per_dim(self, scalars: dict[str, float]) -> dict[str, float]:
    """``scalars`` with ``bits_per_dim`` of their ``elbo`` added, where that means something."""

  def evaluate(self, step: int, state: PyTree, out: list[writers.MetricWriter]) -> bool:
    """Evaluates ``state`` and writes the results; returns whether to stop early."""

  def close(self) -> None:
    """Releases what ``start`` opened."""


class _Preemption:
  """Turns SIGTERM and a first SIGINT into a flag that the loop checks after each dispatch;
  a second SIGINT raises ``KeyboardInterrupt`` at once."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  @property
  def raised(self) -> bool:
    return self.signum is not None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt  # Asked twice: stop now.
    if self.signum is None:
      self.signum = signum
      if signum == signal.SIGINT:
        logging.warning(
          "Ctrl-C: stopping after this dispatch, with a checkpoint of its step (Ctrl-C again "
          "to stop at once, losing the steps since the last checkpoint)."
        )

  def agreed(self) -> int | None:
    """The signal this process or any other has been asked to stop by, or ``None`` (a
    collective in a multi-host run: every process calls it after each dispatch)."""
    if jax.process_count() == 1:
      return self.signum
    mine = np.int32(self.signum or 0)
    seen = np.asarray(multihost_utils.process_allgather(mine))
    return int(seen.max()) or None

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


@jax.jit
def _state_is_finite(state: PyTree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


def save(ckpt: checkpointing.Checkpointer, step: int, state: PyTree) -> None:
  """Saves ``state`` as checkpoint ``step``, if every value in it is finite.

  The per-step checks (loss, gradient, update) already stop a run before a
  non-finite update is saved; this is the last line of defence, over the whole
  state (parameters, optimizer state, EMA), once per checkpoint.

  Raises:
    NonFiniteError: the state holds a NaN or infinity; nothing was written.
  """
  if not bool(_state_is_finite(state)):
    raise NonFiniteError(
      f"The train state at step {step} holds NaN or infinite values; it was not saved "
      f"({_latest(ckpt.latest_step())}). Lower config.optimizer.learning_rate or set "
      "config.optimizer.grad_clip_norm, then run the same command to resume."
    )
  logging.info("Saving checkpoint at step %d", step)
  ckpt.save(step, state)


def _latest(step: int | None) -> str:
  if step is None:
    return "no checkpoint was saved yet: the same command starts the run again from step 0"
  return f"the latest checkpoint is step {step}"


def due(step: int, every: int, total: int) -> bool:
  """Whether ``step`` is a boundary of an action done ``every`` steps (and at the end)."""
  return step % every == 0 or step == total


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def _pull(pending: list[tuple[int, int, Metrics]]) -> dict[str, np.ndarray]:
  """Device metrics of finished chunks -> host rows ``{name: [steps, M]}``."""
  host = jax.device_get([m for _, _, m in pending])
  rows = {
    k: np.concatenate([m[k][:n] for (_, n, _), m in zip(pending, host, strict=True)])
    for k in host[0]
  }
  return {k: v.reshape(len(v), -1) for k, v in rows.items()}


def _check_finite(
  rows: dict[str, np.ndarray],
  first_step: int,
  skipped: np.ndarray,
  program: Program,
  config: ml_collections.ConfigDict,
  latest_checkpoint: int | None,
) -> np.ndarray:
  """Applies the non-finite policy to host rows; returns the updated ``[M]`` skip counts.

  Raises:
    NonFiniteError: a non-finite step under policy ``stop``, or more than
      ``config.max_nonfinite_skips`` skipped steps in a model under ``skip``.
  """
  bad = ~rows["finite"].astype(bool)
  if not bad.any():
    return skipped
  step_i, model_i = (int(i) for i in np.argwhere(bad)[0])
  where = (
    f"at step {first_step + step_i}{program.describe(model_i)} (loss="
    f"{rows['loss'][step_i, model_i]}, grad_norm={rows['grad_norm'][step_i, model_i]})"
  )
  latest = _latest(latest_checkpoint)
  fix = "Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm"
  if config.nonfinite_policy == "skip":
    skipped = skipped + bad.sum(0)
    logging.warning("Skipped %d non-finite step(s), first %s.", int(bad.sum()), where)
    if np.all(skipped <= config.max_nonfinite_skips):
      return skipped
    raise NonFiniteError(
      f"{skipped.max()} non-finite steps were skipped, more than config.max_nonfinite_skips="
      f"{config.max_nonfinite_skips}; the first of the last batch was {where}. Nothing "
      f"non-finite was saved; {latest}. {fix}."
    )
  raise NonFiniteError(
    f"Non-finite loss, gradient or update {where}. The run stopped before saving it; "
    f"{latest}. {fix} (or config.nonfinite_policy='skip'), then run the same command "
    "to resume."
  )


class Stopwatch:
  """Wall seconds per phase of a run, written to ``WORKDIR/timings.json`` at its end.

  ``setup``: process start to the first dispatch (imports, data, model, restore);
  ``first_steps``: the first dispatch until its metrics arrive (compilation of the
  train chunk included); ``train``: waiting for the device's steps and pulling
  their metrics; ``dispatch`` and ``log``: host work of the loop; ``evaluate``
  and ``save``: at their boundaries (evaluation compiles on its first call).
  """

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._last = time.perf_counter()

  def lap(self, phase: str) -> None:
    """Charges the time since the previous lap to ``phase``."""
    now = time.perf_counter()
    self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
    self._last = now

  def write(self, workdir: pathlib.Path, steps: int, setup: float) -> None:
    total = setup + sum(self.seconds.values())
    record = {
      "seconds": {"setup": setup, **self.seconds, "total": total},
      "steps": steps,
      "peak_rss_mib": process.peak_rss_mib(),
      "note": "wall seconds of this process's phases; see vae_jax.loop.Stopwatch",
    }
    path = workdir / "timings.json"
    with files.reporting(path):
      files.atomic_write(path, json.dumps(record, indent=2) + "\n")
    logging.info("Time: %s", ", ".join(f"{k} {v:.2f} s" for k, v in record["seconds"].items()))


class _Window:
  """Host metrics since the last log row, per model, and the training time they took."""

  def __init__(self):
    self.rows: list[dict[str, np.ndarray]] = []
    self.seconds = 0.0

  def scalars(self, model: int, batch_size: int) -> dict[str, float]:
    """Means over the window's applied steps of model ``model``, and examples/s.

    A value with nothing to average is left out of the row rather than written
    as NaN (which is not JSON, and which TensorBoard warns about): the means
    when every step of the window was skipped, and ``grad_norm`` when the
    window holds none of its sampled steps (a run's last, shorter window).
    """
    rows = {k: np.concatenate([r[k][:, model] for r in self.rows]) for k in self.rows[0]}
    finite = rows.pop("finite").astype(bool)
    grad_norm = rows.pop("grad_norm")
    out = {k: float(np.mean(v[finite])) for k, v in rows.items() if finite.any()}
    # The gradient norm is sampled (see step.make_train_step): the mean of its samples.
    sampled = grad_norm[finite & ~np.isnan(grad_norm)]
    if sampled.size:
      out["grad_norm"] = float(np.mean(sampled))
    out["examples_per_sec"] = len(finite) * batch_size / max(self.seconds, 1e-9)
    out["skipped_steps"] = float(np.sum(~finite))
    return out


def run(program: Program, config: ml_collections.ConfigDict) -> PyTree:
  """Trains ``program`` in ``program.workdir`` (or resumes it) to ``program.total_steps``.

  Returns the final state.

  Raises:
    Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was saved.
    NonFiniteError: see ``_check_finite``.
    checkpointing.CheckpointError: the checkpoints do not fit the program's state.
  """
  workdir = pathlib.Path(program.workdir)
  is_main = jax.process_index() == 0
  if is_main:
    with files.reporting(workdir):
      workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir / workdir_lib.CHECKPOINTS, config.keep_checkpoints)
  out = [
    writers.MetricWriter(workdir / d) if is_main else writers.NullWriter()
    for d in program.writer_dirs
  ]
  bar = None
  try:
    restored = ckpt.restore_latest(program.abstract_state())
    if restored is None:
      state = program.init_state()
      logging.info("Starting a new run in %s", workdir)
    else:
      state = restored[1]
      logging.info("Resumed from checkpoint %d in %s", restored[0], workdir)
    step = int(state.step)
    for w in out:
      w.truncate_after(step if restored else -1)
    if is_main:  # Only once the checkpoints are known to fit this config.
      workdir_lib.write_record(config, workdir)
    total = step if program.start(state, restored is not None, out) else program.total_steps
    if step >= program.total_steps and restored is not None:
      logging.info(
        "This run is finished: it reached step %d of %d. To train it further, run the same "
        "command with a larger --config.num_epochs (or --config.num_train_steps); to "
        "evaluate it, add --mode=evaluate.",
        step,
        program.total_steps,
      )
    last_saved = step if restored else -1
    skipped = program.num_skipped(state)
    log_every = config.log_every_steps
    eval_every = config.eval_every_steps or program.steps_per_epoch
    ckpt_every = config.checkpoint_every_steps or program.steps_per_epoch
    bar = tqdm.tqdm(
      total=total,
      initial=step,
      disable=not (config.progress_bar and is_main),
      unit="step",
      dynamic_ncols=True,
    )
    window = _Window()
    clock = time.perf_counter()
    watch, setup_s, first_steps = Stopwatch(), process.seconds_since_process_start(), step
    with _Preemption() as preemption:
      while step < total:
        boundary = min(
          _next_multiple(step, log_every),
          _next_multiple(step, eval_every),
          _next_multiple(step, ckpt_every),
          total,
        )
        first, pending, stop_now = step, [], False
        while step < boundary and not stop_now:
          n = min(boundary - step, program.chunk_len)
          state, metrics = program.run_chunk(state, step, n)
          pending.append((step, n, metrics))
          step += n
          stop_now = preemption.agreed()
        watch.lap("dispatch")
        # The boundary: metrics come to the host, and are checked before any save.
        ckpt.check_for_errors()  # A failed asynchronous save is reported here, not later.
        rows = _pull(pending)
        watch.lap("first_steps" if first == first_steps else "train")
        skipped = _check_finite(rows, first, skipped, program, config, ckpt.latest_step())
        if stop_now:
          name = signal.Signals(stop_now).name
          logging.warning("%s: saving checkpoint at step %d and stopping.", name, step)
          if step != last_saved:
            save(ckpt, step, state)
          ckpt.wait()
          raise Preempted(step, stop_now)
        window.rows.append(rows)
        window.seconds += time.perf_counter() - clock
        bar.update(step - first)
        if due(step, log_every, total):
          for i, w in enumerate(out):
            scalars = program.with_bits_per_dim(window.scalars(i, program.batch_size))
            if len(out) > 1:  # Every model of a sweep sees each example.
              scalars["sweep_examples_per_sec"] = scalars["examples_per_sec"] * len(out)
            w.write_scalars(step, "train", scalars)
          bar.set_postfix(loss=f"{np.mean(rows['loss']):.2f}")
          window = _Window()
        watch.lap("log")
        stop = False
        if due(step, eval_every, total):
          logging.info("Evaluating at step %d", step)
          stop = program.evaluate(step, state, out)
          watch.lap("evaluate")
        if due(step, ckpt_every, total) or stop:
          save(ckpt, step, state)
          last_saved = step
          watch.lap("save")
        if stop:
          break
        clock = time.perf_counter()
  except BaseException:
    _close(bar, ckpt, program, out, quietly=True)  # The error in flight is the one to report.
    raise
  _close(bar, ckpt, program, out, quietly=False)
  watch.lap("close")
  if is_main and step > first_steps:  # A finished run, run again, keeps its record.
    watch.write(workdir, step - first_steps, setup_s)
  return state


def _close(bar, ckpt, program, out, quietly: bool) -> None:
  """Closes everything the run opened; with ``quietly``, failures are logged, not raised."""
  closers = [bar.close] if bar is not None else []
  closers += [ckpt.close, program.close, *(w.close for w in out)]
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:
      logging.error("While stopping: %s: %s", type(e).__name__, e)
      first = first or e
  if first is not None and not quietly:
    raise first
