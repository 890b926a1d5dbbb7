"""The VAE objective as small pure functions on arrays.

Everything here imports only ``jax`` and works unchanged under ``jax.jit``,
``jax.vmap`` and ``jax.grad``. Conventions shared by every function:

* Units are nats. Log-likelihoods and KL terms are **summed over event
  dimensions** and **not reduced over the batch**: each function returns one
  value per example, and the caller chooses how to average.
* ``x: [batch, *event_shape]``; latents are ``[batch, latent]``; with several
  Monte Carlo samples a leading sample axis is added: ``[samples, batch, ...]``.
* Shapes are checked at trace time: arrays that would otherwise broadcast
  silently raise ``ValueError``.
* Inputs may be float32, bfloat16 or float64. Reductions are carried out in at
  least float32 (bfloat16 inputs are upcast), so a bfloat16 model still gets a
  float32 loss.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
# Maps decoder outputs (logits or means) and data of the same shape
# [batch, *event_shape] to per-example log-likelihoods [batch].
LogLikelihoodFn = Callable[[Array, Array], Array]
# Maps latents [n, latent] to decoder outputs [n, *event_shape].
DecodeFn = Callable[[Array], Array]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------
# Checks and dtype handling.


def _check_float(name: str, a: Array) -> None:
  if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
    raise TypeError(
      f"{name} must be a floating-point array, got dtype {jnp.asarray(a).dtype}. "
      f"Convert it first, e.g. {name}.astype(jnp.float32) (images: divide uint8 "
      "pixels by 255)."
    )


def _check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
      f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and "
      f"{jnp.shape(b)}. vae_jax.losses never broadcasts these silently; "
      "reshape or add the sample axis explicitly."
    )


def _check_event_ndims(name: str, a: Array, event_ndims: int) -> None:
  if not 0 <= event_ndims <= jnp.ndim(a):
    raise ValueError(
      f"event_ndims={event_ndims} is out of range for {name} of shape "
      f"{jnp.shape(a)}: it must be between 0 and {jnp.ndim(a)}."
    )


def _compute_dtype(*arrays: Array) -> jnp.dtype:
  """The dtype in which reductions run: float64 if any input is, else float32.

  Chosen explicitly rather than by JAX's promotion rules, so the functions work the
  same under ``jax_numpy_dtype_promotion="strict"`` (which has no implicit path from
  bfloat16 to float32).
  """
  bits = [
    jnp.finfo(d).bits for a in arrays if jnp.issubdtype(d := jnp.asarray(a).dtype, jnp.inexact)
  ]
  return jnp.dtype(jnp.float64 if max(bits, default=32) > 32 else jnp.float32)


def _sum_event(a: Array, event_ndims: int) -> Array:
  if event_ndims == 0:
    return a
  return jnp.sum(a, axis=tuple(range(a.ndim - event_ndims, a.ndim)))


def _flat_events(event_ndims: int, *arrays: Array) -> tuple[Array, ...]:
  """``arrays`` with their last ``event_ndims`` axes merged into one (a free reshape).

  Elementwise math over images stored ``[..., h, w, 1]`` runs several times
  faster on CPU over ``[..., h * w]``: XLA vectorizes along the minor axis, which
  is 1 for a single channel. Results are the same numbers.
  """
  if event_ndims == 0:
    return arrays
  return tuple(a.reshape(*a.shape[: a.ndim - event_ndims], -1) for a in arrays)


@jax.custom_jvp
def softplus(x: Array) -> Array:
  """``log(1 + exp(x))``, exact for any finite ``x``, with derivative ``sigmoid(x)`` everywhere.

  Written out as ``max(x, 0) + log1p(exp(-|x|))``, which vectorizes on CPU
  where ``jax.nn.softplus`` (``logaddexp``) does not: about 3x faster per
  pixel. The derivative is defined, not differentiated through that formula:
  at ``x = 0`` the kinks of ``max`` and ``|x|`` would give ``0`` (their
  one-sided derivatives cancel) where the true derivative is ``1/2``.
  """
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return softplus(x), jax.nn.sigmoid(x) * dx


def logsumexp(a: Array, axis: int = 0) -> Array:
  """``log sum_k exp(a_k)`` over ``axis``, stable, and with zero weights handled.

  ``-inf`` entries (zero weights) contribute nothing to the value and receive
  a zero gradient; when every entry is ``-inf`` the value is ``-inf`` and the
  gradient is zero (``jax.nn.logsumexp`` gives NaN there). A NaN entry makes the
  value NaN: a broken input is never hidden as a zero weight.

  Args:
    a: log-values, any shape.
    axis: the axis reduced.
  """
  peak = jnp.max(a, axis=axis, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(jnp.exp(a - peak), axis=axis)
  safe = jnp.where(total > 0, total, 1.0)
  out = jnp.where(total > 0, jnp.log(safe) + jnp.squeeze(peak, axis), -jnp.inf)
  return jnp.where(jnp.isnan(total), jnp.nan, out)  # A NaN entry makes the value NaN.


# --------------------------------------------------------------------------
# Sampling.


def sample_eps(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """Standard-normal noise ``eps ~ N(0, I)`` of ``shape``: the one place vae_jax draws it.

  Every sample of ``z`` in training, evaluation and the importance-sampling
  estimator is ``gaussian_sample(mean, logvar, eps)`` with ``eps`` from this
  function, so equal keys give equal samples everywhere.

  Args:
    key: a PRNG key.
    shape: e.g. ``[num_samples, batch, latent]``.
    dtype: a floating dtype.
  """
  return jax.random.normal(key, shape, dtype=dtype)


def gaussian_sample(mean: Array, logvar: Array, eps: Array) -> Array:
  """``z = mean + exp(logvar / 2) * eps``: a reparameterized draw from given noise.

  Args:
    mean: ``[..., latent]`` means.
    logvar: log-variances, the shape of ``mean``.
    eps: noise of ``mean``'s shape, or with one extra leading sample axis
      ``[S, *mean.shape]`` (then ``z`` has it too).

  Returns:
    ``z`` of ``eps``'s shape.

  Raises:
    ValueError: ``eps`` is neither ``mean``'s shape nor ``[S, *mean.shape]``.
  """
  _check_same_shape("mean", mean, "logvar", logvar)
  if eps.shape != mean.shape:
    if eps.shape[1:] != mean.shape:
      raise ValueError(
        f"eps must have mean's shape {mean.shape} or [samples, *{mean.shape}], got {eps.shape}."
      )
    mean, logvar = mean[None], logvar[None]  # Explicit sample axis: no rank promotion.
  return mean + jnp.exp(0.5 * logvar) * eps


def reparameterize(
  key: Array,
  mean: Array,
  logvar: Array,
  num_samples: int | None = None,
) -> Array:
  """Draws ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` (Kingma & Welling 2014).

  ``gaussian_sample(mean, logvar, sample_eps(key, shape))``.

  Args:
    key: PRNG key for ``eps``; the only source of randomness.
    mean: ``[..., latent]`` posterior means.
    logvar: ``[..., latent]`` posterior log-variances (same shape as ``mean``).
    num_samples: ``None`` for one sample of ``mean``'s shape; an integer ``S``
      for ``S`` samples stacked on a new leading axis.

  Returns:
    ``z`` of shape ``mean.shape`` (``num_samples=None``) or
    ``[num_samples, *mean.shape]``, in ``mean``'s dtype.

  Raises:
    ValueError: ``num_samples`` is not a positive int, or the shapes differ.
    TypeError: ``mean`` or ``logvar`` is not floating-point.
  """
  _check_float("mean", mean)
  _check_float("logvar", logvar)
  _check_same_shape("mean", mean, "logvar", logvar)
  if num_samples is not None:
    try:  # Python and numpy integers; not floats, not bools.
      count = None if isinstance(num_samples, bool) else operator.index(num_samples)
    except TypeError:
      count = None
    if count is None or count < 1:
      raise ValueError(f"num_samples must be None or a positive int, got {num_samples!r}.")
    num_samples = count
  shape = mean.shape if num_samples is None else (num_samples, *mean.shape)
  return gaussian_sample(mean, logvar, sample_eps(key, shape, mean.dtype))


# --------------------------------------------------------------------------
# Densities and divergences.


def kl_divergence_per_dim(mean: Array, logvar: Array) -> Array:
  """KL( N(mean, exp(logvar)) || N(0, 1) ) for each latent dimension, in nats.

  ``0.5 * (exp(logvar) + mean**2 - 1 - logvar)``, elementwise.

  Args:
    mean: ``[..., latent]``.
    logvar: ``[..., latent]``.

  Returns:
    ``[..., latent]`` non-negative KL terms (the "rate" per dimension).
  """
  _check_float("mean", mean)
  _check_float("logvar", logvar)
  _check_same_shape("mean", mean, "logvar", logvar)
  dtype = _compute_dtype(mean, logvar)
  mean, logvar = mean.astype(dtype), logvar.astype(dtype)
  # expm1(logvar) - logvar is exp(logvar) - 1 - logvar without cancellation
  # near logvar = 0, where a trained model puts its inactive units.
  return 0.5 * (jnp.square(mean) + jnp.expm1(logvar) - logvar)


def kl_divergence(mean: Array, logvar: Array) -> Array:
  """KL( N(mean, diag(exp(logvar))) || N(0, I) ) summed over the last axis.

  Args:
    mean: ``[..., latent]``.
    logvar: ``[..., latent]``.

  Returns:
    ``[...]``: one KL value (nats) per example.
  """
  return jnp.sum(kl_divergence_per_dim(mean, logvar), axis=-1)


def bernoulli_log_likelihood(logits: Array, x: Array, event_ndims: int = 1) -> Array:
  """``x log p + (1 - x) log(1 - p)`` with ``p = sigmoid(logits)``, summed over events.

  For binary ``x`` (in {0, 1}) this is the log-probability of a Bernoulli
  variable, in nats (``<= 0``). For grey levels ``x`` in (0, 1) it is the
  negative binary cross-entropy, which is *not* a log-density of ``x`` (its
  ``exp`` integrates to ``1/2`` over [0, 1] at logit 0): use
  ``continuous_bernoulli_log_likelihood`` for a likelihood of grey levels.

  Computed as ``x * logits - softplus(logits)``: no ``log(sigmoid)``
  underflow, finite for any finite logit; its gradient in the logits is
  ``x - sigmoid(logits)`` everywhere, ``x - 1/2`` at 0.

  Args:
    logits: ``[..., *event_shape]`` decoder logits.
    x: targets of the same shape. Precondition: ``0 <= x <= 1`` (other values,
      e.g. unscaled pixels of 255, give meaningless numbers; this is not checked
      inside jitted code).
    event_ndims: how many trailing axes form one example.

  Returns:
    ``logits`` without its last ``event_ndims`` axes, in nats.

  Raises:
    ValueError: shapes differ, or ``event_ndims`` is out of range.
    TypeError: an input is not floating-point.
  """
  _check_float("logits", logits)
  _check_float("x", x)
  _check_same_shape("logits", logits, "x", x)
  _check_event_ndims("logits", logits, event_ndims)
  dtype = _compute_dtype(logits, x)
  logits, x = logits.astype(dtype), x.astype(dtype)
  # x * l - softplus(l) equals -(x softplus(-l) + (1 - x) softplus(l)) exactly,
  # with one softplus per pixel instead of two.
  logits, x = _flat_events(event_ndims, logits, x)
  return _sum_event(x * logits - softplus(logits), min(event_ndims, 1))


def _series(u2: Array, coefficients: tuple[float, ...]) -> Array:
  """``sum_k c_k u2**k`` by Horner's scheme."""
  total = jnp.zeros_like(u2)
  for c in reversed(coefficients):
    total = total * u2 + c
  return total


# u cosh u - sinh u = u**3 Q(u**2), Q(t) = sum_{k >= 0} (2k + 2) / (2k + 3)! t**k, and
# sinh u - u = u**3 P(u**2), P(t) = sum_{k >= 0} t**k / (2k + 3)!: positive terms, so no
# cancellation; 14 terms reach float64 precision for |u| < 2 (the last term's share is
# below 2**28 / 29! ~ 1e-23 there).
_Q = tuple((2 * k + 2) / math.factorial(2 * k + 3) for k in range(14))
_P = tuple(1.0 / math.factorial(2 * k + 3) for k in range(14))
_SERIES_BELOW = 2.0  # |u| at which the closed forms take over (cancellation < 2 ulps).


def _u_coth_u_minus_1(u: Array) -> Array:
  """``u coth(u) - 1 = (u cosh u - sinh u) / sinh u = u**2 Q / (1 + u**2 P)`` for any ``u``
  (0 at 0), accurate to a few ulps: the series for ``|u| < 2``, the closed form beyond."""
  small = jnp.abs(u) < _SERIES_BELOW
  u2 = jnp.square(jnp.where(small, u, 0.0))
  series = u2 * _series(u2, _Q) / (1.0 + u2 * _series(u2, _P))
  far = jnp.where(small, 1.0, u)
  return jnp.where(small, series, far / jnp.tanh(far) - 1.0)


@jax.custom_jvp
def _cb_log_norm(logits: Array) -> Array:
  return math.log(2.0) + jnp.log1p(_u_coth_u_minus_1(0.5 * logits))


@_cb_log_norm.defjvp
def _cb_log_norm_jvp(primals, tangents):
  (logit,), (dlogit,) = primals, tangents
  # d/dl log C = 1/l - 1/sinh(l) = (sinh l - l) / (l sinh l) = l P / (1 + l**2 P): the
  # series for |l| < 2 (1/l - 1/sinh l cancels there), the difference beyond.
  small = jnp.abs(logit) < _SERIES_BELOW
  near = jnp.where(small, logit, 0.0)
  p = _series(jnp.square(near), _P)
  series = near * p / (1.0 + jnp.square(near) * p)
  far = jnp.where(small, 1.0, logit)
  derivative = jnp.where(small, series, 1.0 / far - 1.0 / jnp.sinh(far))
  return _cb_log_norm(logit), derivative * dlogit


def continuous_bernoulli_log_norm(logits: Array) -> Array:
  """``log C(lambda)``, the continuous Bernoulli's normalizing constant, ``lambda = sigmoid(l)``.

  Loaiza-Ganem & Cunningham (2019), eq. 6: ``C = 2 artanh(1 - 2 lambda) / (1 - 2
  lambda)`` for ``lambda != 1/2`` and ``C = 2`` at ``lambda = 1/2``. In logits,
  ``1 - 2 lambda = -tanh(l / 2)`` and ``artanh(1 - 2 lambda) = -l / 2``, so
  ``C = l / tanh(l / 2) = 2 u coth(u)`` with ``u = l / 2``, computed as
  ``log 2 + log1p(u coth u - 1)``. Both ``u coth u - 1`` and the derivative
  ``1/l - 1/sinh(l)`` are differences that cancel near 0; each is evaluated from a
  series of positive terms for ``|u| < 2`` (no cancellation) and in closed form
  beyond, so value and gradient are accurate to a few units in the last place of the
  dtype on both sides of the switch, for any logit (``tests/test_losses.py`` checks
  float32 and float64 against 50-digit references computed with ``decimal``).

  Args:
    logits: any shape.

  Returns:
    ``log C`` of each logit, the same shape, in nats.
  """
  _check_float("logits", logits)
  return _cb_log_norm(logits.astype(_compute_dtype(logits)))


def continuous_bernoulli_log_likelihood(logits: Array, x: Array, event_ndims: int = 1) -> Array:
  """log CB(x | sigmoid(logits)) for grey levels ``x`` in [0, 1], summed over events.

  The continuous Bernoulli of Loaiza-Ganem & Cunningham (2019): the density
  ``C(lambda) lambda**x (1 - lambda)**(1 - x)`` on [0, 1], i.e. the Bernoulli
  cross-entropy term plus ``continuous_bernoulli_log_norm``: a true
  log-density of grey levels, in nats (it may be positive).

  Args:
    logits: ``[..., *event_shape]`` decoder logits.
    x: data of the same shape. Precondition: ``0 <= x <= 1``.
    event_ndims: how many trailing axes form one example.

  Returns:
    ``logits`` without its last ``event_ndims`` axes, in nats.
  """
  _check_float("logits", logits)
  _check_same_shape("logits", logits, "x", x)
  _check_event_ndims("logits", logits, event_ndims)
  logits, x = _flat_events(event_ndims, logits, x)
  log_p = bernoulli_log_likelihood(logits, x, event_ndims=0)
  return _sum_event(log_p + continuous_bernoulli_log_norm(logits), min(event_ndims, 1))


def continuous_bernoulli_mean(logits: Array) -> Array:
  """``E[x]`` of the continuous Bernoulli: ``lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2
  lambda))`` (Loaiza-Ganem & Cunningham 2019, eq. 7) ``= 1/2 + (coth(u) - 1/u) / 2`` with
  ``u = l / 2`` (the Langevin function), ``= 1/2 + (u coth u - 1) / (2u)``: accurate to a
  few ulps for any logit (see ``continuous_bernoulli_log_norm``)."""
  _check_float("logits", logits)
  logits = logits.astype(_compute_dtype(logits))
  u = 0.5 * logits
  # (u coth u - 1) / u = u Q / (1 + u**2 P) below the switch (0 at 0), as above.
  small = jnp.abs(u) < _SERIES_BELOW
  near = jnp.where(small, u, 0.0)
  u2 = jnp.square(near)
  series = near * _series(u2, _Q) / (1.0 + u2 * _series(u2, _P))
  # Beyond it, 1 / (1 - e^-l) - 1/l: no cancellation for either sign of l (1/2 + (coth u
  # - 1/u) / 2 would cancel to 0.005 at l = -200).
  far = jnp.where(small, 1.0, logits)
  return jnp.where(small, 0.5 + 0.5 * series, 1.0 / -jnp.expm1(-far) - 1.0 / far)


def gaussian_log_likelihood(
  mean: Array,
  x: Array,
  variance: float | Array = 1.0,
  event_ndims: int = 1,
) -> Array:
  """log N(x | mean, variance * I), constants included, summed over events.

  ``-0.5 * sum((x - mean)**2 / variance) - d/2 * log(2 pi variance)`` where
  ``d`` is the number of event elements: a true log-density in nats.

  Args:
    mean: ``[..., *event_shape]`` decoder means.
    x: data of the same shape.
    variance: the fixed observation variance. Precondition: ``c > 0`` (``c <= 0``
      gives NaN or infinities; not checked inside jitted code). A scalar, or an
      array broadcastable to ``x`` (e.g. a learned per-pixel variance).
    event_ndims: how many trailing axes form one example.

  Returns:
    ``mean`` without its last ``event_ndims`` axes: log-densities in nats.
  """
  _check_float("mean", mean)
  _check_float("x", x)
  _check_same_shape("mean", mean, "x", x)
  _check_event_ndims("mean", mean, event_ndims)
  dtype = _compute_dtype(mean, x, jnp.asarray(variance))
  mean, x = mean.astype(dtype), x.astype(dtype)
  variance = jnp.broadcast_to(jnp.asarray(variance, dtype), x.shape)
  mean, x, variance = _flat_events(event_ndims, mean, x, variance)
  log_p = -0.5 * (jnp.square(x - mean) / variance + jnp.log(variance) + _LOG_2PI)
  return _sum_event(log_p, min(event_ndims, 1))


def gaussian_log_likelihood_learned(decoded: Array, x: Array, event_ndims: int = 1) -> Array:
  """log N(x | mean, exp(logvar)) with the decoder's own variance, summed over events.

  Args:
    decoded: ``[..., *event_shape, 2]``: ``decoded[..., 0]`` the means and
      ``decoded[..., 1]`` the log-variances (per element; a shared learned
      variance is broadcast by the decoder).
    x: ``[..., *event_shape]`` data.
    event_ndims: how many trailing axes of ``x`` form one example.

  Returns:
    ``x`` without its last ``event_ndims`` axes: log-densities in nats.
  """
  _check_float("decoded", decoded)
  _check_float("x", x)
  if decoded.shape != (*jnp.shape(x), 2):
    raise ValueError(f"decoded must be x's shape {jnp.shape(x)} + (2,), got {decoded.shape}.")
  _check_event_ndims("x", x, event_ndims)
  x, mean, logvar = _flat_events(event_ndims, x, decoded[..., 0], decoded[..., 1])
  log_p = diag_gaussian_log_prob_per_dim(x, mean, logvar)
  return _sum_event(log_p, min(event_ndims, 1))


# --------------------------------------------------------------------------
# Discretized likelihoods of pixel levels (colour images in bits/dim).
#
# The data are levels k in {0, ..., L - 1} (L = 2**bits), given as x = k / (L - 1) in
# [0, 1], vae_jax's unbinarized images. As in PixelCNN++ (Salimans et al. 2017) the
# distributions live on y = 2 x - 1 in [-1, 1]: level k is the bin [y - 1/(L-1),
# y + 1/(L-1)] around its centre, except the edge levels, whose bins extend to -inf
# (level 0) and +inf (level L - 1), so the probabilities of the L levels sum to 1
# exactly. Decoder means are in the y space; log-scales are clamped below at
# MIN_LOG_SCALE as in PixelCNN++ and VDVAE (their gradient is 0 below it).

MIN_LOG_SCALE = -7.0
# Below this width (in units of the scale) a discretized Gaussian bin's probability is the
# density at its centre times its width, with the second-order correction (relative error
# of order width^4 m^4 / 1920 at m scales from the mean: below 1e-12 within 5 scales).
_NARROW_BIN = 1e-3


def _bin_edges(x: Array, num_levels: int) -> tuple[Array, Array, Array, Array]:
  """``(lower, upper, is_lowest, is_highest)``: the edges in the ``[-1, 1]`` space of the
  bin of level ``k`` given as ``x = k / (L - 1)``, ``(2 k -+ 1) / (L - 1) - 1``, computed
  from the integer ``k`` (one rounding each, and exactly 0 at the middle edge)."""
  top = num_levels - 1
  level = jnp.round(x * top)
  lower = (2.0 * level - 1.0 - top) / top
  upper = (2.0 * level + 1.0 - top) / top
  return lower, upper, level <= 0, level >= top


def _log_cosh(t: Array) -> Array:
  a = jnp.abs(t)
  return a + softplus(-2.0 * a) - math.log(2.0)


def _log_sinh_of_exp(log_u: Array) -> Array:
  """``log sinh(u)`` for ``u = exp(log_u) > 0``, without underflow of a tiny ``u``.

  The callers' ``u`` is at most ``exp(-MIN_LOG_SCALE) / (L - 1)`` (4.3 for 8 bits), so
  ``u`` itself never overflows.
  """
  small = log_u < math.log(1e-2)
  u = jnp.exp(jnp.where(small, 0.0, log_u))
  exact = u + jnp.log(-jnp.expm1(-2.0 * u)) - math.log(2.0)
  # log(sinh(u) / u) = u^2/6 - u^4/180 + u^6/2835 - ...: below u = 1e-2 the next term is
  # under 3e-21, so both sides of the switch hold the dtype's precision.
  t = jnp.square(jnp.exp(jnp.minimum(log_u, math.log(1e-2))))
  return jnp.where(small, log_u + t / 6.0 - t**2 / 180.0 + t**3 / 2835.0, exact)


def discretized_logistic_log_prob(
  mean: Array, log_scale: Array, x: Array, num_levels: int = 256
) -> Array:
  """Elementwise ``log P(k)`` of a level under the discretized logistic (no sum).

  ``P(k) = sigmoid((y + h - mean) / s) - sigmoid((y - h - mean) / s)`` with ``y = 2 x - 1``,
  ``h = 1 / (L - 1)``, ``s = exp(max(log_scale, MIN_LOG_SCALE))``; the lowest level takes
  ``sigmoid((y + h - mean) / s)`` and the highest ``1 - sigmoid((y - h - mean) / s)``
  (Kingma et al. 2016, IAF, appendix; Salimans et al. 2017, PixelCNN++, section 2.1).

  The difference of sigmoids is computed in closed form in log space,
  ``log(sigmoid(a) - sigmoid(b)) = log sinh((a - b) / 2) - log 2 - log cosh(a / 2) -
  log cosh(b / 2)``, exact for any scale and mean: no fallback to the density as in
  PixelCNN++'s code, no ``log(0)``, and finite gradients everywhere.

  Args:
    mean: decoder means in the ``[-1, 1]`` space, any shape.
    log_scale: log-scales, the same shape.
    x: levels ``k / (L - 1)`` in [0, 1], the same shape.
    num_levels: ``L``, 256 for 8-bit data.

  Returns:
    ``log P`` in nats, the shape of ``x``.
  """
  _check_float("mean", mean)
  _check_float("x", x)
  _check_same_shape("mean", mean, "x", x)
  _check_same_shape("log_scale", log_scale, "x", x)
  dtype = _compute_dtype(mean, log_scale, x)
  mean, log_scale, x = mean.astype(dtype), log_scale.astype(dtype), x.astype(dtype)
  lower_edge, upper_edge, lowest, highest = _bin_edges(x, num_levels)
  log_scale = jnp.maximum(log_scale, MIN_LOG_SCALE)
  inv_scale = jnp.exp(-log_scale)
  half = 1.0 / (num_levels - 1)
  upper = inv_scale * (upper_edge - mean)
  lower = inv_scale * (lower_edge - mean)
  log_cdf_upper = -softplus(-upper)  # log sigmoid(upper): the lowest level.
  log_sf_lower = -softplus(lower)  # log(1 - sigmoid(lower)): the highest level.
  # log((upper - lower) / 2): from the arguments themselves, so that a bin's width agrees
  # with its edges' rounding (adjacent bins then share an edge and their probabilities
  # telescope to 1), unless their difference loses more to cancellation than the
  # edges' rounding costs (a bin narrow against its distance from the mean): then from
  # the scale. Relative errors, in units of the float's epsilon: |arguments| / width
  # for the first, |edges| / (edge spacing) for the second.
  half_width = 0.5 * (upper - lower)
  cancellation = jnp.maximum(jnp.abs(upper), jnp.abs(lower)) / jnp.maximum(half_width, 1e-30)
  rounding = jnp.maximum(jnp.abs(upper_edge), jnp.abs(lower_edge)) / half
  computed = (cancellation < rounding) & (half_width > 1e-30)
  log_half_width = jnp.where(
    computed, jnp.log(jnp.where(computed, half_width, 1.0)), math.log(half) - log_scale
  )
  middle = (
    _log_sinh_of_exp(log_half_width) - math.log(2.0) - _log_cosh(upper / 2) - _log_cosh(lower / 2)
  )
  return jnp.where(lowest, log_cdf_upper, jnp.where(highest, log_sf_lower, middle))


def _log_ndtr_difference(upper: Array, lower: Array) -> Array:
  """``log(Phi(upper) - Phi(lower))`` for ``upper > lower``, in whichever tail is accurate."""
  flip = lower > 0  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): keep the arguments <= 0 side.
  a = jnp.where(flip, -upper, lower)
  b = jnp.where(flip, -lower, upper)
  log_b = jax.scipy.special.log_ndtr(b)
  t = jax.scipy.special.log_ndtr(a) - log_b  # <= 0
  t = jnp.minimum(t, -1e-30)
  return log_b + jnp.log(-jnp.expm1(t))


def discretized_gaussian_log_prob(
  mean: Array, log_scale: Array, x: Array, num_levels: int = 256
) -> Array:
  """Elementwise ``log P(k)`` of a level under the discretized Gaussian (no sum).

  ``P(k) = Phi((y + h - mean) / s) - Phi((y - h - mean) / s)``, the edge levels' bins
  extended to infinity, with ``y``, ``h``, ``s`` as in ``discretized_logistic_log_prob``
  (the Gaussian counterpart of the discretized logistic; e.g. Ho et al. 2020, DDPM,
  equation 13, whose decoder uses it for the same [-1, 1] scaling). The difference of
  normal CDFs is taken in the tail where it is accurate (``log_ndtr``); bins narrower
  than ``1e-3`` scales use the density at the centre times the width, with its
  second-order correction.

  Args and returns as ``discretized_logistic_log_prob``.
  """
  _check_float("mean", mean)
  _check_float("x", x)
  _check_same_shape("mean", mean, "x", x)
  _check_same_shape("log_scale", log_scale, "x", x)
  dtype = _compute_dtype(mean, log_scale, x)
  mean, log_scale, x = mean.astype(dtype), log_scale.astype(dtype), x.astype(dtype)
  lower_edge, upper_edge, lowest, highest = _bin_edges(x, num_levels)
  log_scale = jnp.maximum(log_scale, MIN_LOG_SCALE)
  inv_scale = jnp.exp(-log_scale)
  half = 1.0 / (num_levels - 1)
  upper = inv_scale * (upper_edge - mean)
  lower = inv_scale * (lower_edge - mean)
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)
  log_width = math.log(2.0 * half) - log_scale
  narrow = log_width < math.log(_NARROW_BIN)
  middle_z = 0.5 * (upper + lower)
  # Phi(m + w/2) - Phi(m - w/2) = w phi(m) (1 + w^2 (m^2 - 1) / 24 + O(w^4 m^4)).
  width = jnp.exp(jnp.minimum(log_width, math.log(_NARROW_BIN)))
  correction = jnp.log1p(jnp.square(width) * (jnp.square(middle_z) - 1.0) / 24.0)
  density = -0.5 * jnp.square(middle_z) - 0.5 * _LOG_2PI + log_width + correction
  exact = _log_ndtr_difference(jnp.where(narrow, 1.0, upper), jnp.where(narrow, 0.0, lower))
  middle = jnp.where(narrow, density, exact)
  return jnp.where(lowest, log_cdf_upper, jnp.where(highest, log_sf_lower, middle))


def discretized_logistic_log_likelihood(
  decoded: Array, x: Array, num_levels: int = 256, event_ndims: int = 1
) -> Array:
  """``log P(x)`` of images of levels under the discretized logistic, summed over events.

  Args:
    decoded: ``[..., h, w, 2 c]``: the means (``[..., :c]``, in the ``[-1, 1]`` space) and
      log-scales (``[..., c:]``) of each of the ``c`` channels.
    x: ``[..., h, w, c]`` levels ``k / (L - 1)`` in [0, 1].
    num_levels: ``L``.
    event_ndims: how many trailing axes of ``x`` form one example.

  Returns:
    ``x`` without its last ``event_ndims`` axes: log-probabilities in nats.

  Raises:
    ValueError: ``decoded`` is not ``x``'s shape with twice the channels.
  """
  mean, log_scale = _split_channels(decoded, x, 2)
  _check_event_ndims("x", x, event_ndims)
  log_p = discretized_logistic_log_prob(mean, log_scale, x, num_levels)
  return _sum_event(*_flat_events(event_ndims, log_p), min(event_ndims, 1))


def discretized_gaussian_log_likelihood(
  decoded: Array, x: Array, num_levels: int = 256, event_ndims: int = 1
) -> Array:
  """``log P(x)`` under the discretized Gaussian, summed over events; arguments as
  ``discretized_logistic_log_likelihood``."""
  mean, log_scale = _split_channels(decoded, x, 2)
  _check_event_ndims("x", x, event_ndims)
  log_p = discretized_gaussian_log_prob(mean, log_scale, x, num_levels)
  return _sum_event(*_flat_events(event_ndims, log_p), min(event_ndims, 1))


def _split_channels(decoded: Array, x: Array, parts: int) -> tuple[Array, ...]:
  _check_float("decoded", decoded)
  _check_float("x", x)
  c = jnp.shape(x)[-1] if jnp.ndim(x) else 1
  if jnp.shape(decoded) != (*jnp.shape(x)[:-1], parts * c):
    raise ValueError(
      f"decoded must be x's shape {jnp.shape(x)} with {parts} x {c} channels, got "
      f"{jnp.shape(decoded)}."
    )
  return tuple(decoded[..., i * c : (i + 1) * c] for i in range(parts))


def mixture_num_params(num_components: int, channels: int) -> int:
  """Decoder outputs per pixel of ``discretized_logistic_mixture_log_likelihood``:
  ``K (1 + 2 c + c (c - 1) / 2)``, ``10 K`` for RGB as in PixelCNN++."""
  return num_components * (1 + 2 * channels + channels * (channels - 1) // 2)


class MixtureParams(NamedTuple):
  """The parameters of a discretized logistic mixture per pixel (see ``mixture_params``)."""

  log_weights: Array  # [..., K] log mixture weights (log-softmax of the logits).
  means: Array  # [..., c, K] means in the [-1, 1] space, before the channel coupling.
  log_scales: Array  # [..., c, K]
  coefficients: Array  # [..., c (c - 1) / 2, K] in (-1, 1): tanh of the raw outputs.


def mixture_params(decoded: Array, num_components: int, channels: int) -> MixtureParams:
  """Splits ``decoded: [..., K (1 + 2 c + c (c - 1) / 2)]`` (per pixel) into its parts.

  The layout: ``K`` logits of the mixture weights; ``c K`` means and ``c K`` log-scales
  (channel-major: channel ``j``'s ``K`` values together); then ``c (c - 1) / 2`` groups of
  ``K`` coupling coefficients, for the pairs ``(1, 0), (2, 0), (2, 1), ...`` (channel,
  earlier channel): for RGB, green on red, blue on red, blue on green, PixelCNN++'s three.
  """
  K, c = num_components, channels
  if jnp.shape(decoded)[-1] != mixture_num_params(K, c):
    raise ValueError(
      f"decoded has {jnp.shape(decoded)[-1]} outputs per pixel; a mixture of {K} "
      f"components over {c} channels needs {mixture_num_params(K, c)}."
    )
  batch = jnp.shape(decoded)[:-1]
  logits = decoded[..., :K]
  means = decoded[..., K : K + c * K].reshape(*batch, c, K)
  log_scales = decoded[..., K + c * K : K + 2 * c * K].reshape(*batch, c, K)
  coefficients = jnp.tanh(decoded[..., K + 2 * c * K :].reshape(*batch, c * (c - 1) // 2, K))
  return MixtureParams(jax.nn.log_softmax(logits, axis=-1), means, log_scales, coefficients)


def _coupled_means(params: MixtureParams, y: Array) -> Array:
  """``[..., c, K]``: each channel's mean given the earlier channels ``y: [..., c]``:
  ``mean_j + sum_{i < j} coefficient_{j,i} y_i`` (PixelCNN++'s linear coupling)."""
  c = params.means.shape[-2]
  rows, pair = [params.means[..., 0, :]], 0
  for j in range(1, c):
    mean = params.means[..., j, :]
    for i in range(j):
      mean = mean + params.coefficients[..., pair, :] * y[..., i : i + 1]
      pair += 1
    rows.append(mean)
  return jnp.stack(rows, axis=-2)


def discretized_logistic_mixture_log_likelihood(
  decoded: Array, x: Array, num_components: int, num_levels: int = 256
) -> Array:
  """``log P(x)`` of images under PixelCNN++'s discretized logistic mixture, per image.

  Each pixel's channels are modelled jointly by a mixture of ``K`` components; within a
  component, channel ``j`` is a discretized logistic (``discretized_logistic_log_prob``)
  whose mean is shifted linearly by the earlier channels' values:
  ``p(r, g, b) = sum_k pi_k L(r | mu_r) L(g | mu_g + a r) L(b | mu_b + b r + c g)``
  (Salimans et al. 2017, PixelCNN++, section 2.2; the likelihood of VDVAE and NVAE).

  Args:
    decoded: ``[batch, h, w, K (1 + 2 c + c (c - 1) / 2)]`` (any pixel axes between the
      batch and the last), laid out as ``mixture_params`` says.
    x: ``[batch, h, w, c]`` levels ``k / (L - 1)`` in [0, 1].
    num_components: ``K``.
    num_levels: ``L``.

  Returns:
    ``[batch]`` log-probabilities in nats (summed over pixels).
  """
  _check_float("decoded", decoded)
  _check_float("x", x)
  if jnp.ndim(x) < 2 or jnp.shape(decoded)[:-1] != jnp.shape(x)[:-1]:
    raise ValueError(
      f"x must be [batch, ..., c] and decoded [batch, ..., outputs] with the same leading "
      f"axes, got {jnp.shape(x)} and {jnp.shape(decoded)}."
    )
  dtype = _compute_dtype(decoded, x)
  decoded, x = decoded.astype(dtype), x.astype(dtype)
  params = mixture_params(decoded, num_components, x.shape[-1])
  y = 2.0 * x - 1.0
  means = _coupled_means(params, y)
  levels = jnp.broadcast_to(x[..., None], means.shape)
  per_channel = discretized_logistic_log_prob(means, params.log_scales, levels, num_levels)
  per_component = params.log_weights + jnp.sum(per_channel, axis=-2)  # [..., K]
  per_pixel = logsumexp(per_component, axis=-1)
  return jnp.sum(per_pixel, axis=tuple(range(1, per_pixel.ndim)))


def discretized_logistic_mixture_mean(decoded: Array, num_components: int, channels: int) -> Array:
  """``E[x]`` in [0, 1] under the mixture's continuous logistics (before discretization):
  ``sum_k pi_k m_k`` with ``m_k`` each channel's coupled mean given the earlier channels'
  means. ``[..., K (...)]`` -> ``[..., c]``."""
  params = mixture_params(decoded, num_components, channels)
  c = channels
  component_means = []  # Per channel, [..., K]: coupled on the earlier channels' means.
  pair = 0
  for j in range(c):
    mean = params.means[..., j, :]
    for i in range(j):
      mean = mean + params.coefficients[..., pair, :] * component_means[i]
      pair += 1
    component_means.append(mean)
  weights = jnp.exp(params.log_weights)
  y = jnp.stack([jnp.sum(weights * m, axis=-1) for m in component_means], axis=-1)
  return jnp.clip((y + 1.0) / 2.0, 0.0, 1.0)


def diag_gaussian_log_prob_per_dim(z: Array, mean: Array, logvar: Array) -> Array:
  """log N(z_d | mean_d, exp(logvar_d)) for each dimension: ``[..., latent]``.

  Args:
    z: ``[..., latent]`` points.
    mean: ``[..., latent]`` (same shape as ``z``).
    logvar: ``[..., latent]`` (same shape as ``z``).
  """
  _check_float("z", z)
  _check_float("mean", mean)
  _check_float("logvar", logvar)
  _check_same_shape("z", z, "mean", mean)
  _check_same_shape("z", z, "logvar", logvar)
  dtype = _compute_dtype(z, mean, logvar)
  z, mean, logvar = z.astype(dtype), mean.astype(dtype), logvar.astype(dtype)
  return -0.5 * (jnp.square(z - mean) * jnp.exp(-logvar) + logvar + _LOG_2PI)


def diag_gaussian_log_prob(z: Array, mean: Array, logvar: Array) -> Array:
  """log N(z | mean, diag(exp(logvar))) summed over the last axis.

  Args: as for ``diag_gaussian_log_prob_per_dim``.

  Returns:
    ``[...]`` log-densities in nats.
  """
  return jnp.sum(diag_gaussian_log_prob_per_dim(z, mean, logvar), axis=-1)


def standard_normal_log_prob(z: Array) -> Array:
  """log N(z | 0, I) summed over the last axis: ``[..., latent] -> [...]``."""
  _check_float("z", z)
  z = z.astype(_compute_dtype(z))
  return jnp.sum(-0.5 * (jnp.square(z) + _LOG_2PI), axis=-1)


def diag_gaussian_mixture_log_prob(z: Array, means: Array, logvars: Array) -> Array:
  """``log (1/C) sum_c N(z | means_c, diag(exp(logvars_c)))``: an equal-weight mixture.

  The VampPrior (Tomczak & Welling 2018, eq. 9) is this mixture with the
  encoder's posteriors at ``C`` pseudo-inputs as components. Computed with
  ``logsumexp`` over components, stable for densities of any magnitude.

  Args:
    z: ``[..., latent]`` points.
    means: ``[C, latent]`` component means.
    logvars: ``[C, latent]`` component log-variances.

  Returns:
    ``[...]`` log-densities in nats.
  """
  _check_float("z", z)
  _check_same_shape("means", means, "logvars", logvars)
  if means.ndim != 2 or z.shape[-1] != means.shape[-1]:
    raise ValueError(
      f"means and logvars must be [components, latent] with z's latent size {z.shape[-1]}, "
      f"got {means.shape}."
    )
  shape = (*z.shape[:-1], *means.shape)
  per_component = diag_gaussian_log_prob(
    jnp.broadcast_to(z[..., None, :], shape),
    jnp.broadcast_to(means, shape),
    jnp.broadcast_to(logvars, shape),
  )
  return logsumexp(per_component, axis=-1) - math.log(means.shape[0])


# --------------------------------------------------------------------------
# Objectives.


class ElboOutput(NamedTuple):
  """Per-example parts of the (beta-)ELBO, all ``[batch]`` in nats.

  Attributes:
    elbo: ``reconstruction - beta * kl``: the objective to maximize.
    reconstruction: Monte Carlo estimate of ``E_q[log p(x | z)]`` (the
      negative distortion), averaged over samples.
    kl: closed-form ``KL(q(z | x) || p(z))`` (the rate).
  """

  elbo: Array
  reconstruction: Array
  kl: Array


def elbo_from_terms(reconstruction: Array, kl: Array, beta: float | Array = 1.0) -> Array:
  """``reconstruction - beta * kl``: the beta-ELBO from its two terms (Higgins et al. 2017).

  The one place in vae_jax where beta weights the KL: ``elbo``, every model's
  ELBO and the free-bits objective call it. ``beta = 1`` is the evidence lower
  bound of Kingma & Welling (2014).

  Args:
    reconstruction: ``E_q[log p(x | z)]`` (the negative distortion), in nats.
    kl: ``KL(q(z | x) || p(z))`` (the rate), the same shape.
    beta: the KL weight (Python float or traced scalar), ``>= 0``.

  Returns:
    The beta-ELBO, the shape of ``reconstruction``.

  Raises:
    ValueError: the two terms' shapes differ.
  """
  _check_same_shape("reconstruction", reconstruction, "kl", kl)
  return reconstruction - beta * kl


def capacity_objective(
  reconstruction: Array, kl: Array, gamma: float | Array, capacity: float | Array
) -> Array:
  """``reconstruction - gamma * |kl - capacity|`` (Burgess et al. 2018, eq. 8), to maximize.

  Pushes the KL towards a target capacity ``C`` (annealed from 0 upwards by
  the caller) instead of towards 0.

  Args:
    reconstruction: ``E_q[log p(x | z)]``, nats (the paper uses batch means).
    kl: ``KL(q(z | x) || p(z))`` in nats, the same shape.
    gamma: the weight of the capacity term (the paper's gamma, e.g. 1000).
    capacity: ``C`` in nats.
  """
  _check_same_shape("reconstruction", reconstruction, "kl", kl)
  gap = kl - capacity
  # |gap| with the subgradient 0 at gap = 0, as PyTorch's abs (Burgess et al.'s code).
  return reconstruction - gamma * gap * jax.lax.stop_gradient(jnp.sign(gap))


def _check_latents(x: Array, mean: Array, logvar: Array) -> None:
  _check_same_shape("mean", mean, "logvar", logvar)
  if mean.ndim != 2:
    raise ValueError(f"mean and logvar must be [batch, latent], got shape {mean.shape}.")
  if jnp.ndim(x) < 1 or x.shape[0] != mean.shape[0]:
    raise ValueError(
      f"x is {jnp.shape(x)} but mean is {mean.shape}: x must be [batch, *event_shape] "
      "with the same batch size as the posterior."
    )


def _decode_samples(decode_fn: DecodeFn, z: Array, x: Array) -> Array:
  """Decodes ``z: [S, B, latent]`` in one call; returns ``[S, B, *event_shape]``."""
  num_samples, batch = z.shape[:2]
  out = decode_fn(z.reshape(num_samples * batch, z.shape[-1]))
  expected = (num_samples * batch, *x.shape[1:])
  # Allowed: a trailing parameter axis (means and log-variances), or, for images
  # [batch, ..., h, w, c], other channels (a mixture's parameters per pixel);
  # log_likelihood_fn checks what it reads.
  same = out.shape[: len(expected)] == expected and out.ndim <= len(expected) + 1
  channels = x.ndim > 2 and out.shape[:-1] == expected[:-1]
  if not (same or channels):
    raise ValueError(
      f"decode_fn returned shape {out.shape} for {num_samples * batch} latents, "
      f"expected {expected} to match x of shape {x.shape} (or with other channels)."
    )
  return out.reshape(num_samples, batch, *out.shape[1:])


def _sample_log_likelihoods(log_likelihood_fn: LogLikelihoodFn, decoded: Array, x: Array) -> Array:
  """``decoded: [S, B, *event]``, ``x: [B, *event]`` -> ``[S, B]``."""
  log_px = jax.vmap(log_likelihood_fn, in_axes=(0, None))(decoded, x)
  # Checked here so that iw_log_weights, not only elbo, rejects a per-sample
  # result that would broadcast against log p(z) (e.g. [B, H, W] for images).
  if log_px.shape != decoded.shape[:2]:
    raise ValueError(
      f"log_likelihood_fn returned shape {log_px.shape[1:]} per sample, expected "
      f"({x.shape[0]},): it must sum over every event axis of x {x.shape}."
    )
  return log_px


def sample_log_likelihoods(
  z: Array, x: Array, decode_fn: DecodeFn, log_likelihood_fn: LogLikelihoodFn
) -> Array:
  """``log p(x | z_s)`` for samples ``z: [S, batch, latent]`` -> ``[S, batch]``.

  The ``S * batch`` latents are decoded in one call of ``decode_fn``.
  """
  _check_float("z", z)
  if z.ndim != 3 or jnp.ndim(x) < 1 or z.shape[1] != x.shape[0]:
    raise ValueError(
      f"z must be [samples, batch, latent] with the batch of x {jnp.shape(x)}, got {z.shape}."
    )
  return _sample_log_likelihoods(log_likelihood_fn, _decode_samples(decode_fn, z, x), x)


def elbo(
  key: Array,
  x: Array,
  mean: Array,
  logvar: Array,
  decode_fn: DecodeFn,
  log_likelihood_fn: LogLikelihoodFn = bernoulli_log_likelihood,
  *,
  beta: float | Array = 1.0,
  num_samples: int = 1,
) -> ElboOutput:
  """The beta-ELBO ``E_q[log p(x|z)] - beta * KL(q(z|x) || N(0, I))`` per example.

  The expectation is estimated with ``num_samples`` reparameterized samples per
  example (decoded in one batched call); the KL is exact. ``beta=1`` is the
  plain VAE bound on ``log p(x)``; ``beta=0`` leaves only the reconstruction
  term.

  Args:
    key: PRNG key for the samples' ``eps``.
    x: ``[batch, *event_shape]`` data.
    mean: ``[batch, latent]`` posterior means from the encoder.
    logvar: ``[batch, latent]`` posterior log-variances.
    decode_fn: ``[n, latent] -> [n, *event_shape]`` decoder outputs.
    log_likelihood_fn: ``(decoded, x) -> [batch]``, e.g.
      ``bernoulli_log_likelihood`` (the default, for logits) or
      ``functools.partial(gaussian_log_likelihood, variance=c)``. It must sum
      over all event axes.
    beta: weight of the KL term (Python float or traced scalar).
    num_samples: Monte Carlo samples per example (static).

  Returns:
    ``ElboOutput`` of ``[batch]`` arrays in nats.
  """
  _check_latents(x, mean, logvar)
  z = reparameterize(key, mean, logvar, num_samples)
  decoded = _decode_samples(decode_fn, z, x)
  log_px = _sample_log_likelihoods(log_likelihood_fn, decoded, x)
  reconstruction = jnp.mean(log_px, axis=0)
  kl = kl_divergence(mean, logvar)
  return ElboOutput(elbo_from_terms(reconstruction, kl, beta), reconstruction, kl)


def iw_log_weights(
  key: Array,
  x: Array,
  mean: Array,
  logvar: Array,
  decode_fn: DecodeFn,
  log_likelihood_fn: LogLikelihoodFn = bernoulli_log_likelihood,
  *,
  num_samples: int,
) -> Array:
  """Log importance weights ``log p(x, z_k) - log q(z_k | x)`` with ``z_k ~ q``.

  Args: as for ``elbo``.

  Returns:
    ``[num_samples, batch]`` log-weights in nats. Their mean over samples is an
    ELBO estimate; their ``logsumexp - log K`` is the importance-weighted bound.
  """
  _check_latents(x, mean, logvar)
  z = reparameterize(key, mean, logvar, num_samples)
  decoded = _decode_samples(decode_fn, z, x)
  log_px = _sample_log_likelihoods(log_likelihood_fn, decoded, x)
  log_pz = standard_normal_log_prob(z)
  log_qz = diag_gaussian_log_prob(
    z, jnp.broadcast_to(mean, z.shape), jnp.broadcast_to(logvar, z.shape)
  )
  return log_px + log_pz - log_qz


def iw_bound_from_log_weights(log_weights: Array, axis: int = 0) -> Array:
  """``logsumexp_k(log_w_k) - log K`` over ``axis``: the importance-weighted bound.

  Args:
    log_weights: log importance weights with ``K`` samples along ``axis``.
    axis: the sample axis.

  Returns:
    ``log_weights`` reduced over ``axis``, in nats. A zero weight (``-inf``)
    counts as a sample that contributes nothing, with zero gradient; all zero
    gives ``-inf``.
  """
  _check_float("log_weights", log_weights)
  num_samples = log_weights.shape[axis]
  log_weights = log_weights.astype(_compute_dtype(log_weights))
  return logsumexp(log_weights, axis=axis) - math.log(num_samples)


def iw_bound(
  key: Array,
  x: Array,
  mean: Array,
  logvar: Array,
  decode_fn: DecodeFn,
  log_likelihood_fn: LogLikelihoodFn = bernoulli_log_likelihood,
  *,
  num_samples: int,
) -> Array:
  """The importance-weighted bound ``log (1/K) sum_k p(x, z_k) / q(z_k | x)``.

  With ``K = num_samples`` samples from the encoder's ``q(z | x)`` and prior
  ``N(0, I)``. ``K = 1`` gives an unbiased single-sample ELBO estimate; the
  bound tightens towards ``log p(x)`` as ``K`` grows (Burda et al., 2015), which
  makes it the standard log-likelihood estimator (K = 5000). Computed with
  ``logsumexp``, so it is stable for log-weights of any magnitude.

  Args: as for ``elbo``; ``num_samples`` is ``K``.

  Returns:
    ``[batch]`` bound values in nats.
  """
  log_w = iw_log_weights(
    key, x, mean, logvar, decode_fn, log_likelihood_fn, num_samples=num_samples
  )
  return iw_bound_from_log_weights(log_w, axis=0)


# --------------------------------------------------------------------------
# Training aids on the same quantities.


def free_bits_kl(kl_per_dim: Array, free_bits: float | Array) -> Array:
  """The KL term with free bits per latent dimension: per example, ``[batch]``.

  Kingma et al. (2016, "Improved variational inference with inverse autoregressive
  flow", eq. 15) with one group per latent dimension: the batch's KL term is
  ``sum_d max(free_bits, mean_n KL_{n,d})``. A dimension whose batch-averaged KL is
  below ``free_bits`` nats contributes the constant ``free_bits`` and no gradient, so
  the encoder is not pushed to switch it off; above the floor it is the usual KL.

  Returned per example: ``t_n = sum_d (KL_{n,d} if mean_m KL_{m,d} >= free_bits else
  free_bits)``, whose mean over the batch is exactly that term, with the same gradient.
  The floor is decided on the batch (the method's definition), so ``t_n`` depends on
  the other examples of the batch. With ``free_bits=0`` it is each example's KL.

  Args:
    kl_per_dim: ``[..., batch, latent]`` per-example, per-dimension KL values or
      single-sample estimates (a leading sample axis is averaged per example).
    free_bits: ``lambda``, in nats per dimension (not bits, despite the name).

  Returns:
    ``[batch]``: each example's share of the batch's KL term, in nats.
  """
  _check_float("kl_per_dim", kl_per_dim)
  if kl_per_dim.ndim < 2:
    raise ValueError(f"kl_per_dim must be [..., batch, latent], got shape {kl_per_dim.shape}.")
  kl_per_dim = kl_per_dim.astype(_compute_dtype(kl_per_dim))
  per_example = jnp.mean(kl_per_dim.reshape(-1, *kl_per_dim.shape[-2:]), axis=0)  # [B, D]
  per_dim = jnp.mean(per_example, axis=0)  # [D]
  # At a tie the KL keeps its gradient, as tf.maximum(kl, lambda) in the IAF code does.
  above = per_dim >= free_bits
  return jnp.sum(jnp.where(above[None], per_example, free_bits), axis=-1)


def dreg_iw_bound(log_w_encoder: Array, log_w_decoder: Array, axis: int = 0) -> Array:
  """The importance-weighted bound, with doubly-reparameterized gradients (DReG).

  Tucker, Lawson, Gu & Maddison (2019), "Doubly reparameterized gradient
  estimators for Monte Carlo objectives", eq. 8 for the inference network:
  ``grad_phi = sum_k wt_k**2 * d log w_k / d z_k * d z_k / d phi``, with the
  normalized weights ``wt = softmax(log w)`` held constant, against the plain
  IWAE gradient's ``sum_k wt_k * d log w_k / d phi``, whose score-function part
  makes its signal-to-noise ratio vanish as K grows (Rainforth et al. 2018).
  The generative parameters keep the plain IWAE gradient
  ``sum_k wt_k * d log w_k / d theta``. Both are unbiased for the gradient of
  the bound, so the two estimators agree in expectation.

  The value returned is the bound itself; only the gradient changes. The two
  inputs are the same numbers, computed twice with different gradient paths:

  Args:
    log_w_encoder: ``[K, batch]`` log-weights ``log p(x, z_k) - log q(z_k | x)``
      in which gradients reach the inference network only through the samples
      ``z_k``: the generative parameters are ``stop_gradient``-ed and ``log q``
      is evaluated with ``stop_gradient``-ed posterior parameters.
    log_w_decoder: the same log-weights with the samples ``z_k`` (and so the
      inference network) ``stop_gradient``-ed.
    axis: the sample axis.

  Returns:
    ``[batch]`` bound values (as ``iw_bound_from_log_weights``).
  """
  _check_same_shape("log_w_encoder", log_w_encoder, "log_w_decoder", log_w_decoder)
  # The value only: every gradient comes from the surrogate below.
  bound = jax.lax.stop_gradient(iw_bound_from_log_weights(log_w_decoder, axis=axis))
  dtype = _compute_dtype(log_w_encoder, log_w_decoder)
  log_w_encoder, log_w_decoder = log_w_encoder.astype(dtype), log_w_decoder.astype(dtype)
  # Normalized weights; a zero weight (-inf) is 0 and so is every weight of an
  # example whose weights are all zero (softmax would give 0/0 there).
  lse = jnp.expand_dims(logsumexp(log_w_decoder, axis=axis), axis)
  alive = jnp.isfinite(log_w_decoder) & jnp.isfinite(lse)
  w = jax.lax.stop_gradient(
    jnp.where(alive, jnp.exp(log_w_decoder - jnp.where(alive, lse, 0.0)), 0)
  )
  # 0 * -inf would be NaN: dead samples enter as 0, with no gradient.
  enc = jnp.where(alive, log_w_encoder, 0.0)
  dec = jnp.where(alive, log_w_decoder, 0.0)
  surrogate = jnp.sum(jnp.square(w) * enc + w * dec, axis=axis)
  return bound + (surrogate - jax.lax.stop_gradient(surrogate))


def iw_bound_dreg(
  key: Array,
  x: Array,
  mean: Array,
  logvar: Array,
  decode: Callable[[Any, Array], Array],
  decoder_params: Any,
  log_likelihood_fn: LogLikelihoodFn = bernoulli_log_likelihood,
  *,
  num_samples: int,
) -> Array:
  """The importance-weighted bound of a one-layer VAE under ``N(0, I)``, with DReG gradients.

  ``dreg_iw_bound`` with its two log-weight tensors built here (Tucker et al. 2019, eq. 8):
  along the encoder's path, gradients reach ``mean`` and ``logvar`` only through the samples
  ``z`` (``log q`` at stopped posterior parameters, the decoder's parameters stopped);
  along the decoder's path, ``z``, ``mean`` and ``logvar`` are stopped. The value is
  ``iw_bound``'s for the same key; the gradient with respect to the encoder is the
  doubly-reparameterized estimator, with respect to ``decoder_params`` the plain IWAE one.

  Args:
    key: PRNG key for the samples' ``eps`` (the same draw as ``iw_bound`` makes).
    x: ``[batch, *event_shape]`` data.
    mean: ``[batch, latent]`` posterior means, from the encoder's parameters.
    logvar: ``[batch, latent]`` posterior log-variances.
    decode: ``(decoder_params, z [n, latent]) -> [n, *event_shape]`` decoder outputs.
    decoder_params: the decoder's parameters (any pytree), which ``decode`` reads.
    log_likelihood_fn: ``(decoded, x) -> [batch]``, as for ``elbo``.
    num_samples: ``K``.

  Returns:
    ``[batch]`` bound values in nats.
  """
  _check_latents(x, mean, logvar)
  stop = jax.lax.stop_gradient
  z = reparameterize(key, mean, logvar, num_samples)

  def log_weights(z, mean, logvar, params):
    decoded = _decode_samples(functools.partial(decode, params), z, x)
    log_px = _sample_log_likelihoods(log_likelihood_fn, decoded, x)
    log_qz = diag_gaussian_log_prob(
      z, jnp.broadcast_to(mean, z.shape), jnp.broadcast_to(logvar, z.shape)
    )
    return log_px + standard_normal_log_prob(z) - log_qz

  log_w_encoder = log_weights(z, stop(mean), stop(logvar), stop(decoder_params))
  log_w_decoder = log_weights(stop(z), stop(mean), stop(logvar), decoder_params)
  return dreg_iw_bound(log_w_encoder, log_w_decoder)


# --------------------------------------------------------------------------
# Tighter bounds in groups (Rainforth et al. 2018).


def _groups(log_weights: Array, num_groups: int) -> Array:
  """``[M * K, ...]`` -> ``[M, K, ...]``: sample ``m * K + k`` is sample ``k`` of group ``m``.

  Raises:
    ValueError: the samples do not split into ``num_groups`` equal groups.
  """
  _check_float("log_weights", log_weights)
  total = log_weights.shape[0]
  if num_groups < 1 or total % num_groups:
    raise ValueError(f"{total} samples do not split into {num_groups} equal groups.")
  return log_weights.reshape(num_groups, total // num_groups, *log_weights.shape[1:])


def miwae_bound(log_weights: Array, num_groups: int) -> Array:
  """MIWAE: the mean over ``M`` groups of the importance-weighted bound of each group's ``K``
  samples, ``(1/M) sum_m log (1/K) sum_k w_mk`` (Rainforth et al. 2018, "Tighter
  variational bounds are not necessarily better", eq. 10).

  ``M = 1`` is the IWAE bound of all samples; ``K = 1`` the ELBO's Monte Carlo estimate
  with ``M`` samples.

  Args:
    log_weights: ``[M * K, ...]`` log weights ``log p(x, z) - log q(z | x)``, group-major.
    num_groups: ``M``.

  Returns:
    ``log_weights`` without its sample axis, in nats.
  """
  return jnp.mean(iw_bound_from_log_weights(_groups(log_weights, num_groups), axis=1), axis=0)


def ciwae_bound(log_weights: Array, ciwae_beta: float | Array) -> Array:
  """CIWAE: ``beta ELBO + (1 - beta) IWAE`` of the same ``K`` samples (Rainforth et al.
  2018, eq. 11): the ELBO's Monte Carlo estimate is the mean log weight.

  Args:
    log_weights: ``[K, ...]`` log weights.
    ciwae_beta: ``beta`` in [0, 1]: 1 is the ELBO, 0 the IWAE bound.

  Returns:
    ``log_weights`` without its sample axis, in nats.
  """
  _check_float("log_weights", log_weights)
  elbo_estimate = jnp.mean(log_weights.astype(_compute_dtype(log_weights)), axis=0)
  iwae = iw_bound_from_log_weights(log_weights, axis=0)
  return ciwae_beta * elbo_estimate + (1.0 - ciwae_beta) * iwae


def piwae_bound(log_w_encoder: Array, log_w_decoder: Array, num_groups: int) -> Array:
  """PIWAE: the IWAE bound of all ``M K`` samples for the generative network's gradient, and
  the MIWAE bound of ``M`` groups of ``K`` for the inference network's (Rainforth et al.
  2018, section 4).

  The two gradients come from one surrogate, as in ``dreg_iw_bound``: give
  ``log_w_encoder`` with the decoder's parameters held constant and ``log_w_decoder`` with
  the encoder's held constant (the same values). The value returned is the IWAE bound.

  Args:
    log_w_encoder: ``[M * K, ...]`` log weights whose gradient reaches only the encoder.
    log_w_decoder: the same values, whose gradient reaches only the decoder.
    num_groups: ``M``.

  Returns:
    The IWAE bound of the ``M K`` samples, without the sample axis, in nats.
  """
  iwae = iw_bound_from_log_weights(log_w_decoder, axis=0)
  miwae = miwae_bound(log_w_encoder, num_groups)
  return iwae + (miwae - jax.lax.stop_gradient(miwae))


# --------------------------------------------------------------------------
# DIP-VAE (Kumar et al. 2018).


def dip_vae_regularizer(
  mean: Array,
  logvar: Array,
  lambda_od: float | Array,
  lambda_d: float | Array,
  kind: str = "i",
) -> Array:
  """DIP-VAE's penalty on the aggregate posterior's covariance, for one batch.

  ``lambda_od sum_{i != j} C_ij**2 + lambda_d sum_i (C_ii - 1)**2`` (Kumar, Sattigeri &
  Balakrishnan 2018, "Variational inference of disentangled latent concepts from
  unlabeled observations", eqs. 6 and 7), where ``C`` is, for DIP-VAE-I, the covariance
  of the encoder's means over the batch, ``Cov[mu(x)]``, and for DIP-VAE-II the
  covariance of ``z`` under the aggregate posterior, ``E[diag(sigma**2(x))] + Cov[mu(x)]``.
  The covariance is the batch's maximum-likelihood estimate (dividing by the batch size),
  as in disentanglement_lib ``dip_vae``.

  Args:
    mean: ``[batch, latent]`` posterior means.
    logvar: ``[batch, latent]`` posterior log-variances (read for ``"ii"`` only).
    lambda_od: weight of the off-diagonal entries.
    lambda_d: weight of the diagonal entries' distance from 1.
    kind: ``"i"`` or ``"ii"``.

  Returns:
    A scalar, in the units of the loss it is added to (it is a penalty, not a density).

  Raises:
    ValueError: an unknown ``kind``.
  """
  _check_float("mean", mean)
  _check_same_shape("mean", mean, "logvar", logvar)
  if kind not in ("i", "ii"):
    raise ValueError(f"kind must be 'i' or 'ii', got {kind!r}.")
  dtype = _compute_dtype(mean, logvar)
  mean, logvar = mean.astype(dtype), logvar.astype(dtype)
  centred = mean - jnp.mean(mean, axis=0, keepdims=True)
  cov = centred.T @ centred / mean.shape[0]
  if kind == "ii":
    cov = cov + jnp.diag(jnp.mean(jnp.exp(logvar), axis=0))
  diagonal = jnp.diag(cov)
  off_diagonal = cov - jnp.diag(diagonal)
  return lambda_od * jnp.sum(jnp.square(off_diagonal)) + lambda_d * jnp.sum(
    jnp.square(diagonal - 1.0)
  )


# --------------------------------------------------------------------------
# FactorVAE (Kim & Mnih 2018).


def permute_dims(key: Array, z: Array) -> Array:
  """Each column of ``z: [batch, latent]`` shuffled by its own permutation of the batch:
  samples of the product of the marginals ``prod_j q(z_j)`` (Kim & Mnih 2018, algorithm 1)."""
  _check_float("z", z)
  keys = jax.random.split(key, z.shape[1])
  return jax.vmap(lambda k, column: jax.random.permutation(k, column), in_axes=(0, 1), out_axes=1)(
    keys, z
  )


def factor_vae_total_correlation(logits: Array) -> Array:
  """The density-ratio estimate of the total correlation from the discriminator's logits on
  samples of ``q(z)``: ``log D(z) - log(1 - D(z))`` per sample (Kim & Mnih 2018, eq. 3).

  Args:
    logits: ``[batch, 2]``: the discriminator's logits of "from q(z)" (column 0) and "from
      the product of the marginals" (column 1), as in disentanglement_lib.

  Returns:
    ``[batch]`` estimates, in nats.
  """
  _check_float("logits", logits)
  return logits[:, 0] - logits[:, 1]


def factor_vae_discriminator_loss(logits_joint: Array, logits_permuted: Array) -> Array:
  """The discriminator's cross-entropy: ``-(1/2) (E log D(z) + E log(1 - D(z_perm)))``, with
  ``D = softmax(logits)[:, 0]`` (Kim & Mnih 2018, algorithm 1; disentanglement_lib's
  ``discr_loss``).

  Args:
    logits_joint: ``[batch, 2]`` logits on samples of ``q(z)``.
    logits_permuted: ``[batch, 2]`` logits on ``permute_dims`` of them.

  Returns:
    A scalar, in nats.
  """
  _check_float("logits_joint", logits_joint)
  _check_same_shape("logits_joint", logits_joint, "logits_permuted", logits_permuted)
  joint = jax.nn.log_softmax(logits_joint, axis=-1)[:, 0]
  permuted = jax.nn.log_softmax(logits_permuted, axis=-1)[:, 1]
  return -0.5 * (jnp.mean(joint) + jnp.mean(permuted))
