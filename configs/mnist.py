"""MNIST, the Flax example's MLP VAE (784-500-20 / 20-500-784), Bernoulli likelihood.

Adam 1e-3, batch 128, 30 epochs, dynamically binarized training images, test
images binarized once with a fixed seed.

  python -m vae_jax.main --config=configs/mnist.py --workdir=runs/mnist

``configs/mnist.py:smoke`` is a tiny, seconds-long version for checks; ``:cvae`` (or
``:cvae,smoke``) a conditional VAE on the ten digits (``config.model.num_classes``). Offline,
point ``--config.idx_dir`` (or ``$VAE_JAX_IDX_DIR``) at the four MNIST IDX files.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None):
  _, modifiers = parse_arg(arg, modifiers=("smoke", "cvae"))
  config = base_config()
  config.dataset = "mnist"
  config.binarization = "dynamic"
  config.model.latents = 20
  config.model.encoder_hidden = (500,)
  config.model.activation = "relu"
  config.model.likelihood = "bernoulli"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.num_epochs = 30
  if "cvae" in modifiers:  # A conditional VAE on the 10 classes (Sohn et al. 2015).
    config.model.num_classes = 10
  if "smoke" in modifiers:
    shrink_for_smoke(config)
  return config
