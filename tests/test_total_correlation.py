"""Tests for vae_jax.total_correlation.

References are float64 NumPy computations written from the definitions: the exact aggregate
posterior of a finite dataset, ``q(z) = (1/N) sum_n q(z | x_n)``, enumerated over all ``N``
points, and the closed-form total correlation of a Gaussian, ``-0.5 log det(corr)``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import total_correlation as tc

# Statistical checks pass within this many standard errors (fixed seeds: deterministic).
_NUM_SIGMA = 4.0


def _np_log_normal(z, mean, logvar):
  return -0.5 * ((z - mean) ** 2 * np.exp(-logvar) + logvar + np.log(2.0 * np.pi))


def _np_logsumexp(a, axis):
  m = np.max(a, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _exact_log_densities(z, means, logvars):
  """Exact ``log q(z_i)`` and ``sum_d log q(z_id)`` under the mixture of all given posteriors.

  Args:
    z: [S, D] points; means, logvars: [N, D] the posteriors of all N data points.

  Returns:
    (log_qz [S], log_qzd [S, D], pairs [S, N, D] = log q(z_id | x_n)).
  """
  pairs = _np_log_normal(z[:, None, :], means[None], logvars[None])
  n = means.shape[0]
  log_qz = _np_logsumexp(pairs.sum(-1), axis=1) - math.log(n)
  log_qzd = _np_logsumexp(pairs, axis=1) - math.log(n)
  return log_qz, log_qzd, pairs


def _small_case(seed=0, n=6, latent=3):
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=(n, latent))
  logvar = rng.normal(scale=0.5, size=(n, latent)) - 1.0
  z = mean + np.exp(0.5 * logvar) * rng.normal(size=(n, latent))
  return z, mean, logvar


def _f32(*arrays):
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# --------------------------------------------------------------------------
# Exact checks on a small dataset: the batch is the whole dataset (M = N = 6, D = 3).


def test_stratified_is_exact_when_the_batch_is_the_dataset():
  z, mean, logvar = _small_case()
  log_qz, log_qzd, _ = _exact_log_densities(z, mean, logvar)
  got_qz, got_prod = tc.log_qz_stratified(*_f32(z, mean, logvar), dataset_size=6)
  np.testing.assert_allclose(got_qz, log_qz, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_prod, log_qzd.sum(-1), rtol=1e-5, atol=1e-5)


def test_mws_is_exact_minus_log_n_per_density_when_the_batch_is_the_dataset():
  # With M = N, logsumexp_j log q(z_i | x_j) - log(N M) = log q(z_i) - log N exactly: the
  # offset the module docstring describes, and TC too high by (D - 1) log N.
  z, mean, logvar = _small_case()
  log_qz, log_qzd, _ = _exact_log_densities(z, mean, logvar)
  got_qz, got_prod = tc.log_qz_mws(*_f32(z, mean, logvar), dataset_size=6)
  np.testing.assert_allclose(got_qz, log_qz - math.log(6), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_prod, log_qzd.sum(-1) - 3 * math.log(6), rtol=1e-5, atol=1e-5)
  exact_tc = log_qz - log_qzd.sum(-1)
  np.testing.assert_allclose(
    tc.total_correlation_mws(*_f32(z, mean, logvar), dataset_size=6),
    exact_tc + 2 * math.log(6),
    rtol=1e-5,
    atol=1e-5,
  )


def test_estimators_match_reference_on_a_subbatch():
  # A batch of 4 drawn from a dataset of N = 50: the formulas, written out with loops.
  z, mean, logvar = _small_case(seed=1, n=4, latent=2)
  n_data, m = 50, 4
  log_q = np.array(
    [[_np_log_normal(z[i], mean[j], logvar[j]) for j in range(m)] for i in range(m)]
  )  # [i, j, d]
  w = np.full((m, m), (n_data - 1) / (n_data * (m - 1)))
  np.fill_diagonal(w, 1.0 / n_data)
  expected = {
    "mws": (
      np.log(np.exp(log_q.sum(-1)).sum(1) / (n_data * m)),
      np.log(np.exp(log_q).sum(1) / (n_data * m)).sum(-1),
    ),
    "stratified": (
      np.log((w * np.exp(log_q.sum(-1))).sum(1)),
      np.log((w[:, :, None] * np.exp(log_q)).sum(1)).sum(-1),
    ),
  }
  for name, fn in (("mws", tc.log_qz_mws), ("stratified", tc.log_qz_stratified)):
    got = fn(*_f32(z, mean, logvar), dataset_size=n_data)
    np.testing.assert_allclose(got[0], expected[name][0], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[1], expected[name][1], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("estimator", ["mws", "stratified"])
def test_decomposition_sums_to_the_kl_sample(estimator):
  z, mean, logvar = _small_case(seed=2, n=5, latent=4)
  terms = tc.tc_decomposition(*_f32(z, mean, logvar), dataset_size=100, estimator=estimator)
  log_q_given_x = _np_log_normal(z, mean, logvar).sum(-1)
  log_p = _np_log_normal(z, 0.0, 0.0).sum(-1)
  np.testing.assert_allclose(sum(terms), log_q_given_x - log_p, rtol=1e-5, atol=1e-5)
  assert all(t.shape == (5,) for t in terms)
  if estimator == "mws":
    np.testing.assert_array_equal(
      terms.total_correlation, tc.total_correlation_mws(*_f32(z, mean, logvar), 100)
    )


# --------------------------------------------------------------------------
# A Gaussian aggregate posterior with known total correlation.
#
# N = 4096 data points with posteriors N(mu_n, s^2 I), s = 0.25, mu_n ~ N(0, Sigma),
# Sigma = [[1, 0.8], [0.8, 1]]. The aggregate q(z) is a kernel density estimate whose
# expectation is exactly N(0, Sigma + s^2 I); with the mixture's own covariance C (sample
# covariance of the mu_n plus s^2 I) its TC is -0.5 log(1 - r^2), r the correlation in C
# (0.42 nats here). One sample z_n per data point; the estimators see batches of M = 512.

_N, _M, _RHO, _S = 4096, 512, 0.8, 0.25


@pytest.fixture(scope="module")
def gaussian_case():
  rng = np.random.default_rng(0)
  chol = np.linalg.cholesky(np.array([[1.0, _RHO], [_RHO, 1.0]]))
  mu = rng.normal(size=(_N, 2)) @ chol.T
  z = mu + _S * rng.normal(size=(_N, 2))
  logvar = np.full((_N, 2), 2.0 * math.log(_S))
  cov = np.cov(mu.T, bias=True) + _S**2 * np.eye(2)
  r = cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1])
  closed_form = -0.5 * math.log(1.0 - r**2)
  # Exact densities of every sample under the whole mixture, in chunks of 1024 samples.
  log_qz, log_qzd, rel_var, own = [], [], [], []
  for start in range(0, _N, 1024):
    rows = slice(start, start + 1024)
    a, ad, pairs = _exact_log_densities(z[rows], mu, logvar)
    log_qz.append(a)
    log_qzd.append(ad)
    # Relative variance over n of q(z_i | x_n) / q(z_i), joint and per dimension, and the
    # own posterior's share q(z_i | x_i) / (N q(z_i)): the inputs of the bias bounds below.
    joint = np.concatenate([pairs.sum(-1)[..., None], pairs], axis=-1)  # [S, N, 1 + D]
    ratio = np.exp(joint - _np_logsumexp(joint, axis=1)[:, None, :] + math.log(_N))
    rel_var.append(np.mean(ratio**2, axis=1) - 1.0)
    own.append(ratio[np.arange(ratio.shape[0]), np.arange(start, start + ratio.shape[0])] / _N)
  batches = rng.permutation(_N).reshape(-1, _M)
  return {
    "z": z,
    "mu": mu,
    "logvar": logvar,
    "closed_form": closed_form,
    "exact_tc": np.concatenate(log_qz) - np.concatenate(log_qzd).sum(-1),
    "rel_var": np.concatenate(rel_var),  # [N, 1 + D]
    "own_share": np.concatenate(own),  # [N, 1 + D]
    "batches": batches,
  }


def _batched_tc(case, estimator):
  """Per-sample TC estimates [N] from the N / M disjoint random batches, vmapped."""
  idx = case["batches"]

  @jax.jit
  def run(z, mean, logvar):
    decompose = lambda *a: tc.tc_decomposition(*a, dataset_size=_N, estimator=estimator)  # noqa: E731
    return jax.vmap(decompose)(z, mean, logvar).total_correlation

  return np.asarray(run(*_f32(case["z"][idx], case["mu"][idx], case["logvar"][idx]))).ravel()


def _standard_error(x):
  return float(np.std(x) / math.sqrt(x.size))


def test_gaussian_aggregate_has_the_closed_form_tc(gaussian_case):
  # The premise of the next two tests: the exact mixture TC, averaged over the N samples,
  # matches the Gaussian closed form within its Monte Carlo error (the KDE's deviation from
  # its Gaussian mean is second order).
  exact = gaussian_case["exact_tc"]
  assert abs(exact.mean() - gaussian_case["closed_form"]) < _NUM_SIGMA * _standard_error(exact)
  assert 0.40 < gaussian_case["closed_form"] < 0.43


def _jensen_bias(case):
  """Delta-method bias of a batch TC estimate: each log-density of a mean of M - 1 draws is low by
  rel_var / (2 (M - 1)); TC = log q(z) - sum_d log q(z_d) takes the joint's minus the marginals'."""
  rel_var = case["rel_var"]
  return -float(np.mean(rel_var[:, 0] - rel_var[:, 1:].sum(-1))) / (2 * (_M - 1))


def test_stratified_estimator_recovers_the_gaussian_tc(gaussian_case):
  # Error budget: 4 standard errors of the mean over the N samples, plus the estimator's
  # first-order bias (the Jensen term, -0.016 nats here; rel_var from the exact enumeration).
  estimate = _batched_tc(gaussian_case, "stratified")
  bias = _jensen_bias(gaussian_case)
  tolerance = _NUM_SIGMA * _standard_error(estimate) + abs(bias)
  assert abs(estimate.mean() - gaussian_case["closed_form"]) < tolerance
  assert tolerance < 0.1  # The test has power: TC itself is 0.41 nats.


def test_mws_estimator_is_offset_by_log_n(gaussian_case):
  # Here the posteriors overlap (s = 0.25 against a mean spacing of ~0.03), so MWS's TC is
  # the true TC plus (D - 1) log N = log 4096 = 8.32 nats. Its first-order bias around that:
  # the Jensen term of the stratified test, plus weighting each sample's own posterior by 1/M
  # instead of 1/N, which moves a log-density with own share x = q(z_i | x_i) / (N q(z_i)) by
  # (N / M - 1) x - 1 / M; TC takes the joint's change minus the D marginals' (+0.03 here).
  estimate = _batched_tc(gaussian_case, "mws")
  own = gaussian_case["own_share"]
  own_weight = (_N / _M - 1) * float(np.mean(own[:, 0] - own[:, 1:].sum(-1))) + 1 / _M
  bias = _jensen_bias(gaussian_case) + own_weight
  tolerance = _NUM_SIGMA * _standard_error(estimate) + abs(bias)
  offset = math.log(_N)
  assert abs(estimate.mean() - offset - gaussian_case["closed_form"]) < tolerance
  assert tolerance < 0.1


# --------------------------------------------------------------------------
# Shapes, errors, jit.


def test_shape_errors_raise():
  z, mean, logvar = _f32(*_small_case())
  with pytest.raises(ValueError, match="same shape"):
    tc.log_qz_mws(z, mean[:, :2], logvar, 10)
  with pytest.raises(ValueError, match=r"\[M, latent\]"):
    tc.log_qz_mws(z[0], mean[0], logvar[0], 10)
  with pytest.raises(ValueError, match="dataset_size"):
    tc.log_qz_mws(z, mean, logvar, 3)  # Fewer data points than the batch.
  with pytest.raises(ValueError, match="dataset_size"):
    tc.log_qz_mws(z, mean, logvar, 10.0)
  with pytest.raises(ValueError, match="at least 2"):
    tc.log_qz_stratified(z[:1], mean[:1], logvar[:1], 10)
  with pytest.raises(ValueError, match="estimator"):
    tc.tc_decomposition(z, mean, logvar, 10, estimator="mss")
  with pytest.raises(TypeError, match="floating"):
    tc.log_qz_mws(z.astype(jnp.int32), mean, logvar, 10)


def test_shape_errors_raise_at_trace_time():
  z, mean, logvar = _f32(*_small_case())
  fn = jax.jit(tc.total_correlation_mws, static_argnames="dataset_size")
  with pytest.raises(ValueError, match="same shape"):
    fn(z, mean[:5], logvar, dataset_size=10)


def test_jit_matches_eager_and_compiles_once():
  z, mean, logvar = _f32(*_small_case())
  traces = 0

  def counted(*args):
    nonlocal traces
    traces += 1
    return tc.tc_decomposition(*args, dataset_size=100, estimator="stratified")

  jitted = jax.jit(counted)
  eager = tc.tc_decomposition(z, mean, logvar, 100, estimator="stratified")
  for _ in range(3):
    out = jitted(z, mean, logvar)
  assert traces == 1
  for a, b in zip(out, eager, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
