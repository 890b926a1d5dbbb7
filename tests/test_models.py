"""Models: shapes, the Flax example's architecture, the log-variance bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import models


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
  with pytest.raises(ValueError, match="Unknown activation 'sigmoidish'"):
    models.make_mlp_vae(event_shape=(4,), latents=2, activation="sigmoidish")


@pytest.mark.parametrize("x", [-1e4, -100.0, -35.0, -5.0, 0.0, 5.0, 35.0, 100.0, 1e4])
def test_soft_clamp_bounds_and_is_identity_inside(x):
  y = float(models.soft_clamp(jnp.float32(x), -30.0, 30.0))
  g = float(jax.grad(lambda v: models.soft_clamp(v, -30.0, 30.0))(jnp.float32(x)))
  assert -30.0 <= y <= 30.0
  assert np.isfinite(g) and g >= 0.0
  if abs(x) <= 5:
    assert y == pytest.approx(x, rel=1e-6, abs=1e-12)
    assert g == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("x", [1e-7, -3e-5, 1e-3, 0.25, -2.0, 12.0])
def test_soft_clamp_keeps_small_log_variances_exact(x):
  """Inactive units sit at logvar ~ 0; the clamp must not quantize them."""
  y = float(models.soft_clamp(jnp.float32(x), -30.0, 30.0))
  assert y == pytest.approx(np.float32(x), rel=1e-6)


def test_encoder_logvar_is_bounded_for_extreme_inputs():
  model = models.make_mlp_vae(event_shape=(4,), latents=2, encoder_hidden=(3,), logvar_bound=10.0)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  _, logvar = model.encode(params, jnp.full((2, 4), 1e6))
  assert np.all(np.abs(np.asarray(logvar)) <= 10.0)
