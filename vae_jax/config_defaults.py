"""Every config field with its default and meaning; files in ``configs/`` start here.

Config files call ``base_config()`` and change what they need, so a field is
documented once and ``--config.<field>=<value>`` overrides are type-checked
against it (``ml_collections`` rejects unknown fields and wrong types).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All fields at their defaults: the Flax example's MNIST VAE recipe (784-500-20
  MLP, Bernoulli likelihood, Adam 1e-3, batch 128, 30 epochs, dynamic binarization)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root of every PRNG key (init, eps, shuffling, binarization).

  # Data (see vae_jax/input_pipeline.py).
  c.dataset = "mnist"  # "mnist" | "fashion_mnist".
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS dir; None: default.
  c.idx_dir = ml_collections.FieldReference(None, field_type=str)  # Local IDX files; None: find.
  c.binarization = "dynamic"  # "none" | "threshold" | "dynamic" (train); test: fixed draw.

  # Model (see vae_jax/models.py). Defaults: the Flax example's MLP VAE.
  c.model = ml_collections.ConfigDict()
  c.model.kind = "mlp"
  c.model.latents = 20
  c.model.encoder_hidden = (500,)
  c.model.decoder_hidden = ml_collections.FieldReference(None, field_type=tuple)  # None: mirror.
  c.model.activation = "relu"
  c.model.logvar_bound = 30.0  # Soft bound on |logvar|; keeps exp(logvar) and KL finite.
  c.model.likelihood = "bernoulli"  # "bernoulli" (decoder gives logits) | "gaussian" (means).
  c.model.gaussian_variance = 1.0  # Fixed observation variance c of the Gaussian likelihood.

  # Objective.
  # "elbo" (VAE) | "iwae" (importance-weighted bound, k = num_samples) |
  # "autoencoder" (deterministic AE baseline: z = mean, no KL).
  c.objective = "elbo"
  c.beta = 1.0  # Weight of the KL term; 1 is the plain VAE. Test metrics always use beta=1.
  c.num_samples = 1  # Samples of z per example in the training objective (IWAE's k).

  # Optimization.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"  # "adam" | "adamw" | "sgd" | "rmsprop".
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0  # adamw only.
  c.optimizer.momentum = 0.0  # sgd only.
  c.optimizer.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)
  c.batch_size = 128
  c.num_epochs = 30

  # Devices: the batch is split over a 1-D "data" mesh of this many devices
  # (0: all visible ones); state and data are replicated on each.
  c.num_devices = 0

  # Loop, evaluation and outputs. 0 means "once per epoch".
  c.steps_per_dispatch = 100  # Train steps run by one jitted call (lax.scan).
  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.eval_batch_size = 1000
  c.checkpoint_every_steps = 0
  c.keep_checkpoints = 3
  c.num_image_samples = 64  # Prior samples and reconstructions shown per evaluation.
  c.progress_bar = True

  # A NaN/Inf loss or gradient: "stop" (before anything of it is saved) or
  # "skip" (drop that update, count it; stop once more than max_nonfinite_skips).
  c.nonfinite_policy = "stop"
  c.max_nonfinite_skips = 10
  return c


def shrink_for_smoke(config: ml_collections.ConfigDict, num_epochs: int = 2) -> None:
  """The ``:smoke`` variant of a config: a tiny model and run that exercise every
  code path in seconds (used by the tests and for quick checks)."""
  config.model.latents = 2
  config.model.encoder_hidden = (16,)
  config.batch_size = 32
  config.num_epochs = num_epochs
  config.steps_per_dispatch = 4
  config.log_every_steps = 5
  config.eval_batch_size = 64
  config.num_image_samples = 16


# Fields that may change when a run resumes from its workdir: they change how
# long or how visibly it runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
  {
    "num_epochs",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "num_image_samples",
    "progress_bar",
    "nonfinite_policy",
    "max_nonfinite_skips",
    "num_devices",
    "data_dir",
    "idx_dir",
  }
)
