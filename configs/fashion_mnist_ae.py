"""Fashion-MNIST deterministic autoencoder: the baseline for the VAE of fashion_mnist.py.

The same MLP (784-500-20 / 20-500-784), data, optimizer and loop, but
``objective = "autoencoder"``: the decoder reconstructs from the encoder's mean,
with no sampling and no KL term, so the loss is the Bernoulli reconstruction
error alone.

  python -m vae_jax.main --config=configs/fashion_mnist_ae.py --workdir=runs/fm_ae
  python -m vae_jax.main --config=configs/fashion_mnist_ae.py --workdir=runs/fm_ae \
    --mode=evaluate

Evaluation reports its reconstruction error beside PCA's with as many
components (an autoencoder has no likelihood, ELBO or KL to report).
``configs/fashion_mnist_ae.py:2d`` has a 2-dimensional code, for the latent map
beside configs/fashion_mnist_2d.py's VAE; ``:smoke`` is a seconds-long version.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None):
  variant, modifiers = parse_arg(arg, choices=("2d",))
  # base_config() is the Flax example's recipe (spelled out in configs/mnist.py);
  # only what differs is set here.
  config = base_config()
  config.dataset = "fashion_mnist"
  config.objective = "autoencoder"
  if variant == "2d":
    config.model.latents = 2
    config.num_epochs = 20
  if "smoke" in modifiers:
    shrink_for_smoke(config, num_epochs=1)
  return config
