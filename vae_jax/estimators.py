"""How good a model is: the importance-sampled log-likelihood and the ELBO, per example.

* ``make_eval_fn``: the ELBO and its parts over a whole split in one jitted
  pass (``lax.scan`` over fixed-size batches; the last batch padded and
  masked), with ``objectives.elbo``, the function training differentiates.
* ``make_per_example_fn``: ``log p(x)`` by importance sampling with ``K``
  samples from the encoder, ``log p(x) ~ logsumexp_k log w_k - log K`` with
  ``log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x)``, ``z_k ~ q(z | x)``
  (Burda et al., 2015), plus the ELBO parts, per example. Inside one jitted
  call a ``lax.scan`` walks the ``K`` samples in chunks, decoding ``chunk *
  batch`` latents at once and folding each chunk into a running ``logsumexp``,
  so memory is ``O(batch * (chunk * pixels + K * latent))`` and never
  ``[examples, K, pixels]``. The ``K`` samples of example ``n`` come from
  ``fold_in(key, n)`` alone, so the estimate of every example is the same
  whatever the batch or chunk size (for a one-layer model exactly
  ``losses.iw_bound(fold_in(key, n), x[n:n+1], ...)``, as a test checks).
  Every model goes through ``model.posterior``, so two-layer models and the
  VampPrior are estimated the same way.
* ``summarize_split``: means with standard errors, bits per dimension, the
  rate and distortion, active units (Burda et al. 2015).

Every function takes the ``models.Model``, whose ``likelihood`` is ``p(x | z)``; a model
of your own (``models.from_encoder_decoder``) is estimated the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from vae_jax import losses, models, objectives
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
# The longest loop that ``unroll=True`` unrolls: each iteration is a copy of the
# model in the compiled program, so longer loops stay loops (and slow on CPU for
# convolutional models) rather than take minutes to compile.
MAX_UNROLL = 32
# Matmul precision of every reported number. On GPUs and TPUs the default may use
# TF32 or bfloat16 passes, which moves ELBOs and likelihoods at the second
# decimal; on CPU it changes nothing.
EVAL_MATMUL_PRECISION = "highest"


def make_eval_fn(
  model: Model,
  batch_size: int,
  deterministic: bool = False,
  unroll: bool = False,
) -> Callable[[Params, Array, Array], dict[str, Array]]:
  """Returns jitted ``evaluate(params, x, key) -> {"elbo", "reconstruction", "kl"}``.

  ``x: [n, *event_shape]`` is the whole preprocessed split (for a conditional VAE,
  ``(x, labels [n])``, and the ELBO is that of ``log p(x | y)``); the results are
  means over its ``n`` examples in nats (``objectives.elbo`` with ``beta=1``,
  one sample of z per example; batch ``i`` draws from ``fold_in(key, i)``).
  ``deterministic=True`` (the autoencoder baseline) decodes the posterior mean
  and reports ``kl = 0``. Traced at ``EVAL_MATMUL_PRECISION``. ``unroll``
  unrolls the scan over batches when it has at most ``MAX_UNROLL`` of them
  (``execution.Plan.unroll_loops``: convolutional models on CPU).
  """

  @jax.jit
  def evaluate(params: Params, x: Array, key: Array) -> dict[str, Array]:
    with jax.default_matmul_precision(EVAL_MATMUL_PRECISION):
      return _evaluate(params, x, key)

  def _evaluate(params: Params, x: Array, key: Array) -> dict[str, Array]:
    n = jax.tree.leaves(x)[0].shape[0]
    bs = min(batch_size, n)
    num_batches = -(-n // bs)
    pad = num_batches * bs - n

    def batches(a: Array) -> Array:
      if pad:  # No copy of the split when the batches divide it (a reshape is free).
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
      return a.reshape(num_batches, bs, *a.shape[1:])

    xb = jax.tree.map(batches, x)
    mask = (jnp.arange(num_batches * bs) < n).reshape(num_batches, bs).astype(jnp.float32)

    def body(totals, inputs):
      i, batch, m = inputs
      if deterministic:
        bound, images = models.bind(model, batch)
        mean, _ = bound.encode(params, images)
        rec = bound.likelihood(bound.decode(params, mean), images)
        out = losses.ElboOutput(elbo=rec, reconstruction=rec, kl=jnp.zeros_like(rec))
      else:
        out = objectives.elbo(model, params, batch, jax.random.fold_in(key, i))
      sums = {k: jnp.sum(getattr(out, k) * m) for k in totals}
      return {k: totals[k] + sums[k] for k in totals}, None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(
      body,
      {"elbo": zero, "reconstruction": zero, "kl": zero},
      (jnp.arange(num_batches), xb, mask),
      unroll=unroll and num_batches <= MAX_UNROLL,
    )
    return {k: v / n for k, v in totals.items()}

  return evaluate


# --------------------------------------------------------------------------
# Small, checkable conversions.


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
  *,
  num_samples: int,
  sample_chunk: int = IW_SAMPLE_CHUNK,
  deterministic: bool = False,
  unroll: bool = False,
) -> Callable[[Params, Array, Array, Array], dict[str, Array]]:
  """Returns jitted ``fn(params, x, key, indices) -> {name: [batch, ...]}``.

  Args:
    model: the VAE (or autoencoder); ``model.likelihood`` is ``p(x | z)``.
    num_samples: ``K``, importance samples per example (static).
    sample_chunk: samples decoded per step of the scan; ``K`` need not be a
      multiple (the last chunk is padded and its weights masked to zero).
    deterministic: the autoencoder baseline: no sampling, only the codes and
      the reconstruction from the posterior mean.
    unroll: unroll the scan over sample chunks when it has at most
      ``MAX_UNROLL`` of them (``execution.Plan.unroll_loops``).

  The returned function takes ``x: [batch, *event_shape]`` (a conditional VAE's
  ``(x, labels)``, its ``log_px`` then ``log p(x | y)``), the split's PRNG
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
  Traced at ``EVAL_MATMUL_PRECISION``.
  """

  def at_mean(params: Params, inputs, mean: Array) -> dict[str, Array]:
    bound, x = models.bind(model, inputs)
    decoded = bound.decode(params, mean)
    diff = bound.likelihood.mean(decoded) - x
    return {
      "mean": mean,
      "reconstruction_at_mean": bound.likelihood(decoded, x),
      "squared_error": jnp.sum(jnp.square(diff).reshape(x.shape[0], -1), axis=-1),
    }

  def encode_mean(params: Params, inputs) -> Array:
    bound, x = models.bind(model, inputs)
    return bound.encode(params, x)[0]

  if deterministic:

    @jax.jit
    def per_example_ae(params: Params, x: Array, key: Array, indices: Array) -> dict[str, Array]:
      del key, indices
      with jax.default_matmul_precision(EVAL_MATMUL_PRECISION):
        return at_mean(params, x, encode_mean(params, x))

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
    with jax.default_matmul_precision(EVAL_MATMUL_PRECISION):
      return _per_example(params, x, key, indices)

  def _per_example(params: Params, x: Array, key: Array, indices: Array) -> dict[str, Array]:
    batch, latent = models.images_of(x).shape[0], model.latents

    def noise(example_key):  # [K, latent]: what losses.iw_bound draws for a batch of one.
      return losses.sample_eps(example_key, (num_samples, 1, latent))[:, 0]

    example_keys = jax.vmap(functools.partial(jax.random.fold_in, key))(indices)
    eps = jax.vmap(noise, out_axes=1)(example_keys)  # [K, batch, latent]
    eps = jnp.concatenate([eps, jnp.zeros((padded - num_samples, batch, latent), eps.dtype)])
    eps = eps.reshape(num_chunks, chunk, batch, latent)
    valid = (jnp.arange(padded) < num_samples).reshape(num_chunks, chunk, 1)

    factorized = []  # Whether the prior gives per-dimension KL terms (known when traced).

    def body(carry, inputs):
      lse, lse_sq, rec_sum, kl_sum, kl_dim_sum = carry
      eps_c, valid_c = inputs  # [chunk, batch, latent], [chunk, 1]
      log_w, log_px_z, post = models.log_weights(model, params, x, eps_c)
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
    (lse, lse_sq, rec_sum, kl_sum, kl_dim_sum), _ = jax.lax.scan(
      body, init, (eps, valid), unroll=unroll and num_chunks <= MAX_UNROLL
    )
    out = at_mean(params, x, encode_mean(params, x))
    out.update(
      log_px=lse - math.log(num_samples),
      # (sum w)^2 / sum w^2; 0 for an example whose weights are all zero.
      ess=jnp.where(jnp.isfinite(lse), jnp.exp(2.0 * lse - lse_sq), 0.0),
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
    x: ``[n, *event_shape]`` the preprocessed split, on the host (a conditional VAE's
      ``(x, labels)``).
    key: the split's key; example ``n`` uses ``fold_in(key, n)``.
    batch_size: examples per call; the last batch is zero-padded to this size,
      so ``fn`` compiles once.
    progress: show a progress bar.
    desc: its label.

  Returns:
    ``{name: [n, ...]}`` numpy arrays.
  """
  x = jax.tree.map(np.asarray, x)
  n = jax.tree.leaves(x)[0].shape[0]
  batch_size = min(batch_size, n)
  parts: list[dict[str, np.ndarray]] = []
  for start in tqdm.trange(0, n, batch_size, disable=not progress, desc=desc, unit="batch"):
    count = min(batch_size, n - start)

    def padded(a: np.ndarray, start=start, count=count) -> np.ndarray:
      part = a[start : start + count]
      if count == batch_size:
        return part
      return np.concatenate([part, np.zeros((batch_size - count, *a.shape[1:]), a.dtype)])

    xb = jax.tree.map(padded, x)
    indices = np.arange(start, start + batch_size, dtype=np.int32)
    out = jax.device_get(fn(params, xb, key, indices))
    parts.append({k: v[:count] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize_split(
  values: dict[str, np.ndarray],
  *,
  to_bits_per_dim: Callable[[float], float | None] | None = None,
  log_likelihood: bool = True,
) -> dict[str, Any]:
  """Means over examples, with standard errors, of ``per_example_values``' output.

  Args:
    values: ``{name: [n, ...]}`` from ``per_example_values``.
    to_bits_per_dim: ``-log p(x)`` in nats -> bits per dimension, or ``None`` where that
      means nothing (``likelihoods.Likelihood.bits_per_dim`` with the data's details).
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
    mean, se = float(nll.mean()), standard_error(nll)
    bits = to_bits_per_dim(mean) if to_bits_per_dim else None
    out["log_likelihood"] = {
      "nll_nats": mean,
      "standard_error_nats": se,
      "bits_per_dim": bits,
      # Both conversions are affine with slope 1 / (D ln 2).
      "standard_error_bits_per_dim": None if bits is None else to_bits_per_dim(mean + se) - bits,
      "ess_mean": float(f64["ess"].mean()),
      "ess_min": float(f64["ess"].min()),
    }
  if vae:
    kl = f64["kl"]
    elbo = f64["reconstruction"] - kl
    elbo_bits = to_bits_per_dim(float(-elbo.mean())) if to_bits_per_dim else None
    out.update(
      elbo=float(elbo.mean()),
      elbo_standard_error=standard_error(elbo),
      neg_elbo=float(-elbo.mean()),
      # -ELBO in bits per dimension: an upper bound on the data's (None where meaningless).
      elbo_bits_per_dim=elbo_bits,
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
