"""Images decoded from chosen latents: interpolations, traversals, the latent plane.

Pure functions from arrays to arrays. Grids of small images come back as
``[n, h, w, c]`` floats in [0, 1], to be tiled with ``writers.image_grid`` (for
TensorBoard) or laid out and labelled by ``vae_jax.figures`` (matplotlib, for
papers). The model enters only as ``decode_mean``, a function from latents
``[n, latent]`` to mean images ``[n, h, w, c]`` in [0, 1]: this module knows
nothing of Flax, checkpoints or files; ``evaluate.py`` decides what to draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# [n, latent] -> [n, h, w, c] mean images in [0, 1].
DecodeMeanFn = Callable[[np.ndarray], np.ndarray]

# --------------------------------------------------------------------------
# Images decoded from chosen latents.


def interpolation_images(
  decode_mean: DecodeMeanFn,
  z_a: np.ndarray,
  z_b: np.ndarray,
  x_a: np.ndarray,
  x_b: np.ndarray,
  num_steps: int = 10,
) -> np.ndarray:
  """Rows ``x_a, decode((1 - t) z_a + t z_b) for t in linspace(0, 1, num_steps), x_b``.

  Args:
    decode_mean: latents -> mean images.
    z_a: ``[pairs, latent]`` latents of the first images (e.g. posterior means).
    z_b: ``[pairs, latent]`` latents of the second images.
    x_a: ``[pairs, h, w, c]`` the first images, shown at the left end.
    x_b: ``[pairs, h, w, c]`` the second images, shown at the right end.
    num_steps: decoded points per pair, both ends included.

  Returns:
    ``[pairs * (num_steps + 2), h, w, c]`` in row order: tile with
    ``columns=num_steps + 2``.
  """
  z_a, z_b = np.asarray(z_a, np.float32), np.asarray(z_b, np.float32)
  if z_a.shape != z_b.shape or z_a.ndim != 2:
    raise ValueError(f"z_a and z_b must both be [pairs, latent], got {z_a.shape}, {z_b.shape}.")
  pairs, latent = z_a.shape
  t = np.linspace(0.0, 1.0, num_steps, dtype=np.float32)[None, :, None]
  z = (1.0 - t) * z_a[:, None] + t * z_b[:, None]  # [pairs, steps, latent]
  decoded = np.asarray(decode_mean(z.reshape(pairs * num_steps, latent)))
  decoded = decoded.reshape(pairs, num_steps, *decoded.shape[1:])
  rows = np.concatenate([np.asarray(x_a)[:, None], decoded, np.asarray(x_b)[:, None]], axis=1)
  return rows.reshape(pairs * (num_steps + 2), *rows.shape[2:])


def traversal_images(
  decode_mean: DecodeMeanFn,
  z_base: np.ndarray,
  dims: Sequence[int],
  values: np.ndarray,
) -> np.ndarray:
  """Sweeps one latent dimension at a time, the others held at ``z_base``.

  Args:
    decode_mean: latents -> mean images.
    z_base: ``[latent]`` the point held fixed (e.g. a test image's posterior mean).
    dims: the dimensions to sweep, one row each.
    values: ``[len(dims), steps]`` the values each swept dimension takes.

  Returns:
    ``[len(dims) * steps, h, w, c]``, row ``i`` sweeping ``dims[i]``: tile with
    ``columns=steps``.
  """
  z_base = np.asarray(z_base, np.float32)
  values = np.asarray(values, np.float32)
  if z_base.ndim != 1 or values.shape[0] != len(dims) or values.ndim != 2:
    raise ValueError(
      f"z_base must be [latent] and values [len(dims)={len(dims)}, steps]; got "
      f"{z_base.shape} and {values.shape}."
    )
  steps = values.shape[1]
  z = np.tile(z_base, (len(dims), steps, 1))  # [rows, steps, latent]
  for row, d in enumerate(dims):
    z[row, :, d] = values[row]
  return np.asarray(decode_mean(z.reshape(len(dims) * steps, z_base.shape[0])))


def manifold_latents(xlim: tuple[float, float], ylim: tuple[float, float], n: int) -> np.ndarray:
  """Centres of an ``n x n`` grid of cells over the plane, in image order.

  Row 0 is the top (largest ``y``), column 0 the left (smallest ``x``), so the
  decoded images tiled with ``columns=n`` line up with a plot of the same limits.

  Returns:
    ``[n * n, 2]`` latents.
  """
  xs = xlim[0] + (np.arange(n) + 0.5) * (xlim[1] - xlim[0]) / n
  ys = ylim[1] - (np.arange(n) + 0.5) * (ylim[1] - ylim[0]) / n
  grid_x, grid_y = np.meshgrid(xs, ys)
  return np.stack([grid_x.ravel(), grid_y.ravel()], axis=-1).astype(np.float32)


def data_limits(
  points: np.ndarray, low: float = 0.5, high: float = 99.5, margin: float = 0.05
) -> tuple[tuple[float, float], tuple[float, float]]:
  """Axis limits holding the central ``high - low`` percent of ``points: [n, 2]``.

  Percentiles, not extremes, so a few outliers do not shrink everyone else to a
  dot; ``margin`` (a fraction of the range) keeps points off the frame.
  """
  points = np.asarray(points, np.float64)
  limits = []
  for axis in range(2):
    lo, hi = np.percentile(points[:, axis], [low, high])
    if hi - lo < 1e-6:  # A collapsed axis still gets a visible range.
      lo, hi = lo - 1.0, hi + 1.0
    pad = margin * (hi - lo)
    limits.append((float(lo - pad), float(hi + pad)))
  return limits[0], limits[1]


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement of ``[H, W, c]`` by an integer ``factor``."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)
