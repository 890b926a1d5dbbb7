"""CIFAR-10 (32x32 colour): a residual VAE with PixelCNN++'s discretized logistic mixture,
reported in bits/dim.

  python -m vae_jax.main --config=configs/cifar10.py --workdir=runs/cifar10
  python -m vae_jax.main --workdir=runs/cifar10 --mode=evaluate --eval_num_samples=1000

The data are the published ``cifar-10-binary.tar.gz``, downloaded (online) or read from
``--config.idx_dir`` and checked against its published size and SHA-256, then prepared
once without TensorFlow. The same run on the TFDS catalog's copy, prepared beforehand in
ArrayRecord format: ``--config.dataset=tfds:cifar10``.

The likelihood is a probability of the 8-bit pixels (``binarization="none"``): per pixel,
a mixture of 10 discretized logistics over the three channels with PixelCNN++'s linear
channel coupling (Salimans et al. 2017; the likelihood of VDVAE and NVAE). Training rows,
the test ELBO and ``--mode=evaluate``'s importance-sampled ``-log p(x)`` are reported in
bits/dim, ``-log2 P(x) / 3072``.

Model: ``kind="resnet"`` (``networks.ResidualEncoder``): a 3x3 convolution, then two
pre-activation residual blocks at each of 64, 128 and 256 channels (32x32, 16x16, 8x8),
stride-2 convolutions between them, a dense layer of 512 and 128 latents; the decoder is
its mirror. Adam 1e-3 with gradient clipping at 200, batch 128, 200 epochs. A model with
one layer of latents is far from the records near 2.9 bits/dim, which need deep
hierarchies of latents (VDVAE, NVAE); this is the strong single-layer baseline.

``:smoke`` is a seconds-long colour run that needs no download: 32x32 patches of the two
photographs scikit-learn ships (``config.dataset="photos"``), a tiny residual VAE and a
3-component mixture. The tests run it.
"""

from vae_jax.config import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None):
  _, modifiers = parse_arg(arg)
  config = base_config()
  config.dataset = "cifar10"
  config.binarization = "none"  # The likelihood is of the pixel levels themselves.
  config.model.kind = "resnet"
  config.model.conv_features = (64, 128, 256)
  config.model.res_blocks = 2
  config.model.encoder_hidden = (512,)
  config.model.latents = 128
  config.model.likelihood = "discretized_logistic_mixture"
  config.model.mixture_components = 10
  config.optimizer.learning_rate = 1e-3
  config.optimizer.grad_clip_norm = 200.0
  config.batch_size = 128
  config.num_epochs = 200
  config.eval_every_steps = 3900  # Every 10 epochs.
  config.checkpoint_every_steps = 3900
  if "smoke" in modifiers:
    config.dataset = "photos"
    shrink_for_smoke(config)
    config.model.conv_features = (8, 16)
    config.model.res_blocks = 1
    config.model.encoder_hidden = (32,)
    config.model.latents = 8
    config.model.mixture_components = 3
    config.optimizer.learning_rate = 3e-3
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
  return config
