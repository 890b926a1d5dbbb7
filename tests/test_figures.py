"""matplotlib figures: what each panel shows (limits, labels, points, lines), not pixels."""

import logging
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from conftest import process_env
from matplotlib.figure import Figure

from vae_jax import figures, pictures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_global_state():
  """No test leaves a pyplot figure open or a changed rcParams behind."""
  before = dict(matplotlib.rcParams)
  yield
  assert dict(matplotlib.rcParams) == before
  if "matplotlib.pyplot" in sys.modules:
    assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def _texts(texts) -> list[str]:
  return [t.get_text() for t in texts]


def _sorted_rows(points: np.ndarray) -> np.ndarray:
  points = np.asarray(points)
  return points[np.lexsort(points.T[::-1])]


def test_module_never_imports_pyplot():
  code = (
    "import sys, numpy as np\n"
    "from vae_jax import figures\n"
    "fig = figures.rate_distortion_figure(np.array([1.0, 2.0]), np.array([3.0, 1.0]), ['a', 'b'])\n"
    "assert figures.figure_to_array(fig).ndim == 3\n"
    "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
  )
  env = {k: v for k, v in process_env().items() if k not in ("DISPLAY", "MPLBACKEND")}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]


def test_latent_map_figure():
  rng = np.random.default_rng(0)
  codes, pca_codes = rng.normal(size=(40, 2)), 5.0 * rng.normal(size=(40, 2))
  labels = np.arange(40) % 3
  limits = ((-2.0, 2.5), (-1.5, 3.0))
  manifold = rng.uniform(size=(12, 12, 1))
  fig = figures.latent_map_figure(
    codes,
    pca_codes,
    labels,
    manifold,
    latent_limits=limits,
    class_names=("zero", "one", "two"),
    model_name="AE",
    code_name="codes",
  )
  assert isinstance(fig, Figure)
  left, middle, right = fig.axes
  assert left.get_title() == "AE: codes of test images"
  assert middle.get_title() == "PCA: first two components"
  assert right.get_title() == "AE: decoded grid of the latent plane"
  assert (left.get_xlabel(), left.get_ylabel()) == ("latent 0", "latent 1")
  assert (middle.get_xlabel(), middle.get_ylabel()) == ("PC 1", "PC 2")
  for ax in (left, right):  # The scatter plot and the decoded plane share their limits.
    assert ax.get_xlim() == limits[0] and ax.get_ylim() == limits[1]
  pca_xlim, pca_ylim = pictures.data_limits(pca_codes)
  np.testing.assert_allclose(middle.get_xlim(), pca_xlim)
  np.testing.assert_allclose(middle.get_ylim(), pca_ylim)
  # Every point, once, in one collection per scatter plot, coloured by its class.
  for ax, points in ((left, codes), (middle, pca_codes)):
    (scatter,) = ax.collections
    offsets = np.asarray(scatter.get_offsets())
    assert offsets.shape == (40, 2)
    np.testing.assert_allclose(_sorted_rows(offsets), _sorted_rows(points))
    colors = scatter.get_facecolors()
    for offset, color in zip(offsets, colors, strict=True):
      i = int(np.argmin(np.abs(points - offset).sum(-1)))
      np.testing.assert_allclose(color, matplotlib.colormaps["tab10"](labels[i]))
  (image,) = right.images
  np.testing.assert_allclose(image.get_extent(), [-2.0, 2.5, -1.5, 3.0])
  np.testing.assert_allclose(image.get_array(), manifold[..., 0], atol=1e-6)
  assert _texts(fig.legends[0].get_texts()) == ["zero", "one", "two"]

  # A uint8 manifold shows the same picture.
  as_uint8 = np.round(manifold * 255).astype(np.uint8)
  fig = figures.latent_map_figure(
    codes, pca_codes, labels, as_uint8, latent_limits=limits, class_names=("a", "b", "c")
  )
  np.testing.assert_allclose(fig.axes[2].images[0].get_array(), as_uint8[..., 0] / 255.0)
  with pytest.raises(ValueError, match="codes and pca_codes must be"):
    figures.latent_map_figure(
      codes, pca_codes[:3], labels, manifold, latent_limits=limits, class_names="abc"
    )
  with pytest.raises(ValueError, match="labels must be in"):
    figures.latent_map_figure(
      codes, pca_codes, labels + 1, manifold, latent_limits=limits, class_names="abc"
    )


def _equal_elbo_lines(ax):
  return [line for line in ax.lines if line.get_gid() == "equal-elbo"]


def test_rate_distortion_figure():
  rates, distortions = np.array([0.0, 5.0, 12.0, 20.0]), np.array([200.0, 150.0, 110.0, 95.0])
  labels = ["beta=16", "beta=8", "beta=4", "beta=2"]
  fig = figures.rate_distortion_figure(rates, distortions, labels, title="R-D", num_elbo_lines=6)
  (ax,) = fig.axes
  assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
    "rate (nats)",
    "distortion (nats)",
    "R-D",
  )
  (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
  assert x0 < 0.0 and x1 > 20.0 and y0 < 95.0 and y1 > 200.0  # Rate 0 and every point show.
  points, best = ax.collections
  np.testing.assert_allclose(points.get_offsets(), np.stack([rates, distortions], -1))
  np.testing.assert_allclose(best.get_offsets(), [[20.0, 95.0]])  # Smallest R + D.
  models = [line for line in ax.lines if line.get_gid() == "models"]
  np.testing.assert_allclose(models[0].get_xdata(), rates)  # Joined in the given order.
  # Grey lines R + D = c: evenly spaced values of c, each segment inside the axes.
  lines = _equal_elbo_lines(ax)
  assert 4 <= len(lines) <= 6 + 3
  totals = []
  for line in lines:
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    np.testing.assert_allclose(x + y, x[0] + y[0])
    assert x0 - 1e-9 <= x.min() and x.max() <= x1 + 1e-9
    assert y0 - 1e-9 <= y.min() and y.max() <= y1 + 1e-9
    totals.append(x[0] + y[0])
  np.testing.assert_allclose(np.diff(totals), np.diff(totals)[0])
  assert _texts(fig.legends[0].get_texts()) == ["equal ELBO", "best ELBO: beta=2 (-115.00)"]
  point_labels = [t.get_text() for t in ax.texts if t.get_gid() == "point-label"]
  assert point_labels == labels


def test_rate_distortion_figure_leaves_out_non_finite_models():
  fig = figures.rate_distortion_figure(
    np.array([1.0, np.nan, 3.0]), np.array([10.0, 5.0, 6.0]), ["a", "diverged", "c"]
  )
  ax = fig.axes[0]
  assert len(ax.collections[0].get_offsets()) == 2
  assert any("not shown (non-finite): diverged" in t.get_text() for t in ax.texts)
  with pytest.raises(ValueError, match="No model has a finite"):
    figures.rate_distortion_figure(np.array([np.inf]), np.array([1.0]), ["a"])
  with pytest.raises(ValueError, match="with n labels"):
    figures.rate_distortion_figure(np.array([1.0, 2.0]), np.array([1.0, 2.0]), ["a"])


def _cell(grid: np.ndarray, row: int, col: int, h: int, w: int, pad: int = 1) -> np.ndarray:
  top, left = pad + row * (h + pad), pad + col * (w + pad)
  return grid[top : top + h, left : left + w]


def test_traversal_figure_labels_rows_and_columns():
  rows, steps, h, w = 3, 5, 4, 6
  images = np.random.default_rng(0).uniform(size=(rows * steps, h, w, 1))
  row_labels = ["z0 KL 2.00", "z4 KL 1.00", "z1 KL 0.10"]
  fig = figures.traversal_figure(images, row_labels, np.linspace(-2.0, 2.0, steps), title="T")
  (ax,) = fig.axes
  assert ax.get_title() == "T"
  assert _texts(ax.get_yticklabels()) == row_labels
  assert _texts(ax.get_xticklabels()) == ["-2", "-1", "0", "1", "2"]
  # Row i, column j of the grid is images[i * steps + j].
  grid = np.asarray(ax.images[0].get_array())
  assert grid.shape == (rows * (h + 1) + 1, steps * (w + 1) + 1)
  for i, j in ((0, 0), (1, 3), (2, 4)):
    np.testing.assert_allclose(_cell(grid, i, j, h, w), images[i * steps + j, ..., 0], atol=1 / 255)
  # Tick positions are the centres of the cells.
  np.testing.assert_allclose(ax.get_xticks()[:2], [1 + (w - 1) / 2, 1 + (w + 1) + (w - 1) / 2])

  # Per-row sweeps (an autoencoder's percentiles) go into the row labels.
  values = np.linspace([-1.0, -2.0, -3.0], [1.0, 2.0, 3.0], steps, axis=1)
  fig = figures.traversal_figure(images, ["a", "b", "c"], values)
  assert _texts(fig.axes[0].get_yticklabels()) == ["a (-1 to 1)", "b (-2 to 2)", "c (-3 to 3)"]
  assert _texts(fig.axes[0].get_xticklabels()) == [""] * steps
  # Strings label the columns as given.
  fig = figures.traversal_figure(images, row_labels, list("abcde"))
  assert _texts(fig.axes[0].get_xticklabels()) == list("abcde")
  with pytest.raises(ValueError, match="15 images for 2 rows of 5 steps"):
    figures.traversal_figure(images, ["a", "b"], np.arange(5.0))


def test_interpolation_figure_names_the_columns():
  pairs, num_steps = 2, 3
  images = np.random.default_rng(0).uniform(size=(pairs * (num_steps + 2), 4, 4, 3))
  fig = figures.interpolation_figure(images, num_steps, title="I", row_labels=["p0", "p1"])
  (ax,) = fig.axes
  assert ax.get_title() == "I"
  assert _texts(ax.get_xticklabels()) == ["$x_a$", "0", "0.5", "1", "$x_b$"]
  assert _texts(ax.get_yticklabels()) == ["p0", "p1"]
  grid = np.asarray(ax.images[0].get_array())
  assert grid.shape == (pairs * 5 + 1, 5 * 5 + 1, 3)  # RGB stays RGB.
  with pytest.raises(ValueError, match="do not make rows of num_steps"):
    figures.interpolation_figure(images[:-1], num_steps)


def test_training_curves_figure():
  rows = [
    {"step": 10, "split": "train", "elbo": -120.0, "kl": 5.0, "reconstruction": -115.0},
    {"step": 20, "split": "train", "elbo": -110.0, "kl": 6.0, "reconstruction": -104.0},
    {"step": 20, "split": "test", "elbo": -112.0, "kl": 6.5, "reconstruction": -105.5},
    {"step": 10, "split": "test", "neg_elbo": 121.0, "kl": 5.5, "reconstruction": -115.5},
    {"step": 20, "split": "validation", "neg_elbo": 111.0},
    {"step": 20, "split": "test", "elbo": -111.0, "kl": 6.5, "reconstruction": -104.5},
  ]
  fig = figures.training_curves_figure(rows, title="run")
  assert [ax.get_title() for ax in fig.axes] == [
    "ELBO",
    "rate (KL)",
    "distortion (-reconstruction)",
  ]
  elbo, rate, distortion = fig.axes
  assert [line.get_label() for line in elbo.lines] == ["train", "validation", "test"]
  assert _texts(elbo.get_legend().get_texts()) == ["train", "validation", "test"]
  test_elbo = elbo.lines[2]
  # Sorted by step; neg_elbo stands in for a missing elbo; a repeated step keeps its last value.
  np.testing.assert_allclose(test_elbo.get_xdata(), [10, 20])
  np.testing.assert_allclose(test_elbo.get_ydata(), [-121.0, -111.0])
  assert [line.get_label() for line in rate.lines] == ["train", "test"]  # No validation KL.
  np.testing.assert_allclose(distortion.lines[0].get_ydata(), [115.0, 104.0])
  assert (elbo.get_xlabel(), elbo.get_ylabel()) == ("step", "nats")
  assert fig.get_suptitle() == "run"

  # Only what the rows hold is drawn.
  fig = figures.training_curves_figure([{"step": 1, "split": "test", "kl": 1.0, "loss": 3.0}])
  assert [ax.get_title() for ax in fig.axes] == ["rate (KL)"]
  fig = figures.training_curves_figure([])
  (ax,) = fig.axes
  assert not ax.axison and "no train, validation or test metrics" in ax.texts[0].get_text()


def test_metric_vs_beta_figure():
  betas = np.array([1.0, 1.0, 4.0, 4.0, 16.0, 16.0])
  seeds = np.array([0, 1, 0, 1, 0, 1])
  mig = np.array([0.1, 0.3, 0.2, np.nan, 0.5, 0.7])
  values = {"MIG": mig, "rate (nats)": 10.0 / betas, "SAP": mig, "DCI": mig}
  fig = figures.metric_vs_beta_figure(betas, seeds, values, ncols=3)
  assert [ax.get_title() for ax in fig.axes] == list(values)  # The spare panel is removed.
  ax = fig.axes[0]
  assert ax.get_xscale() == "log" and ax.get_xlabel() == r"$\beta$"
  assert _texts(ax.get_xticklabels()) == ["1", "4", "16"]
  per_seed = [c for c in ax.collections if c.get_gid() == "seed"]
  assert len(per_seed) == 2
  np.testing.assert_allclose(per_seed[1].get_offsets()[:, 0], [1.0, 4.0, 16.0])
  np.testing.assert_allclose(per_seed[1].get_offsets().data[[0, 2], 1], [0.3, 0.7])
  (mean,) = [line for line in ax.lines if line.get_gid() == "mean"]
  np.testing.assert_allclose(mean.get_xdata(), [1.0, 4.0, 16.0])
  np.testing.assert_allclose(mean.get_ydata(), [0.2, 0.2, 0.6])  # NaN left out of the mean.
  assert _texts(fig.legends[0].get_texts()) == ["seed 0", "seed 1", "mean over seeds"]

  fig = figures.metric_vs_beta_figure(betas - 1.0, seeds, {"MIG": mig})  # Beta 0 included.
  assert fig.axes[0].get_xscale() == "symlog"
  with pytest.raises(ValueError, match=r"values\['MIG'\] must be \[n=6\]"):
    figures.metric_vs_beta_figure(betas, seeds, {"MIG": mig[:3]})


def test_save_figure_writes_valid_png_and_pdf_atomically(tmp_path, caplog):
  fig = figures.rate_distortion_figure(np.array([1.0, 2.0]), np.array([3.0, 1.0]), ["a", "b"])
  with caplog.at_level(logging.INFO):  # absl's level in a run.
    paths = figures.save_figure(fig, tmp_path / "new" / "dir" / "rd")
  # Font subsetting logged hundreds of INFO lines into a run's log per PDF.
  assert not [r for r in caplog.records if r.name.startswith("fontTools")]
  assert paths == [tmp_path / "new/dir/rd.png", tmp_path / "new/dir/rd.pdf"]
  png, pdf = (p.read_bytes() for p in paths)
  assert png.startswith(PNG_MAGIC) and len(png) > 1000
  assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
  assert sorted(p.name for p in paths[0].parent.iterdir()) == ["rd.pdf", "rd.png"]  # No temp.
  # Same figure, same bytes (no dates in the files); a ".png" on the stem is dropped.
  again = figures.save_figure(fig, tmp_path / "new" / "dir" / "rd.png")
  assert again == paths and [p.read_bytes() for p in again] == [png, pdf]


def test_figure_to_array():
  fig = figures.rate_distortion_figure(np.array([1.0, 2.0]), np.array([3.0, 1.0]), ["a", "b"])
  width, height = fig.get_size_inches()
  image = figures.figure_to_array(fig, dpi=50)
  assert image.dtype == np.uint8 and image.shape == (round(height * 50), round(width * 50), 3)
  assert (image < 128).any() and (image == 255).any()  # Ink on white.
  assert figures.figure_to_array(fig).shape[0] == round(height * fig.dpi)


@pytest.mark.parametrize("rows", [1, 3, 21])
@pytest.mark.parametrize("label", ["z1", "beta=0.25 z19 KL 2.49", "a much longer row label " * 2])
def test_grid_figures_keep_their_row_labels_inside_the_figure(label, rows):
  steps = 11
  images = np.random.default_rng(0).uniform(size=(rows * steps, 28, 28, 1))
  labels = [label] + [f"z{i}" for i in range(2, rows + 1)]
  for fig in (
    figures.traversal_figure(images, labels, np.linspace(-3.0, 3.0, steps), title="T"),
    figures.interpolation_figure(images, steps - 2, row_labels=labels, title="T"),
  ):
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    width = fig.bbox.width
    for text in fig.axes[0].get_yticklabels():
      extent = text.get_window_extent(renderer)
      assert 0.0 <= extent.x0 and extent.x1 <= width, (text.get_text(), extent, width)


def test_curves_figure_draws_each_curve_and_frames_the_converged_part():
  x = np.arange(1, 201)
  a = 300.0 * np.exp(-x / 5.0) + 230.0  # A transient, then about 230.
  b = a - 2.0
  fig = figures.curves_figure(
    {"a": (x, a), "b": (x, b)}, xlabel="epoch", ylabel="nats", ylim_from=50
  )
  (ax,) = fig.axes
  assert [line.get_gid() for line in ax.get_lines()] == ["a", "b"]
  assert _texts(ax.get_legend().get_texts()) == ["a", "b"]
  lo, hi = ax.get_ylim()
  assert lo < b[49:].min() and hi > a[49:].max() and hi < 240.0  # Not stretched to 530.
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "nats")
  with pytest.raises(ValueError, match="curve 'c'"):
    figures.curves_figure({"c": ([1, 2], [1.0])}, xlabel="x", ylabel="y")


def test_reconstruction_figure_names_each_row():
  inputs = np.random.default_rng(0).uniform(0, 1, (8, 6, 6, 3))
  recs = 1.0 - inputs
  fig = figures.reconstruction_figure(inputs, recs, columns=4, title="VAE (beta=4)")
  ax = fig.axes[0]
  labels = [t.get_text() for t in ax.get_yticklabels()]
  assert labels == ["input", "reconstruction", "input", "reconstruction"]
  assert ax.get_title() == "VAE (beta=4)"
  # The first row shows the inputs themselves (pixel (0, 0) of image 0, under the padding).
  shown = ax.images[0].get_array()
  np.testing.assert_allclose(shown[1, 1], inputs[0, 0, 0], atol=1 / 255)
  np.testing.assert_allclose(shown[1 + 7, 1], recs[0, 0, 0], atol=1 / 255)
  with pytest.raises(ValueError, match="differ"):
    figures.reconstruction_figure(inputs, recs[:4])
