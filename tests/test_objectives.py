"""The training objectives and the model interface they share.

IWAE against the ELBO, DReG against plain IWAE gradients, the one- and
two-stochastic-layer models' ``posterior`` against a hand computation from
their Flax submodules, one training step for every model and objective, free
bits, the learned Gaussian variance, and the chunked per-example estimator.

Every model is tiny (a handful of units, 4x4x1 images, batch <= 8) so the file
runs in about a minute of CPU time, most of it compilation. Monte Carlo checks use fixed keys
and pass when an estimate is within ``_NUM_SIGMA`` standard errors.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax import config as config_lib
from vae_jax import estimators, losses, models, networks, objectives, trainer
from vae_jax import step as step_lib


def _loss(model, beta, num_samples, objective="elbo", **options):
  """``objectives.make_loss_fn`` of these options; ``step`` defaults to 0."""
  fn = objectives.make_loss_fn(model, objectives.Spec(objective, num_samples, **options), beta)
  return lambda params, x, key, step=0: fn(params, x, key, jnp.asarray(step, jnp.int32))


_NUM_SIGMA = 4.0
_EVENT = (4, 4, 1)
_EVENT_NDIMS = len(_EVENT)
_LATENTS = 2
_TOP_LATENTS = 2
# One batch size and sample count for the eagerly run tests, so that they share
# JAX's per-operation compilation cache.
_BATCH, _K = 4, 3
# The jitted Monte Carlo tests run tiny programs once: compile them cheaply.
_jit = functools.partial(
  jax.jit,
  compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
)
_BERNOULLI = functools.partial(losses.bernoulli_log_likelihood, event_ndims=_EVENT_NDIMS)
_MODELS = [
  pytest.param("mlp", 1, id="mlp1"),
  pytest.param("mlp", 2, id="mlp2"),
  pytest.param("conv", 1, id="conv1"),
  pytest.param("conv", 2, id="conv2"),
]


def _tiny_vae(kind: str, layers: int, **kwargs) -> models.Model:
  return models.make_vae(
    _EVENT,
    _LATENTS,
    kind=kind,
    encoder_hidden=(3,),
    conv_features=(2,),
    activation="tanh",
    stochastic_layers=layers,
    top_latents=_TOP_LATENTS,
    top_hidden=(3,),
    **kwargs,
  )


def _binary(seed: int, shape) -> jax.Array:
  return (jax.random.uniform(jax.random.key(seed), shape) > 0.5).astype(jnp.float32)


def _f64(a) -> np.ndarray:
  return np.asarray(a, np.float64)


def _np_diag_gaussian_per_dim(z, mean, logvar) -> np.ndarray:
  z, mean, logvar = _f64(z), _f64(mean), _f64(logvar)
  return -0.5 * ((z - mean) ** 2 * np.exp(-logvar) + logvar + math.log(2.0 * math.pi))


def _np_kl_per_dim(mean, logvar) -> np.ndarray:
  mean, logvar = _f64(mean), _f64(logvar)
  return 0.5 * (np.exp(logvar) + mean**2 - 1.0 - logvar)


def _np_bernoulli(logits, x) -> np.ndarray:
  logits, x = _f64(logits), _f64(x)
  log_p = x * logits - np.logaddexp(0.0, logits)
  return log_p.reshape(log_p.shape[0], -1).sum(-1)


def _np_logsumexp(a, axis=0) -> np.ndarray:
  a = _f64(a)
  m = np.max(a, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _flat(tree) -> np.ndarray:
  """A pytree of ``[n, ...]`` leaves as one ``[n, coordinates]`` array."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(a).reshape(a.shape[0], -1) for a in leaves], axis=1)


def _assert_same_tree(a, b, **tolerances) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **tolerances)


def _linear_problem(seed=0, batch=3, latent=2, data=5):
  """Bernoulli data, a posterior and a linear decoder, away from the true posterior."""
  rng = np.random.default_rng(seed)
  x = (rng.uniform(size=(batch, data)) > 0.5).astype(np.float32)
  mean = rng.normal(size=(batch, latent)).astype(np.float32)
  logvar = rng.normal(scale=0.5, size=(batch, latent)).astype(np.float32)
  w = rng.normal(scale=1.5, size=(latent, data)).astype(np.float32)
  b = rng.normal(scale=0.1, size=(data,)).astype(np.float32)
  return x, mean, logvar, w, b


# --------------------------------------------------------------------------
# 1. The IWAE bound and the ELBO.


def test_iw_bound_with_one_sample_is_the_log_weight():
  x, mean, logvar, w, b = _linear_problem()
  key = jax.random.key(3)

  def decode(z):
    return z @ w + b[None]

  args = (key, jnp.asarray(x), jnp.asarray(mean), jnp.asarray(logvar), decode)
  log_w = losses.iw_log_weights(*args, num_samples=1)
  bound = losses.iw_bound(*args, num_samples=1)
  assert log_w.shape == (1, 3) and bound.shape == (3,)
  np.testing.assert_allclose(bound, log_w[0], rtol=1e-6, atol=1e-6)
  # The log-weight from its definition, in float64, at the same sample z.
  z = _f64(losses.reparameterize(key, jnp.asarray(mean), jnp.asarray(logvar), 1))[0]
  log_px = _np_bernoulli(z @ _f64(w) + _f64(b)[None], x)
  log_pz = _np_diag_gaussian_per_dim(z, np.zeros_like(z), np.zeros_like(z)).sum(-1)
  log_qz = _np_diag_gaussian_per_dim(z, mean, logvar).sum(-1)
  np.testing.assert_allclose(bound, log_px + log_pz - log_qz, rtol=1e-5, atol=1e-5)


def test_iwae_k1_loss_is_minus_the_mean_log_weight():
  model = _tiny_vae("mlp", 1)
  x = _binary(1, (_BATCH, *_EVENT))
  params = model.init(jax.random.key(0), x)
  key = jax.random.key(11)
  loss, metrics = _loss(model, 1.0, 1, "iwae")(params, x, key)
  # By hand from encode/decode, with the eps make_loss_fn draws from key.
  eps = jax.random.normal(key, (1, _BATCH, model.latents))[0]
  mean, logvar = model.encode(params, x)
  z = mean + jnp.exp(0.5 * logvar) * eps
  log_px = _np_bernoulli(model.decode(params, z), x)
  z64 = _f64(z)
  log_pz = _np_diag_gaussian_per_dim(z64, np.zeros_like(z64), np.zeros_like(z64)).sum(-1)
  log_qz = _np_diag_gaussian_per_dim(z64, mean, logvar).sum(-1)
  expected = -np.mean(log_px + log_pz - log_qz)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)
  # Its elbo metric is the same mean log-weight, and its kl the closed form.
  np.testing.assert_allclose(metrics["elbo"], -expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    metrics["kl"], np.mean(_np_kl_per_dim(mean, logvar).sum(-1)), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("layers", [1, 2])
def test_iwae_k1_agrees_with_the_elbo_in_expectation(layers):
  """Same eps: the difference is (analytic KL) - (log q - log p), of mean zero."""
  model = _tiny_vae("mlp", layers)
  x = _binary(2, (4, *_EVENT))
  params = model.init(jax.random.key(0), x)
  iwae = _loss(model, 1.0, 1, "iwae")
  elbo = _loss(model, 1.0, 1, "elbo")
  num = 2000
  keys = jax.random.split(jax.random.key(5), num)

  @_jit
  @jax.vmap
  def both(key):
    return iwae(params, x, key)[0], elbo(params, x, key)[0]

  loss_iwae, loss_elbo = (_f64(a) for a in both(keys))
  diff = loss_iwae - loss_elbo
  assert np.std(diff) > 1e-3  # Two different estimators, not one computed twice...
  std_err = np.std(diff, ddof=1) / math.sqrt(num)
  assert abs(np.mean(diff)) < _NUM_SIGMA * std_err, (np.mean(diff), std_err)
  # ... and unpaired, each average within the combined error of the other.
  combined = math.sqrt((np.var(loss_iwae, ddof=1) + np.var(loss_elbo, ddof=1)) / num)
  assert abs(np.mean(loss_iwae) - np.mean(loss_elbo)) < _NUM_SIGMA * combined


def test_iw_bound_exceeds_mean_log_weight_and_grows_with_k():
  x, mean, logvar, w, b = _linear_problem(seed=1)

  def decode(z):
    return z @ w + b[None]

  args = (jnp.asarray(x), jnp.asarray(mean), jnp.asarray(logvar), decode)
  # For the same samples: logmeanexp >= mean (Jensen), and <= max.
  log_w = losses.iw_log_weights(jax.random.key(0), *args, num_samples=16)
  bound = losses.iw_bound_from_log_weights(log_w)
  assert np.all(_f64(bound) >= _f64(jnp.mean(log_w, axis=0)))
  assert np.all(_f64(bound) <= _f64(jnp.max(log_w, axis=0)) + 1e-6)
  assert np.all(_f64(bound) > _f64(jnp.mean(log_w, axis=0)) + 1e-3)  # Strict: weights vary.
  # On average, the bound increases with k: iid samples, in groups of 16 whose
  # first 1, 4 and 16 give paired estimates of the k = 1, 4, 16 bounds.
  num = 1000
  groups = _f64(losses.iw_log_weights(jax.random.key(1), *args, num_samples=16 * num))
  groups = groups.reshape(num, 16, -1)  # [groups, k, batch]
  bounds = {k: np.mean(_np_logsumexp(groups[:, :k], axis=1) - math.log(k), -1) for k in (1, 4, 16)}
  for small, large in ((1, 4), (4, 16)):
    gap = bounds[large] - bounds[small]
    assert np.mean(gap) > _NUM_SIGMA * np.std(gap, ddof=1) / math.sqrt(num), (small, large)


# --------------------------------------------------------------------------
# 2. DReG.


def test_dreg_iw_bound_value_and_weights():
  """d/d log_w_enc = softmax(log w)**2, d/d log_w_dec = softmax(log w) (plain IWAE)."""
  log_w = jnp.asarray(np.random.default_rng(0).normal(scale=2.0, size=(5, 3)), jnp.float32)
  value = losses.dreg_iw_bound(log_w, log_w)
  np.testing.assert_allclose(value, losses.iw_bound_from_log_weights(log_w), rtol=1e-6)
  np.testing.assert_allclose(value, _np_logsumexp(log_w) - math.log(5), rtol=1e-6)
  g_enc, g_dec = jax.grad(lambda a, b: jnp.sum(losses.dreg_iw_bound(a, b)), argnums=(0, 1))(
    log_w, log_w
  )
  w = np.exp(_f64(log_w) - _np_logsumexp(log_w)[None])
  np.testing.assert_allclose(g_enc, w**2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_dec, w, rtol=1e-5, atol=1e-7)
  # The plain bound's gradient, for comparison: the same softmax weights.
  g_plain = jax.grad(lambda a: jnp.sum(losses.iw_bound_from_log_weights(a)))(log_w)
  np.testing.assert_allclose(g_dec, g_plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layers", [1, 2])
def test_dreg_value_and_decoder_gradients_equal_plain_iwae(layers):
  model = _tiny_vae("mlp", layers)
  x = _binary(3, (4, *_EVENT))
  params = model.init(jax.random.key(1), x)
  plain = _loss(model, 1.0, _K, "iwae")
  dreg = _loss(model, 1.0, _K, "iwae", gradient_estimator="dreg")
  key = jax.random.key(7)
  (loss_p, metrics_p), grads_p = jax.value_and_grad(plain, has_aux=True)(params, x, key)
  (loss_d, metrics_d), grads_d = jax.value_and_grad(dreg, has_aux=True)(params, x, key)
  np.testing.assert_allclose(loss_d, loss_p, rtol=1e-6)
  _assert_same_tree(metrics_d, metrics_p, rtol=1e-6)
  _assert_same_tree(grads_d["decoder"], grads_p["decoder"], rtol=1e-4, atol=1e-6)
  # The encoder gradients are a different estimate (equal only in expectation).
  diff = _flat(jax.tree.map(lambda a, b: (a - b)[None], grads_d["encoder"], grads_p["encoder"]))
  assert np.max(np.abs(diff)) > 1e-3


@pytest.fixture(scope="module", params=[1, 2], ids=["one_layer", "two_layers"])
def encoder_gradient_samples(request):
  """Per-key encoder gradients ``[keys, coordinates]`` of IWAE estimators with k = 16."""
  layers = request.param
  model = models.make_vae(
    (4,),
    2,
    encoder_hidden=(3,),
    activation="tanh",
    stochastic_layers=layers,
    top_latents=2,
    top_hidden=(3,),
  )
  x = _binary(1, (3, 4))
  params = model.init(jax.random.key(0), x)
  k, num = 16, 2000
  keys = jax.random.split(jax.random.key(7), num)
  ll = losses.bernoulli_log_likelihood

  def stl(params, x, key):
    """IWAE-STL: log q's parameters held fixed, weights w not squared. Biased for k > 1."""
    eps = jax.random.normal(key, (k, x.shape[0], model.latents))
    p = {"encoder": params["encoder"], "decoder": jax.lax.stop_gradient(params["decoder"])}
    post = model.posterior(p, x, eps, stop_density_gradient=True)
    log_px = losses.sample_log_likelihoods(post.z, x, functools.partial(model.decode, p), ll)
    return -jnp.mean(losses.iw_bound_from_log_weights(log_px + post.log_prior - post.log_q)), {}

  def samples(loss_fn):
    per_key = jax.vmap(lambda key: jax.grad(loss_fn, has_aux=True)(params, x, key)[0]["encoder"])
    return _flat(_jit(per_key)(keys)).astype(np.float64)

  out = {
    "plain": samples(_loss(model, 1.0, k, "iwae")),
    "dreg": samples(_loss(model, 1.0, k, "iwae", gradient_estimator="dreg")),
  }
  if layers == 1:  # A known-biased estimator, to show that the test can tell.
    out["stl"] = samples(stl)
  return out


def _paired_z_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """|mean(a - b)| in standard errors of the mean, per coordinate (same keys)."""
  diff = a - b
  std_err = np.std(diff, axis=0, ddof=1) / math.sqrt(diff.shape[0])
  return np.abs(np.mean(diff, axis=0)) / np.maximum(std_err, 1e-12)


def test_dreg_encoder_gradients_are_unbiased(encoder_gradient_samples):
  plain, dreg = encoder_gradient_samples["plain"], encoder_gradient_samples["dreg"]
  num = plain.shape[0]
  # Most plain gradients are far from zero: the comparison has something to detect.
  signal = np.abs(plain.mean(0)) / (plain.std(0, ddof=1) / math.sqrt(num))
  assert np.mean(signal > _NUM_SIGMA) > 0.5, signal
  # Unpaired: the two averages within 4 combined standard errors, per coordinate.
  combined = np.sqrt((plain.var(0, ddof=1) + dreg.var(0, ddof=1)) / num)
  assert np.all(np.abs(dreg.mean(0) - plain.mean(0)) < _NUM_SIGMA * combined)
  # Paired (same keys, so a tighter error bar).
  assert np.all(_paired_z_scores(dreg, plain) < _NUM_SIGMA)
  if "stl" in encoder_gradient_samples:  # The same test rejects a biased estimator.
    assert np.max(_paired_z_scores(encoder_gradient_samples["stl"], plain)) > 3 * _NUM_SIGMA


def test_dreg_encoder_gradients_have_lower_variance(encoder_gradient_samples):
  """Tucker et al. (2019): the DReG encoder gradient's variance is well below IWAE's."""
  plain, dreg = encoder_gradient_samples["plain"], encoder_gradient_samples["dreg"]
  assert np.sum(dreg.var(0)) < 0.7 * np.sum(plain.var(0))  # 0.2 (one layer), 0.4 (two).
  assert np.mean(dreg.var(0) < plain.var(0)) > 0.75


# --------------------------------------------------------------------------
# 3. Models: shapes and the two-layer densities by hand.


@pytest.mark.parametrize(("kind", "layers"), _MODELS)
def test_model_shapes(kind, layers):
  model = _tiny_vae(kind, layers)
  total = _LATENTS + (_TOP_LATENTS if layers == 2 else 0)
  assert model.latents == total
  assert model.layer_latents == ((_LATENTS,) if layers == 1 else (_LATENTS, _TOP_LATENTS))
  params = model.init(jax.random.key(0), jnp.zeros((1, *_EVENT)))
  assert set(params) == {"encoder", "decoder"}
  batch, k = _BATCH, _K
  x = _binary(1, (batch, *_EVENT))
  mean, logvar = model.encode(params, x)
  assert mean.shape == logvar.shape == (batch, total)
  assert model.decode(params, mean).shape == (batch, *_EVENT)
  eps = jax.random.normal(jax.random.key(2), (k, batch, total))
  post = model.posterior(params, x, eps)
  assert post.z.shape == (k, batch, total)
  assert post.log_q.shape == post.log_prior.shape == (k, batch)
  assert post.kl_per_dim.shape == (k, batch, total)
  for a in post:
    assert a.dtype == jnp.float32 and np.all(np.isfinite(a))
  # The bottom layer's mean path agrees with encode (q(z1 | x) reads only x).
  np.testing.assert_allclose(
    post.z[..., :_LATENTS],
    (mean[None] + jnp.exp(0.5 * logvar)[None] * eps)[..., :_LATENTS],
    rtol=1e-5,
    atol=1e-6,
  )
  stopped = model.posterior(params, x, eps, stop_density_gradient=True)
  _assert_same_tree(stopped, post, rtol=1e-6, atol=1e-6)
  samples = model.sample_prior(params, jax.random.key(3), 5)
  assert samples.shape == (5, total) and np.all(np.isfinite(samples))
  with pytest.raises(ValueError, match="eps must be"):
    model.posterior(params, x, eps[..., :-1])


def _hand_two_layer(kind, params, x, eps, stop_density=False):
  """``q(z1|x) q(z2|z1)`` and ``p(z2) p(z1|z2)`` from the Flax modules, densities by hand."""
  if kind == "mlp":
    x_encoder = networks.Encoder((3,), _LATENTS, "tanh")
  else:
    x_encoder = networks.ConvEncoder((2,), (3,), _LATENTS, "tanh")
  q_z2 = networks.Encoder((3,), _TOP_LATENTS, "tanh")
  p_z1 = networks.Encoder((3,), _LATENTS, "tanh")
  enc, dec = params["encoder"], params["decoder"]
  k, batch = eps.shape[:2]

  def flat_apply(module, p, inputs):  # [K, B, d] -> two [K, B, d'].
    out = module.apply({"params": p}, inputs.reshape(k * batch, -1))
    return tuple(a.reshape(k, batch, -1) for a in out)

  def log_normal(z, mean, logvar):
    return -0.5 * ((z - mean) ** 2 * jnp.exp(-logvar) + logvar + math.log(2.0 * math.pi))

  mean1, logvar1 = x_encoder.apply({"params": enc["q_z1"]}, x)
  z1 = mean1[None] + jnp.exp(0.5 * logvar1)[None] * eps[..., :_LATENTS]
  mean2, logvar2 = flat_apply(q_z2, enc["q_z2"], z1)
  z2 = mean2 + jnp.exp(0.5 * logvar2) * eps[..., _LATENTS:]
  if stop_density:
    stop = functools.partial(jax.tree.map, jax.lax.stop_gradient)
    mean1, logvar1 = stop((mean1, logvar1))
    mean2, logvar2 = flat_apply(q_z2, stop(enc["q_z2"]), z1)
  prior_mean1, prior_logvar1 = flat_apply(p_z1, dec["p_z1"], z2)
  log_q1 = log_normal(z1, mean1[None], logvar1[None])
  log_p1 = log_normal(z1, prior_mean1, prior_logvar1)
  log_q = jnp.sum(log_q1, -1) + jnp.sum(log_normal(z2, mean2, logvar2), -1)
  log_prior = jnp.sum(log_p1, -1) + jnp.sum(log_normal(z2, 0.0 * z2, 0.0 * z2), -1)
  kl2 = 0.5 * (jnp.exp(logvar2) + mean2**2 - 1.0 - logvar2)
  return (
    jnp.concatenate([z1, z2], -1),
    log_q,
    log_prior,
    jnp.concatenate([log_q1 - log_p1, kl2], -1),
  )


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_two_layer_posterior_by_hand(kind):
  model = _tiny_vae(kind, 2)
  x = _binary(4, (_BATCH, *_EVENT))
  params = model.init(jax.random.key(5), x)
  eps = jax.random.normal(jax.random.key(6), (_K, _BATCH, model.latents))
  post = model.posterior(params, x, eps)
  z, log_q, log_prior, kl = _hand_two_layer(kind, params, x, eps)
  np.testing.assert_allclose(post.z, z, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(post.log_q, log_q, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(post.log_prior, log_prior, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(post.kl_per_dim, kl, rtol=1e-5, atol=1e-5)
  # The decoder reads the bottom layer z1 only.
  changed_top = z[0].at[:, _LATENTS:].add(3.0)
  np.testing.assert_array_equal(model.decode(params, changed_top), model.decode(params, z[0]))
  # encode: z1's posterior, and q(z2 | z1) at z1's mean.
  mean, logvar = model.encode(params, x)
  zero_noise = jnp.zeros((1, _BATCH, model.latents))
  np.testing.assert_allclose(
    mean, _hand_two_layer(kind, params, x, zero_noise)[0][0], rtol=1e-5, atol=1e-6
  )
  assert np.all(np.isfinite(logvar))


def test_two_layer_stop_density_gradient_by_hand():
  """With stop_density_gradient, log q's encoder gradient flows only through z."""
  model = _tiny_vae("mlp", 2)
  x = _binary(4, (_BATCH, *_EVENT))
  params = model.init(jax.random.key(5), x)
  eps = jax.random.normal(jax.random.key(6), (_K, _BATCH, model.latents))

  def model_sum(p, stop):
    post = model.posterior(p, x, eps, stop_density_gradient=stop)
    return jnp.sum(post.log_q) + 0.3 * jnp.sum(post.log_prior)

  def hand_sum(p, stop):
    _, log_q, log_prior, _ = _hand_two_layer("mlp", p, x, eps, stop_density=stop)
    return jnp.sum(log_q) + 0.3 * jnp.sum(log_prior)

  g_stop = jax.grad(model_sum)(params, True)
  g_full = jax.grad(model_sum)(params, False)
  _assert_same_tree(g_stop, jax.grad(hand_sum)(params, True), rtol=1e-4, atol=1e-5)
  _assert_same_tree(g_full, jax.grad(hand_sum)(params, False), rtol=1e-4, atol=1e-5)
  diff = _flat(jax.tree.map(lambda a, b: (a - b)[None], g_stop["encoder"], g_full["encoder"]))
  assert np.max(np.abs(diff)) > 1e-2  # The two really differ.


def test_two_layer_kl_per_dim_is_unbiased():
  """E[sum_d kl_per_dim] = E[log q - log p]: their difference has mean zero."""
  model = _tiny_vae("mlp", 2)
  x = _binary(7, (3, *_EVENT))
  params = model.init(jax.random.key(8), x)
  num = 20000
  eps = jax.random.normal(jax.random.key(9), (num, 3, model.latents))
  post = _jit(model.posterior)(params, x, eps)
  kl_sum = _f64(jnp.sum(post.kl_per_dim, -1))
  log_ratio = _f64(post.log_q) - _f64(post.log_prior)
  diff = kl_sum - log_ratio
  assert np.all(np.std(diff, axis=0) > 1e-2)  # The top layer's KL is in closed form.
  std_err = np.std(diff, axis=0, ddof=1) / math.sqrt(num)
  assert np.all(np.abs(np.mean(diff, axis=0)) < _NUM_SIGMA * std_err), (diff.mean(0), std_err)
  # The bottom layer's terms are the single-sample estimate log q1 - log p1 itself.
  assert np.any(_f64(post.kl_per_dim[..., :_LATENTS]) < 0.0)
  # The top layer's are closed-form KLs: non-negative.
  assert np.all(_f64(post.kl_per_dim[..., _LATENTS:]) >= 0.0)


# --------------------------------------------------------------------------
# 4. One training step for every model and objective.

_OBJECTIVES = {
  "elbo": {"num_samples": _K, "objective": "elbo"},
  "iwae": {"num_samples": _K, "objective": "iwae"},
  "dreg": {"num_samples": _K, "objective": "iwae", "gradient_estimator": "dreg"},
  "free_bits": {"num_samples": _K, "objective": "elbo", "free_bits": 0.1},
}


@pytest.mark.parametrize("objective", list(_OBJECTIVES))
@pytest.mark.parametrize(("kind", "layers"), _MODELS)
def test_one_training_step(kind, layers, objective):
  model = _tiny_vae(kind, layers)
  optimizer = optax.adam(1e-3)
  x = _binary(10, (_BATCH, *_EVENT))
  options = dict(_OBJECTIVES[objective])
  num_samples, name = options.pop("num_samples"), options.pop("objective")
  loss_fn = _loss(model, 1.0, num_samples, name, **options)
  # Eager: the steps share JAX's per-operation cache; 16 jit compilations cost more.
  step = step_lib.make_train_step(loss_fn, optimizer)
  state = step_lib.initial_state(model, optimizer, jax.random.key(0), _EVENT)
  new_state, metrics = step(state, x, jax.random.key(1))
  assert set(metrics) >= {"loss", "elbo", "reconstruction", "kl", "grad_norm", "finite"}
  for key in ("loss", "elbo", "reconstruction", "kl", "grad_norm"):
    assert metrics[key].shape == () and np.isfinite(metrics[key]), key
  assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0.0
  assert int(new_state.step) == 1
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
  assert all(jax.tree.leaves(moved)), moved


def test_free_bits_loss_floors_every_dimension():
  model = _tiny_vae("mlp", 1)
  x = _binary(10, (_BATCH, *_EVENT))
  params = model.init(jax.random.key(0), x)
  key = jax.random.key(2)
  elbo = _loss(model, 0.5, _K, "elbo")
  loss, metrics = elbo(params, x, key)
  # A floor above every dimension's KL: the KL term is the constant latents * lambda.
  high = _loss(model, 0.5, _K, "elbo", free_bits=50.0)
  loss_high, metrics_high = high(params, x, key)
  np.testing.assert_allclose(
    loss_high, -metrics["reconstruction"] + 0.5 * 50.0 * model.latents, rtol=1e-6
  )
  assert float(metrics_high["kl"]) == pytest.approx(float(metrics["kl"]))  # True KL reported.
  # A floor below every dimension's KL: the plain beta-ELBO.
  low = _loss(model, 0.5, _K, "elbo", free_bits=1e-9)
  np.testing.assert_allclose(low(params, x, key)[0], loss, rtol=1e-6)


# --------------------------------------------------------------------------
# 5. Free bits.


def test_free_bits_kl_by_hand():
  """Per example: each dimension's KL where its batch mean clears the floor, else the
  floor; the batch mean of these is Kingma et al.'s sum_d max(lambda, mean_n KL_nd)."""
  kl = jnp.array([[0.1, 1.0, 0.0], [0.3, 2.0, 0.2]])  # Batch means 0.2, 1.5, 0.1.
  np.testing.assert_allclose(
    losses.free_bits_kl(kl, 0.25), [0.25 + 1.0 + 0.25, 0.25 + 2.0 + 0.25], rtol=1e-6
  )
  np.testing.assert_allclose(jnp.mean(losses.free_bits_kl(kl, 0.25)), 0.25 + 1.5 + 0.25, rtol=1e-6)
  np.testing.assert_allclose(
    losses.free_bits_kl(kl, 0.15), [0.1 + 1.0 + 0.15, 0.3 + 2.0 + 0.15], rtol=1e-6
  )
  np.testing.assert_allclose(losses.free_bits_kl(kl, 0.0), [1.1, 2.5], rtol=1e-6)
  # A leading sample axis is averaged per example; the floor is decided on the batch.
  stacked = jnp.stack([kl, 3.0 * kl])  # Per example 2 kl; batch means 0.4, 3.0, 0.2.
  np.testing.assert_allclose(
    losses.free_bits_kl(stacked, 0.3), [0.2 + 2.0 + 0.3, 0.6 + 4.0 + 0.3], rtol=1e-6
  )


def test_free_bits_kl_gradient():
  kl = jnp.array([[0.1, 1.0, 0.0], [0.3, 2.0, 0.2]])  # Batch means 0.2, 1.5, 0.1.
  grad = jax.grad(lambda a: jnp.mean(losses.free_bits_kl(a, 0.25)))(kl)
  plain = jax.grad(lambda a: jnp.mean(jnp.sum(a, -1)))(kl)
  np.testing.assert_array_equal(grad[:, [0, 2]], np.zeros((2, 2)))  # Below the floor.
  np.testing.assert_allclose(grad[:, 1], plain[:, 1], rtol=1e-6)  # Above it.
  np.testing.assert_allclose(plain, np.full((2, 3), 0.5), rtol=1e-6)


def test_free_bits_zero_is_the_batch_mean_kl():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(2, 6, 4)).astype(np.float32)
  kl_per_dim = losses.kl_divergence_per_dim(jnp.asarray(mean), jnp.asarray(logvar))
  expected = np.mean(_np_kl_per_dim(mean, logvar).sum(-1))
  np.testing.assert_allclose(jnp.mean(losses.free_bits_kl(kl_per_dim, 0.0)), expected, rtol=1e-5)
  g = jax.grad(lambda a: jnp.mean(losses.free_bits_kl(a, 0.0)))(kl_per_dim)
  np.testing.assert_allclose(g, np.full((6, 4), 1.0 / 6), rtol=1e-6)


# --------------------------------------------------------------------------
# 6. The learned Gaussian variance.


def test_gaussian_log_likelihood_learned_matches_fixed_variance():
  rng = np.random.default_rng(1)
  mean, logvar, x = rng.normal(size=(3, 2, 4, 4, 1)).astype(np.float32)
  decoded = jnp.stack([jnp.asarray(mean), jnp.asarray(logvar)], -1)
  got = losses.gaussian_log_likelihood_learned(decoded, jnp.asarray(x), event_ndims=3)
  want = losses.gaussian_log_likelihood(
    jnp.asarray(mean), jnp.asarray(x), variance=jnp.exp(jnp.asarray(logvar)), event_ndims=3
  )
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  reference = -0.5 * (
    (_f64(x) - mean) ** 2 * np.exp(-_f64(logvar)) + logvar + math.log(2.0 * math.pi)
  )
  np.testing.assert_allclose(got, reference.reshape(2, -1).sum(-1), rtol=1e-5)


@pytest.mark.parametrize(("kind", "layers"), [("mlp", 1), ("conv", 2)])
def test_learned_variance_decoder_and_training(kind, layers):
  config = config_lib.base_config()
  config.model.likelihood = "gaussian_learned"
  config.model.gaussian_variance = 0.5  # The learned variance's initial value.
  config.model.update(
    kind=kind,
    latents=_LATENTS,
    encoder_hidden=(3,),
    conv_features=(2,),
    activation="tanh",
    stochastic_layers=layers,
    top_latents=_TOP_LATENTS,
    top_hidden=(3,),
  )
  model = models.make_model(config, _EVENT)
  x = jax.random.uniform(jax.random.key(3), (4, *_EVENT))
  params = model.init(jax.random.key(0), x)
  x_decoder = params["decoder"] if layers == 1 else params["decoder"]["p_x"]
  assert x_decoder["log_variance"].shape == ()
  mean, _ = model.encode(params, x)
  decoded = model.decode(params, mean)
  assert decoded.shape == (4, *_EVENT, 2)
  # The shared log-variance, soft-bounded (the identity to ~1e-4 this far inside the bound).
  bound = networks.LOG_VARIANCE_BOUND
  expected = float(networks.soft_clamp(jnp.float32(math.log(0.5)), -bound, bound))
  np.testing.assert_allclose(decoded[..., 1], np.full((4, *_EVENT), expected), rtol=1e-6)
  np.testing.assert_allclose(expected, math.log(0.5), atol=1e-4)
  loss_fn = _loss(model, 1.0, _K, "elbo")
  grads = jax.grad(lambda p: loss_fn(p, x, jax.random.key(1))[0])(params)
  g_decoder = grads["decoder"] if layers == 1 else grads["decoder"]["p_x"]
  assert abs(float(g_decoder["log_variance"])) > 1e-3
  # A training step moves it.
  optimizer = optax.adam(1e-2)
  state = step_lib.initial_state(model, optimizer, jax.random.key(0), _EVENT)
  new_state, metrics = step_lib.make_train_step(loss_fn, optimizer)(state, x, jax.random.key(1))
  assert np.isfinite(metrics["loss"]) and bool(metrics["finite"])
  before = state.params["decoder"] if layers == 1 else state.params["decoder"]["p_x"]
  after = new_state.params["decoder"] if layers == 1 else new_state.params["decoder"]["p_x"]
  assert float(after["log_variance"]) != float(before["log_variance"])


# --------------------------------------------------------------------------
# 7. The evaluation's per-example estimator for a two-layer model.


def test_per_example_estimator_two_layers_chunking():
  model = _tiny_vae("mlp", 2)
  x = _binary(12, (3, *_EVENT))
  params = model.init(jax.random.key(13), x)
  key, indices = jax.random.key(14), jnp.arange(5, 8, dtype=jnp.int32)
  k = 20
  outs = {
    chunk: estimators.make_per_example_fn(model, num_samples=k, sample_chunk=chunk)(
      params, x, key, indices
    )
    for chunk in (7, 20)
  }
  np.testing.assert_allclose(outs[7]["log_px"], outs[20]["log_px"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[7]["kl_per_dim"], outs[20]["kl_per_dim"], rtol=1e-5, atol=1e-5)
  # By hand: example n's K samples from fold_in(key, n), as for a batch of one.
  eps = jnp.stack(
    [
      jax.random.normal(jax.random.fold_in(key, int(n)), (k, 1, model.latents))[:, 0]
      for n in indices
    ],
    axis=1,
  )
  post = model.posterior(params, x, eps)
  log_px_z = losses.sample_log_likelihoods(
    post.z, x, functools.partial(model.decode, params), _BERNOULLI
  )
  log_w = _f64(log_px_z + post.log_prior - post.log_q)
  np.testing.assert_allclose(outs[7]["log_px"], _np_logsumexp(log_w) - math.log(k), rtol=1e-5)
  np.testing.assert_allclose(outs[7]["reconstruction"], _f64(log_px_z).mean(0), rtol=1e-5)
  assert np.all(_f64(outs[7]["log_px"]) >= log_w.mean(0))
  assert np.all(_f64(outs[7]["log_px"]) > log_w.mean(0) + 1e-3)
  assert np.all((_f64(outs[7]["ess"]) >= 1.0 - 1e-4) & (_f64(outs[7]["ess"]) <= k + 1e-3))


# --------------------------------------------------------------------------
# One source of truth: the train step differentiates the public ELBO.


def test_train_step_differentiates_exactly_the_public_elbo(monkeypatch):
  """Same code path (losses.elbo is what the traced step calls), same value, same gradient."""
  config = config_lib.base_config()
  config_lib.shrink_for_smoke(config)
  config.beta = 0.7
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 1.0  # update = -gradient
  calls = []
  real_elbo = losses.elbo

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return real_elbo(*args, **kwargs)

  monkeypatch.setattr(losses, "elbo", spy)
  built = trainer.build_trainer(config, (28, 28, 1), 4 * config.batch_size)
  state = built.init_state()
  x = _binary(11, (config.batch_size, 28, 28, 1))
  key = built.keys[step_lib.KEY_EPS]
  new_state, metrics = jax.jit(built.train_step)(state, x, key)
  assert len(calls) == 1 and calls[0]["beta"] == 0.7 and calls[0]["num_samples"] == 1
  monkeypatch.setattr(losses, "elbo", real_elbo)

  model, params = built.model, state.params
  ll_fn = functools.partial(losses.bernoulli_log_likelihood, event_ndims=3)

  @jax.jit
  def public_loss(params):
    mean, logvar = model.encode(params, x)
    decode = functools.partial(model.decode, params)
    step_key = jax.random.fold_in(key, 0)  # The step folds its number into the key.
    out = losses.elbo(step_key, x, mean, logvar, decode, ll_fn, beta=0.7, num_samples=1)
    return -jnp.mean(out.elbo)

  loss, grads = jax.value_and_grad(public_loss)(params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  applied = jax.tree.map(lambda a, b: a - b, params, new_state.params)
  _assert_same_tree(applied, grads, rtol=1e-5, atol=1e-7)


def test_hierarchical_elbo_is_assembled_by_the_public_functions():
  """A two-layer model's ELBO is losses.elbo_from_terms of its posterior's Monte Carlo terms."""
  model = _tiny_vae("mlp", 2)
  x = _binary(4, (_BATCH, *_EVENT))
  params = model.init(jax.random.key(5), x)
  key = jax.random.key(6)
  out = objectives.elbo(model, params, x, key, beta=0.3, num_samples=_K)
  eps = losses.sample_eps(key, (_K, _BATCH, model.latents))
  lw = models.log_weights(model, params, x, eps)
  rec, kl = jnp.mean(lw.log_px_z, 0), jnp.mean(lw.posterior.kl, 0)
  np.testing.assert_array_equal(out.elbo, losses.elbo_from_terms(rec, kl, 0.3))
  np.testing.assert_allclose(out.elbo, rec - 0.3 * kl, rtol=1e-6)


def test_beta_tcvae_is_the_elbo_minus_beta_minus_one_times_the_mws_total_correlation():
  from vae_jax import total_correlation

  model = _tiny_vae("mlp", 1)
  x = _binary(4, (_BATCH, *_EVENT))
  params = model.init(jax.random.key(5), x)
  key = jax.random.key(6)
  for beta in (1.0, 3.0):
    spec = objectives.Spec(objective="beta_tcvae", dataset_size=1000)
    loss, metrics = objectives.make_loss_fn(model, spec, beta)(params, x, key, 0)
    eps = losses.sample_eps(key, (1, _BATCH, model.latents))
    post = model.posterior(params, x, eps)
    mean, logvar = model.encode(params, x)
    rec = losses.sample_log_likelihoods(
      post.z, x, functools.partial(model.decode, params), _BERNOULLI
    )
    tc = total_correlation.total_correlation_mws(post.z[0], mean, logvar, 1000)
    elbo = jnp.mean(rec[0] - post.kl[0])
    np.testing.assert_allclose(loss, -elbo + (beta - 1.0) * jnp.mean(tc), rtol=1e-5)
    np.testing.assert_allclose(metrics["elbo"], elbo, rtol=1e-5)
  config = config_lib.base_config()
  config.objective, config.model.stochastic_layers = "beta_tcvae", 2
  with pytest.raises(ValueError, match="beta_tcvae"):
    config_lib.validate(config)


def test_public_dreg_bound_is_the_training_objectives_value_and_gradient():
  """losses.iw_bound_dreg, for a user's own encoder and decoder, is exactly what
  objective='iwae' with gradient_estimator='dreg' trains: the same value (iw_bound's for
  the same key) and the same gradient."""
  model = models.make_mlp_vae((4,), 2, encoder_hidden=(3,), activation="tanh")
  x = _binary(2, (_BATCH, 4))
  params = model.init(jax.random.key(0), x)
  key = jax.random.key(9)
  trained = _loss(model, 1.0, _K, "iwae", gradient_estimator="dreg")

  def public(params):
    mean, logvar = model.encode(params, x)
    decode = lambda dec, z: model.decode({"decoder": dec}, z)  # noqa: E731
    bound = losses.iw_bound_dreg(
      key, x, mean, logvar, decode, params["decoder"], model.likelihood, num_samples=_K
    )
    return -jnp.mean(bound)

  value, grads = jax.value_and_grad(public)(params)
  (want, _), want_grads = jax.value_and_grad(trained, has_aux=True)(params, x, key)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  _assert_same_tree(grads, want_grads, rtol=1e-5, atol=1e-7)
  mean, logvar = model.encode(params, x)
  plain = losses.iw_bound(
    key, x, mean, logvar, functools.partial(model.decode, params), num_samples=_K
  )
  np.testing.assert_allclose(value, -jnp.mean(plain), rtol=1e-6)
