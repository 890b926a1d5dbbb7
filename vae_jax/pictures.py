"""Pictures of a trained model for people: interpolations, traversals, latent maps.

Pure functions from arrays to images. Grids of small images come back as
``[n, h, w, c]`` floats in [0, 1], to be tiled with ``writers.image_grid``;
figures drawn here with Pillow (scatter plots, labelled grids) come back as
``[H, W, 3]`` uint8 RGB. The model enters only as ``decode_mean``, a function
from latents ``[n, latent]`` to mean images ``[n, h, w, c]`` in [0, 1]: this
module knows nothing of Flax, checkpoints or files; ``evaluate.py`` decides
what to draw and where it goes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# [n, latent] -> [n, h, w, c] mean images in [0, 1].
DecodeMeanFn = Callable[[np.ndarray], np.ndarray]

# Label names for legends (index = label).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
  "mnist": tuple(str(d) for d in range(10)),
  "fashion_mnist": (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
  ),
}

# Ten colours that stay distinguishable on white (the "Tableau 10" palette).
PALETTE: tuple[tuple[int, int, int], ...] = (
  (31, 119, 180),
  (255, 127, 14),
  (44, 160, 44),
  (214, 39, 40),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (127, 127, 127),
  (188, 189, 34),
  (23, 190, 207),
)

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GREY = (120, 120, 120)


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


# --------------------------------------------------------------------------
# Drawing with Pillow.


def _font(size: int) -> ImageFont.ImageFont:
  try:  # Pillow >= 10.1 ships a scalable default font.
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):
    return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
  left, top, right, bottom = font.getbbox(text)
  return right - left, bottom - top


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
  """Round tick values (steps of 1, 2 or 5 times a power of ten) inside ``[lo, hi]``."""
  span = hi - lo
  if not span > 0:
    return [lo]
  raw = span / max(max_ticks - 1, 1)
  power = 10.0 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.ceil(lo / step)
  ticks = [k * step for k in range(first, math.floor(hi / step) + 1)]
  return [round(t, 10) for t in ticks]


def _format_tick(value: float) -> str:
  return f"{value:g}"


class _Axes:
  """A square plot box inside a canvas with room for ticks, labels and a title."""

  left, right, top, bottom = 52, 12, 30, 44

  def __init__(self, size: int, xlim, ylim):
    if not (xlim[1] > xlim[0] and ylim[1] > ylim[0]):
      raise ValueError(f"Limits must be increasing, got xlim={xlim}, ylim={ylim}.")
    self.size, self.xlim, self.ylim = size, xlim, ylim
    self.image = Image.new("RGB", (self.left + size + self.right, self.top + size + self.bottom))
    self.image.paste(_WHITE, (0, 0, *self.image.size))
    self.draw = ImageDraw.Draw(self.image)

  def to_pixels(self, points: np.ndarray) -> np.ndarray:
    """``[n, 2]`` data coordinates -> ``[n, 2]`` (column, row) pixel coordinates."""
    (x0, x1), (y0, y1) = self.xlim, self.ylim
    cols = self.left + (points[:, 0] - x0) / (x1 - x0) * self.size
    rows = self.top + (y1 - points[:, 1]) / (y1 - y0) * self.size
    return np.stack([cols, rows], axis=-1)

  def finish(self, title: str, xlabel: str, ylabel: str) -> np.ndarray:
    d, size = self.draw, self.size
    box = (self.left, self.top, self.left + size, self.top + size)
    d.rectangle(box, outline=_BLACK)
    tick_font, label_font = _font(11), _font(13)
    for value in nice_ticks(*self.xlim):
      col = self.to_pixels(np.array([[value, self.ylim[0]]]))[0, 0]
      d.line([(col, box[3]), (col, box[3] + 4)], fill=_BLACK)
      text = _format_tick(value)
      w, _ = _text_size(tick_font, text)
      d.text((col - w / 2, box[3] + 6), text, fill=_BLACK, font=tick_font)
    for value in nice_ticks(*self.ylim):
      row = self.to_pixels(np.array([[self.xlim[0], value]]))[0, 1]
      d.line([(box[0] - 4, row), (box[0], row)], fill=_BLACK)
      text = _format_tick(value)
      w, h = _text_size(tick_font, text)
      d.text((box[0] - 6 - w, row - h / 2 - 2), text, fill=_BLACK, font=tick_font)
    w, _ = _text_size(label_font, xlabel)
    d.text((self.left + (size - w) / 2, box[3] + 24), xlabel, fill=_BLACK, font=label_font)
    w, h = _text_size(label_font, ylabel)
    label = Image.new("RGB", (w + 4, h + 6), _WHITE)
    ImageDraw.Draw(label).text((2, 0), ylabel, fill=_BLACK, font=label_font)
    label = label.rotate(90, expand=True)
    self.image.paste(label, (2, self.top + (size - label.size[1]) // 2))
    w, _ = _text_size(label_font, title)
    d.text((self.left + (size - w) / 2, 8), title, fill=_BLACK, font=label_font)
    return np.asarray(self.image)


def scatter_plot(
  points: np.ndarray,
  labels: np.ndarray,
  *,
  xlim: tuple[float, float],
  ylim: tuple[float, float],
  title: str = "",
  xlabel: str = "",
  ylabel: str = "",
  size: int = 400,
  radius: float | None = None,
) -> np.ndarray:
  """Points coloured by integer label, drawn on axes with ticks: ``[H, W, 3]`` uint8.

  Args:
    points: ``[n, 2]`` coordinates; points outside the limits are left out.
    labels: ``[n]`` integer labels; label ``k`` gets ``PALETTE[k % 10]``.
    xlim, ylim: the plotted ranges.
    title, xlabel, ylabel: text drawn around the plot.
    size: side of the square plot box, in pixels.
    radius: dot radius in pixels (default: smaller for more points).

  Points are drawn in a fixed random order, so no class is systematically
  hidden under another.
  """
  points, labels = np.asarray(points, np.float64), np.asarray(labels)
  if points.ndim != 2 or points.shape[1] != 2 or labels.shape != points.shape[:1]:
    raise ValueError(f"points must be [n, 2] and labels [n]; got {points.shape}, {labels.shape}.")
  if radius is None:
    radius = 1.5 if len(points) > 2000 else 2.5
  axes = _Axes(size, xlim, ylim)
  pixels = axes.to_pixels(points)
  inside = (
    (points[:, 0] >= xlim[0])
    & (points[:, 0] <= xlim[1])
    & (points[:, 1] >= ylim[0])
    & (points[:, 1] <= ylim[1])
  )
  for i in np.random.default_rng(0).permutation(len(points)):
    if inside[i]:
      c, r = pixels[i]
      color = PALETTE[int(labels[i]) % len(PALETTE)]
      axes.draw.ellipse([c - radius, r - radius, c + radius, r + radius], fill=color)
  return axes.finish(title, xlabel, ylabel)


def image_plot(
  image: np.ndarray,
  *,
  xlim: tuple[float, float],
  ylim: tuple[float, float],
  title: str = "",
  xlabel: str = "",
  ylabel: str = "",
  size: int = 400,
) -> np.ndarray:
  """An image (e.g. a decoded manifold) stretched over the plot box of ``scatter_plot``.

  Args:
    image: ``[h, w, 1 or 3]`` uint8 covering exactly ``xlim x ylim``, top row at
      ``ylim[1]``.

  Returns:
    ``[H, W, 3]`` uint8, the same size as a ``scatter_plot`` of equal ``size``.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
    raise ValueError(f"image must be [h, w, 1 or 3] uint8, got {image.shape} {image.dtype}.")
  axes = _Axes(size, xlim, ylim)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
  axes.image.paste(pil.resize((size, size), Image.Resampling.BILINEAR), (axes.left, axes.top))
  return axes.finish(title, xlabel, ylabel)


def legend(
  names: Sequence[str], width: int, colors: Sequence[tuple[int, int, int]] = PALETTE
) -> np.ndarray:
  """Coloured dots with names, laid out in rows that fit ``width``: ``[H, width, 3]`` uint8."""
  font = _font(13)
  item_widths = [22 + _text_size(font, n)[0] + 18 for n in names]
  rows, row, used = [], [], 10
  for i, w in enumerate(item_widths):
    if row and used + w > width:
      rows.append(row)
      row, used = [], 10
    row.append(i)
    used += w
  rows.append(row)
  line = 22
  image = Image.new("RGB", (width, line * len(rows) + 8), _WHITE)
  d = ImageDraw.Draw(image)
  for r, items in enumerate(rows):
    x, y = 10, 4 + r * line
    for i in items:
      d.ellipse([x, y + 4, x + 11, y + 15], fill=colors[i % len(colors)])
      d.text((x + 17, y + 2), names[i], fill=_BLACK, font=font)
      x += item_widths[i]
  return np.asarray(image)


def label_rows(
  grid: np.ndarray, labels: Sequence[str], *, cell: int, pad: int = 1, header: str = ""
) -> np.ndarray:
  """Writes ``labels[i]`` left of row ``i`` of an ``image_grid`` (and a header above).

  Args:
    grid: ``[H, W, 1 or 3]`` uint8 from ``writers.image_grid(..., pad=pad)``
      (after any upscaling, with ``cell`` and ``pad`` scaled alike).
    labels: one string per grid row.
    cell: height of one image in the grid, in pixels.
    pad: the grid's padding, in pixels.
    header: a line of text above the grid.

  Returns:
    ``[H + header height, W + label width, 3]`` uint8.
  """
  grid = np.asarray(grid)
  if grid.ndim != 3 or grid.dtype != np.uint8:
    raise ValueError(f"grid must be [H, W, c] uint8, got {grid.shape} {grid.dtype}.")
  rows = (grid.shape[0] - pad) // (cell + pad)
  if len(labels) != rows:
    raise ValueError(f"{len(labels)} labels for a grid of {rows} rows.")
  font = _font(13)
  margin = max((_text_size(font, s)[0] for s in labels), default=0) + 12
  top = 24 if header else 0
  rgb = np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid
  image = Image.new("RGB", (margin + grid.shape[1], top + grid.shape[0]), _WHITE)
  image.paste(Image.fromarray(rgb), (margin, top))
  d = ImageDraw.Draw(image)
  for i, text in enumerate(labels):
    w, h = _text_size(font, text)
    centre = top + pad + i * (cell + pad) + cell / 2
    d.text((margin - 6 - w, centre - h / 2 - 3), text, fill=_BLACK, font=font)
  if header:
    d.text((margin, 4), header, fill=_BLACK, font=font)
  return np.asarray(image)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement of ``[H, W, c]`` by an integer ``factor``."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def hstack(panels: Sequence[np.ndarray], gap: int = 10) -> np.ndarray:
  """Places ``[h_i, w_i, 3]`` uint8 panels side by side on white, tops aligned."""
  height = max(p.shape[0] for p in panels)
  width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
  out = np.full((height, width, 3), 255, np.uint8)
  left = 0
  for p in panels:
    out[: p.shape[0], left : left + p.shape[1]] = p
    left += p.shape[1] + gap
  return out


def vstack(panels: Sequence[np.ndarray], gap: int = 0) -> np.ndarray:
  """Stacks ``[h_i, w_i, 3]`` uint8 panels top to bottom on white, left aligned."""
  width = max(p.shape[1] for p in panels)
  height = sum(p.shape[0] for p in panels) + gap * (len(panels) - 1)
  out = np.full((height, width, 3), 255, np.uint8)
  top = 0
  for p in panels:
    out[top : top + p.shape[0], : p.shape[1]] = p
    top += p.shape[0] + gap
  return out


def latent_map_figure(
  latent_points: np.ndarray,
  pca_points: np.ndarray,
  labels: np.ndarray,
  manifold: np.ndarray,
  *,
  latent_limits: tuple[tuple[float, float], tuple[float, float]],
  class_names: Sequence[str],
  model_name: str = "VAE",
  code_name: str = "posterior means",
  size: int = 400,
) -> np.ndarray:
  """Three panels and a legend: the model's 2-D codes, PCA's, and the decoded plane.

  Args:
    latent_points: ``[n, 2]`` the model's codes of the test images (a VAE's
      posterior means).
    pca_points: ``[n, 2]`` the same images projected on the first two principal
      components of the training images.
    labels: ``[n]`` integer labels, for colour.
    manifold: ``[H, W, 1 or 3]`` uint8 tiling of images decoded on a grid of
      cells covering ``latent_limits`` (see ``manifold_latents``).
    latent_limits: ``(xlim, ylim)`` shared by the first and third panels, so a
      region of the scatter plot sits where its decoded images are.
    class_names: legend text per label.
    model_name: names the model in the titles.
    code_name: what ``latent_points`` are, for the first title.
    size: side of each plot box, in pixels.

  Returns:
    ``[H, W, 3]`` uint8.
  """
  xlim, ylim = latent_limits
  left = scatter_plot(
    latent_points,
    labels,
    xlim=xlim,
    ylim=ylim,
    title=f"{model_name}: {code_name} of test images",
    xlabel="z1",
    ylabel="z2",
    size=size,
  )
  pca_xlim, pca_ylim = data_limits(pca_points)
  middle = scatter_plot(
    pca_points,
    labels,
    xlim=pca_xlim,
    ylim=pca_ylim,
    title="PCA: first two components",
    xlabel="PC 1",
    ylabel="PC 2",
    size=size,
  )
  right = image_plot(
    manifold,
    xlim=xlim,
    ylim=ylim,
    title=f"{model_name}: decoded grid of the latent plane",
    xlabel="z1",
    ylabel="z2",
    size=size,
  )
  panels = hstack([left, middle, right])
  return vstack([panels, legend(class_names, panels.shape[1])])


def rate_distortion_plot(
  rates: np.ndarray,
  distortions: np.ndarray,
  labels: Sequence[str],
  *,
  title: str = "",
  size: int = 400,
  num_elbo_lines: int = 6,
) -> np.ndarray:
  """Rate (x) against distortion (y), one labelled point per model: ``[H, W, 3]`` uint8.

  Args:
    rates: ``[n]`` rates ``R = E KL(q(z|x) || p(z))`` in nats.
    distortions: ``[n]`` distortions ``D = -E log p(x|z)`` in nats.
    labels: ``[n]`` text drawn beside each point (e.g. its beta).
    title: drawn above the plot.
    size: side of the square plot box, in pixels.
    num_elbo_lines: about this many grey lines ``R + D = c`` (equal ELBO
      ``-c``), each labelled with its ELBO.

  Points are connected in the given order (sort them by beta for a frontier);
  the point of the best ELBO (smallest ``R + D``) is red.
  """
  rates, distortions = np.asarray(rates, np.float64), np.asarray(distortions, np.float64)
  if rates.shape != distortions.shape or rates.ndim != 1 or len(labels) != rates.shape[0]:
    raise ValueError(
      f"rates and distortions must be [n] with n labels; got {rates.shape}, "
      f"{distortions.shape}, {len(labels)} labels."
    )
  xlim, ylim = data_limits(np.stack([rates, distortions], -1), low=0.0, high=100.0, margin=0.12)
  xlim = (min(xlim[0], 0.0), xlim[1])  # Rate 0 (a collapsed posterior) is always shown.
  axes = _Axes(size, xlim, ylim)
  d, font = axes.draw, _font(11)
  totals = rates + distortions
  for c in nice_ticks(xlim[0] + ylim[0], xlim[1] + ylim[1], num_elbo_lines + 2):
    # The segment of x + y = c inside the box.
    x0, x1 = max(xlim[0], c - ylim[1]), min(xlim[1], c - ylim[0])
    if x1 <= x0:
      continue
    ends = axes.to_pixels(np.array([[x0, c - x0], [x1, c - x1]]))
    d.line([tuple(ends[0]), tuple(ends[1])], fill=(200, 200, 200), width=1)
    text = f"ELBO {-c:g}"
    w, h = _text_size(font, text)
    d.text((ends[1][0] - w - 4, ends[1][1] - h - 6), text, fill=_GREY, font=font)
  pixels = axes.to_pixels(np.stack([rates, distortions], -1))
  d.line([tuple(p) for p in pixels], fill=PALETTE[0], width=2)
  best = int(np.argmin(totals))
  label_font, right = _font(12), axes.left + size
  for i, (c, r) in enumerate(pixels):
    color = PALETTE[3] if i == best else PALETTE[0]  # Red: the best ELBO.
    d.ellipse([c - 4, r - 4, c + 4, r + 4], fill=color)
    w, _ = _text_size(label_font, labels[i])
    left = c + 6 if c + 6 + w < right - 2 else c - 6 - w  # Keep labels inside the box.
    d.text((left, r - 14), labels[i], fill=_BLACK, font=label_font)
  return axes.finish(title, "rate R (nats)", "distortion D (nats)")
