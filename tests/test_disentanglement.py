"""Tests for vae_jax.disentanglement.

Three kinds of check:

* hand computations on a small table (entropies, mutual information, MIG), and the
  entropies against scikit-learn's ``mutual_info_score(v, v)``;
* known answers on synthetic ground truth with four independent uniform factors: a code that
  is the factors up to a permutation and a monotone map per dimension ("aligned"), the same
  factors mixed by a 4x4 Hadamard rotation ("rotated"), and pure noise. For the rotated code
  every factor enters every code with the same weight, and a sign flip of the factor
  differences maps the code of one fixed factor onto that of another, so the population value
  of every disentanglement score is its chance value (0 for MIG, SAP, D, C; ``1 /
  num_factors`` for the beta-VAE and FactorVAE accuracies). The thresholds below are that
  value plus the finite-sample error, worked out next to each assertion;
* an end-to-end run on rendered dSprites images.

Point counts are ~10x below disentanglement_lib's so that the file runs in well under a
minute on two cores.
"""

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from vae_jax import disentanglement as dis
from vae_jax import dsprites

# Four factors with four values each (the rotation argument needs equal sizes).
SIZES = (4, 4, 4, 4)
NUM_TRAIN, NUM_TEST, NUM_EVAL = 1000, 500, 500
_HADAMARD = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0


def _aligned(factors):
  """Each code is one factor under a different strictly monotone map; codes are permuted."""
  f = factors.astype(np.float64)
  return np.stack([np.tanh(f[:, 2] / 3.0), f[:, 0] ** 1.5, -f[:, 3], np.log1p(f[:, 1])], axis=1)


def _rotated(factors):
  centred = factors.astype(np.float64) - (np.asarray(SIZES) - 1) / 2.0
  return centred @ _HADAMARD.T


def _noise_representation(seed):
  rng = np.random.default_rng(seed)

  def noise(factors):
    return rng.normal(size=(factors.shape[0], 4))

  return noise


def _unaligned(name):
  """The rotated code, or a fresh noise code."""
  return _rotated if name == "rotated" else _noise_representation(123)


def _split(representation, sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  sampler = dis.uniform_factor_sampler(sizes)
  train = dis.draw_codes(sampler, representation, sizes, NUM_TRAIN, rng)
  test = dis.draw_codes(sampler, representation, sizes, NUM_TEST, rng)
  return (*train, *test), rng


def _binomial_sigma(p, n):
  return math.sqrt(p * (1.0 - p) / n)


# --------------------------------------------------------------------------
# Hand computations.

# Eight points, two binary factors v1, v2 and three codes:
#   c1 = v1; c2 = v2 with two of eight labels flipped, independently of v1; c3 = v2.
#
#   v1: 0 0 0 0 1 1 1 1
#   v2: 0 0 1 1 0 0 1 1
#   c1: 0 0 0 0 1 1 1 1
#   c2: 0 0 1 1 0 1 1 0
#   c3: 0 0 1 1 0 0 1 1
#
# H(v1) = H(v2) = ln 2. I(c1; v1) = I(c3; v2) = ln 2; I(c1; v2) = I(c3; v1) = 0.
# c2 vs v2: p(0,0) = p(1,1) = 3/8, p(0,1) = p(1,0) = 1/8, marginals 1/2, so
#   I(c2; v2) = 2 (3/8) ln(3/2) + 2 (1/8) ln(1/2) = 0.75 ln 1.5 - 0.25 ln 2 = 0.130812 nats,
# and c2 has two ones among v1 = 0 and two among v1 = 1, so I(c2; v1) = 0.
# MIG: v1's gap is (ln 2 - 0) / ln 2 = 1; v2's is (ln 2 - 0.130812) / ln 2 = 0.811278;
# mean 0.905639.
_V = np.array([[0, 0], [0, 0], [0, 1], [0, 1], [1, 0], [1, 0], [1, 1], [1, 1]])
_C = np.array(
  [[0, 0, 0], [0, 0, 0], [0, 1, 1], [0, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]]
)
_I_C2_V2 = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)


def test_entropy_by_hand():
  np.testing.assert_allclose(dis.entropy(_V), [math.log(2.0)] * 2, rtol=1e-12)
  # Counts (2, 1, 1) of 4: H = 0.5 ln 2 + 2 (0.25 ln 4) = 1.5 ln 2 = 1.039721 nats.
  np.testing.assert_allclose(dis.entropy(np.array([[7], [7], [3], [5]])), [1.5 * math.log(2.0)])


def test_mutual_information_by_hand():
  ln2 = math.log(2.0)
  expected = [[ln2, 0.0], [0.0, _I_C2_V2], [0.0, ln2]]
  np.testing.assert_allclose(dis.mutual_information(_C, _V), expected, atol=1e-12)
  assert _I_C2_V2 == pytest.approx(0.130812, abs=1e-6)


def test_mig_by_hand():
  # mig discretizes the codes first; two values per code land in the first and last bins.
  assert dis.mig(_C.astype(float), _V) == pytest.approx(0.905639, abs=1e-6)
  # Unchanged by a permutation of the codes and strictly monotone maps of each.
  warped = np.stack([_C[:, 2] * 5.0 - 1.0, np.exp(_C[:, 0]), -_C[:, 1]], axis=1)
  assert dis.mig(warped, _V) == pytest.approx(0.905639, abs=1e-6)


def test_entropy_is_the_self_information():
  rng = np.random.default_rng(5)
  factors = rng.integers(5, size=(400, 3))
  np.testing.assert_allclose(
    dis.entropy(factors), [mutual_info_score(f, f) for f in factors.T], rtol=1e-10
  )


def test_discretize_bins_each_dimension_over_its_own_range():
  codes = np.array([[0.0, 10.0, 3.0], [0.5, 20.0, 3.0], [0.49, 15.0, 3.0], [1.0, 30.0, 3.0]])
  # Two bins: [0, 0.5) and [0.5, 1] for column 0, [10, 20) and [20, 30] for column 1.
  bins = dis.discretize(codes, num_bins=2)
  np.testing.assert_array_equal(bins[:, :2], [[0, 0], [1, 1], [0, 0], [1, 1]])
  assert len(np.unique(bins[:, 2])) == 1  # A constant column is a single bin.
  bins = dis.discretize(np.random.default_rng(0).normal(size=(1000, 3)))
  assert bins.min() == 0 and bins.max() == 19


# --------------------------------------------------------------------------
# MIG, SAP and DCI on fixed samples.


def test_mig_known_answers():
  # Aligned: each factor's top code carries all of H(v) and the others only the plug-in
  # bias, about (4 - 1)(4 - 1) / (2 * 1000) = 0.0045 nats of ln 4 = 1.39, so MIG ~ 0.997.
  codes, factors, *_ = _split(_aligned)[0]
  assert dis.mig(codes, factors) > 0.98
  # Rotated and noise: zero in the population; the top-two gap of plug-in estimates is a few
  # times their spread, sqrt(2 * 57) / (2 * 1000) = 0.005 nats (chi-square with 19 x 3 dof).
  for name in ("rotated", "noise"):
    codes, factors, *_ = _split(_unaligned(name))[0]
    assert dis.mig(codes, factors) < 0.05, name


def test_sap_known_answers():
  # Binary factors: a perfect code is classified with accuracy 1, an uninformative one with
  # chance accuracy 1/2 (balanced classes), so SAP = 1 - (best of the three other codes'
  # accuracies) ~ 1/2, not 1: the disentanglement_lib score subtracts accuracies, whose floor
  # is chance. The three chance accuracies on 500 test points have sigma = 0.022, so their
  # maximum lies within 0.5 + [-2, 4] sigma.
  binary = (2, 2, 2, 2)
  split, rng = _split(_aligned, sizes=binary)
  sigma = _binomial_sigma(0.5, NUM_TEST)
  assert 0.5 - 4 * sigma < dis.sap(*split, rng=rng) < 0.5 + 2 * sigma
  # Rotated and noise: the four codes score alike for each factor, so the gap between the
  # top two is of the order of sigma = sqrt(p (1 - p) / 500) <= 0.022.
  for name in ("rotated", "noise"):
    split, rng = _split(_unaligned(name))
    assert dis.sap(*split, rng=rng) < 0.08, name


def test_dci_known_answers():
  split, rng = _split(_aligned)
  scores = dis.dci(*split, rng=rng)
  # Each factor's trees use only its own code (the others carry no information about it).
  assert scores.disentanglement > 0.95 and scores.completeness > 0.95
  np.testing.assert_array_equal(np.argmax(scores.importance_matrix, axis=0), [1, 3, 0, 2])
  assert scores.informativeness_test == 1.0
  # Rotated: importances spread evenly over the codes, and 1 - H / ln 4 of a near-uniform
  # row is ~0; the rotation keeps the information, so the trees still predict well.
  split, rng = _split(_rotated)
  scores = dis.dci(*split, rng=rng)
  assert scores.disentanglement < 0.1 and scores.completeness < 0.1
  assert scores.informativeness_test > 0.9
  # Noise: importances as even, and test accuracy at chance 1/4 within 4 sigma of the mean of
  # four factors' accuracies on 500 points (sigma = 0.019 / 2).
  split, rng = _split(_noise_representation(123))
  scores = dis.dci(*split, rng=rng)
  assert scores.disentanglement < 0.1 and scores.completeness < 0.1
  assert abs(scores.informativeness_test - 0.25) < 4 * _binomial_sigma(0.25, NUM_TEST) / 2


# --------------------------------------------------------------------------
# The beta-VAE and FactorVAE scores (fresh draws with a factor held fixed).


def _score(metric, representation, seed=0):
  rng = np.random.default_rng(seed)
  sampler = dis.uniform_factor_sampler(SIZES)
  kwargs = {"num_train": NUM_TRAIN, "num_eval": NUM_EVAL}
  if metric is dis.factor_vae_score:
    kwargs["num_variance_estimate"] = NUM_TRAIN
  return metric(sampler, representation, SIZES, rng, **kwargs)


@pytest.mark.parametrize("metric", [dis.beta_vae_score, dis.factor_vae_score])
def test_fixed_factor_scores_known_answers(metric):
  # Aligned: the fixed factor's code does not vary within a batch, every other code does.
  scores = _score(metric, _aligned)
  assert scores.train_accuracy > 0.98 and scores.eval_accuracy > 0.98
  # Rotated and noise: the features (or votes) have the same distribution whichever factor
  # is fixed, so the expected eval accuracy is chance, 1/4, within 4 binomial sigmas of
  # 500 eval points (0.077).
  for name in ("rotated", "noise"):
    scores = _score(metric, _unaligned(name))
    assert abs(scores.eval_accuracy - 0.25) < 4 * _binomial_sigma(0.25, NUM_EVAL), name


def test_factor_vae_prunes_collapsed_codes():
  # Three extra codes: constant, standard deviation 0.01 and standard deviation 0.1. The
  # threshold 0.05 applies to the standard deviation (disentanglement_lib ``_prune_dims``), so
  # the first two are pruned and the third, whose variance 0.01 is below 0.05, stays active.
  # The aligned codes still win every vote.
  rng_noise = np.random.default_rng(1)

  def with_collapsed(factors):
    n = factors.shape[0]
    extra = np.concatenate(
      [np.zeros((n, 1)), rng_noise.normal(scale=[0.01, 0.1], size=(n, 2))], axis=1
    )
    return np.concatenate([extra, _aligned(factors)], axis=1)

  scores = _score(dis.factor_vae_score, with_collapsed)
  assert scores.num_active_dims == 5
  assert scores.eval_accuracy > 0.98
  everything_collapsed = _score(dis.factor_vae_score, lambda f: np.zeros((f.shape[0], 3)))
  assert everything_collapsed == dis.FactorVaeScores(0.0, 0.0, 0)


def test_scores_are_deterministic_for_a_seed_and_chunking():
  sampler = dis.uniform_factor_sampler(SIZES)
  small = {"num_train": 200, "num_eval": 100}
  for metric in (dis.beta_vae_score, dis.factor_vae_score):
    a = metric(sampler, _rotated, SIZES, np.random.default_rng(3), **small)
    b = metric(sampler, _rotated, SIZES, np.random.default_rng(3), **small, chunk_size=100)
    assert a == b
    c = metric(sampler, _rotated, SIZES, np.random.default_rng(4), **small)
    assert a != c


# --------------------------------------------------------------------------
# Input errors and the end-to-end run.


def test_bad_inputs_raise():
  codes = np.zeros((10, 3))
  factors = np.zeros((10, 2), np.int64)
  with pytest.raises(TypeError, match="integer factor indices"):
    dis.mig(codes, factors.astype(float))
  with pytest.raises(ValueError, match="rows"):
    dis.mig(codes[:5], factors)
  with pytest.raises(ValueError, match="single value"):
    dis.mig(codes, factors)
  with pytest.raises(ValueError, match="NaN"):
    dis.mig(np.full((10, 3), np.nan), factors)
  sampler = dis.uniform_factor_sampler(SIZES)
  with pytest.raises(ValueError, match=r"representation\(factors\) must return"):
    dis.beta_vae_score(sampler, lambda f: np.zeros(f.shape[0]), SIZES, np.random.default_rng(0))
  with pytest.raises(ValueError, match="outside factor_sizes"):
    dis.beta_vae_score(sampler, _aligned, (2, 2, 2, 2), np.random.default_rng(0))


def _image_features(images):
  """A hand-made 'encoder': centroid column, centroid row and sqrt(area) of the sprite.

  In units of the image side, so that the codes are O(1) like a VAE's posterior means.
  """
  mask = images[..., 0].astype(np.float64)
  centres = np.arange(mask.shape[1]) + 0.5
  area = mask.sum(axis=(1, 2))
  cols = (mask.sum(axis=1) * centres).sum(axis=1) / area
  rows = (mask.sum(axis=2) * centres).sum(axis=1) / area
  return np.stack([cols, rows, np.sqrt(area)], axis=1) / mask.shape[1]


def test_all_metrics_on_rendered_dsprites():
  grid = dsprites.SMOKE
  sizes = grid.factor_sizes

  def sample_factors(num, rng):
    return dsprites.sample_factors(num, rng, grid)

  def representation(factors):
    return _image_features(dsprites.render(factors, grid))

  counts = {
    "num_train": 300,
    "num_test": 200,
    "num_eval": 100,
    "batch_size": 16,
    "num_variance_estimate": 300,
  }
  first = dis.all_metrics(sample_factors, representation, sizes, np.random.default_rng(0), **counts)
  again = dis.all_metrics(sample_factors, representation, sizes, np.random.default_rng(0), **counts)
  assert first == again
  assert set(first) == {
    "mig",
    "sap",
    "dci_disentanglement",
    "dci_completeness",
    "dci_informativeness_train",
    "dci_informativeness_test",
    "beta_vae_train_accuracy",
    "beta_vae_eval_accuracy",
    "factor_vae_train_accuracy",
    "factor_vae_eval_accuracy",
    "factor_vae_num_active_dims",
  }
  assert all(np.isfinite(v) for v in first.values())
  assert first["factor_vae_num_active_dims"] == 3
  # Known structure: the centroid column, centroid row and sqrt(area) are the trees' most
  # important codes for pos_x, pos_y and scale respectively.
  rng = np.random.default_rng(1)
  split = [
    *dis.draw_codes(sample_factors, representation, sizes, 300, rng),
    *dis.draw_codes(sample_factors, representation, sizes, 200, rng),
  ]
  importance = dis.dci(*split, rng=rng).importance_matrix
  np.testing.assert_array_equal(np.argmax(importance[:, [3, 4, 1]], axis=0), [0, 1, 2])


def test_a_random_rotation_of_dsprites_factors_fools_the_classifier_scores():
  """What docs/evaluation.md warns of: an entangled code (a random rotation of dSprites-sized
  factors) scores far above chance on the beta-VAE metric (about 0.90) and FactorVAE (about
  0.80), while MIG stays low (about 0.25)."""
  sizes = (3, 6, 40, 32, 32)
  rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))

  def rotated(factors):
    return ((factors / (np.asarray(sizes) - 1.0)) * 2.0 - 1.0) @ rotation

  sampler = dis.uniform_factor_sampler(sizes)
  beta_vae = dis.beta_vae_score(
    sampler, rotated, sizes, np.random.default_rng(1), num_train=2000, num_eval=1000
  )
  assert beta_vae.eval_accuracy > 0.8  # Chance: 0.2.
  factor_vae = dis.factor_vae_score(
    sampler, rotated, sizes, np.random.default_rng(1), num_train=2000, num_eval=1000,
    num_variance_estimate=2000,
  )  # fmt: skip
  assert factor_vae.eval_accuracy > 0.6
  factors = sampler(5000, np.random.default_rng(2))
  assert dis.mig(rotated(factors), factors) < 0.4
