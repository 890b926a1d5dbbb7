"""Feeding a run: its splits cut from the dataset, batches for the train step, eval data.

* ``load_splits(config)``: the dataset of ``config`` (``vae_jax.datasets``), prepared once
  by process 0 and read by every process, cut as the config says: the first
  ``data.max_train_examples`` training images, and the last ``validation_examples`` of
  those held out for validation. Labels (classes, or dSprites' factors) always follow
  their images.
* ``DeviceFeed``: the training split in device memory as uint8. Each train step gathers
  its batch there from the epoch's permutation and preprocesses it on device
  (``preprocess``: binarization or dequantization), inside the jitted multi-step call
  (``step.make_train_chunk``). A batch depends only on ``(seed, step)``.
* ``eval_images``: an evaluation split preprocessed once, with a fixed seed.
* ``EvalData``: the run's test and validation splits, preprocessed, on device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
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
  """A run's splits in host memory.

  Attributes:
    train: what the run trains on.
    validation: held out from the end of the training split, or ``None``.
    test: the dataset's test split.
    full_train: the dataset's whole training split, before any cut (dSprites: every
      image of the factor grid, which the disentanglement metrics index by factors).
  """

  train: datasets.Split
  validation: datasets.Split | None
  test: datasets.Split
  full_train: datasets.Split

  @property
  def event_shape(self) -> tuple[int, ...]:
    return tuple(self.test.images.shape[1:])


def _take(split: datasets.Split, index: slice) -> datasets.Split:
  return datasets.Split(images=split.images[index], labels=split.labels[index])


def cut(config: ml_collections.ConfigDict, data: dict[str, datasets.Split]) -> Splits:
  """The run's splits of ``data``: the first ``data.max_train_examples`` training
  examples, the last ``validation_examples`` of those held out (in file order, the same
  for every seed), each with its labels.

  Raises:
    config.ConfigError: the cut would leave no training example.
  """
  full = data["train"]
  train = full
  if config.data.max_train_examples is not None:
    train = _take(train, slice(0, config.data.max_train_examples))
  v = config.validation_examples
  if v == 0:
    return Splits(train, None, data["test"], full)
  if not 0 < v < train.num_examples:
    raise config_lib.ConfigError(
      f"config.validation_examples={v} must be in [0, {train.num_examples}) for this "
      "training split."
    )
  return Splits(_take(train, slice(0, -v)), _take(train, slice(-v, None)), data["test"], full)


def load_splits(config: ml_collections.ConfigDict) -> Splits:
  """The run's splits (see ``cut``), prepared once by process 0 and read by every process."""
  is_main = jax.process_index() == 0
  if is_main:
    data = datasets.load(config.dataset, config.data_dir, config.idx_dir)
  if jax.process_count() > 1:  # The others read what process 0 prepared.
    multihost_utils.sync_global_devices("vae_jax: data prepared")
    if not is_main:
      data = datasets.load(config.dataset, config.data_dir, config.idx_dir)
  return cut(config, data)


# --------------------------------------------------------------------------
# Preprocessing (pure JAX; runs on device inside the jitted train step).


def preprocess(images: Array, binarization: str, key: Array | None = None) -> Array:
  """uint8 pixels ``[batch, h, w, c]`` -> float32 in [0, 1], binarized as asked.

  Args:
    images: uint8 pixels.
    binarization: ``"none"`` (grey levels in [0, 1]), ``"threshold"``
      (pixel > 127.5, i.e. grey level > 0.5), ``"dynamic"`` (a Bernoulli draw
      with the grey level as probability, fresh for every ``key``) or
      ``"dequantize"`` (``(pixel + u) / 256`` with ``u ~ U[0, 1)`` fresh for
      every ``key``: a density on [0, 1] then bounds the 8-bit data's
      log-probability, ``log P(pixels) >= log p(x) - D log 256``).
    key: PRNG key, required for ``"dynamic"`` and ``"dequantize"``.

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
    return ((images.astype(jnp.float32) + noise) / 256.0).reshape(shape)
  x = images.astype(jnp.float32) / 255.0
  if binarization == "threshold":
    return (x > 0.5).astype(jnp.float32).reshape(shape)
  if binarization == "dynamic":
    if key is None:
      raise ValueError("dynamic binarization needs a PRNG key.")
    return jax.random.bernoulli(key, x).astype(jnp.float32).reshape(shape)
  return x.reshape(shape)


def eval_images(images: np.ndarray, binarization: str, seed: int = EVAL_BINARIZATION_SEED) -> Array:
  """An evaluation split, preprocessed once: one fixed draw (from ``seed``) for
  ``dynamic`` binarization and ``dequantize`` noise."""
  key = jax.random.key(seed)
  return preprocess(jnp.asarray(images), binarization, key)


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
  """

  images: Array
  batch_size: int
  binarization: str
  binarize_key: Array
  permutations: Permutations

  @property
  def num_examples(self) -> int:
    return self.images.shape[0]

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def inputs(self, step: int) -> dict[str, Any]:
    """What ``batch`` reads for the dispatch that starts at train step ``step``."""
    epoch = step // self.steps_per_epoch
    return {
      "images": self.images,
      "perms": self.permutations(epoch),
      "first_epoch": epoch,
      "key": self.binarize_key,
    }

  def batch(self, inputs: dict[str, Any], step: Array) -> Array:
    """The preprocessed batch of train step ``step`` (traced), from ``inputs(first_step)``."""
    steps_per_epoch, batch_size = self.steps_per_epoch, self.batch_size
    order = inputs["perms"][step // steps_per_epoch - inputs["first_epoch"]]
    idx = jax.lax.dynamic_slice(order, ((step % steps_per_epoch) * batch_size,), (batch_size,))
    return preprocess(
      inputs["images"][idx], self.binarization, jax.random.fold_in(inputs["key"], step)
    )


@dataclasses.dataclass(frozen=True)
class EvalData:
  """A run's evaluation splits, preprocessed once (fixed seeds), on device.

  Attributes:
    test: ``[n, *event_shape]`` float32.
    validation: the same for the validation split, or ``None``.
  """

  test: Array
  validation: Array | None


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
  test = eval_images(splits.test.images, config.binarization)
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
      eval_images(splits.validation.images, config.binarization, seed=VALIDATION_SEED), sharding
    )
  return EvalData(jax.device_put(test, sharding), val)
