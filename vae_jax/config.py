"""Every config field, its default and meaning, the rules it obeys, and the workdir's record.

Config files in ``configs/`` call ``base_config()`` and change what they need, so
a field is documented once here and ``--config.<field>=<value>`` overrides are
type-checked against it (``ml_collections`` rejects unknown fields and wrong
types). ``validate(config)`` is the one place that checks values: every numeric
field's range and finiteness, every choice, and the rules between fields. The
rules for resuming a workdir (``RESUMABLE_CHANGES``, ``check_resume``) and its
``config.json`` record live here too.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import ml_collections

from vae_jax import checkpointing, input_pipeline, models, networks, objectives, optim

# Choices of the string fields, each from the module that implements them.
CHOICES: dict[str, tuple[str, ...]] = {
  "dataset": (*input_pipeline.DATASETS, *input_pipeline.DSPRITES),
  "binarization": input_pipeline.BINARIZATIONS,
  "model.kind": models.KINDS,
  "model.activation": tuple(networks.ACTIVATIONS),
  "model.kernel_init": tuple(networks.KERNEL_INITS),
  "model.hierarchy": models.HIERARCHIES,
  "model.prior": models.PRIORS,
  "model.likelihood": objectives.LIKELIHOODS,
  "objective": objectives.OBJECTIVES,
  "gradient_estimator": objectives.GRADIENT_ESTIMATORS,
  "optimizer.name": optim.OPTIMIZERS,
  "optimizer.schedule": optim.SCHEDULES,
  "nonfinite_policy": ("stop", "skip"),
  "matmul_precision": ("default", "high", "highest"),
  "disentanglement_counts": ("disentanglement_lib", "cpu"),
}


def base_config() -> ml_collections.ConfigDict:
  """All fields at their defaults: the Flax example's MNIST VAE recipe (784-500-20
  MLP, Bernoulli likelihood, Adam 1e-3, batch 128, 30 epochs, dynamic binarization)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Root of every PRNG key (init, eps, shuffling, binarization).

  # Data (see vae_jax/input_pipeline.py).
  # "mnist" | "fashion_mnist" | "dsprites" (the published file) | "dsprites_rendered"
  # (the same factor grid rendered offline) | "dsprites_cpu" (a coarser grid) | "dsprites_smoke".
  c.dataset = "mnist"
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
  # "bernoulli" (decoder gives logits; a likelihood of binary images, only the
  # negative cross-entropy of grey levels) | "continuous_bernoulli" (logits; a
  # density of grey levels in [0, 1], Loaiza-Ganem & Cunningham 2019) |
  # "gaussian" (means, fixed variance) | "gaussian_learned" (means and one learned
  # variance shared by all pixels).
  c.model.likelihood = "bernoulli"
  c.model.gaussian_variance = 1.0  # Observation variance c (the initial one if learned).

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

  # A sweep (see vae_jax/sweep.py): one model per (beta, seed), trained as one
  # compiled program. Empty betas: a single run with config.beta and config.seed.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.betas = ()
  c.sweep.seeds = (0,)  # One seed shared by every model, or one per beta.
  c.sweep.cross = False  # True: a model for every (beta, seed) pair of the two lists.

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
  # Train steps run by one jitted call (lax.scan); 1 for convolutional models on
  # CPU, where XLA runs convolutions in loop bodies far slower (step.chunk_len_for).
  c.steps_per_dispatch = 100
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


def is_sweep(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` describes a sweep (``config.sweep.betas`` non-empty)."""
  return bool(config.sweep.betas)


# --------------------------------------------------------------------------
# Values.

# Numeric fields: (kind, low, high, interval). Every value must be finite; kind
# "int" excludes booleans and floats; the interval says which ends are included.
_INT, _FLOAT = "int", "float"
_INF = math.inf
_NUMBERS: dict[str, tuple[str, float, float, str]] = {
  "seed": (_INT, -(2**63), 2**63 - 1, "[]"),
  "validation_examples": (_INT, 0, _INF, "[)"),
  "model.latents": (_INT, 1, _INF, "[)"),
  "model.logvar_bound": (_FLOAT, 0, _INF, "()"),
  "model.stochastic_layers": (_INT, 1, 2, "[]"),
  "model.top_latents": (_INT, 1, _INF, "[)"),
  "model.num_pseudo_inputs": (_INT, 1, _INF, "[)"),
  "model.pseudo_inputs_mean": (_FLOAT, -_INF, _INF, "()"),
  "model.pseudo_inputs_std": (_FLOAT, 0, _INF, "[)"),
  "model.gaussian_variance": (_FLOAT, 0, _INF, "()"),
  "beta": (_FLOAT, 0, _INF, "[)"),
  "num_samples": (_INT, 1, _INF, "[)"),
  "free_bits": (_FLOAT, 0, _INF, "[)"),
  "kl_warmup_epochs": (_FLOAT, 0, _INF, "[)"),
  "capacity_nats": (_FLOAT, 0, _INF, "[)"),
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
_OPTIONAL = {"model.logvar_bound", "optimizer.grad_clip_norm", "optimizer.ema_decay"}
# Tuples of positive integers: layer widths.
_WIDTHS = (
  "model.encoder_hidden",
  "model.decoder_hidden",
  "model.conv_features",
  "model.top_hidden",
)


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def _check_number(path: str, value: Any) -> None:
  kind, low, high, interval = _NUMBERS[path]
  is_int = isinstance(value, int) and not isinstance(value, bool)
  if kind == _INT and not is_int:
    raise ValueError(f"config.{path} must be an integer, got {value!r}.")
  if kind == _FLOAT and (isinstance(value, bool) or not isinstance(value, int | float)):
    raise ValueError(f"config.{path} must be a number, got {value!r}.")
  if not math.isfinite(value):
    raise ValueError(f"config.{path} must be finite, got {value!r}.")
  above = value >= low if interval[0] == "[" else value > low
  below = value <= high if interval[1] == "]" else value < high
  if not (above and below):
    raise ValueError(
      f"config.{path}={value!r} is out of range: it must be in {interval[0]}{low}, {high}"
      f"{interval[1]}."
    )


def _check_values(config: ml_collections.ConfigDict) -> None:
  for path in _NUMBERS:
    value = _get(config, path)
    if value is None and path in _OPTIONAL:
      continue
    _check_number(path, value)
  for path in _WIDTHS:
    value = _get(config, path)
    if value is None and path == "model.decoder_hidden":
      continue
    if (
      not isinstance(value, tuple | list)
      or not value
      or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in value)
    ):
      raise ValueError(
        f"config.{path} must be a non-empty tuple of positive integers (layer widths), "
        f"got {value!r}; e.g. --config.{path}='(300, 300)'."
      )
  clip = config.model.logvar_clip
  if clip is not None and not (
    len(clip) == 2 and all(isinstance(v, int | float) and math.isfinite(v) for v in clip)
    and clip[0] < clip[1]
  ):  # fmt: skip
    raise ValueError(
      f"config.model.logvar_clip must be (low, high) with finite low < high, got {clip!r}."
    )
  for path, choices in CHOICES.items():
    value = _get(config, path)
    if value not in choices:
      raise ValueError(f"config.{path}={value!r} is not one of {choices}.")


def _check_rules(config: ml_collections.ConfigDict) -> None:
  """Rules between fields: each written once, here."""
  c, m = config, config.model
  elbo = c.objective == "elbo"
  if c.objective == "iwae" and (c.beta != 1.0 or any(b != 1.0 for b in c.sweep.betas)):
    raise ValueError(
      f"config.beta={c.beta} (or config.sweep.betas), but the IWAE bound has no KL weight; "
      "use beta=1, or objective='elbo' to sweep beta."
    )
  if c.objective == "beta_tcvae" and not (
    m.stochastic_layers == 1 and m.prior == "standard" and c.num_samples == 1
  ):
    raise ValueError(
      "config.objective='beta_tcvae' estimates the total correlation of one Gaussian layer "
      "under N(0, I) from one sample per example: use model.stochastic_layers=1, "
      "model.prior='standard' and num_samples=1."
    )
  if c.gradient_estimator == "dreg" and c.objective != "iwae":
    raise ValueError("config.gradient_estimator='dreg' is for config.objective='iwae'.")
  if c.gradient_estimator == "dreg" and m.prior == "vampprior":
    raise ValueError(
      "config.gradient_estimator='dreg' assumes a prior that does not depend on the encoder; "
      "the VampPrior does. Use gradient_estimator='plain' with model.prior='vampprior'."
    )
  for name in ("free_bits", "kl_warmup_epochs", "capacity_nats"):
    if c[name] and not elbo:
      raise ValueError(f"config.{name} shapes the ELBO's KL term; use config.objective='elbo'.")
  if c.free_bits and m.prior == "vampprior":
    raise ValueError(
      "config.free_bits needs a KL per latent dimension, which the VampPrior does not have; "
      "set free_bits=0 or model.prior='standard'."
    )
  if c.capacity_nats and (c.kl_warmup_epochs or c.free_bits):
    raise ValueError(
      "config.capacity_nats replaces the KL term (Burgess et al. 2018): set kl_warmup_epochs=0 "
      "and free_bits=0 with it."
    )
  if c.early_stopping_patience_epochs and not c.validation_examples:
    raise ValueError(
      "config.early_stopping_patience_epochs needs a validation split: set "
      "config.validation_examples (e.g. 10000)."
    )
  if m.prior == "vampprior" and m.stochastic_layers == 2 and m.hierarchy != "vampprior":
    raise ValueError(
      "config.model.prior='vampprior' with two stochastic layers needs "
      "model.hierarchy='vampprior' (the 'iwae' hierarchy encodes z2 from z1, not from x)."
    )
  if m.gated and m.kind != "mlp":
    raise ValueError("config.model.gated=True is for model.kind='mlp'.")
  if m.stochastic_layers == 2 and m.hierarchy == "vampprior" and m.kind != "mlp":
    raise ValueError("config.model.hierarchy='vampprior' is built from MLPs: use kind='mlp'.")
  if is_sweep(c):
    _check_sweep(c)


def _check_sweep(config: ml_collections.ConfigDict) -> None:
  betas, seeds = sweep_grid(config)
  for b in betas:
    if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b < 0:
      raise ValueError(f"config.sweep.betas must be finite numbers >= 0, got {config.sweep.betas}.")
  names = [model_name(b, s) for b, s in zip(betas, seeds, strict=True)]
  if len(set(names)) != len(names):
    raise ValueError(f"config.sweep has repeated (beta, seed) pairs: {names}; make them unique.")


def sweep_grid(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[int, ...]]:
  """``(betas, seeds)`` of ``config.sweep``, one pair per model: a single seed is shared,
  one seed per beta pairs them, and ``sweep.cross`` crosses the two lists.

  Raises:
    ValueError: no betas, or a number of seeds that is neither 1 nor one per beta.
  """
  betas = tuple(config.sweep.betas)
  seeds = tuple(config.sweep.seeds)
  if not betas:
    raise ValueError("config.sweep.betas is empty; give at least one beta to run a sweep.")
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f"config.sweep.seeds must be integers, got {seeds}.")
  if config.sweep.cross:  # Every beta with every seed, seeds outer.
    betas, seeds = betas * len(seeds), tuple(s for s in seeds for _ in config.sweep.betas)
  elif len(seeds) == 1:
    seeds = seeds * len(betas)
  if len(seeds) != len(betas):
    raise ValueError(
      f"config.sweep.seeds has {len(seeds)} entries for {len(betas)} betas; give one seed "
      "(shared) or one per beta."
    )
  return tuple(float(b) for b in betas), seeds


def model_name(beta: float, seed: int) -> str:
  """A sweep model's name, its directory under ``WORKDIR/models/``: ``beta_<b>_seed_<s>``."""
  return f"beta_{beta:g}_seed_{seed}"


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the field and what to change, for any value the run
  cannot use: out of range or not finite, an unknown choice, or a combination of
  fields that does not go together."""
  _check_values(config)
  _check_rules(config)


# --------------------------------------------------------------------------
# Resuming a workdir, and its record of the config.

# Fields that may change when a run resumes from its workdir: they change how
# long or how visibly it runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
  {
    "num_epochs",  # Except with optimizer.schedule="cosine", which decays over num_epochs.
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
    "disentanglement_counts",
  }
)
# Fields that older versions wrote and this one no longer has, with the value
# that behaves like this version's defaults: a record holding that value still
# resumes. (Sweeps' KL schedule became the top-level kl_warmup_epochs/capacity_*.)
_RETIRED_FIELDS = {"sweep.schedule": "constant"}
_RETIRED_UNUSED = ("sweep.warmup_steps", "sweep.capacity_nats", "sweep.capacity_steps")

RECORD = "config.json"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def differences(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[str]:
  """Fields in which ``config`` differs from the run recorded in ``workdir/config.json``.

  Returns one ``"  field: workdir has A, now B"`` line per field, leaving out
  those allowed to change on resume (``RESUMABLE_CHANGES``). A field missing
  from an older record counts as its default, which is how that run behaved.
  No record: no differences.
  """
  path = pathlib.Path(workdir) / RECORD
  if not path.exists():
    return []
  defaults = _flatten(json.loads(base_config().to_json()))
  saved = {**defaults, **_flatten(json.loads(path.read_text()))}
  for field, value in _RETIRED_FIELDS.items():
    if saved.get(field) == value:
      saved.pop(field)
  if "sweep.schedule" not in saved:
    for field in _RETIRED_UNUSED:
      saved.pop(field, None)
  now = _flatten(json.loads(config.to_json()))
  resumable = set(RESUMABLE_CHANGES)
  if "cosine" in (saved.get("optimizer.schedule"), now.get("optimizer.schedule")):
    resumable.discard("num_epochs")  # The cosine schedule decays over num_epochs.
  return [
    f"  {k}: workdir has {saved.get(k)!r}, now {now.get(k)!r}"
    for k in sorted(set(saved) | set(now))
    if not _same(saved.get(k), now.get(k)) and k not in resumable
  ]


def _same(a: Any, b: Any) -> bool:
  """Equal values; NaN equals NaN (a record holding one still resumes under itself)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def likelihood_caveat(config: ml_collections.ConfigDict) -> str | None:
  """What a reader of this run's log-likelihoods must know, or ``None``."""
  binary_data = config.dataset in input_pipeline.BINARY_DATASETS
  if (
    config.model.likelihood == "bernoulli"
    and config.binarization in ("none", "dequantize")
    and not binary_data
  ):
    return (
      f"likelihood='bernoulli' on grey levels (binarization={config.binarization!r}): the "
      "reconstruction term is the negative binary cross-entropy, not a log-density of the "
      "data, so 'log-likelihoods' and ELBOs are not bounds on log p(x); use "
      "model.likelihood='continuous_bernoulli' for a density of grey levels, or a binarization."
    )
  return None


def check_resume(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, allow_change: bool = False
) -> list[str]:
  """Refuses a workdir whose checkpoints belong to a run of another config.

  A workdir without any checkpoint has nothing to protect. Differences (see
  ``differences``) raise ``ValueError`` naming them, unless ``allow_change``;
  then they are returned for the caller to log.
  """
  if not checkpointing.saved_steps(pathlib.Path(workdir) / "checkpoints"):
    return []
  diffs = differences(config, workdir)
  if diffs and not allow_change:
    raise ValueError(
      f"{workdir} holds a run with a different config:\n" + "\n".join(diffs) + "\n"
      "Resuming would mix two experiments. Use a new --workdir, the same config, or "
      "--allow_config_change if you mean to continue this run with the new values."
    )
  return diffs


def check_evaluation(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses to evaluate ``workdir`` under a config other than the one that trained it."""
  diffs = differences(config, workdir)
  if diffs:
    raise ValueError(
      f"{workdir} was trained with a different config:\n" + "\n".join(diffs) + "\n"
      "Evaluate it with the --config (and overrides) that trained it."
    )


def read_record(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config a workdir's run recorded: ``base_config()`` updated with its ``config.json``.

  Raises:
    FileNotFoundError: the workdir has no record.
  """
  path = pathlib.Path(workdir) / RECORD
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a vae_jax workdir?")
  known = _flatten(json.loads(base_config().to_json()))
  record = {
    k: tuple(v) if isinstance(v, list) else v
    for k, v in _flatten(json.loads(path.read_text())).items()
    if k in known
  }
  config = base_config()
  config.update_from_flattened_dict(record)
  return config


def write_record(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Records ``config`` as ``workdir/config.json`` (atomically)."""
  path = pathlib.Path(workdir) / RECORD
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True) + "\n")
  tmp.replace(path)
