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

The objective is beta-VAE by default; append one of disentanglement_lib's others
(Locatello et al. 2019, table 7: their hyperparameter grids) as ``,<objective>``:

* ``annealed``: AnnealedVAE (Burgess et al. 2018), gamma = 1000 (``beta``), the capacity
  ``C`` swept over 5, 10, 25, 50, 75 and 100 nats, reached after 100,000 steps;
* ``factor``: FactorVAE (Kim & Mnih 2018), gamma over 10, 20, 30, 40, 50 and 100;
* ``dip_i``: DIP-VAE-I (Kumar et al. 2018), lambda_od over 1, 2, 5, 10, 20 and 50, lambda_d
  = 10 lambda_od;
* ``dip_ii``: DIP-VAE-II, lambda_od over the same, lambda_d = lambda_od;
* ``tcvae``: beta-TCVAE (Chen et al. 2018), beta over 1, 2, 4, 6, 8 and 10.

Each is one compiled sweep over its grid (``sweep.field``) with the protocol's seeds. The
``cpu`` protocol keeps every grid and 2 seeds; ``smoke`` two values of each. Run one
model with ``--config.sweep.field_values='(20.0,)'`` (or ``sweep.betas`` for beta).
"""

from vae_jax.config import base_config, parse_arg

PROTOCOLS = ("full", "cpu", "smoke")


OBJECTIVES = ("annealed", "factor", "dip_i", "dip_ii", "tcvae")
# objective -> (config.objective, swept field, its grid) of Locatello et al. (2019).
GRIDS = {
  "beta_vae": ("elbo", "beta", (1.0, 2.0, 4.0, 6.0, 8.0, 16.0)),
  "annealed": ("elbo", "capacity_nats", (5.0, 10.0, 25.0, 50.0, 75.0, 100.0)),
  "factor": ("factor_vae", "factor_vae.gamma", (10.0, 20.0, 30.0, 40.0, 50.0, 100.0)),
  "dip_i": ("dip_vae_i", "dip_vae.lambda_od", (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)),
  "dip_ii": ("dip_vae_ii", "dip_vae.lambda_od", (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)),
  "tcvae": ("beta_tcvae", "beta", (1.0, 2.0, 4.0, 6.0, 8.0, 10.0)),
}


def get_config(arg: str | None = None):
  protocol, parts = parse_arg(arg, choices=PROTOCOLS, modifiers=OBJECTIVES, default="full")
  chosen = [o for o in OBJECTIVES if o in parts]
  if len(chosen) > 1:
    raise ValueError(f"Choose one objective of {OBJECTIVES}, got {chosen}.")
  name = chosen[0] if chosen else "beta_vae"
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
  objective, field, grid = GRIDS[name]
  config.objective = objective
  if protocol == "smoke":
    grid = (grid[0], grid[2])
    config.factor_vae.hidden = (32, 32)
  config.sweep.betas = grid if field == "beta" else ()
  if field != "beta":
    config.sweep.field, config.sweep.field_values = field, grid
  if name == "annealed":
    config.beta = 1000.0  # gamma of Burgess et al.
    # The capacity grows over the first third of the run (100,000 of 300,000 steps).
    config.capacity_epochs = config.num_epochs / 3
  return config
