"""Models: shapes, the Flax example's architecture, the log-variance bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import models, networks


def test_default_is_the_flax_example_architecture():
  model = models.make_mlp_vae(event_shape=(28, 28, 1), latents=20)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  shapes = jax.tree.map(lambda p: p.shape, params)
  assert shapes["encoder"]["hidden_0"]["kernel"] == (784, 500)
  assert shapes["encoder"]["mean"]["kernel"] == (500, 20)
  assert shapes["encoder"]["logvar"]["kernel"] == (500, 20)
  assert shapes["decoder"]["hidden_0"]["kernel"] == (20, 500)
  assert shapes["decoder"]["output"]["kernel"] == (500, 784)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  assert num_params == (784 * 500 + 500) + 2 * (500 * 20 + 20) + (20 * 500 + 500) + (
    500 * 784 + 784
  )


def test_encode_decode_shapes_and_purity():
  model = models.make_mlp_vae(event_shape=(6, 5, 1), latents=3, encoder_hidden=(8, 7))
  params = model.init(jax.random.key(0), jnp.zeros((2, 6, 5, 1)))
  x = jax.random.uniform(jax.random.key(1), (4, 6, 5, 1))
  mean, logvar = model.encode(params, x)
  assert mean.shape == logvar.shape == (4, 3)
  out = model.decode(params, mean)
  assert out.shape == (4, 6, 5, 1)
  # Pure: same inputs, same outputs; jit agrees with eager.
  np.testing.assert_array_equal(model.encode(params, x)[0], mean)
  np.testing.assert_allclose(jax.jit(model.decode)(params, mean), out, rtol=1e-6, atol=1e-6)
  # Decoder widths mirror the encoder's by default.
  assert params["decoder"]["hidden_0"]["kernel"].shape == (3, 7)
  assert params["decoder"]["hidden_1"]["kernel"].shape == (7, 8)


def test_wrong_image_shape_is_a_clear_error():
  model = models.make_mlp_vae(event_shape=(28, 28, 1), latents=2, encoder_hidden=(4,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match=r"built for examples of shape \(28, 28, 1\)"):
    model.encode(params, jnp.zeros((3, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"decode expects z of shape \[batch, 2\]"):
    model.decode(params, jnp.zeros((3, 5)))


def test_unknown_activation():
  with pytest.raises(ValueError, match=r"config.model.activation='sigmoidish' is not one of"):
    models.make_mlp_vae(event_shape=(4,), latents=2, activation="sigmoidish")


@pytest.mark.parametrize("x", [-1e4, -100.0, -35.0, -5.0, 0.0, 5.0, 35.0, 100.0, 1e4])
def test_soft_clamp_bounds_and_is_identity_inside(x):
  y = float(networks.soft_clamp(jnp.float32(x), -30.0, 30.0))
  g = float(jax.grad(lambda v: networks.soft_clamp(v, -30.0, 30.0))(jnp.float32(x)))
  assert -30.0 <= y <= 30.0
  assert np.isfinite(g) and g >= 0.0
  if abs(x) <= 5:
    assert y == pytest.approx(x, rel=1e-6, abs=1e-12)
    assert g == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("x", [1e-7, -3e-5, 1e-3, 0.25, -2.0, 12.0])
def test_soft_clamp_keeps_small_log_variances_exact(x):
  """Inactive units sit at logvar ~ 0; the clamp must not quantize them."""
  y = float(networks.soft_clamp(jnp.float32(x), -30.0, 30.0))
  assert y == pytest.approx(np.float32(x), rel=1e-6)


def test_encoder_logvar_is_bounded_for_extreme_inputs():
  model = models.make_mlp_vae(event_shape=(4,), latents=2, encoder_hidden=(3,), logvar_bound=10.0)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  _, logvar = model.encode(params, jnp.full((2, 4), 1e6))
  assert np.all(np.abs(np.asarray(logvar)) <= 10.0)


# --------------------------------------------------------------------------
# The VampPrior paper's building blocks: gated units, clipped log-variances,
# He initialization, the VampPrior and the two-layer hierarchy q(z2|x) q(z1|x,z2).

_EVENT = (4, 4, 1)


def _log_normal(z, mean, logvar):
  """log N(z | mean, exp(logvar)) per dimension, in float64, by hand."""
  z, mean, logvar = (np.asarray(a, np.float64) for a in (z, mean, logvar))
  return -0.5 * ((z - mean) ** 2 * np.exp(-logvar) + logvar + np.log(2.0 * np.pi))


def _logsumexp(a, axis):
  m = np.max(a, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def test_gated_dense_layers_by_hand():
  model = models.make_vae((5,), 2, encoder_hidden=(3,), gated=True, logvar_clip=(-6.0, 2.0))
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))
  enc = params["encoder"]
  assert set(enc) == {"hidden_0", "gate_0", "mean", "logvar"}
  x = jax.random.uniform(jax.random.key(1), (4, 5))

  def dense(p, h):
    return np.asarray(h, np.float64) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])

  h = dense(enc["hidden_0"], x) / (1.0 + np.exp(-dense(enc["gate_0"], x)))  # No activation.
  mean, logvar = model.encode(params, x)
  np.testing.assert_allclose(mean, dense(enc["mean"], h), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logvar, np.clip(dense(enc["logvar"], h), -6, 2), rtol=1e-5, atol=1e-6)


def test_logvar_clip_is_the_hardtanh_range():
  model = models.make_vae((4,), 2, encoder_hidden=(3,), logvar_clip=(-6.0, 2.0))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  for scale in (1e6, -1e6):
    _, logvar = model.encode(params, jnp.full((2, 4), scale))
    assert np.all(np.asarray(logvar) >= -6.0) and np.all(np.asarray(logvar) <= 2.0)
    assert np.any(np.isin(np.asarray(logvar), [-6.0, 2.0]))  # Reached, not approached.
  with pytest.raises(ValueError, match="low < high"):
    models.make_vae((4,), 2, logvar_clip=(2.0, -6.0))


def test_he_normal_initialization_has_variance_two_over_fan_in():
  model = models.make_vae((784,), 40, encoder_hidden=(300,), kernel_init="he_normal")
  params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
  kernel = np.asarray(params["encoder"]["hidden_0"]["kernel"], np.float64)  # 235,200 draws.
  # The sample std of n normal draws has relative standard error 1 / sqrt(2n) = 0.15%.
  assert np.std(kernel) == pytest.approx(np.sqrt(2.0 / 784), rel=0.01)
  assert np.abs(kernel).max() > 3.5 * np.sqrt(2.0 / 784)  # Untruncated, unlike lecun_normal.


def test_vampprior_density_by_hand():
  model = models.make_vae(
    _EVENT, 2, encoder_hidden=(3,), prior="vampprior", num_pseudo_inputs=5,
    pseudo_inputs_init=(0.5, 0.6),
  )  # fmt: skip
  x = (jax.random.uniform(jax.random.key(1), (3, *_EVENT)) > 0.5).astype(jnp.float32)
  params = model.init(jax.random.key(0), x)
  raw = params["decoder"]["p_z"]["pseudo_inputs"]
  assert raw.shape == (5, *_EVENT)
  assert np.any(np.asarray(raw) < 0) or np.any(np.asarray(raw) > 1)  # Clipping matters here.
  u = jnp.clip(raw, 0.0, 1.0)
  eps = jax.random.normal(jax.random.key(2), (4, 3, 2))
  post = model.posterior(params, x, eps)
  mean, logvar = model.encode(params, x)
  z = np.asarray(mean)[None] + np.exp(0.5 * np.asarray(logvar))[None] * np.asarray(eps)
  np.testing.assert_allclose(post.z, z, rtol=1e-5, atol=1e-6)
  u_mean, u_logvar = model.encode(params, u)  # The components: q(z | u_c).
  per_c = _log_normal(z[:, :, None, :], u_mean[None, None], u_logvar[None, None]).sum(-1)
  log_prior = _logsumexp(per_c, -1) - np.log(5)
  np.testing.assert_allclose(post.log_prior, log_prior, rtol=1e-5, atol=1e-5)
  log_q = _log_normal(z, mean[None], logvar[None]).sum(-1)
  np.testing.assert_allclose(post.log_q, log_q, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(post.kl, log_q - log_prior, rtol=1e-5, atol=1e-4)
  assert post.kl_per_dim is None and not model.closed_form_kl
  # The pseudo-inputs are learned: the prior density depends on them.
  grad = jax.grad(lambda p: jnp.sum(model.posterior(p, x, eps).log_prior))(params)
  assert np.any(np.asarray(grad["decoder"]["p_z"]["pseudo_inputs"]) != 0.0)
  samples = model.sample_prior(params, jax.random.key(3), 6)
  assert samples.shape == (6, 2) and np.all(np.isfinite(samples))


@pytest.mark.parametrize("prior", ["standard", "vampprior"])
def test_vampprior_hierarchy_by_hand(prior):
  """q(z2|x) q(z1|x,z2), p(z2) p(z1|z2) p(x|z1,z2) from the Flax networks, densities by hand."""
  from vae_jax import networks

  l1, l2 = 2, 3
  model = models.make_vae(
    _EVENT, l1, encoder_hidden=(4, 5), decoder_hidden=(6, 7), top_hidden=(3,),
    stochastic_layers=2, hierarchy="vampprior", top_latents=l2, gated=True,
    logvar_clip=(-6.0, 2.0), prior=prior, num_pseudo_inputs=4,
  )  # fmt: skip
  assert (model.latents, model.layer_latents, model.decoder_reads) == (5, (2, 3), 5)
  x = (jax.random.uniform(jax.random.key(1), (3, *_EVENT)) > 0.5).astype(jnp.float32)
  params = model.init(jax.random.key(0), x)
  opts = {"gated": True, "logvar_clip": (-6.0, 2.0)}
  q_z2 = networks.Encoder((4, 5), l2, **opts)
  q_z1 = networks.JointEncoder((4,), (4,), (5,), l1, **opts)
  p_z1 = networks.Encoder((3,), l1, **opts)
  p_x = networks.JointDecoder((6,), (6,), (7,), _EVENT, gated=True)
  enc, dec = params["encoder"], params["decoder"]
  k = 2
  eps = jax.random.normal(jax.random.key(2), (k, 3, l1 + l2))
  m2, lv2 = q_z2.apply({"params": enc["q_z2"]}, x)
  z2 = np.asarray(m2)[None] + np.exp(0.5 * np.asarray(lv2))[None] * np.asarray(eps[..., l1:])
  m1, lv1 = (
    np.stack(a)
    for a in zip(*[q_z1.apply({"params": enc["q_z1"]}, x, z2[i]) for i in range(k)], strict=True)
  )
  z1 = m1 + np.exp(0.5 * lv1) * np.asarray(eps[..., :l1])
  pm1, plv1 = (
    np.stack(a)
    for a in zip(*[p_z1.apply({"params": dec["p_z1"]}, z2[i]) for i in range(k)], strict=True)
  )  # noqa: E501
  if prior == "standard":
    log_p2 = _log_normal(z2, 0.0, 0.0).sum(-1)
  else:
    u = jnp.clip(dec["p_z2"]["pseudo_inputs"], 0.0, 1.0)
    um, ulv = q_z2.apply({"params": enc["q_z2"]}, u)
    log_p2 = _logsumexp(_log_normal(z2[:, :, None], um[None, None], ulv[None, None]).sum(-1), -1)
    log_p2 = log_p2 - np.log(4)
  post = model.posterior(params, x, eps)
  log_q = _log_normal(z1, m1, lv1).sum(-1) + _log_normal(z2, m2[None], lv2[None]).sum(-1)
  log_p = _log_normal(z1, pm1, plv1).sum(-1) + log_p2
  np.testing.assert_allclose(post.z, np.concatenate([z1, z2], -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(post.log_q, log_q, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(post.log_prior, log_p, rtol=1e-5, atol=1e-4)
  # The KL estimate: single-sample for z1 (and the VampPrior's z2), closed form for N(0, I).
  kl2 = (
    (0.5 * (np.exp(lv2) + np.asarray(m2) ** 2 - 1 - lv2)).sum(-1)[None]
    if prior == "standard"
    else _log_normal(z2, m2[None], lv2[None]).sum(-1) - log_p2
  )
  kl = _log_normal(z1, m1, lv1).sum(-1) - _log_normal(z1, pm1, plv1).sum(-1) + kl2
  np.testing.assert_allclose(post.kl, kl, rtol=1e-5, atol=1e-4)
  assert (post.kl_per_dim is None) == (prior == "vampprior")
  # p(x | z1, z2) reads both layers.
  z = jnp.asarray(np.concatenate([z1, z2], -1)[0], jnp.float32)
  expected = p_x.apply({"params": dec["p_x"]}, z[:, :l1], z[:, l1:])
  np.testing.assert_allclose(model.decode(params, z), expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(model.decode(params, z.at[:, l1:].add(3.0)), expected)
  # encode: the mean path, mean2 from q(z2|x), then q(z1|x, z2 = mean2).
  mean, _ = model.encode(params, x)
  hand_m1, _ = q_z1.apply({"params": enc["q_z1"]}, x, m2)
  np.testing.assert_allclose(mean, np.concatenate([hand_m1, m2], -1), rtol=1e-5, atol=1e-6)
  assert model.sample_prior(params, jax.random.key(3), 4).shape == (4, 5)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"prior": "vampprior", "stochastic_layers": 2}, "needs model.hierarchy='vampprior'"),
    ({"gated": True, "kind": "conv"}, "gated=True is for model.kind='mlp'"),
    ({"prior": "flat"}, r"config.model.prior='flat' is not one of"),
    ({"kernel_init": "zeros"}, r"config.model.kernel_init='zeros' is not one of"),
    ({"latents": 0}, r"config.model.latents=0 is out of range"),
  ],
)
def test_inconsistent_model_options_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.make_vae((4, 4, 1), **{"latents": 2, **kwargs})
