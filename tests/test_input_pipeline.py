"""Feeding a run: its splits, preprocessing, the device feed, the evaluation data."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vae_jax import config as config_lib
from vae_jax import datasets, input_pipeline


def _data(num_train=10, num_test=4):
  """A tiny dataset whose every image holds its own index, and whose labels are
  ``1000 + index`` (classes) or ``[index, -index]`` (factors)."""

  def split(n, offset, factors):
    images = (np.arange(n) + offset).astype(np.uint8).reshape(n, 1, 1, 1)
    labels = np.stack([np.arange(n), -np.arange(n)], -1) if factors else np.arange(n) + 1000
    return datasets.Split(images=images, labels=labels.astype(np.int32))

  return lambda factors=False: {
    "train": split(num_train, 0, factors),
    "test": split(num_test, 100, factors),
  }


def _config(validation=0, max_train=None) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.validation_examples = validation
  config.data.max_train_examples = max_train
  return config


@pytest.mark.parametrize("factors", [False, True], ids=["classes", "factors"])
@pytest.mark.parametrize("validation, max_train", [(0, None), (3, None), (0, 6), (2, 6)], ids=str)
def test_every_split_keeps_its_labels_with_its_images(factors, validation, max_train):
  """Wherever images are cut (the first N, the validation split at the end), their labels
  or factors follow them."""
  data = _data()(factors)
  splits = input_pipeline.cut(_config(validation, max_train), data)
  for split in (splits.train, splits.validation, splits.test):
    if split is None:
      continue
    index = split.images[:, 0, 0, 0].astype(np.int32) % 100
    expected = np.stack([index, -index], -1) if factors else index + 1000
    np.testing.assert_array_equal(split.labels, expected)
  kept = max_train or 10
  assert splits.train.num_examples == splits.num_train == kept - validation
  if validation:
    np.testing.assert_array_equal(
      splits.validation.images[:, 0, 0, 0], np.arange(kept - validation, kept)
    )


def test_a_cut_that_leaves_nothing_is_one_error():
  with pytest.raises(config_lib.ConfigError, match=r"validation_examples=6 must be in \[0, 6\)"):
    input_pipeline.cut(_config(validation=6, max_train=6), _data()())


def test_device_feed_batches_follow_the_epoch_permutations():
  """Batch s holds positions [(s % E) B, (s % E + 1) B) of epoch s // E's permutation."""
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  shuffle_key = jax.random.key(3)
  feed = input_pipeline.DeviceFeed(
    images=jnp.asarray(images),
    batch_size=4,
    binarization="none",
    binarize_key=jax.random.key(0),
    permutations=input_pipeline.Permutations(shuffle_key, 10),
  )
  assert feed.steps_per_epoch == 2  # The remainder of 2 examples is dropped each epoch.
  batch = jax.jit(feed.batch)
  for step in range(6):
    inputs = feed.inputs(step)
    order = np.asarray(input_pipeline.epoch_permutation(shuffle_key, step // 2, 10))
    want = order[(step % 2) * 4 : (step % 2 + 1) * 4] / 255.0
    np.testing.assert_allclose(np.asarray(batch(inputs, step))[:, 0, 0, 0], want, rtol=1e-6)
  # A dispatch starting late in an epoch reads the next epoch's order too.
  inputs = feed.inputs(1)
  order = np.asarray(input_pipeline.epoch_permutation(shuffle_key, 1, 10))
  np.testing.assert_allclose(np.asarray(batch(inputs, 2))[:, 0, 0, 0], order[:4] / 255.0)


def test_eval_data_refuses_data_outside_the_likelihoods_range():
  from vae_jax import likelihoods

  config = _config()
  config.binarization = "dequantize"
  splits = input_pipeline.cut(config, _data()())
  data = input_pipeline.eval_data(config, splits, None, likelihoods.Bernoulli())
  assert data.test.shape == (4, 1, 1, 1) and data.validation is None

  class UnitOnly(likelihoods.Bernoulli):
    data_range = (0.0, 0.1)

  with pytest.raises(config_lib.ConfigError, match=r"defined for data in \[0.0, 0.1\]"):
    input_pipeline.eval_data(config, splits, None, UnitOnly())


_PIXELS = jnp.array([[0, 1, 127, 128, 200, 255]], jnp.uint8).reshape(1, 1, 6, 1)


def test_none_scales_to_unit_interval():
  x = input_pipeline.preprocess(_PIXELS, "none")
  np.testing.assert_allclose(np.ravel(x), np.array([0, 1, 127, 128, 200, 255]) / 255, rtol=1e-6)


def test_threshold_at_half():
  x = input_pipeline.preprocess(_PIXELS, "threshold")
  np.testing.assert_array_equal(np.ravel(x), [0, 0, 0, 1, 1, 1])


def test_dynamic_binarization_is_bernoulli_of_grey_level():
  images = jnp.broadcast_to(_PIXELS, (20000, 1, 6, 1))
  x = input_pipeline.preprocess(images, "dynamic", jax.random.key(1))
  assert set(np.unique(np.asarray(x))) <= {0.0, 1.0}
  p = np.array([0, 1, 127, 128, 200, 255]) / 255
  freq = np.asarray(x).mean(axis=0).ravel()
  # 5 standard errors of a frequency over 20000 draws (plus slack at p in {0, 1}).
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / 20000) + 1e-9)
  again = input_pipeline.preprocess(images, "dynamic", jax.random.key(1))
  other = input_pipeline.preprocess(images, "dynamic", jax.random.key(2))
  np.testing.assert_array_equal(x, again)
  assert not np.array_equal(x, other)


def test_eval_binarization_is_fixed_across_calls():
  images = np.asarray(jnp.broadcast_to(_PIXELS, (50, 1, 6, 1)))
  a = input_pipeline.eval_images(images, "dynamic")
  b = input_pipeline.eval_images(images, "dynamic")
  np.testing.assert_array_equal(a, b)


def test_unknown_binarization():
  with pytest.raises(ValueError, match=r"config.binarization='otsu' is not one of"):
    input_pipeline.preprocess(_PIXELS, "otsu")


# --------------------------------------------------------------------------
# Streamed and device-resident feeding.


def _feeds(tfds_dir, num_train=100, batch_size=8, chunk_len=3, rows=None, binarization="dynamic"):
  """The device feed and the stream of the same examples, keys and preprocessing."""
  source = datasets.open_source("mnist", tfds_dir)
  shuffle_key, binarize_key = jax.random.key(7), jax.random.key(8)
  images = jnp.asarray(source.load("train").images[:num_train])
  device = input_pipeline.DeviceFeed(
    images=images,
    batch_size=batch_size,
    binarization=binarization,
    binarize_key=binarize_key,
    permutations=input_pipeline.Permutations(shuffle_key, num_train),
  )
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  stream = input_pipeline.StreamFeed(
    path=source.stream_file("train"),
    event_shape=source.event_shape,
    num_examples=num_train,
    batch_size=batch_size,
    binarization=binarization,
    bits=8,
    shuffle_key=shuffle_key,
    binarize_key=binarize_key,
    sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")),
    chunk_len=chunk_len,
    total_steps=40,
    read_threads=2,
    rows=rows,
  )
  return device, stream


def test_streamed_and_device_feeds_give_the_same_batches(tfds_dir):
  """Batch for batch, bit for bit, across epoch boundaries (12 steps per epoch), partial
  dispatches and a jump back (a restore), with dynamic binarization's draws."""
  device, stream = _feeds(tfds_dir)
  batch_d, batch_s = jax.jit(device.batch), jax.jit(stream.batch)
  compared = 0
  for start, n in [(0, 3), (3, 3), (6, 3), (9, 3), (12, 2), (14, 3), (5, 3), (8, 1), (23, 3)]:
    inputs_d, inputs_s = device.inputs(start, n), stream.inputs(start, n)
    for step in range(start, start + n):
      a, b = batch_d(inputs_d, step), batch_s(inputs_s, step)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      compared += 1
  assert compared == 24


def test_processes_read_disjoint_rows_that_cover_each_epoch(tfds_dir):
  """Two processes of a multi-host run, each reading half of every global batch: what
  they read is disjoint and together is the epoch (all examples but the remainder)."""
  _, whole = _feeds(tfds_dir)
  halves = [_feeds(tfds_dir, rows=slice(0, 4))[1], _feeds(tfds_dir, rows=slice(4, 8))[1]]
  for epoch in (0, 1):
    steps = range(12 * epoch, 12 * (epoch + 1))
    read = [np.concatenate([h.indices(s) for s in steps]) for h in halves]
    assert not set(read[0]) & set(read[1])
    together = np.concatenate([np.concatenate([h.indices(s) for h in halves]) for s in steps])
    np.testing.assert_array_equal(together, np.concatenate([whole.indices(s) for s in steps]))
    assert len(set(together)) == 96  # 12 batches of 8 of the 100 examples, none twice.
    # The images each half reads are the rows of the global batch.
    step = steps[5]
    full = whole.read(step)
    np.testing.assert_array_equal(np.concatenate([h.read(step) for h in halves]), full)


def test_process_rows_are_the_rows_the_process_devices_hold():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
  assert input_pipeline.process_rows(split, (3, 8, 28, 28, 1)) == slice(0, 8)
  with pytest.raises(ValueError, match="holds no device"):
    input_pipeline.process_rows(split, (3, 8, 28, 28, 1), process_index=1)


@pytest.mark.parametrize("cap_mib, feed", [(1, "device"), (0, "stream")])
def test_auto_streams_a_training_split_beyond_the_memory_cap(tfds_dir, cap_mib, feed):
  """400 images of 28x28 are 0.3 MiB as uint8."""
  config = _config()
  config.data_dir = tfds_dir
  config.data.device_memory_mib = cap_mib
  splits = input_pipeline.load_splits(config)
  assert (splits.train is None) == (feed == "stream")
  assert splits.num_train == 400 and splits.test.num_examples == 100
  config.data.feed = "stream" if feed == "device" else "device"  # An explicit choice wins.
  assert (input_pipeline.load_splits(config).train is None) != (feed == "stream")
