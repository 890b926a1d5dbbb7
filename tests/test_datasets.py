"""Datasets: IDX files and downloads -> TFDS ArrayRecord -> arrays, checked at every step."""

import functools
import gzip
import hashlib
import http.server
import pathlib
import shutil
import threading

import numpy as np
import pytest
from conftest import FIXTURE_IDX_DIR

from vae_jax import datasets


def test_read_idx_fixture_is_real_mnist():
  split = datasets.read_idx_split(FIXTURE_IDX_DIR, "train")
  assert split.images.shape == (400, 28, 28, 1)
  assert split.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(split.labels), [40] * 10)
  # Real digits: dark background, bright strokes, mean grey level near MNIST's 0.13.
  assert 0.08 < split.images.mean() / 255 < 0.2
  assert split.images.max() == 255


def test_tfds_read_path_returns_the_idx_contents(tfds_dir):
  data = datasets.load("mnist", data_dir=tfds_dir)
  for name in ("train", "test"):
    raw = datasets.read_idx_split(FIXTURE_IDX_DIR, name)
    np.testing.assert_array_equal(data[name].images, raw.images)
    np.testing.assert_array_equal(data[name].labels, raw.labels)


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
  raw = datasets.read_idx_split(FIXTURE_IDX_DIR, "train")
  np.testing.assert_array_equal(data["train"].images, raw.images)
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
  with pytest.raises(datasets.DataError, match=r"Unknown dataset 'cifar'.*fashion_mnist"):
    datasets.load("cifar", data_dir=str(tmp_path))


def test_offline_without_data_fails_fast_with_instructions(tmp_path, monkeypatch):
  monkeypatch.delenv("VAE_JAX_IDX_DIR", raising=False)
  # A port on loopback that nothing listens on: the mirror cannot be reached.
  spec = datasets.DATASETS["mnist"]
  monkeypatch.setitem(
    datasets.DATASETS, "mnist", datasets.DatasetSpec("mnist", "", "http://127.0.0.1:9/")
  )
  with pytest.raises(datasets.DataError, match=r"--config.idx_dir=/path/to/dir"):
    datasets.load("mnist", data_dir=str(tmp_path))
  assert spec.url.startswith("https://")


def test_reachability_probe_is_bounded(monkeypatch):
  """A machine whose name resolution hangs (no DNS: minutes of retries) gets its answer
  after the probe's own timeout, not after the resolver's: offline runs stop at once."""
  unblock = threading.Event()

  def hanging_connection(*args, **kwargs):
    unblock.wait()  # Never answers until the test ends.
    raise OSError("unreachable")

  monkeypatch.setattr(datasets.socket, "create_connection", hanging_connection)
  answer = []
  probe = threading.Thread(
    target=lambda: answer.append(datasets._online("https://example.org/", timeout_s=0.05))
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
    monkeypatch.setitem(datasets.DATASETS, "mnist", datasets.DatasetSpec("mnist", "", url, wrong))
    with pytest.raises(datasets.DataError, match=r"t10k-labels.*is not the published file"):
      datasets.load("mnist", data_dir=str(tmp_path))
    assert not (tmp_path / "downloads/vae_jax/mnist/t10k-labels-idx1-ubyte.gz").exists()
    monkeypatch.setitem(
      datasets.DATASETS, "mnist", datasets.DatasetSpec("mnist", "", url, checksums)
    )
    data = datasets.load("mnist", data_dir=str(tmp_path))
  finally:
    server.shutdown()
  raw = datasets.read_idx_split(FIXTURE_IDX_DIR, "test")
  np.testing.assert_array_equal(data["test"].images, raw.images)
  assert sorted(p.name for p in (tmp_path / "downloads" / "vae_jax" / "mnist").iterdir()) == sorted(
    f for fs in datasets._IDX_FILES.values() for f in fs
  )


def test_idx_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("VAE_JAX_IDX_DIR", str(FIXTURE_IDX_DIR))
  data = datasets.load("mnist", data_dir=str(tmp_path))
  assert data["train"].num_examples == 400
