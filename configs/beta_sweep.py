"""A beta sweep on Fashion-MNIST: one compiled program trains every (beta, seed) model.

  python experiments/beta_sweep.py --config=configs/beta_sweep.py --workdir=runs/beta_sweep

Each model is the model and training of configs/fashion_mnist.py with its own
``beta`` and ``seed`` (see vae_jax/sweep.py). ``config.seed`` sets the data
order and dynamic binarization shared by all models; with the default single
seed 0, model ``beta=b`` is exactly
``python -m vae_jax.main --config=configs/fashion_mnist.py --config.beta=b``.
``config.beta`` is not used by a sweep. ``:smoke`` is a seconds-long version.
"""

import ml_collections

from vae_jax.config_defaults import base_config, shrink_for_smoke


def get_config(arg: str | None = None):
  # base_config() is the Flax example's recipe (spelled out in configs/mnist.py);
  # only what differs is set here.
  config = base_config()
  config.dataset = "fashion_mnist"
  config.num_image_samples = 0  # A sweep writes no per-evaluation image grids.
  config.sweep = ml_collections.ConfigDict()
  # One model per beta; seeds: one (shared by every model) or one per beta.
  config.sweep.betas = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
  config.sweep.seeds = (0,)
  # KL weighting over training (vae_jax/sweep.py, Schedule): "constant" (each model
  # is exactly its single run), "warmup" (beta grows linearly over warmup_steps),
  # "capacity" (Burgess et al. 2018: -rec + beta * |KL - C|, C growing linearly
  # from 0 to capacity_nats over capacity_steps; the betas act as gamma).
  config.sweep.schedule = "constant"
  config.sweep.warmup_steps = 5000
  config.sweep.capacity_nats = 25.0
  config.sweep.capacity_steps = 20000
  if arg == "smoke":
    shrink_for_smoke(config, num_epochs=1)
    config.num_image_samples = 0
    config.sweep.betas = (0.5, 4.0)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; the only one is 'smoke'.")
  return config
