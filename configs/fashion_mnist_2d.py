"""Fashion-MNIST VAE with a 2-dimensional latent space, for pictures of the latent plane.

The fashion_mnist.py model (784-500-2 / 2-500-784 MLP, Bernoulli likelihood, Adam
1e-3, batch 128, dynamic binarization) with ``model.latents = 2``, 20 epochs:

  python -m vae_jax.main --config=configs/fashion_mnist_2d.py --workdir=runs/fm_2d
  python -m vae_jax.main --config=configs/fashion_mnist_2d.py --workdir=runs/fm_2d \
    --mode=evaluate

The second command writes ``images/eval_latent_map_<step>.png``: the test set's
posterior means coloured by class beside the PCA projection of the same images,
and the images decoded over a grid of the latent plane. ``:smoke`` is a
seconds-long version.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None):
  _, modifiers = parse_arg(arg)
  # base_config() is the Flax example's recipe (spelled out in configs/mnist.py);
  # only what differs is set here.
  config = base_config()
  config.dataset = "fashion_mnist"
  config.model.latents = 2
  config.num_epochs = 20
  if "smoke" in modifiers:
    shrink_for_smoke(config, num_epochs=1)
  return config
