"""Tests for vae_jax.dsprites: grid arithmetic, the offline renderer and the file check.

No test reads or downloads the published file; the renderer is checked against geometric
facts (symmetry, area, position) that a wrong rotation, scale or offset would break.
"""

import hashlib

import numpy as np
import pytest

from vae_jax import dsprites


def _centroids(images):
  """[n, 2] (row, column) pixel-centre centroids of [n, 64, 64, 1] binary images."""
  mask = images[..., 0].astype(np.float64)
  centres = np.arange(dsprites.IMAGE_SIZE) + 0.5
  area = mask.sum(axis=(1, 2))
  rows = (mask.sum(axis=2) * centres).sum(axis=1) / area
  cols = (mask.sum(axis=1) * centres).sum(axis=1) / area
  return np.stack([rows, cols], axis=1)


def _values(shape, scale, orientation, pos_x, pos_y):
  """SpriteValues of equal-length arrays broadcast from scalars and [n] arrays."""
  arrays = np.broadcast_arrays(
    *(np.atleast_1d(a) for a in (shape, scale, orientation, pos_x, pos_y))
  )
  return dsprites.SpriteValues(arrays[0].astype(np.int64), *(a.astype(float) for a in arrays[1:]))


# --------------------------------------------------------------------------
# The grid.


def test_grid_sizes():
  assert dsprites.factor_sizes() == (3, 6, 40, 32, 32)
  assert dsprites.FULL.num_images == 737_280
  assert dsprites.SMOKE.factor_sizes == (3, 2, 4, 5, 5)
  assert dsprites.get_grid("smoke").num_images == 600


def test_index_order_matches_published_enumeration():
  # The published file varies posY fastest, then posX, orientation, scale, shape (README and
  # dsprites_reloading_example.ipynb: image 1 has latents (0, 0, 0, 0, 0, 1)).
  factors = dsprites.index_to_factors(np.array([0, 1, 32, 32 * 32, 737_279]))
  np.testing.assert_array_equal(
    factors,
    [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [2, 5, 39, 31, 31]],
  )
  bases = np.array([6 * 40 * 32 * 32, 40 * 32 * 32, 32 * 32, 32, 1])
  rng = np.random.default_rng(0)
  sample = dsprites.sample_factors(1000, rng)
  np.testing.assert_array_equal(dsprites.factors_to_index(sample), sample @ bases)


@pytest.mark.parametrize("grid", [dsprites.FULL, dsprites.SMOKE], ids=["full", "smoke"])
def test_index_factors_round_trip(grid):
  index = np.arange(grid.num_images)
  factors = dsprites.index_to_factors(index, grid)
  assert factors.shape == (grid.num_images, 5) and factors.dtype == np.int64
  np.testing.assert_array_equal(dsprites.factors_to_index(factors, grid), index)
  # Every combination occurs exactly once.
  assert len(np.unique(factors, axis=0)) == grid.num_images


def test_sample_factors_range_and_determinism():
  a = dsprites.sample_factors(500, np.random.default_rng(3))
  b = dsprites.sample_factors(500, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (500, 5)
  assert np.all(a >= 0) and np.all(a < np.array(dsprites.factor_sizes()))
  # Each factor covers its range (500 draws over at most 40 values).
  assert [len(np.unique(column)) for column in a.T] == [3, 6, 40, 32, 32]


def test_smoke_grid_values_are_published_values():
  values = dsprites.factor_values(np.array([[2, 1, 1, 4, 0]]), dsprites.SMOKE)
  assert values.shape[0] == 2
  np.testing.assert_allclose(
    [values.scale[0], values.orientation[0], values.pos_x[0], values.pos_y[0]],
    [1.0, 10 * 2 * np.pi / 39, 1.0, 0.0],
  )


def test_bad_input_raises():
  with pytest.raises(ValueError, match="Unknown dSprites grid"):
    dsprites.get_grid("tiny")
  with pytest.raises(ValueError, match="distinct indices"):
    dsprites.Grid(scale=(0, 6))
  with pytest.raises(ValueError, match="out of range"):
    dsprites.render(np.array([[3, 0, 0, 0, 0]]))
  with pytest.raises(ValueError, match=r"\[n, 5\]"):
    dsprites.factors_to_index(np.zeros((2, 6), np.int64))
  with pytest.raises(TypeError, match="integer"):
    dsprites.render(np.zeros((1, 5)))


# --------------------------------------------------------------------------
# The renderer.


def test_render_shape_dtype_values():
  factors = dsprites.sample_factors(64, np.random.default_rng(1))
  images = dsprites.render(factors)
  assert images.shape == (64, 64, 64, 1) and images.dtype == np.uint8
  assert set(np.unique(images)) == {0, 1}
  assert np.all(images.sum(axis=(1, 2, 3)) > 0)
  assert dsprites.render(np.zeros((0, 5), np.int64)).shape == (0, 64, 64, 1)


def test_render_matches_reference_rasterizer_at_the_extremes():
  # Every shape and orientation at the largest scale, at the four corner positions: the fast
  # path's 32x32 window must hold the whole sprite, and no sprite may touch the frame.
  grid_values = np.array(
    [
      [shape, 5, orientation, x, y]
      for shape in range(3)
      for orientation in range(40)
      for x in (0, 31)
      for y in (0, 31)
    ]
  )
  fast = dsprites.render(grid_values)
  reference = dsprites.render_values(dsprites.factor_values(grid_values))
  np.testing.assert_array_equal(fast, reference)
  frame = np.ones((64, 64), bool)
  frame[1:-1, 1:-1] = False
  assert not fast[..., 0][:, frame].any()


def test_render_matches_reference_rasterizer_on_random_factors():
  factors = dsprites.sample_factors(300, np.random.default_rng(2))
  np.testing.assert_array_equal(
    dsprites.render(factors), dsprites.render_values(dsprites.factor_values(factors))
  )


def test_square_is_symmetric_under_quarter_turns():
  # At pos (0.5, 0.5) the sprite centre is the image centre (32, 32), so np.rot90 maps the
  # pixel grid onto itself; a square rotated by any angle is unchanged by a further quarter
  # turn. Exact equality: the rotated pixel's test evaluates the same products exactly.
  orientation = dsprites.ORIENTATION_VALUES
  for scale in (0.5, 0.8, 1.0):
    images = dsprites.render_values(_values(0, scale, orientation, 0.5, 0.5))[..., 0]
    np.testing.assert_array_equal(np.rot90(images, axes=(1, 2)), images)
  # The check has power: the ellipse and the heart are not quarter-turn symmetric.
  for shape in (1, 2):
    image = dsprites.render_values(_values(shape, 1.0, 0.0, 0.5, 0.5))[0, ..., 0]
    assert np.sum(np.rot90(image) != image) > 0.2 * image.sum()


def test_orientation_and_heart_direction_as_documented():
  # Counter-clockwise as displayed (rows grow downward): the long axis of an ellipse,
  # measured from the second moments of its pixels, is at the orientation (mod pi) within
  # 0.05 rad (3 degrees): pixelization of a 24 x 12 px ellipse moves the measured axis by up to
  # 0.025 rad here, while a wrong sense or offset of rotation would be off by up to pi / 2.
  orientation = dsprites.ORIENTATION_VALUES[:20]  # [0, pi)
  images = dsprites.render_values(_values(1, 1.0, orientation, 0.5, 0.5))[..., 0]
  measured = []
  for image in images:
    rows, cols = np.nonzero(image)
    x, y_up = cols - cols.mean(), -(rows - rows.mean())
    measured.append(0.5 * np.arctan2(2 * np.mean(x * y_up), np.mean(x**2) - np.mean(y_up**2)))
  np.testing.assert_allclose(np.mod(measured, np.pi), orientation, atol=0.05)
  # The heart points down: its lobes put more pixels above its centre than below.
  image = dsprites.render_values(_values(2, 1.0, 0.0, 0.5, 0.5))[0, ..., 0]
  assert image[:32].sum() > 1.2 * image[32:].sum()


def test_heart_differs_from_ellipse_and_square():
  rng = np.random.default_rng(4)
  n = 50
  common = (rng.integers(6, size=n), rng.integers(40, size=n), rng.integers(32, size=(2, n)))
  images = {}
  for shape in range(3):
    factors = np.stack([np.full(n, shape), common[0], common[1], *common[2]], axis=1)
    images[shape] = dsprites.render(factors).astype(bool)
  for other in (0, 1):
    differing = np.sum(images[2] != images[other], axis=(1, 2, 3))
    union = np.sum(images[2] | images[other], axis=(1, 2, 3))
    assert np.all(differing > 0.2 * union)


def test_scale_changes_pixel_count_monotonically():
  # Area grows as scale^2: from scale 0.5 to 1 by a factor 4, within the rasterization error
  # (perimeter / area, about 15% at scale 0.5 for these sizes).
  for shape in range(3):
    for orientation in (0, 7, 23):
      factors = np.array([[shape, s, orientation, 13, 20] for s in range(6)])
      counts = dsprites.render(factors).sum(axis=(1, 2, 3))
      assert np.all(np.diff(counts) > 0), (shape, orientation, counts)
      assert 3.4 < counts[-1] / counts[0] < 4.6, (shape, orientation, counts)


@pytest.mark.parametrize("axis", ["x", "y"])
def test_position_moves_the_centroid(axis):
  positions = np.arange(32)
  for shape in range(3):
    fixed = np.full(32, 16)
    x, y = (positions, fixed) if axis == "x" else (fixed, positions)
    factors = np.stack([np.full(32, shape), np.full(32, 5), np.full(32, 3), x, y], axis=1)
    rows_cols = _centroids(dsprites.render(factors))
    moving, still = (rows_cols[:, 1], rows_cols[:, 0]) if axis == "x" else rows_cols.T
    # Each step moves the sprite centre by 38.75 / 31 = 1.25 px; the centroid of a rasterized
    # shape follows it within a fraction of a pixel.
    assert np.all(np.diff(moving) > 0.5)
    np.testing.assert_allclose(moving[-1] - moving[0], 38.75, atol=1.0)
    assert np.ptp(still) < 1.0


# --------------------------------------------------------------------------
# The published file's check (no download: files made here).


def test_git_blob_id_of_known_contents(tmp_path):
  # The git object ids of an empty file and of b"hello\n" (`git hash-object`).
  empty, hello = tmp_path / "empty", tmp_path / "hello"
  empty.write_bytes(b"")
  hello.write_bytes(b"hello\n")
  assert dsprites._file_digests(str(empty))[1] == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
  sha256, blob = dsprites._file_digests(str(hello))
  assert blob == "ce013625030ba8dba906f756967f9e9ca394464a"
  assert sha256 == hashlib.sha256(b"hello\n").hexdigest()


def test_load_published_refuses_other_files(tmp_path):
  path = tmp_path / dsprites.PUBLISHED_FILENAME
  np.savez(path, imgs=np.zeros((2, 64, 64), np.uint8), latents_classes=np.zeros((2, 6), np.int64))
  with pytest.raises(ValueError, match="not the published dSprites file"):
    dsprites.load_published(str(path))
  with pytest.raises(ValueError, match="expected"):
    dsprites.load_published(str(path), sha256="0" * 64)
  # With its own checksum the file passes the integrity check and fails the content check.
  own = hashlib.sha256(path.read_bytes()).hexdigest()
  with pytest.raises(ValueError, match="Unexpected array shapes"):
    dsprites.load_published(str(path), sha256=own)
  with pytest.raises(FileNotFoundError, match="Download"):
    dsprites.load_published(str(tmp_path / "missing.npz"))


# --------------------------------------------------------------------------
# dSprites through the input pipeline, a beta-TCVAE run and its evaluation.


def test_dsprites_through_the_tfds_path(tmp_path):
  from vae_jax import datasets

  data = datasets.load("dsprites_smoke", data_dir=str(tmp_path))
  grid = datasets.factor_grid("dsprites_smoke")
  train, test = data["train"], data["test"]
  assert train.images.shape == (600, 64, 64, 1) and train.labels.shape == (600, 5)
  # Row i is the grid's i-th factor combination, its pixels the renderer's (0/255 stored).
  np.testing.assert_array_equal(train.labels, dsprites.index_to_factors(np.arange(600), grid))
  np.testing.assert_array_equal(train.images // 255, dsprites.render(train.labels, grid))
  assert set(np.unique(train.images)) == {0, 255}
  idx = datasets.dsprites_test_indices(600)
  np.testing.assert_array_equal(test.labels, train.labels[idx])
  assert len(idx) == 60 and datasets.factor_grid("mnist") is None


def test_beta_tcvae_run_and_its_disentanglement_scores(tmp_path):
  """configs/dsprites_sweep.py:smoke,tcvae as one model, trained and evaluated."""
  import importlib.util
  import json
  import pathlib

  from vae_jax import evaluate, train

  path = pathlib.Path(__file__).parents[1] / "configs" / "dsprites_sweep.py"
  spec = importlib.util.spec_from_file_location("dsprites_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke,tcvae")
  assert config.objective == "beta_tcvae" and config.sweep.cross
  config.sweep.betas, config.beta = (), 4.0  # One model.
  config.data_dir, config.progress_bar = str(tmp_path / "tfds"), False
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert any("total_correlation_mws" in r for r in rows if r["split"] == "train")
  results = evaluate.evaluate_workdir(config, tmp_path / "run", num_samples=2)
  scores = results["disentanglement"]
  for name in ("mig", "sap", "dci_disentanglement", "dci_completeness", "beta_vae", "factor_vae"):
    assert 0.0 <= scores[name] <= 1.0, name
  assert scores["counts_preset"] == "cpu" and scores["counts"]["num_train"] == 1000


def test_disentanglement_with_a_validation_split_scores_the_whole_grid(tmp_path):
  """validation_examples hold out the last images of the training split; the metrics still
  index every image of the factor grid (indexing the shortened split would read the wrong
  images, or past its end: an IndexError)."""
  import importlib.util
  import pathlib

  from vae_jax import evaluate, train

  path = pathlib.Path(__file__).parents[1] / "configs" / "dsprites_sweep.py"
  spec = importlib.util.spec_from_file_location("dsprites_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.sweep.betas, config.beta = (), 2.0  # One model.
  config.validation_examples = 120  # Of the 600 images: factor indices 480-599 held out.
  config.data_dir, config.progress_bar = str(tmp_path / "tfds"), False
  train.train_and_evaluate(config, str(tmp_path / "run"))
  results = evaluate.evaluate_workdir(config, tmp_path / "run", num_samples=2)
  assert results["params"].startswith("best")
  for name in ("mig", "sap", "beta_vae", "factor_vae"):
    assert 0.0 <= results["disentanglement"][name] <= 1.0, name
