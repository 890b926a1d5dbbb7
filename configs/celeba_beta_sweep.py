"""Beta sweeps on CelebA 64x64 colour faces: the standard beta-VAE network, traversals.

  python -m vae_jax.main --config=configs/celeba_beta_sweep.py --workdir=runs/celeba \\
    --config.idx_dir=/path/to/celeba
  python -m vae_jax.main --workdir=runs/celeba --mode=evaluate --eval_num_samples=100
  python experiments/beta_sweep.py --workdir=runs/celeba   # table, plots, traversals

The data are CelebA's aligned faces (``config.dataset="celeba"``, from a local copy of
the published files: see docs/data.md), centre-cropped to 140x140 and resized to 64x64,
the standard 64x64 CelebA of the beta-VAE papers; the official partition's validation
split is the validation split. The same from the TFDS catalog (prepared beforehand in
ArrayRecord format): ``--config.dataset=tfds:celeb_a``.

The network is the standard beta-VAE architecture for 64x64 images (Higgins et al. 2017;
Burgess et al. 2018), in colour: four 4x4 stride-2 convolutions of 32, 32, 64 and 64
channels, a dense layer of 256, 32 latents (the papers' CelebA size), and the mirror image
as the decoder. The likelihood is the discretized logistic of the 8-bit pixels, so the
rates, distortions and ELBOs of the sweep are in nats of a probability and the ELBO is
also reported in bits/dim. Every beta of (1, 2, 4, 8, 16, 32) with seeds 0 and 1 is one
model of one compiled program; Adam 1e-4, batch 64, 20 epochs.

``:smoke`` is seconds long and needs no download: the photo patches scikit-learn ships
(``photos``), resized to 64x64, two betas, a tiny network.
"""

from vae_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
  _, modifiers = parse_arg(arg)
  config = base_config()
  config.dataset = "celeba"
  config.data.crop = (140, 140)
  config.data.resize = (64, 64)
  config.data.validation_split = "validation"
  config.binarization = "none"
  config.model.kind = "conv"
  config.model.conv_features = (32, 32, 64, 64)
  config.model.encoder_hidden = (256,)
  config.model.latents = 32
  config.model.likelihood = "discretized_logistic"
  config.optimizer.learning_rate = 1e-4
  config.batch_size = 64
  config.num_epochs = 20
  config.sweep.betas = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
  config.sweep.seeds = (0, 1)
  config.sweep.cross = True
  config.num_image_samples = 16
  config.log_every_steps = 200
  config.eval_every_steps = 2543  # Every epoch of the 162,770 training faces.
  config.checkpoint_every_steps = 2543
  if "smoke" in modifiers:
    config.dataset = "photos"
    config.data.crop = None
    config.data.validation_split = None
    config.data.max_train_examples = 400
    config.model.conv_features = (4, 4, 8, 8)
    config.model.encoder_hidden = (16,)
    config.model.latents = 4
    config.optimizer.learning_rate = 1e-3
    config.batch_size = 32
    config.num_epochs = 1
    config.sweep.betas = (1.0, 4.0)
    config.sweep.seeds = (0,)
    config.log_every_steps = 5
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.eval_batch_size = 64
  return config
