"""dSprites (Matthey et al. 2017): the factor grid, an offline renderer and the published file.

dSprites is the standard ground-truth dataset for disentanglement metrics: 64x64 binary images of
one white sprite, generated from five independent factors (README of
https://github.com/deepmind/dsprites-dataset and the ``metadata`` of its npz file):

=========== ====== =========================================================
factor      values published values
=========== ====== =========================================================
shape       3      square, ellipse, heart (stored as 1., 2., 3.)
scale       6      ``np.linspace(0.5, 1, 6)``
orientation 40     ``np.linspace(0, 2 * pi, 40)`` radians (0 and 2 pi both occur)
pos_x       32     ``np.linspace(0, 1, 32)``
pos_y       32     ``np.linspace(0, 1, 32)``
=========== ====== =========================================================

A sixth factor, colour, has a single value and is left out here, so factors are ``[n, 5]``
integer arrays of value indices in the order above; ``factor_sizes() == (3, 6, 40, 32, 32)``.
Image ``i`` of the published file has ``latents_classes[i] == (0, *factors)``, the C-order
(row-major, last factor fastest) enumeration of the grid: 737,280 images.

This module provides

* the grid arithmetic (:func:`index_to_factors`, :func:`factors_to_index`,
  :func:`sample_factors`, :func:`factor_values`), for the full grid or a sub-grid
  (:class:`Grid`; :data:`SMOKE` is a 600-image grid for tests);
* an **offline generator**, :func:`render`, which rasterizes the sprites with NumPy. It uses
  the same factor grid and gives images of the same kind (binary 64x64, sprite inside the
  frame), but it is **not byte-identical to the published images**: the sprite outlines, sizes
  and the pixel positions of ``pos_x``/``pos_y`` are this module's own choices (see
  :func:`render_values`). Numbers computed on rendered images are not comparable with numbers
  computed on the published file;
* :func:`load_published`, which reads the published npz after checking its integrity.

Pixels are ``uint8`` in {0, 1}, as in the published ``imgs`` array (multiply by 255 to view).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import NamedTuple

import numpy as np

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
SHAPE_NAMES = ("square", "ellipse", "heart")
IMAGE_SIZE = 64

# The published value of each factor, index by index (from the npz's metadata).
_FULL_SIZES = (3, 6, 40, 32, 32)
SCALE_VALUES = np.linspace(0.5, 1.0, 6)
ORIENTATION_VALUES = np.linspace(0.0, 2.0 * np.pi, 40)
POSITION_VALUES = np.linspace(0.0, 1.0, 32)

PUBLISHED_FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
PUBLISHED_URL = "https://github.com/deepmind/dsprites-dataset/raw/master/" + PUBLISHED_FILENAME
# The file's SHA-256 is not known to this module: nobody who wrote it has had a copy of the
# file whose provenance they could vouch for. Never fill this in from memory or from a
# third-party web page; pass the value you verified to load_published(sha256=...).
PUBLISHED_SHA256: str | None = None
# What *is* known with certainty is the file's git blob id in the publishing repository: the
# tree of every commit of github.com/deepmind/dsprites-dataset (last commit fa310c6, June 2017)
# lists the npz as blob d98996d..., i.e. sha1(b"blob <size>\0" + file bytes), which is what
# `git hash-object FILE` prints. It identifies exactly the bytes GitHub serves at
# PUBLISHED_URL (the file is a plain blob, not a Git LFS pointer).
PUBLISHED_GIT_BLOB_SHA1 = "d98996d3f8ee1550e06b9d4ed78d0beb478910d5"


# --------------------------------------------------------------------------
# The factor grid.


@dataclasses.dataclass(frozen=True)
class Grid:
  """A sub-grid of dSprites: for each factor, which published value indices it keeps.

  Factor arrays on a grid hold positions *within the grid*: on ``SMOKE``, scale index 1 means
  the grid's second scale, which is published scale index 5 (scale 1.0). The default is the
  full published grid.
  """

  shape: tuple[int, ...] = tuple(range(3))
  scale: tuple[int, ...] = tuple(range(6))
  orientation: tuple[int, ...] = tuple(range(40))
  pos_x: tuple[int, ...] = tuple(range(32))
  pos_y: tuple[int, ...] = tuple(range(32))

  def __post_init__(self):
    for name, full_size in zip(FACTOR_NAMES, _FULL_SIZES, strict=True):
      kept = getattr(self, name)
      if not kept or any(not 0 <= i < full_size for i in kept) or len(set(kept)) != len(kept):
        raise ValueError(
          f"Grid.{name} must be a non-empty tuple of distinct indices in [0, {full_size}), "
          f"got {kept!r}."
        )

  @property
  def factor_sizes(self) -> tuple[int, ...]:
    """Number of values of each factor on this grid, in ``FACTOR_NAMES`` order."""
    return tuple(len(getattr(self, name)) for name in FACTOR_NAMES)

  @property
  def num_images(self) -> int:
    """Number of factor combinations (images) on this grid."""
    return math.prod(self.factor_sizes)


FULL = Grid()
# 3 shapes x 2 scales x 4 orientations x 5 x 5 positions = 600 images: every shape, the two
# extreme scales, four orientations a quarter-turn (10 steps of 2 pi / 39) apart, and positions
# from edge to edge. Renders in milliseconds; for tests and smoke runs.
SMOKE = Grid(
  scale=(0, 5), orientation=(0, 10, 20, 30), pos_x=(0, 8, 16, 24, 31), pos_y=(0, 8, 16, 24, 31)
)
# 3 shapes x 6 scales x 10 orientations (every fourth) x 16 x 16 positions (every other) =
# 46,080 images: every factor keeps its range at a coarser step. The CPU-sized protocol's data.
CPU = Grid(
  orientation=tuple(range(0, 40, 4)), pos_x=tuple(range(0, 32, 2)), pos_y=tuple(range(0, 32, 2))
)
_GRIDS = {"full": FULL, "cpu": CPU, "smoke": SMOKE}


def get_grid(name: str) -> Grid:
  """The named grid: ``"full"`` (737,280 images), ``"cpu"`` (46,080) or ``"smoke"`` (600)."""
  try:
    return _GRIDS[name]
  except KeyError:
    raise ValueError(f"Unknown dSprites grid {name!r}; choose one of {sorted(_GRIDS)}.") from None


def factor_sizes(grid: Grid = FULL) -> tuple[int, ...]:
  """``(3, 6, 40, 32, 32)`` on the full grid: the number of values of each factor."""
  return grid.factor_sizes


def _check_factors(factors: np.ndarray, grid: Grid) -> np.ndarray:
  factors = np.asarray(factors)
  if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
    raise ValueError(
      f"factors must have shape [n, {len(FACTOR_NAMES)}] (columns {FACTOR_NAMES}), got "
      f"{factors.shape}."
    )
  if not np.issubdtype(factors.dtype, np.integer):
    raise TypeError(f"factors must hold integer value indices, got dtype {factors.dtype}.")
  sizes = np.asarray(grid.factor_sizes)
  if factors.size and (np.any(factors < 0) or np.any(factors >= sizes)):
    raise ValueError(f"factors out of range for a grid with factor sizes {tuple(sizes)}.")
  return factors.astype(np.int64, copy=False)


def index_to_factors(index: np.ndarray, grid: Grid = FULL) -> np.ndarray:
  """Factor indices of images ``index`` in the grid's C-order enumeration.

  Args:
    index: ``[n]`` integers in ``[0, grid.num_images)``. On the full grid these are row
      numbers of the published file.
    grid: the grid enumerated.

  Returns:
    ``[n, 5]`` int64 factor indices (shape, scale, orientation, pos_x, pos_y).
  """
  index = np.asarray(index)
  if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
    raise ValueError(f"index must be a 1-D integer array, got {index.dtype} {index.shape}.")
  if index.size and (index.min() < 0 or index.max() >= grid.num_images):
    raise ValueError(f"index out of range [0, {grid.num_images}).")
  return np.stack(np.unravel_index(index, grid.factor_sizes), axis=1).astype(np.int64)


def factors_to_index(factors: np.ndarray, grid: Grid = FULL) -> np.ndarray:
  """Inverse of :func:`index_to_factors`: ``[n, 5]`` factor indices to ``[n]`` int64 indices."""
  factors = _check_factors(factors, grid)
  return np.ravel_multi_index(tuple(factors.T), grid.factor_sizes).astype(np.int64)


def sample_factors(num: int, rng: np.random.Generator, grid: Grid = FULL) -> np.ndarray:
  """``[num, 5]`` factor indices, each factor uniform and independent (as in the dataset)."""
  return np.stack([rng.integers(size, size=num) for size in grid.factor_sizes], axis=1)


class SpriteValues(NamedTuple):
  """Continuous factor values of ``n`` sprites, each ``[n]``.

  Attributes:
    shape: int64 in {0: square, 1: ellipse, 2: heart}.
    scale: relative size in [0.5, 1].
    orientation: rotation in radians, counter-clockwise as displayed.
    pos_x: horizontal position in [0, 1], 0 at the left.
    pos_y: vertical position in [0, 1], 0 at the top.
  """

  shape: np.ndarray
  scale: np.ndarray
  orientation: np.ndarray
  pos_x: np.ndarray
  pos_y: np.ndarray


def factor_values(factors: np.ndarray, grid: Grid = FULL) -> SpriteValues:
  """The published values (``metadata['latents_possible_values']``) of grid factor indices."""
  factors = _check_factors(factors, grid)
  published = [
    np.asarray(getattr(grid, name))[factors[:, k]] for k, name in enumerate(FACTOR_NAMES)
  ]
  return SpriteValues(
    shape=published[0].astype(np.int64),
    scale=SCALE_VALUES[published[1]],
    orientation=ORIENTATION_VALUES[published[2]],
    pos_x=POSITION_VALUES[published[3]],
    pos_y=POSITION_VALUES[published[4]],
  )


# --------------------------------------------------------------------------
# Rasterization.
#
# Geometry (this module's choice, not the published one): a sprite's centre in pixel
# coordinates (pixel j covers [j, j + 1)) is _POS_OFFSET + _POS_RANGE * pos, i.e. 12.625 ...
# 51.375, a step of 1.25 px between published positions, symmetric about the image centre 32.
# On the grid every centre is a multiple of 1/8 px, so the offsets of pixel centres from it are
# exact in floating point. At scale 1 a sprite fits in a disc of radius 12 px (square corner
# 8 sqrt 2 = 11.3 px, ellipse semi-major axis 12 px, heart 11.2 px), so no sprite ever leaves
# the frame, as in the published data.
_POS_OFFSET = 12.625
_POS_RANGE = 38.75
_SQUARE_HALF_SIDE = 8.0
_ELLIPSE_SEMI_AXES = (12.0, 6.0)
# Heart: the region (x^2 + y^2 - 1)^3 <= x^2 y^3 (y up), which spans x in [-1.14, 1.14] and
# y in [-1, 1.236]; shifted by _HEART_Y_CENTRE so that its bounding box is centred, and
# scaled by _HEART_SIZE px.
_HEART_SIZE = 8.4
_HEART_Y_CENTRE = 0.118
# Side of the square window in which one sprite is rasterized by render(); pixel-centre
# offsets in it reach at least 14.5 px from the sprite centre, more than the 12 px a sprite
# needs.
_WINDOW = 32


def _inside(shape: np.ndarray, scale, orientation, du, dv) -> np.ndarray:
  """Whether pixel centres at offsets ``(du, dv)`` (px, right/down) from a sprite centre are in it.

  ``shape``, ``scale``, ``orientation``: ``[n, 1, 1]``; ``du``, ``dv``: broadcastable to
  ``[n, h, w]``. Returns a bool ``[n, h, w]`` array.
  """
  cos, sin = np.cos(orientation), np.sin(orientation)
  # Undo a counter-clockwise rotation as displayed (rows grow downward), then the scale.
  u = (cos * du - sin * dv) / scale
  v = (sin * du + cos * dv) / scale
  square = np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF_SIDE
  a, b = _ELLIPSE_SEMI_AXES
  ellipse = (u / a) ** 2 + (v / b) ** 2 <= 1.0
  x = u / _HEART_SIZE
  y = -v / _HEART_SIZE + _HEART_Y_CENTRE
  heart = (x**2 + y**2 - 1.0) ** 3 <= x**2 * y**3
  return np.where(shape == 0, square, np.where(shape == 1, ellipse, heart))


def _centre(pos: np.ndarray) -> np.ndarray:
  return _POS_OFFSET + _POS_RANGE * pos


def render_values(values: SpriteValues) -> np.ndarray:
  """Rasterizes sprites with arbitrary continuous factor values, testing every pixel.

  The reference rasterizer: a pixel is on when its centre lies inside the sprite. Shapes, in
  pixels at scale 1 before rotation: a square of side 16, an ellipse with semi-axes 12
  (horizontal) and 6, and the heart curve ``(x^2 + y^2 - 1)^3 = x^2 y^3`` scaled by 8.4 px,
  point down. The sprite is scaled by ``scale``, rotated counter-clockwise by
  ``orientation`` and centred at ``12.625 + 38.75 * pos`` px from the top-left corner. These
  choices mimic the look of dSprites; they do not reproduce its pixels.

  Costs ``n x 4096`` point tests; :func:`render` is the fast path for grid factors and gives
  the same pixels on grid values.

  Args:
    values: continuous factor values, each ``[n]``.

  Returns:
    ``[n, 64, 64, 1]`` uint8 images in {0, 1}.
  """
  shape, scale, orientation, pos_x, pos_y = (np.asarray(a) for a in values)
  if np.any((shape < 0) | (shape > 2)):
    raise ValueError("values.shape must be 0 (square), 1 (ellipse) or 2 (heart).")
  centres = np.arange(IMAGE_SIZE) + 0.5
  du = centres[None, None, :] - _centre(pos_x)[:, None, None]
  dv = centres[None, :, None] - _centre(pos_y)[:, None, None]
  col = (slice(None), None, None)
  images = _inside(shape[col], scale[col], orientation[col], du, dv)
  return images.astype(np.uint8)[..., None]


def render(factors: np.ndarray, grid: Grid = FULL) -> np.ndarray:
  """Renders the images of grid factors with the offline generator (not the published pixels).

  Each distinct (shape, scale, orientation, sub-pixel phase of the centre) is rasterized once
  in a 32x32 window and pasted at its whole-pixel offset, so the cost is dominated by memory
  traffic: the full grid (``render(index_to_factors(np.arange(737280)))``, 3 GB of output)
  takes seconds. Pixels are identical to :func:`render_values` on the factors' values.

  Args:
    factors: ``[n, 5]`` integer factor indices on ``grid``.
    grid: the grid the indices refer to.

  Returns:
    ``[n, 64, 64, 1]`` uint8 images in {0, 1}.
  """
  factors = _check_factors(factors, grid)
  values = factor_values(factors, grid)
  n = factors.shape[0]
  images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
  if n == 0:
    return images
  centre_x, centre_y = _centre(values.pos_x), _centre(values.pos_y)
  anchor_x, anchor_y = np.floor(centre_x), np.floor(centre_y)
  # Sprites differ only by shape, scale, orientation and the centre's fractional pixel
  # offset; rasterize each distinct one once.
  keys = np.stack(
    [
      values.shape.astype(np.float64),
      values.scale,
      values.orientation,
      centre_x - anchor_x,
      centre_y - anchor_y,
    ],
    axis=1,
  )
  unique_keys, sprite_of = np.unique(keys, axis=0, return_inverse=True)
  sprite_of = sprite_of.reshape(-1)
  half = _WINDOW // 2
  offsets = np.arange(-half, half) + 0.5  # Pixel centres relative to the anchor pixel.
  col = (slice(None), None, None)
  windows = _inside(
    unique_keys[:, 0].astype(np.int64)[col],
    unique_keys[:, 1][col],
    unique_keys[:, 2][col],
    offsets[None, None, :] - unique_keys[:, 3][col],
    offsets[None, :, None] - unique_keys[:, 4][col],
  ).astype(np.uint8)
  # Paste, one group of images per anchor pixel; clip windows at the frame.
  anchors = np.stack([anchor_y, anchor_x], axis=1).astype(np.int64)
  unique_anchors, group_of = np.unique(anchors, axis=0, return_inverse=True)
  group_of = group_of.reshape(-1)
  order = np.argsort(group_of, kind="stable")
  bounds = np.searchsorted(group_of[order], np.arange(len(unique_anchors) + 1))
  for g, (ay, ax) in enumerate(unique_anchors):
    members = order[bounds[g] : bounds[g + 1]]
    top, left = ay - half, ax - half
    r0, r1 = max(0, -top), min(_WINDOW, IMAGE_SIZE - top)
    c0, c1 = max(0, -left), min(_WINDOW, IMAGE_SIZE - left)
    images[members, top + r0 : top + r1, left + c0 : left + c1, 0] = windows[
      sprite_of[members], r0:r1, c0:c1
    ]
  return images


# --------------------------------------------------------------------------
# The published file.


def _file_digests(path: str) -> tuple[str, str]:
  """(SHA-256 of the file, git blob SHA-1 of the file), in one pass over 16 MiB chunks.

  Not ``hashlib.file_digest``: the git blob id hashes a header before the bytes, and both
  digests come from one read of the file.
  """
  sha256 = hashlib.sha256()
  blob = hashlib.sha1()  # The git object id; see load_published for what it guards.
  blob.update(b"blob %d\0" % os.path.getsize(path))
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      sha256.update(chunk)
      blob.update(chunk)
  return sha256.hexdigest(), blob.hexdigest()


def load_published(path: str, *, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads the published dSprites npz after verifying that it is the published file.

  ``--config.dataset=dsprites`` downloads it from :data:`PUBLISHED_URL` on first use when
  the machine is online (``vae_jax.datasets``), and calls this to verify the download before
  keeping it; offline, download it elsewhere (``curl -L -o FILE`` + :data:`PUBLISHED_URL`)
  and give its directory as ``--config.idx_dir``. Verification, in order:

  1. a SHA-256 you pass as ``sha256`` (or :data:`PUBLISHED_SHA256`, ``None`` in this
     release because it could not be established with certainty), else
  2. the file's git blob id, which must equal :data:`PUBLISHED_GIT_BLOB_SHA1`, the id under
     which the publishing repository stores the file. SHA-1 guards against corrupt or
     different downloads, not against a deliberate collision attack; pass ``sha256`` if
     that matters to you.

  A file that fails the check is refused with an error naming both digests. The row order is
  also checked: ``latents_classes`` must be the C-order enumeration of the grid.

  Args:
    path: path of the ``.npz`` file.
    sha256: expected SHA-256 (hex) of the file, if you have one you trust.

  Returns:
    ``(images, factors)``: ``[737280, 64, 64, 1]`` uint8 images in {0, 1} and
    ``[737280, 5]`` int64 factor indices, row ``i`` equal to ``index_to_factors([i])``.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"No dSprites file at {path!r}. Download {PUBLISHED_URL} (about 26 MB) and pass its path."
    )
  actual_sha256, actual_blob = _file_digests(path)
  expected_sha256 = sha256 if sha256 is not None else PUBLISHED_SHA256
  if expected_sha256 is not None:
    if actual_sha256 != expected_sha256.lower():
      raise ValueError(
        f"{path} has SHA-256 {actual_sha256}, expected {expected_sha256}. The file is not the "
        f"one you meant to load (truncated or different download); fetch {PUBLISHED_URL} again."
      )
  elif actual_blob != PUBLISHED_GIT_BLOB_SHA1:
    raise ValueError(
      f"{path} is not the published dSprites file: its git blob id is {actual_blob}, the "
      f"published file's is {PUBLISHED_GIT_BLOB_SHA1} (SHA-256 of this file: {actual_sha256}). "
      f"Download {PUBLISHED_URL} again; if you have verified this file by other means, pass "
      "its SHA-256 as load_published(path, sha256=...)."
    )
  # allow_pickle=False: only the plain arrays are read, never the pickled metadata.
  with np.load(path, allow_pickle=False) as data:
    images = np.asarray(data["imgs"])
    classes = np.asarray(data["latents_classes"])
  expected_rows = FULL.num_images
  if images.shape != (expected_rows, IMAGE_SIZE, IMAGE_SIZE) or classes.shape != (
    expected_rows,
    6,
  ):
    raise ValueError(
      f"Unexpected array shapes in {path}: imgs {images.shape}, latents_classes {classes.shape}."
    )
  factors = classes[:, 1:].astype(np.int64)
  if np.any(classes[:, 0] != 0) or not np.array_equal(
    factors, index_to_factors(np.arange(expected_rows))
  ):
    raise ValueError(f"latents_classes in {path} is not the C-order enumeration of the grid.")
  return images.astype(np.uint8, copy=False)[..., None], factors
