"""Every config field, its default and meaning, the choices and the rules it obeys.

The bottom floor of vae_jax: it imports nothing of the package but ``errors``, so a
config file (``configs/*.py``) imports only ``ml_collections`` and this module.

Config files call ``base_config()`` and change what they need, so a field is
documented once here and ``--config.<field>=<value>`` overrides are type-checked
against it (``ml_collections`` rejects unknown fields and wrong types).
``validate(config)`` is the one place that checks values: every numeric field's range
and finiteness, every choice, and the rules between fields; each command validates
once, before anything is created. ``CHOICES`` declares the names each string field
takes; the modules that implement them keep one registry each, and a test checks that
the two agree. ``parse_arg`` reads a config file's argument (``:vae,iwae,smoke``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections

from vae_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config value, or a combination of values, that the run cannot use; the message
  names the field and what to change."""


# The names each string field takes. The implementing modules' registries hold the same
# keys (tests/test_config.py checks each pair).
CHOICES: dict[str, tuple[str, ...]] = {
  # Or "tfds:<name>" of the TFDS catalog (see check_choice).
  "dataset": (
    "mnist",
    "fashion_mnist",
    "cifar10",
    "celeba",
    "photos",
    "dsprites",
    "dsprites_rendered",
    "dsprites_cpu",
    "dsprites_smoke",
  ),
  "data.feed": ("auto", "device", "stream"),
  "binarization": ("none", "threshold", "dynamic", "dequantize"),
  "model.kind": ("mlp", "conv", "resnet"),
  "model.activation": ("relu", "tanh", "gelu", "elu", "softplus", "swish"),
  "model.kernel_init": ("lecun_normal", "he_normal"),
  "model.hierarchy": ("iwae", "vampprior"),
  "model.prior": ("standard", "vampprior"),
  "model.likelihood": (
    "bernoulli",
    "continuous_bernoulli",
    "gaussian",
    "gaussian_learned",
    "discretized_logistic",
    "discretized_gaussian",
    "discretized_logistic_mixture",
  ),
  "objective": (
    "elbo",
    "iwae",
    "miwae",
    "ciwae",
    "piwae",
    "autoencoder",
    "beta_tcvae",
    "factor_vae",
    "dip_vae_i",
    "dip_vae_ii",
  ),
  "gradient_estimator": ("plain", "dreg"),
  "optimizer.name": ("adam", "adam_iwae", "adam_normgrad", "adamw", "sgd", "rmsprop"),
  "optimizer.schedule": ("constant", "cosine", "exponential", "iwae"),
  "nonfinite_policy": ("stop", "skip"),
  "matmul_precision": ("default", "high", "highest"),
  "disentanglement_counts": ("disentanglement_lib", "cpu"),
}


TFDS_PREFIX = "tfds:"  # config.dataset="tfds:<name>": a dataset of the TFDS catalog.
# Objectives that train a network of their own beside the VAE (objectives.AUXILIARY).
AUXILIARY_OBJECTIVES = ("factor_vae",)
# The fields a sweep may vary across the models of one compiled program (sweep.field; the
# default axis, beta, is sweep.betas): scalars the loss reads, traced per model. Fields
# that change the shapes of the parameters (model.latents) need one run each.
# The bounds of importance weights (Burda et al. 2016; Rainforth et al. 2018): no KL weight.
IMPORTANCE_WEIGHTED_OBJECTIVES = ("iwae", "miwae", "ciwae", "piwae")

SWEEP_FIELDS = (
  "beta",
  "free_bits",
  "capacity_nats",
  "ciwae_beta",
  "factor_vae.gamma",
  "dip_vae.lambda_od",
  "dip_vae.lambda_d",
  "optimizer.learning_rate",
)

# The likelihoods of pixel levels (vae_jax.likelihoods' discrete ones for any data).
DISCRETIZED_LIKELIHOODS = (
  "discretized_logistic",
  "discretized_gaussian",
  "discretized_logistic_mixture",
)


def check_choice(field: str, value: Any) -> None:
  """Raises ``ConfigError`` unless ``value`` is one of ``CHOICES[field]`` (or, for the
  dataset, ``"tfds:<name>"``)."""
  if field == "dataset" and isinstance(value, str) and value.startswith(TFDS_PREFIX):
    if len(value) > len(TFDS_PREFIX):
      return
  if value not in CHOICES[field]:
    also = ", or 'tfds:<name>' of the TFDS catalog" if field == "dataset" else ""
    raise ConfigError(f"config.{field}={value!r} is not one of {CHOICES[field]}{also}.")


def base_config() -> ml_collections.ConfigDict:
  """All fields at their defaults: the Flax example's MNIST VAE recipe (784-500-20
  MLP, Bernoulli likelihood, Adam 1e-3, batch 128, 30 epochs, dynamic binarization)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root of every PRNG key (init, eps, shuffling, binarization).

  # Data (see vae_jax/datasets.py and vae_jax/input_pipeline.py).
  # Built in, prepared without TensorFlow: "mnist" | "fashion_mnist" | "cifar10" | "celeba"
  # (aligned, from a local copy) | "photos" (colour patches of scikit-learn's sample
  # photographs, offline) | "dsprites" (the published file) | "dsprites_rendered" (the same
  # factor grid rendered offline) | "dsprites_cpu" (a coarser grid) | "dsprites_smoke".
  # Or any TFDS image dataset as "tfds:<name>", e.g. "tfds:svhn_cropped", prepared
  # beforehand in ArrayRecord format.
  c.dataset = "mnist"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS dir; None: default.
  # A directory holding the dataset's published files (None: $VAE_JAX_IDX_DIR, where the
  # system installs them, or a download).
  c.idx_dir = ml_collections.FieldReference(None, field_type=str)
  # "none" (levels / (2**bits - 1), grey levels in [0, 1]) | "threshold" | "dynamic" (a
  # fresh Bernoulli draw per step) | "dequantize" ((level + u) / 2**bits, u ~ U[0, 1) per
  # step; for continuous likelihoods, reported in bits/dim). Test data: one fixed draw.
  c.binarization = "dynamic"
  # Held out from the end of the training split for early stopping (0: none).
  c.validation_examples = 0
  c.data = ml_collections.ConfigDict()
  # Use only the first N images of the training split (None: all), e.g. for a smoke run or
  # a study of data efficiency; validation_examples are then held out from these.
  c.data.max_train_examples = ml_collections.FieldReference(None, field_type=int)
  # The dataset's splits the run trains and tests on, and a split to validate on instead of
  # validation_examples held out of the training split (None: none).
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.validation_split = ml_collections.FieldReference(None, field_type=str)
  # The image feature of a TFDS dataset that has several (None: its only one).
  c.data.image_feature = ml_collections.FieldReference(None, field_type=str)
  # How the images are shaped, on the host as they are read: a centre crop (h, w), then a
  # resize to (h, w) (antialiased bilinear), the channels (1: grey, 3: RGB; None: as
  # stored) and the bit depth kept (8; 5 as some CelebA-HQ papers: pixel >> 3).
  c.data.crop = ml_collections.FieldReference(None, field_type=tuple)
  c.data.resize = ml_collections.FieldReference(None, field_type=tuple)
  c.data.channels = ml_collections.FieldReference(None, field_type=int)
  c.data.bits = 8
  # How the training split reaches the device: "device" (all of it in device memory once,
  # batches gathered there: the fastest), "stream" (read from the prepared files as the run
  # goes, by data.read_threads threads ahead of the device, through Grain; each process of
  # a multi-host run reads only its rows of each batch) or "auto" (device when the split,
  # as uint8 images, fits in data.device_memory_mib).
  c.data.feed = "auto"
  c.data.device_memory_mib = 4096
  # Threads reading the stream (0: half the host's cores, at most 8).
  c.data.read_threads = 0

  # Model (see vae_jax/models.py). Defaults: the Flax example's MLP VAE.
  c.model = ml_collections.ConfigDict()
  c.model.kind = "mlp"  # "mlp" | "conv" | "resnet": the networks that read and write x.
  c.model.latents = 20  # Latent dimensions (of the bottom layer z1 with two layers).
  c.model.encoder_hidden = (500,)  # Dense widths (after the convolutions for "conv").
  c.model.decoder_hidden = ml_collections.FieldReference(None, field_type=tuple)  # None: mirror.
  # "conv": channels of the stride-2 4x4 convolutions; "resnet": channels at each
  # resolution, the first at the image's (networks.ResidualEncoder).
  c.model.conv_features = (32, 64)
  c.model.res_blocks = 2  # "resnet": residual blocks per resolution.
  c.model.activation = "relu"
  c.model.logvar_bound = 30.0  # Soft bound on |logvar|; keeps exp(logvar) and KL finite.
  # (low, high): clip the encoders' log-variances instead (VampPrior code: (-6, 2)).
  c.model.logvar_clip = ml_collections.FieldReference(None, field_type=tuple)
  # Gated dense units (W1 h + b1) * sigmoid(W2 h + b2) instead of activation(W h + b).
  c.model.gated = False
  c.model.kernel_init = "lecun_normal"  # "lecun_normal" (Flax) | "he_normal" (VampPrior code).
  # 2: two stochastic layers, arranged as model.hierarchy says.
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
  # k > 0: a conditional VAE (Sohn et al. 2015) on the dataset's class labels 0 .. k - 1:
  # q(z | x, y) and p(x | z, y) read the one-hot label, the prior is N(0, I), and the
  # evaluation's likelihood is log p(x | y). One stochastic layer, standard prior.
  c.model.num_classes = 0
  # "bernoulli" (decoder gives logits; a likelihood of binary images, only the
  # negative cross-entropy of grey levels) | "continuous_bernoulli" (logits; a
  # density of grey levels in [0, 1], Loaiza-Ganem & Cunningham 2019) |
  # "gaussian" (means, fixed variance) | "gaussian_learned" (means and one learned
  # variance shared by all pixels) | for pixel levels (binarization "none"), reported in
  # bits/dim: "discretized_logistic" (a mean and log-scale per channel; Kingma et al.
  # 2016) | "discretized_gaussian" | "discretized_logistic_mixture" (PixelCNN++'s mixture
  # with RGB coupling, Salimans et al. 2017; model.mixture_components of them).
  c.model.likelihood = "bernoulli"
  c.model.gaussian_variance = 1.0  # Observation variance c (the initial one if learned).
  c.model.mixture_components = 10  # K of "discretized_logistic_mixture" (PixelCNN++: 10).

  # Objective (see vae_jax/objectives.py).
  # "elbo" (VAE) | "iwae" (importance-weighted bound, k = num_samples) |
  # "autoencoder" (deterministic AE baseline: z = mean, no KL) | "beta_tcvae"
  # (Chen et al. 2018: the ELBO with beta weighting the total correlation instead).
  c.objective = "elbo"
  c.beta = 1.0  # Weight of the KL term; 1 is the plain VAE. Test metrics always use beta=1.
  c.num_samples = 1  # Samples of z per example in the training objective (IWAE's k).
  c.gradient_estimator = "plain"  # "plain" | "dreg" (doubly reparameterized; iwae only).
  c.free_bits = 0.0  # Free bits, nats per latent dimension, batch-averaged (elbo only).
  # The KL weight over training, one schedule for single runs and sweeps (elbo only):
  # linear warm-up, beta_t = beta * min(1, t / warm-up), over this many epochs.
  c.kl_warmup_epochs = 0.0
  # Capacity annealing (Burgess et al. 2018) instead, when capacity_nats > 0: the
  # loss -reconstruction + beta * |KL - C_t|, C_t growing linearly from 0 to
  # capacity_nats over capacity_epochs.
  c.capacity_nats = 0.0
  c.capacity_epochs = 1.0
  # The bounds of Rainforth et al. (2018): "miwae" (the mean of num_groups IWAE bounds of
  # num_samples samples each) | "ciwae" (ciwae_beta * ELBO + (1 - ciwae_beta) * IWAE of
  # num_samples samples) | "piwae" (the decoder trained on the IWAE bound of all
  # num_groups * num_samples samples, the encoder on their MIWAE bound).
  c.num_groups = 1
  c.ciwae_beta = 0.5
  # "factor_vae" (Kim & Mnih 2018): the ELBO minus gamma times the total correlation, which
  # a discriminator between samples of q(z) and of the product of its marginals estimates;
  # the discriminator is trained beside the VAE with its own Adam (disentanglement_lib's
  # settings: 6 layers of 1000 leaky-ReLU units, learning rate 1e-4, b1 0.5, b2 0.9).
  c.factor_vae = ml_collections.ConfigDict()
  c.factor_vae.gamma = 10.0
  c.factor_vae.hidden = (1000, 1000, 1000, 1000, 1000, 1000)
  c.factor_vae.learning_rate = 1e-4
  c.factor_vae.b1 = 0.5
  c.factor_vae.b2 = 0.9
  # "dip_vae_i" / "dip_vae_ii" (Kumar et al. 2018): the ELBO minus lambda_od times the squared
  # off-diagonal covariances of the aggregate posterior and lambda_d times its diagonal's
  # squared distance from 1. lambda_d None: 10 * lambda_od for DIP-VAE-I, lambda_od for
  # DIP-VAE-II (the paper's and disentanglement_lib's choices).
  c.dip_vae = ml_collections.ConfigDict()
  c.dip_vae.lambda_od = 10.0
  c.dip_vae.lambda_d = ml_collections.FieldReference(None, field_type=float)

  # Optimization (see vae_jax/optim.py).
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
  # Epochs of KL warm-up do not count against the patience (as in the VampPrior
  # code). A sweep stops when every model has run out of patience.
  c.early_stopping_patience_epochs = 0
  # The run's length in steps, instead of num_epochs (None: num_epochs epochs). A run
  # that is not a whole number of epochs ends inside one.
  c.num_train_steps = ml_collections.FieldReference(None, field_type=int)

  # A sweep (see vae_jax/sweep.py): one model per (beta, seed), trained as one
  # compiled program. Empty betas: a single run with config.beta and config.seed.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.betas = ()
  c.sweep.seeds = (0,)  # One seed shared by every model, or one per beta (or value).
  c.sweep.cross = False  # True: a model for every (beta, seed) pair of the two lists.
  # Or another scalar hyperparameter as the axis, instead of betas: sweep.field names it
  # (one of SWEEP_FIELDS, e.g. "factor_vae.gamma") and sweep.field_values holds its values.
  c.sweep.field = ml_collections.FieldReference(None, field_type=str)
  c.sweep.field_values = ()

  # Disentanglement metrics in --mode=evaluate, for datasets with ground-truth factors
  # (dSprites): "disentanglement_lib" (its point counts) | "cpu" (about 10x fewer).
  c.disentanglement_counts = "disentanglement_lib"

  # Matmul precision of training on GPUs and TPUs: "default" (the platform's, e.g.
  # TF32 or bfloat16 passes) | "high" | "highest" (full float32). Reported numbers
  # (test ELBO, --mode=evaluate) are always computed at "highest".
  c.matmul_precision = "default"

  # Devices: the batch is split over a 1-D "data" mesh of this many devices
  # (0: all visible ones); state and data are replicated on each.
  c.num_devices = 0

  # Loop, evaluation and outputs. 0 means "once per epoch".
  # Train steps run by one jitted call (a lax.scan), at most an epoch. None: decided when
  # the run is built (vae_jax/execution.py): 100, or 1 for a convolutional model on CPU,
  # where XLA runs convolutions inside loop bodies many times slower. A number wins.
  c.steps_per_dispatch = ml_collections.FieldReference(None, field_type=int)
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
  code path in seconds (used by the tests and for quick checks), on the first 400
  training images of whatever dataset the config names."""
  config.model.latents = 2
  config.model.encoder_hidden = (16,)
  config.batch_size = 32
  config.num_epochs = num_epochs
  config.data.max_train_examples = 400
  if config.model.kind == "mlp":  # Convolutions on CPU keep execution.plan's 1.
    config.steps_per_dispatch = 4  # Several dispatches per (12-step) epoch.
  config.log_every_steps = 5
  config.eval_batch_size = 64
  config.num_image_samples = 16


def parse_arg(
  arg: str | None,
  *,
  choices: Sequence[str] = (),
  modifiers: Sequence[str] = ("smoke",),
  default: str | None = None,
  required: bool = False,
) -> tuple[str | None, frozenset[str]]:
  """A config file's argument, ``--config=FILE:ARG``: ``"hvae,iwae,smoke"`` ->
  ``("hvae", {"iwae", "smoke"})``.

  ``ARG`` is comma-separated: at most one of ``choices`` (else ``default``) and any of
  ``modifiers``. With ``required``, a choice must be given.

  Raises:
    ConfigError: an unknown word, two choices, or a missing required choice.
  """
  words = [w for w in (arg or "").split(",") if w]
  picked = [w for w in words if w in choices]
  unknown = [w for w in words if w not in choices and w not in modifiers]
  choice = picked[0] if picked else default
  if unknown or len(picked) > 1 or (required and choice is None):
    takes = []
    if choices:
      takes.append(f"one of {', '.join(choices)}" + ("" if required else " (or none)"))
    if modifiers:
      words = " and ".join(f"'{m}'" for m in modifiers)
      takes.append(f"optionally followed by {words}, comma-separated" if choices else words)
    raise ConfigError(
      f"Unknown config argument {arg!r}: this config takes {', '.join(takes) or 'none'}; "
      "e.g. --config=FILE:" + ",".join([*choices[:1], *modifiers[-1:]]) + "."
    )
  return choice, frozenset(w for w in words if w in modifiers)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested dict as ``{"model.latents": 20, ...}``; tuples as lists (as JSON has them)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config``'s fields as ``{"model.latents": 20, ...}``, with the values JSON gives."""
  return flatten(json.loads(config.to_json()))


def describe(config: ml_collections.ConfigDict) -> str:
  """The fields of ``config`` that differ from ``base_config()``, one ``field = value`` per
  line: what a reader of a run's log needs to know of its config."""
  defaults, now = flat(base_config()), flat(config)
  lines = [f"  {k} = {v!r}" for k, v in sorted(now.items()) if defaults.get(k, object()) != v]
  return "\n".join(lines) or "  (every field at its default)"


def is_sweep(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` describes a sweep (``config.sweep.betas`` or ``sweep.field_values``
  non-empty)."""
  return bool(config.sweep.betas) or bool(config.sweep.field_values)


# --------------------------------------------------------------------------
# Values.

# Numeric fields: (kind, low, high, interval). Every value must be finite; kind
# "int" excludes booleans and floats; the interval says which ends are included.
_INT, _FLOAT = "int", "float"
_INF = math.inf
_NUMBERS: dict[str, tuple[str, float, float, str]] = {
  # jax.random.key(seed) keeps the seed's low 32 bits and sign: 2**32 + 5 draws what 5
  # does, and -1 what 2**32 - 1 does. Only [0, 2**32) names one stream per seed.
  "seed": (_INT, 0, 2**32 - 1, "[]"),
  "validation_examples": (_INT, 0, _INF, "[)"),
  "model.latents": (_INT, 1, _INF, "[)"),
  "model.logvar_bound": (_FLOAT, 0, _INF, "()"),
  "model.stochastic_layers": (_INT, 1, 2, "[]"),
  "model.top_latents": (_INT, 1, _INF, "[)"),
  "model.num_pseudo_inputs": (_INT, 1, _INF, "[)"),
  "model.num_classes": (_INT, 0, _INF, "[)"),
  "model.pseudo_inputs_mean": (_FLOAT, -_INF, _INF, "()"),
  "model.pseudo_inputs_std": (_FLOAT, 0, _INF, "[)"),
  "model.gaussian_variance": (_FLOAT, 0, _INF, "()"),
  "beta": (_FLOAT, 0, _INF, "[)"),
  "num_samples": (_INT, 1, _INF, "[)"),
  "free_bits": (_FLOAT, 0, _INF, "[)"),
  "kl_warmup_epochs": (_FLOAT, 0, _INF, "[)"),
  "capacity_nats": (_FLOAT, 0, _INF, "[)"),
  "num_groups": (_INT, 1, _INF, "[)"),
  "ciwae_beta": (_FLOAT, 0, 1, "[]"),
  "factor_vae.gamma": (_FLOAT, 0, _INF, "[)"),
  "factor_vae.learning_rate": (_FLOAT, 0, _INF, "()"),
  "factor_vae.b1": (_FLOAT, 0, 1, "[)"),
  "factor_vae.b2": (_FLOAT, 0, 1, "[)"),
  "dip_vae.lambda_od": (_FLOAT, 0, _INF, "[)"),
  "dip_vae.lambda_d": (_FLOAT, 0, _INF, "[)"),
  "capacity_epochs": (_FLOAT, 0, _INF, "()"),
  "optimizer.learning_rate": (_FLOAT, 0, _INF, "[)"),
  "optimizer.weight_decay": (_FLOAT, 0, _INF, "[)"),
  "optimizer.momentum": (_FLOAT, 0, 1, "[)"),
  "optimizer.grad_clip_norm": (_FLOAT, 0, _INF, "()"),
  "optimizer.decay_rate": (_FLOAT, 0, 1, "(]"),
  "optimizer.ema_decay": (_FLOAT, 0, 1, "[)"),
  "batch_size": (_INT, 1, _INF, "[)"),
  "num_epochs": (_INT, 1, _INF, "[)"),
  "early_stopping_patience_epochs": (_INT, 0, _INF, "[)"),
  "num_train_steps": (_INT, 1, _INF, "[)"),
  "data.max_train_examples": (_INT, 1, _INF, "[)"),
  "data.channels": (_INT, 1, 3, "[]"),
  "model.mixture_components": (_INT, 1, _INF, "[)"),
  "model.res_blocks": (_INT, 0, _INF, "[)"),
  "data.bits": (_INT, 1, 8, "[]"),
  "data.device_memory_mib": (_INT, 0, _INF, "[)"),
  "data.read_threads": (_INT, 0, _INF, "[)"),
  "num_devices": (_INT, 0, _INF, "[)"),
  "steps_per_dispatch": (_INT, 1, _INF, "[)"),
  "log_every_steps": (_INT, 1, _INF, "[)"),
  "eval_every_steps": (_INT, 0, _INF, "[)"),
  "eval_batch_size": (_INT, 1, _INF, "[)"),
  "checkpoint_every_steps": (_INT, 0, _INF, "[)"),
  "keep_checkpoints": (_INT, 1, _INF, "[)"),
  "num_image_samples": (_INT, 0, _INF, "[)"),
  "max_nonfinite_skips": (_INT, 0, _INF, "[)"),
}
# Fields whose None means "off" (or "default").
_OPTIONAL = {
  "dip_vae.lambda_d",
  "model.logvar_bound",
  "optimizer.grad_clip_norm",
  "optimizer.ema_decay",
  "num_train_steps",
  "data.max_train_examples",
  "data.channels",
  "steps_per_dispatch",
}
# Tuples of positive integers: layer widths.
_WIDTHS = (
  "model.encoder_hidden",
  "model.decoder_hidden",
  "model.conv_features",
  "model.top_hidden",
  "factor_vae.hidden",
)
_OPTIONAL_WIDTHS = {"model.decoder_hidden"}
# Image sizes (h, w): two positive integers, or None.
_SIZES = ("data.crop", "data.resize")


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def _range_text(path: str) -> str:
  """The range of a numeric field as a reader writes it: ``>= 0``, ``> 0`` or ``[0, 1]``."""
  _, low, high, interval = _NUMBERS[path]
  if high == math.inf:
    return f"{'>=' if interval[0] == '[' else '>'} {low:g}"
  return f"{interval[0]}{low:g}, {high:g}{interval[1]}"


def _in_range(path: str, value: float) -> bool:
  _, low, high, interval = _NUMBERS[path]
  above = value >= low if interval[0] == "[" else value > low
  below = value <= high if interval[1] == "]" else value < high
  return above and below


def _check_number(path: str, value: Any) -> None:
  kind = _NUMBERS[path][0]
  is_int = isinstance(value, int) and not isinstance(value, bool)
  if kind == _INT and not is_int:
    raise ConfigError(f"config.{path} must be an integer, got {value!r}.")
  if kind == _FLOAT and (isinstance(value, bool) or not isinstance(value, int | float)):
    raise ConfigError(f"config.{path} must be a number, got {value!r}.")
  if not math.isfinite(value):
    raise ConfigError(f"config.{path} must be finite, got {value!r}.")
  if not _in_range(path, value):
    raise ConfigError(f"config.{path}={value!r} is out of range: it must be {_range_text(path)}.")


def _check_fields(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Range, finiteness and choice of every field whose path starts with ``prefix``."""
  for path in _NUMBERS:
    if not path.startswith(prefix):
      continue
    value = _get(config, path)
    if value is None and path in _OPTIONAL:
      continue
    _check_number(path, value)
  for path in _WIDTHS:
    if not path.startswith(prefix):
      continue
    value = _get(config, path)
    if value is None and path in _OPTIONAL_WIDTHS:
      continue
    if (
      not isinstance(value, tuple | list)
      or not value
      or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in value)
    ):
      raise ConfigError(
        f"config.{path} must be a non-empty tuple of positive integers (layer widths), "
        f"got {value!r}; e.g. --config.{path}='(300, 300)'."
      )
  for path in _SIZES:
    if not path.startswith(prefix) or (value := _get(config, path)) is None:
      continue
    if not (
      isinstance(value, tuple | list) and len(value) == 2
      and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):  # fmt: skip
      raise ConfigError(
        f"config.{path} must be (height, width) in pixels, got {value!r}; e.g. "
        f"--config.{path}='(64, 64)'."
      )
  if prefix == "" and config.data.channels == 2:
    raise ConfigError("config.data.channels must be 1 (grey) or 3 (RGB), got 2.")
  for path in CHOICES:
    if path.startswith(prefix):
      check_choice(path, _get(config, path))


def check_model(model: ml_collections.ConfigDict) -> None:
  """Checks a ``config.model`` section on its own: every value, and the rules between its
  fields. ``validate`` calls it for a config; ``models.make_vae`` for its arguments.

  Raises:
    ConfigError: naming the field and what to change.
  """
  m = model
  _check_fields(ml_collections.ConfigDict({"model": m}), prefix="model.")
  clip = m.logvar_clip
  if clip is not None and not (
    len(clip) == 2 and all(isinstance(v, int | float) and math.isfinite(v) for v in clip)
    and clip[0] < clip[1]
  ):  # fmt: skip
    raise ConfigError(
      f"config.model.logvar_clip must be (low, high) with finite low < high, got {clip!r}."
    )
  if m.prior == "vampprior" and m.stochastic_layers == 2 and m.hierarchy != "vampprior":
    raise ConfigError(
      "config.model.prior='vampprior' with two stochastic layers needs "
      "model.hierarchy='vampprior' (the 'iwae' hierarchy encodes z2 from z1, not from x)."
    )
  if m.gated and m.kind != "mlp":
    raise ConfigError("config.model.gated=True is for model.kind='mlp'.")
  if m.stochastic_layers == 2 and m.hierarchy == "vampprior" and m.kind != "mlp":
    raise ConfigError("config.model.hierarchy='vampprior' is built from MLPs: use kind='mlp'.")
  if m.num_classes and not (m.stochastic_layers == 1 and m.prior == "standard"):
    raise ConfigError(
      f"config.model.num_classes={m.num_classes} (a conditional VAE) is built with one "
      "stochastic layer under N(0, I): set model.stochastic_layers=1 and "
      "model.prior='standard', or num_classes=0."
    )


def _check_rules(config: ml_collections.ConfigDict) -> None:
  """Rules between fields: each written once, here."""
  c, m = config, config.model
  elbo = c.objective == "elbo"
  if c.objective in IMPORTANCE_WEIGHTED_OBJECTIVES and c.beta != 1.0:
    raise ConfigError(
      f"config.beta={c.beta} (or a value of a sweep over beta), but objective="
      f"{c.objective!r} is an importance-weighted bound, which has no KL weight; use beta=1, "
      "or objective='elbo' to sweep beta."
    )
  if c.objective in ("factor_vae", "dip_vae_i", "dip_vae_ii") and c.num_samples != 1:
    raise ConfigError(
      f"config.objective={c.objective!r} is trained on one posterior sample per example (as "
      f"its paper and disentanglement_lib do); config.num_samples={c.num_samples} would be "
      "ignored: set num_samples=1."
    )
  if c.objective == "beta_tcvae" and not (
    m.stochastic_layers == 1 and m.prior == "standard" and c.num_samples == 1
  ):
    raise ConfigError(
      "config.objective='beta_tcvae' estimates the total correlation of one Gaussian layer "
      "under N(0, I) from one sample per example: use model.stochastic_layers=1, "
      "model.prior='standard' and num_samples=1."
    )
  if c.num_groups != 1 and c.objective not in ("miwae", "piwae"):
    raise ConfigError(
      f"config.num_groups={c.num_groups} groups the samples of objective 'miwae' or 'piwae'; "
      f"objective={c.objective!r} has no groups. Use num_groups=1."
    )
  aux = c.objective in AUXILIARY_OBJECTIVES
  if aux and c.optimizer.ema_decay is not None:
    raise ConfigError(
      f"config.optimizer.ema_decay keeps an average of the VAE's parameters, but objective="
      f"{c.objective!r} trains a second network beside them with its own optimizer; set "
      "ema_decay=None."
    )
  if c.objective in ("factor_vae", "dip_vae_i", "dip_vae_ii") and not (
    m.stochastic_layers == 1 and m.prior == "standard"
  ):
    raise ConfigError(
      f"config.objective={c.objective!r} regularizes one Gaussian layer of latents under "
      "N(0, I): use model.stochastic_layers=1 and model.prior='standard'."
    )
  if c.gradient_estimator == "dreg" and c.objective != "iwae":
    raise ConfigError("config.gradient_estimator='dreg' is for config.objective='iwae'.")
  if c.gradient_estimator == "dreg" and m.prior == "vampprior":
    raise ConfigError(
      "config.gradient_estimator='dreg' assumes a prior that does not depend on the encoder; "
      "the VampPrior does. Use gradient_estimator='plain' with model.prior='vampprior'."
    )
  for name in ("free_bits", "kl_warmup_epochs", "capacity_nats"):
    if c[name] and not elbo:
      raise ConfigError(f"config.{name} shapes the ELBO's KL term; use config.objective='elbo'.")
  if c.free_bits and m.prior == "vampprior":
    raise ConfigError(
      "config.free_bits needs a KL per latent dimension, which the VampPrior does not have; "
      "set free_bits=0 or model.prior='standard'."
    )
  if c.capacity_nats and (c.kl_warmup_epochs or c.free_bits):
    raise ConfigError(
      "config.capacity_nats replaces the KL term (Burgess et al. 2018): set kl_warmup_epochs=0 "
      "and free_bits=0 with it."
    )
  if c.early_stopping_patience_epochs and not (c.validation_examples or c.data.validation_split):
    raise ConfigError(
      "config.early_stopping_patience_epochs needs a validation split: set "
      "config.validation_examples (e.g. 10000) or config.data.validation_split."
    )
  if c.validation_examples and c.data.validation_split:
    raise ConfigError(
      "config.validation_examples holds images out of the training split and "
      "config.data.validation_split names a split to validate on instead: set only one."
    )
  if m.likelihood in DISCRETIZED_LIKELIHOODS and c.binarization != "none":
    raise ConfigError(
      f"config.model.likelihood={m.likelihood!r} is a probability of pixel levels "
      f"k / (2**bits - 1), but binarization={c.binarization!r} moves the data off them: "
      "use binarization='none'."
    )
  if c.data.bits != 8 and c.binarization in ("threshold", "dynamic"):
    raise ConfigError(
      f"config.data.bits={c.data.bits} keeps {2**c.data.bits} levels, which "
      f"binarization={c.binarization!r} would then throw away; use binarization 'none' or "
      "'dequantize' with a bit depth, or data.bits=8."
    )
  if m.num_classes:
    if c.dataset.startswith("dsprites"):
      raise ConfigError(
        f"config.model.num_classes={m.num_classes}: a conditional VAE reads class labels, but "
        f"config.dataset={c.dataset!r} has factors instead; use a dataset with class labels."
      )
    if c.data.feed == "stream":
      raise ConfigError(
        "config.model.num_classes > 0 (a conditional VAE) reads the labels from the "
        "device-resident feed: set data.feed='device' (or 'auto')."
      )
  if is_sweep(c):
    _check_sweep(c)


def _check_sweep(config: ml_collections.ConfigDict) -> None:
  field = sweep_field(config)
  if field not in SWEEP_FIELDS:
    known = set(flat(base_config()))
    why = (
      "it is read when the program is built (it may change the shapes of the parameters, or "
      "what is compiled), not traced into the train step as a number, so each value needs its "
      f"own run: give each its own --workdir and --config.{field}=<value>"
      if field in known
      else "no such config field"
    )
    raise ConfigError(
      f"config.sweep.field={field!r} cannot be an axis of one compiled sweep: {why}. The "
      f"fields a sweep can vary: {', '.join(SWEEP_FIELDS)}."
    )
  if config.sweep.field and not config.sweep.field_values:
    raise ConfigError(
      f"config.sweep.field={config.sweep.field!r} has no values: give them in "
      "sweep.field_values (sweep.betas holds the values of beta only), e.g. "
      "--config.sweep.field_values='(10.0, 20.0)'."
    )
  if config.sweep.field_values and not config.sweep.field:
    raise ConfigError(
      "config.sweep.field_values is set but config.sweep.field is not: name the field the "
      "values are for (e.g. --config.sweep.field=factor_vae.gamma), or give betas in "
      "sweep.betas."
    )
  if config.sweep.betas and config.sweep.field_values:
    raise ConfigError(
      "config.sweep.betas and config.sweep.field_values are both set: a sweep has one axis. Put "
      "the values of sweep.field in sweep.field_values and leave sweep.betas empty (or sweep beta "
      "with sweep.betas alone)."
    )
  needs = {
    "free_bits": ("elbo",),
    "capacity_nats": ("elbo",),
    "ciwae_beta": ("ciwae",),
    "factor_vae.gamma": ("factor_vae",),
    "dip_vae.lambda_od": ("dip_vae_i", "dip_vae_ii"),
    "dip_vae.lambda_d": ("dip_vae_i", "dip_vae_ii"),
  }
  if field in needs and config.objective not in needs[field]:
    raise ConfigError(
      f"config.sweep.field={field!r} is read by objective {' or '.join(needs[field])}, not "
      f"by config.objective={config.objective!r}: every model would be the same."
    )
  values, seeds = sweep_grid(config)
  for v in values:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
      raise ConfigError(f"config.sweep values of {field} must be finite numbers, got {values}.")
    if not _in_range(field, v):
      raise ConfigError(
        f"config.sweep: {field}={v!r} is out of range: every value of {field} must be "
        f"{_range_text(field)}."
      )
  _check_each_model(config, field, values)
  names = [m.name for m in sweep_models(config)]
  if len(set(names)) != len(names):
    raise ConfigError(
      f"config.sweep has repeated (value, seed) pairs: {names} (values equal to 6 "
      "significant digits name one model); make them unique."
    )


def single_run_config(
  config: ml_collections.ConfigDict, field: str, value: float
) -> ml_collections.ConfigDict:
  """The config of the single run that a sweep's model with ``field = value`` is: a copy of
  ``config`` with that value and no sweep."""
  single = config.copy_and_resolve_references()
  single.sweep.betas, single.sweep.field, single.sweep.field_values = (), None, ()
  *parents, leaf = field.split(".")
  section = single
  for name in parents:
    section = section[name]
  section[leaf] = value
  return single


def _check_each_model(
  config: ml_collections.ConfigDict, field: str, values: tuple[float, ...]
) -> None:
  """The rules between fields, for every model of a sweep: each must be a single run they
  allow. A sweep over ``free_bits`` or ``capacity_nats`` builds that shaping of the KL for
  every model, so the rules are checked with it on as well."""
  for value in dict.fromkeys(values):
    try:
      _check_rules(single_run_config(config, field, value))
    except ConfigError as e:
      raise ConfigError(
        f"config.sweep: the model with {field}={value:g} would be refused as a single run: {e}"
      ) from None
  if field in ("free_bits", "capacity_nats"):
    try:
      _check_rules(single_run_config(config, field, 1.0))
    except ConfigError as e:
      raise ConfigError(
        f"config.sweep: a sweep over {field} builds that shaping of the KL term for every "
        f"model (a value of 0 included): {e}"
      ) from None


def swept_value(config: ml_collections.ConfigDict, name: str) -> tuple[str, float] | None:
  """``(field, value)`` of the sweep model ``name``, for a sweep over a field other than
  beta; ``None`` for a single run (``name=""``) or a beta sweep."""
  if not name or sweep_field(config) == "beta":
    return None
  model = {m.name: m for m in sweep_models(config)}[name]
  return model.field, model.value


def sweep_field(config: ml_collections.ConfigDict) -> str:
  """The hyperparameter a sweep's models differ in: ``sweep.field``, or ``"beta"``."""
  return config.sweep.field or "beta"


def sweep_grid(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[int, ...]]:
  """``(values, seeds)`` of ``config.sweep``, one pair per model: the values of its axis
  (``sweep.betas``, or ``sweep.field_values`` of ``sweep.field``) with the seeds: a single seed
  is shared, one seed per value pairs them, and ``sweep.cross`` crosses the two lists.

  Raises:
    ConfigError: no values, or a number of seeds that is neither 1 nor one per value.
  """
  values = tuple(config.sweep.field_values or config.sweep.betas)
  seeds = tuple(config.sweep.seeds)
  if not values:
    raise ConfigError(
      "config.sweep.betas (or sweep.field_values) is empty; give at least one value to run a sweep."
    )
  if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds):
    raise ConfigError(
      f"config.sweep.seeds must be integers in [0, 2**32) (as config.seed; larger ones "
      f"repeat the streams of smaller ones), got {seeds}."
    )
  if config.sweep.cross:  # Every value with every seed, seeds outer.
    values, seeds = values * len(seeds), tuple(s for s in seeds for _ in values)
  elif len(seeds) == 1:
    seeds = seeds * len(values)
  if len(seeds) != len(values):
    raise ConfigError(
      f"config.sweep.seeds has {len(seeds)} entries for {len(values)} values; give one seed "
      "(shared) or one per value."
    )
  return tuple(float(v) for v in values), seeds


class SweepModel(NamedTuple):
  """One model of a sweep: its name (its directory under ``WORKDIR/models/``), seed, beta,
  and the value of the swept field (``beta`` itself for a beta sweep)."""

  name: str
  seed: int
  beta: float
  field: str
  value: float


def sweep_models(config: ml_collections.ConfigDict) -> tuple[SweepModel, ...]:
  """The models of ``config.sweep``, in the order of ``sweep_grid``."""
  field = sweep_field(config)
  values, seeds = sweep_grid(config)
  return tuple(
    SweepModel(model_name(v, s, field), s, v if field == "beta" else float(config.beta), field, v)
    for v, s in zip(values, seeds, strict=True)
  )


def model_name(value: float, seed: int, field: str = "beta") -> str:
  """A sweep model's name, its directory under ``WORKDIR/models/``: ``beta_<b>_seed_<s>``,
  or ``<field>_<value>_seed_<s>`` (the field's last part: ``gamma_20_seed_0``)."""
  return f"{field.split('.')[-1]}_{value:g}_seed_{seed}"


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` (a ``ValueError``) naming the field and what to change, for any
  value the run cannot use: out of range or not finite, an unknown choice, or a
  combination of fields that does not go together."""
  _check_fields(config)
  check_model(config.model)
  _check_rules(config)
