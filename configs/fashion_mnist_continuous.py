"""Fashion-MNIST as continuous data: grey levels, a Gaussian likelihood, bits/dim.

  python -m vae_jax.main --config=configs/fashion_mnist_continuous.py --workdir=runs/fm_cont
  python -m vae_jax.main --config=configs/fashion_mnist_continuous.py --workdir=runs/fm_cont \\
    --mode=evaluate --eval_num_samples=1000

Training images are dequantized, ``x = (pixel + u) / 256`` with fresh
``u ~ U[0, 1)`` every step (the test set with one fixed draw). The decoder gives
the Gaussian means and the model learns one observation variance shared by all
pixels (``likelihood="gaussian_learned"``, the sigma-VAE of Rybkin et al. 2021);
``--config.model.likelihood=gaussian --config.model.gaussian_variance=c`` fixes
it instead. The evaluation reports ``-log p(x)`` in nats and, as ``bits_per_dim``, the
bound on the 8-bit images' negative log-probability ``(nll + D ln 256) / (D ln 2)`` that
the dequantized density gives.

Model: the MLP of ``fashion_mnist_likelihood.py`` (784-300-300-(40)), Adam
5e-4, batch 100, 100 epochs. ``:smoke`` for a seconds-long run.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None):
  _, modifiers = parse_arg(arg)
  config = base_config()
  config.dataset = "fashion_mnist"
  config.binarization = "dequantize"
  config.model.likelihood = "gaussian_learned"
  config.model.gaussian_variance = 0.1  # The initial variance; it is learned.
  config.model.latents = 40
  config.model.encoder_hidden = (300, 300)
  config.optimizer.learning_rate = 5e-4
  config.batch_size = 100
  config.num_epochs = 100
  config.eval_every_steps = 6000  # Every 10 epochs.
  if "smoke" in modifiers:
    shrink_for_smoke(config, num_epochs=1)
    config.eval_every_steps = 0
  return config
