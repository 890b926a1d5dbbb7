"""The evaluate command: ``python -m vae_jax.main --mode=evaluate``.

Restores a workdir's parameters (the best on validation, the EMA or the
latest; or the checkpoint ``--eval_step=N``) and writes
``eval/step_<N>_k<K>.json``: the test log-likelihood estimated by importance
sampling with ``K`` samples from the encoder (nats, bits per dimension,
standard errors; ``vae_jax.likelihood``), the ELBO, rate, distortion, KL per
latent dimension and active units of each split, and a PCA baseline with as
many components as the model has latents (``vae_jax.baselines``). It also
draws what was learned: sample and reconstruction grids (``images/``,
TensorBoard) and matplotlib figures (``figures/``, PNG and PDF): training
curves, interpolations, traversals and, for two latents, the latent map.

A sweep's workdir is evaluated model by model, each into
``models/<name>/eval/`` and ``models/<name>/figures/``.

Reported numbers are computed at full float32 matmul precision on every
platform (``likelihood.EVAL_MATMUL_PRECISION``): on GPUs and TPUs the default
may use TF32 or bfloat16 passes, which moves likelihoods at the second decimal.
The JSON records the precision.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import (
  baselines,
  checkpointing,
  disentanglement,
  dsprites,
  figures,
  input_pipeline,
  likelihood,
  loop,
  models,
  objectives,
  optim,
  pictures,
  sweep,
  train,
  writers,
)
from vae_jax import config as config_lib
from vae_jax import step as step_lib
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
    if checkpointing.saved_steps(pathlib.Path(workdir) / train.BEST_DIR):
      return "best"
    logging.warning("%s has no best checkpoint yet (no validation so far).", workdir)
  return "ema" if ema else "latest"


def restore_params(
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  event_shape: tuple[int, ...],
  num_train: int,
  eval_step: int | None = None,
) -> tuple[int, Model, Params]:
  """Builds the model of ``config`` and restores the params to evaluate from ``workdir``.

  Those are the ones ``params_source`` names. The restore target is
  ``train.build_trainer(...).abstract_state()``, exactly as training resumes,
  so a checkpoint written on any number of devices or hosts restores here.

  Returns:
    ``(step, model, params)``.

  Raises:
    FileNotFoundError: ``workdir`` holds no checkpoint.
    checkpointing.CheckpointError: the checkpoints do not match the config, or
      ``eval_step`` is not among them.
  """
  trainer = train.build_trainer(config, event_shape, num_train)
  abstract = trainer.abstract_state()
  if params_source(config, workdir, eval_step) == "best":
    target = train.BestCheckpoint.target(abstract.params, trainer.replicated)
    step, best = checkpointing.restore_read_only(workdir / train.BEST_DIR, target)
    logging.info("Best validation ELBO %.3f at step %d.", float(best["elbo"]), step)
    return step, trainer.model, best["params"]
  step, state = checkpointing.restore_read_only(workdir / "checkpoints", abstract, eval_step)
  return step, trainer.model, optim.eval_params(state.opt_state, state.params)


# --------------------------------------------------------------------------
# Pictures of a restored model.


def _decoder(model: Model, params: Params, likelihood_name: str):
  decode_jit = jax.jit(lambda z: models.decoder_mean(model.decode(params, z), likelihood_name))

  def decode_mean(z: np.ndarray) -> np.ndarray:
    # Padded to a multiple of 512 rows, so every picture shares one compiled decoder.
    n = len(z)
    padded = np.zeros((-(-n // 512) * 512, z.shape[1]), np.float32)
    padded[:n] = z
    return np.asarray(decode_jit(padded))[:n]

  return decode_mean


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
  # 1-based names, as on the latent map's axes: z1 is latent 0 of the code arrays.
  labels = [f"z{d + 1} {score_name} {score[d]:.2f}" for d in dims]
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
  test_labels: np.ndarray,
  summary: dict[str, Any],
  codes: np.ndarray,
  pca: baselines.Pca,
  deterministic: bool,
  sample_key: Array,
) -> tuple[list[pathlib.Path], dict[str, str]]:
  """Writes the evaluation's image grids and figures; returns their paths and what was
  skipped, with why."""
  likelihood_name = config.model.likelihood
  decode_mean = _decoder(model, params, likelihood_name)
  paths, skipped = [], {}
  model_name = "AE" if deterministic else "VAE"
  figure_dir = out_dir / "figures"

  def figure(name: str, fig) -> None:
    paths.extend(figures.save_figure(fig, figure_dir / f"{name}_{step:08d}"))
    writer.write_image(step, f"eval_{name}", figures.figure_to_array(fig))

  if deterministic:
    skipped["prior_samples"] = "an autoencoder has no prior to sample from"
  else:
    samples = jax.jit(models.prior_samples, static_argnums=(0, 3, 4))(
      model, params, sample_key, 64, likelihood_name
    )
    grid = pictures.upscale(writers.image_grid(np.asarray(samples)), 2)
    paths.append(writer.write_image(step, "eval_prior_samples", grid))
  originals = test_x[:32]
  recs = np.asarray(
    jax.jit(models.reconstructions, static_argnums=(0, 3))(
      model, params, originals, likelihood_name
    )
  )
  grid = writers.image_grid(writers.interleave(originals, recs), columns=16)
  paths.append(writer.write_image(step, "eval_reconstructions", pictures.upscale(grid, 2)))

  figure(
    "training_curves",
    figures.training_curves_figure(
      writers.read_metrics(out_dir / "metrics.jsonl"), title=f"{model_name} training"
    ),
  )

  # Interpolations between the codes of test images 0-1, 2-3, ...
  pairs, steps = min(8, len(test_x) // 2), 10
  images = pictures.interpolation_images(
    decode_mean, codes[0 : 2 * pairs : 2], codes[1 : 2 * pairs : 2],
    test_x[0 : 2 * pairs : 2], test_x[1 : 2 * pairs : 2], steps,
  )  # fmt: skip
  title = f"{model_name}: decoded (1-t) z_a + t z_b between test images"
  figure("interpolations", figures.interpolation_figure(images, steps, title=title))

  # Traversals of the most informative dimensions around test image 0's code.
  dims, values, labels, how = traversal_rows(model, summary, codes, deterministic)
  images = pictures.traversal_images(decode_mean, codes[0], dims, values)
  title = f"{model_name}: one latent swept {how}, the others at test image 0's code"
  figure("traversals", figures.traversal_figure(images, labels, values, title=title))

  if model.latents == 2:
    limits = pictures.data_limits(codes)
    n = 15
    manifold = writers.image_grid(decode_mean(pictures.manifold_latents(*limits, n)), n, pad=0)
    names = pictures.CLASS_NAMES.get(config.dataset, tuple(str(i) for i in range(10)))
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
    return np.asarray(encode(input_pipeline.eval_images(x, config.binarization)))[:n]

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
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(results, indent=2) + "\n")
  tmp.replace(path)


def evaluate_params(
  config: ml_collections.ConfigDict,
  model: Model,
  params: Params,
  splits: dict[str, np.ndarray],
  eval_key: Array,
  num_samples: int,
  *,
  batch_size: int = likelihood.IW_BATCH_SIZE,
  sample_chunk: int = likelihood.IW_SAMPLE_CHUNK,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, float]]:
  """The numbers of one model's parameters on ``splits`` (``"test"``, ``"train"``).

  Returns:
    ``(results, per-example values by split, timings)``.
  """
  deterministic = config.objective == "autoencoder"
  event_shape = splits["test"].shape[1:]
  num_dims = math.prod(event_shape)
  ll_fn = objectives.make_log_likelihood_fn(
    config.model.likelihood, len(event_shape), config.model.gaussian_variance
  )
  values, timings = {}, {}
  for split, k, bs in (("test", num_samples, batch_size), ("train", 1, 1000)):
    # The training split gets one sample per example: its ELBO parts are means
    # over 60k examples, whose standard errors are reported.
    t = time.perf_counter()
    fn = likelihood.make_per_example_fn(
      model,
      ll_fn,
      config.model.likelihood,
      num_samples=k,
      sample_chunk=sample_chunk,
      deterministic=deterministic,
      unroll=models.keep_out_of_loops(config.model.kind, jax.default_backend()),
    )
    split_key = jax.random.fold_in(eval_key, _SPLIT_TAGS[split])
    values[split] = likelihood.per_example_values(
      fn, params, splits[split], split_key, bs, progress=config.progress_bar, desc=split
    )
    timings[f"{split}_split_s"] = time.perf_counter() - t
  results: dict[str, Any] = {"test": likelihood.summarize_split(values["test"], num_dims)}
  if len(model.layer_latents) > 1 and not deterministic:
    # Per layer, from the mean path's codes.
    bounds = np.cumsum([0, *model.layer_latents])
    means = values["test"]["mean"]
    results["test"]["active_units_per_layer"] = [
      likelihood.active_units(means[:, a:b])[0]
      for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
  if config.binarization == "dequantize" and "log_likelihood" in results["test"]:
    # log P(8-bit pixels) >= log p(x) - D log 256 for x = (pixels + u) / 256.
    ll = results["test"]["log_likelihood"]
    ll["bits_per_dim_8bit"] = float(
      likelihood.bits_per_dim(-ll["nll_nats"] - num_dims * math.log(256.0), num_dims)
    )
    ll["bits_per_dim_8bit_note"] = (
      "-log2 P(8-bit pixels) per dimension, bounded by the dequantized density: "
      "(nll_nats + D ln 256) / (D ln 2)"
    )
  results["train"] = likelihood.summarize_split(values["train"], num_dims, log_likelihood=False)
  results["test"]["elbo_num_samples"] = None if deterministic else num_samples
  results["train"]["elbo_num_samples"] = None if deterministic else 1
  return results, values, timings


def _pca_results(config, model, train_x, test_x, results) -> tuple[baselines.Pca, dict]:
  flat_train = train_x.reshape(len(train_x), -1)
  pca = baselines.fit_pca(flat_train, max(model.latents, 2))
  pca_k = pca._replace(
    components=pca.components[: model.latents], variances=pca.variances[: model.latents]
  )
  pca_variance = config.model.gaussian_variance
  if config.model.likelihood == "gaussian_learned":
    # The model learns its variance; PCA gets its own maximum-likelihood one
    # (the mean squared error per pixel on training images).
    fit = flat_train[:10000]
    pca_variance = float(np.mean((pca_k.reconstruct(fit) - fit) ** 2))
  out = baselines.pca_baseline(
    pca_k,
    flat_train,
    test_x.reshape(len(test_x), -1),
    "gaussian" if config.model.likelihood.startswith("gaussian") else config.model.likelihood,
    pca_variance,
  )
  out["gaussian_variance"] = pca_variance
  out["model_mse_per_image"] = results["test"]["mse_per_image"]
  out["model_distortion_at_posterior_mean"] = results["test"]["distortion_at_posterior_mean"]
  return pca, out


def _machine() -> dict[str, Any]:
  return {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
  }


def _evaluate_model(
  config, workdir, out_dir, step, source, model, params, data, seed, num_samples, extra, **kw
) -> dict[str, Any]:
  """Evaluates one model's ``params``; writes its JSON and pictures under ``out_dir``."""
  start = time.perf_counter()
  deterministic = config.objective == "autoencoder"
  keys = step_lib.run_keys(seed)
  splits = {"test": data["test_x"], "train": data["train_x"]}
  results, values, timings = evaluate_params(
    config, model, params, splits, keys[step_lib.KEY_EVAL], num_samples, **kw
  )
  header = {
    "workdir": str(workdir),
    "checkpoint_step": step,
    "dataset": config.dataset,
    "binarization": config.binarization,
    "objective": config.objective,
    "likelihood": config.model.likelihood,
    "latents": model.latents,
    "layer_latents": list(model.layer_latents),
    "params": PARAMS_SOURCES[source],
    "num_importance_samples": None if deterministic else num_samples,
    "matmul_precision": likelihood.EVAL_MATMUL_PRECISION,
    "likelihood_caveat": config_lib.likelihood_caveat(config),
    "units": (
      "nats per example (sums over pixels, means over examples) unless the name says "
      "otherwise; nll = -log p(x); mse_per_image = squared error summed over pixels"
    ),
  }
  results = {**header, **extra["header"], **results}
  t = time.perf_counter()
  pca, results["pca"] = _pca_results(config, model, data["train_x"], data["test_x"], results)
  timings["pca_s"] = time.perf_counter() - t
  grid = input_pipeline.factor_grid(config.dataset)
  if grid is not None and not deterministic:
    t = time.perf_counter()
    results["disentanglement"] = disentanglement_scores(
      config, model, params, data["train_images"], grid, seed
    )
    timings["disentanglement_s"] = time.perf_counter() - t
  t = time.perf_counter()
  writer = writers.MetricWriter(out_dir)
  try:
    paths, skipped = write_pictures(
      writer,
      out_dir,
      step,
      config=config,
      model=model,
      params=params,
      test_x=data["test_x"],
      test_labels=data["test_labels"],
      summary=results["test"],
      codes=values["test"]["mean"],
      pca=pca,
      deterministic=deterministic,
      sample_key=keys[step_lib.KEY_SAMPLES],
    )
  finally:
    writer.close()
  timings["pictures_s"] = time.perf_counter() - t
  if deterministic:
    reason = "config.objective='autoencoder' has no prior or posterior, so p(x) is undefined"
    for name in ("log_likelihood", "elbo", "rate", "kl_per_dim", "active_units"):
      skipped[name] = reason
  results["skipped"] = skipped
  results["images"] = [str(p.relative_to(out_dir)) for p in paths]
  results["timings_s"] = {**extra["timings"], **timings}
  results["wall_time_s"] = time.perf_counter() - start
  results["peak_rss_mib"] = loop.peak_rss_mib()
  results["machine"] = _machine()
  name = f"step_{step:08d}.json" if deterministic else f"step_{step:08d}_k{num_samples}.json"
  path = out_dir / "eval" / name
  _write_json(path, results)
  results["path"] = str(path)
  logging.info("Wrote %s", path)
  if not deterministic:
    ll = results["test"]["log_likelihood"]
    logging.info(
      "test: -log p(x) = %.2f +- %.2f nats (%.4f bits/dim), ELBO %.2f, K=%d, %.0f s",
      ll["nll_nats"],
      ll["standard_error_nats"],
      ll["bits_per_dim"],
      results["test"]["elbo"],
      num_samples,
      results["wall_time_s"],
    )
  return results


def evaluate_workdir(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  num_samples: int = likelihood.DEFAULT_NUM_IMPORTANCE_SAMPLES,
  *,
  eval_step: int | None = None,
  batch_size: int = likelihood.IW_BATCH_SIZE,
  sample_chunk: int = likelihood.IW_SAMPLE_CHUNK,
) -> dict[str, Any]:
  """Evaluates ``workdir``'s parameters (see ``params_source``); writes JSON and pictures.

  Writes ``workdir/eval/step_<N>_k<K>.json`` (``step_<N>.json`` for an
  autoencoder, which has no likelihood to estimate), image grids in
  ``images/`` and figures in ``figures/`` (also in TensorBoard). For a sweep,
  each model's under ``models/<name>/``. Numbers are in nats per example
  unless the name says otherwise.

  Args:
    config: the config that trained the run (checked against ``config.json``).
    workdir: the run's directory.
    num_samples: ``K``, importance samples per test example.
    eval_step: evaluate this checkpoint instead of the default choice.
    batch_size: test examples per jitted call.
    sample_chunk: samples per decoder call.

  Returns:
    The dict written as JSON; for a sweep, ``{"models": {name: dict}}``.

  Raises:
    ValueError: the config is invalid or is not the workdir's.
    FileNotFoundError: the workdir holds no checkpoint.
    checkpointing.CheckpointError: see ``restore_params``.
  """
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  if not (workdir / config_lib.RECORD).exists():
    logging.warning("%s has no config.json; trusting --config.", workdir)
  config_lib.check_evaluation(config, workdir)
  start = time.perf_counter()
  splits = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  train_images, _ = train.split_validation(splits["train"].images, config)
  event_shape = tuple(splits["test"].images.shape[1:])
  train_eval = train_images
  if len(train_images) > MAX_TRAIN_EVAL_EXAMPLES:  # A fixed subset of a large training split.
    keep = np.random.default_rng(0).choice(len(train_images), MAX_TRAIN_EVAL_EXAMPLES, False)
    train_eval = train_images[np.sort(keep)]
  data = {
    "test_x": np.asarray(input_pipeline.eval_images(splits["test"].images, config.binarization)),
    "train_x": np.asarray(input_pipeline.eval_images(train_eval, config.binarization)),
    "test_labels": splits["test"].labels,
    "train_images": train_images,
  }
  load_s = time.perf_counter() - start
  options = {"batch_size": batch_size, "sample_chunk": sample_chunk}
  if not config_lib.is_sweep(config):
    step, model, params = restore_params(config, workdir, event_shape, len(train_images), eval_step)
    logging.info("Evaluating checkpoint %d of %s (K=%d)", step, workdir, num_samples)
    source = params_source(config, workdir, eval_step)
    extra = {"header": {}, "timings": {"load_s": load_s}}
    return _evaluate_model(
      config, workdir, workdir, step, source, model, params, data, config.seed, num_samples,
      extra, **options,
    )  # fmt: skip
  trainer = sweep.build_sweep_trainer(config, event_shape, len(train_images))
  source = params_source(config, workdir, eval_step)
  if source == "best":
    target = train.BestCheckpoint.target(
      trainer.state_shape().models.params, trainer.sharding(), trainer.num_models
    )
    step, best = checkpointing.restore_read_only(workdir / train.BEST_DIR, target)
    stacked = best["params"]
  else:
    step, state = checkpointing.restore_read_only(
      workdir / "checkpoints", trainer.state_shape(), eval_step
    )
    stacked = sweep.eval_params(state)
  out = {}
  for i, name in enumerate(trainer.names):
    params = jax.tree.map(lambda x, i=i: x[i], stacked)
    logging.info("Evaluating model %s of the sweep (step %d, K=%d)", name, step, num_samples)
    out[name] = _evaluate_model(
      config, workdir, workdir / "models" / name, step, source, trainer.base.model, params,
      data, trainer.seeds[i], num_samples,
      {
        "header": {"model": name, "beta": trainer.betas[i], "seed": trainer.seeds[i]},
        "timings": {"load_s": load_s},
      },
      **options,
    )  # fmt: skip
  return {"models": out}
