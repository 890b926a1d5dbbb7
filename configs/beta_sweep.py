"""A beta sweep on Fashion-MNIST: one compiled program trains every (beta, seed) model.

  python -m vae_jax.main --config=configs/beta_sweep.py --workdir=runs/beta_sweep
  python -m vae_jax.main --config=configs/beta_sweep.py --workdir=runs/beta_sweep \\
    --mode=evaluate --eval_num_samples=100
  python experiments/beta_sweep.py --workdir=runs/beta_sweep   # table and plots

Each model is the model and training of configs/fashion_mnist.py with its own
``beta`` and ``seed`` (see vae_jax/sweep.py). ``config.seed`` sets the data
order and dynamic binarization shared by all models; with the default single
seed 0, model ``beta=b`` is exactly
``python -m vae_jax.main --config=configs/fashion_mnist.py --config.beta=b``.
``config.beta`` is not used by a sweep. Every objective field applies to each
model as to a single run: e.g. ``--config.kl_warmup_epochs=5`` (linear KL
warm-up) or ``--config.capacity_nats=25 --config.capacity_epochs=40``
(Burgess et al. 2018's capacity annealing; the betas then act as gamma).
``:smoke`` is a seconds-long version.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None):
  _, modifiers = parse_arg(arg)
  # base_config() is the Flax example's recipe (spelled out in configs/mnist.py);
  # only what differs is set here.
  config = base_config()
  config.dataset = "fashion_mnist"
  config.num_image_samples = 0  # A sweep writes no per-evaluation image grids.
  # One model per beta; seeds: one (shared by every model) or one per beta.
  config.sweep.betas = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
  config.sweep.seeds = (0,)
  if "smoke" in modifiers:
    shrink_for_smoke(config, num_epochs=1)
    config.num_image_samples = 0
    config.sweep.betas = (0.5, 4.0)
  return config
