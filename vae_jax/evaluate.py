"""Evaluation: the ELBO and its parts over a whole split, and the pictures.

One jitted pass walks the split in fixed-size batches (``lax.scan``; the last
batch is padded and masked), so evaluation compiles once and pulls three
numbers to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import losses
from vae_jax.models import Model, Params

Array = jax.Array


def decoder_mean(decoded: Array, likelihood: str) -> Array:
  """The mean image of ``p(x | z)``: ``sigmoid(logits)`` or the Gaussian mean, in [0, 1]."""
  if likelihood == "bernoulli":
    return jax.nn.sigmoid(decoded)
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
      mean, logvar = model.encode(params, batch)
      if deterministic:
        rec = log_likelihood_fn(model.decode(params, mean), batch)
        out = losses.ElboOutput(elbo=rec, reconstruction=rec, kl=jnp.zeros_like(rec))
      else:
        out = losses.elbo(
          jax.random.fold_in(key, i),
          batch,
          mean,
          logvar,
          functools.partial(model.decode, params),
          log_likelihood_fn,
        )
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
  """Mean images of ``p(x | z)`` for ``n`` draws ``z ~ N(0, I)``: ``[n, *event_shape]``."""
  z = jax.random.normal(key, (n, model.latents))
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
