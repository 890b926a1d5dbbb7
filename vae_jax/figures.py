"""Figures for papers and TensorBoard, drawn with matplotlib.

Every ``*_figure`` function takes arrays and returns a ``matplotlib.figure.Figure``
that the caller may restyle (``fig.axes``, ``fig.legends``, artists found by the
``gid`` each docstring names) before ``save_figure`` writes it as PNG and PDF or
``figure_to_array`` turns it into an ``[H, W, 3]`` uint8 image for TensorBoard.

Figures are built on an Agg canvas directly, never through ``matplotlib.pyplot``:
no display is needed, nothing is registered in pyplot's global list of figures,
and a figure is freed as soon as the caller drops it. Styling is applied with
``matplotlib.rc_context`` while a figure is built, so the process-wide
``rcParams`` are left as they were.

Units: rates, distortions and ELBOs are in nats per example. Images are
``[..., h, w, c]`` with ``c`` in {1, 3}, floats in [0, 1] or uint8. Grids of
decoded images come from ``vae_jax.pictures``; this module only lays them out
and writes the text beside them.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import math
import os
import pathlib
import types
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vae_jax import files, pictures, writers

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure


@functools.cache
def _mpl() -> types.SimpleNamespace:
  """matplotlib's modules, imported on first use: half a second of start-up that a
  training run, which draws no figure, does not pay."""
  names = ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure",
           "matplotlib.lines", "matplotlib.ticker", "matplotlib.textpath")  # fmt: skip
  mpl, agg, figure, lines, ticker, textpath = (importlib.import_module(n) for n in names)
  # Embedding TrueType fonts in a PDF subsets them with fontTools, which logs
  # hundreds of INFO lines per file ("glyf pruned", ...) into absl's log.
  logging.getLogger("fontTools").setLevel(logging.WARNING)
  return types.SimpleNamespace(
    rc_context=mpl.rc_context,
    colormaps=mpl.colormaps,
    FigureCanvasAgg=agg.FigureCanvasAgg,
    Figure=figure.Figure,
    Line2D=lines.Line2D,
    MaxNLocator=ticker.MaxNLocator,
    NullLocator=ticker.NullLocator,
    TextPath=textpath.TextPath,
  )


# Small text and no top/right frame: figures sized for a column of a paper.
_STYLE = {
  "font.size": 9.0,
  "axes.titlesize": 9.0,
  "axes.labelsize": 9.0,
  "legend.fontsize": 8.0,
  "xtick.labelsize": 8.0,
  "ytick.labelsize": 8.0,
  "axes.spines.top": False,
  "axes.spines.right": False,
  "figure.dpi": 100.0,
}

# Reproducible files (no creation date or version stamp), and TrueType rather than
# Type 3 fonts in PDFs, which many publishers require.
_SAVE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42}
_SAVE_METADATA: dict[str, dict[str, Any]] = {
  "png": {"Software": None},
  "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}

_SPLITS = ("train", "validation", "test")
_SEED_MARKERS = "osD^v<>phP"


def _styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
  """Builds the figure under ``_STYLE`` without changing the global ``rcParams``."""

  @functools.wraps(build)
  def wrapper(*args, **kwargs) -> Figure:
    with _mpl().rc_context(_STYLE):
      return build(*args, **kwargs)

  return wrapper


def _label_inches(labels: Sequence[str]) -> float:
  """Width of the longest tick label in inches, at the style's tick font size."""
  size = _STYLE["ytick.labelsize"]
  widths = [_mpl().TextPath((0, 0), s, size=size).get_extents().width for s in labels if s]
  return max(widths, default=0.0) / 72.0  # Points to inches.


def _new_figure(width: float, height: float, layout: str = "constrained") -> Figure:
  """A figure of ``width x height`` inches on its own Agg canvas (no pyplot)."""
  figure = _mpl().Figure(figsize=(width, height), layout=layout)
  _mpl().FigureCanvasAgg(figure)
  return figure


# --------------------------------------------------------------------------
# Checks and conversions.


def _points(points: np.ndarray, name: str) -> np.ndarray:
  points = np.asarray(points, np.float64)
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"{name} must be [n, 2], got shape {points.shape}.")
  return points


def _unit_float(images: np.ndarray, name: str, ndim: int) -> np.ndarray:
  """uint8 or float images ``[..., c]`` with ``c`` in {1, 3} -> float32 in [0, 1]."""
  images = np.asarray(images)
  if images.ndim != ndim or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"{name} must have {ndim} dimensions, the last 1 or 3 channels; got {images.shape}."
    )
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return np.clip(images.astype(np.float32), 0.0, 1.0)


def _show_image(ax: Axes, image: np.ndarray, **kwargs) -> None:
  """``imshow`` of ``[H, W, 1 or 3]`` floats in [0, 1]; one channel is drawn in grey."""
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, **kwargs)
  else:
    ax.imshow(image, **kwargs)


def _class_colors(num_classes: int) -> np.ndarray:
  """``[num_classes, 4]`` RGBA: Tableau 10 (as before), then 20, then a rainbow."""
  if num_classes <= 10:
    return _mpl().colormaps["tab10"](np.arange(num_classes))
  if num_classes <= 20:
    return _mpl().colormaps["tab20"](np.arange(num_classes))
  return _mpl().colormaps["turbo"](np.linspace(0.0, 1.0, num_classes))


def _format_values(values: np.ndarray) -> list[str]:
  """Three significant digits; rounding noise next to zero (``linspace``) prints as 0."""
  values = np.asarray(values, np.float64)
  scale = float(np.max(np.abs(values))) if values.size else 0.0
  out = []
  for v in values:
    text = f"{0.0 if abs(v) <= 1e-9 * scale else v:.3g}"
    out.append("0" if text == "-0" else text)
  return out


# --------------------------------------------------------------------------
# Grids of images with text beside them.


def _image_grid_axes(
  ax: Axes,
  images: np.ndarray,
  columns: int,
  column_labels: Sequence[str],
  row_labels: Sequence[str],
  pad: int = 1,
) -> None:
  """Tiles ``[rows * columns, h, w, c]`` images in ``ax``, labels as tick labels."""
  n, h, w, _ = images.shape
  rows = n // columns
  grid = writers.image_grid(images, columns=columns, pad=pad)
  _show_image(ax, grid.astype(np.float32) / 255.0, interpolation="nearest")
  # Pixel centres are at integer coordinates in imshow.
  ax.set_xticks(pad + np.arange(columns) * (w + pad) + (w - 1) / 2, list(column_labels))
  ax.set_yticks(pad + np.arange(rows) * (h + pad) + (h - 1) / 2, list(row_labels))
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)


@_styled
def traversal_figure(
  images: np.ndarray,
  row_labels: Sequence[str],
  columns: Sequence[str] | np.ndarray,
  *,
  title: str = "",
  xlabel: str = "value of the swept latent",
  cell_inches: float = 0.5,
) -> Figure:
  """Latent traversals, one row per swept latent, labelled with text (not pixels).

  Args:
    images: ``[rows * steps, h, w, c]`` from ``pictures.traversal_images``, row
      ``i`` sweeping one latent.
    row_labels: ``[rows]`` text left of each row (e.g. ``"latent 3, KL 2.10"``).
    columns: the column labels, either ``steps`` strings or the swept values:
      ``[steps]`` shared by every row, or ``[rows, steps]`` one sweep per row.
      Per-row sweeps that differ (an autoencoder's percentiles) are shown as
      each row's range in its label, and the columns are left unlabelled.
    title: above the grid.
    xlabel: below the column labels.
    cell_inches: drawn size of one image.

  Returns:
    A figure with one axes holding the grid (``fig.axes[0]``); row labels are
    its y tick labels, column labels its x tick labels.
  """
  row_labels = list(row_labels)
  rows = len(row_labels)
  if len(columns) and isinstance(columns[0], str):
    column_labels = list(columns)
  else:
    values = np.asarray(columns, np.float64)
    if values.ndim == 2 and values.shape[0] != rows:
      raise ValueError(f"values must be [steps] or [rows={rows}, steps], got {values.shape}.")
    if values.ndim == 2 and not np.allclose(values, values[:1]):
      row_labels = [
        f"{label} ({lo} to {hi})"
        for label, (lo, hi) in zip(
          row_labels, (_format_values(v[[0, -1]]) for v in values), strict=True
        )
      ]
      column_labels = [""] * values.shape[1]
    elif values.ndim in (1, 2):
      column_labels = _format_values(values.reshape(-1, values.shape[-1])[0])
    else:
      raise ValueError(f"values must be [steps] or [rows, steps], got {values.shape}.")
  steps = len(column_labels)
  images = _unit_float(images, "images", 4)
  if rows == 0 or images.shape[0] != rows * steps:
    raise ValueError(
      f"{images.shape[0]} images for {rows} rows of {steps} steps; images must be "
      "[rows * steps, h, w, c] in row order."
    )
  margin = _label_inches(row_labels) + 0.3
  figure = _new_figure(steps * cell_inches + margin, rows * cell_inches + 0.7, "compressed")
  ax = figure.subplots()
  _image_grid_axes(ax, images, steps, column_labels, row_labels)
  ax.set_xlabel(xlabel)
  ax.set_title(title)
  return figure


@_styled
def interpolation_figure(
  images: np.ndarray,
  num_steps: int,
  *,
  title: str = "",
  row_labels: Sequence[str] | None = None,
  cell_inches: float = 0.5,
) -> Figure:
  """Interpolations between pairs of images: ``x_a``, decoded steps, ``x_b`` per row.

  Args:
    images: ``[pairs * (num_steps + 2), h, w, c]`` from
      ``pictures.interpolation_images``.
    num_steps: decoded points per pair, both ends included.
    title: above the grid.
    row_labels: ``[pairs]`` text left of each row (default: none).
    cell_inches: drawn size of one image.

  Returns:
    A figure with one axes holding the grid; the x tick labels name the
    columns: ``$x_a$``, the values of ``t``, ``$x_b$``.
  """
  images = _unit_float(images, "images", 4)
  columns = num_steps + 2
  if num_steps < 1 or images.shape[0] % columns:
    raise ValueError(
      f"{images.shape[0]} images do not make rows of num_steps + 2 = {columns}; images must "
      "be [pairs * (num_steps + 2), h, w, c]."
    )
  pairs = images.shape[0] // columns
  row_labels = [""] * pairs if row_labels is None else list(row_labels)
  if len(row_labels) != pairs:
    raise ValueError(f"{len(row_labels)} row labels for {pairs} rows.")
  t = _format_values(np.linspace(0.0, 1.0, num_steps))
  column_labels = ["$x_a$", *t, "$x_b$"]
  margin = _label_inches(row_labels) + 0.3
  figure = _new_figure(columns * cell_inches + margin, pairs * cell_inches + 0.7, "compressed")
  ax = figure.subplots()
  _image_grid_axes(ax, images, columns, column_labels, row_labels)
  ax.set_xlabel(r"$t$: decoded $(1 - t)\,z_a + t\,z_b$; ends: the images $x_a$, $x_b$")
  ax.set_title(title)
  return figure


@_styled
def reconstruction_figure(
  inputs: np.ndarray,
  reconstructions: np.ndarray,
  *,
  columns: int = 8,
  title: str = "",
  cell_inches: float = 0.5,
) -> Figure:
  """Images and their reconstructions in row pairs, each row named: ``input`` above
  ``reconstruction``.

  Args:
    inputs: ``[n, h, w, c]`` the data as they are (grey levels or colour, in [0, 1] or
      uint8), not a binarized draw.
    reconstructions: the same shape: what the model gives back (its likelihood's mean).
    columns: images per row.
    title: above the grid.
    cell_inches: drawn size of one image.

  Returns:
    A figure with one axes; its y tick labels name the rows.
  """
  inputs = _unit_float(inputs, "inputs", 4)
  reconstructions = _unit_float(reconstructions, "reconstructions", 4)
  if inputs.shape != reconstructions.shape:
    raise ValueError(f"inputs {inputs.shape} and reconstructions {reconstructions.shape} differ.")
  n = (len(inputs) // columns) * columns
  if n == 0:
    raise ValueError(f"{len(inputs)} images do not fill a row of {columns}.")
  rows = []
  for start in range(0, n, columns):
    rows += [inputs[start : start + columns], reconstructions[start : start + columns]]
  labels = ["input", "reconstruction"] * (n // columns)
  margin = _label_inches(labels) + 0.3
  figure = _new_figure(columns * cell_inches + margin, len(rows) * cell_inches + 0.5, "compressed")
  ax = figure.subplots()
  _image_grid_axes(ax, np.concatenate(rows), columns, [""] * columns, labels)
  ax.set_title(title)
  return figure


# --------------------------------------------------------------------------
# Plots.


@_styled
def latent_map_figure(
  codes: np.ndarray,
  pca_codes: np.ndarray,
  labels: np.ndarray,
  manifold_image: np.ndarray,
  *,
  latent_limits: tuple[tuple[float, float], tuple[float, float]],
  class_names: Sequence[str],
  model_name: str = "VAE",
  code_name: str = "posterior means",
  panel_inches: float = 3.0,
) -> Figure:
  """A model's 2-D codes beside PCA's, and the decoded grid of the latent plane.

  Args:
    codes: ``[n, 2]`` the model's codes of the test images (a VAE's posterior
      means).
    pca_codes: ``[n, 2]`` the same images projected on the first two principal
      components of the training images.
    labels: ``[n]`` integer class labels, for colour.
    manifold_image: ``[H, W, 1 or 3]`` in [0, 1] or uint8: images decoded on a
      grid of cells covering ``latent_limits`` (``pictures.manifold_latents``),
      tiled without padding, top row at the largest latent 1.
    latent_limits: ``((min_0, max_0), (min_1, max_1))`` of latents 0 and 1, shared by the first
      and third panels, so a region of the scatter plot sits where its decoded
      images are (``pictures.data_limits(codes)``).
    class_names: legend text per label.
    model_name: names the model in the titles.
    code_name: what ``codes`` are, for the first title.
    panel_inches: side of each square panel.

  Returns:
    A figure with three axes (codes, PCA, decoded plane) and a legend of
    classes (``fig.legends[0]``). Each scatter plot is one collection
    (``gid="codes"``) of all ``n`` points, drawn in a fixed random order so no
    class is hidden under another.
  """
  codes, pca_codes = _points(codes, "codes"), _points(pca_codes, "pca_codes")
  labels = np.asarray(labels)
  if labels.shape != codes.shape[:1] or pca_codes.shape != codes.shape:
    raise ValueError(
      f"codes and pca_codes must be [n, 2] and labels [n]; got {codes.shape}, "
      f"{pca_codes.shape}, {labels.shape}."
    )
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(f"labels must be in [0, {len(class_names)}) to have a class name.")
  image = _unit_float(manifold_image, "manifold_image", 3)
  (x0, x1), (y0, y1) = latent_limits
  if not (x1 > x0 and y1 > y0):
    raise ValueError(f"latent_limits must be increasing, got {latent_limits}.")

  palette = _class_colors(len(class_names))
  order = np.random.default_rng(0).permutation(len(labels))
  dot = 4.0 if len(labels) > 2000 else 10.0  # Marker area, points^2.
  figure = _new_figure(3 * panel_inches + 0.3, panel_inches + 0.6)
  left, middle, right = figure.subplots(1, 3)
  panels = (
    (
      left,
      codes,
      latent_limits,
      f"{model_name}: {code_name} of test images",
      ("latent 0", "latent 1"),
    ),
    (
      middle,
      pca_codes,
      pictures.data_limits(pca_codes),
      "PCA: first two components",
      ("PC 1", "PC 2"),
    ),
  )
  for ax, points, (xlim, ylim), title, (xlabel, ylabel) in panels:
    ax.scatter(
      points[order, 0],
      points[order, 1],
      c=palette[labels[order]],
      s=dot,
      linewidths=0,
      rasterized=len(labels) > 1000,  # Keeps a PDF of 10,000 points small.
      gid="codes",
    )
    ax.set(xlim=xlim, ylim=ylim, title=title, xlabel=xlabel, ylabel=ylabel)
  _show_image(right, image, extent=(x0, x1, y0, y1), aspect="auto", interpolation="antialiased")
  right.set(
    xlim=(x0, x1),
    ylim=(y0, y1),
    title=f"{model_name}: decoded grid of the latent plane",
    xlabel="latent 0",
    ylabel="latent 1",
  )
  for ax in (left, middle, right):
    ax.set_box_aspect(1.0)
  handles = [
    _mpl().Line2D([], [], linestyle="", marker="o", markersize=5, color=palette[i], label=name)
    for i, name in enumerate(class_names)
  ]
  figure.legend(
    handles=handles, loc="outside lower center", ncol=min(len(handles), 10), frameon=False
  )
  return figure


@_styled
def rate_distortion_figure(
  rates: np.ndarray,
  distortions: np.ndarray,
  labels: Sequence[str],
  *,
  title: str = "",
  num_elbo_lines: int = 6,
  inches: tuple[float, float] = (4.5, 3.8),
) -> Figure:
  """Rate against distortion, one labelled point per model, with lines of equal ELBO.

  Args:
    rates: ``[n]`` rates ``R = E KL(q(z|x) || p(z))`` in nats.
    distortions: ``[n]`` distortions ``D = -E log p(x|z)`` in nats.
    labels: ``[n]`` text beside each point (e.g. ``"beta=4"``).
    title: above the plot.
    num_elbo_lines: about this many grey lines ``R + D = c``, each labelled with
      its ELBO ``-c``.
    inches: figure size.

  Returns:
    A figure with one axes. Its artists, by ``gid``: ``"models"`` the line
    through the points in the given order (sort by beta for a frontier);
    ``"equal-elbo"`` the grey lines; the scatter collections ``"points"``
    (``ax.collections[0]``, every finite point) and ``"best"``
    (``ax.collections[1]``, the best ELBO, smallest ``R + D``, in red); the
    legend below the axes is ``fig.legends[0]``. Models with a non-finite rate
    or distortion are listed in a note, not plotted.
  """
  rates, distortions = np.asarray(rates, np.float64), np.asarray(distortions, np.float64)
  labels = list(labels)
  if rates.shape != distortions.shape or rates.ndim != 1 or len(labels) != rates.shape[0]:
    raise ValueError(
      f"rates and distortions must be [n] with n labels; got {rates.shape}, "
      f"{distortions.shape}, {len(labels)} labels."
    )
  finite = np.isfinite(rates) & np.isfinite(distortions)
  if not finite.any():
    raise ValueError("No model has a finite rate and distortion to plot.")
  r, d = rates[finite], distortions[finite]
  shown = [label for label, ok in zip(labels, finite, strict=True) if ok]
  xlim, ylim = pictures.data_limits(np.stack([r, d], -1), low=0.0, high=100.0, margin=0.12)
  xlim = (min(xlim[0], 0.0), xlim[1])  # Rate 0 (a collapsed posterior) is always shown.

  figure = _new_figure(*inches)
  ax = figure.subplots()
  ax.set(xlim=xlim, ylim=ylim, xlabel="rate (nats)", ylabel="distortion (nats)", title=title)
  # Round values of R + D; part of the range of c is outside the axes, hence the + 2.
  locator = _mpl().MaxNLocator(nbins=num_elbo_lines + 2, steps=[1, 2, 2.5, 5, 10])
  totals = locator.tick_values(xlim[0] + ylim[0], xlim[1] + ylim[1])
  drawn = 0
  for c in totals:
    # The part of R + D = c inside the axes.
    lo, hi = max(xlim[0], c - ylim[1]), min(xlim[1], c - ylim[0])
    if hi <= lo:
      continue
    ax.plot(
      [lo, hi],
      [c - lo, c - hi],
      color="0.8",
      linewidth=0.8,
      zorder=0,
      gid="equal-elbo",
      label="equal ELBO" if drawn == 0 else "_equal ELBO",
    )
    drawn += 1
    if hi - lo > 0.15 * (xlim[1] - xlim[0]):  # Label only lines long enough to hold it.
      ax.annotate(
        f"ELBO {-c:g}",
        (hi, c - hi),
        xytext=(-3, 3),
        textcoords="offset points",
        ha="right",
        va="bottom",
        color="0.45",
        fontsize=7,
        gid="equal-elbo-label",
      )
  ax.plot(r, d, color="C0", linewidth=1.2, zorder=2, gid="models")
  ax.scatter(r, d, color="C0", s=18, zorder=3, gid="points")
  best = int(np.argmin(r + d))
  ax.scatter(
    r[best : best + 1],
    d[best : best + 1],
    color="C3",
    s=40,
    zorder=4,
    gid="best",
    label=f"best ELBO: {shown[best]} ({-(r[best] + d[best]):.2f})",
  )
  right_edge = xlim[0] + 0.8 * (xlim[1] - xlim[0])
  for x, y, text in zip(r, d, shown, strict=True):
    inside = x < right_edge  # Labels of points near the right edge go to their left.
    ax.annotate(
      text,
      (x, y),
      xytext=(5 if inside else -5, 4),
      textcoords="offset points",
      ha="left" if inside else "right",
      fontsize=8,
      gid="point-label",
    )
  if not finite.all():
    missing = ", ".join(label for label, ok in zip(labels, finite, strict=True) if not ok)
    ax.text(0.01, 0.01, f"not shown (non-finite): {missing}", transform=ax.transAxes, fontsize=7)
  figure.legend(loc="outside lower center", ncol=2, frameon=False)  # Clear of the ELBO labels.
  return figure


def _metric(row: Mapping[str, Any], name: str) -> float | None:
  """``row[name]`` as a float, or the equivalent derived from another metric, or None."""
  derived = {
    "elbo": ("neg_elbo", -1.0),
    "rate": ("kl", 1.0),
    "distortion": ("reconstruction", -1.0),
  }
  if name in derived:
    source, sign = derived[name]
    if name in row:
      return float(row[name])
    return sign * float(row[source]) if source in row else None
  return float(row[name]) if name in row else None


@_styled
def training_curves_figure(
  rows: Sequence[Mapping[str, Any]],
  *,
  title: str = "",
  panel_inches: tuple[float, float] = (3.0, 2.6),
) -> Figure:
  """ELBO, rate and distortion over training steps, one line per split.

  Args:
    rows: the dicts of ``metrics.jsonl`` (``writers.read_metrics``), each with
      ``step``, ``split`` (``"train"``, ``"validation"``, ``"test"``) and scalars:
      ``elbo`` (or ``neg_elbo``), ``kl`` (the rate) and ``reconstruction``
      (``E log p(x|z)``; the distortion is its negative), in nats.
    title: above the panels.
    panel_inches: size of each panel.

  Returns:
    A figure with one axes per quantity that any row holds (titles ``"ELBO"``,
    ``"rate (KL)"``, ``"distortion (-reconstruction)"``), each with one line per
    split that has it (``gid`` and legend text: the split) and a legend. Splits
    and quantities missing from ``rows`` are left out; with nothing to plot the
    figure says so. A step logged twice for a split keeps its last value.
  """
  quantities = (
    ("ELBO", "elbo"),
    ("rate (KL)", "rate"),
    ("distortion (-reconstruction)", "distortion"),
  )
  extra = sorted({str(r.get("split")) for r in rows} - set(_SPLITS) - {"None"})
  panels = []
  for panel_title, name in quantities:
    lines = []
    for split in (*_SPLITS, *extra):
      by_step = {}
      for row in rows:
        value = _metric(row, name) if row.get("split") == split and "step" in row else None
        if value is not None:
          by_step[int(row["step"])] = value
      if by_step:
        steps = sorted(by_step)
        lines.append((split, steps, [by_step[s] for s in steps]))
    if lines:
      panels.append((panel_title, lines))

  width, height = panel_inches
  figure = _new_figure(width * max(len(panels), 1), height + (0.3 if title else 0.0))
  if title:
    figure.suptitle(title)
  if not panels:
    ax = figure.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, "no train, validation or test metrics to plot", ha="center", va="center")
    return figure
  for ax, (panel_title, lines) in zip(
    np.atleast_1d(figure.subplots(1, len(panels))), panels, strict=True
  ):
    for split, steps, values in lines:
      marker = "o" if len(steps) <= 20 and split != "train" else None  # Sparse evaluations.
      ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.0, label=split, gid=split)
    ax.set(title=panel_title, xlabel="step", ylabel="nats")
    ax.legend(frameon=False)
  return figure


@_styled
def curves_figure(
  curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  xlabel: str,
  ylabel: str,
  title: str = "",
  ylim_from: float = 0.0,
  size_inches: tuple[float, float] = (4.5, 3.0),
) -> Figure:
  """One line per run of a quantity over training, e.g. the validation -ELBO of each row
  of a likelihood table against epochs.

  Args:
    curves: ``{label: (x, y)}``, each ``x`` and ``y`` of the same length.
    xlabel, ylabel, title: axis labels and title.
    ylim_from: the y limits hold every point with ``x >= ylim_from`` (and the
      points before it are still drawn): an early transient (a KL warm-up, the
      first epochs) would otherwise squash the converged part into a line.
    size_inches: the figure's size.

  Returns:
    A figure with one axes, one line per curve (``gid`` and legend text: its
    label) in the order given.

  Raises:
    ValueError: an ``x`` and ``y`` of different lengths.
  """
  figure = _new_figure(*size_inches)
  ax = figure.subplots()
  shown = []
  for label, (x, y) in curves.items():
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
      raise ValueError(
        f"curve {label!r}: x and y must be 1-D of one length; got {x.shape}, {y.shape}."
      )
    ax.plot(x, y, linewidth=1.0, label=label, gid=label)
    shown.append(y[x >= ylim_from])
  values = np.concatenate(shown) if shown else np.zeros(0)
  values = values[np.isfinite(values)]
  if values.size:
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo) or 1.0
    ax.set_ylim(lo - pad, hi + pad)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if curves:
    ax.legend(frameon=False)
  return figure


@_styled
def metric_vs_beta_figure(
  betas: np.ndarray,
  seeds: np.ndarray,
  values: Mapping[str, np.ndarray],
  *,
  title: str = "",
  ncols: int = 3,
  panel_inches: float = 2.6,
  axis_label: str = r"$\beta$",
) -> Figure:
  """One panel per metric against beta: a point per seed and the mean over seeds.

  Args:
    betas: ``[n]`` the beta of each model.
    seeds: ``[n]`` its seed (an int or a name).
    values: metric name (e.g. ``"MIG"``, ``"rate (nats)"``) -> ``[n]`` values;
      NaN where a metric was not computed for a model.
    title: above the panels.
    ncols: panels per row.
    panel_inches: width of each panel.
    axis_label: the x axis's name (the swept field, beta by default).

  Returns:
    A figure with one axes per metric (titled by its name, in the order of
    ``values``), beta on a log axis (symmetric log when some beta is <= 0).
    In each axes, one scatter collection per seed (``gid="seed"``, own colour
    and marker) and the per-beta mean over the finite values as a line
    (``gid="mean"``). One legend for the figure (``fig.legends[0]``).
  """
  betas = np.asarray(betas, np.float64)
  seeds = np.asarray(seeds)
  if betas.ndim != 1 or seeds.shape != betas.shape:
    raise ValueError(f"betas and seeds must both be [n], got {betas.shape}, {seeds.shape}.")
  columns = {}
  for name, v in values.items():
    v = np.asarray(v, np.float64)
    if v.shape != betas.shape:
      raise ValueError(f"values[{name!r}] must be [n={betas.shape[0]}], got {v.shape}.")
    columns[name] = v
  if not columns:
    raise ValueError("values holds no metric to plot.")

  unique_betas = np.unique(betas)
  unique_seeds = np.unique(seeds).tolist()
  ncols = min(ncols, len(columns))
  nrows = math.ceil(len(columns) / ncols)
  figure = _new_figure(ncols * panel_inches, nrows * 0.85 * panel_inches + 0.5)
  if title:
    figure.suptitle(title)
  axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
  for ax in axes[len(columns) :]:
    figure.delaxes(ax)
  for ax, (name, v) in zip(axes[: len(columns)], columns.items(), strict=True):
    for j, seed in enumerate(unique_seeds):
      mask = seeds == seed
      ax.scatter(
        betas[mask],
        v[mask],
        marker=_SEED_MARKERS[j % len(_SEED_MARKERS)],
        color=f"C{j % 10}",
        s=16,
        alpha=0.85,
        label=f"seed {seed}",
        gid="seed",
        zorder=3,
      )
    means = []
    for b in unique_betas:
      vb = v[(betas == b) & np.isfinite(v)]
      means.append(vb.mean() if vb.size else np.nan)
    ax.plot(unique_betas, means, color="black", linewidth=1.2, label="mean over seeds", gid="mean")
    if (betas > 0).all():
      ax.set_xscale("log")
    else:  # Beta = 0 cannot sit on a log axis: linear near zero.
      positive = betas[betas > 0]
      ax.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)
    if len(unique_betas) <= 10:  # Ticks at the betas that were trained, written plainly.
      ax.set_xticks(unique_betas, [f"{b:g}" for b in unique_betas])
      ax.xaxis.set_minor_locator(_mpl().NullLocator())
    ax.set(title=name, xlabel=axis_label)
  handles, legend_labels = axes[0].get_legend_handles_labels()
  figure.legend(
    handles, legend_labels, loc="outside lower center", ncol=len(handles), frameon=False
  )
  return figure


# --------------------------------------------------------------------------
# Output.


def save_figure(
  figure: Figure,
  path_stem: str | os.PathLike,
  *,
  formats: Sequence[str] = ("png", "pdf"),
  dpi: float = 200.0,
) -> list[pathlib.Path]:
  """Writes ``<path_stem>.png`` and ``<path_stem>.pdf``, each atomically.

  Each file is written under a temporary name in its directory and renamed into
  place, so a reader (or a kill mid-write) never sees a half-written figure.
  Parent directories are created. The files carry no date or version stamp, so
  an unchanged figure rewrites byte-identical files, and PDFs embed TrueType
  fonts.

  Args:
    figure: from one of the ``*_figure`` functions, or any matplotlib figure.
    path_stem: the path without extension (a trailing ``.png``/``.pdf`` is dropped).
    formats: the extensions to write, each a format matplotlib knows.
    dpi: resolution of raster formats, in dots per inch.

  Returns:
    The paths written, one per format.
  """
  stem = pathlib.Path(path_stem)
  if stem.suffix.lower().lstrip(".") in formats:
    stem = stem.with_suffix("")
  paths = []
  for fmt in formats:
    path = stem.with_name(f"{stem.name}.{fmt}")
    with files.reporting(path), files.atomic_path(path) as tmp, _mpl().rc_context(_SAVE_RC):
      figure.savefig(tmp, format=fmt, dpi=dpi, metadata=_SAVE_METADATA.get(fmt))
    paths.append(path)
  return paths


def figure_to_array(figure: Figure, dpi: float | None = None) -> np.ndarray:
  """Renders ``figure`` to ``[H, W, 3]`` uint8 RGB (e.g. for ``writer.write_image``).

  Args:
    figure: any matplotlib figure; one without an Agg canvas is given one.
    dpi: pixels per inch (default: the figure's own, 100 unless set).
  """
  if not isinstance(figure.canvas, _mpl().FigureCanvasAgg):
    _mpl().FigureCanvasAgg(figure)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi or figure.dpi)  # The pixels save_figure writes.
  buffer.seek(0)
  return np.asarray(Image.open(buffer).convert("RGB"))
