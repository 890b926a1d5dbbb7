"""Feeding a run: its splits, batches for the train step, evaluation data.

* ``load_splits(config)``: the dataset of ``config`` (``vae_jax.datasets``), prepared once
  by process 0 and opened by every process, cut as the config says: the first
  ``data.max_train_examples`` training images, and the last ``validation_examples`` of
  those held out for validation (or ``data.validation_split``). Labels (classes, or
  dSprites' factors) always follow their images.
* Two feeds of the training split, one interface (``inputs(step, num_steps)`` on the host,
  ``batch(inputs, step)`` inside the jitted multi-step call, ``step.make_train_chunk``):

  - ``DeviceFeed``: the whole split in device memory as uint8; each step gathers its batch
    there from the epoch's permutation. The fastest, while the split fits.
  - ``StreamFeed``: the split stays in the prepared files; each dispatch's batches are read
    on the host by Grain's threads, ahead of the device, and copied over. Each process
    of a multi-host run reads only its own rows of each batch. Memory does not grow with
    the dataset.

  Both take batch ``s`` from the same positions of the same permutation of epoch
  ``s // E`` and preprocess it on device with the same draws (``preprocess``:
  binarization or dequantization), so they feed the same batches and a batch depends
  only on ``(seed, step)``: a resumed run sees what an uninterrupted one would, with no
  reader state to checkpoint (the stream's position is the train step, which the
  checkpoint holds). ``choose_feed`` picks one (``data.feed``).
* ``eval_images``: an evaluation split preprocessed once, with a fixed seed.
* ``EvalData``: the run's test and validation splits, preprocessed, on device.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from array_record.python import array_record_module
from jax.experimental import multihost_utils

from vae_jax import config as config_lib
from vae_jax import datasets

Array = jax.Array

# Pixels of the evaluation splits are preprocessed once with these fixed seeds
# (independent of the run's seed), so likelihoods are comparable across runs.
EVAL_BINARIZATION_SEED = 0  # The test split.
VALIDATION_SEED = 1  # The validation split.


# --------------------------------------------------------------------------
# The run's splits.


@dataclasses.dataclass(frozen=True)
class Splits:
  """A run's splits.

  Attributes:
    source: the opened dataset.
    num_train: how many examples the run trains on: the first ``num_train`` of the
      dataset's training split.
    train: those examples in host memory, or ``None`` where they are streamed.
    validation: the validation split in host memory, or ``None``.
    test: the test split in host memory.
    stream_file: where they are streamed: the training split's records for the stream
      (``datasets.Source.stream_file``), or ``None``.
  """

  source: datasets.Source | None
  num_train: int
  train: datasets.Split | None
  validation: datasets.Split | None
  test: datasets.Split
  stream_file: pathlib.Path | None = None

  @property
  def event_shape(self) -> tuple[int, ...]:
    return tuple(self.test.images.shape[1:])


def _take(split: datasets.Split, index: slice) -> datasets.Split:
  return datasets.Split(images=split.images[index], labels=split.labels[index])


def train_range(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int | None]:
  """``(num_train, num_validation)``: the run trains on the first ``num_train`` examples of a
  training split of ``num_examples``; the ``validation_examples`` after them are held out
  (``None``: none), all within the first ``data.max_train_examples``.

  Raises:
    config.ConfigError: the cut would leave no training example.
  """
  kept = min(num_examples, config.data.max_train_examples or num_examples)
  v = config.validation_examples
  if v == 0:
    return kept, None
  if not 0 < v < kept:
    raise config_lib.ConfigError(
      f"config.validation_examples={v} must be in [0, {kept}) for this training split."
    )
  return kept - v, v


def cut(config: ml_collections.ConfigDict, data: dict[str, datasets.Split]) -> Splits:
  """The run's splits of ``data`` held in memory (see ``train_range``), each with its labels.

  Raises:
    config.ConfigError: the cut would leave no training example.
  """
  full = data[config.data.train_split]
  num_train, v = train_range(config, full.num_examples)
  validation = _take(full, slice(num_train, num_train + v)) if v else None
  if config.data.validation_split:
    validation = data[config.data.validation_split]
  train = _take(full, slice(0, num_train))
  return Splits(None, num_train, train, validation, data[config.data.test_split])


def _process_0_first(make, what: str):
  """``make()`` in every process, process 0's first: what it prepares, the others read."""
  is_main = jax.process_index() == 0
  if is_main:
    made = make()
  if jax.process_count() > 1:  # The others read what process 0 prepared.
    multihost_utils.sync_global_devices(f"vae_jax: {what}")
    if not is_main:
      made = make()
  return made


def choose_feed(config: ml_collections.ConfigDict, source: datasets.Source, num_train: int) -> str:
  """``"device"`` or ``"stream"``: ``data.feed``, or for ``"auto"`` whether the training
  examples, as uint8 images of the run's shape, fit in ``data.device_memory_mib``."""
  size_mib = num_train * np.prod(source.event_shape) / 2**20
  feed = config.data.feed
  if feed == "auto":
    feed = "device" if size_mib <= config.data.device_memory_mib else "stream"
    if feed == "stream" and config.model.num_classes:
      raise config_lib.ConfigError(
        f"The training split ({size_mib:.0f} MiB as uint8) is beyond "
        f"config.data.device_memory_mib={config.data.device_memory_mib}, but a conditional "
        "VAE (config.model.num_classes > 0) reads its labels from the device-resident feed: "
        "raise data.device_memory_mib, or train on fewer images (data.max_train_examples)."
      )
    logging.info(
      "Training split: %d images, %.0f MiB as uint8, %s config.data.device_memory_mib=%d: %s feed.",
      num_train,
      size_mib,
      "within" if feed == "device" else "beyond",
      config.data.device_memory_mib,
      feed,
    )
  return feed


def load_splits(config: ml_collections.ConfigDict, feed: str | None = None) -> Splits:
  """The run's splits of the dataset of ``config``: the training examples in host memory
  for the device feed (``None`` for the stream, which reads them as it goes), the
  validation and test splits in host memory.

  Args:
    config: the run's config.
    feed: ``"device"``, ``"stream"``, or ``None``: ``choose_feed``'s.

  Raises:
    datasets.DataError: the dataset cannot be had or read.
    config.ConfigError: the cut would leave no training example.
  """
  source = _process_0_first(lambda: datasets.from_config(config), "data prepared")
  d = config.data
  num_train, v = train_range(config, source.num_examples(d.train_split))
  feed = feed or choose_feed(config, source, num_train)
  train = validation = None
  if feed == "device":
    full = source.load(d.train_split)
    train = _take(full, slice(0, num_train))
    if v:
      validation = _take(full, slice(num_train, num_train + v))
  elif v:
    validation = source.read(d.train_split, range(num_train, num_train + v))
  if d.validation_split:
    validation = source.load(d.validation_split)
  stream_file = None
  if feed == "stream":
    stream_file = _process_0_first(lambda: source.stream_file(d.train_split), "stream decoded")
  test = source.load(d.test_split)
  splits = Splits(source, num_train, train, validation, test, stream_file)
  check_labels(config, splits)
  return splits


def check_labels(config: ml_collections.ConfigDict, splits: Splits) -> None:
  """For a conditional VAE (``config.model.num_classes = k > 0``): every split's labels are
  classes ``0 .. k - 1``, one per image.

  Raises:
    config.ConfigError: labels that are not classes, or not below ``k``.
  """
  k = config.model.num_classes
  if not k:
    return
  named = (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
  for name, split in named:
    if split is None:
      continue
    labels = np.asarray(split.labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise config_lib.ConfigError(
        f"config.model.num_classes={k}: a conditional VAE reads one class label per image, "
        f"but the {name} labels of {config.dataset!r} are {labels.dtype} of shape "
        f"{labels.shape}; use a dataset with class labels, or num_classes=0."
      )
    if labels.size and (labels.min() < 0 or labels.max() >= k):
      raise config_lib.ConfigError(
        f"config.model.num_classes={k}, but the {name} labels of {config.dataset!r} range "
        f"over [{labels.min()}, {labels.max()}]: set num_classes to the dataset's number "
        f"of classes ({labels.max() + 1} or more)."
      )


# --------------------------------------------------------------------------
# Preprocessing (pure JAX; runs on device inside the jitted train step).


def preprocess(images: Array, binarization: str, key: Array | None = None, bits: int = 8) -> Array:
  """uint8 levels ``[batch, h, w, c]`` -> float32 in [0, 1], binarized as asked.

  Args:
    images: uint8 levels in ``[0, 2**bits - 1]`` (pixels, for 8 bits).
    binarization: ``"none"`` (grey levels ``level / (2**bits - 1)`` in [0, 1]),
      ``"threshold"`` (grey level > 0.5), ``"dynamic"`` (a Bernoulli draw with the grey
      level as probability, fresh for every ``key``) or ``"dequantize"`` (``(level + u) /
      2**bits`` with ``u ~ U[0, 1)`` fresh for every ``key``: a density on [0, 1] then
      bounds the data's log-probability, ``log P(levels) >= log p(x) - D log 2**bits``).
    key: PRNG key, required for ``"dynamic"`` and ``"dequantize"``.
    bits: the bit depth of the levels (``data.bits``).

  Raises:
    config.ConfigError: an unknown binarization.
    ValueError: no key for a binarization that draws.
  """
  config_lib.check_choice("binarization", binarization)
  shape = images.shape
  # Elementwise over [batch, h * w * c]: XLA vectorizes along the minor axis (1 for grey
  # images stored [..., 1]), several times faster on CPU; the same numbers.
  images = images.reshape(shape[0], -1) if images.ndim > 1 else images
  if binarization == "dequantize":
    if key is None:
      raise ValueError("dequantize needs a PRNG key.")
    noise = jax.random.uniform(key, images.shape, jnp.float32)
    return ((images.astype(jnp.float32) + noise) / float(2**bits)).reshape(shape)
  x = images.astype(jnp.float32) / float(2**bits - 1)
  if binarization == "threshold":
    return (x > 0.5).astype(jnp.float32).reshape(shape)
  if binarization == "dynamic":
    if key is None:
      raise ValueError("dynamic binarization needs a PRNG key.")
    return jax.random.bernoulli(key, x).astype(jnp.float32).reshape(shape)
  return x.reshape(shape)


def eval_images(
  images: np.ndarray, binarization: str, seed: int = EVAL_BINARIZATION_SEED, bits: int = 8
) -> Array:
  """An evaluation split, preprocessed once: one fixed draw (from ``seed``) for
  ``dynamic`` binarization and ``dequantize`` noise."""
  key = jax.random.key(seed)
  return preprocess(jnp.asarray(images), binarization, key, bits)


# --------------------------------------------------------------------------
# The order of the training examples.


def epoch_permutation(shuffle_key: Array, epoch: int | Array, num_examples: int) -> Array:
  """The example order of ``epoch``: a function of the seed and epoch alone."""
  return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_examples)


class Permutations:
  """``perms(epoch) -> [2, n]``: the orders of ``epoch`` and ``epoch + 1``, as
  ``DeviceFeed.batch`` takes them, computed on device once and cached (older epochs are
  dropped)."""

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


# --------------------------------------------------------------------------
# Feeding the train step.


@dataclasses.dataclass(frozen=True)
class DeviceFeed:
  """The training split in device memory; each step gathers and preprocesses its batch there.

  Batch ``s`` holds the examples at positions ``[(s % E) * B, (s % E + 1) * B)`` of the
  permutation of epoch ``s // E`` (``E`` full batches per epoch; the remainder of an
  epoch is dropped), preprocessed with ``fold_in(binarize_key, s)``. A multi-step call
  spans at most two epochs, so it is passed the permutations of both.

  Attributes:
    images: ``[n, h, w, c]`` uint8, placed as the run's data sharding says.
    batch_size: ``B``.
    binarization: ``config.binarization``.
    binarize_key: the key of the preprocessing draws.
    permutations: the epochs' orders.
    bits: the bit depth of the levels (``data.bits``).
    labels: ``[n]`` int32 class labels for a conditional VAE, whose batches are then
      ``(x, labels)`` pairs; ``None`` otherwise.
  """

  images: Array
  batch_size: int
  binarization: str
  binarize_key: Array
  permutations: Permutations
  bits: int = 8
  labels: Array | None = None

  @property
  def num_examples(self) -> int:
    return self.images.shape[0]

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def inputs(self, step: int, num_steps: int = 1) -> dict[str, Any]:
    """What ``batch`` reads for the dispatch of ``num_steps`` steps from train step ``step``."""
    del num_steps
    epoch = step // self.steps_per_epoch
    inputs = {
      "images": self.images,
      "perms": self.permutations(epoch),
      "first_epoch": epoch,
      "key": self.binarize_key,
    }
    if self.labels is not None:
      inputs["labels"] = self.labels
    return inputs

  def batch(self, inputs: dict[str, Any], step: Array) -> Array | tuple[Array, Array]:
    """The preprocessed batch of train step ``step`` (traced), from ``inputs(first_step)``:
    ``[batch, *event_shape]``, or ``(x, labels)`` where the feed holds labels."""
    steps_per_epoch, batch_size = self.steps_per_epoch, self.batch_size
    order = inputs["perms"][step // steps_per_epoch - inputs["first_epoch"]]
    idx = jax.lax.dynamic_slice(order, ((step % steps_per_epoch) * batch_size,), (batch_size,))
    key = jax.random.fold_in(inputs["key"], step)
    x = preprocess(inputs["images"][idx], self.binarization, key, self.bits)
    if "labels" in inputs:
      return x, inputs["labels"][idx]
    return x


def process_rows(
  sharding: jax.sharding.Sharding, shape: tuple[int, ...], process_index: int | None = None
) -> slice:
  """The rows along axis 1 (the batch axis of ``[steps, batch, ...]``) of an array of
  ``shape`` placed with ``sharding`` that the devices of process ``process_index``
  (default: this one) hold: what that process reads.

  Raises:
    ValueError: those rows are not one contiguous range.
  """
  process = jax.process_index() if process_index is None else process_index
  held = sorted(
    {
      (index[1].start or 0, shape[1] if index[1].stop is None else index[1].stop)
      for device, index in sharding.devices_indices_map(tuple(shape)).items()
      if device.process_index == process
    }
  )
  if not held:
    raise ValueError(f"Process {process} holds no device of {sharding}.")
  start, stop = held[0]
  for a, b in held[1:]:
    if a > stop:
      raise ValueError(f"Process {process} holds rows {held} of the batch: not contiguous.")
    stop = max(stop, b)
  return slice(start, stop)


class StreamFeed:
  """The training split read from disk as the run goes, ahead of the device.

  Batch ``s`` is ``DeviceFeed``'s: the examples at positions ``[(s % E) * B, (s % E + 1) *
  B)`` of epoch ``s // E``'s permutation (``epoch_permutation``, here computed for the
  host), preprocessed on device with ``fold_in(binarize_key, s)``. On the host, Grain
  (a ``grain.MapDataset`` over the train steps) reads each step's images from the split's
  decoded records (``datasets.Source.stream_file``, an ArrayRecord file) with
  ``read_threads`` threads, up to ``read_ahead`` steps ahead of the one being stacked.
  Each process reads only the rows of each batch that its devices hold (``process_rows``
  of ``sharding``), and the rows of all processes make one global array.

  A batch is a function of ``(seed, step)``, so the reader's position is the train step,
  which the checkpoint holds: a resumed run starts reading at the restored step and
  sees exactly the batches an uninterrupted run would. There is no separate iterator
  state that could disagree with the model's.

  Args:
    path: the split's decoded records (``datasets.Source.stream_file``).
    event_shape: the shape of one image.
    num_examples: the run trains on records ``[0, num_examples)``.
    batch_size: ``B``, global.
    binarization: ``config.binarization``.
    bits: the bit depth of the levels.
    shuffle_key: the key of the epochs' permutations.
    binarize_key: the key of the preprocessing draws.
    sharding: of a dispatch's batches ``[chunk_len, B, *event_shape]``, split along the
      batch axis (axis 1).
    chunk_len: steps per dispatch.
    total_steps: the run's length (nothing is read past it).
    read_threads: Grain's reading threads (0: half the host's cores, at most 8: each
      batch read also uses ArrayRecord's own parallel reads, and more threads than cores
      slowed a 2-core machine down).
    read_ahead: batches read ahead (default: one dispatch's).
    rows: the rows of each batch this process reads (default: ``process_rows``).
  """

  def __init__(
    self,
    path: pathlib.Path,
    event_shape: tuple[int, ...],
    num_examples: int,
    batch_size: int,
    binarization: str,
    bits: int,
    shuffle_key: Array,
    binarize_key: Array,
    sharding: jax.sharding.Sharding,
    chunk_len: int,
    total_steps: int,
    read_threads: int = 0,
    read_ahead: int | None = None,
    rows: slice | None = None,
  ):
    self.path, self.event_shape = pathlib.Path(path), tuple(event_shape)
    self.num_examples, self.batch_size = num_examples, batch_size
    self.binarization, self.bits = binarization, bits
    self.binarize_key, self.sharding = binarize_key, sharding
    self.chunk_len, self.total_steps = chunk_len, total_steps
    self.read_threads = read_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
    self.read_ahead = read_ahead or chunk_len
    self.shape = (chunk_len, batch_size, *self.event_shape)
    self.rows = rows if rows is not None else process_rows(sharding, self.shape)
    self._readers = threading.local()  # One ArrayRecord reader per reading thread.
    self._shuffle_key = shuffle_key
    self._permutation = jax.jit(epoch_permutation, static_argnums=2)
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()
    self._iterator = None
    self._next_step: int | None = None
    logging.info(
      "Streaming the first %d images of %s: process %d of %d reads rows [%d, %d) of each "
      "batch of %d, with %d thread(s), %d batch(es) ahead.",
      num_examples, self.path.name, jax.process_index(), jax.process_count(),
      self.rows.start, self.rows.stop, batch_size, self.read_threads, self.read_ahead,
    )  # fmt: skip

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def order(self, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s permutation of the training examples (``DeviceFeed``'s)."""
    with self._lock:  # Grain's threads ask for it concurrently.
      if epoch not in self._orders:
        for old in [e for e in self._orders if e < epoch - 1]:
          del self._orders[old]
        self._orders[epoch] = np.asarray(
          self._permutation(self._shuffle_key, epoch, self.num_examples)
        )
      return self._orders[epoch]

  def indices(self, step: int) -> np.ndarray:
    """The examples this process reads for train step ``step``: its rows of the global
    batch, ``[rows]`` indices into the training split."""
    start = (step % self.steps_per_epoch) * self.batch_size
    batch = self.order(step // self.steps_per_epoch)[start : start + self.batch_size]
    return batch[self.rows]

  def read(self, step: int) -> np.ndarray:
    """This process's rows of step ``step``'s batch: ``[rows, *event_shape]`` uint8."""
    reader = getattr(self._readers, "reader", None)
    if reader is None:
      # Grain's ArrayRecordDataSource starts a thread pool for every batch it reads; the
      # reader itself reads a batch twice as fast.
      reader = array_record_module.ArrayRecordReader(str(self.path), "readahead_buffer_size:0")
      self._readers.reader = reader
    records = reader.read([int(i) for i in self.indices(step)])
    return np.frombuffer(b"".join(records), np.uint8).reshape(-1, *self.event_shape)

  def _start(self, step: int) -> None:
    steps = grain.MapDataset.range(step, max(self.total_steps, step + 1)).map(self.read)
    options = grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.read_ahead)
    self._iterator = iter(steps.to_iter_dataset(options))
    self._next_step = step

  def inputs(self, step: int, num_steps: int) -> dict[str, Any]:
    """The batches of steps ``[step, step + num_steps)``, read (by now, mostly read ahead),
    stacked ``[chunk_len, B, *event_shape]`` (zeros past ``num_steps``) and placed with
    ``sharding``."""
    if self._next_step != step:  # The first call, or a restore elsewhere.
      self._start(step)
    local = np.zeros(
      (self.chunk_len, self.rows.stop - self.rows.start, *self.event_shape), np.uint8
    )
    for i in range(num_steps):
      local[i] = next(self._iterator)
    self._next_step = step + num_steps
    batches = jax.make_array_from_process_local_data(self.sharding, local, self.shape)
    return {"batches": batches, "first_step": step, "key": self.binarize_key}

  def batch(self, inputs: dict[str, Any], step: Array) -> Array:
    """The preprocessed batch of train step ``step`` (traced), from ``inputs(first_step)``."""
    images = inputs["batches"][step - inputs["first_step"]]
    key = jax.random.fold_in(inputs["key"], step)
    return preprocess(images, self.binarization, key, self.bits)


Feed = DeviceFeed | StreamFeed


@dataclasses.dataclass(frozen=True)
class EvalData:
  """A run's evaluation splits, preprocessed once (fixed seeds), on device.

  Attributes:
    test: ``[n, *event_shape]`` float32 (for a conditional VAE, ``(x, labels [n])``).
    validation: the same for the validation split, or ``None``.
    shown: the first 64 test images as data (levels scaled to [0, 1], not binarized),
      on the host: what pictures show as the inputs.
  """

  test: Array
  validation: Array | None
  shown: np.ndarray | None = None


def eval_data(
  config: ml_collections.ConfigDict, splits: Splits, sharding, likelihood=None
) -> EvalData:
  """The test (and validation) split of ``splits`` preprocessed and placed with ``sharding``.

  With ``likelihood`` (a ``likelihoods.Likelihood``), data outside the range it is
  defined for are refused, and what a reader of its numbers must know about this data
  (``Likelihood.caveat``) is logged.

  Raises:
    config.ConfigError: the preprocessed test split lies outside ``likelihood``'s range.
  """
  bits = config.data.bits
  test = eval_images(splits.test.images, config.binarization, bits=bits)
  if likelihood is not None:
    likelihood.check_data(float(test.min()), float(test.max()))
    caveat = likelihood.caveat(
      binarization=config.binarization, binary_data=config.dataset in datasets.BINARY_DATASETS
    )
    if caveat:
      logging.warning("%s", caveat)
  val = None
  if splits.validation is not None:
    val = jax.device_put(
      eval_images(splits.validation.images, config.binarization, VALIDATION_SEED, bits), sharding
    )
  shown = splits.test.images[:64].astype(np.float32) / (2**bits - 1)
  test = jax.device_put(test, sharding)
  if config.model.num_classes:  # A conditional VAE reads (x, labels).
    test = (test, jax.device_put(np.asarray(splits.test.labels, np.int32), sharding))
    if val is not None:
      val = (val, jax.device_put(np.asarray(splits.validation.labels, np.int32), sharding))
  return EvalData(test, val, shown)
