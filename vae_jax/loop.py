"""The host loop shared by single runs and sweeps: dispatch, check, log, evaluate, save.

A ``Program`` (``train.SingleRun``, ``sweep.Sweep``) says what runs on the
device; this loop decides when. Its guarantees hold for every program:

* the workdir's ``config.json`` is written only after its checkpoints restored;
* metrics come to the host at each log, eval or checkpoint boundary and are
  checked there (the non-finite policy) *before* anything is saved;
* SIGTERM is acted on within one dispatch, by every process together (in a
  multi-host run all processes agree after each dispatch): the current step is
  saved and ``Preempted`` raised; the same command resumes;
* evaluation at its boundaries may stop the run early (the program decides);
* metrics rows are written per model: one writer per ``Program.writer_dirs``.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import resource
import signal
import sys
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

from vae_jax import checkpointing, writers
from vae_jax import config as config_lib

PyTree = Any
Metrics = dict[str, jax.Array]

# A run stopped by SIGTERM (preemption) exits with this code after saving a
# checkpoint of its current step; the same command resumes it. It is the
# shell's code for "terminated by SIGTERM", which schedulers treat as preempted.
EXIT_CODE_PREEMPTED = 143


class NonFiniteError(FloatingPointError):
  """A loss, gradient or update became NaN or infinite; nothing of it was checkpointed."""


class Preempted(Exception):  # noqa: N818 - it is an outcome, not a failure.
  """SIGTERM arrived; a checkpoint of ``step`` was written and the run stopped."""

  def __init__(self, step: int):
    super().__init__(f"Stopped by SIGTERM after saving a checkpoint at step {step}.")
    self.step = step


class Program(Protocol):
  """What a run plugs into ``run``.

  Attributes:
    total_steps: steps of the whole run.
    chunk_len: the most steps one dispatch runs.
    batch_size: examples per step (per model), for examples/s.
    writer_dirs: one subdirectory of the workdir per model ("" for a single run).
  """

  total_steps: int
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

  def evaluate(self, step: int, state: PyTree, out: list[writers.MetricWriter]) -> bool:
    """Evaluates ``state`` and writes the results; returns whether to stop early."""

  def close(self) -> None:
    """Releases what ``start`` opened."""


class _Preemption:
  """Turns SIGTERM into a flag that the loop checks after each dispatch."""

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

  def agreed(self) -> bool:
    """Whether this process or any other has been asked to stop (a collective in a
    multi-host run: every process calls it after each dispatch)."""
    if jax.process_count() == 1:
      return self.raised
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.raised))))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
      f"(the latest checkpoint is step {ckpt.latest_step()}). Lower "
      "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm, then run the "
      "same command to resume."
    )
  logging.info("Saving checkpoint at step %d", step)
  ckpt.save(step, state)


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
  latest = f"the latest checkpoint is step {latest_checkpoint}"
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


def seconds_since_process_start() -> float:
  """Wall seconds since this process started (Linux ``/proc``; else since vae_jax.loop loaded)."""
  try:
    ticks = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def limit_malloc_arenas(arenas: int = 2) -> bool:
  """Caps glibc's malloc arenas for this process (``M_ARENA_MAX``); True if it was set.

  glibc gives threads that contend for malloc arenas of their own, up to 8 per core.
  Orbax's and TensorStore's save threads allocate and free in many of them, and the freed
  memory stays fragmented there: a training run's resident memory grew by about 1.4 MB
  per checkpoint (66 MB over 47 saves of the Fashion-MNIST model), which over the
  thousands of evaluations and saves of a likelihood run adds up to gigabytes. With two
  arenas it grew by about 0.3 MB per save, at no measured cost in speed
  (docs/performance.md). A ``MALLOC_ARENA_MAX`` in the environment is left to glibc;
  other C libraries are left alone.
  """
  if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # Not glibc (e.g. musl).
    return False
  m_arena_max = -8  # From glibc's malloc.h.
  return bool(libc.mallopt(m_arena_max, arenas))


def peak_rss_mib(pid: int | str = "self") -> float | None:
  """Peak resident memory of process ``pid`` so far, in MiB (None if it has exited).

  Linux: ``VmHWM`` of ``/proc/<pid>/status``, the high-water mark of the process's own
  address space. Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``exec`` from
  the process that forked, so a run started by a large Python process (a benchmark, a
  notebook) would report its parent's peak. Elsewhere, ``ru_maxrss`` of this process
  (KiB on Linux and BSD, bytes on macOS).
  """
  if os.path.exists("/proc/self/status"):
    try:
      with open(f"/proc/{pid}/status") as f:
        for line in f:
          if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # kB.
    except (FileNotFoundError, ProcessLookupError):
      pass
    return None  # Gone, or exited and not yet reaped (no address space left).
  if pid != "self":
    raise OSError(f"Cannot read the peak memory of process {pid} without /proc.")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


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
      "peak_rss_mib": peak_rss_mib(),
      "note": "wall seconds of this process's phases; see vae_jax.loop.Stopwatch",
    }
    path = workdir / "timings.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
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


def run(
  program: Program,
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
) -> PyTree:
  """Trains ``program`` in ``workdir`` (or resumes it) to ``program.total_steps``.

  Returns the final state.

  Raises:
    Preempted: SIGTERM arrived; a checkpoint of the current step was saved.
    NonFiniteError: see ``_check_finite``.
    checkpointing.CheckpointError: the checkpoints do not fit the program's state.
  """
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
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
      config_lib.write_record(config, workdir)
    total = step if program.start(state, restored is not None, out) else program.total_steps
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
    watch, setup_s, first_steps = Stopwatch(), seconds_since_process_start(), step
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
          logging.warning("SIGTERM: saving checkpoint at step %d and stopping.", step)
          if step != last_saved:
            save(ckpt, step, state)
          ckpt.wait()
          raise Preempted(step)
        window.rows.append(rows)
        window.seconds += time.perf_counter() - clock
        bar.update(step - first)
        if due(step, log_every, total):
          for i, w in enumerate(out):
            scalars = window.scalars(i, program.batch_size)
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
  if is_main:
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
