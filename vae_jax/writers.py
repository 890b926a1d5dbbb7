"""What a run leaves in its workdir for people: metrics, TensorBoard, images.

* ``metrics.jsonl``: one JSON object per line, ``{"step": ..., "split": ...,
  <metric>: ...}``; read it with ``pandas.read_json(path, lines=True)``.
* ``tensorboard/``: the same scalars and the image grids for
  ``tensorboard --logdir <workdir>``.
* ``images/<name>_<step>.png``: image grids.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import time
from collections.abc import Mapping

import numpy as np
from absl import logging
from PIL import Image
from tensorboardX import summary as tbx_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

from vae_jax import files


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles ``[n, h, w, c]`` images in [0, 1] into one ``[H, W, c]`` uint8 image (a NaN
  pixel, from a model gone non-finite, is drawn black)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"image_grid expects [n, h, w, c], got shape {images.shape}.")
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, col = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = images[i]
  return np.round(np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)


def interleave(originals: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
  """``[n, ...]`` pairs -> ``[2n, ...]``: original, reconstruction, original, ..."""
  originals, reconstructed = np.asarray(originals), np.asarray(reconstructed)
  out = np.empty((2 * originals.shape[0], *originals.shape[1:]), originals.dtype)
  out[0::2], out[1::2] = originals, reconstructed
  return out


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a ``[H, W, 1 or 3]`` uint8 image as PNG (atomically)."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  with files.atomic_path(path) as tmp:
    pil.save(tmp, format="PNG")


class NullWriter:
  """A ``MetricWriter`` that writes nothing: for every process but the first of a
  multi-host run, which compute the same values."""

  def truncate_after(self, step: int) -> None:
    del step

  def write_scalars(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    del step, split, scalars

  def write_image(self, step: int, name: str, grid: np.ndarray) -> None:
    del step, name, grid

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


WriteError = files.WriteError  # A file could not be written; the message says which and why.


_EVENT_FILES = itertools.count()


class _TensorBoard:
  """TensorBoard event files written synchronously, in the caller's thread.

  tensorboardX's ``SummaryWriter`` writes from a background thread; when that
  thread dies (a full disk) its bounded queue fills and the next ``add_*``
  blocks forever, deaf to SIGTERM. Here every event is written and flushed
  where it is logged, so a failed write raises at once.
  """

  def __init__(self, logdir: pathlib.Path, purge_step: int | None = None):
    logdir.mkdir(parents=True, exist_ok=True)
    # The file name holds the time in seconds and the host; the process id and a counter
    # keep two writers of one directory in the same second apart (two processes, or a
    # writer reopened on resume).
    suffix = f".{os.getpid()}.{next(_EVENT_FILES)}"
    self._events = EventsWriter(str(logdir / "events"), filename_suffix=suffix)
    if purge_step is not None:
      # TensorBoard hides the points of steps >= purge_step logged before this event.
      self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

  def _write(self, event: Event) -> None:
    event.wall_time = time.time()
    self._events.write_event(event)
    self._events.flush()

  def scalars(self, step: int, tag_values: Mapping[str, float]) -> None:
    values = [tbx_summary.scalar(tag, value).value[0] for tag, value in tag_values.items()]
    self._write(Event(step=step, summary=Summary(value=values)))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    self._write(Event(step=step, summary=tbx_summary.image(tag, image, dataformats="HWC")))

  def close(self) -> None:
    self._events.close()


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard, images to PNG and TensorBoard.

  Every write happens (and is flushed) in the caller's thread: a failure (e.g. a
  full disk) raises ``WriteError`` naming the file at once, and nothing waits on
  a background writer. Only the host that owns the workdir should create one.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.metrics_path = self.workdir / "metrics.jsonl"
    with _reporting(self.workdir):
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self.metrics_path, "a")  # noqa: SIM115 - closed in close().
      self._tb = _TensorBoard(self.workdir / "tensorboard")

  def truncate_after(self, step: int) -> None:
    """Drops logged rows later than ``step`` (a resumed run writes them again).

    Rows survive only up to the restored checkpoint, so the file has neither
    gaps nor duplicated steps after a resume; TensorBoard likewise hides its
    points after ``step``.
    """
    with _reporting(self.metrics_path):
      self._jsonl.close()
      rows = read_metrics(self.metrics_path)
      kept = [r for r in rows if r["step"] <= step]
      files.atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
      self._jsonl = open(self.metrics_path, "a")  # noqa: SIM115
      self._tb.close()
      self._tb = _TensorBoard(self.workdir / "tensorboard", purge_step=step + 1)

  def write_scalars(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    row = {"step": int(step), "split": split}
    row.update({k: float(v) for k, v in scalars.items()})
    with _reporting(self.metrics_path):
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
      self._tb.scalars(int(step), {f"{split}/{k}": float(v) for k, v in scalars.items()})

  def write_image(self, step: int, name: str, grid: np.ndarray) -> pathlib.Path:
    """Saves a uint8 ``[H, W, c]`` grid as ``images/<name>_<step>.png`` and in TensorBoard."""
    path = self.workdir / "images" / f"{name}_{step:08d}.png"
    with _reporting(path):
      save_png(path, grid)
      self._tb.image(int(step), name, grid)
    return path

  def flush(self) -> None:
    with _reporting(self.metrics_path):
      self._jsonl.flush()

  def close(self) -> None:
    """Closes the files; a failure to flush them is logged, not raised (the run's own
    error, if any, is the one to report)."""
    for f in (self._jsonl, self._tb):
      try:
        f.close()
      except OSError as e:
        logging.error("Closing %s failed: %s", self.workdir, e)


def _reporting(path: pathlib.Path):
  """An ``OSError`` while writing ``path`` as one ``WriteError`` naming the cause and fix."""
  return files.reporting(
    path, then="run the same command: the run resumes from its latest checkpoint"
  )


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Reads ``metrics.jsonl``; a torn last line (a kill mid-write) is dropped."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows
