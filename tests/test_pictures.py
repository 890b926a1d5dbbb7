"""Pictures: sizes, where things land, and what each row or cell shows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import baselines, datasets, figures, models, pictures, writers


def _coordinate_decoder(z):
  """[n, 2] -> [n, 4, 4, 1] images whose pixel (0, 0) holds z0 and (0, 1) holds z1."""
  z = np.asarray(z)
  images = np.zeros((len(z), 4, 4, 1), np.float32)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = z[:, 0], z[:, 1]
  return images


def test_interpolation_rows():
  z_a, z_b = np.array([[0.0, 1.0], [2.0, 2.0]]), np.array([[1.0, 0.0], [4.0, -2.0]])
  x_a, x_b = np.full((2, 4, 4, 1), 0.25), np.full((2, 4, 4, 1), 0.75)
  out = pictures.interpolation_images(_coordinate_decoder, z_a, z_b, x_a, x_b, num_steps=5)
  assert out.shape == (2 * 7, 4, 4, 1)
  rows = out.reshape(2, 7, 4, 4, 1)
  np.testing.assert_array_equal(rows[:, 0], x_a)
  np.testing.assert_array_equal(rows[:, -1], x_b)
  np.testing.assert_allclose(rows[:, 1, 0, :2, 0], z_a)  # t = 0
  np.testing.assert_allclose(rows[:, 5, 0, :2, 0], z_b)  # t = 1
  np.testing.assert_allclose(rows[1, 3, 0, :2, 0], [3.0, 0.0])  # t = 1/2: the midpoint.


def test_traversal_sweeps_one_dimension_per_row():
  z_base = np.array([0.5, -0.5])
  values = np.array([[-1.0, 0.0, 1.0], [7.0, 8.0, 9.0]])
  out = pictures.traversal_images(_coordinate_decoder, z_base, [1, 0], values)
  assert out.shape == (6, 4, 4, 1)
  codes = out[:, 0, :2, 0].reshape(2, 3, 2)
  np.testing.assert_allclose(codes[0], [[0.5, -1.0], [0.5, 0.0], [0.5, 1.0]])  # Sweeps z1.
  np.testing.assert_allclose(codes[1], [[7.0, -0.5], [8.0, -0.5], [9.0, -0.5]])  # Sweeps z0.


def test_manifold_latents_are_in_image_order():
  z = pictures.manifold_latents((0.0, 3.0), (10.0, 13.0), 3)
  assert z.shape == (9, 2)
  np.testing.assert_allclose(z[0], [0.5, 12.5])  # Top left: smallest x, largest y.
  np.testing.assert_allclose(z[2], [2.5, 12.5])  # Top right.
  np.testing.assert_allclose(z[6], [0.5, 10.5])  # Bottom left.


def test_data_limits_ignore_outliers():
  points = np.concatenate([np.random.default_rng(0).uniform(-1, 1, (1000, 2)), [[1e6, -1e6]]])
  (x0, x1), (y0, y1) = pictures.data_limits(points)
  assert -1.2 < x0 < -0.9 and 0.9 < x1 < 1.2 and -1.2 < y0 < -0.9 and 0.9 < y1 < 1.2


def test_latent_map_figure_from_a_tiny_model():
  """The decoded latent plane lines up with the scatter plots' limits (matplotlib figure)."""
  model = models.make_mlp_vae(event_shape=(28, 28, 1), latents=2, encoder_hidden=(8,))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  x = (np.random.default_rng(1).uniform(size=(50, 28, 28, 1)) < 0.3).astype(np.float32)
  codes = np.asarray(jax.jit(model.encode)(params, x)[0])
  labels = np.arange(50) % 10
  decode = jax.jit(lambda z: model.likelihood.mean(model.decode(params, z)))

  def decode_mean(z):
    return np.asarray(decode(np.asarray(z, np.float32)))

  limits = pictures.data_limits(codes)
  manifold = writers.image_grid(decode_mean(pictures.manifold_latents(*limits, 5)), 5, pad=0)
  assert manifold.shape == (140, 140, 1)
  pca = baselines.fit_pca(np.asarray(x).reshape(50, -1), 2)
  figure = figures.latent_map_figure(
    codes,
    pca.project(np.asarray(x).reshape(50, -1)),
    labels,
    manifold,
    latent_limits=limits,
    class_names=datasets.class_names("fashion_mnist"),
  )
  scatter, _, plane = figure.axes[:3]
  assert scatter.get_xlim() == pytest.approx(limits[0]) and plane.get_xlim() == pytest.approx(
    limits[0]
  )
  assert len(scatter.collections[0].get_offsets()) == 50
