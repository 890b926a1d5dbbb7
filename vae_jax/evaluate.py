"""Evaluation: the numbers researchers trust and the pictures people look at.

Two uses:

* During training, ``make_eval_fn`` gives the ELBO and its parts over the test
  split in one jitted pass (``lax.scan`` over fixed-size batches; the last
  batch is padded and masked), and ``prior_samples`` / ``reconstructions``
  give the images written at each evaluation.
* After training, ``evaluate_workdir`` (``python -m vae_jax.main --mode=evaluate``)
  restores a workdir's parameters (the best on validation, the EMA or the
  latest: ``params_source``) and writes ``eval/step_<N>_k<K>.json``:
  the test log-likelihood estimated by importance sampling with ``K`` samples
  from the encoder (nats, bits per dimension, standard errors), the ELBO, rate,
  distortion, KL per latent dimension and active units of each split, and a PCA
  baseline with as many components as the model has latents; plus pictures in
  ``images/`` and TensorBoard (see ``vae_jax/pictures.py``).

The importance-sampled estimate is ``log p(x) ~ logsumexp_k log w_k - log K``
with ``log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x)``, ``z_k ~ q(z | x)``
(Burda et al., 2015). One jitted function handles a batch of examples; inside
it a ``lax.scan`` walks the ``K`` samples in chunks, decoding ``chunk * batch``
latents in one call and folding each chunk into a running ``logsumexp``, so
memory is ``O(batch * (chunk * pixels + K * latent))`` and never
``[examples, K, pixels]``.
The ``K`` samples of example ``n`` come from ``fold_in(key, n)`` alone, so the
estimate of every example is the same whatever the batch or chunk size (for a
one-layer model exactly ``losses.iw_bound(fold_in(key, n), x[n:n+1], ...)``, as a
test checks). Every model goes through ``model.posterior``, so two-layer models
are estimated the same way, with ``log q(z1, z2 | x)`` and ``log p(z1, z2)``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import resource
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from vae_jax import checkpointing, losses, models, pictures, writers
from vae_jax.models import Model, Params

Array = jax.Array

# Burda et al. (2015): a latent dimension is active when the variance over the
# data of its posterior mean exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01
# The papers' protocol for test log-likelihoods.
DEFAULT_NUM_IMPORTANCE_SAMPLES = 5000
# Examples per jitted call and samples per decoder call in the importance
# sampler: 100 * 20 = 2000 decoded images per step keeps the decoder's
# activations in the CPU's cache (measured fastest on a 2-core CPU).
IW_BATCH_SIZE = 100
IW_SAMPLE_CHUNK = 20
# Tags folded into the run's evaluation key, one stream per split.
_SPLIT_TAGS = {"test": 0, "train": 1}


def decoder_mean(decoded: Array, likelihood: str) -> Array:
  """The mean image of ``p(x | z)``: ``sigmoid(logits)`` or the Gaussian mean, in [0, 1]."""
  if likelihood == "bernoulli":
    return jax.nn.sigmoid(decoded)
  if likelihood == "gaussian_learned":  # [..., 2]: means, log-variances.
    decoded = decoded[..., 0]
  return jnp.clip(decoded, 0.0, 1.0)


def make_eval_fn(
  model: Model,
  log_likelihood_fn: losses.LogLikelihoodFn,
  batch_size: int,
  deterministic: bool = False,
) -> Callable[[Params, Array, Array], dict[str, Array]]:
  """Returns ``evaluate(params, x, key) -> {"elbo", "reconstruction", "kl"}``.

  ``x: [n, *event_shape]`` is the whole preprocessed split; the results are
  means over its ``n`` examples in nats (ELBO with ``beta=1``, one sample of z
  per example drawn from ``key``). ``deterministic=True`` (the autoencoder
  baseline) decodes the posterior mean and reports ``kl = 0``.
  """

  @jax.jit
  def evaluate(params: Params, x: Array, key: Array) -> dict[str, Array]:
    n = x.shape[0]
    bs = min(batch_size, n)
    num_batches = -(-n // bs)
    pad = num_batches * bs - n
    xb = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    xb = xb.reshape(num_batches, bs, *x.shape[1:])
    mask = (jnp.arange(num_batches * bs) < n).reshape(num_batches, bs).astype(jnp.float32)

    def body(totals, inputs):
      i, batch, m = inputs
      if deterministic:
        mean, _ = model.encode(params, batch)
        rec = log_likelihood_fn(model.decode(params, mean), batch)
        out = losses.ElboOutput(elbo=rec, reconstruction=rec, kl=jnp.zeros_like(rec))
      else:  # One sample of z per example; the KL in closed form where there is one.
        eps = jax.random.normal(jax.random.fold_in(key, i), (1, bs, model.latents))
        _, log_px_z, post = models.log_weights(model, params, batch, eps, log_likelihood_fn)
        rec, kl = log_px_z[0], post.kl[0]
        out = losses.ElboOutput(elbo=rec - kl, reconstruction=rec, kl=kl)
      sums = {k: jnp.sum(getattr(out, k) * m) for k in totals}
      return {k: totals[k] + sums[k] for k in totals}, None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(
      body,
      {"elbo": zero, "reconstruction": zero, "kl": zero},
      (jnp.arange(num_batches), xb, mask),
    )
    return {k: v / n for k, v in totals.items()}

  return evaluate


def prior_samples(model: Model, params: Params, key: Array, n: int, likelihood: str) -> Array:
  """Mean images of ``p(x | z)`` for ``n`` draws ``z ~ p(z)``: ``[n, *event_shape]``."""
  z = model.sample_prior(params, key, n)
  return decoder_mean(model.decode(params, z), likelihood)


def reconstructions(model: Model, params: Params, x: Array, likelihood: str) -> Array:
  """Mean images of ``p(x | z = posterior mean)`` for each image in ``x``."""
  mean, _ = model.encode(params, x)
  return decoder_mean(model.decode(params, mean), likelihood)


def interleave(originals: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
  """``[n, ...]`` pairs -> ``[2n, ...]``: original, reconstruction, original, ..."""
  originals, reconstructed = np.asarray(originals), np.asarray(reconstructed)
  out = np.empty((2 * originals.shape[0], *originals.shape[1:]), originals.dtype)
  out[0::2], out[1::2] = originals, reconstructed
  return out


# --------------------------------------------------------------------------
# Small, checkable conversions.


def bits_per_dim(log_px_nats: float | np.ndarray, num_dims: int) -> float | np.ndarray:
  """``-log p(x) / (D ln 2)``: a negative log-likelihood in nats -> bits per dimension.

  Args:
    log_px_nats: ``log p(x)`` in nats (a negative number for discrete data).
    num_dims: ``D``, the number of dimensions of one example (784 for 28x28x1).
  """
  return -np.asarray(log_px_nats, np.float64) / (num_dims * math.log(2.0))


def standard_error(values: np.ndarray) -> float:
  """Standard error of the mean over examples: ``std(values, ddof=1) / sqrt(n)``."""
  values = np.asarray(values, np.float64)
  if values.shape[0] < 2:
    return float("nan")
  return float(np.std(values, axis=0, ddof=1) / math.sqrt(values.shape[0]))


def active_units(
  posterior_means: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD
) -> tuple[int, np.ndarray]:
  """Counts latent dimensions whose posterior mean varies over the data.

  Args:
    posterior_means: ``[n, latent]`` ``E_q[z | x]`` for ``n`` examples.
    threshold: a dimension is active when ``Var_x(E_q[z_d | x]) > threshold``.

  Returns:
    ``(count, variances)`` with ``variances: [latent]`` (population variance).
  """
  variances = np.var(np.asarray(posterior_means, np.float64), axis=0)
  return int(np.sum(variances > threshold)), variances


# --------------------------------------------------------------------------
# Per-example values: importance-sampled log-likelihood, ELBO parts, codes.


def make_per_example_fn(
  model: Model,
  log_likelihood_fn: losses.LogLikelihoodFn,
  likelihood: str,
  *,
  num_samples: int,
  sample_chunk: int = IW_SAMPLE_CHUNK,
  deterministic: bool = False,
) -> Callable[[Params, Array, Array, Array], dict[str, Array]]:
  """Returns jitted ``fn(params, x, key, indices) -> {name: [batch, ...]}``.

  Args:
    model: the VAE (or autoencoder).
    log_likelihood_fn: ``(decoded [n, *event], x [n, *event]) -> [n]``.
    likelihood: ``config.model.likelihood``, for the decoder's mean image.
    num_samples: ``K``, importance samples per example (static).
    sample_chunk: samples decoded per step of the scan; ``K`` need not be a
      multiple (the last chunk is padded and its weights masked to zero).
    deterministic: the autoencoder baseline: no sampling, only the codes and
      the reconstruction from the posterior mean.

  The returned function takes ``x: [batch, *event_shape]``, the split's PRNG
  ``key`` and ``indices: [batch]`` int32, the examples' positions in the split
  (example ``n`` draws its samples from ``fold_in(key, n)``), and returns per
  example, in nats:

  * ``mean``: ``[batch, latent]`` posterior means (the autoencoder's codes);
  * ``reconstruction_at_mean``: ``[batch]`` ``log p(x | z = mean)``;
  * ``squared_error``: ``[batch]`` ``sum_pixels (E[x | z = mean] - x)**2``;

  and unless ``deterministic``:

  * ``log_px``: ``[batch]`` the importance-weighted bound with ``K`` samples;
  * ``ess``: ``[batch]`` effective sample size of the weights,
    ``(sum w)**2 / sum w**2``, between 1 and ``K``;
  * ``reconstruction``: ``[batch]`` ``E_q[log p(x | z)]``, the mean over the
    same ``K`` samples;
  * ``kl``: ``[batch]`` the KL (rate) of each example, the mean over the ``K``
    samples of ``models.PosteriorSample.kl``;
  * ``kl_per_dim``: ``[batch, latent]`` (where the prior factorizes) per-dimension KL: closed
    form
    ``KL(q(z_d | x) || N(0, 1))`` for a standard-normal prior, else the mean
    over the ``K`` samples of ``log q - log p`` (see ``models.PosteriorSample``).

  One compiled program per input shape: pad the last batch to the others' size.
  """

  def at_mean(params: Params, x: Array, mean: Array) -> dict[str, Array]:
    decoded = model.decode(params, mean)
    diff = decoder_mean(decoded, likelihood) - x
    return {
      "mean": mean,
      "reconstruction_at_mean": log_likelihood_fn(decoded, x),
      "squared_error": jnp.sum(jnp.square(diff).reshape(x.shape[0], -1), axis=-1),
    }

  if deterministic:

    @jax.jit
    def per_example_ae(params: Params, x: Array, key: Array, indices: Array) -> dict[str, Array]:
      del key, indices
      mean, _ = model.encode(params, x)
      return at_mean(params, x, mean)

    return per_example_ae

  if num_samples < 1 or sample_chunk < 1:
    raise ValueError(
      f"num_samples and sample_chunk must be >= 1, got {num_samples}, {sample_chunk}."
    )
  chunk = min(sample_chunk, num_samples)
  num_chunks = -(-num_samples // chunk)
  padded = num_chunks * chunk

  @jax.jit
  def per_example(params: Params, x: Array, key: Array, indices: Array) -> dict[str, Array]:
    batch, latent = x.shape[0], model.latents

    def noise(example_key):  # [K, latent]: what losses.iw_bound draws for a batch of one.
      return jax.random.normal(example_key, (num_samples, 1, latent))[:, 0]

    example_keys = jax.vmap(functools.partial(jax.random.fold_in, key))(indices)
    eps = jax.vmap(noise, out_axes=1)(example_keys)  # [K, batch, latent]
    eps = jnp.concatenate([eps, jnp.zeros((padded - num_samples, batch, latent), eps.dtype)])
    eps = eps.reshape(num_chunks, chunk, batch, latent)
    valid = (jnp.arange(padded) < num_samples).reshape(num_chunks, chunk, 1)

    factorized = []  # Whether the prior gives per-dimension KL terms (known when traced).

    def body(carry, inputs):
      lse, lse_sq, rec_sum, kl_sum, kl_dim_sum = carry
      eps_c, valid_c = inputs  # [chunk, batch, latent], [chunk, 1]
      log_w, log_px_z, post = models.log_weights(model, params, x, eps_c, log_likelihood_fn)
      log_w = jnp.where(valid_c, log_w, -jnp.inf)  # [chunk, batch]; padding weighs nothing.
      lse = jnp.logaddexp(lse, jax.nn.logsumexp(log_w, axis=0))
      lse_sq = jnp.logaddexp(lse_sq, jax.nn.logsumexp(2.0 * log_w, axis=0))
      rec_sum = rec_sum + jnp.sum(jnp.where(valid_c, log_px_z, 0.0), axis=0)
      kl_sum = kl_sum + jnp.sum(jnp.where(valid_c, post.kl, 0.0), axis=0)
      factorized[:] = [post.kl_per_dim is not None]
      if post.kl_per_dim is not None:
        kl_dim = jnp.where(valid_c[..., None], post.kl_per_dim, 0.0)
        kl_dim_sum = kl_dim_sum + jnp.sum(kl_dim, axis=0)
      return (lse, lse_sq, rec_sum, kl_sum, kl_dim_sum), None

    neg_inf = jnp.full((batch,), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((batch,), jnp.float32)
    init = (neg_inf, neg_inf, zeros, zeros, jnp.zeros((batch, latent), jnp.float32))
    (lse, lse_sq, rec_sum, kl_sum, kl_dim_sum), _ = jax.lax.scan(body, init, (eps, valid))
    mean, _ = model.encode(params, x)
    out = at_mean(params, x, mean)
    out.update(
      log_px=lse - math.log(num_samples),
      ess=jnp.exp(2.0 * lse - lse_sq),
      reconstruction=rec_sum / num_samples,
      kl=kl_sum / num_samples,
    )
    if factorized[0]:
      out["kl_per_dim"] = kl_dim_sum / num_samples
    return out

  return per_example


def per_example_values(
  fn: Callable[[Params, Array, Array, Array], dict[str, Array]],
  params: Params,
  x: np.ndarray,
  key: Array,
  batch_size: int,
  *,
  progress: bool = False,
  desc: str = "",
) -> dict[str, np.ndarray]:
  """Runs ``fn`` (from ``make_per_example_fn``) over all of ``x``, batch by batch.

  Args:
    fn: the jitted per-example function.
    params: model parameters.
    x: ``[n, *event_shape]`` the preprocessed split, on the host.
    key: the split's key; example ``n`` uses ``fold_in(key, n)``.
    batch_size: examples per call; the last batch is zero-padded to this size,
      so ``fn`` compiles once.
    progress: show a progress bar.
    desc: its label.

  Returns:
    ``{name: [n, ...]}`` numpy arrays.
  """
  x = np.asarray(x)
  n = x.shape[0]
  batch_size = min(batch_size, n)
  parts: list[dict[str, np.ndarray]] = []
  for start in tqdm.trange(0, n, batch_size, disable=not progress, desc=desc, unit="batch"):
    xb = x[start : start + batch_size]
    count = xb.shape[0]
    if count < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - count, *x.shape[1:]), x.dtype)])
    indices = np.arange(start, start + batch_size, dtype=np.int32)
    out = jax.device_get(fn(params, xb, key, indices))
    parts.append({k: v[:count] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize_split(
  values: dict[str, np.ndarray], num_dims: int, log_likelihood: bool = True
) -> dict[str, Any]:
  """Means over examples, with standard errors, of ``per_example_values``' output.

  Args:
    values: ``{name: [n, ...]}`` from ``per_example_values``.
    num_dims: pixels per example, for bits per dimension.
    log_likelihood: report the importance-sampled ``log_likelihood`` (leave it
      out where ``K`` is too small for it to mean anything).

  Returns:
    A JSON-ready dict. ``log_likelihood``, ``elbo``, ``rate``, ``distortion``,
    ``kl_per_dim`` and ``active_units`` appear only for a VAE.
  """
  f64 = {k: np.asarray(v, np.float64) for k, v in values.items()}
  vae = "log_px" in f64
  out: dict[str, Any] = {"num_examples": int(f64["mean"].shape[0])}
  if vae and log_likelihood:
    nll = -f64["log_px"]
    se = standard_error(nll)
    out["log_likelihood"] = {
      "nll_nats": float(nll.mean()),
      "standard_error_nats": se,
      "bits_per_dim": float(bits_per_dim(-nll.mean(), num_dims)),
      "standard_error_bits_per_dim": se / (num_dims * math.log(2.0)),
      "ess_mean": float(f64["ess"].mean()),
      "ess_min": float(f64["ess"].min()),
    }
  if vae:
    kl = f64["kl"]
    elbo = f64["reconstruction"] - kl
    out.update(
      elbo=float(elbo.mean()),
      elbo_standard_error=standard_error(elbo),
      neg_elbo=float(-elbo.mean()),
      rate=float(kl.mean()),
      rate_standard_error=standard_error(kl),
      distortion=float(-f64["reconstruction"].mean()),
      distortion_standard_error=standard_error(f64["reconstruction"]),
    )
    if "kl_per_dim" in f64:
      out["kl_per_dim"] = [float(v) for v in f64["kl_per_dim"].mean(0)]
  count, variances = active_units(f64["mean"])
  out.update(
    distortion_at_posterior_mean=float(-f64["reconstruction_at_mean"].mean()),
    mse_per_image=float(f64["squared_error"].mean()),
    posterior_mean_variance=[float(v) for v in variances],
  )
  if vae:
    out.update(active_units=count, active_unit_threshold=ACTIVE_UNIT_THRESHOLD)
  return out


# --------------------------------------------------------------------------
# The PCA baseline.


class Pca(NamedTuple):
  """Principal components of a data set.

  Attributes:
    mean: ``[D]`` the data mean.
    components: ``[k, D]`` orthonormal directions, largest variance first.
    variances: ``[k]`` the variance along each.
    total_variance: the sum of the variances of all ``D`` dimensions.
  """

  mean: np.ndarray
  components: np.ndarray
  variances: np.ndarray
  total_variance: float

  def project(self, x: np.ndarray) -> np.ndarray:
    """``[n, D] -> [n, k]`` coordinates."""
    return (np.asarray(x, np.float64) - self.mean) @ self.components.T

  def reconstruct(self, x: np.ndarray) -> np.ndarray:
    """``[n, D] -> [n, D]``: the projection back in data space."""
    return self.mean + self.project(x) @ self.components


def fit_pca(x: np.ndarray, num_components: int, chunk: int = 10000) -> Pca:
  """PCA of ``x: [n, D]`` in float64.

  With more examples than dimensions: eigenvectors of the covariance, which is
  accumulated over chunks of rows (memory ``O(chunk * D + D**2)``); otherwise the
  SVD of the centred data, which is cheaper there. Both are exact.
  """
  x = np.asarray(x)
  n, d = x.shape
  if not 1 <= num_components <= d:
    raise ValueError(f"num_components must be in [1, {d}], got {num_components}.")
  mean = np.zeros(d)
  for start in range(0, n, chunk):
    mean += x[start : start + chunk].sum(0, dtype=np.float64)
  mean /= n
  if n <= d:
    _, singular, vt = np.linalg.svd(x.astype(np.float64) - mean, full_matrices=False)
    variances = singular**2 / n
    return Pca(mean, vt[:num_components], variances[:num_components], float(variances.sum()))
  cov = np.zeros((d, d))
  for start in range(0, n, chunk):
    xc = x[start : start + chunk].astype(np.float64) - mean
    cov += xc.T @ xc
  cov /= n
  eigenvalues, eigenvectors = np.linalg.eigh(cov)  # Ascending.
  top = np.argsort(eigenvalues)[::-1][:num_components]
  return Pca(mean, eigenvectors[:, top].T, eigenvalues[top], float(np.trace(cov)))


# Clipping levels tried for PCA reconstructions used as Bernoulli means.
_PCA_CLIPS = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)


_bernoulli_log_likelihood_jit = jax.jit(losses.bernoulli_log_likelihood)


def _clipped_bernoulli_nll(p: np.ndarray, x: np.ndarray, clip: float) -> np.ndarray:
  p = np.clip(p, clip, 1.0 - clip)
  logits = (np.log(p) - np.log1p(-p)).astype(np.float32)
  return -np.asarray(_bernoulli_log_likelihood_jit(logits, np.asarray(x, np.float32)))


def pca_baseline(
  pca: Pca,
  train_x: np.ndarray,
  test_x: np.ndarray,
  likelihood: str,
  gaussian_variance: float = 1.0,
  max_fit_examples: int = 10000,
) -> dict[str, Any]:
  """PCA's reconstruction error on the test set, in the model's units.

  Args:
    pca: fitted on the training split.
    train_x: ``[n, D]`` training data, to choose the Bernoulli clipping level.
    test_x: ``[m, D]`` test data.
    likelihood: the model's (``bernoulli`` or ``gaussian``).
    gaussian_variance: its ``c``, for ``gaussian``.
    max_fit_examples: training examples used to choose the clipping level.

  Returns:
    ``mse_per_image`` (squared error summed over pixels, mean over images), and
    ``distortion``: the negative log-likelihood of the test set under the
    model's likelihood with the PCA reconstruction as its mean. A Bernoulli
    mean must lie in (0, 1), so the reconstruction is clipped to
    ``[clip, 1 - clip]``, with ``clip`` the level in ``_PCA_CLIPS`` that
    minimizes the NLL on training images (reported as ``bernoulli_clip``).
  """
  recon = pca.reconstruct(test_x)
  out: dict[str, Any] = {
    "num_components": int(pca.components.shape[0]),
    "fit_on": f"train split ({train_x.shape[0]} examples), same preprocessing",
    "explained_variance_fraction": float(pca.variances.sum() / pca.total_variance),
    "mse_per_image": float(np.mean(np.sum((recon - test_x) ** 2, axis=-1))),
  }
  if likelihood == "bernoulli":
    fit = train_x[:max_fit_examples]
    fit_recon = pca.reconstruct(fit)
    nlls = [float(_clipped_bernoulli_nll(fit_recon, fit, c).mean()) for c in _PCA_CLIPS]
    clip = _PCA_CLIPS[int(np.argmin(nlls))]
    out["bernoulli_clip"] = clip
    out["distortion"] = float(_clipped_bernoulli_nll(recon, test_x, clip).mean())
  else:
    log_p = losses.gaussian_log_likelihood(
      jnp.asarray(recon, jnp.float32), jnp.asarray(test_x, jnp.float32), gaussian_variance
    )
    out["distortion"] = float(-np.mean(np.asarray(log_p)))
  return out


# --------------------------------------------------------------------------
# Checkpoints.


def check_config_matches_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Raises ValueError if ``config`` differs from the run recorded in ``workdir``.

  Any difference outside ``config_defaults.RESUMABLE_CHANGES`` (binarization,
  model, seed, ...) would evaluate the checkpoint under the wrong assumptions.
  """
  from vae_jax import train  # Deferred: train imports this module.

  if not (workdir / "config.json").exists():
    logging.warning("%s has no config.json; trusting --config.", workdir)
    return
  diffs = train.config_differences(config, workdir)
  if diffs:
    raise ValueError(
      f"{workdir} was trained with a different config:\n" + "\n".join(diffs) + "\n"
      "Evaluate it with the --config (and overrides) that trained it."
    )


PARAMS_SOURCES = {
  "best": "best validation ELBO (WORKDIR/best)",
  "ema": "EMA of the latest checkpoint",
  "latest": "latest checkpoint",
}


def params_source(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
  """Which parameters of ``workdir`` to evaluate: a key of ``PARAMS_SOURCES``.

  The best-on-validation ones if the run keeps them and has saved some (before
  its first validation there are none: then the next choice, with a warning),
  else the EMA if the optimizer keeps one, else the latest parameters.
  """
  from vae_jax import train  # Deferred: train imports this module.

  if config.validation_examples:
    if checkpointing.saved_steps(pathlib.Path(workdir) / train.BEST_DIR):
      return "best"
    logging.warning("%s has no best checkpoint yet (no validation so far).", workdir)
  return "ema" if config.optimizer.ema_decay is not None else "latest"


def restore_params(
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  event_shape: tuple[int, ...],
  num_train: int,
) -> tuple[int, Model, Params]:
  """Builds the model of ``config`` and restores the params to evaluate from ``workdir``.

  Those are the ones ``params_source`` names: the best-on-validation
  parameters in ``workdir/best``, the EMA of the latest checkpoint, or its
  parameters. The
  restore target is ``train.build_trainer(...).abstract_state()``, exactly
  as ``train.train_and_evaluate`` resumes, so a checkpoint written on any
  number of devices or hosts restores here.

  Args:
    config: the config that trained the run.
    workdir: the run's directory.
    event_shape: shape of one example.
    num_train: training examples (``build_trainer`` checks the batch size with it).

  Returns:
    ``(step, model, params)``.

  Raises:
    FileNotFoundError: ``workdir`` holds no checkpoint.
    checkpointing.CheckpointError: the checkpoints do not match the config.
  """
  from vae_jax import train  # Deferred: train imports this module.

  trainer = train.build_trainer(config, event_shape, num_train)
  abstract = trainer.abstract_state()
  if params_source(config, workdir) == "best":
    step, best = checkpointing.restore_latest_read_only(
      workdir / train.BEST_DIR, train.BestCheckpoint.target(abstract.params, trainer.replicated)
    )
    logging.info("Best validation ELBO %.3f at step %d.", float(best["elbo"]), step)
    return step, trainer.model, best["params"]
  step, state = checkpointing.restore_latest_read_only(workdir / "checkpoints", abstract)
  return step, trainer.model, train.eval_params(state)


# --------------------------------------------------------------------------
# Pictures of a restored model.


def _write_pictures(
  writer: writers.MetricWriter,
  step: int,
  *,
  config: ml_collections.ConfigDict,
  model: Model,
  params: Params,
  test_x: np.ndarray,
  test_labels: np.ndarray,
  summary: dict[str, Any],
  codes: np.ndarray,
  pca: Pca,
  deterministic: bool,
) -> tuple[list[pathlib.Path], dict[str, str]]:
  """Writes the evaluation pictures; returns their paths and what was skipped, with why."""
  from vae_jax import train  # Deferred: train imports this module.

  likelihood = config.model.likelihood
  decode_jit = jax.jit(lambda z: decoder_mean(model.decode(params, z), likelihood))

  def decode_mean(z: np.ndarray) -> np.ndarray:
    # Padded to a multiple of 512 rows, so every picture shares one compiled decoder.
    n = len(z)
    padded = np.zeros((-(-n // 512) * 512, z.shape[1]), np.float32)
    padded[:n] = z
    return np.asarray(decode_jit(padded))[:n]

  paths, skipped = [], {}
  model_name = "AE" if deterministic else "VAE"
  if deterministic:
    skipped["prior_samples"] = "an autoencoder has no prior to sample from"
  else:
    key = train.run_keys(config.seed)[train.KEY_SAMPLES]
    samples = jax.jit(prior_samples, static_argnums=(0, 3, 4))(model, params, key, 64, likelihood)
    grid = pictures.upscale(writers.image_grid(samples), 2)
    paths.append(writer.write_image(step, "eval_prior_samples", grid))

  originals = test_x[:32]
  recs = np.asarray(
    jax.jit(reconstructions, static_argnums=(0, 3))(model, params, originals, likelihood)
  )
  grid = pictures.upscale(writers.image_grid(interleave(originals, recs), columns=16), 2)
  paths.append(writer.write_image(step, "eval_reconstructions", grid))

  # Interpolations between the posterior means of test images 0-1, 2-3, ...
  pairs, steps = min(8, len(test_x) // 2), 10
  images = pictures.interpolation_images(
    decode_mean, codes[0 : 2 * pairs : 2], codes[1 : 2 * pairs : 2],
    test_x[0 : 2 * pairs : 2], test_x[1 : 2 * pairs : 2], steps,
  )  # fmt: skip
  grid = pictures.upscale(writers.image_grid(images, columns=steps + 2), 2)
  header = f"{model_name}: test image, decoded (1-t) z_a + t z_b for t = 0..1, test image"
  grid = pictures.label_rows(grid, [""] * pairs, cell=56, pad=2, header=header)
  paths.append(writer.write_image(step, "eval_interpolations", grid))

  # Traversals of the most informative dimensions around test image 0's code.
  if deterministic or "kl_per_dim" not in summary:
    score, score_name = np.asarray(summary["posterior_mean_variance"]), "var"
    low, high = np.percentile(codes, [1, 99], axis=0)
    how = "from the 1st to the 99th percentile of the test codes"
  else:
    score, score_name = np.asarray(summary["kl_per_dim"]), "KL"
    low, high = np.full(model.latents, -3.0), np.full(model.latents, 3.0)
    how = "from -3 to 3"
  # A hierarchical decoder may read only the bottom layer: sweep dimensions it reads.
  visible = model.decoder_reads or model.latents
  dims = [int(d) for d in np.argsort(-score[:visible])[: min(10, visible)]]
  values = np.linspace(low[dims], high[dims], 11, axis=1)
  images = pictures.traversal_images(decode_mean, codes[0], dims, values)
  grid = pictures.upscale(writers.image_grid(images, columns=11), 2)
  labels = [f"z{d} {score_name} {score[d]:.2f}" for d in dims]
  header = f"{model_name}: one latent swept {how}, the others at test image 0's code"
  grid = pictures.label_rows(grid, labels, cell=56, pad=2, header=header)
  paths.append(writer.write_image(step, "eval_traversals", grid))

  if model.latents == 2:
    limits = pictures.data_limits(codes)
    n = 15  # Cells of the decoded plane; the panels are n images wide, so none is resampled.
    manifold = writers.image_grid(decode_mean(pictures.manifold_latents(*limits, n)), n, pad=0)
    names = pictures.CLASS_NAMES.get(config.dataset, tuple(str(i) for i in range(10)))
    figure = pictures.latent_map_figure(
      codes,
      pca.project(test_x.reshape(len(test_x), -1))[:, :2],
      test_labels,
      manifold,
      latent_limits=limits,
      class_names=names,
      model_name=model_name,
      code_name="codes" if deterministic else "posterior means",
      size=manifold.shape[0],
    )
    paths.append(writer.write_image(step, "eval_latent_map", figure))
  else:
    skipped["latent_map"] = f"drawn only for 2 latent dimensions; this model has {model.latents}"
  writer.flush()
  return paths, skipped


# --------------------------------------------------------------------------
# The evaluate command.


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB.


def evaluate_workdir(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  num_samples: int = DEFAULT_NUM_IMPORTANCE_SAMPLES,
  *,
  batch_size: int = IW_BATCH_SIZE,
  sample_chunk: int = IW_SAMPLE_CHUNK,
) -> dict[str, Any]:
  """Evaluates ``workdir``'s parameters (see ``params_source``); writes JSON and pictures.

  Writes ``workdir/eval/step_<N>_k<K>.json`` (``step_<N>.json`` for an
  autoencoder, which has no likelihood to estimate) and ``images/eval_*_<N>.png``
  (also in TensorBoard). Numbers are in nats per example unless the name says
  otherwise.

  Args:
    config: the config that trained the run (checked against ``config.json``).
    workdir: the run's directory.
    num_samples: ``K``, importance samples per test example.
    batch_size: test examples per jitted call.
    sample_chunk: samples per decoder call.

  Returns:
    The dict written as JSON.
  """
  from vae_jax import input_pipeline, train  # Deferred: train imports this module.

  start = time.perf_counter()
  timings: dict[str, float] = {}
  train.validate_config(config)
  workdir = pathlib.Path(workdir)
  check_config_matches_workdir(config, workdir)
  deterministic = config.objective == "autoencoder"

  data = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  event_shape = tuple(data["test"].images.shape[1:])
  num_dims = math.prod(event_shape)
  train_images, _ = train.split_validation(data["train"].images, config)
  step, model, params = restore_params(config, workdir, event_shape, len(train_images))
  test_x = np.asarray(input_pipeline.eval_images(data["test"].images, config.binarization))
  train_x = np.asarray(input_pipeline.eval_images(train_images, config.binarization))
  timings["load_s"] = time.perf_counter() - start
  logging.info("Evaluating checkpoint %d of %s (K=%d)", step, workdir, num_samples)

  ll_fn = train.make_log_likelihood_fn(config, len(event_shape))
  eval_key = train.run_keys(config.seed)[train.KEY_EVAL]
  split_values = {}
  for split, x, k, bs in (
    ("test", test_x, num_samples, batch_size),
    # The training split gets one sample per example: its ELBO parts are means
    # over 60k examples, whose standard errors are reported.
    ("train", train_x, 1, 1000),
  ):
    t = time.perf_counter()
    fn = make_per_example_fn(
      model,
      ll_fn,
      config.model.likelihood,
      num_samples=k,
      sample_chunk=sample_chunk,
      deterministic=deterministic,
    )
    split_key = jax.random.fold_in(eval_key, _SPLIT_TAGS[split])
    split_values[split] = per_example_values(
      fn, params, x, split_key, bs, progress=config.progress_bar, desc=split
    )
    timings[f"{split}_split_s"] = time.perf_counter() - t

  results: dict[str, Any] = {
    "workdir": str(workdir),
    "checkpoint_step": step,
    "dataset": config.dataset,
    "binarization": config.binarization,
    "objective": config.objective,
    "likelihood": config.model.likelihood,
    "latents": model.latents,
    "layer_latents": list(model.layer_latents),
    "params": PARAMS_SOURCES[params_source(config, workdir)],
    "num_importance_samples": None if deterministic else num_samples,
    "units": (
      "nats per example (sums over pixels, means over examples) unless the name says "
      "otherwise; nll = -log p(x); mse_per_image = squared error summed over pixels"
    ),
  }
  results["test"] = summarize_split(split_values["test"], num_dims)
  if len(model.layer_latents) > 1 and not deterministic:
    # Per layer, from the mean path's codes (for z2: the mean of q(z2 | z1 = E[z1]),
    # a one-point stand-in for E_q[z2 | x]).
    bounds = np.cumsum([0, *model.layer_latents])
    means = split_values["test"]["mean"]
    results["test"]["active_units_per_layer"] = [
      active_units(means[:, a:b])[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
  if config.binarization == "dequantize" and "log_likelihood" in results["test"]:
    # log P(8-bit pixels) >= log p(x) - D log 256 for x = (pixels + u) / 256.
    ll = results["test"]["log_likelihood"]
    ll["bits_per_dim_8bit"] = float(
      bits_per_dim(-ll["nll_nats"] - num_dims * math.log(256.0), num_dims)
    )
    ll["bits_per_dim_8bit_note"] = (
      "-log2 P(8-bit pixels) per dimension, bounded by the dequantized density: "
      "(nll_nats + D ln 256) / (D ln 2)"
    )
  results["train"] = summarize_split(split_values["train"], num_dims, log_likelihood=False)
  results["test"]["elbo_num_samples"] = None if deterministic else num_samples
  results["train"]["elbo_num_samples"] = None if deterministic else 1

  t = time.perf_counter()
  flat_train = train_x.reshape(len(train_x), -1)
  pca = fit_pca(flat_train, max(model.latents, 2))
  pca_k = pca._replace(
    components=pca.components[: model.latents], variances=pca.variances[: model.latents]
  )
  pca_variance = config.model.gaussian_variance
  if config.model.likelihood == "gaussian_learned":
    # The model learns its variance; PCA gets its own maximum-likelihood one
    # (the mean squared error per pixel on training images).
    fit = flat_train[:10000]
    pca_variance = float(np.mean((pca_k.reconstruct(fit) - fit) ** 2))
  results["pca"] = pca_baseline(
    pca_k,
    flat_train,
    test_x.reshape(len(test_x), -1),
    "bernoulli" if config.model.likelihood == "bernoulli" else "gaussian",
    pca_variance,
  )
  results["pca"]["gaussian_variance"] = pca_variance
  results["pca"]["model_mse_per_image"] = results["test"]["mse_per_image"]
  results["pca"]["model_distortion_at_posterior_mean"] = results["test"][
    "distortion_at_posterior_mean"
  ]
  timings["pca_s"] = time.perf_counter() - t

  t = time.perf_counter()
  writer = writers.MetricWriter(workdir)
  try:
    paths, skipped = _write_pictures(
      writer,
      step,
      config=config,
      model=model,
      params=params,
      test_x=test_x,
      test_labels=data["test"].labels,
      summary=results["test"],
      codes=split_values["test"]["mean"],
      pca=pca,
      deterministic=deterministic,
    )
  finally:
    writer.close()
  timings["pictures_s"] = time.perf_counter() - t

  if deterministic:
    reason = "config.objective='autoencoder' has no prior or posterior, so p(x) is undefined"
    for name in ("log_likelihood", "elbo", "rate", "kl_per_dim", "active_units"):
      skipped[name] = reason
  results["skipped"] = skipped
  results["images"] = [str(p.relative_to(workdir)) for p in paths]
  results["timings_s"] = timings
  results["wall_time_s"] = time.perf_counter() - start
  results["peak_rss_mib"] = _peak_rss_mib()
  results["machine"] = {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
  }
  name = f"step_{step:08d}.json" if deterministic else f"step_{step:08d}_k{num_samples}.json"
  path = workdir / "eval" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(results, indent=2) + "\n")
  tmp.replace(path)
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
