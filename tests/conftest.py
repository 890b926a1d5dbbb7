"""Test-wide JAX settings: broadcasting and dtype bugs fail loudly (as equinox's tests).

Rank promotion raises: a wrong shape that would broadcast across ranks is an error.
Dtype promotion is strict: mixing dtypes (int32 with float32, float32 with bfloat16)
without an explicit cast is an error, so no computation silently changes precision.
"""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

FIXTURE_IDX_DIR = pathlib.Path(__file__).parent / "fixtures" / "mnist_tiny"

# Variables of the caller's environment that change what a JAX process computes or
# sees (a user with eight accelerators may export XLA_FLAGS for all of them).
_JAX_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION")


def process_env(**overrides: str) -> dict[str, str]:
  """The environment a test's subprocess assumes: the caller's, without the variables
  that change JAX's devices or numerics, on the CPU, plus ``overrides``."""
  env = {k: v for k, v in os.environ.items() if k not in _JAX_ENV}
  return {**env, "JAX_PLATFORMS": "cpu", **overrides}


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """A TFDS data directory with the tiny real-MNIST fixture prepared once."""
  from vae_jax import datasets

  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.load("mnist", data_dir=str(data_dir), idx_dir=str(FIXTURE_IDX_DIR))
  return str(data_dir)


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> str:
  """A TFDS data directory with the offline colour photo patches prepared once."""
  from vae_jax import datasets

  data_dir = tmp_path_factory.mktemp("photos")
  datasets.load("photos", data_dir=str(data_dir))
  return str(data_dir)


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    name, pathlib.Path(__file__).parents[1] / "configs" / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def smoke_config(tfds_dir):
  """configs/mnist.py:smoke reading the prepared fixture (400 train, 100 test digits)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "mnist_config", pathlib.Path(__file__).parents[1] / "configs" / "mnist.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data_dir = tfds_dir
  config.progress_bar = False
  return config
