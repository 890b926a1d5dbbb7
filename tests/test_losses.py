"""Tests for vae_jax.losses.

Every value is checked against something independent of the code under test: a
closed form worked out by hand, a float64 NumPy reference, a Monte Carlo
estimate with a stated error bar, or a linear-Gaussian model whose marginal
likelihood is known exactly.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from vae_jax import losses

# Monte Carlo checks pass when the estimate is within this many standard errors.
# The keys are fixed, so the tests are deterministic; 4 sigma only says that the
# fixed draw is not a lucky one.
_NUM_SIGMA = 4.0


# --------------------------------------------------------------------------
# Float64 NumPy references, written from the definitions.


def _np_kl(mean, logvar):
  var = np.exp(logvar)
  return 0.5 * (var + mean**2 - 1.0 - logvar)


def _np_bernoulli(logits, x, event_ndims):
  # x * log sigmoid(l) + (1 - x) * log(1 - sigmoid(l)) == x * l - log(1 + e^l).
  log_p = x * logits - np.logaddexp(0.0, logits)
  return log_p.sum(axis=tuple(range(log_p.ndim - event_ndims, log_p.ndim)))


def _np_gaussian(mean, x, variance, event_ndims):
  variance = np.broadcast_to(variance, x.shape)
  log_p = -0.5 * ((x - mean) ** 2 / variance + np.log(2.0 * np.pi * variance))
  return log_p.sum(axis=tuple(range(log_p.ndim - event_ndims, log_p.ndim)))


def _np_diag_gaussian(z, mean, logvar):
  var = np.exp(logvar)
  return np.sum(-0.5 * ((z - mean) ** 2 / var + np.log(2.0 * np.pi * var)), axis=-1)


def _np_logsumexp(a, axis):
  m = np.max(a, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _f64(a):
  return np.asarray(a, np.float64)


def _f32(a):
  return jnp.asarray(a, jnp.float32)


def _linear_decoder(w, b):
  return lambda z: z @ w + b[None]


def _problem(seed=0, batch=4, latent=3, data=5, dtype=jnp.float32):
  """A small random ELBO problem: Bernoulli data and a linear decoder."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(batch, data))
  mean = rng.normal(size=(batch, latent))
  logvar = rng.normal(scale=0.5, size=(batch, latent))
  w = rng.normal(scale=0.5, size=(latent, data))
  b = rng.normal(scale=0.1, size=(data,))
  return tuple(jnp.asarray(a, dtype) for a in (x, mean, logvar, w, b))


# --------------------------------------------------------------------------
# KL divergence.


@pytest.mark.parametrize(
  ("mean", "logvar", "expected"),
  [
    pytest.param(0.0, 0.0, 0.0, id="standard_normal"),
    pytest.param(1.0, 0.0, 0.5, id="mean1_logvar0"),
    pytest.param(0.0, math.log(2.0), 0.5 * (1.0 - math.log(2.0)), id="mean0_var2"),
    pytest.param(-2.0, math.log(0.5), 0.5 * (3.5 + math.log(2.0)), id="mean-2_var0.5"),
  ],
)
def test_kl_closed_form(mean, logvar, expected):
  mean, logvar = jnp.full((4, 3), mean), jnp.full((4, 3), logvar)
  per_dim = losses.kl_divergence_per_dim(mean, logvar)
  np.testing.assert_allclose(per_dim, np.full((4, 3), expected), rtol=1e-6, atol=1e-7)
  kl = losses.kl_divergence(mean, logvar)
  np.testing.assert_allclose(kl, np.full((4,), 3 * expected), rtol=1e-6, atol=1e-7)


def test_kl_matches_numpy_reference():
  rng = np.random.default_rng(1)
  mean, logvar = 2.0 * rng.normal(size=(4, 3)), 1.5 * rng.normal(size=(4, 3))
  per_dim = losses.kl_divergence_per_dim(_f32(mean), _f32(logvar))
  kl = losses.kl_divergence(_f32(mean), _f32(logvar))
  assert per_dim.shape == (4, 3) and kl.shape == (4,)
  np.testing.assert_allclose(per_dim, _np_kl(mean, logvar), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl, _np_kl(mean, logvar).sum(-1), rtol=1e-5, atol=1e-6)


def test_kl_accurate_for_nearly_prior_units():
  # An inactive unit has KL ~ logvar**2 / 4 ~ 2.5e-9 here. Computing
  # exp(logvar) - 1 - logvar naively in float32 is off by ~1e-7 (rtol ~ 40);
  # expm1 leaves only the float32 rounding of the two ~1e-4 terms (rtol ~ 1e-3).
  logvar = np.array([[1e-4, -1e-4, 3e-3], [0.0, 2e-4, -5e-4]] * 2)
  kl = losses.kl_divergence_per_dim(jnp.zeros((4, 3)), _f32(logvar))
  expected = 0.5 * (np.expm1(logvar) - logvar)
  np.testing.assert_allclose(kl, expected, rtol=1e-2, atol=0.0)


def test_kl_matches_monte_carlo():
  # KL = E_q[log q(z) - log p(z)], estimated in float64 NumPy from N draws of q.
  # Error bar: the sample standard deviation of the summand over sqrt(N).
  num = 200_000
  rng = np.random.default_rng(2)
  mean = np.array([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2], [3.0, 0.0, 0.0], [0.1, -0.5, 0.7]])
  logvar = np.array([[0.0, -1.4, 1.1], [-1.0, 0.5, 0.0], [0.0, 2.0, -3.0], [0.3, 0.3, -0.3]])
  z = mean + np.exp(0.5 * logvar) * rng.normal(size=(num, *mean.shape))
  log_q = _np_diag_gaussian(z, mean, logvar)
  log_p = np.sum(-0.5 * (z**2 + np.log(2.0 * np.pi)), axis=-1)
  estimate = np.mean(log_q - log_p, axis=0)
  std_err = np.std(log_q - log_p, axis=0, ddof=1) / math.sqrt(num)
  kl = losses.kl_divergence(_f32(mean), _f32(logvar))
  assert np.all(np.abs(_f64(kl) - estimate) < _NUM_SIGMA * std_err), (kl, estimate, std_err)


# --------------------------------------------------------------------------
# Observation models and densities.

_EXTREME_LOGITS = np.array([-1e4, -100.0, -3.0, 0.0, 2.5, 100.0, 1e4])
_TARGETS = np.array([0.0, 1.0, 0.3, 0.5, 0.9])


def test_bernoulli_matches_reference_for_extreme_logits():
  logits, x = np.meshgrid(_EXTREME_LOGITS, _TARGETS, indexing="ij")  # Every pairing.
  got = losses.bernoulli_log_likelihood(_f32(logits), _f32(x), event_ndims=0)
  np.testing.assert_allclose(got, _np_bernoulli(logits, x, event_ndims=0), rtol=1e-6, atol=1e-6)
  binary = np.isin(x, (0.0, 1.0))
  assert np.all(_f64(got)[binary] <= 0.0)


def test_bernoulli_gradient_finite_at_extreme_logits():
  logits = jnp.array([-1e4, 1e4, -1e4, 1e4, 1e4])
  x = jnp.array([0.0, 1.0, 1.0, 0.0, 0.3])
  value = losses.bernoulli_log_likelihood(logits, x)
  grad = jax.grad(lambda lg: losses.bernoulli_log_likelihood(lg, x))(logits)
  assert np.isfinite(value)
  # d/dl [x * l - softplus(l)] = x - sigmoid(l).
  np.testing.assert_allclose(grad, _f64(x) - (_f64(logits) > 0), atol=1e-6)


@pytest.mark.parametrize(
  ("event_ndims", "out_shape"),
  [pytest.param(3, (2,), id="whole_image"), pytest.param(1, (2, 4, 3), id="channels_only")],
)
def test_bernoulli_image_event_ndims(event_ndims, out_shape):
  rng = np.random.default_rng(3)
  logits = rng.normal(scale=3.0, size=(2, 4, 3, 2))  # [B, H, W, C]
  x = (rng.uniform(size=logits.shape) > 0.5).astype(np.float64)
  got = losses.bernoulli_log_likelihood(_f32(logits), _f32(x), event_ndims=event_ndims)
  assert got.shape == out_shape
  np.testing.assert_allclose(got, _np_bernoulli(logits, x, event_ndims), rtol=1e-5)


@pytest.mark.parametrize(
  "variance",
  [
    pytest.param(1.0, id="c1"),
    pytest.param(0.1, id="c0.1"),
    pytest.param(4.0, id="c4"),
    pytest.param(np.array([0.5, 2.0, 0.05]), id="per_pixel"),
    pytest.param(np.linspace(0.2, 3.0, 12).reshape(4, 3), id="per_element"),
  ],
)
def test_gaussian_log_likelihood(variance):
  rng = np.random.default_rng(4)
  mean, x = rng.normal(size=(2, 4, 3))
  got = losses.gaussian_log_likelihood(_f32(mean), _f32(x), _f32(variance))
  np.testing.assert_allclose(got, _np_gaussian(mean, x, variance, 1), rtol=1e-5)
  # At x == mean only the normalizer is left: -1/2 sum_i log(2 pi c_i).
  at_mean = losses.gaussian_log_likelihood(_f32(x), _f32(x), _f32(variance))
  normalizer = -0.5 * np.sum(np.broadcast_to(np.log(2.0 * np.pi * variance), x.shape), -1)
  np.testing.assert_allclose(at_mean, normalizer, rtol=1e-6)


def test_gaussian_log_likelihood_image_events():
  rng = np.random.default_rng(5)
  mean, x = rng.normal(size=(2, 2, 4, 3, 1))
  got = losses.gaussian_log_likelihood(_f32(mean), _f32(x), 0.3, event_ndims=3)
  assert got.shape == (2,)
  np.testing.assert_allclose(got, _np_gaussian(mean, x, 0.3, 3), rtol=1e-5)


def test_diag_and_standard_normal_log_prob():
  rng = np.random.default_rng(6)
  z, mean, logvar = rng.normal(size=(3, 4, 3))
  got = losses.diag_gaussian_log_prob(_f32(z), _f32(mean), _f32(logvar))
  np.testing.assert_allclose(got, _np_diag_gaussian(z, mean, logvar), rtol=1e-5)
  got = losses.standard_normal_log_prob(_f32(z))
  zeros = np.zeros_like(z)
  np.testing.assert_allclose(got, _np_diag_gaussian(z, zeros, zeros), rtol=1e-5)


# --------------------------------------------------------------------------
# Reparameterized sampling.


@pytest.mark.parametrize(
  ("num_samples", "shape", "dtype"),
  [
    pytest.param(None, (4, 3), jnp.float32, id="single_f32"),
    pytest.param(1, (1, 4, 3), jnp.bfloat16, id="S1_bf16"),
    pytest.param(3, (3, 4, 3), jnp.float32, id="S3_f32"),
  ],
)
def test_reparameterize_shape_and_dtype(num_samples, shape, dtype):
  z = losses.reparameterize(
    jax.random.key(0), jnp.zeros((4, 3), dtype), jnp.zeros((4, 3), dtype), num_samples
  )
  assert z.shape == shape and z.dtype == dtype


def test_reparameterize_moments():
  # Sample mean within 4 sigma of `mean` (sigma = sqrt(var / S)) and sample
  # variance within 4 sigma of exp(logvar) (sigma = var * sqrt(2 / (S - 1)) for
  # Gaussian draws).
  num = 100_000
  mean = jnp.array([[0.5, -1.0, 2.0], [0.0, 3.0, -0.2]])
  logvar = jnp.array([[0.0, math.log(0.25), math.log(4.0)], [-2.0, 1.0, 0.0]])
  z = _f64(losses.reparameterize(jax.random.key(1), mean, logvar, num))
  var = np.exp(_f64(logvar))
  assert np.all(np.abs(z.mean(0) - _f64(mean)) < _NUM_SIGMA * np.sqrt(var / num))
  assert np.all(np.abs(z.var(0, ddof=1) - var) < _NUM_SIGMA * var * math.sqrt(2.0 / (num - 1)))


def test_reparameterize_keys():
  mean, logvar = jnp.zeros((4, 3)), jnp.zeros((4, 3))
  z1 = losses.reparameterize(jax.random.key(7), mean, logvar, 3)
  np.testing.assert_array_equal(z1, losses.reparameterize(jax.random.key(7), mean, logvar, 3))
  z2 = losses.reparameterize(jax.random.key(8), mean, logvar, 3)
  assert np.all(_f64(z1) != _f64(z2))


def test_reparameterize_gradients():
  key, (_, mean, logvar, _, _) = jax.random.key(3), _problem()
  dz_dmean, dz_dlogvar = jax.jacfwd(losses.reparameterize, argnums=(1, 2))(key, mean, logvar)
  np.testing.assert_array_equal(dz_dmean.reshape(12, 12), np.eye(12))
  # z = mean + exp(logvar / 2) * eps, so dz/dlogvar = (z - mean) / 2 on the diagonal.
  z = losses.reparameterize(key, mean, logvar)
  expected = np.diag(0.5 * _f64(z - mean).ravel())
  np.testing.assert_allclose(dz_dlogvar.reshape(12, 12), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# ELBO.


@pytest.mark.parametrize("num_samples", [1, 3], ids=["S1", "S3"])
def test_elbo_terms(num_samples):
  x, mean, logvar, w, b = _problem()
  key, decode = jax.random.key(0), _linear_decoder(w, b)
  out = losses.elbo(key, x, mean, logvar, decode, num_samples=num_samples)
  assert out.elbo.shape == out.reconstruction.shape == out.kl.shape == (4,)
  # Reconstruction is the average over the same draws reparameterize makes.
  z = _f64(losses.reparameterize(key, mean, logvar, num_samples))
  logits = z @ _f64(w) + _f64(b)
  expected = np.mean([_np_bernoulli(lg, _f64(x), 1) for lg in logits], axis=0)
  np.testing.assert_allclose(out.reconstruction, expected, rtol=1e-5)
  np.testing.assert_allclose(out.kl, _np_kl(_f64(mean), _f64(logvar)).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(out.elbo, out.reconstruction - out.kl, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 4.0], ids=lambda b: f"beta{b}")
def test_elbo_beta(beta):
  x, mean, logvar, w, b = _problem()
  args = (jax.random.key(0), x, mean, logvar, _linear_decoder(w, b))
  base = losses.elbo(*args)
  out = losses.elbo(*args, beta=beta)
  np.testing.assert_array_equal(out.reconstruction, base.reconstruction)
  np.testing.assert_array_equal(out.kl, base.kl)
  np.testing.assert_allclose(out.elbo, _f64(base.reconstruction) - beta * _f64(base.kl), rtol=1e-6)
  if beta == 0.0:
    np.testing.assert_array_equal(out.elbo, out.reconstruction)


def test_elbo_check_grads():
  x, mean, logvar, w, b = _problem(batch=2, latent=2, data=3)

  def objective(mean, logvar, w):
    out = losses.elbo(jax.random.key(0), x, mean, logvar, _linear_decoder(w, b), num_samples=2)
    return jnp.sum(out.elbo)

  check_grads(
    jax.jit(objective), (mean, logvar, w), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2
  )


def test_elbo_jit_matches_eager():
  x, mean, logvar, w, b = _problem()
  f = functools.partial(losses.elbo, decode_fn=_linear_decoder(w, b), num_samples=3)
  eager = f(jax.random.key(5), x, mean, logvar)
  jitted = jax.jit(f)(jax.random.key(5), x, mean, logvar)
  for e, j in zip(eager, jitted, strict=True):
    np.testing.assert_allclose(j, e, rtol=1e-5)


def test_elbo_and_iw_bound_vmap_match_loop():
  replicas = 3
  problems = [_problem(seed=s) for s in range(replicas)]
  x, mean, logvar, w, b = (jnp.stack(a) for a in zip(*problems, strict=True))
  keys = jax.random.split(jax.random.key(9), replicas)

  def f(key, x, mean, logvar, w, b):
    decode = _linear_decoder(w, b)
    out = losses.elbo(key, x, mean, logvar, decode, num_samples=3)
    return out.elbo, losses.iw_bound(key, x, mean, logvar, decode, num_samples=3)

  batched = jax.jit(jax.vmap(f))(keys, x, mean, logvar, w, b)
  looped = [f(keys[i], x[i], mean[i], logvar[i], w[i], b[i]) for i in range(replicas)]
  for got, expected in zip(batched, zip(*looped, strict=True), strict=True):
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5)


def test_jitted_training_loss_compiles_once():
  num_traces = 0

  def loss(key, x, mean, logvar, w, beta):
    nonlocal num_traces
    num_traces += 1  # Runs only while tracing.
    out = losses.elbo(key, x, mean, logvar, lambda z: z @ w, beta=beta, num_samples=2)
    return -jnp.mean(out.elbo)

  step = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4)))
  for i in range(3):
    x, mean, logvar, w, _ = _problem(seed=i)
    value, grads = step(jax.random.key(i), x, mean, logvar, w, 0.5 * i)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
  assert num_traces == 1


def test_elbo_bfloat16_inputs():
  x, mean, logvar, w, b = _problem(dtype=jnp.bfloat16)
  out = losses.elbo(jax.random.key(0), x, mean, logvar, _linear_decoder(w, b))
  for a in out:
    assert a.dtype == jnp.float32 and np.all(np.isfinite(a))
  # The KL is computed after upcasting, so it matches float32 on the same values.
  upcast = losses.kl_divergence(mean.astype(jnp.float32), logvar.astype(jnp.float32))
  np.testing.assert_allclose(out.kl, upcast, rtol=1e-6)


def test_float64_stays_float64():
  with jax.enable_x64(True):
    x, mean, logvar, w, b = _problem(dtype=jnp.float64)
    f = functools.partial(losses.elbo, decode_fn=_linear_decoder(w, b))
    out = jax.jit(f)(jax.random.key(0), x, mean, logvar)
    assert all(a.dtype == jnp.float64 for a in out)
    np.testing.assert_allclose(out.kl, _np_kl(_f64(mean), _f64(logvar)).sum(-1), rtol=1e-12)
    logits = 40.0 * _f64(x) - 20.0  # Any float64 logits of x's shape.
    got = losses.bernoulli_log_likelihood(jnp.asarray(logits), x)
    np.testing.assert_allclose(got, _np_bernoulli(logits, _f64(x), 1), rtol=1e-12)


# --------------------------------------------------------------------------
# Importance-weighted bound.


def test_iw_bound_single_sample_is_the_log_weight():
  x, mean, logvar, w, b = _problem()
  args = (jax.random.key(4), x, mean, logvar, _linear_decoder(w, b))
  log_w = losses.iw_log_weights(*args, num_samples=1)
  assert log_w.shape == (1, 4)
  np.testing.assert_array_equal(losses.iw_bound(*args, num_samples=1), log_w[0])
  np.testing.assert_array_equal(losses.iw_bound_from_log_weights(log_w), log_w[0])


@pytest.mark.parametrize("axis", [0, 1, -1], ids=lambda a: f"axis{a}")
def test_iw_bound_from_log_weights_reference(axis):
  log_w = np.random.default_rng(7).normal(scale=5.0, size=(4, 3))
  got = losses.iw_bound_from_log_weights(_f32(log_w), axis=axis)
  expected = _np_logsumexp(log_w, axis) - math.log(log_w.shape[axis])
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Jensen: log mean exp >= mean log, strictly for unequal weights.
  assert np.all(_f64(got) > log_w.mean(axis))


@pytest.mark.parametrize("offset", [-1e4, 1e4, -100.0], ids=["-1e4", "+1e4", "-100"])
def test_iw_bound_from_log_weights_is_stable(offset):
  log_w = jnp.array([[offset], [offset + 1.0]])
  got = losses.iw_bound_from_log_weights(log_w)
  # log((e^a + e^(a+1)) / 2) = a + log((1 + e) / 2); float32 spacing at 1e4 is 1e-3.
  np.testing.assert_allclose(got, [offset + math.log((1.0 + math.e) / 2.0)], rtol=0, atol=2e-3)


class _LinearGaussian:
  """p(z) = N(0, I), p(x | z) = N(W z + b, c I), so p(x) = N(b, W W^T + c I).

  W has orthogonal columns, so the exact posterior N(mu, Sigma) with
  Sigma = (I + W^T W / c)^-1 and mu = Sigma W^T (x - b) / c is diagonal and an
  encoder of the form N(mean, diag(exp(logvar))) can represent it exactly.
  """

  c = 0.5

  def __init__(self, batch=4, latent=2, data=4):
    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.normal(size=(data, latent)))
    self.w = q * np.array([1.5, 0.8])  # [data, latent], W^T W = diag(2.25, 0.64).
    self.b = rng.normal(size=data)
    self.x = self.b + 1.5 * rng.normal(size=(batch, data))
    cov = self.w @ self.w.T + self.c * np.eye(data)
    r = self.x - self.b
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("bi,ij,bj->b", r, np.linalg.inv(cov), r)
    self.log_px = -0.5 * (data * math.log(2.0 * math.pi) + logdet + maha)
    sigma = np.linalg.inv(np.eye(latent) + self.w.T @ self.w / self.c)
    assert np.allclose(sigma, np.diag(np.diag(sigma)), atol=1e-12)
    self.post_mean = r @ self.w @ sigma / self.c
    self.post_logvar = np.broadcast_to(np.log(np.diag(sigma)), self.post_mean.shape)
    f = functools.partial(
      losses.iw_log_weights,
      decode_fn=_linear_decoder(_f32(self.w.T), _f32(self.b)),
      log_likelihood_fn=functools.partial(losses.gaussian_log_likelihood, variance=self.c),
      num_samples=1000,
    )
    self._log_weights = jax.jit(jax.vmap(f, in_axes=(0, None, None, None)))

  def analytic_elbo(self, mean, logvar):
    """E_q[log p(x | z)] - KL(q || p) in closed form, float64."""
    var = np.exp(logvar)
    resid = self.x - self.b - mean @ self.w.T
    trace = var @ np.sum(self.w**2, axis=0)  # tr(W diag(var) W^T).
    data = self.x.shape[-1]
    rec = -0.5 * (data * math.log(2.0 * math.pi * self.c) + (np.sum(resid**2, -1) + trace) / self.c)
    return rec - _np_kl(mean, logvar).sum(-1)

  def log_weights(self, mean, logvar):
    """16 independent ``iw_log_weights`` calls with K = 1000: ``[16 * 1000, batch]``."""
    keys = jax.random.split(jax.random.key(1), 16)
    return self._log_weights(keys, _f32(self.x), _f32(mean), _f32(logvar)).reshape(-1, len(self.x))


@pytest.fixture(scope="module")
def linear_gaussian():
  return _LinearGaussian()  # Built and compiled once for the tests below.


def test_iw_exact_posterior_recovers_log_marginal(linear_gaussian):
  model = linear_gaussian
  # Sanity check of the reference: the ELBO of the true posterior is log p(x).
  np.testing.assert_allclose(
    model.analytic_elbo(model.post_mean, model.post_logvar), model.log_px, rtol=1e-12
  )
  # p(x, z) / q(z | x) = p(x) for every z, so every weight is log p(x).
  log_w = model.log_weights(model.post_mean, model.post_logvar)
  np.testing.assert_allclose(log_w, np.broadcast_to(model.log_px, log_w.shape), rtol=1e-5)
  bound = losses.iw_bound_from_log_weights(log_w.reshape(16, 1000, -1), axis=1)
  np.testing.assert_allclose(bound, np.broadcast_to(model.log_px, bound.shape), rtol=1e-5)


def test_iw_bound_tightens_with_num_samples(linear_gaussian):
  model = linear_gaussian
  # A posterior that is off by one standard deviation and three times too wide.
  mean = model.post_mean + np.exp(0.5 * model.post_logvar)
  logvar = model.post_logvar + math.log(3.0)
  elbo = model.analytic_elbo(mean, logvar)
  assert np.all(model.log_px - elbo > 1.0)  # A real gap for the bound to close.

  # 16 x 1000 independent log-weights per example, cut into groups of K: each
  # group gives one draw of the IW_K bound. Error bars: std over groups / sqrt.
  log_w = model.log_weights(mean, logvar)
  # Their plain mean estimates the ELBO, within its error bar.
  elbo_err = _f64(log_w).std(0, ddof=1) / math.sqrt(log_w.shape[0])
  assert np.all(np.abs(_f64(log_w).mean(0) - elbo) < _NUM_SIGMA * elbo_err)
  bounds, std_errs = [], []
  for k in (1, 10, 1000):
    groups = log_w.reshape(-1, k, len(model.x))
    per_group = _f64(losses.iw_bound_from_log_weights(groups, axis=1))  # [groups, batch]
    bounds.append(per_group.mean(0))
    std_errs.append(per_group.std(0, ddof=1) / math.sqrt(len(per_group)))
  bounds, std_errs = np.array(bounds), np.array(std_errs)
  # E[IW_K] is non-decreasing in K (Burda et al., 2015), up to Monte Carlo error.
  tol = _NUM_SIGMA * np.hypot(std_errs[1:], std_errs[:-1])
  assert np.all(bounds[1:] >= bounds[:-1] - tol), bounds
  # ELBO < IW_1000 <= log p(x), and K = 1000 closes most of the gap.
  assert np.all(bounds[2] > elbo + _NUM_SIGMA * std_errs[2]), (bounds[2], elbo)
  assert np.all(bounds[2] <= model.log_px + _NUM_SIGMA * std_errs[2]), (bounds[2], model.log_px)
  assert np.all(model.log_px - bounds[2] < 0.2 * (model.log_px - elbo))


# --------------------------------------------------------------------------
# Errors raised at trace time.

_F = jnp.zeros((4, 3))  # _problem's latent shape, so eager ops compiled above are reused.
_I = jnp.zeros((4, 3), jnp.int32)
_KEY = jax.random.key(0)


def _elbo(x, mean, logvar):
  return losses.elbo(_KEY, x, mean, logvar, lambda z: z @ jnp.ones((3, 3)))


# name: (function, arguments, expected message).
_SHAPE_ERRORS = {
  "logits_vs_x": (losses.bernoulli_log_likelihood, (_F, jnp.zeros((4, 4))), "logits and x"),
  "logits_vs_x_broadcastable": (losses.bernoulli_log_likelihood, (_F, _F[0]), "same shape"),
  "gaussian_mean_vs_x": (losses.gaussian_log_likelihood, (_F, _F[:1]), "mean and x"),
  "kl_mean_vs_logvar": (losses.kl_divergence, (_F, _F[:, :1]), "mean and logvar"),
  "reparameterize_mean_vs_logvar": (losses.reparameterize, (_KEY, _F, _F[0]), "mean and logvar"),
  "log_prob_z_vs_logvar": (losses.diag_gaussian_log_prob, (_F, _F, _F[:, :1]), "z and logvar"),
  "elbo_x_vs_mean_batch": (_elbo, (_F[:3], _F, _F), "same batch size"),
  "elbo_unbatched_mean": (_elbo, (_F, _F[0], _F[0]), r"\[batch, latent\]"),
  "elbo_decoder_vs_x": (_elbo, (jnp.zeros((4, 5)), _F, _F), "decode_fn returned shape"),
  "event_ndims_too_large": (
    functools.partial(losses.bernoulli_log_likelihood, event_ndims=3),
    (_F, _F),
    "event_ndims=3 is out of range",
  ),
}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", _SHAPE_ERRORS)
def test_shape_errors(case, use_jit):
  fn, args, match = _SHAPE_ERRORS[case]
  with pytest.raises(ValueError, match=match):
    (jax.jit(fn) if use_jit else fn)(*args)


@pytest.mark.parametrize("objective", [losses.elbo, losses.iw_bound], ids=["elbo", "iw_bound"])
def test_log_likelihood_must_sum_event_axes(objective):
  # Per-element log-likelihoods [S, B, D] would broadcast against log p(z) [S, B].
  ll = functools.partial(losses.bernoulli_log_likelihood, event_ndims=0)
  with pytest.raises(ValueError, match="must sum over every event axis"):
    objective(_KEY, _F, _F, _F, lambda z: z, ll, num_samples=3)


@pytest.mark.parametrize("num_samples", [0, -1, 2.0], ids=["zero", "negative", "float"])
def test_reparameterize_bad_num_samples(num_samples):
  with pytest.raises(ValueError, match="num_samples must be None or a positive int"):
    losses.reparameterize(_KEY, _F, _F, num_samples)


_TYPE_ERRORS = {
  "uint8_pixels": (
    losses.bernoulli_log_likelihood,
    (_F, _I.astype(jnp.uint8)),
    "x must be a floating-point array, got dtype uint8",
  ),
  "int_logits": (losses.bernoulli_log_likelihood, (_I, _F), "logits must be a floating-point"),
  "gaussian_int_x": (losses.gaussian_log_likelihood, (_F, _I), "x must be a floating-point"),
  "kl_int_mean": (losses.kl_divergence, (_I, _F), "mean must be a floating-point"),
  "reparameterize_int_logvar": (losses.reparameterize, (_KEY, _F, _I), "logvar must be a float"),
  "int_z": (losses.standard_normal_log_prob, (_I,), "z must be a floating-point"),
  "int_log_weights": (losses.iw_bound_from_log_weights, (_I,), "log_weights must be a float"),
  "elbo_uint8_x": (_elbo, (_I.astype(jnp.uint8), _F, _F), "divide uint8"),
}


@pytest.mark.parametrize("case", _TYPE_ERRORS)
def test_integer_inputs_raise_type_error(case):
  fn, args, match = _TYPE_ERRORS[case]
  with pytest.raises(TypeError, match=match):
    fn(*args)


# --------------------------------------------------------------------------
# Kinks and ties: every hand-written formula matches its reference AT the kink.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize("use_jit", [False, True])
def test_bernoulli_gradient_at_logit_zero_is_x_minus_half(dtype, use_jit):
  """A zero-initialized output layer sits exactly at the softplus kink."""
  with jax.enable_x64(dtype == jnp.float64):

    def f(logits):
      return losses.bernoulli_log_likelihood(logits, jnp.ones((1, 1), dtype)).sum()

    grad = (jax.jit(jax.grad(f)) if use_jit else jax.grad(f))(jnp.zeros((1, 1), dtype))
    assert float(grad[0, 0]) == 0.5  # x - sigmoid(0) = 1 - 0.5.


@pytest.mark.parametrize("x", [0.0, 1e-30, -1e-30, 1e-6, -3.0, 3.0, 40.0, -40.0, 300.0])
def test_softplus_matches_jax_softplus_in_value_and_gradient(x):
  x = jnp.float32(x)
  assert float(losses.softplus(x)) == pytest.approx(float(jax.nn.softplus(x)), rel=1e-6, abs=0)
  assert float(jax.grad(losses.softplus)(x)) == pytest.approx(float(jax.nn.sigmoid(x)), rel=1e-6)
  g2 = jax.grad(jax.grad(losses.softplus))(x)
  s = float(jax.nn.sigmoid(x))
  assert float(g2) == pytest.approx(s * (1.0 - s), rel=1e-5, abs=1e-30)


def test_free_bits_tie_keeps_the_kl_gradient():
  """At per-dimension KL == lambda, as tf.maximum(kl, lambda) in the IAF code."""
  kl = jnp.array([[0.25, 1.0]])
  grad = jax.grad(lambda k: jnp.sum(losses.free_bits_kl(k, 0.25)))(kl)
  np.testing.assert_array_equal(grad, [[1.0, 1.0]])
  grad_below = jax.grad(lambda k: jnp.sum(losses.free_bits_kl(k, 0.3)))(kl)
  np.testing.assert_array_equal(grad_below, [[0.0, 1.0]])


def test_capacity_objective_at_the_capacity_has_zero_kl_gradient():
  """|KL - C| at KL == C: PyTorch's abs subgradient 0 (Burgess et al.'s code), not 1."""
  g = jax.grad(lambda kl: losses.capacity_objective(jnp.float32(-5.0), kl, 2.0, 3.0))
  assert float(g(jnp.float32(3.0))) == 0.0
  assert float(g(jnp.float32(4.0))) == -2.0 and float(g(jnp.float32(2.0))) == 2.0
  value = losses.capacity_objective(jnp.float32(-5.0), jnp.float32(1.0), 2.0, 3.0)
  assert float(value) == -9.0


def test_hardtanh_has_pytorchs_gradient_at_the_bounds():
  from vae_jax import networks

  x = jnp.array([-7.0, -6.0, -5.9, 0.0, 1.9, 2.0, 3.0])
  np.testing.assert_array_equal(networks.hardtanh(x, -6.0, 2.0), np.clip(np.asarray(x), -6, 2))
  grad = jax.grad(lambda v: networks.hardtanh(v, -6.0, 2.0).sum())(x)
  np.testing.assert_array_equal(grad, [0, 0, 1, 1, 1, 0, 0])


# --------------------------------------------------------------------------
# Zero importance weights (log w = -inf).

_LOG_W = [[-1.0], [-np.inf], [-3.0]]
_EXPECTED = math.log((math.exp(-1.0) + math.exp(-3.0)) / 3.0)  # -1.9717


def test_dreg_and_iw_bound_with_a_zero_weight():
  lw = jnp.array(_LOG_W)
  assert float(losses.dreg_iw_bound(lw, lw)[0]) == pytest.approx(_EXPECTED, rel=1e-6)
  assert float(losses.iw_bound_from_log_weights(lw)[0]) == pytest.approx(_EXPECTED, rel=1e-6)
  w = np.exp([-1.0, -3.0]) / np.exp([-1.0, -3.0]).sum()
  g_plain = jax.grad(lambda a: losses.iw_bound_from_log_weights(a).sum())(lw)
  np.testing.assert_allclose(g_plain[:, 0], [w[0], 0.0, w[1]], rtol=1e-6)
  g_enc, g_dec = jax.grad(lambda a, b: losses.dreg_iw_bound(a, b).sum(), argnums=(0, 1))(lw, lw)
  np.testing.assert_allclose(g_enc[:, 0], [w[0] ** 2, 0.0, w[1] ** 2], rtol=1e-6)
  np.testing.assert_allclose(g_dec[:, 0], [w[0], 0.0, w[1]], rtol=1e-6)


def test_all_zero_weights_give_minus_inf_and_zero_gradients():
  lw = jnp.full((3, 2), -jnp.inf)
  for fn in (
    lambda a: losses.dreg_iw_bound(a, a),
    losses.iw_bound_from_log_weights,
    lambda a: losses.logsumexp(a, axis=0),
  ):
    value = fn(lw)
    assert np.all(np.isneginf(np.asarray(value)))
    grad = jax.grad(lambda a, fn=fn: jnp.sum(jnp.where(jnp.isfinite(fn(a)), fn(a), 0.0)))(lw)
    np.testing.assert_array_equal(grad, np.zeros((3, 2)))
    grad_direct = jax.grad(lambda a, fn=fn: fn(a)[0])(lw)
    assert np.all(np.isfinite(np.asarray(grad_direct)))


def test_mixture_with_an_impossible_component_is_finite():
  z = jnp.zeros((2, 1))
  means, logvars = jnp.array([[0.0], [1e30]]), jnp.zeros((2, 1))
  value = losses.diag_gaussian_mixture_log_prob(z, means, logvars)
  expected = -0.5 * math.log(2 * math.pi) - math.log(2.0)
  np.testing.assert_allclose(value, [expected, expected], rtol=1e-6)


# --------------------------------------------------------------------------
# Honest likelihoods: the continuous Bernoulli for grey levels.


def _np_cb_log_norm(logits):
  lam = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  out = np.full(lam.shape, np.log(2.0))
  away = np.abs(lam - 0.5) > 1e-12
  out[away] = np.log(2.0 * np.arctanh(1.0 - 2.0 * lam[away]) / (1.0 - 2.0 * lam[away]))
  return out


@pytest.mark.parametrize("logit", [0.0, 1e-6, -1e-4, 0.03, -0.049, 0.051, 0.5, -2.0, 8.0, -30.0])
def test_continuous_bernoulli_normalizer_matches_its_definition(logit):
  got = float(losses.continuous_bernoulli_log_norm(jnp.float32(logit)))
  assert got == pytest.approx(float(_np_cb_log_norm(logit)), rel=2e-6, abs=2e-6)
  grad = float(jax.grad(losses.continuous_bernoulli_log_norm)(jnp.float32(logit)))
  # d/dl log(l / tanh(l/2)) = 1/l - 1/sinh(l): 0 at l = 0, finite everywhere.
  ref = 0.0 if abs(logit) < 1e-3 else 1.0 / logit - 1.0 / math.sinh(logit)
  assert np.isfinite(grad) and grad == pytest.approx(ref, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("logit", [0.0, 1e-3, 0.7, -3.0, 12.0])
def test_continuous_bernoulli_is_a_density_on_the_unit_interval(logit):
  """It integrates to 1 over [0, 1] (the plain Bernoulli term alone does not)."""
  x = (np.arange(20000) + 0.5) / 20000  # Midpoint rule, error ~ 1e-9 here.
  logits = jnp.full((x.size, 1), logit, jnp.float32)
  xs = jnp.asarray(x[:, None], jnp.float32)
  density = np.exp(np.asarray(losses.continuous_bernoulli_log_likelihood(logits, xs), np.float64))
  assert density.mean() == pytest.approx(1.0, abs=1e-4)
  mean = (x * density).mean()
  got = float(losses.continuous_bernoulli_mean(jnp.float32(logit)))
  assert got == pytest.approx(mean, abs=1e-4)
  if logit == 0.0:  # The cross-entropy alone integrates to 1/2 at logit 0.
    bce = np.exp(np.asarray(losses.bernoulli_log_likelihood(logits, xs), np.float64))
    assert bce.mean() == pytest.approx(0.5, abs=1e-4)


def test_preconditions_are_stated():
  for fn in (losses.bernoulli_log_likelihood, losses.gaussian_log_likelihood):
    assert "Precondition" in fn.__doc__
  assert "not* a log-density" in losses.bernoulli_log_likelihood.__doc__


# --------------------------------------------------------------------------
# Accuracy on both sides of every switch between formulas (issue 24, kind 7).


def _decimal_cb(logit: float) -> tuple[float, float, float]:
  """``(log C, d log C / dl, E[x])`` of the continuous Bernoulli at ``logit`` from the
  definitions, ``C = l (e^l + 1) / (e^l - 1)``, its derivative ``1/l - 1/sinh(l)``, and
  ``E[x] = 1 / (1 - e^-l) - 1/l``, in 200-digit ``decimal`` arithmetic (enough for the
  cancellation at l = 1e-30 to leave 50 digits)."""
  import decimal

  decimal.getcontext().prec = 200
  d = decimal.Decimal(logit)
  if d == 0:
    return math.log(2.0), 0.0, 0.5
  e = d.exp()
  log_c = (d * (e + 1) / (e - 1)).ln()
  derivative = 1 / d - 2 / (e - 1 / e)
  mean = 1 / (1 - 1 / e) - 1 / d
  return float(log_c), float(derivative), float(mean)


# Both sides of the old switch at |l| = 0.05 and of the series' end at |l| = 4 (u = 2).
_CB_LOGITS = (
  0.0,
  1e-30,
  1e-8,
  1e-3,
  0.0499,
  0.05,
  0.0501,
  0.07,
  0.09,
  0.5,
  3.99,
  4.0,
  4.01,
  30.0,
  200.0,
)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_continuous_bernoulli_is_accurate_to_the_dtype_on_both_sides_of_each_switch(sign):
  """Value, gradient and mean against 50-digit-accurate references: within a few ulps of float64
  and of float32 (the old Taylor switch at 0.05 lost 6e-4 of the float32 gradient)."""
  for logit in _CB_LOGITS:
    logit = sign * logit
    want_log_c, want_grad, want_mean = _decimal_cb(logit)
    with jax.enable_x64(True):
      x = jnp.float64(logit)
      log_c = float(losses.continuous_bernoulli_log_norm(x))
      grad = float(jax.grad(losses.continuous_bernoulli_log_norm)(x))
      mean = float(losses.continuous_bernoulli_mean(x))
    assert log_c == pytest.approx(want_log_c, rel=4e-16, abs=1e-300), logit
    assert grad == pytest.approx(want_grad, rel=1e-14, abs=1e-300), logit
    assert mean == pytest.approx(want_mean, rel=4e-16), logit
    x32 = jnp.float32(logit)
    want32 = _decimal_cb(float(x32))
    assert float(losses.continuous_bernoulli_log_norm(x32)) == pytest.approx(want32[0], rel=3e-7), (
      logit
    )
    grad32 = float(jax.grad(losses.continuous_bernoulli_log_norm)(x32))
    assert grad32 == pytest.approx(want32[1], rel=2e-6, abs=1e-38), (
      logit
    )  # XLA divides in ~16 ulps.
    assert float(losses.continuous_bernoulli_mean(x32)) == pytest.approx(want32[2], rel=3e-7)


def test_logsumexp_propagates_nan():
  a = jnp.asarray([[0.0, 1.0], [jnp.nan, 2.0], [-jnp.inf, -jnp.inf]])
  out = np.asarray(losses.logsumexp(a, axis=1))
  assert out[0] == pytest.approx(math.log(1 + math.e)) and np.isnan(out[1]) and out[2] == -np.inf
  assert np.isnan(float(losses.iw_bound_from_log_weights(jnp.asarray([0.0, jnp.nan]))))


def test_log_sinh_is_accurate_on_both_sides_of_its_switch():
  """``_log_sinh_of_exp`` switches from its series to the closed form at u = 1e-2."""
  import decimal

  decimal.getcontext().prec = 50
  with jax.enable_x64(True):
    for u in (1e-5, 9.99e-3, 1e-2, 1.001e-2, 0.5, 4.0):
      d = decimal.Decimal(u)
      want = float(((d.exp() - (-d).exp()) / 2).ln())
      got = float(losses._log_sinh_of_exp(jnp.log(jnp.float64(u))))
      assert got == pytest.approx(want, rel=1e-15), u
