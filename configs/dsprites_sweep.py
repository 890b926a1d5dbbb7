"""Beta sweeps on dSprites for disentanglement (Higgins et al. 2017; Locatello et al. 2019).

  python -m vae_jax.main --config=configs/dsprites_sweep.py:cpu --workdir=runs/dsprites_cpu
  python -m vae_jax.main --config=configs/dsprites_sweep.py:cpu --workdir=runs/dsprites_cpu \\
    --mode=evaluate --eval_num_samples=10
  python experiments/beta_sweep.py --workdir=runs/dsprites_cpu   # table and plots

The model is disentanglement_lib's standard convolutional VAE for 64x64 images:
four 4x4 stride-2 convolutions of 32, 32, 64 and 64 channels, a dense layer of
256, z = 10, and the mirror image (transposed convolutions) as the decoder, with
a Bernoulli likelihood on the binary sprites. Every model of the sweep is that
model with its own beta and seed; ``--mode=evaluate`` adds the beta-VAE,
FactorVAE, MIG, SAP and DCI scores of each (``vae_jax/disentanglement.py``).

Arguments (``--config=configs/dsprites_sweep.py:<arg>``):

* ``full`` (the default): disentanglement_lib's protocol for an accelerator: the
  published dSprites (737,280 images; downloaded and verified on first use, or
  ``--config.idx_dir`` holding the npz), Adam 1e-4, batch 64, 26 epochs (299,520
  steps, its 300,000), betas 1, 2, 4, 6, 8, 16 and seeds 0, 1, 2, the metrics at
  disentanglement_lib's point counts.
* ``cpu``: a protocol two CPU cores train in under an hour (about 3 s a step for
  all 12 models): 12 models on the coarser rendered grid ``dsprites_cpu``
  (46,080 images: every fourth orientation, every other position; rendered
  offline, not the published pixels), Adam 5e-4, batch 64, 1 epoch (720 steps,
  against disentanglement_lib's 300,000), betas 1, 2, 4, 6, 8, 16 and seeds 0
  and 1, the metrics at about a tenth of the points
  (``disentanglement_counts="cpu"``).
* ``smoke``: seconds, on the 600-image ``dsprites_smoke`` grid.

Append ``,tcvae`` for beta-TCVAE (Chen et al. 2018) instead of the beta-VAE: the
betas then weight the total correlation. Run the sweep's models one at a time
with ``--config.sweep.betas='(4.0,)'``.
"""

from vae_jax.config import base_config, parse_arg

PROTOCOLS = ("full", "cpu", "smoke")


def get_config(arg: str | None = None):
  protocol, parts = parse_arg(arg, choices=PROTOCOLS, modifiers=("tcvae",), default="full")
  config = base_config()
  config.dataset = "dsprites"
  config.binarization = "none"  # The sprites are binary already.
  config.model.kind = "conv"
  config.model.conv_features = (32, 32, 64, 64)
  config.model.encoder_hidden = (256,)
  config.model.latents = 10
  config.model.likelihood = "bernoulli"
  config.optimizer.learning_rate = 1e-4
  config.batch_size = 64
  config.num_epochs = 26
  config.sweep.betas = (1.0, 2.0, 4.0, 6.0, 8.0, 16.0)
  config.sweep.seeds = (0, 1, 2)
  config.sweep.cross = True  # Every beta with every seed.
  config.num_image_samples = 0
  config.log_every_steps = 200
  config.eval_every_steps = 11520  # Every epoch of the full grid.
  config.checkpoint_every_steps = 11520
  if protocol == "cpu":
    config.dataset = "dsprites_cpu"
    config.optimizer.learning_rate = 5e-4
    config.num_epochs = 1
    config.sweep.seeds = (0, 1)
    config.eval_every_steps = 0  # Every epoch (720 steps).
    config.checkpoint_every_steps = 0
    config.disentanglement_counts = "cpu"
  elif protocol == "smoke":
    config.dataset = "dsprites_smoke"
    config.model.conv_features = (4, 4, 4, 4)
    config.model.encoder_hidden = (8,)
    config.model.latents = 3
    config.optimizer.learning_rate = 1e-3
    config.batch_size = 16
    config.num_epochs = 1
    config.sweep.betas = (1.0, 4.0)
    config.sweep.seeds = (0,)
    config.log_every_steps = 5
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.eval_batch_size = 32
    config.disentanglement_counts = "cpu"
  if "tcvae" in parts:
    config.objective = "beta_tcvae"
  return config
