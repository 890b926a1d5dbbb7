"""Orbax checkpoints of the train state: save every N steps, keep K, resume.

This is the only module that imports Orbax. Checkpoints live in
``<workdir>/checkpoints/<step>/`` and are written atomically by Orbax (a step
directory appears only once complete), asynchronously so training goes on
while the previous step is written.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vae_jax import files
from vae_jax.errors import UserError

PyTree = Any


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be used or written; the message says why and what to do."""


class NoCheckpoint(CheckpointError, FileNotFoundError):
  """A directory holds no (readable) checkpoint to restore."""


def _advice(e: BaseException) -> str:
  """The fix for a failed write, from the operating system's error where one is known:
  an ``OSError`` anywhere in the chain of causes, or TensorStore's ``os_error_code=N``."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno is not None:
      return files.advice(seen)
    seen = seen.__cause__ or seen.__context__
  code = re.search(r"os_error_code='?(\d+)", str(e))
  if code:
    return files.advice(OSError(int(code.group(1)), ""))
  return "fix the cause"


def _path_name(path) -> str:
  """``opt_state/0/mu/...`` whether the tree uses dicts, tuples or attributes."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _params_first(path: str) -> tuple:
  """Sort key: parameters before optimizer state, ``hidden_10`` after ``hidden_9``."""
  return (
    not path.startswith("params"),
    [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)],
  )


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}


# Orbax's name for the single, unnamed item of a checkpoint: ``<step>/default/``.
_ITEM = "default"


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The one item of every checkpoint, a pytree saved and restored by one standard handler.

  The ``default`` item name keeps the layout ``<step>/default/`` that checkpoints
  written through the older ``item_handlers=`` argument have, so they restore.
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  handler = ocp.StandardCheckpointHandler()
  registry.add(_ITEM, ocp.args.StandardSave, handler)
  registry.add(_ITEM, ocp.args.StandardRestore, handler)
  return registry


class Checkpointer:
  """Saves and restores one pytree (the train state) under ``directory``."""

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3, read_only: bool = False):
    """Opens ``directory``.

    Args:
      directory: where the step directories live.
      max_to_keep: how many of the newest checkpoints to keep.
      read_only: for readers beside a possibly running training job (evaluation):
        create nothing, delete nothing (no clean-up of half-written saves, no
        setting aside of unreadable checkpoints), and refuse ``save``.
    """
    self.directory = pathlib.Path(directory).absolute()
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
      self.directory,
      handler_registry=_handler_registry(),
      options=ocp.CheckpointManagerOptions(
        # After each save, every checkpoint but the newest max_to_keep is deleted
        # (never when read-only). This replaces the deprecated max_to_keep option.
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        # Orbax forces 0 when read-only, with a warning; saying so keeps logs quiet.
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        # A save killed half-way leaves a *.orbax-checkpoint-tmp* directory that
        # was never committed; the training run removes it when it starts again.
        cleanup_tmp_directories=not read_only,
      ),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree) -> None:
    """Starts writing ``state`` as checkpoint ``step`` (returns once it is copied).

    Raises:
      CheckpointError: this or an earlier asynchronous save failed (e.g. a full disk).
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only.")
    with self._failures():
      self._manager.check_for_errors()
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def check_for_errors(self) -> None:
    """Raises ``CheckpointError`` if an asynchronous save has failed; cheap, never blocks."""
    with self._failures():
      self._manager.check_for_errors()

  def wait(self) -> None:
    """Blocks until every started save is on disk.

    Raises:
      CheckpointError: a save failed.
    """
    with self._failures():
      self._manager.wait_until_finished()
      self._manager.check_for_errors()

  def close(self) -> None:
    """Waits for the saves under way, then closes; a failed save raises ``CheckpointError``."""
    try:
      self.wait()
    finally:
      self._manager.close()

  @contextlib.contextmanager
  def _failures(self):
    """One ``CheckpointError`` saying what failed and what to do, for any failure to write."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - Orbax and the OS raise many kinds.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      latest = self.latest_step()
      resume = f"from checkpoint {latest}" if latest is not None else "from the start"
      raise CheckpointError(
        f"Writing a checkpoint in {self.directory} failed: {first}. Nothing half-written is "
        f"used: {_advice(e)}, then run the same command to resume {resume}."
      ) from e

  def _unreadable_dir(self) -> pathlib.Path:
    return self.directory.with_name(self.directory.name + "_unreadable")

  def _set_aside(self, step: int) -> pathlib.Path:
    """Moves an unreadable checkpoint out of the way (kept for inspection, not deleted),
    so that the run can write that step again."""
    target = self._unreadable_dir() / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.directory / str(step)), str(target))
    return target

  def _check_compatible(self, step: int, target: PyTree) -> None:
    if target is None:  # A raw restore: the checkpoint's own structure.
      return
    try:
      stored = self._manager.metadata(step).item_metadata
    except Exception:  # noqa: BLE001 - unreadable metadata is handled by restore's fallback.
      return
    if stored is None:
      return
    try:
      stored_shapes = _shapes(stored)
    except (AttributeError, TypeError):
      return
    wanted = _shapes(target)
    diffs = [
      f"  {path}: checkpoint {stored_shapes.get(path, 'missing')} vs this config "
      f"{wanted.get(path, 'missing')}"
      for path in sorted(set(wanted) | set(stored_shapes), key=_params_first)
      if stored_shapes.get(path) != wanted.get(path)
    ]
    if diffs:
      raise CheckpointError(
        f"Checkpoint {step} in {self.directory} does not match the model of this config:\n"
        + "\n".join(diffs[:10])
        + ("\n  ..." if len(diffs) > 10 else "")
        + "\nUse a fresh --workdir for a different model, or the config that wrote it."
      )

  def restore_latest(self, target: PyTree, step: int | None = None) -> tuple[int, PyTree] | None:
    """Restores the newest readable checkpoint into the structure of ``target``.

    Args:
      target: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the expected
        structure, shapes and dtypes (e.g. from ``jax.eval_shape``).
      step: restore this step only (and fail if it cannot be read).

    Returns:
      ``(step, state)``, or ``None`` when the directory holds no checkpoint.

    Raises:
      CheckpointError: the checkpoints were written for other shapes, none of
        them can be read, or ``step`` is not among them.
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(
          f"{self.directory} has no checkpoint of step {step}; it has steps {steps}."
        )
      steps = [step]
    if not steps:
      return None
    self._check_compatible(steps[-1], target)
    errors, unreadable = [], []
    for step in reversed(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # noqa: BLE001 - any failure: try an older one.
        errors.append(f"  step {step}: {type(e).__name__}: {e}")
        unreadable.append(step)
        logging.warning(
          "Checkpoint %d in %s cannot be restored (%s: %s); trying the previous one.",
          step,
          self.directory,
          type(e).__name__,
          str(e).splitlines()[0] if str(e) else "",
        )
        continue
      # Only now that an older checkpoint restored are the newer ones known to be
      # bad (not a passing I/O error that would hit every one of them): move them
      # out of the way so the run can write those steps again. Kept, not deleted.
      if unreadable and not self.read_only:
        if jax.process_index() == 0:
          for bad in unreadable:
            logging.warning("Moved unreadable checkpoint %d to %s.", bad, self._set_aside(bad))
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices("vae_jax: unreadable checkpoints set aside")
        self._manager.reload()
      return step, state
    raise CheckpointError(
      f"No checkpoint in {self.directory} could be restored; all were left in place:\n"
      + "\n".join(errors)
      + "\nIf the files are damaged, move the directory away to start afresh."
    )


def saved_steps(directory: str | pathlib.Path) -> list[int]:
  """Steps with a checkpoint directory under ``directory`` (sorted; ``[]`` if none),
  read from the file names without opening a manager."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore_read_only(
  directory: str | pathlib.Path, target: PyTree, step: int | None = None
) -> tuple[int, PyTree]:
  """``(step, state)`` of the newest readable checkpoint (or of ``step``), for readers
  such as evaluation.

  Opens ``directory`` read-only (see ``Checkpointer``), so it is safe beside a
  training job that is still writing there.

  Raises:
    NoCheckpoint: ``directory`` holds no checkpoint (a ``FileNotFoundError`` too).
    CheckpointError: as ``Checkpointer.restore_latest``.
  """
  directory = pathlib.Path(directory)
  if not saved_steps(directory):
    raise NoCheckpoint(
      f"No checkpoints in {directory}. Train first, with the same config and "
      f"--workdir={directory.parent}."
    )
  checkpointer = Checkpointer(directory, read_only=True)
  try:
    restored = checkpointer.restore_latest(target, step)
  finally:
    checkpointer.close()
  if restored is None:
    raise NoCheckpoint(f"No readable checkpoint in {directory}.")
  step, state = restored
  return int(step), state
