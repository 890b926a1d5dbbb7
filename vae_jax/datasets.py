"""Datasets: where each comes from, how it is prepared once, and how it is read back.

The path a dataset takes, with no TensorFlow needed anywhere (``input_pipeline`` then
feeds it to a run):

1. Find the four standard IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``):
   a local directory (``config.idx_dir`` or ``$VAE_JAX_IDX_DIR``), a known system
   location (Debian's ``dataset-fashion-mnist``), or a download from the
   canonical mirror when the machine is online. Offline with none of these,
   fail within seconds and say how to provide the files.
2. Prepare them once as a TFDS dataset in ArrayRecord format with this
   module's ``IdxImages`` builder (the catalog ``mnist`` builders import
   TensorFlow to prepare, so they cannot be used here).
3. Read each split back through TFDS's random-access data source and decode it
   to a ``uint8`` numpy array once (cached beside the prepared files).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import socket
import struct
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from vae_jax import dsprites, files, locks
from vae_jax.errors import UserError

SPLITS = ("train", "test")
_IDX_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CONNECT_TIMEOUT_S = 5.0
_DOWNLOAD_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  description: str
  url: str  # Base URL of the four IDX files.
  # The published (size in bytes, SHA-256) of each file at ``url``, as TFDS
  # registers them (tensorflow_datasets/url_checksums/<name>.txt): a download is
  # used only if it matches.
  checksums: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
  system_dirs: tuple[str, ...] = ()  # Where an OS package installs them.
  install_hint: str = ""


DATASETS: dict[str, DatasetSpec] = {
  "mnist": DatasetSpec(
    name="mnist",
    description="MNIST handwritten digits (LeCun et al.), 60k/10k 28x28 grey.",
    url="https://storage.googleapis.com/cvdf-datasets/mnist/",
    checksums={
      "train-images-idx3-ubyte.gz": (
        9912422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
      ),
      "train-labels-idx1-ubyte.gz": (
        28881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
      ),
      "t10k-images-idx3-ubyte.gz": (
        1648877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
      ),
      "t10k-labels-idx1-ubyte.gz": (
        4542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
      ),
    },
  ),
  "fashion_mnist": DatasetSpec(
    name="fashion_mnist",
    description="Fashion-MNIST (Xiao et al. 2017), 60k/10k 28x28 grey.",
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    checksums={
      "train-images-idx3-ubyte.gz": (
        26421880,
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
      ),
      "train-labels-idx1-ubyte.gz": (
        29515,
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
      ),
      "t10k-images-idx3-ubyte.gz": (
        4422102,
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
      ),
      "t10k-labels-idx1-ubyte.gz": (
        5148,
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
      ),
    },
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    install_hint="On Debian/Ubuntu: `apt-get install dataset-fashion-mnist`.",
  ),
}


class DataError(UserError, RuntimeError):
  """A dataset cannot be found, fetched or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in host memory."""

  images: np.ndarray  # [n, height, width, channels] uint8
  labels: np.ndarray  # [n] int32

  @property
  def num_examples(self) -> int:
    return self.images.shape[0]


# --------------------------------------------------------------------------
# IDX files.


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads a (gzipped) IDX file of uint8 values into a numpy array.

  Raises:
    DataError: the file is missing, truncated or not an IDX uint8 file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"IDX file {path} does not exist.")
  try:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"Cannot read {path}: {e}. Replace it with an intact copy.") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DataError(f"{path} is not an IDX file (bad magic number). Replace it.")
  dtype_code, ndim = raw[2], raw[3]
  if dtype_code != 0x08:
    raise DataError(f"{path} holds IDX type {dtype_code:#x}; only uint8 (0x08) is supported.")
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise DataError(f"{path} is truncated inside its header. Replace it.")
  shape = struct.unpack(f">{ndim}I", raw[4:header_len])
  expected = header_len + int(np.prod(shape))
  if len(raw) != expected:
    raise DataError(
      f"{path} has {len(raw)} bytes but its header {shape} needs {expected}: the file "
      "is truncated or corrupt. Replace it."
    )
  return np.frombuffer(raw, np.uint8, offset=header_len).reshape(shape)


def read_idx_split(idx_dir: str | os.PathLike, split: str) -> Split:
  """Reads one split's images and labels from a directory of IDX files."""
  images_file, labels_file = (pathlib.Path(idx_dir) / f for f in _IDX_FILES[split])
  images, labels = read_idx(images_file), read_idx(labels_file)
  if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise DataError(
      f"{images_file} {images.shape} and {labels_file} {labels.shape} do not form a "
      "dataset of [n, height, width] images with [n] labels."
    )
  return Split(images=images[..., None], labels=labels.astype(np.int32))


def missing_idx_files(idx_dir: str | os.PathLike) -> list[str]:
  return [
    f for files in _IDX_FILES.values() for f in files if not (pathlib.Path(idx_dir) / f).is_file()
  ]


# --------------------------------------------------------------------------
# The TFDS builder.


class IdxImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Any of ``DATASETS`` prepared from its IDX files (found in ``manual_dir``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=spec.name, description=spec.description)
    for spec in DATASETS.values()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A directory with the four standard IDX .gz files."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 1)),
          "label": tfds.features.Scalar(np.int32),
        }
      ),
      supervised_keys=("image", "label"),
      # Keep the files' canonical order (test image i is the papers' test image i).
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {split: self._generate_examples(dl_manager.manual_dir, split) for split in SPLITS}

  def _generate_examples(self, idx_dir, split):
    data = read_idx_split(idx_dir, split)
    for i in range(data.num_examples):
      # TFDS encodes numpy images with TensorFlow but PIL images with Pillow.
      image = Image.fromarray(data.images[i, :, :, 0], mode="L")
      yield i, {"image": image, "label": data.labels[i]}


# --------------------------------------------------------------------------
# dSprites (Matthey et al. 2017): 64x64 binary sprites with five ground-truth factors.

# name -> (grid, source): "published" is DeepMind's npz (verified before use),
# "rendered" the offline generator of vae_jax.dsprites (the same factor grid, not
# byte-identical images; documented there).
DSPRITES: dict[str, tuple[dsprites.Grid, str]] = {
  "dsprites": (dsprites.FULL, "published"),
  "dsprites_rendered": (dsprites.FULL, "rendered"),
  "dsprites_cpu": (dsprites.CPU, "rendered"),
  "dsprites_smoke": (dsprites.SMOKE, "rendered"),
}
# Datasets whose images are binary already (any binarization leaves them as they are).
BINARY_DATASETS = frozenset(DSPRITES)

# What each label means, for legends (index = label; dSprites: its shape factor).
_FASHION_MNIST_CLASSES = (
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CLASS_NAMES: dict[str, tuple[str, ...]] = {
  "mnist": tuple(str(d) for d in range(10)),
  "fashion_mnist": _FASHION_MNIST_CLASSES,
  **{name: dsprites.SHAPE_NAMES for name in DSPRITES},
}


def class_names(name: str, num_classes: int = 10) -> tuple[str, ...]:
  """Names of dataset ``name``'s labels; their indices as strings where none are known."""
  return CLASS_NAMES.get(name, tuple(str(i) for i in range(num_classes)))


def factor_grid(name: str) -> dsprites.Grid | None:
  """The ground-truth factor grid of dataset ``name`` (its train split enumerates it in
  ``dsprites.index_to_factors`` order, labels ``[n, 5]``), or ``None`` without factors."""
  return DSPRITES[name][0] if name in DSPRITES else None


def dsprites_test_indices(num_images: int) -> np.ndarray:
  """The fixed test subset of a dSprites grid: ``min(10000, n // 10)`` images, sorted.

  dSprites has no test split; models train on every image (as disentanglement_lib
  does) and the test ELBO is monitored on this fixed subset of them.
  """
  rng = np.random.default_rng(0)
  return np.sort(rng.choice(num_images, min(10000, num_images // 10), replace=False))


class DspritesImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """dSprites as a TFDS dataset: ``image`` ``[64, 64, 1]`` uint8 in {0, 255}, ``factors`` [5]."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=name, description=f"dSprites, {source}, {grid.num_images} images")
    for name, (grid, source) in DSPRITES.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"A directory holding {dsprites.PUBLISHED_FILENAME}."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(64, 64, 1)),
          "factors": tfds.features.Tensor(shape=(5,), dtype=np.int32),
        }
      ),
      disable_shuffling=True,  # Row i of train is index_to_factors(i): keep the order.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    grid, source = DSPRITES[self.builder_config.name]
    if source == "published":
      images, factors = dsprites.load_published(
        str(pathlib.Path(dl_manager.manual_dir) / dsprites.PUBLISHED_FILENAME)
      )
    else:
      images, factors = None, dsprites.index_to_factors(np.arange(grid.num_images), grid)
    test = dsprites_test_indices(grid.num_images)
    return {
      "train": self._generate_examples(grid, images, factors, np.arange(grid.num_images)),
      "test": self._generate_examples(grid, images, factors, test),
    }

  def _generate_examples(self, grid, images, factors, indices):
    for start in range(0, len(indices), 4096):
      block = indices[start : start + 4096]
      pixels = images[block] if images is not None else dsprites.render(factors[block], grid)
      for j, i in enumerate(block):
        image = Image.fromarray(pixels[j, :, :, 0] * np.uint8(255), mode="L")
        yield int(i), {"image": image, "factors": factors[i].astype(np.int32)}


def _dsprites_source(name: str, idx_dir: str | None, download_dir: pathlib.Path) -> str:
  """The directory holding the published npz (given, found, or downloaded and verified)."""
  if DSPRITES[name][1] == "rendered":
    return str(download_dir)  # Unused: rendered images need no file.
  for candidate in (_given_idx_dir(idx_dir), str(download_dir)):
    if candidate and (pathlib.Path(candidate) / dsprites.PUBLISHED_FILENAME).is_file():
      return candidate
  if not _online(dsprites.PUBLISHED_URL):
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

  _fetch_verified(
    dsprites.PUBLISHED_URL,
    download_dir / dsprites.PUBLISHED_FILENAME,
    verify,
    lambda e: f"Downloading {dsprites.PUBLISHED_URL} failed: {e}.",
  )
  return str(download_dir)


# --------------------------------------------------------------------------
# Finding and fetching the IDX files.


def _default_data_dir() -> pathlib.Path:
  return files.expand(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _online(url: str, timeout_s: float = _CONNECT_TIMEOUT_S) -> bool:
  """Whether ``url``'s host accepts a TCP connection within ``timeout_s``.

  Name resolution cannot be given a timeout, and on a machine without DNS it
  retries for minutes; it runs in a daemon thread that is abandoned on time-out.
  """
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  result = []

  def probe():
    try:
      socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return bool(result)


def _download(spec: DatasetSpec, url: str, dest: pathlib.Path) -> None:
  if not _online(url):
    raise DataError(_offline_message(spec, f"{url} cannot be reached"))
  dest.mkdir(parents=True, exist_ok=True)
  for names in _IDX_FILES.values():
    for name in names:
      target = dest / name
      if target.is_file():
        continue
      logging.info("Downloading %s%s", url, name)
      _fetch_verified(
        url + name,
        target,
        lambda path, name=name: _verify_download(spec, name, path, url + name),
        lambda e, name=name: _offline_message(spec, f"downloading {url + name} failed: {e}"),
      )
      read_idx(target)  # Fail now, naming the file, if the download is not IDX.


def _fetch_verified(
  url: str,
  target: pathlib.Path,
  verify: Callable[[pathlib.Path], None],
  failure_message: Callable[[Exception], str],
) -> None:
  """Downloads ``url`` to ``target`` through a temporary file beside it, kept only
  once ``verify(path)`` returns: an interrupted or wrong download never leaves a
  file that looks complete, nor a temporary one behind.

  Raises:
    DataError: the download failed (``failure_message(error)``), or ``verify``'s.
  """
  with files.atomic_path(target) as tmp:
    try:
      with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError) as e:
      raise DataError(failure_message(e)) from e
    verify(tmp)


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _verify_download(spec: DatasetSpec, name: str, path: pathlib.Path, url: str) -> None:
  """Keeps a download only if its size and SHA-256 are the published ones.

  Raises:
    DataError: they differ (the file is deleted), naming the URL and both digests.
  """
  if name not in spec.checksums:
    raise DataError(f"No published checksum is known for {url}; refusing to use it.")
  size, digest = spec.checksums[name]
  got_size, got = path.stat().st_size, _sha256(path)
  if (got_size, got) != (size, digest):
    path.unlink()
    raise DataError(
      f"The download of {url} is not the published file: {got_size} bytes with SHA-256 "
      f"{got}, expected {size} bytes with {digest}. It was deleted; check the network (a "
      "proxy or captive portal?) and run again, or provide the files with --config.idx_dir."
    )


def _offline_message(spec: DatasetSpec, reason: str) -> str:
  names = ", ".join(f for fs in _IDX_FILES.values() for f in fs)
  hint = f"\n  {spec.install_hint}" if spec.install_hint else ""
  return (
    f"Dataset {spec.name!r} is not prepared and {reason}.\n"
    f"Provide the four IDX files ({names}) in a directory, then either\n"
    f"  pass --config.idx_dir=/path/to/dir, or\n"
    f"  export VAE_JAX_IDX_DIR=/path/to/dir.{hint}\n"
    f"They are published at {spec.url}."
  )


def _given_idx_dir(idx_dir: str | None) -> str | None:
  """The directory of source files the user named: ``idx_dir`` (``config.idx_dir``), else
  ``$VAE_JAX_IDX_DIR``, ``~`` expanded; ``None`` if neither is set."""
  given = idx_dir or os.environ.get("VAE_JAX_IDX_DIR")
  return str(files.expand(given)) if given else None


def _find_idx_dir(spec: DatasetSpec, idx_dir: str | None, download_dir: pathlib.Path) -> str:
  """Returns a directory holding all four IDX files, downloading if needed."""
  explicit = _given_idx_dir(idx_dir)
  if explicit:
    missing = missing_idx_files(explicit)
    if missing:
      raise DataError(
        f"The IDX directory {explicit} (from "
        f"{'config.idx_dir' if idx_dir else '$VAE_JAX_IDX_DIR'}) lacks {', '.join(missing)}. "
        f"Put the four standard files of {spec.name!r} there."
      )
    return explicit
  for candidate in (*spec.system_dirs, str(download_dir)):
    if not missing_idx_files(candidate):
      return candidate
  _download(spec, spec.url, download_dir)
  return str(download_dir)


# --------------------------------------------------------------------------
# Loading.


def load(
  name: str,
  data_dir: str | None = None,
  idx_dir: str | None = None,
) -> dict[str, Split]:
  """Returns ``{"train": Split, "test": Split}`` for dataset ``name``.

  Prepares the TFDS dataset on first use (from local IDX files, or from a
  download when online) and reads it back through ``tfds`` data sources.

  Args:
    name: a key of ``DATASETS`` (``"mnist"``, ``"fashion_mnist"``).
    data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    idx_dir: directory of the four IDX files to prepare from (default:
      ``$VAE_JAX_IDX_DIR``, then the dataset's system location, then a download).

  Raises:
    DataError: unknown name, missing or malformed files, or offline without data.
  """
  if name not in DATASETS and name not in DSPRITES:
    raise DataError(
      f"Unknown dataset {name!r}. Choose one of {sorted(DATASETS) + sorted(DSPRITES)}."
    )
  data_dir = files.expand(data_dir) if data_dir else _default_data_dir()
  if name in DSPRITES:
    return _load_dsprites(name, data_dir, idx_dir)
  spec = DATASETS[name]
  explicit = _given_idx_dir(idx_dir)
  lock = data_dir / f".vae_jax_{name}.lock"
  # Processes sharing a data directory take turns: the first prepares, the others
  # wait and then read what it prepared (the builder reads its state once the lock is held).
  with locks.exclusive(lock, wait=True, what=f"the {name!r} data in {data_dir}"):
    builder = IdxImages(config=name, data_dir=str(data_dir), file_format="array_record")
    record = pathlib.Path(builder.data_dir) / SOURCE_RECORD
    if not builder.is_prepared():
      source = _find_idx_dir(spec, idx_dir, data_dir / "downloads" / "vae_jax" / name)
      logging.info("Preparing %s from %s into %s", name, source, builder.data_dir)
      builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=source),
      )
      files.atomic_write(record, json.dumps(source_fingerprint(source), indent=1) + "\n")
    elif explicit:
      _check_source(name, builder, record, explicit)
    splits = {split: _load_split(builder, split) for split in SPLITS}
    if explicit and not record.exists():
      # Prepared by an older version, which kept no record: compare the contents once.
      for split, data in splits.items():
        source = read_idx_split(explicit, split)
        if not (
          np.array_equal(source.images, data.images) and np.array_equal(source.labels, data.labels)
        ):
          raise DataError(
            f"{builder.data_dir} holds {name!r} prepared from other files than those in "
            f"{explicit} ({split} split differs). Use another --config.data_dir for these "
            f"files, or delete {builder.data_dir} to prepare it from them."
          )
      files.atomic_write(record, json.dumps(source_fingerprint(explicit), indent=1) + "\n")
    return splits


def _load_dsprites(name: str, data_dir: pathlib.Path, idx_dir: str | None) -> dict[str, Split]:
  lock = data_dir / f".vae_jax_{name}.lock"
  with locks.exclusive(lock, wait=True, what=f"the {name!r} data in {data_dir}"):
    builder = DspritesImages(config=name, data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
      source = _dsprites_source(name, idx_dir, data_dir / "downloads" / "vae_jax" / "dsprites")
      logging.info("Preparing %s into %s", name, builder.data_dir)
      builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=source),
      )
    return {split: _load_split(builder, split) for split in SPLITS}


# Beside the prepared files: where they were prepared from, and what those files held.
SOURCE_RECORD = "vae_jax_source.json"


def source_fingerprint(idx_dir: str | os.PathLike) -> dict:
  """``{"idx_dir", "sha256": {file: digest of its decompressed bytes}}`` of the four IDX files.

  Decompressed, so the same data recompressed (Debian rewrites the gzip headers)
  has the same fingerprint.
  """
  digests = {}
  for names in _IDX_FILES.values():
    for f in names:
      path = pathlib.Path(idx_dir) / f
      opener = gzip.open if path.suffix == ".gz" else open
      with opener(path, "rb") as stream:
        digests[f] = hashlib.file_digest(stream, "sha256").hexdigest()
  return {"idx_dir": str(pathlib.Path(idx_dir).resolve()), "sha256": digests}


def _check_source(name: str, builder: IdxImages, record: pathlib.Path, idx_dir: str) -> None:
  """Refuses prepared data that came from other files than ``idx_dir``'s.

  Raises:
    DataError: the fingerprints differ, or ``idx_dir`` lacks files.
  """
  missing = missing_idx_files(idx_dir)
  if missing:
    raise DataError(f"The IDX directory {idx_dir} lacks {', '.join(missing)}.")
  if not record.exists():
    return  # Checked against the decoded contents by the caller.
  wanted = source_fingerprint(idx_dir)
  try:
    prepared = json.loads(record.read_text())
  except (OSError, ValueError):
    prepared = {"idx_dir": "an unreadable record"}
  if prepared.get("sha256") != wanted["sha256"]:
    origin = prepared.get("idx_dir")
    raise DataError(
      f"{builder.data_dir} holds {name!r} prepared from {origin}, not from the files in "
      f"{idx_dir}. Use another --config.data_dir for these files, or delete "
      f"{builder.data_dir} to prepare it from them."
    )


def _load_split(builder: tfds.core.DatasetBuilder, split: str) -> Split:
  """Decodes a split through its TFDS data source, caching the arrays.

  PNG decoding runs at a few thousand images/s, so the decoded arrays are
  kept as ``.npz`` beside the prepared files and reused while they match the
  split's size. Delete the file to force a fresh decode.
  """
  cache = pathlib.Path(builder.data_dir) / f"decoded-{split}.npz"
  num_examples = builder.info.splits[split].num_examples
  if cache.is_file():
    try:
      with np.load(cache) as f:  # Reading a member checks its CRC-32.
        data = Split(images=f["images"], labels=f["labels"])
      if data.num_examples == num_examples == data.labels.shape[0]:
        return data
    except Exception as e:  # noqa: BLE001 - truncated, bit-flipped, not a zip: rebuild.
      logging.warning("The cache %s is damaged (%s: %s).", cache, type(e).__name__, e)
    logging.warning("Ignoring unreadable or stale cache %s; decoding again.", cache)
  try:
    data = _decode_all(builder.as_data_source(split))
  except Exception as e:  # noqa: BLE001 - ArrayRecord and PNG errors of many kinds.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(
      f"The prepared {split} split in {builder.data_dir} cannot be read ({first}). The "
      f"files are damaged: delete {builder.data_dir} and run again to prepare them anew."
    ) from e
  if data.num_examples != num_examples:
    raise DataError(
      f"The prepared {split} split in {builder.data_dir} holds {data.num_examples} examples "
      f"where its metadata says {num_examples}: delete {builder.data_dir} and run again."
    )
  with files.reporting(cache, then="run again"), files.atomic_path(cache) as tmp:
    np.savez(tmp, images=data.images, labels=data.labels)
  return data


def _decode_all(source) -> Split:
  """Every record of a data source: ``image`` and its ``label`` (a class) or ``factors``."""
  n = len(source)
  images = labels = None
  chunk = 1024
  for start in range(0, n, chunk):
    records = source.__getitems__(range(start, min(start + chunk, n)))
    for i, record in enumerate(records, start):
      label = record["factors"] if "factors" in record else record["label"]
      if images is None:
        images = np.empty((n, *record["image"].shape), np.uint8)
        labels = np.empty((n, *np.shape(label)), np.int32)
      images[i] = record["image"]
      labels[i] = label
  return Split(images=images, labels=labels)
