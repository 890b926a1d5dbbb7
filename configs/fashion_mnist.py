"""Fashion-MNIST with the MNIST config's model and training (see configs/mnist.py).

  python -m vae_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

``:cvae`` makes it a conditional VAE on the ten classes (``config.model.num_classes``;
generations per class, ``log p(x | y)`` in the evaluation), ``:smoke`` a seconds-long run.

Offline on Debian/Ubuntu, ``apt-get install dataset-fashion-mnist`` provides the
data, which is found in /usr/share/datasets/fashion-mnist without any flag. The
comparison with the Flax and PyTorch example VAEs uses
``--config.binarization=threshold --config.num_epochs=10``: test negative ELBO
about 128.5 nats or lower.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None):
  _, modifiers = parse_arg(arg, modifiers=("smoke", "cvae"))
  # base_config() is the Flax example's recipe (spelled out in configs/mnist.py);
  # only what differs is set here.
  config = base_config()
  config.dataset = "fashion_mnist"
  if "cvae" in modifiers:  # A conditional VAE on the 10 classes (Sohn et al. 2015).
    config.model.num_classes = 10
  if "smoke" in modifiers:
    shrink_for_smoke(config, num_epochs=1)
  return config
