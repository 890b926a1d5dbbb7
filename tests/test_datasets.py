"""Datasets: published files and downloads -> TFDS ArrayRecord -> arrays, checked at every step."""

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import pathlib
import shutil
import tarfile
import threading
import zipfile

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import FIXTURE_IDX_DIR
from PIL import Image

from vae_jax import builders, datasets, downloads


def test_read_idx_fixture_is_real_mnist():
  images, labels = builders.read_idx_split(FIXTURE_IDX_DIR, "train")
  assert images.shape == (400, 28, 28, 1)
  assert images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [40] * 10)
  # Real digits: dark background, bright strokes, mean grey level near MNIST's 0.13.
  assert 0.08 < images.mean() / 255 < 0.2
  assert images.max() == 255


def test_tfds_read_path_returns_the_idx_contents(tfds_dir):
  data = datasets.load("mnist", data_dir=tfds_dir)
  for name in ("train", "test"):
    images, labels = builders.read_idx_split(FIXTURE_IDX_DIR, name)
    np.testing.assert_array_equal(data[name].images, images)
    np.testing.assert_array_equal(data[name].labels, labels)


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "bit_flip"])
def test_decoded_cache_is_verified_and_rebuilt_when_damaged(damage, tfds_dir, tmp_path):
  data_dir = tmp_path / "tfds"
  shutil.copytree(tfds_dir, data_dir)
  (cache,) = data_dir.glob("idx_images/mnist/*/decoded-train.npz")
  raw_bytes = bytearray(cache.read_bytes())
  if damage == "garbage":
    cache.write_bytes(b"not an npz")
  elif damage == "empty":
    cache.write_bytes(b"")
  elif damage == "truncated":
    cache.write_bytes(raw_bytes[: len(raw_bytes) // 2])
  else:  # One bit inside the images' data: the zip member's CRC-32 catches it.
    raw_bytes[len(raw_bytes) // 2] ^= 0x10
    cache.write_bytes(raw_bytes)
  data = datasets.load("mnist", data_dir=str(data_dir))
  images, _ = builders.read_idx_split(FIXTURE_IDX_DIR, "train")
  np.testing.assert_array_equal(data["train"].images, images)
  assert cache.read_bytes() == tfds_cache_bytes(tfds_dir)  # Rebuilt, identical.


def tfds_cache_bytes(tfds_dir) -> bytes:
  (cache,) = pathlib.Path(tfds_dir).glob("idx_images/mnist/*/decoded-train.npz")
  return cache.read_bytes()


def test_damaged_prepared_data_is_one_error_naming_what_to_delete(tfds_dir, tmp_path):
  data_dir = tmp_path / "tfds"
  shutil.copytree(tfds_dir, data_dir)
  for cache in data_dir.glob("idx_images/mnist/*/decoded-*.npz"):
    cache.unlink()
  (records,) = data_dir.glob("idx_images/mnist/*/idx_images-train.array_record-*")
  records.write_bytes(records.read_bytes()[:500])
  prepared = records.parent
  with pytest.raises(datasets.DataError) as info:
    datasets.load("mnist", data_dir=str(data_dir))
  message = str(info.value)
  assert str(prepared) in message and "delete" in message and len(message.splitlines()) == 1


def test_prepared_data_is_tied_to_its_source_files(tfds_dir, tmp_path):
  """Data prepared from one IDX directory is not silently reused for other files."""
  data_dir = tmp_path / "tfds"
  shutil.copytree(tfds_dir, data_dir)
  other = _copy_fixture(tmp_path / "other")
  images = bytearray(gzip.decompress((other / "train-images-idx3-ubyte.gz").read_bytes()))
  images[16 + 300] ^= 0xFF  # One pixel of the first image.
  (other / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(images)))
  with pytest.raises(datasets.DataError, match=r"prepared from .*mnist_tiny.*not from"):
    datasets.load("mnist", data_dir=str(data_dir), idx_dir=str(other))
  # The same files (recompressed, as Debian does) are accepted.
  same = _copy_fixture(tmp_path / "same")
  for f in same.glob("*.gz"):
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes()), mtime=123))
  assert datasets.load("mnist", str(data_dir), str(same))["train"].num_examples == 400
  # Data prepared by an older version (no record) is compared by content once.
  for record in data_dir.glob("idx_images/mnist/*/vae_jax_source.json"):
    record.unlink()
  with pytest.raises(datasets.DataError, match="train split differs"):
    datasets.load("mnist", data_dir=str(data_dir), idx_dir=str(other))
  datasets.load("mnist", data_dir=str(data_dir), idx_dir=str(FIXTURE_IDX_DIR))
  assert list(data_dir.glob("idx_images/mnist/*/vae_jax_source.json"))


def _copy_fixture(dst):
  shutil.copytree(FIXTURE_IDX_DIR, dst)
  return dst


@pytest.mark.parametrize(
  "damage, message",
  [
    ("truncate", "truncated or corrupt"),
    ("magic", "not an IDX file"),
    ("not_gzip", "Cannot read"),
    ("missing", "lacks t10k-labels-idx1-ubyte.gz"),
  ],
)
def test_malformed_idx_dir_gives_one_clear_error(tmp_path, damage, message):
  idx_dir = _copy_fixture(tmp_path / "idx")
  target = idx_dir / "t10k-labels-idx1-ubyte.gz"
  raw = gzip.decompress(target.read_bytes())
  if damage == "truncate":
    target.write_bytes(gzip.compress(raw[:-7]))
  elif damage == "magic":
    target.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
  elif damage == "not_gzip":
    target.write_bytes(b"garbage")
  else:
    target.unlink()
  with pytest.raises(datasets.DataError, match=message):
    datasets.load("mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(idx_dir))


def test_unknown_dataset_names_the_choices(tmp_path):
  with pytest.raises(datasets.DataError, match=r"Unknown dataset 'cifar100'.*fashion_mnist.*tfds:"):
    datasets.load("cifar100", data_dir=str(tmp_path))


def test_offline_without_data_fails_fast_with_instructions(tmp_path, monkeypatch):
  monkeypatch.delenv("VAE_JAX_IDX_DIR", raising=False)
  # A port on loopback that nothing listens on: the mirror cannot be reached.
  published = datasets.BUILT_IN["mnist"].files
  _serve_mnist_from(monkeypatch, "http://127.0.0.1:9/")
  with pytest.raises(datasets.DataError, match=r"--config.idx_dir=/path/to/dir"):
    datasets.load("mnist", data_dir=str(tmp_path))
  assert all(f.url.startswith("https://") for f in published)


def _serve_mnist_from(monkeypatch, url: str, checksums: dict | None = None) -> None:
  """Makes the built-in ``mnist`` come from ``url`` with these (size, SHA-256)s."""
  entry = datasets.BUILT_IN["mnist"]
  files = tuple(
    downloads.PublishedFile(
      f.name, url + f.name, *(checksums or {}).get(f.name, (f.size, f.sha256))
    )
    for f in entry.files
  )
  monkeypatch.setitem(datasets.BUILT_IN, "mnist", dataclasses.replace(entry, files=files))


def test_reachability_probe_is_bounded(monkeypatch):
  """A machine whose name resolution hangs (no DNS: minutes of retries) gets its answer
  after the probe's own timeout, not after the resolver's: offline runs stop at once."""
  unblock = threading.Event()

  def hanging_connection(*args, **kwargs):
    unblock.wait()  # Never answers until the test ends.
    raise OSError("unreachable")

  monkeypatch.setattr(downloads.socket, "create_connection", hanging_connection)
  answer = []
  probe = threading.Thread(
    target=lambda: answer.append(downloads.online("https://example.org/", timeout_s=0.05))
  )
  probe.start()
  probe.join(timeout=120)  # Far beyond the probe's 0.05 s: only a probe that hangs fails.
  unblock.set()
  assert answer == [False]


def test_download_when_online_prepares_from_the_mirror(tmp_path, monkeypatch):
  """Serves the fixture over HTTP on loopback and lets the download path fetch it."""
  monkeypatch.delenv("VAE_JAX_IDX_DIR", raising=False)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURE_IDX_DIR))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    # The fixture's own sizes and digests stand in for the published ones.
    checksums = {
      f.name: (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
      for f in FIXTURE_IDX_DIR.glob("*.gz")
    }
    wrong = dict(checksums, **{"t10k-labels-idx1-ubyte.gz": (4542, "0" * 64)})
    _serve_mnist_from(monkeypatch, url, wrong)
    with pytest.raises(datasets.DataError, match=r"t10k-labels.*is not the published file"):
      datasets.load("mnist", data_dir=str(tmp_path))
    assert not (tmp_path / "downloads/vae_jax/mnist/t10k-labels-idx1-ubyte.gz").exists()
    _serve_mnist_from(monkeypatch, url, checksums)
    data = datasets.load("mnist", data_dir=str(tmp_path))
  finally:
    server.shutdown()
  images, _ = builders.read_idx_split(FIXTURE_IDX_DIR, "test")
  np.testing.assert_array_equal(data["test"].images, images)
  assert sorted(p.name for p in (tmp_path / "downloads" / "vae_jax" / "mnist").iterdir()) == sorted(
    f for fs in builders.IDX_FILES.values() for f in fs
  )


def test_idx_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("VAE_JAX_IDX_DIR", str(FIXTURE_IDX_DIR))
  data = datasets.load("mnist", data_dir=str(tmp_path))
  assert data["train"].num_examples == 400


# --------------------------------------------------------------------------
# Datasets of the TFDS catalog, by name.


class VaeJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset registered as ``vae_jax_test_images``, standing in for the catalog's:
  two image features (``image``, ``mask``) and class labels. Image ``i`` is filled with
  ``i``."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "mask": tfds.features.Image(shape=(8, 8, 1)),
          "label": tfds.features.ClassLabel(names=["even", "odd"]),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 20), "test": self._generate_examples(100, 6)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      yield (
        i,
        {
          "image": Image.fromarray(np.full((8, 8, 3), i, np.uint8)),
          "mask": Image.fromarray(np.full((8, 8), 255 - i, np.uint8), mode="L"),
          "label": i % 2,
        },
      )


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> pathlib.Path:
  data_dir = tmp_path_factory.mktemp("catalog")
  VaeJaxTestImages(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
  return data_dir


def test_a_catalog_dataset_is_read_by_name_through_its_metadata(catalog_dir):
  with pytest.raises(datasets.DataError, match=r"2 image features \(\['image', 'mask'\]\)"):
    datasets.open_source("tfds:vae_jax_test_images", str(catalog_dir))
  source = datasets.open_source("tfds:vae_jax_test_images", str(catalog_dir), image_feature="image")
  assert set(source.splits) == {"train", "test"}
  assert source.event_shape == (8, 8, 3) and source.class_names == ("even", "odd")
  test = source.load("test")
  np.testing.assert_array_equal(test.images[:, 0, 0, 0], np.arange(100, 106))
  np.testing.assert_array_equal(test.labels, np.arange(100, 106) % 2)
  mask = datasets.open_source("tfds:vae_jax_test_images", str(catalog_dir), image_feature="mask")
  assert mask.read("train", [3]).images[0, 0, 0, 0] == 252
  with pytest.raises(datasets.DataError, match=r"image features of .* are \['image', 'mask'\]"):
    datasets.open_source("tfds:vae_jax_test_images", str(catalog_dir), image_feature="label")


def test_a_catalog_dataset_not_prepared_is_one_error_saying_how(tmp_path):
  with pytest.raises(datasets.DataError, match=r"not prepared in .*tfds build vae_jax_test_images"):
    datasets.open_source("tfds:vae_jax_test_images", str(tmp_path))


def test_a_catalog_dataset_prepared_as_tfrecord_is_one_error_saying_how(catalog_dir, tmp_path):
  """TFRecord files are read only through TensorFlow: the error says how to convert them."""
  copy = tmp_path / "copy"
  shutil.copytree(catalog_dir, copy)
  (info,) = copy.glob("vae_jax_test_images/*/dataset_info.json")
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(datasets.DataError, match=r"prepared as tfrecord.*tfds convert_format"):
    datasets.open_source("tfds:vae_jax_test_images", str(copy))


def test_an_unknown_catalog_dataset_is_one_error(tmp_path):
  with pytest.raises(datasets.DataError, match=r"TFDS has no dataset 'no_such_images'"):
    datasets.open_source("tfds:no_such_images", str(tmp_path))


def test_a_split_the_dataset_lacks_names_the_ones_it_has(catalog_dir):
  source = datasets.open_source("tfds:vae_jax_test_images", str(catalog_dir), image_feature="image")
  with pytest.raises(
    datasets.DataError, match=r"no split 'validation'; it has \['test', 'train'\]"
  ):
    source.num_examples("validation")


# --------------------------------------------------------------------------
# CIFAR-10 from its published binary archive.


def _cifar_archive(path: pathlib.Path, per_batch: int = 3) -> dict[str, tuple]:
  """A ``cifar-10-binary.tar.gz`` in the published layout (``cifar-10-batches-bin/`` with
  ``data_batch_1..5.bin`` and ``test_batch.bin``, records of a label byte then 3,072
  pixel bytes: the red plane, the green, the blue, each row-major 32x32), with random
  pixels; returns the ``(images [n, 32, 32, 3], labels)`` written per split."""
  rng = np.random.default_rng(0)
  out = {"train": ([], []), "test": ([], [])}
  with tarfile.open(path, "w:gz") as tar:
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
      split = "test" if name.startswith("test") else "train"
      labels = rng.integers(0, 10, per_batch, dtype=np.uint8)
      planes = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
      raw = b"".join(bytes([labels[i]]) + planes[i].tobytes() for i in range(per_batch))
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
      out[split][0].append(planes.transpose(0, 2, 3, 1))  # Pixel (y, x) has channel c.
      out[split][1].append(labels.astype(np.int32))
  return {s: (np.concatenate(i), np.concatenate(lab)) for s, (i, lab) in out.items()}


def test_the_cifar10_reader_on_a_file_in_the_published_format(tmp_path):
  written = _cifar_archive(tmp_path / "cifar-10-binary.tar.gz")
  read = builders.read_cifar10(tmp_path / "cifar-10-binary.tar.gz")
  for split in ("train", "test"):
    np.testing.assert_array_equal(read[split][0], written[split][0])
    np.testing.assert_array_equal(read[split][1], written[split][1])
  assert read["train"][0].shape == (15, 32, 32, 3) and read["test"][0].shape == (3, 32, 32, 3)


def test_cifar10_is_prepared_only_from_the_published_archive(tmp_path, monkeypatch):
  """A local copy is checked against the published size and SHA-256; the archive that
  matches them (here the generated one stands in) is prepared and read back whole."""
  idx_dir = tmp_path / "files"
  idx_dir.mkdir()
  archive = idx_dir / "cifar-10-binary.tar.gz"
  written = _cifar_archive(archive)
  with pytest.raises(datasets.DataError, match=r"is not the published file cifar-10-binary"):
    datasets.load("cifar10", data_dir=str(tmp_path / "tfds"), idx_dir=str(idx_dir))
  entry = datasets.BUILT_IN["cifar10"]
  stand_in = downloads.PublishedFile(
    archive.name, entry.files[0].url, archive.stat().st_size, downloads.sha256(archive)
  )
  monkeypatch.setitem(datasets.BUILT_IN, "cifar10", dataclasses.replace(entry, files=(stand_in,)))
  data = datasets.load("cifar10", data_dir=str(tmp_path / "tfds"), idx_dir=str(idx_dir))
  for split in ("train", "test"):
    np.testing.assert_array_equal(data[split].images, written[split][0])
    np.testing.assert_array_equal(data[split].labels, written[split][1])


def test_a_damaged_cifar10_archive_is_one_error(tmp_path):
  path = tmp_path / "cifar-10-binary.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
    info.size = 100
    tar.addfile(info, io.BytesIO(bytes(100)))
  with pytest.raises(datasets.DataError, match=r"has no data_batch_2.bin|not whole records"):
    builders.read_cifar10(path)
  path.write_bytes(b"not a tar")
  with pytest.raises(datasets.DataError, match=r"Cannot read .*Replace it"):
    builders.read_cifar10(path)


# --------------------------------------------------------------------------
# CelebA from its published files (a few generated faces in their layout).


def test_celeba_builder_reads_the_published_layout(tmp_path):
  """``img_align_celeba.zip`` of 218x178 JPEGs, the partition list and the attribute list
  (values -1/1) in the published layout: the splits follow the partition, the attributes
  become 0/1, the JPEG bytes are kept, and the papers' 64x64 crop reads back."""
  rng = np.random.default_rng(0)
  names = [f"{i:06d}.jpg" for i in range(1, 7)]
  parts = [0, 0, 1, 2, 0, 2]
  with zipfile.ZipFile(tmp_path / "img_align_celeba.zip", "w") as z:
    for name in names:
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(buffer, "JPEG")
      z.writestr(f"img_align_celeba/{name}", buffer.getvalue())
  (tmp_path / "list_eval_partition.txt").write_text(
    "".join(f"{n} {p}\n" for n, p in zip(names, parts, strict=True))
  )
  attrs = rng.choice([-1, 1], (6, 40))
  header = " ".join(f"A{k}" for k in range(40))
  rows = "".join(f"{n} " + " ".join(map(str, a)) + "\n" for n, a in zip(names, attrs, strict=True))
  (tmp_path / "list_attr_celeba.txt").write_text(f"6\n{header}\n{rows}")

  builder = builders.CelebaImages(config="celeba", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
    file_format="array_record",
    download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path)),
  )
  source = datasets.Source(
    "celeba", builder, "image", "attributes", datasets.ImageFormat(crop=(140, 140), resize=(64, 64))
  )
  assert {s: source.num_examples(s) for s in source.splits} == {
    "train": 3,
    "validation": 1,
    "test": 2,
  }
  test = source.load("test")
  assert test.images.shape == (2, 64, 64, 3) and test.images.dtype == np.uint8
  np.testing.assert_array_equal(test.labels, (attrs[[3, 5]] + 1) // 2)
  whole = datasets.Source("celeba", builder, "image", "attributes").read("train", [1])
  with zipfile.ZipFile(tmp_path / "img_align_celeba.zip") as z:
    published = np.asarray(Image.open(io.BytesIO(z.read("img_align_celeba/000002.jpg"))))
  np.testing.assert_array_equal(whole.images[0], published)  # The published JPEG, decoded.


# --------------------------------------------------------------------------
# Real colour photographs, offline.


def test_photo_patches_are_real_colour_images_with_disjoint_splits(tmp_path):
  data = datasets.load("photos", data_dir=str(tmp_path))
  train, test = data["train"], data["test"]
  assert train.images.shape[1:] == test.images.shape[1:] == (32, 32, 3)
  assert (train.num_examples, test.num_examples) == (6100, 1300)
  assert set(np.unique(train.labels)) == set(np.unique(test.labels)) == {0, 1}
  # Colour: the channels differ, and the patches are not flat.
  means = train.images.reshape(-1, 3).mean(0)
  assert np.ptp(means) > 10 and train.images.std() > 30
  # No training patch is a test patch.
  assert not set(map(bytes, train.images)) & set(map(bytes, test.images))


# --------------------------------------------------------------------------
# Shaping images for a run.


def test_image_format_crops_the_centre_resizes_and_keeps_bits():
  images = np.zeros((2, 10, 8, 3), np.uint8)
  images[:, 3:7, 2:6] = 200  # A bright centre 4x4.
  images[..., 1] = 0  # Pure red-blue.
  centre = datasets.ImageFormat(crop=(4, 4)).apply(images)
  assert centre.shape == (2, 4, 4, 3) and (centre[..., 0] == 200).all()
  small = datasets.ImageFormat(crop=(4, 4), resize=(2, 2), channels=1, bits=5).apply(images)
  assert small.shape == (2, 2, 2, 1)
  # ITU-R 601 luma of (200, 0, 200), then 5 bits: the top 5 of 8.
  luma = round(200 * 299 / 1000 + 200 * 114 / 1000)
  np.testing.assert_array_equal(small, luma >> 3)
  assert datasets.ImageFormat(channels=3).apply(images[..., :1]).shape == (2, 10, 8, 3)
  with pytest.raises(datasets.DataError, match=r"crop=\(12, 4\) is larger than the images"):
    datasets.ImageFormat(crop=(12, 4)).apply(images)


def test_the_stream_file_holds_the_split_and_is_rebuilt_when_damaged(tfds_dir, tmp_path):
  """The streamed feed's records are the split's images, shaped, in order; a truncated
  file is made again rather than read."""
  data_dir = tmp_path / "tfds"
  shutil.copytree(tfds_dir, data_dir)
  fmt = datasets.ImageFormat(resize=(14, 14))
  source = datasets.open_source("mnist", str(data_dir), fmt=fmt)
  path = source.stream_file("test")
  assert path.name == "decoded-test-resize14x14.array_record"
  records = grain.sources.ArrayRecordDataSource([str(path)])
  images = np.stack([np.frombuffer(records[i], np.uint8) for i in range(len(records))])
  np.testing.assert_array_equal(images.reshape(-1, 14, 14, 1), source.load("test").images)
  whole = path.read_bytes()
  path.write_bytes(whole[: len(whole) // 2])
  assert source.stream_file("test") == path and path.read_bytes() == whole


def test_decoded_copies_of_a_read_only_dataset_go_to_the_user_cache(
  catalog_dir, tmp_path, monkeypatch
):
  """A dataset prepared on shared, read-only storage is read where it is; its decoded
  copies go under ``~/.cache/vae_jax/decoded`` instead of beside it."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  prepared = next(catalog_dir.glob("vae_jax_test_images/*"))
  writable = datasets.os.access
  monkeypatch.setattr(
    datasets.os, "access", lambda p, mode: writable(p, mode) and pathlib.Path(p) != prepared
  )
  before = sorted(p.name for p in prepared.iterdir())
  source = datasets.open_source("tfds:vae_jax_test_images", str(catalog_dir), image_feature="image")
  source.load("test")
  path = source.stream_file("train")
  own = tmp_path / "home/.cache/vae_jax/decoded/tfds_vae_jax_test_images" / prepared.name
  assert path == own / "decoded-train.array_record"
  assert (own / "decoded-test.npz").is_file()
  assert sorted(p.name for p in prepared.iterdir()) == before
