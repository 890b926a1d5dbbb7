"""The evaluate command: ``python -m vae_jax.main --mode=evaluate``.

Restores a workdir's parameters (the best on validation, the EMA or the
latest; or the checkpoint ``--eval_step=N``) and writes
``eval/step_<N>_k<K>.json``: the test log-likelihood estimated by importance
sampling with ``K`` samples from the encoder (nats, bits per dimension,
standard errors; ``vae_jax.estimators``), the ELBO, rate, distortion, KL per
latent dimension and active units of each split, and a PCA baseline with as
many components as the model has latents (``vae_jax.baselines``). It also
draws what was learned: sample and reconstruction grids (``images/``,
TensorBoard) and matplotlib figures (``figures/``, PNG and PDF): training
curves, interpolations, traversals and, for two latents, the latent map.

A sweep's workdir is evaluated model by model, each into
``models/<name>/eval/`` and ``models/<name>/figures/``.

Reported numbers are computed at full float32 matmul precision on every
platform (``estimators.EVAL_MATMUL_PRECISION``): on GPUs and TPUs the default
may use TF32 or bfloat16 passes, which moves likelihoods at the second decimal.
The JSON records the precision.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import (
  baselines,
  checkpointing,
  datasets,
  disentanglement,
  dsprites,
  early_stopping,
  estimators,
  execution,
  figures,
  files,
  input_pipeline,
  locks,
  models,
  optim,
  pictures,
  process,
  sweep,
  trainer,
  writers,
)
from vae_jax import config as config_lib
from vae_jax import step as step_lib
from vae_jax import workdir as workdir_lib
from vae_jax.models import Model, Params

Array = jax.Array

# Tags folded into the run's evaluation key, one stream per split.
_SPLIT_TAGS = {"test": 0, "train": 1}

# The training split's ELBO parts are estimated on at most this many of its examples
# (all of MNIST's 60,000; a fixed random subset of dSprites' 737,280).
MAX_TRAIN_EVAL_EXAMPLES = 60000

PARAMS_SOURCES = {
  "best": "best validation ELBO (WORKDIR/best)",
  "ema": "EMA of the latest checkpoint",
  "latest": "latest checkpoint",
  "step": "the checkpoint of --eval_step",
  "step_ema": "EMA of the checkpoint of --eval_step",
}


def params_source(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, eval_step: int | None = None
) -> str:
  """Which parameters of ``workdir`` to evaluate: a key of ``PARAMS_SOURCES``.

  A chosen ``eval_step``: that checkpoint (its EMA if the optimizer keeps one).
  Otherwise the best-on-validation ones if the run keeps them and has saved
  some (before its first validation there are none: then the next choice,
  with a warning), else the EMA if the optimizer keeps one, else the latest.
  """
  ema = config.optimizer.ema_decay is not None
  if eval_step is not None:
    return "step_ema" if ema else "step"
  if config.validation_examples:
    if checkpointing.saved_steps(pathlib.Path(workdir) / workdir_lib.BEST):
      return "best"
    logging.warning("%s has no best checkpoint yet (no validation so far).", workdir)
  return "ema" if ema else "latest"


class Target(NamedTuple):
  """One model's parameters to evaluate, and where its results go.

  Attributes:
    name: the model's name in a sweep (``""`` for a single run).
    seed: its seed (the evaluation's keys are its single run's).
    beta: its beta.
    step: the checkpoint step the parameters come from.
    source: a key of ``PARAMS_SOURCES``.
    params: the parameters.
    out_dir: the directory its ``eval/``, ``images/`` and ``figures/`` go to.
  """

  name: str
  seed: int
  beta: float
  step: int
  source: str
  params: Params
  out_dir: pathlib.Path


def restore_targets(
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  event_shape: tuple[int, ...],
  num_train: int,
  eval_step: int | None = None,
) -> tuple[Model, list[Target]]:
  """The model of ``config`` and every model's parameters to evaluate from ``workdir``.

  Those are the ones ``params_source`` names: one target for a single run, one per
  model for a sweep (each into ``models/<name>/``). The restore target is the one
  training resumes into, so a checkpoint written on any number of devices or hosts
  restores here; checkpoints are opened read-only, safe beside a running training job.

  Raises:
    FileNotFoundError: ``workdir`` holds no checkpoint.
    checkpointing.CheckpointError: the checkpoints do not match the config, or
      ``eval_step`` is not among them.
  """
  if config_lib.is_sweep(config):
    built = sweep.build_sweep_trainer(config, event_shape, num_train)
    base, abstract, sharding = built.base, built.state_shape(), built.sharding()
    ids = [
      trainer.ModelId(n, s, b)
      for n, s, b in zip(built.names, built.seeds, built.betas, strict=True)
    ]
    abstract_params, num_models = abstract.models.params, built.num_models
  else:
    base = trainer.build_trainer(config, event_shape, num_train)
    abstract, sharding = base.abstract_state(), base.replicated
    ids = [trainer.ModelId("", config.seed, config.beta)]
    abstract_params, num_models = abstract.params, None
  source = params_source(config, workdir, eval_step)
  if source == "best":
    target = early_stopping.BestCheckpoint.target(abstract_params, sharding, num_models)
    step, best = checkpointing.restore_read_only(workdir / workdir_lib.BEST, target)
    params = best["params"]
    logging.info(
      "Best validation ELBO %s at step %d.",
      ", ".join(f"{e:.3f}" for e in np.atleast_1d(np.asarray(best["elbo"]))),
      step,
    )
  else:
    step, state = checkpointing.restore_read_only(
      workdir / workdir_lib.CHECKPOINTS, abstract, eval_step
    )
    params = (
      sweep.eval_params(state) if num_models else optim.eval_params(state.opt_state, state.params)
    )
  targets = []
  for i, model_id in enumerate(ids):
    own = jax.tree.map(lambda x, i=i: x[i], params) if num_models else params
    out_dir = workdir / workdir_lib.MODELS / model_id.name if num_models else workdir
    targets.append(Target(model_id.name, model_id.seed, model_id.beta, step, source, own, out_dir))
  return base.model, targets


# --------------------------------------------------------------------------
# Pictures of a restored model.


def mean_decoder(model: Model, params: Params):
  """``z [n, latents] -> [n, *event_shape]`` mean images of ``p(x | z)``, in [0, 1], for
  host arrays of any length (one compiled decoder for all)."""
  decode_jit = jax.jit(lambda z: model.likelihood.mean(model.decode(params, z)))

  def decode_mean(z: np.ndarray) -> np.ndarray:
    # Padded to a multiple of 512 rows, so every picture shares one compiled decoder.
    n = len(z)
    padded = np.zeros((-(-n // 512) * 512, z.shape[1]), np.float32)
    padded[:n] = z
    return np.asarray(decode_jit(padded))[:n]

  return decode_mean


def model_title(
  config: ml_collections.ConfigDict,
  model: Model,
  beta: float,
  deterministic: bool,
  seed: int | None = None,
  swept: tuple[str, float] | None = None,
) -> str:
  """What a figure's title calls the model: ``"VAE (beta=4, 10 latents, bernoulli)"``,
  with ``seed=1`` after the beta for a model of a sweep (two seeds of one beta are two
  models), and the swept field's value first for a sweep over another field
  (``swept=("factor_vae.gamma", 30.0)``: ``"FactorVAE (gamma=30, seed=0, ...)"``)."""
  settings = []
  if swept is not None:
    field, value = swept
    settings.append(f"{field.rsplit('.', 1)[-1]}={value:g}")
  if not deterministic and (swept is None or beta != 1.0):
    settings.append(f"beta={beta:g}")
  if seed is not None:
    settings.append(f"seed={seed}")
  described = [f"{model.latents} latents", model.likelihood.name]
  if deterministic:
    return f"AE ({', '.join(described + settings)})"
  name = {
    "iwae": "IWAE", "miwae": "MIWAE", "ciwae": "CIWAE", "piwae": "PIWAE",
    "beta_tcvae": "beta-TCVAE", "factor_vae": "FactorVAE",
    "dip_vae_i": "DIP-VAE-I", "dip_vae_ii": "DIP-VAE-II",
  }.get(config.objective, "VAE")  # fmt: skip
  if model.num_classes:
    name = f"conditional {name}"
  return f"{name} ({', '.join(settings + described)})"


def traversal_rows(
  model: Model,
  summary: dict[str, Any],
  codes: np.ndarray,
  deterministic: bool,
  max_rows: int = 10,
) -> tuple[list[int], np.ndarray, list[str], str]:
  """Which latents to sweep and over what values: ``(dims, values [rows, 11], labels, how)``.

  The most informative latents the decoder reads, by KL (a VAE whose prior
  factorizes) or else by the variance of the codes; swept from -3 to 3 (a VAE
  under N(0, I)) or between the codes' 1st and 99th percentiles.
  """
  if deterministic or "kl_per_dim" not in summary:
    score, score_name = np.asarray(summary["posterior_mean_variance"]), "var"
  else:
    score, score_name = np.asarray(summary["kl_per_dim"]), "KL"
  if deterministic or not model.closed_form_kl:
    low, high = np.percentile(codes, [1, 99], axis=0)
    how = "between the 1st and 99th percentiles of the test codes"
  else:
    low, high = np.full(model.latents, -3.0), np.full(model.latents, 3.0)
    how = "from -3 to 3"
  visible = model.decoder_reads or model.latents
  dims = [int(d) for d in np.argsort(-score[:visible])[: min(max_rows, visible)]]
  # Latent d is entry d of the JSON's per-latent lists (kl_per_dim, ...), as on the
  # latent map's axes.
  labels = [f"latent {d}, {score_name} {score[d]:.2f}" for d in dims]
  return dims, np.linspace(low[dims], high[dims], 11, axis=1), labels, how


def write_pictures(
  writer: writers.MetricWriter,
  out_dir: pathlib.Path,
  step: int,
  *,
  config: ml_collections.ConfigDict,
  model: Model,
  params: Params,
  test_x: np.ndarray,
  test_images: np.ndarray,
  test_labels: np.ndarray,
  summary: dict[str, Any],
  codes: np.ndarray,
  pca: baselines.Pca,
  deterministic: bool,
  sample_key: Array,
  beta: float | None = None,
  seed: int | None = None,
  swept: tuple[str, float] | None = None,
) -> tuple[list[pathlib.Path], dict[str, str]]:
  """Writes the evaluation's image grids and figures; returns their paths and what was
  skipped, with why.

  ``test_x`` is the test split as the model reads it (binarized once, for a binarized
  run); ``test_images`` its first images as data, levels scaled to [0, 1], which the
  reconstruction figure shows. ``beta``: the model's (default ``config.beta``); ``seed``:
  a sweep model's seed, and ``swept``: the ``(field, value)`` of a sweep over another
  field, named in the titles.
  """
  conditional = bool(model.num_classes)
  if conditional:  # (x, labels): the pictures decode with the label of test image 0.
    test_x, test_y = test_x
    decode_mean = mean_decoder(model.given(np.asarray(test_y[:1])), params)
  else:
    decode_mean = mean_decoder(model, params)
  paths, skipped = [], {}
  model_name = "AE" if deterministic else "VAE"
  beta = config.beta if beta is None else beta
  long_name = model_title(config, model, beta, deterministic, seed, swept)
  figure_dir = out_dir / "figures"

  def figure(name: str, fig) -> None:
    paths.extend(figures.save_figure(fig, figure_dir / f"{name}_{step:08d}"))
    writer.write_image(step, f"eval_{name}", figures.figure_to_array(fig))

  if deterministic:
    skipped["prior_samples"] = "an autoencoder has no prior to sample from"
  elif conditional:
    # Generation per class: row c of class c, column j from the same z_j in every row.
    samples = jax.jit(models.class_samples, static_argnums=(0, 3))(model, params, sample_key, 10)
    grid = pictures.upscale(writers.image_grid(np.asarray(samples), columns=10), 2)
    paths.append(writer.write_image(step, "eval_class_samples", grid))
    skipped["prior_samples"] = (
      "a conditional VAE's samples are drawn per class: eval_class_samples (row c of class c, "
      "each column one z)"
    )
  else:
    samples = jax.jit(models.prior_samples, static_argnums=(0, 3))(model, params, sample_key, 64)
    grid = pictures.upscale(writers.image_grid(np.asarray(samples)), 2)
    paths.append(writer.write_image(step, "eval_prior_samples", grid))
  originals = test_x[:32]
  inputs = (originals, np.asarray(test_y[:32], np.int32)) if conditional else originals
  recs = np.asarray(jax.jit(models.reconstructions, static_argnums=0)(model, params, inputs))
  grid = writers.image_grid(writers.interleave(originals, recs), columns=16)
  paths.append(writer.write_image(step, "eval_reconstructions", pictures.upscale(grid, 2)))
  columns = min(8, len(originals))
  fig = figures.reconstruction_figure(
    test_images[: 2 * columns],
    recs[: 2 * columns],
    columns=columns,
    title=f"{long_name}: test images and their reconstructions",
  )
  figure("reconstructions", fig)

  figure(
    "training_curves",
    figures.training_curves_figure(
      writers.read_metrics(out_dir / "metrics.jsonl"), title=f"{long_name}: training"
    ),
  )

  # Interpolations between the codes of test images 0-1, 2-3, ... (t = 0, 0.1, ..., 1).
  if conditional:
    skipped["interpolations"] = (
      "a conditional VAE decodes each code with a label, and the two ends' labels differ"
    )
  else:
    pairs, steps = min(8, len(test_x) // 2), 11
    images = pictures.interpolation_images(
      decode_mean, codes[0 : 2 * pairs : 2], codes[1 : 2 * pairs : 2],
      test_x[0 : 2 * pairs : 2], test_x[1 : 2 * pairs : 2], steps,
    )  # fmt: skip
    title = f"{long_name}: decoded (1-t) z_a + t z_b between test images"
    figure("interpolations", figures.interpolation_figure(images, steps, title=title))

  # Traversals of the most informative dimensions around test image 0's code.
  dims, values, labels, how = traversal_rows(model, summary, codes, deterministic)
  images = pictures.traversal_images(decode_mean, codes[0], dims, values)
  given = f" and label {int(test_y[0])}" if conditional else ""
  title = f"{long_name}: one latent swept {how}, the others at test image 0's code{given}"
  figure("traversals", figures.traversal_figure(images, labels, values, title=title))

  if conditional:
    skipped["latent_map"] = (
      "drawn for unconditional models: a conditional VAE's decoder needs a label for every "
      "point of the map"
    )
  elif model.latents == 2:
    limits = pictures.data_limits(codes)
    n = 15
    manifold = writers.image_grid(decode_mean(pictures.manifold_latents(*limits, n)), n, pad=0)
    names = datasets.class_names(config.dataset)
    fig = figures.latent_map_figure(
      codes,
      pca.project(test_x.reshape(len(test_x), -1))[:, :2],
      test_labels if test_labels.ndim == 1 else test_labels[:, 0],  # dSprites: the shape.
      manifold,
      latent_limits=limits,
      class_names=names,
      model_name=model_name,
      code_name="codes" if deterministic else "posterior means",
    )
    figure("latent_map", fig)
  else:
    skipped["latent_map"] = f"drawn only for 2 latent dimensions; this model has {model.latents}"
  writer.flush()
  return paths, skipped


# --------------------------------------------------------------------------
# Disentanglement, for datasets with ground-truth factors.


def disentanglement_scores(
  config: ml_collections.ConfigDict,
  model: Model,
  params: Params,
  images: np.ndarray,
  grid,
  seed: int,
) -> dict[str, Any]:
  """The metrics of ``vae_jax.disentanglement`` for the posterior means of ``model``.

  The representation of factors ``f`` is the posterior mean of the image at ``f``
  (``images`` enumerates ``grid`` in ``dsprites.index_to_factors`` order);
  factors are drawn uniformly over the grid. Point counts follow
  ``config.disentanglement_counts``.
  """
  encode = jax.jit(lambda x: model.encode(params, x)[0])

  def representation(factors: np.ndarray) -> np.ndarray:
    x = images[dsprites.factors_to_index(factors, grid)]
    n, padded = len(x), -(-len(x) // 512) * 512  # One compiled encoder for every call.
    x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
    x = input_pipeline.eval_images(x, config.binarization, bits=config.data.bits)
    return np.asarray(encode(x))[:n]

  counts = (
    disentanglement.CPU_COUNTS
    if config.disentanglement_counts == "cpu"
    else disentanglement.DISENTANGLEMENT_LIB_COUNTS
  )
  scores = disentanglement.all_metrics(
    disentanglement.uniform_factor_sampler(grid.factor_sizes),
    representation,
    grid.factor_sizes,
    np.random.default_rng(seed),
    **counts,
  )
  return {
    **scores,
    "beta_vae": scores["beta_vae_eval_accuracy"],
    "factor_vae": scores["factor_vae_eval_accuracy"],
    "counts": dict(counts),
    "counts_preset": config.disentanglement_counts,
    "representation": "posterior means of the encoder",
    "definitions": "Locatello et al. 2019 with disentanglement_lib's defaults "
    "(vae_jax/disentanglement.py)",
  }


# --------------------------------------------------------------------------
# The evaluate command.


def _write_json(path: pathlib.Path, results: dict[str, Any]) -> None:
  with files.reporting(path, then="run the same command"):
    files.atomic_write(path, json.dumps(results, indent=2) + "\n")


def bits_per_dim_fn(config: ml_collections.ConfigDict, model: Model, num_dims: int):
  """``-log p(x)`` in nats -> bits per dimension for this run's data, or ``None`` where
  that means nothing (``likelihoods.Likelihood.bits_per_dim``)."""
  return functools.partial(
    model.likelihood.bits_per_dim,
    num_dims=num_dims,
    binarization=config.binarization,
    binary_data=config.dataset in datasets.BINARY_DATASETS,
    bits=config.data.bits,
  )


def evaluate_params(
  config: ml_collections.ConfigDict,
  model: Model,
  params: Params,
  splits: dict[str, np.ndarray],
  eval_key: Array,
  num_samples: int,
  *,
  batch_size: int = estimators.IW_BATCH_SIZE,
  sample_chunk: int = estimators.IW_SAMPLE_CHUNK,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, float]]:
  """The numbers of one model's parameters on ``splits`` (``"test"``, ``"train"``).

  Returns:
    ``(results, per-example values by split, timings)``.
  """
  deterministic = config.objective == "autoencoder"
  num_dims = math.prod(models.images_of(splits["test"]).shape[1:])
  unroll = execution.plan(config).unroll_loops
  values, timings = {}, {}
  for split, k, bs in (("test", num_samples, batch_size), ("train", 1, 1000)):
    # The training split gets one sample per example: its ELBO parts are means
    # over 60k examples, whose standard errors are reported.
    t = time.perf_counter()
    fn = estimators.make_per_example_fn(
      model, num_samples=k, sample_chunk=sample_chunk, deterministic=deterministic, unroll=unroll
    )
    split_key = jax.random.fold_in(eval_key, _SPLIT_TAGS[split])
    values[split] = estimators.per_example_values(
      fn, params, splits[split], split_key, bs, progress=config.progress_bar, desc=split
    )
    timings[f"{split}_split_s"] = time.perf_counter() - t
  to_bits = bits_per_dim_fn(config, model, num_dims)
  results: dict[str, Any] = {
    "test": estimators.summarize_split(values["test"], to_bits_per_dim=to_bits)
  }
  if len(model.layer_latents) > 1 and not deterministic:
    # Per layer, from the mean path's codes.
    bounds = np.cumsum([0, *model.layer_latents])
    means = values["test"]["mean"]
    results["test"]["active_units_per_layer"] = [
      estimators.active_units(means[:, a:b])[0]
      for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
  if "log_likelihood" in results["test"]:
    ll = results["test"]["log_likelihood"]
    if ll["bits_per_dim"] is None:
      kind = "none"
    else:
      kind = "dequantize" if config.binarization == "dequantize" else "discrete"
    ll["bits_per_dim_note"] = _BITS_NOTES[kind]
  results["train"] = estimators.summarize_split(values["train"], log_likelihood=False)
  results["test"]["elbo_num_samples"] = None if deterministic else num_samples
  results["train"]["elbo_num_samples"] = None if deterministic else 1
  return results, values, timings


_BITS_NOTES = {
  "discrete": "-log2 P(x) per dimension: the likelihood is a probability of the discrete data",
  "dequantize": (
    "-log2 P(pixel levels) per dimension, bounded by the dequantized density: "
    "(nll_nats + D bits ln 2) / (D ln 2), bits = config.data.bits"
  ),
  "none": (
    "null: the likelihood is a density of continuous data (not dequantized), not a "
    "probability, so its bits per dimension would mean nothing"
  ),
}


def _pca_results(config, model, train_x, test_x, results) -> tuple[baselines.Pca, dict]:
  flat_train = train_x.reshape(len(train_x), -1)
  pca = baselines.fit_pca(flat_train, max(model.latents, 2))
  pca_k = pca._replace(
    components=pca.components[: model.latents], variances=pca.variances[: model.latents]
  )
  out = baselines.pca_baseline(pca_k, train_x, test_x, model.likelihood)
  out["model_mse_per_image"] = results["test"]["mse_per_image"]
  out["model_distortion_at_posterior_mean"] = results["test"]["distortion_at_posterior_mean"]
  return pca, out


def _machine() -> dict[str, Any]:
  return {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
  }


def evaluate_target(
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  model: Model,
  target: Target,
  data: dict[str, np.ndarray],
  num_samples: int,
  timings: dict[str, float],
  **options,
) -> dict[str, Any]:
  """Evaluates one model's parameters; writes its JSON and pictures under ``target.out_dir``."""
  start = time.perf_counter()
  deterministic = config.objective == "autoencoder"
  keys = step_lib.run_keys(target.seed)
  splits = {"test": data["test_x"], "train": data["train_x"]}
  if model.num_classes:  # A conditional VAE reads (x, labels): its numbers are of p(x | y).
    splits = {
      split: (x, np.asarray(data[f"{split}_labels"], np.int32)) for split, x in splits.items()
    }
  results, values, own_timings = evaluate_params(
    config, model, target.params, splits, keys[step_lib.KEY_EVAL], num_samples, **options
  )
  header = {
    "workdir": str(workdir),
    "checkpoint_step": target.step,
    "dataset": config.dataset,
    "binarization": config.binarization,
    "objective": config.objective,
    "likelihood": model.likelihood.name,
    "latents": model.latents,
    "layer_latents": list(model.layer_latents),
    # A conditional VAE's log_likelihood and ELBO are of log p(x | y), the label given.
    "conditional_on_label": bool(model.num_classes),
    "params": PARAMS_SOURCES[target.source],
    "num_importance_samples": None if deterministic else num_samples,
    "matmul_precision": estimators.EVAL_MATMUL_PRECISION,
    "likelihood_caveat": model.likelihood.caveat(
      binarization=config.binarization, binary_data=config.dataset in datasets.BINARY_DATASETS
    ),
    "units": (
      "nats per example (sums over pixels, means over examples) unless the name says "
      "otherwise; nll = -log p(x); mse_per_image = squared error summed over pixels"
    ),
  }
  if target.name:
    header.update(model=target.name, beta=target.beta, seed=target.seed)
    swept = config_lib.swept_value(config, target.name)
    if swept is not None:
      header.update(swept_field=swept[0], swept_value=swept[1])
  results = {**header, **results}
  t = time.perf_counter()
  pca, results["pca"] = _pca_results(config, model, data["train_x"], data["test_x"], results)
  own_timings["pca_s"] = time.perf_counter() - t
  grid = datasets.factor_grid(config.dataset)
  if grid is not None and not deterministic:
    t = time.perf_counter()
    results["disentanglement"] = disentanglement_scores(
      config, model, target.params, data["grid_images"], grid, target.seed
    )
    own_timings["disentanglement_s"] = time.perf_counter() - t
  t = time.perf_counter()
  writer = writers.MetricWriter(target.out_dir)
  try:
    paths, skipped = write_pictures(
      writer,
      target.out_dir,
      target.step,
      config=config,
      model=model,
      params=target.params,
      test_x=splits["test"],
      test_images=data["test_images"],
      test_labels=data["test_labels"],
      summary=results["test"],
      codes=values["test"]["mean"],
      pca=pca,
      deterministic=deterministic,
      sample_key=keys[step_lib.KEY_SAMPLES],
      beta=target.beta,
      seed=target.seed if target.name else None,
      swept=config_lib.swept_value(config, target.name),
    )
  finally:
    writer.close()
  own_timings["pictures_s"] = time.perf_counter() - t
  if deterministic:
    reason = "config.objective='autoencoder' has no prior or posterior, so p(x) is undefined"
    for name in ("log_likelihood", "elbo", "rate", "kl_per_dim", "active_units"):
      skipped[name] = reason
  results["skipped"] = skipped
  results["images"] = [str(p.relative_to(target.out_dir)) for p in paths]
  results["timings_s"] = {**timings, **own_timings}
  results["wall_time_s"] = time.perf_counter() - start
  results["peak_rss_mib"] = process.peak_rss_mib()
  results["machine"] = _machine()
  path = result_path(target, num_samples, deterministic)
  _write_json(path, results)
  results["path"] = str(path)
  logging.info("Wrote %s", path)
  if not deterministic:
    ll = results["test"]["log_likelihood"]
    bits = ll["bits_per_dim"]
    logging.info(
      "%stest: -log p(%s) = %.2f +- %.2f nats%s, ELBO %.2f, K=%d, %.0f s",
      f"{target.name}: " if target.name else "",
      "x | y" if model.num_classes else "x",
      ll["nll_nats"],
      ll["standard_error_nats"],
      f" ({bits:.4f} bits/dim)" if bits is not None else "",
      results["test"]["elbo"],
      num_samples,
      results["wall_time_s"],
    )
  return results


def _train_subset(
  config: ml_collections.ConfigDict, splits: input_pipeline.Splits
) -> datasets.Split:
  """The training examples the PCA and the active-unit counts see: all of the run's, or a
  fixed subset of ``MAX_TRAIN_EVAL_EXAMPLES`` of them (read from the prepared files where
  the run streamed its training split), with their labels."""
  n = splits.num_train
  keep = np.arange(n)
  if n > MAX_TRAIN_EVAL_EXAMPLES:
    keep = np.sort(np.random.default_rng(0).choice(n, MAX_TRAIN_EVAL_EXAMPLES, False))
  if splits.train is not None:
    return datasets.Split(images=splits.train.images[keep], labels=splits.train.labels[keep])
  return splits.source.read(config.data.train_split, keep)


def _written(path: pathlib.Path, target: Target) -> dict[str, Any] | None:
  """The results at ``path`` if they are whole and of ``target``'s parameters, else None."""
  try:
    results = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if results.get("checkpoint_step") != target.step:
    return None
  if results.get("params") != PARAMS_SOURCES[target.source]:
    return None
  return {**results, "path": str(path)}


def result_path(target: Target, num_samples: int, deterministic: bool) -> pathlib.Path:
  """``out_dir/eval/step_<N>_k<K>.json`` (``step_<N>.json`` for an autoencoder)."""
  name = (
    f"step_{target.step:08d}.json"
    if deterministic
    else f"step_{target.step:08d}_k{num_samples}.json"
  )
  return target.out_dir / workdir_lib.EVAL / name


def evaluate_workdir(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  num_samples: int = estimators.DEFAULT_NUM_IMPORTANCE_SAMPLES,
  *,
  eval_step: int | None = None,
  batch_size: int = estimators.IW_BATCH_SIZE,
  sample_chunk: int = estimators.IW_SAMPLE_CHUNK,
  again: bool = False,
) -> dict[str, Any]:
  """Evaluates ``workdir``'s parameters (see ``params_source``); writes JSON and pictures.

  Writes ``workdir/eval/step_<N>_k<K>.json`` (``step_<N>.json`` for an
  autoencoder, which has no likelihood to estimate), image grids in
  ``images/`` and figures in ``figures/`` (also in TensorBoard). For a sweep,
  each model's under ``models/<name>/``. Numbers are in nats per example
  unless the name says otherwise. Evaluations of one workdir take turns (a
  second waits for the first); training may go on beside them. A model whose
  evaluation at this step and ``K`` is already written is not evaluated again (an
  interrupted evaluation of a sweep continues where it stopped), unless ``again``.

  Args:
    config: the config that trained the run (checked against ``config.json``).
    workdir: the run's directory.
    num_samples: ``K``, importance samples per test example.
    eval_step: evaluate this checkpoint instead of the default choice.
    batch_size: test examples per jitted call.
    sample_chunk: samples per decoder call.
    again: evaluate even the models whose results are written already.

  Returns:
    The dict written as JSON; for a sweep, ``{"models": {name: dict}}``.

  Raises:
    config.ConfigError: the config is invalid or is not the workdir's.
    FileNotFoundError: the workdir holds no checkpoint.
    checkpointing.CheckpointError: see ``restore_targets``.
  """
  config_lib.validate(config)
  workdir = workdir_lib.check(workdir)
  logging.info(
    "Config (the fields that differ from vae_jax.config.base_config()):\n%s",
    config_lib.describe(config),
  )
  if not (workdir / workdir_lib.RECORD).exists():
    logging.warning("%s has no config.json; trusting --config.", workdir)
  workdir_lib.check_evaluation(config, workdir)
  with locks.exclusive(workdir / ".eval.lock", wait=True, what=f"the evaluation of {workdir}"):
    start = time.perf_counter()
    splits = input_pipeline.load_splits(config)
    bits = config.data.bits
    train = _train_subset(config, splits)
    data = {
      "test_x": np.asarray(
        input_pipeline.eval_images(splits.test.images, config.binarization, bits=bits)
      ),
      "train_x": np.asarray(
        input_pipeline.eval_images(train.images, config.binarization, bits=bits)
      ),
      "test_labels": splits.test.labels,
      "train_labels": train.labels,
      # The first test images as data (not binarized), for the reconstruction figure.
      "test_images": splits.test.images[:64].astype(np.float32) / (2**bits - 1),
    }
    if datasets.factor_grid(config.dataset) is not None:
      # The factor grid's images, every one (what the disentanglement metrics index),
      # whatever part of them the run trained on.
      data["grid_images"] = splits.source.load(config.data.train_split).images
    timings = {"load_s": time.perf_counter() - start}
    model, targets = restore_targets(
      config, workdir, splits.event_shape, splits.num_train, eval_step
    )
    out = {}
    deterministic = config.objective == "autoencoder"
    for target in targets:
      what = f"model {target.name} of the sweep" if target.name else f"checkpoint of {workdir}"
      done = _written(result_path(target, num_samples, deterministic), target)
      if done is not None and not again:
        logging.info(
          "The %s (step %d, K=%d) is evaluated already: %s (--eval_again to redo it).",
          what, target.step, num_samples, done["path"],
        )  # fmt: skip
        out[target.name] = done
        continue
      logging.info("Evaluating %s (step %d, K=%d)", what, target.step, num_samples)
      out[target.name] = evaluate_target(
        config, workdir, model, target, data, num_samples, timings,
        batch_size=batch_size, sample_chunk=sample_chunk,
      )  # fmt: skip
  return out[""] if not config_lib.is_sweep(config) else {"models": out}
