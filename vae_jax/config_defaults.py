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
  # "none" (grey levels / 255) | "threshold" | "dynamic" (a fresh Bernoulli draw
  # per step) | "dequantize" ((pixel + u) / 256, u ~ U[0, 1) per step; for
  # continuous likelihoods, reported in bits/dim). Test data: one fixed draw.
  c.binarization = "dynamic"
  # Held out from the end of the training split for early stopping (0: none).
  c.validation_examples = 0

  # Model (see vae_jax/models.py). Defaults: the Flax example's MLP VAE.
  c.model = ml_collections.ConfigDict()
  c.model.kind = "mlp"  # "mlp" | "conv": the networks that read and write x.
  c.model.latents = 20  # Latent dimensions (of the bottom layer z1 with two layers).
  c.model.encoder_hidden = (500,)  # Dense widths (after the convolutions for "conv").
  c.model.decoder_hidden = ml_collections.FieldReference(None, field_type=tuple)  # None: mirror.
  c.model.conv_features = (32, 64)  # "conv": channels of the stride-2 4x4 convolutions.
  c.model.activation = "relu"
  c.model.logvar_bound = 30.0  # Soft bound on |logvar|; keeps exp(logvar) and KL finite.
  # (low, high): clip the encoders' log-variances instead (VampPrior code: (-6, 2)).
  c.model.logvar_clip = ml_collections.FieldReference(None, field_type=tuple)
  # Gated dense units (W1 h + b1) * sigmoid(W2 h + b2) instead of activation(W h + b).
  c.model.gated = False
  c.model.kernel_init = "lecun_normal"  # "lecun_normal" (Flax) | "he_normal" (VampPrior code).
  # 2: q(z1|x) q(z2|z1), p(z2) p(z1|z2) p(x|z1), the IWAE paper's hierarchy.
  c.model.stochastic_layers = 1
  c.model.top_latents = 50  # Dimensions of z2 (two layers only).
  c.model.top_hidden = (100, 100)  # Widths of the z1 -> z2 MLP; z2 -> z1 mirrors them.
  # Two layers: "iwae" (q(z1|x) q(z2|z1), p(x|z1); Burda et al. 2015) | "vampprior"
  # (q(z2|x) q(z1|x,z2), p(z1|z2) p(x|z1,z2); Tomczak & Welling 2018).
  c.model.hierarchy = "iwae"
  # Prior of the top layer: "standard" (N(0, I)) | "vampprior" (mixture of the
  # encoder's posteriors at num_pseudo_inputs learned pseudo-inputs).
  c.model.prior = "standard"
  c.model.num_pseudo_inputs = 500
  c.model.pseudo_inputs_mean = 0.05  # Their initialization N(mean, std^2), clipped to [0, 1].
  c.model.pseudo_inputs_std = 0.01
  # "bernoulli" (decoder gives logits) | "gaussian" (means, fixed variance) |
  # "gaussian_learned" (means and one learned variance shared by all pixels).
  c.model.likelihood = "bernoulli"
  c.model.gaussian_variance = 1.0  # Observation variance c (the initial one if learned).

  # Objective.
  # "elbo" (VAE) | "iwae" (importance-weighted bound, k = num_samples) |
  # "autoencoder" (deterministic AE baseline: z = mean, no KL).
  c.objective = "elbo"
  c.beta = 1.0  # Weight of the KL term; 1 is the plain VAE. Test metrics always use beta=1.
  c.num_samples = 1  # Samples of z per example in the training objective (IWAE's k).
  c.gradient_estimator = "plain"  # "plain" | "dreg" (doubly reparameterized; iwae only).
  c.kl_warmup_epochs = 0.0  # Linear KL warm-up: beta_t = beta * min(1, t / warm-up).
  c.free_bits = 0.0  # Free bits, nats per latent dimension, batch-averaged (elbo only).

  # Optimization.
  c.optimizer = ml_collections.ConfigDict()
  # "adam" | "adam_iwae" (eps=1e-4) | "adam_normgrad" (each parameter's gradient
  # divided by its norm first, the VampPrior code's AdamNormGrad) | "adamw" | "sgd" | "rmsprop".
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0  # adamw only.
  c.optimizer.momentum = 0.0  # sgd only.
  c.optimizer.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)
  # Learning-rate schedule: "constant" | "cosine" (to 0 over num_epochs) |
  # "exponential" (times decay_rate every epoch) | "iwae" (Burda et al. 2015:
  # 10**(-i/7) for 3**i epochs, i = 0..7; 3,280 epochs in all).
  c.optimizer.schedule = "constant"
  c.optimizer.decay_rate = 1.0  # "exponential" only: factor per epoch.
  # Exponential moving average of the parameters, used for evaluation and
  # saved with the optimizer state (None: off). E.g. 0.999.
  c.optimizer.ema_decay = ml_collections.FieldReference(None, field_type=float)
  c.batch_size = 128
  c.num_epochs = 30
  # Early stopping on the validation split's ELBO (needs validation_examples):
  # stop after this many epochs without a better one (0: never). The best
  # parameters are saved in WORKDIR/best and are what --mode=evaluate reads.
  # Epochs of KL warm-up do not count against the patience (as in the VampPrior code).
  c.early_stopping_patience_epochs = 0

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
  # Skipped steps also leave the optimizer's step count behind, so a learning-rate
  # schedule then lags the step by the number skipped (KL warm-up does not).
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
    "num_epochs",  # Except with optimizer.schedule="cosine" (see train.config_differences).
    "early_stopping_patience_epochs",
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
