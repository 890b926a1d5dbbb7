"""Datasets by name: where each comes from, how it is prepared once, and how it is read back.

``config.dataset`` names either a dataset vae_jax prepares itself, without TensorFlow
(``vae_jax.builders``: ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeba``, ``photos``
and the dSprites grids), or any image dataset of the TFDS catalog as ``tfds:<name>``
(``tfds:cifar10``, ``tfds:celeb_a``, ``tfds:svhn_cropped``,
``tfds:downsampled_imagenet/32x32``), prepared beforehand in ArrayRecord format.

The path a dataset takes (``input_pipeline`` then feeds it to a run):

1. Its published files are found or downloaded and verified (``vae_jax.downloads``).
2. It is prepared once as a TFDS dataset in ArrayRecord format in the TFDS data
   directory (``config.data_dir``, else ``$TFDS_DATA_DIR``, else
   ``~/tensorflow_datasets``), by vae_jax's own builder. Processes sharing a data
   directory take turns: the first prepares, the others wait and read what it wrote.
   Beside the prepared files, ``vae_jax_source.json`` records a fingerprint of the files
   they came from, so other files given later are refused rather than mixed.
3. ``Source`` reads it back through ``tfds.data_source``: random access to decoded
   records, with the images shaped as the run asks (``ImageFormat``: a centre crop, a
   resize, the channels, the bit depth). A split read whole is cached, decoded and
   shaped, as ``.npz`` beside the prepared files (PNG decoding runs at a few thousand
   images per second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module
from PIL import Image

from vae_jax import builders, downloads, dsprites, files, locks
from vae_jax.downloads import DataError

__all__ = ["DataError"]

# Beside the prepared files: where they were prepared from, and what those files held.
SOURCE_RECORD = "vae_jax_source.json"
TFDS_PREFIX = "tfds:"
# The stream file's ArrayRecord options (``Source.stream_file``).
STREAM_WRITER_OPTIONS = "group_size:1,uncompressed"


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in host memory."""

  images: np.ndarray  # [n, height, width, channels] uint8
  labels: np.ndarray  # [n] int32 classes, or [n, k] (dSprites' factors, CelebA's attributes)

  @property
  def num_examples(self) -> int:
    return self.images.shape[0]


# --------------------------------------------------------------------------
# The datasets vae_jax prepares itself.


@dataclasses.dataclass(frozen=True)
class Entry:
  """How a built-in dataset is had.

  Attributes:
    builder: its TFDS builder (``vae_jax.builders``) and the builder config's name.
    files: the published files it is prepared from (none: generated).
    system_dirs: where an operating-system package installs the files.
    instructions: how to get the files by hand.
    verify_local: check local copies against the published sizes and SHA-256 too.
    splits: its split names.
    label: the record's label feature (``None``: none).
    class_names: what each label means, for legends.
  """

  builder: tuple[type[tfds.core.GeneratorBasedBuilder], str]
  files: tuple[downloads.PublishedFile, ...] = ()
  system_dirs: tuple[str, ...] = ()
  instructions: str = ""
  verify_local: bool = False
  splits: tuple[str, ...] = ("train", "test")
  label: str | None = "label"
  class_names: tuple[str, ...] | None = None


_FASHION_MNIST_CLASSES = (
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DSPRITES = builders.DSPRITES
BUILT_IN: dict[str, Entry] = {
  "mnist": Entry(
    (builders.IdxImages, "mnist"), builders.MNIST_FILES, class_names=tuple("0123456789")
  ),
  "fashion_mnist": Entry(
    (builders.IdxImages, "fashion_mnist"),
    builders.FASHION_MNIST_FILES,
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    instructions="On Debian/Ubuntu: `apt-get install dataset-fashion-mnist`.",
    class_names=_FASHION_MNIST_CLASSES,
  ),
  "cifar10": Entry(
    (builders.Cifar10Images, "cifar10"),
    builders.CIFAR10_FILES,
    instructions=builders.CIFAR10_INSTRUCTIONS,
    verify_local=True,
    class_names=builders.CIFAR10_CLASSES,
  ),
  "celeba": Entry(
    (builders.CelebaImages, "celeba"),
    builders.CELEBA_FILES,
    instructions=builders.CELEBA_INSTRUCTIONS,
    verify_local=True,
    splits=("train", "validation", "test"),
    label="attributes",
  ),
  "photos": Entry((builders.PhotoPatches, "photos"), class_names=builders.PHOTO_NAMES),
  **{
    name: Entry((builders.DspritesImages, name), label="factors", class_names=dsprites.SHAPE_NAMES)
    for name in DSPRITES
  },
}
# Datasets whose images are binary already (any binarization leaves them as they are).
BINARY_DATASETS = frozenset(DSPRITES)
dsprites_test_indices = builders.dsprites_test_indices


def class_names(name: str, num_classes: int = 10) -> tuple[str, ...]:
  """Names of dataset ``name``'s labels (dSprites: its shape factor); their indices as
  strings where none are known."""
  entry = BUILT_IN.get(name)
  if entry is not None and entry.class_names:
    return entry.class_names
  return tuple(str(i) for i in range(num_classes))


def factor_grid(name: str) -> dsprites.Grid | None:
  """The ground-truth factor grid of dataset ``name`` (its train split enumerates it in
  ``dsprites.index_to_factors`` order, labels ``[n, 5]``), or ``None`` without factors."""
  return DSPRITES[name][0] if name in DSPRITES else None


def check_name(name: str) -> None:
  """Raises ``DataError`` unless ``name`` is a built-in dataset or ``tfds:<name>``."""
  if name in BUILT_IN or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)):
    return
  raise DataError(
    f"Unknown dataset {name!r}. Choose one of {sorted(BUILT_IN)}, or a TFDS image dataset "
    "as 'tfds:<name>' (e.g. 'tfds:svhn_cropped'), prepared in ArrayRecord format."
  )


# --------------------------------------------------------------------------
# How the images are shaped for a run.


@dataclasses.dataclass(frozen=True)
class ImageFormat:
  """How a dataset's images are shaped for a run, on the host, as they are read.

  Attributes:
    crop: ``(h, w)`` of a centre crop, before resizing (``None``: none). CelebA's 64x64
      of the beta-VAE papers is ``crop=(140, 140)``, ``resize=(64, 64)``.
    resize: ``(h, w)`` to resize to, with Pillow's antialiased bilinear filter.
    channels: 1 (grey, ITU-R 601 luma) or 3 (RGB; grey repeated); ``None``: as stored.
    bits: the bit depth kept: levels ``0 .. 2**bits - 1`` (8: the data as published;
      5: the 5-bit images of some CelebA-HQ papers, ``pixel >> 3``).
  """

  crop: tuple[int, int] | None = None
  resize: tuple[int, int] | None = None
  channels: int | None = None
  bits: int = 8

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ImageFormat:
    d = config.data
    return cls(
      crop=tuple(d.crop) if d.crop is not None else None,
      resize=tuple(d.resize) if d.resize is not None else None,
      channels=d.channels,
      bits=d.bits,
    )

  @property
  def identity(self) -> bool:
    return self == ImageFormat()

  def key(self) -> str:
    """A short name of the format for cache files (``""`` for the identity)."""
    if self.identity:
      return ""
    parts = [
      f"crop{self.crop[0]}x{self.crop[1]}" if self.crop else "",
      f"resize{self.resize[0]}x{self.resize[1]}" if self.resize else "",
      f"c{self.channels}" if self.channels else "",
      f"b{self.bits}" if self.bits != 8 else "",
    ]
    return "-" + "-".join(p for p in parts if p)

  def shape(self, stored: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shape of an image stored as ``stored`` after this format."""
    h, w, c = stored
    if self.crop:
      h, w = self.crop
    if self.resize:
      h, w = self.resize
    return h, w, self.channels or c

  def apply(self, images: np.ndarray) -> np.ndarray:
    """``[n, h, w, c]`` uint8 as stored -> ``[n, *shape]`` uint8 levels of this format.

    Raises:
      DataError: the crop is larger than the images.
    """
    if self.identity:
      return images
    n, h, w, c = images.shape
    if self.crop:
      ch, cw = self.crop
      if ch > h or cw > w:
        raise DataError(
          f"config.data.crop={self.crop} is larger than the images ({h}x{w}); make it smaller."
        )
      top, left = (h - ch) // 2, (w - cw) // 2
      images = images[:, top : top + ch, left : left + cw]
    if self.resize or (self.channels and self.channels != c):
      out_h, out_w, out_c = self.shape((h, w, c))
      out = np.empty((n, out_h, out_w, out_c), np.uint8)
      for i in range(n):
        image = Image.fromarray(images[i, :, :, 0] if images.shape[-1] == 1 else images[i])
        if self.channels:
          image = image.convert("L" if self.channels == 1 else "RGB")
        if self.resize:
          image = image.resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=None)
        array = np.asarray(image)
        out[i] = array[..., None] if array.ndim == 2 else array
      images = out
    if self.bits != 8:
      images = images >> (8 - self.bits)
    return np.ascontiguousarray(images)


# --------------------------------------------------------------------------
# A prepared dataset, read back.


@dataclasses.dataclass
class Source:
  """A prepared dataset, readable split by split.

  Attributes:
    name: ``config.dataset``.
    builder: the prepared TFDS builder.
    image_key: the record's image feature.
    label_key: its label feature (classes, factors or attributes), or ``None``.
    fmt: how its images are shaped for the run.
    class_names: what each class label means, if known.
  """

  name: str
  builder: tfds.core.DatasetBuilder
  image_key: str
  label_key: str | None
  fmt: ImageFormat = ImageFormat()
  class_names: tuple[str, ...] | None = None
  _sources: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.builder.info.splits)

  def num_examples(self, split: str) -> int:
    self._check_split(split)
    return self.builder.info.splits[split].num_examples

  def _check_split(self, split: str) -> None:
    if split not in self.builder.info.splits:
      raise DataError(
        f"Dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}. Set "
        "config.data.train_split, test_split or validation_split to one of them."
      )

  @property
  def cache_dir(self) -> pathlib.Path:
    """Where decoded copies of the splits are kept: beside the prepared files, or, where
    those are read-only (a shared data directory), ``~/.cache/vae_jax/decoded/<dataset>/<version>``
    (``tfds:a/b`` as ``tfds_a_b``)."""
    prepared = pathlib.Path(self.builder.data_dir)
    if os.access(prepared, os.W_OK):
      return prepared
    name = self.name.replace(":", "_").replace("/", "_")
    own = files.expand("~/.cache/vae_jax/decoded") / name / prepared.name
    with files.reporting(own, then="run again"):
      own.mkdir(parents=True, exist_ok=True)
    return own

  def data_source(self, split: str):
    """The split's random-access source of decoded records (``tfds.data_source``)."""
    self._check_split(split)
    if split not in self._sources:
      self._sources[split] = self.builder.as_data_source(split)
    return self._sources[split]

  @property
  def stored_shape(self) -> tuple[int, int, int]:
    """The shape of one image as stored (from the metadata, else from the first record)."""
    shape = self.builder.info.features[self.image_key].shape
    if None in shape:
      first = self.data_source(next(iter(self.splits)))[0]
      shape = np.shape(first[self.image_key])
    return tuple(int(d) for d in shape)

  @property
  def event_shape(self) -> tuple[int, int, int]:
    """The shape of one image as the run sees it (after ``fmt``)."""
    return self.fmt.shape(self.stored_shape)

  def read(self, split: str, indices: Sequence[int]) -> Split:
    """Examples ``indices`` of ``split``, decoded and shaped: a ``Split`` of ``len(indices)``."""
    records = self.data_source(split).__getitems__([int(i) for i in indices])
    return self._to_split(records)

  def _to_split(self, records) -> Split:
    images = np.stack([np.asarray(r[self.image_key], np.uint8) for r in records])
    if images.ndim == 3:
      images = images[..., None]
    if self.label_key is None:
      labels = np.zeros((len(records),), np.int32)
    else:
      labels = np.stack([np.asarray(r[self.label_key], np.int32) for r in records])
    return Split(images=self.fmt.apply(images), labels=labels)

  def load(self, split: str, chunk: int = 1024) -> Split:
    """All of ``split``, decoded and shaped, read once and then from a cache beside the
    prepared files (``decoded-<split><format>.npz``, verified by its CRC-32 when read).

    Raises:
      DataError: the prepared files cannot be read.
    """
    num_examples = self.num_examples(split)
    cache = self.cache_dir / f"decoded-{split}{self.fmt.key()}.npz"
    if cache.is_file():
      try:
        with np.load(cache) as f:  # Reading a member checks its CRC-32.
          data = Split(images=f["images"], labels=f["labels"])
        if data.num_examples == num_examples == data.labels.shape[0]:
          return data
      except Exception as e:  # noqa: BLE001 - truncated, bit-flipped, not a zip: rebuild.
        logging.warning("The cache %s is damaged (%s: %s).", cache, type(e).__name__, e)
      logging.warning("Ignoring unreadable or stale cache %s; decoding again.", cache)
    parts = [
      self._read_checked(split, range(start, min(start + chunk, num_examples)))
      for start in range(0, num_examples, chunk)
    ]
    data = Split(
      images=np.concatenate([p.images for p in parts]),
      labels=np.concatenate([p.labels for p in parts]),
    )
    if data.num_examples != num_examples:
      raise DataError(
        f"The prepared {split} split in {self.builder.data_dir} holds {data.num_examples} "
        f"examples where its metadata says {num_examples}: delete {self.builder.data_dir} and "
        "run again."
      )
    with files.reporting(cache, then="run again"), files.atomic_path(cache) as tmp:
      np.savez(tmp, images=data.images, labels=data.labels)
    return data

  def stream_file(self, split: str, chunk: int = 1024) -> pathlib.Path:
    """An ArrayRecord file of ``split``'s images decoded and shaped, one record of raw
    uint8 pixels (``event_shape``, C order) per example in the split's order, for the
    streamed feed: made once beside the prepared files
    (``decoded-<split><format>.array_record``) and reused while it holds one record of the
    right size per example.

    A stream reads each batch's images at random; decoding PNG or JPEG there runs at about
    12,000 28x28 images per second per core, far below what a small model trains at, while
    these records (uncompressed, one per chunk) read at about 200,000 per second per core.
    The file is written ``chunk`` images at a time, so memory does not grow with the split.

    Raises:
      DataError: the prepared files cannot be read.
    """
    num_examples = self.num_examples(split)
    directory = self.cache_dir
    path = directory / f"decoded-{split}{self.fmt.key()}.array_record"
    size = math.prod(self.event_shape)
    with locks.exclusive(directory / ".vae_jax_decoded.lock", wait=True, what=f"{path}"):
      if _whole_records(path, num_examples, size):
        return path
      if path.exists():
        logging.warning("Ignoring unreadable or stale %s; decoding again.", path)
      logging.info(
        "Decoding the %s split of %s (%d images) once for streaming, into %s",
        split, self.name, num_examples, path,
      )  # fmt: skip
      with files.reporting(path, then="run again"), files.atomic_path(path) as tmp:
        # One record per chunk, uncompressed: a random read decodes nothing (zstd's
        # decompression halved the records read per second).
        writer = array_record_module.ArrayRecordWriter(str(tmp), STREAM_WRITER_OPTIONS)
        try:
          for start in range(0, num_examples, chunk):
            part = self._read_checked(split, range(start, min(start + chunk, num_examples)))
            for image in part.images:
              writer.write(image.tobytes())
        finally:
          writer.close()
    return path

  def _read_checked(self, split: str, indices: Sequence[int]) -> Split:
    """``read``, with the prepared files' failures as one ``DataError`` naming what to do."""
    try:
      return self.read(split, indices)
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 - ArrayRecord and PNG errors of many kinds.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DataError(
        f"The prepared {split} split in {self.builder.data_dir} cannot be read ({first}). The "
        f"files are damaged: delete {self.builder.data_dir} and run again to prepare them anew."
      ) from e


def _whole_records(path: pathlib.Path, num_records: int, size: int) -> bool:
  """Whether ``path`` is an ArrayRecord file of ``num_records`` records of ``size`` bytes
  (its first and last checked)."""
  if not path.is_file():
    return False
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
      n = reader.num_records()
      ends = reader.read([0, n - 1]) if n else []
    finally:
      reader.close()
  except Exception:  # noqa: BLE001 - truncated or not an ArrayRecord file: rebuild.
    return False
  return n == num_records and all(len(r) == size for r in ends)


# --------------------------------------------------------------------------
# Opening a dataset by name.


def default_data_dir() -> pathlib.Path:
  return files.expand(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def open_source(
  name: str,
  data_dir: str | None = None,
  idx_dir: str | None = None,
  fmt: ImageFormat = ImageFormat(),
  image_feature: str | None = None,
) -> Source:
  """Dataset ``name``, prepared if it is not yet (built-in ones), ready to read.

  Args:
    name: a key of ``BUILT_IN``, or ``tfds:<name>`` of the TFDS catalog.
    data_dir: the TFDS data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    idx_dir: a directory of the published files to prepare from (default:
      ``$VAE_JAX_IDX_DIR``, then where the system installs them, then a download).
    fmt: how the images are shaped for the run.
    image_feature: a TFDS dataset's image feature, where it has more than one.

  Raises:
    DataError: an unknown name, missing or malformed files, offline without data, a TFDS
      dataset that is not prepared (or not in ArrayRecord format), or no image feature.
  """
  check_name(name)
  data_dir = files.expand(data_dir) if data_dir else default_data_dir()
  if name.startswith(TFDS_PREFIX):
    return _open_catalog(name.removeprefix(TFDS_PREFIX), data_dir, fmt, image_feature)
  entry = BUILT_IN[name]
  builder_cls, config_name = entry.builder
  lock = data_dir / f".vae_jax_{name}.lock"
  # Processes sharing a data directory take turns: the first prepares, the others
  # wait and then read what it prepared (the builder reads its state once the lock is held).
  with locks.exclusive(lock, wait=True, what=f"the {name!r} data in {data_dir}"):
    builder = builder_cls(config=config_name, data_dir=str(data_dir), file_format="array_record")
    record = pathlib.Path(builder.data_dir) / SOURCE_RECORD
    explicit = downloads.given_dir(idx_dir) if entry.files else None
    if not builder.is_prepared():
      source = _find_files(name, entry, idx_dir, data_dir)
      logging.info("Preparing %s from %s into %s", name, source, builder.data_dir)
      with _no_progress_bar():
        builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=str(source)),
        )
      if entry.files:
        fingerprint = source_fingerprint(source, entry.files)
        files.atomic_write(record, json.dumps(fingerprint, indent=1) + "\n")
    elif explicit:
      _check_source(name, entry, builder, record, explicit)
    source = Source(name, builder, "image", entry.label, fmt, entry.class_names)
    if explicit and entry.builder[0] is builders.IdxImages and not record.exists():
      _check_unrecorded_idx(source, explicit, record)
    return source


@contextlib.contextmanager
def _no_progress_bar():
  """TFDS's progress bars off while a builder prepares (they garble a run's log)."""
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(True)


def _find_files(name: str, entry: Entry, idx_dir: str | None, data_dir: pathlib.Path):
  if not entry.files:  # Generated (rendered dSprites, the photographs).
    return data_dir / "downloads" / "vae_jax" / name
  if name == "dsprites":  # No SHA-256 of the npz is published: its own check (dsprites.py).
    return _dsprites_files(idx_dir, data_dir / "downloads" / "vae_jax" / "dsprites")
  return downloads.find(
    name,
    entry.files,
    idx_dir=idx_dir,
    download_dir=data_dir / "downloads" / "vae_jax" / name,
    system_dirs=entry.system_dirs,
    instructions=entry.instructions,
    verify_local=entry.verify_local,
  )


def _dsprites_files(idx_dir: str | None, download_dir: pathlib.Path) -> pathlib.Path:
  """The directory holding the published npz (given, found, or downloaded and verified)."""
  for candidate in (downloads.given_dir(idx_dir), str(download_dir)):
    if candidate and (pathlib.Path(candidate) / dsprites.PUBLISHED_FILENAME).is_file():
      return pathlib.Path(candidate)
  if not downloads.online(dsprites.PUBLISHED_URL):
    raise DataError(
      f"dSprites is not prepared and {dsprites.PUBLISHED_URL} cannot be reached. Put "
      f"{dsprites.PUBLISHED_FILENAME} in a directory and pass --config.idx_dir=DIR, or use "
      "the offline renderer: --config.dataset=dsprites_rendered (or dsprites_cpu)."
    )
  download_dir.mkdir(parents=True, exist_ok=True)

  def verify(path: pathlib.Path) -> None:
    try:
      dsprites.load_published(str(path))
    except ValueError as e:
      raise DataError(str(e)) from e

  downloads.fetch_verified(
    dsprites.PUBLISHED_URL,
    download_dir / dsprites.PUBLISHED_FILENAME,
    verify,
    lambda e: f"Downloading {dsprites.PUBLISHED_URL} failed: {e}.",
  )
  return download_dir


def source_fingerprint(directory: str | os.PathLike, published) -> dict:
  """``{"idx_dir", "sha256": {file: digest}}`` of the files a dataset was prepared from.

  A gzipped file's digest is of its decompressed bytes, so the same data recompressed
  (Debian rewrites the gzip headers) has the same fingerprint.
  """
  digests = {}
  for f in published:
    path = pathlib.Path(directory) / f.name
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
      digests[f.name] = hashlib.file_digest(stream, "sha256").hexdigest()
  return {"idx_dir": str(pathlib.Path(directory).resolve()), "sha256": digests}


def _check_source(name: str, entry: Entry, builder, record: pathlib.Path, directory: str) -> None:
  """Refuses prepared data that came from other files than ``directory``'s.

  Raises:
    DataError: the fingerprints differ, or ``directory`` lacks files.
  """
  missing = [f.name for f in entry.files if not (pathlib.Path(directory) / f.name).is_file()]
  if missing:
    raise DataError(f"The directory {directory} lacks {', '.join(missing)}.")
  if not record.exists():
    return  # Prepared by an older version: checked against the contents by the caller.
  wanted = source_fingerprint(directory, entry.files)
  try:
    prepared = json.loads(record.read_text())
  except (OSError, ValueError):
    prepared = {"idx_dir": "an unreadable record"}
  if prepared.get("sha256") != wanted["sha256"]:
    origin = prepared.get("idx_dir")
    raise DataError(
      f"{builder.data_dir} holds {name!r} prepared from {origin}, not from the files in "
      f"{directory}. Use another --config.data_dir for these files, or delete "
      f"{builder.data_dir} to prepare it from them."
    )


def _check_unrecorded_idx(source: Source, directory: str, record: pathlib.Path) -> None:
  """IDX data prepared by an older version, which kept no record: compare the contents
  once, then record the fingerprint."""
  for split in builders.IDX_FILES:
    images, labels = builders.read_idx_split(directory, split)
    data = source.load(split)
    if not (np.array_equal(images, data.images) and np.array_equal(labels, data.labels)):
      raise DataError(
        f"{source.builder.data_dir} holds {source.name!r} prepared from other files than those "
        f"in {directory} ({split} split differs). Use another --config.data_dir for these "
        f"files, or delete {source.builder.data_dir} to prepare it from them."
      )
  fingerprint = source_fingerprint(directory, BUILT_IN[source.name].files)
  files.atomic_write(record, json.dumps(fingerprint, indent=1) + "\n")


def _prepare_hint(name: str, data_dir: pathlib.Path) -> str:
  return (
    "Prepare it once in ArrayRecord format, where TensorFlow is installed (the catalog's "
    f"builders need it to prepare): `tfds build {name} --data_dir={data_dir} "
    "--file_format=array_record`, or in Python `tfds.builder(name, data_dir=...)"
    ".download_and_prepare(file_format='array_record')`. Then it reads without TensorFlow."
  )


def _open_catalog(
  name: str, data_dir: pathlib.Path, fmt: ImageFormat, image_feature: str | None
) -> Source:
  """A dataset of the TFDS catalog, prepared beforehand in ArrayRecord format."""
  try:
    builder = tfds.builder(name, data_dir=str(data_dir))
  except Exception as e:  # noqa: BLE001 - DatasetNotFoundError, bad config or version names.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"TFDS has no dataset {name!r} ({first}). Check the name.") from e
  if not builder.is_prepared():
    raise DataError(
      f"TFDS dataset {name!r} is not prepared in {data_dir}. {_prepare_hint(name, data_dir)}"
    )
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(
      f"TFDS dataset {name!r} in {builder.data_dir} is prepared as {file_format.value}, which "
      "is read only through TensorFlow. Convert it once where TensorFlow is installed: `tfds "
      f"convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record`"
      f", or prepare it again: {_prepare_hint(name, data_dir)}"
    )
  features = dict(builder.info.features.items())
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  if image_feature is not None:
    if image_feature not in images:
      raise DataError(
        f"config.data.image_feature={image_feature!r}, but the image features of {name!r} "
        f"are {images}."
      )
    key = image_feature
  elif len(images) == 1:
    key = images[0]
  else:
    raise DataError(
      f"TFDS dataset {name!r} has {len(images)} image features ({images}); name the one to "
      "use with config.data.image_feature."
    )
  label = features.get("label")
  class_names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else None
  label_key = (
    "label" if isinstance(label, tfds.features.ClassLabel | tfds.features.Scalar) else None
  )
  return Source(f"{TFDS_PREFIX}{name}", builder, key, label_key, fmt, class_names)


def from_config(config: ml_collections.ConfigDict) -> Source:
  """The dataset of ``config``, opened (and prepared, if built-in and not yet)."""
  return open_source(
    config.dataset,
    config.data_dir,
    config.idx_dir,
    ImageFormat.from_config(config),
    config.data.image_feature,
  )


def load(name: str, data_dir: str | None = None, idx_dir: str | None = None) -> dict[str, Split]:
  """``{split: Split}`` of every split of dataset ``name``, whole, in host memory.

  Raises:
    DataError: see ``open_source``.
  """
  source = open_source(name, data_dir, idx_dir)
  return {split: source.load(split) for split in source.splits}


def bytes_of(source: Source, split: str) -> int:
  """The size of ``split`` as uint8 images of the run's shape, in bytes."""
  return source.num_examples(split) * math.prod(source.event_shape)
