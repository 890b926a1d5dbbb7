"""vae_jax's own TFDS builders: each dataset prepared from its published files, without TensorFlow.

The catalog's builders for ``mnist``, ``fashion_mnist``, ``cifar10`` and ``celeb_a`` read
their files through TensorFlow (``tf.io.gfile``, ``tf.image``), so they cannot prepare a
dataset where TensorFlow is not installed. These builders read the same published files
with the standard library, NumPy and Pillow, and write the standard TFDS format
(ArrayRecord), which ``tfds.data_source`` then reads back, TensorFlow or not. Each is
registered under a name of its own (``skip_registration``), so it never shadows the
catalog's. ``vae_jax.datasets`` finds their files (``downloads.find``) and prepares them
once; the directory of the files is the builder's ``manual_dir``.

* ``IdxImages``: MNIST and Fashion-MNIST from the four standard IDX files.
* ``DspritesImages``: the dSprites factor grid, from the published npz or rendered offline.
* ``Cifar10Images``: CIFAR-10 from ``cifar-10-binary.tar.gz`` (records of a label byte
  and 3,072 pixel bytes: 1,024 red, then green, then blue, row-major 32x32).
* ``CelebaImages``: CelebA's aligned 218x178 faces from ``img_align_celeba.zip``, the
  official train/validation/test partition and the 40 binary attributes.
* ``PhotoPatches``: 32x32 patches of the two colour photographs scikit-learn ships, real
  colour images that need no download, for tests and seconds-long colour runs.

Every builder keeps the files' order (``disable_shuffling``): example ``i`` of a split is
the ``i``-th of the published files.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import struct
import tarfile
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from vae_jax import dsprites
from vae_jax.downloads import DataError, PublishedFile


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What vae_jax's builders share: TFDS's messages about preparing go to the log.

  TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout before it
  prepares; these builders download nothing there (``vae_jax.downloads`` fetched and
  checked the files before), so that line would mislead. ``datasets`` logs what is
  prepared from where instead.
  """

  def _log_download_bytes(self) -> None:
    logging.info("Writing %s in ArrayRecord format to %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Prepared %s in %s", self.name, self.data_dir)


# --------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files.

IDX_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _published_idx(url: str, sizes_and_digests: dict[str, tuple[int, str]]):
  return tuple(
    PublishedFile(n, url + n, *sizes_and_digests[n]) for fs in IDX_FILES.values() for n in fs
  )


# The published (size in bytes, SHA-256) of each file, as TFDS registers them
# (tensorflow_datasets/url_checksums/<name>.txt): a download is kept only if it matches.
MNIST_FILES = _published_idx(
  "https://storage.googleapis.com/cvdf-datasets/mnist/",
  {
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
)
FASHION_MNIST_FILES = _published_idx(
  "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
  {
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
)


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


def read_idx_split(idx_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split's ``(images [n, h, w, 1] uint8, labels [n] int32)`` from a directory of IDX files."""
  images_file, labels_file = (pathlib.Path(idx_dir) / f for f in IDX_FILES[split])
  images, labels = read_idx(images_file), read_idx(labels_file)
  if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise DataError(
      f"{images_file} {images.shape} and {labels_file} {labels.shape} do not form a "
      "dataset of [n, height, width] images with [n] labels."
    )
  return images[..., None], labels.astype(np.int32)


def _grey(pixels: np.ndarray) -> Image.Image:
  # TFDS encodes numpy images with TensorFlow but PIL images with Pillow.
  return Image.fromarray(pixels[:, :, 0], mode="L")


class IdxImages(Builder, skip_registration=True):
  """MNIST or Fashion-MNIST prepared from its four IDX files (in ``manual_dir``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name="mnist", description="MNIST (LeCun et al.), 60k/10k 28x28."),
    tfds.core.BuilderConfig(
      name="fashion_mnist", description="Fashion-MNIST (Xiao et al. 2017), 60k/10k 28x28."
    ),
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
    return {split: self._generate_examples(dl_manager.manual_dir, split) for split in IDX_FILES}

  def _generate_examples(self, idx_dir, split):
    images, labels = read_idx_split(idx_dir, split)
    for i in range(images.shape[0]):
      yield i, {"image": _grey(images[i]), "label": labels[i]}


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


def dsprites_test_indices(num_images: int) -> np.ndarray:
  """The fixed test subset of a dSprites grid: ``min(10000, n // 10)`` images, sorted.

  dSprites has no test split; models train on every image (as disentanglement_lib
  does) and the test ELBO is monitored on this fixed subset of them.
  """
  rng = np.random.default_rng(0)
  return np.sort(rng.choice(num_images, min(10000, num_images // 10), replace=False))


class DspritesImages(Builder, skip_registration=True):
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


# --------------------------------------------------------------------------
# CIFAR-10 (Krizhevsky 2009), the binary version.

CIFAR10_FILES = (
  PublishedFile(
    "cifar-10-binary.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    170052171,
    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
  ),
)
CIFAR10_INSTRUCTIONS = (
  "Download cifar-10-binary.tar.gz (the binary version, 170,052,171 bytes) from "
  "https://www.cs.toronto.edu/~kriz/cifar.html into a directory; it is checked against "
  "the size and SHA-256 TFDS registers."
)
CIFAR10_CLASSES = (
  "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_CIFAR10_BATCHES = {
  "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
  "test": ("test_batch.bin",),
}
_CIFAR10_RECORD = 1 + 3 * 32 * 32


def read_cifar10(archive: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{split: (images [n, 32, 32, 3] uint8, labels [n] int32)}`` from the binary archive.

  Each batch file holds records of one label byte and 3,072 pixel bytes, the red plane,
  then the green, then the blue, each row-major 32x32 (the CIFAR-10 page's "binary
  version"). The training split is ``data_batch_1`` to ``data_batch_5`` in that order.

  Raises:
    DataError: the archive cannot be read, lacks a batch file, or a batch is not whole
      records.
  """
  try:
    with tarfile.open(archive, "r:gz") as tar:
      members = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
      out = {}
      for split, names in _CIFAR10_BATCHES.items():
        records = []
        for name in names:
          if name not in members:
            raise DataError(f"{archive} has no {name}: is it cifar-10-binary.tar.gz?")
          raw = tar.extractfile(members[name]).read()
          if len(raw) % _CIFAR10_RECORD:
            raise DataError(
              f"{name} in {archive} holds {len(raw)} bytes, not whole records of "
              f"{_CIFAR10_RECORD}: the archive is damaged. Replace it."
            )
          records.append(np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR10_RECORD))
        block = np.concatenate(records)
        images = block[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out[split] = (np.ascontiguousarray(images), block[:, 0].astype(np.int32))
      return out
  except (OSError, EOFError, tarfile.TarError) as e:
    raise DataError(f"Cannot read {archive}: {e}. Replace it with an intact copy.") from e


class Cifar10Images(Builder, skip_registration=True):
  """CIFAR-10 from ``cifar-10-binary.tar.gz`` (in ``manual_dir``): 50k/10k 32x32x3."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="cifar10", description="CIFAR-10, 50k/10k.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A directory holding cifar-10-binary.tar.gz."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.Scalar(np.int32),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    data = read_cifar10(pathlib.Path(dl_manager.manual_dir) / CIFAR10_FILES[0].name)
    return {split: self._generate_examples(*data[split]) for split in _CIFAR10_BATCHES}

  def _generate_examples(self, images, labels):
    for i in range(images.shape[0]):
      yield i, {"image": Image.fromarray(images[i], mode="RGB"), "label": labels[i]}


# --------------------------------------------------------------------------
# CelebA (Liu et al. 2015), aligned and cropped faces.

# Sizes and SHA-256 as TFDS registers them (tensorflow_datasets/datasets/celeb_a/checksums.tsv).
# The files are served from Google Drive, which interposes a confirmation page on large
# files; vae_jax reads a local copy (config.idx_dir) and checks it against these.
CELEBA_FILES = (
  PublishedFile(
    "img_align_celeba.zip",
    "",
    1443490838,
    "46fb89443c578308acf364d7d379fe1b9efb793042c0af734b6112e4fd3a8c74",
  ),
  PublishedFile(
    "list_eval_partition.txt",
    "",
    2836386,
    "fc955bcb3ef8fbdf7d5640d9a8693a8431b5f2ee291a5c1449a1549e7e073fe7",
  ),
  PublishedFile(
    "list_attr_celeba.txt",
    "",
    26721026,
    "f0e5da289d5ccf75ffe8811132694922b60f2af59256ed362afa03fefba324d0",
  ),
)
CELEBA_INSTRUCTIONS = (
  "Download img_align_celeba.zip, list_eval_partition.txt and list_attr_celeba.txt from the "
  "CelebA page (mmlab.ie.cuhk.edu.hk/projects/CelebA.html: Align&Cropped Images and Anno/, "
  "Eval/) into one directory; each is checked against the size and SHA-256 TFDS registers."
)
_CELEBA_SPLITS = {"train": 0, "validation": 1, "test": 2}


def read_celeba_lists(directory: str | os.PathLike) -> tuple[list[tuple[str, int]], dict]:
  """``([(file, partition 0/1/2), ...], {file: [40] attributes in {0, 1}})`` and the attribute
  names, from ``list_eval_partition.txt`` and ``list_attr_celeba.txt``.

  Raises:
    DataError: a list is malformed.
  """
  directory = pathlib.Path(directory)
  try:
    partition = []
    for line in (directory / "list_eval_partition.txt").read_text().splitlines():
      if line.strip():
        name, part = line.split()
        partition.append((name, int(part)))
    lines = (directory / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    attributes = {}
    for line in lines[2:]:
      if line.strip():
        name, *values = line.split()
        attributes[name] = (np.asarray(values, np.int32) + 1) // 2  # {-1, 1} -> {0, 1}.
  except (OSError, ValueError, IndexError) as e:
    raise DataError(f"The CelebA lists in {directory} cannot be read: {e}.") from e
  return partition, {"names": names, "values": attributes}


class CelebaImages(Builder, skip_registration=True):
  """CelebA's aligned faces (218x178x3 JPEG, kept as published), the official partition
  (162,770 / 19,867 / 19,962) and the 40 binary attributes as ``attributes`` [40]."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="celeba", description="CelebA, aligned.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = CELEBA_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "attributes": tfds.features.Tensor(shape=(40,), dtype=np.int32),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    directory = pathlib.Path(dl_manager.manual_dir)
    partition, attributes = read_celeba_lists(directory)
    return {
      split: self._generate_examples(directory, partition, attributes["values"], part)
      for split, part in _CELEBA_SPLITS.items()
    }

  def _generate_examples(self, directory, partition, attributes, part):
    with zipfile.ZipFile(directory / "img_align_celeba.zip") as archive:
      paths = {pathlib.PurePosixPath(n).name: n for n in archive.namelist() if n.endswith(".jpg")}
      for i, (name, p) in enumerate(partition):
        if p != part:
          continue
        if name not in paths:
          raise DataError(f"img_align_celeba.zip has no {name}, which the partition lists.")
        # The published JPEG bytes, stored as they are (no re-encoding).
        yield i, {"image": io.BytesIO(archive.read(paths[name])), "attributes": attributes[name]}


# --------------------------------------------------------------------------
# Real colour photographs that need no download.

PHOTO_PATCH = 32
PHOTO_STRIDE = 8
# Patches whose left edge is at or right of this column are the test split; the training
# patches end left of it, so no pixel is in both splits.
PHOTO_TEST_FROM = 512
PHOTO_NAMES = ("china", "flower")  # The label of a patch: which photograph it is cut from.


def photo_patches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{split: (images [n, 32, 32, 3] uint8, labels [n] int32)}``: patches of scikit-learn's
  two sample photographs (``sklearn.datasets.load_sample_images``, 427x640 RGB JPEGs), cut
  with stride 8, in a fixed random order. Test: the patches starting at column 512 or
  later; train: those ending at or before it (6,100 and 1,300 patches)."""
  from sklearn import datasets as sklearn_datasets

  photos = sklearn_datasets.load_sample_images().images
  out = {"train": ([], []), "test": ([], [])}
  for label, photo in enumerate(photos):
    height, width = photo.shape[:2]
    for top in range(0, height - PHOTO_PATCH + 1, PHOTO_STRIDE):
      for left in range(0, width - PHOTO_PATCH + 1, PHOTO_STRIDE):
        if left >= PHOTO_TEST_FROM:
          split = "test"
        elif left + PHOTO_PATCH <= PHOTO_TEST_FROM:
          split = "train"
        else:
          continue  # Straddles the boundary.
        out[split][0].append(photo[top : top + PHOTO_PATCH, left : left + PHOTO_PATCH])
        out[split][1].append(label)
  # In a fixed random order, so that the first N of a split (data.max_train_examples)
  # are a sample of both photographs, not the top rows of the first.
  rng = np.random.default_rng(0)
  data = {}
  for split, (images, labels) in out.items():
    order = rng.permutation(len(images))
    data[split] = (np.stack(images)[order].astype(np.uint8), np.asarray(labels, np.int32)[order])
  return data


class PhotoPatches(Builder, skip_registration=True):
  """32x32 colour patches of scikit-learn's sample photographs (see ``photo_patches``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="photos", description="Photo patches.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(PHOTO_PATCH, PHOTO_PATCH, 3)),
          "label": tfds.features.Scalar(np.int32),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    data = photo_patches()
    return {split: self._generate_examples(*data[split]) for split in ("train", "test")}

  def _generate_examples(self, images, labels):
    for i in range(images.shape[0]):
      yield i, {"image": Image.fromarray(images[i], mode="RGB"), "label": labels[i]}
