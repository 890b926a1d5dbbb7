"""The discretized likelihoods of pixel levels: normalization, float64 references written
from the papers' formulas, gradients, bits/dim, and a colour run that learns.

References (written here in NumPy float64 from the formulas, independently of
``vae_jax.losses``): the discretized logistic of Kingma et al. 2016 (IAF, appendix) and
Salimans et al. 2017 (PixelCNN++, section 2.1), the same with a Gaussian CDF, and
PixelCNN++'s mixture with its RGB coupling (section 2.2). ``scipy`` (installed with
scikit-learn) gives the normal CDF.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from vae_jax import config as config_lib
from vae_jax import likelihoods, losses

L = 256
LEVELS = np.arange(L) / (L - 1.0)  # x = k / 255.
MEANS = (-1.0, -0.37, 0.0, 0.5, 0.999, 1.0, 3.0, -40.0, 1e4)
LOG_SCALES = (-12.0, -7.0, -4.6, -2.0, 0.0, 1.5, 6.0, 60.0)
PER_LEVEL = {
  "logistic": losses.discretized_logistic_log_prob,
  "gaussian": losses.discretized_gaussian_log_prob,
}


# --------------------------------------------------------------------------
# float64 references from the papers' formulas.


def _sigmoid(t):
  return special.expit(t)  # Accurate in both tails (0.5 (1 + tanh(t / 2)) is not).


def reference_probs(kind: str, mean: float, log_scale: float) -> np.ndarray:
  """``P(k)`` for every level ``k``, float64: the CDF at the bin's upper edge minus at its
  lower edge (taken as survival functions in the upper tail, where the CDFs are near 1),
  with y = 2 k / 255 - 1, half-width 1/255, the edge bins to +-infinity, and the
  log-scale clamped at -7 (PixelCNN++)."""
  return _reference(kind, mean, log_scale)[0]


def _reference(kind: str, mean: float, log_scale: float) -> tuple[np.ndarray, np.ndarray]:
  """``(P, condition)``: the probabilities and, per level, how many times larger the
  larger term of their difference is than ``P`` (cancellation costs that factor)."""
  s = math.exp(max(log_scale, losses.MIN_LOG_SCALE))
  cdf = _sigmoid if kind == "logistic" else special.ndtr
  p, condition = np.empty(L), np.empty(L)
  for k in range(L):
    y = 2.0 * k / (L - 1) - 1.0
    upper = (y + 1.0 / (L - 1) - mean) / s
    lower = (y - 1.0 / (L - 1) - mean) / s
    if k == 0:  # (-inf, upper]
      hi, lo = (1.0, cdf(-upper)) if upper > 0 else (cdf(upper), 0.0)
    elif k == L - 1:  # [lower, inf)
      hi, lo = (cdf(-lower), 0.0) if lower > 0 else (1.0, cdf(lower))
    elif lower > 0:  # Both CDFs near 1: their survival functions instead.
      hi, lo = cdf(-lower), cdf(-upper)
    else:
      hi, lo = cdf(upper), cdf(lower)
    p[k] = hi - lo
    condition[k] = hi / p[k] if p[k] > 0 else np.inf
  return p, condition


def reference_mixture_log_prob(decoded: np.ndarray, rgb: np.ndarray, k: int) -> float:
  """``log P(r, g, b)`` of one pixel under PixelCNN++'s mixture, float64, from section
  2.2: ``sum_i pi_i L(r | mu_r) L(g | mu_g + a r) L(b | mu_b + b r + c g)`` with the
  parameters laid out as ``losses.mixture_params`` documents."""
  logits = decoded[:k]
  means = decoded[k : 4 * k].reshape(3, k)
  log_scales = decoded[4 * k : 7 * k].reshape(3, k)
  a, b, c = np.tanh(decoded[7 * k :].reshape(3, k))
  y = 2.0 * rgb / (L - 1.0) - 1.0
  weights = np.exp(logits - logits.max())
  weights /= weights.sum()
  total = 0.0
  for i in range(k):
    centre = (means[0, i], means[1, i] + a[i] * y[0], means[2, i] + b[i] * y[0] + c[i] * y[1])
    p = weights[i]
    for channel in range(3):
      p *= reference_probs("logistic", centre[channel], log_scales[channel, i])[rgb[channel]]
    total += p
  return math.log(total)


# --------------------------------------------------------------------------
# One channel: normalization, references, gradients.


@pytest.mark.parametrize("kind", PER_LEVEL)
def test_the_256_levels_sum_to_one(kind):
  """For every mean and scale, extreme ones included, in float32."""
  for mean in MEANS:
    for log_scale in LOG_SCALES:
      full = lambda v: jnp.full(L, v, jnp.float32)  # noqa: E731
      log_p = PER_LEVEL[kind](full(mean), full(log_scale), jnp.asarray(LEVELS, jnp.float32))
      assert np.all(np.isfinite(np.asarray(log_p))), (mean, log_scale)
      total = float(np.sum(np.exp(np.asarray(log_p, np.float64))))
      assert abs(total - 1.0) < 2e-6, (kind, mean, log_scale, total)


@pytest.mark.parametrize("kind", PER_LEVEL)
def test_agrees_with_a_float64_reference_including_edges_and_extremes(kind):
  """Wherever float64's difference of CDFs is itself accurate (a probability above 1e-200
  whose terms are under 1e5 times larger), the two agree to 1e-8 relative (x64)."""
  with jax.enable_x64(True):
    for mean in MEANS:
      for log_scale in LOG_SCALES:
        want, condition = _reference(kind, mean, log_scale)
        full = lambda v: jnp.full(L, v, jnp.float64)  # noqa: E731
        got = np.exp(np.asarray(PER_LEVEL[kind](full(mean), full(log_scale), jnp.asarray(LEVELS))))
        trusted = (want > 1e-200) & (condition < 1e5)
        assert trusted[[0, L - 1]].any() or want[[0, L - 1]].max() < 1e-200
        # scipy's ndtr far in the tail (1e-100) is good to about 1e-9 relative itself.
        np.testing.assert_allclose(got[trusted], want[trusted], rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("kind", PER_LEVEL)
def test_float32_log_probs_match_float64_where_they_are_large(kind):
  """The float32 computation against the float64 reference at the same (float32) inputs:
  the log-probabilities above e^-30 agree to 1e-3 nats. (The bin edges are float32
  numbers: their rounding, 6e-8, moves the standardized edges by up to 6e-8 / s = 7e-5
  at the clamped scale, and log P by |d log P / dz| <= |z| times that.)"""
  for mean in MEANS:
    for log_scale in LOG_SCALES:
      mean32, scale32 = float(np.float32(mean)), float(np.float32(log_scale))
      want, condition = _reference(kind, mean32, scale32)
      full = lambda v: jnp.full(L, v, jnp.float32)  # noqa: E731
      got = np.asarray(
        PER_LEVEL[kind](full(mean), full(log_scale), jnp.asarray(LEVELS, jnp.float32))
      )
      big = (np.log(np.maximum(want, 1e-300)) > -30.0) & (condition < 1e5)
      np.testing.assert_allclose(got[big], np.log(want[big]), atol=1e-3, rtol=0.0)


@pytest.mark.parametrize("kind", PER_LEVEL)
def test_gradients_are_finite_everywhere(kind):
  means, log_scales, levels = np.meshgrid(MEANS, LOG_SCALES, LEVELS[::5], indexing="ij")
  args = [jnp.asarray(a.ravel(), jnp.float32) for a in (means, log_scales, levels)]

  def total(mean, log_scale):
    return jnp.sum(PER_LEVEL[kind](mean, log_scale, args[2]))

  grads = jax.grad(total, argnums=(0, 1))(args[0], args[1])
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  # Below the clamp the log-scale gets no gradient, as in PixelCNN++; above, it does.
  g_scale = np.asarray(grads[1]).reshape(means.shape)
  assert np.all(g_scale[:, LOG_SCALES.index(-12.0)] == 0.0)
  assert np.any(g_scale[:, LOG_SCALES.index(-2.0)] != 0.0)


def test_a_narrow_bin_is_its_density_times_its_width():
  """A scale far wider than a bin: P(k) = density at the centre x bin width."""
  with jax.enable_x64(True):
    mean, log_scale, x = jnp.zeros(1), jnp.full(1, 12.0), jnp.full(1, 100 / 255.0)
    s = math.exp(12.0)
    y = 2 * 100 / 255 - 1
    logistic_density = math.log(_sigmoid(y / s) * (1 - _sigmoid(y / s)) / s)
    gaussian_density = -0.5 * (y / s) ** 2 - 0.5 * math.log(2 * math.pi) - 12.0
    width = math.log(2 / 255)
    got = losses.discretized_logistic_log_prob(mean, log_scale, x)
    np.testing.assert_allclose(float(got[0]), logistic_density + width, rtol=1e-9)
    got = losses.discretized_gaussian_log_prob(mean, log_scale, x)
    np.testing.assert_allclose(float(got[0]), gaussian_density + width, rtol=1e-9)


# --------------------------------------------------------------------------
# The mixture with PixelCNN++'s channel coupling.


def _random_mixture(k: int, scale: float, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(0.0, scale, losses.mixture_num_params(k, 3))


@pytest.mark.parametrize("scale", [1.0, 6.0], ids=["moderate", "extreme"])
def test_mixture_probabilities_of_all_colours_sum_to_one(scale):
  """Over all 256^3 colours of a pixel, in float32, for a random mixture of 3."""
  k = 3
  decoded = jnp.asarray(_random_mixture(k, scale, seed=1), jnp.float32)
  g, b = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")

  @jax.jit
  def mass_of_red(r):
    rest = jnp.asarray(np.stack([g.ravel(), b.ravel()], -1), jnp.float32)
    rgb = jnp.concatenate([jnp.full((g.size, 1), r, jnp.float32), rest], -1) / (L - 1.0)
    x = rgb.reshape(g.size, 1, 1, 3)
    params = jnp.broadcast_to(decoded, (g.size, 1, 1, decoded.shape[0]))
    log_p = losses.discretized_logistic_mixture_log_likelihood(params, x, k)
    return jnp.sum(jnp.exp(log_p.astype(jnp.float32)))

  total = sum(float(mass_of_red(r)) for r in range(L))
  assert abs(total - 1.0) < 1e-4, total


def test_each_channel_given_the_earlier_ones_sums_to_one():
  """One component: P(b | r, g) and P(g | r) each sum to 1 over their 256 levels."""
  decoded = jnp.asarray(_random_mixture(1, 2.0, seed=2), jnp.float32)
  params = losses.mixture_params(decoded[None], 1, 3)
  for r, g in [(0, 0), (17, 255), (255, 128)]:
    y = jnp.asarray([2 * r / 255 - 1, 2 * g / 255 - 1, 0.0])
    means = losses._coupled_means(params, y[None])[0, :, 0]  # [3]
    for channel in (1, 2):
      log_p = losses.discretized_logistic_log_prob(
        jnp.full(L, means[channel]),
        jnp.full(L, params.log_scales[0, channel, 0]),
        jnp.asarray(LEVELS, jnp.float32),
      )
      assert abs(float(jnp.sum(jnp.exp(log_p))) - 1.0) < 1e-5


def test_mixture_agrees_with_the_float64_reference():
  k = 4
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    for seed, scale in [(4, 1.0), (5, 3.0)]:
      decoded = _random_mixture(k, scale, seed)
      pixels = rng.integers(0, L, (20, 3))
      pixels[0], pixels[1] = (0, 0, 0), (255, 255, 255)  # The edge bins of every channel.
      x = jnp.asarray(pixels / (L - 1.0)).reshape(20, 1, 1, 3)
      params = jnp.broadcast_to(jnp.asarray(decoded), (20, 1, 1, decoded.size))
      got = np.asarray(losses.discretized_logistic_mixture_log_likelihood(params, x, k))
      want = [reference_mixture_log_prob(decoded, p, k) for p in pixels]
      np.testing.assert_allclose(got, want, rtol=1e-9)


def test_mixture_gradients_are_finite_for_extreme_parameters():
  k = 3
  rng = np.random.default_rng(6)
  decoded = jnp.asarray(rng.normal(0.0, 30.0, (8, 2, 2, losses.mixture_num_params(k, 3))))
  decoded = decoded.astype(jnp.float32)
  x = jnp.asarray(rng.integers(0, L, (8, 2, 2, 3)) / (L - 1.0), jnp.float32)
  grad = jax.grad(lambda d: jnp.sum(losses.discretized_logistic_mixture_log_likelihood(d, x, k)))(
    decoded
  )
  assert np.all(np.isfinite(np.asarray(grad)))


def test_mixture_mean_is_the_coupled_expectation():
  """One component, no coupling: the mean image is the means mapped to [0, 1]; with
  coupling, green's mean moves with red's mean by the coefficient."""
  means, coupling = np.array([0.2, -0.4, 0.6]), np.arctanh(0.5)
  decoded = np.concatenate([[0.0], means, np.full(3, -3.0), [coupling, 0.0, 0.0]])
  mean = losses.discretized_logistic_mixture_mean(jnp.asarray(decoded, jnp.float32), 1, 3)
  want = np.array([0.2, -0.4 + 0.5 * 0.2, 0.6])
  np.testing.assert_allclose(np.asarray(mean), (want + 1) / 2, rtol=1e-6)


# --------------------------------------------------------------------------
# The Likelihood objects: bits/dim, decoder outputs, data.


@pytest.mark.parametrize(
  "name", ["discretized_logistic", "discretized_gaussian", "discretized_logistic_mixture"]
)
def test_bits_per_dim_of_a_probability_of_levels_is_nats_over_d_ln2(name):
  config = config_lib.base_config()
  config.model.likelihood, config.binarization = name, "none"
  likelihood = likelihoods.from_config(config)
  assert likelihood.discrete and likelihood.num_levels == 256
  bits = likelihood.bits_per_dim(6000.0, 3072, binarization="none", binary_data=False)
  assert bits == pytest.approx(6000.0 / (3072 * math.log(2)), rel=1e-12)


@pytest.mark.parametrize("bits", [8, 5])
def test_dequantized_densities_add_the_bit_depth_constant(bits):
  """A density of x = (level + u) / 2**bits bounds -log2 P(levels) per dimension by
  (nll + D bits ln 2) / (D ln 2) (Theis et al. 2016): the offset is `bits` exactly."""
  likelihood = likelihoods.GaussianLearned()
  nll = -500.0  # A density can exceed 1: negative nats.
  got = likelihood.bits_per_dim(nll, 3072, binarization="dequantize", binary_data=False, bits=bits)
  assert got == pytest.approx(nll / (3072 * math.log(2)) + bits, rel=1e-12)
  assert likelihood.bits_per_dim(nll, 3072, binarization="none", binary_data=False) is None


def test_discretized_likelihoods_need_the_levels_themselves():
  config = config_lib.base_config()
  config.model.likelihood, config.binarization = "discretized_logistic", "dequantize"
  with pytest.raises(config_lib.ConfigError, match=r"use binarization='none'"):
    config_lib.validate(config)


def test_five_bit_levels_are_a_probability_over_32_values():
  config = config_lib.base_config()
  config.model.likelihood, config.binarization, config.data.bits = "discretized_logistic", "none", 5
  likelihood = likelihoods.from_config(config)
  x = jnp.asarray(np.arange(32) / 31.0, jnp.float32).reshape(1, 32, 1, 1)
  decoded = jnp.concatenate([jnp.full(x.shape, 0.1), jnp.full(x.shape, -1.0)], -1)
  per_level = losses.discretized_logistic_log_prob(decoded[..., :1], decoded[..., 1:], x, 32)
  assert abs(float(jnp.sum(jnp.exp(per_level))) - 1.0) < 1e-5
  assert likelihood.log_prob(decoded, x).shape == (1,)


def test_decoder_outputs_and_pictures_of_each_likelihood():
  event = (4, 4, 3)
  for name, outputs in [
    ("discretized_logistic", 6),
    ("discretized_gaussian", 6),
    ("discretized_logistic_mixture", 100),  # 10 components of 10 numbers.
  ]:
    config = config_lib.base_config()
    config.model.likelihood = name
    likelihood = likelihoods.from_config(config)
    assert likelihood.decoder_shape(event) == (4, 4, outputs)
    # A baseline's mean image comes back as the likelihood's mean.
    image = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, *event)), jnp.float32)
    decoded = likelihood.outputs_for_mean(image, -3.0)
    assert decoded.shape == (2, *likelihood.decoder_shape(event))
    np.testing.assert_allclose(np.asarray(likelihood.mean(decoded)), np.asarray(image), atol=1e-6)


# --------------------------------------------------------------------------
# Training on colour.


def test_a_colour_run_lowers_test_bits_per_dim(photos_dir, tmp_path):
  """configs/cifar10.py:smoke (a residual VAE, the logistic mixture) on the offline photo
  patches: every train and test row is in bits/dim too, and the second epoch's test
  bits/dim are below the first's and below 8 (a uniform distribution over the levels)."""
  from conftest import load_config

  from vae_jax import train, writers

  config = load_config("cifar10", "smoke")
  config.data_dir, config.progress_bar = photos_dir, False
  train.train_and_evaluate(config, tmp_path / "run")
  rows = writers.read_metrics(tmp_path / "run" / "metrics.jsonl")
  test = [r for r in rows if r["split"] == "test"]
  assert [r["step"] for r in test] == [12, 24]
  for r in rows:
    assert r["bits_per_dim"] == pytest.approx(-r["elbo"] / (32 * 32 * 3 * math.log(2)), rel=1e-9)
  assert test[1]["bits_per_dim"] < test[0]["bits_per_dim"]
  assert test[1]["bits_per_dim"] < 8.0
