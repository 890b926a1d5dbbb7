"""Supervised disentanglement metrics, as benchmarked by Locatello et al. (2019).

Locatello et al., "Challenging Common Assumptions in the Unsupervised Learning of Disentangled
Representations", ICML 2019, compared representations with six metrics using the
implementation and settings of disentanglement_lib
(https://github.com/google-research/disentanglement_lib, ``evaluation/metrics/*.py`` for the
algorithms and ``config/unsupervised_study_v1/metric_configs/*.gin`` for the settings). This
module implements five of them with those settings as defaults:

* :func:`beta_vae_score` (Higgins et al. 2017), :func:`factor_vae_score` (Kim & Mnih 2018),
* :func:`mig` (Chen et al. 2018), :func:`sap` (Kumar et al. 2018),
* :func:`dci` (Eastwood & Williams 2018),

and :func:`all_metrics` runs all of them on one representation. Each function documents
where it follows disentanglement_lib and the few places where it deliberately does not.

The module knows nothing about models or images. Its inputs are

* ``factors: [n, num_factors]`` integer ground-truth factor indices (discrete factors) and
  ``codes: [n, num_codes]`` float representations (e.g. posterior means) of the same points;
* or, for the metrics that need fresh draws with a factor held fixed, two callables:
  ``sample_factors(num, rng) -> [num, num_factors]`` (a :data:`FactorSampler`) and
  ``representation(factors) -> [num, num_codes]`` (a :data:`RepresentationFn`: render the
  images of those factors, encode them, return e.g. the posterior means), plus the
  ``factor_sizes``.

All randomness comes from an ``np.random.Generator`` passed in; the scikit-learn models get
seeds drawn from it, so a given seed gives the same numbers. Only NumPy and scikit-learn are
used (scikit-learn is imported by the functions that fit models).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

# sample_factors(num, rng) -> [num, num_factors] integer factor indices, each in
# [0, factor_sizes[k]); draws from the ground-truth distribution of factors.
FactorSampler = Callable[[int, np.random.Generator], np.ndarray]
# representation(factors [n, num_factors]) -> codes [n, num_codes]: observe the data generated
# by the factors and encode it. Must be deterministic given the factors (use posterior means,
# not samples) for the beta-VAE and FactorVAE scores to mean what they say.
RepresentationFn = Callable[[np.ndarray], np.ndarray]

# Point counts of disentanglement_lib's unsupervised_study_v1 metric configs (Locatello et al.
# 2019): mig.gin num_train; sap_score.gin and dci.gin num_train/num_test;
# beta_vae_sklearn.gin and factor_vae_metric.gin num_train/num_eval/batch_size, and
# factor_vae_metric.gin num_variance_estimate.
DISENTANGLEMENT_LIB_COUNTS: Mapping[str, int] = {
  "num_train": 10_000,
  "num_test": 5_000,
  "num_eval": 5_000,
  "batch_size": 64,
  "num_variance_estimate": 10_000,
}
# A preset for a CPU run, ~10x fewer points: all_metrics(..., **CPU_COUNTS). Accuracies on
# num_eval = 500 points have a binomial standard error of up to 0.022 (0.5 / sqrt(500)), and
# MIG's plug-in estimate is biased upward by about (bins - 1)(values - 1) / (2 num_train) nats
# per code/factor pair (Miller-Madow), so compare models only at equal counts.
CPU_COUNTS: Mapping[str, int] = {
  "num_train": 1_000,
  "num_test": 500,
  "num_eval": 500,
  "batch_size": 64,
  "num_variance_estimate": 1_000,
}


class DciScores(NamedTuple):
  """Eastwood & Williams (2018) scores; see :func:`dci`.

  Attributes:
    disentanglement: importance-weighted mean over codes of ``1 - H_K(row)``.
    completeness: importance-weighted mean over factors of ``1 - H_D(column)``.
    informativeness_train: mean over factors of the boosted trees' training accuracy.
    informativeness_test: mean over factors of their accuracy on the test points.
    importance_matrix: ``[num_codes, num_factors]`` feature importances.
  """

  disentanglement: float
  completeness: float
  informativeness_train: float
  informativeness_test: float
  importance_matrix: np.ndarray


class BetaVaeScores(NamedTuple):
  """Higgins et al. (2017) score; see :func:`beta_vae_score`. Chance is ``1 / num_factors``."""

  train_accuracy: float
  eval_accuracy: float


class FactorVaeScores(NamedTuple):
  """Kim & Mnih (2018) score; see :func:`factor_vae_score`. Chance is ``1 / num_factors``.

  Attributes:
    train_accuracy: majority-vote accuracy on the votes it was fitted to.
    eval_accuracy: accuracy on fresh votes.
    num_active_dims: codes whose standard deviation reached the pruning threshold.
  """

  train_accuracy: float
  eval_accuracy: float
  num_active_dims: int


# --------------------------------------------------------------------------
# Input checks.


def _check_factors(factors: np.ndarray, name: str = "factors") -> np.ndarray:
  factors = np.asarray(factors)
  if factors.ndim != 2:
    raise ValueError(f"{name} must be [n, num_factors], got shape {factors.shape}.")
  if not np.issubdtype(factors.dtype, np.integer):
    raise TypeError(
      f"{name} must hold integer factor indices (discrete factors), got dtype {factors.dtype}. "
      "Map continuous factor values to the index of their value first."
    )
  return factors


def _check_codes(codes: np.ndarray, n: int | None = None, name: str = "codes") -> np.ndarray:
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"{name} must be [n, num_codes], got shape {codes.shape}.")
  if not np.issubdtype(codes.dtype, np.floating) and not np.issubdtype(codes.dtype, np.integer):
    raise TypeError(f"{name} must be numeric, got dtype {codes.dtype}.")
  if n is not None and codes.shape[0] != n:
    raise ValueError(f"{name} has {codes.shape[0]} rows but the factors have {n}.")
  if not np.all(np.isfinite(codes)):
    raise ValueError(f"{name} contains NaN or infinite values.")
  return codes.astype(np.float64, copy=False)


def _check_pair(codes: np.ndarray, factors: np.ndarray, suffix: str = "") -> tuple:
  factors = _check_factors(factors, "factors" + suffix)
  return _check_codes(codes, factors.shape[0], "codes" + suffix), factors


def _seed(rng: np.random.Generator) -> int:
  """A seed for a scikit-learn estimator, drawn from ``rng``."""
  return int(rng.integers(2**31 - 1))


# --------------------------------------------------------------------------
# Information theory on discrete samples.


def discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
  """Histogram-discretizes each code dimension over its own range.

  disentanglement_lib ``utils._histogram_discretize`` (``num_bins = 20`` in
  ``unsupervised_study_v1/metric_configs/mig.gin``): ``num_bins`` equal-width bins spanning
  ``[min, max]`` of the dimension; the maximum falls in the last bin. A constant dimension
  maps to a single bin.

  Args:
    codes: ``[n, num_codes]`` real codes.
    num_bins: bins per dimension.

  Returns:
    ``[n, num_codes]`` int64 bin indices in ``[0, num_bins)``.
  """
  codes = _check_codes(codes)
  if num_bins < 1:
    raise ValueError(f"num_bins must be positive, got {num_bins}.")
  out = np.empty(codes.shape, np.int64)
  for j, column in enumerate(codes.T):
    edges = np.histogram_bin_edges(column, bins=num_bins)
    # Bin b holds edges[b] <= x < edges[b + 1]; the top edge belongs to the last bin.
    out[:, j] = np.digitize(column, edges[1:-1])
  return out


def entropy(factors: np.ndarray) -> np.ndarray:
  """Plug-in entropy of each factor, in nats.

  ``H(v_k) = -sum_a p(a) log p(a)`` with ``p`` the empirical frequencies; disentanglement_lib
  ``utils.discrete_entropy`` computes the same number as ``mutual_info_score(v, v)``.

  Args:
    factors: ``[n, num_factors]`` discrete labels (integers).

  Returns:
    ``[num_factors]`` entropies in nats.
  """
  factors = _check_factors(factors)
  out = np.empty(factors.shape[1])
  for k, column in enumerate(factors.T):
    _, counts = np.unique(column, return_counts=True)
    p = counts / column.shape[0]
    out[k] = -np.sum(p * np.log(p))
  return out


def mutual_information(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Plug-in mutual information between each discrete code and each factor, in nats.

  ``I(c_j; v_k) = sum_{a,b} p(a, b) log(p(a, b) / (p(a) p(b)))`` from the empirical joint
  histogram: scikit-learn's ``sklearn.metrics.mutual_info_score``, which
  disentanglement_lib's ``utils.discrete_mutual_info`` calls too (the tests check it against
  a hand computation). The plug-in estimate is biased upward by about
  ``(A - 1)(B - 1) / (2 n)`` nats for ``A`` and ``B`` observed values (Miller-Madow).

  Args:
    discrete_codes: ``[n, num_codes]`` discrete codes (e.g. from :func:`discretize`).
    factors: ``[n, num_factors]`` discrete factors.

  Returns:
    ``[num_codes, num_factors]`` mutual information in nats.
  """
  factors = _check_factors(factors)
  discrete_codes = _check_factors(discrete_codes, "discrete_codes")
  if discrete_codes.shape[0] != factors.shape[0]:
    raise ValueError(
      f"discrete_codes has {discrete_codes.shape[0]} rows, factors {factors.shape[0]}."
    )
  from sklearn import metrics

  out = np.empty((discrete_codes.shape[1], factors.shape[1]))
  for j, code in enumerate(discrete_codes.T):
    for k, factor in enumerate(factors.T):
      out[j, k] = metrics.mutual_info_score(factor, code)
  return out


# --------------------------------------------------------------------------
# Metrics on fixed samples.


def _require_varying_factors(factors: np.ndarray, what: str) -> None:
  constant = [k for k, column in enumerate(factors.T) if np.all(column == column[0])]
  if constant:
    raise ValueError(
      f"Factors {constant} take a single value in the {what} points; a metric cannot score a "
      "constant factor. Drop those columns or draw more points."
    )


def mig(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> float:
  """Mutual Information Gap (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs").

  ``MIG = mean_k (I(c_(1); v_k) - I(c_(2); v_k)) / H(v_k)`` where ``c_(1)``, ``c_(2)`` are the
  codes with the largest and second-largest mutual information with factor ``v_k``. As in
  disentanglement_lib ``mig._compute_mig``, the codes are histogram-discretized
  (:func:`discretize`, 20 bins) and both terms are plug-in estimates on the same points
  (disentanglement_lib draws ``num_train = 10,000`` points, ``mig.gin``). Chen et al. instead
  estimate I(z_j; v_k) from the encoder's distribution; numbers from the two are not
  comparable.

  Args:
    codes: ``[n, num_codes]`` codes, ``num_codes >= 2``.
    factors: ``[n, num_factors]`` integer factors, each taking at least two values.
    num_bins: histogram bins per code dimension.

  Returns:
    MIG in [0, 1] (up to estimation error): 1 when each factor is captured by one code
    alone.
  """
  codes, factors = _check_pair(codes, factors)
  if codes.shape[1] < 2:
    raise ValueError("MIG needs at least two code dimensions (it is a gap between the top two).")
  _require_varying_factors(factors, "given")
  info = mutual_information(discretize(codes, num_bins), factors)
  top_two = np.sort(info, axis=0)[::-1][:2]
  return float(np.mean((top_two[0] - top_two[1]) / entropy(factors)))


def sap(
  codes_train: np.ndarray,
  factors_train: np.ndarray,
  codes_test: np.ndarray,
  factors_test: np.ndarray,
  *,
  rng: np.random.Generator,
) -> float:
  """Separated Attribute Predictability (Kumar et al. 2018), for discrete factors.

  Kumar et al., "Variational Inference of Disentangled Latent Concepts from Unlabeled
  Observations", ICLR 2018, Sec. 3. Following disentanglement_lib ``sap_score`` with
  ``continuous_factors = False`` (``sap_score.gin``; 10,000 train and 5,000 test points): for
  each code ``j`` and factor ``k`` a linear SVM on the single code,
  ``sklearn.svm.LinearSVC(C=0.01, class_weight="balanced")``, is fitted on the training points
  and scored by plain accuracy on the test points, giving ``S[j, k]``; SAP is the mean over
  factors of the gap between the largest and second-largest ``S[:, k]``.

  SAP does not reach 1 for a perfect code. Accuracy has its floor at chance, not 0: an
  uninformative code still classifies a balanced binary factor half right, so a perfect code
  of binary factors scores 1 - 1/2 = 1/2. And a one-vs-rest linear classifier on one number
  separates only the extreme values of a factor, so on a factor with many values (e.g.
  dSprites' positions) even the perfect code's accuracy is far below 1. SAP compares
  representations; it does not measure distance from an ideal.

  scikit-learn >= 1.5 picks LinearSVC's primal or dual solver automatically
  (``dual="auto"``: the primal here, with more points than features); the versions
  disentanglement_lib ran under used the dual. Both solve the same convex problem.

  Args:
    codes_train: ``[n_train, num_codes]`` codes, ``num_codes >= 2``.
    factors_train: ``[n_train, num_factors]`` integer factors.
    codes_test: ``[n_test, num_codes]`` codes.
    factors_test: ``[n_test, num_factors]`` integer factors.
    rng: source of the SVMs' seeds (liblinear shuffles its coordinate order).

  Returns:
    SAP in [0, 1].
  """
  from sklearn import svm

  codes_train, factors_train = _check_pair(codes_train, factors_train, "_train")
  codes_test, factors_test = _check_pair(codes_test, factors_test, "_test")
  if codes_train.shape[1] < 2:
    raise ValueError("SAP needs at least two code dimensions (it is a gap between the top two).")
  _require_varying_factors(factors_train, "training")
  scores = np.empty((codes_train.shape[1], factors_train.shape[1]))
  for j in range(codes_train.shape[1]):
    for k in range(factors_train.shape[1]):
      classifier = svm.LinearSVC(C=0.01, class_weight="balanced", random_state=_seed(rng))
      classifier.fit(codes_train[:, j : j + 1], factors_train[:, k])
      scores[j, k] = np.mean(classifier.predict(codes_test[:, j : j + 1]) == factors_test[:, k])
  top_two = np.sort(scores, axis=0)[::-1][:2]
  return float(np.mean(top_two[0] - top_two[1]))


def _one_minus_normalized_entropy(weights: np.ndarray, base: int) -> np.ndarray:
  """``1 - H(p) / log(base)`` for each row of non-negative ``weights``, ``p = row / sum``.

  An all-zero row counts as uniform (score 0), as disentanglement_lib's ``+ 1e-11`` does.
  """
  weights = weights + 1e-11
  p = weights / weights.sum(axis=1, keepdims=True)
  return 1.0 + np.sum(p * np.log(p), axis=1) / np.log(base)


def dci(
  codes_train: np.ndarray,
  factors_train: np.ndarray,
  codes_test: np.ndarray,
  factors_test: np.ndarray,
  *,
  rng: np.random.Generator,
) -> DciScores:
  """Disentanglement, completeness, informativeness (Eastwood & Williams 2018).

  Eastwood & Williams, "A Framework for the Quantitative Evaluation of Disentangled
  Representations", ICLR 2018, with gradient boosted trees as in disentanglement_lib ``dci``
  (``dci.gin``: 10,000 train, 5,000 test points): for each factor ``k`` a
  ``sklearn.ensemble.GradientBoostingClassifier()`` with default settings predicts ``v_k``
  from all codes; its ``feature_importances_`` form column ``k`` of ``R [num_codes,
  num_factors]``. With ``D = num_codes``, ``K = num_factors`` and ``H_b`` the entropy in base
  ``b``:

  * disentanglement ``= sum_j rho_j (1 - H_K(R[j, :] / sum R[j, :]))``,
    ``rho_j = sum R[j, :] / sum R``;
  * completeness ``= sum_k w_k (1 - H_D(R[:, k] / sum R[:, k]))``,
    ``w_k = sum R[:, k] / sum R``. Each tree's importances sum to 1, so ``w_k = 1 / K`` and this
    is the plain mean over factors;
  * informativeness: mean over factors of the trees' accuracy (train and test). Eastwood &
    Williams report a prediction error; disentanglement_lib reports accuracy, as here.

  The trees' seeds come from ``rng``; disentanglement_lib leaves them unseeded, which makes
  ties between equally good splits random.

  The importances are the installed scikit-learn's. Before 0.20 it normalized each tree's
  importances before averaging them over the ensemble (0.20 and later sum, then
  normalize), which lowers D and C on entangled codes; disentanglement_lib's 2018-19
  studies (Locatello et al. 2019) ran on such versions (its setup.py does not pin
  scikit-learn), so their D and C need not match these.

  Args:
    codes_train: ``[n_train, num_codes]`` codes, ``num_codes >= 2``.
    factors_train: ``[n_train, num_factors]`` integer factors, ``num_factors >= 2``.
    codes_test: ``[n_test, num_codes]`` codes.
    factors_test: ``[n_test, num_factors]`` integer factors.
    rng: source of the trees' seeds.

  Returns:
    :class:`DciScores`.
  """
  from sklearn import ensemble

  codes_train, factors_train = _check_pair(codes_train, factors_train, "_train")
  codes_test, factors_test = _check_pair(codes_test, factors_test, "_test")
  num_codes, num_factors = codes_train.shape[1], factors_train.shape[1]
  if num_codes < 2 or num_factors < 2:
    raise ValueError("DCI needs at least two codes and two factors (entropies in base D and K).")
  _require_varying_factors(factors_train, "training")
  importance = np.zeros((num_codes, num_factors))
  train_accuracy, test_accuracy = [], []
  for k in range(num_factors):
    model = ensemble.GradientBoostingClassifier(random_state=_seed(rng))
    model.fit(codes_train, factors_train[:, k])
    importance[:, k] = np.abs(model.feature_importances_)
    train_accuracy.append(np.mean(model.predict(codes_train) == factors_train[:, k]))
    test_accuracy.append(np.mean(model.predict(codes_test) == factors_test[:, k]))
  total = importance if importance.sum() > 0 else np.ones_like(importance)
  code_weight = total.sum(axis=1) / total.sum()
  factor_weight = total.sum(axis=0) / total.sum()
  return DciScores(
    disentanglement=float(
      np.sum(code_weight * _one_minus_normalized_entropy(importance, num_factors))
    ),
    completeness=float(
      np.sum(factor_weight * _one_minus_normalized_entropy(importance.T, num_codes))
    ),
    informativeness_train=float(np.mean(train_accuracy)),
    informativeness_test=float(np.mean(test_accuracy)),
    importance_matrix=importance,
  )


# --------------------------------------------------------------------------
# Drawing points from a ground-truth generator.


def _draw_factors(
  sample_factors: FactorSampler, num: int, rng: np.random.Generator, factor_sizes: Sequence[int]
) -> np.ndarray:
  factors = _check_factors(sample_factors(num, rng), "sample_factors(num, rng)")
  sizes = np.asarray(factor_sizes)
  if factors.shape != (num, len(sizes)):
    raise ValueError(
      f"sample_factors({num}, rng) returned shape {factors.shape}, expected {(num, len(sizes))} "
      f"for factor_sizes {tuple(sizes)}."
    )
  if np.any(factors < 0) or np.any(factors >= sizes):
    raise ValueError(f"sample_factors returned indices outside factor_sizes {tuple(sizes)}.")
  return factors


def _represent(representation: RepresentationFn, factors: np.ndarray) -> np.ndarray:
  codes = np.asarray(representation(factors))
  if codes.ndim != 2 or codes.shape[0] != factors.shape[0]:
    raise ValueError(
      f"representation(factors) must return [n, num_codes] for n = {factors.shape[0]}, "
      f"got shape {codes.shape}."
    )
  return _check_codes(codes, name="representation(factors)")


def _represent_in_chunks(
  representation: RepresentationFn, factors: np.ndarray, chunk_size: int
) -> np.ndarray:
  return np.concatenate(
    [
      _represent(representation, factors[i : i + chunk_size])
      for i in range(0, factors.shape[0], chunk_size)
    ]
  )


def draw_codes(
  sample_factors: FactorSampler,
  representation: RepresentationFn,
  factor_sizes: Sequence[int],
  num: int,
  rng: np.random.Generator,
  *,
  chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
  """Draws ``num`` factor vectors and their codes (disentanglement_lib
  ``utils.generate_batch_factor_code``).

  Args:
    sample_factors: draws factors, see :data:`FactorSampler`.
    representation: factors to codes, see :data:`RepresentationFn`.
    factor_sizes: number of values of each factor.
    num: points to draw.
    rng: the only source of randomness.
    chunk_size: most factor vectors passed to ``representation`` at once; does not change
      the result.

  Returns:
    ``(codes [num, num_codes] float64, factors [num, num_factors] int)``.
  """
  factors = _draw_factors(sample_factors, num, rng, factor_sizes)
  return _represent_in_chunks(representation, factors, chunk_size), factors


def _fixed_factor_batches(
  sample_factors: FactorSampler,
  factor_sizes: Sequence[int],
  num_points: int,
  batch_size: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """For each point, a factor index ``k`` and a ``[batch_size, num_factors]`` batch of factors."""
  fixed = rng.integers(len(factor_sizes), size=num_points)
  factors = _draw_factors(sample_factors, num_points * batch_size, rng, factor_sizes)
  return fixed, factors.reshape(num_points, batch_size, len(factor_sizes))


def _chunks(num_points: int, batch_size: int, chunk_size: int):
  step = max(1, chunk_size // batch_size)
  return (slice(i, min(i + step, num_points)) for i in range(0, num_points, step))


# --------------------------------------------------------------------------
# Metrics that draw their own points.


def _beta_vae_features(
  sample_factors, representation, factor_sizes, num_points, batch_size, rng, chunk_size
):
  """disentanglement_lib ``beta_vae._generate_training_batch``, vectorized over points."""
  num_factors = len(factor_sizes)
  fixed = rng.integers(num_factors, size=num_points)
  first, second = (
    _draw_factors(sample_factors, num_points * batch_size, rng, factor_sizes).reshape(
      num_points, batch_size, num_factors
    )
    for _ in range(2)
  )
  # Each pair shares the value of the fixed factor; pairs in a batch differ in it.
  rows = np.arange(num_points)
  second[rows, :, fixed] = first[rows, :, fixed]
  features = []
  for part in _chunks(num_points, batch_size, chunk_size):
    flat = (first[part].reshape(-1, len(factor_sizes)), second[part].reshape(-1, len(factor_sizes)))
    a, b = (_represent(representation, f) for f in flat)
    diff = np.abs(a - b).reshape(-1, batch_size, a.shape[1])
    features.append(diff.mean(axis=1))
  return np.concatenate(features), fixed


def beta_vae_score(
  sample_factors: FactorSampler,
  representation: RepresentationFn,
  factor_sizes: Sequence[int],
  rng: np.random.Generator,
  *,
  num_train: int = 10_000,
  num_eval: int = 5_000,
  batch_size: int = 64,
  chunk_size: int = 4096,
) -> BetaVaeScores:
  """beta-VAE metric (Higgins et al. 2017), scikit-learn version of disentanglement_lib.

  Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained Variational
  Framework", ICLR 2017. As in disentanglement_lib ``beta_vae.compute_beta_vae_sklearn``
  (``beta_vae_sklearn.gin``: batch_size 64, num_train 10,000, num_eval 5,000): each point
  picks a factor ``k`` uniformly, draws ``batch_size`` pairs of factor vectors that agree in
  ``v_k`` (one value per pair) and are otherwise independent, and has the feature
  ``mean over pairs |code(a) - code(b)|`` (``[num_codes]``) with label ``k``. A
  ``sklearn.linear_model.LogisticRegression`` with default settings is fitted on ``num_train``
  points and scored on ``num_eval`` fresh points. Chance accuracy is ``1 / num_factors``.

  The linear classifier can undo a rotation of the codes: a random orthogonal rotation of
  dSprites-sized factors (3, 6, 40, 32 and 32 values) scores about 0.90, far above chance,
  although the code is entangled (a Hadamard rotation of equal-size factors scores near
  chance). Read it with MIG or DCI beside it.

  The classifier is the installed scikit-learn's default (since 0.22: L2, C = 1, lbfgs,
  multinomial, 100 iterations). Before 0.22 the default was one-vs-rest liblinear, which is
  what disentanglement_lib's 2018-19 studies will have used (its setup.py does not pin
  scikit-learn), so numbers may differ slightly from theirs.

  Args:
    sample_factors: draws factors, see :data:`FactorSampler`.
    representation: factors to codes, see :data:`RepresentationFn`.
    factor_sizes: number of values of each factor.
    rng: the only source of randomness.
    num_train: training points (each costs ``2 * batch_size`` codes).
    num_eval: evaluation points.
    batch_size: pairs per point.
    chunk_size: most factor vectors passed to ``representation`` at once; does not change
      the result.

  Returns:
    :class:`BetaVaeScores` (train and eval accuracy).
  """
  from sklearn import linear_model

  args = (sample_factors, representation, factor_sizes)
  train_x, train_y = _beta_vae_features(*args, num_train, batch_size, rng, chunk_size)
  model = linear_model.LogisticRegression(random_state=_seed(rng))
  model.fit(train_x, train_y)
  eval_x, eval_y = _beta_vae_features(*args, num_eval, batch_size, rng, chunk_size)
  return BetaVaeScores(
    train_accuracy=float(np.mean(model.predict(train_x) == train_y)),
    eval_accuracy=float(np.mean(model.predict(eval_x) == eval_y)),
  )


def _factor_vae_votes(
  sample_factors,
  representation,
  factor_sizes,
  num_points,
  batch_size,
  rng,
  chunk_size,
  scale,
  active,
):
  """Votes ``[num_factors, num_codes]``: for each point, (fixed factor, code of least variance)."""
  fixed, factors = _fixed_factor_batches(sample_factors, factor_sizes, num_points, batch_size, rng)
  # The whole batch shares the first member's value of the fixed factor.
  rows = np.arange(num_points)
  factors[rows, :, fixed] = factors[rows, :1, fixed]
  active_index = np.flatnonzero(active)
  votes = np.zeros((len(factor_sizes), active.shape[0]), np.int64)
  for part in _chunks(num_points, batch_size, chunk_size):
    codes = _represent(representation, factors[part].reshape(-1, len(factor_sizes)))
    codes = codes.reshape(-1, batch_size, codes.shape[1])
    variance = np.var(codes[:, :, active], axis=1, ddof=1) / scale[active] ** 2
    np.add.at(votes, (fixed[part], active_index[np.argmin(variance, axis=1)]), 1)
  return votes


def factor_vae_score(
  sample_factors: FactorSampler,
  representation: RepresentationFn,
  factor_sizes: Sequence[int],
  rng: np.random.Generator,
  *,
  num_train: int = 10_000,
  num_eval: int = 5_000,
  batch_size: int = 64,
  num_variance_estimate: int = 10_000,
  prune_threshold: float = 0.05,
  chunk_size: int = 4096,
) -> FactorVaeScores:
  """FactorVAE metric (Kim & Mnih 2018, "Disentangling by Factorising").

  As in disentanglement_lib ``factor_vae.compute_factor_vae`` (``factor_vae_metric.gin``:
  batch_size 64, num_train 10,000, num_eval 5,000, num_variance_estimate 10,000,
  ``prune_dims.threshold = 0.05``):

  1. Each code's standard deviation ``s_j`` is estimated on ``num_variance_estimate`` random
     points. Codes with ``s_j < prune_threshold`` are collapsed and never vote.
     (disentanglement_lib ``_prune_dims`` thresholds the standard deviation, not the
     variance.)
  2. Each vote picks a factor ``k`` uniformly, draws ``batch_size`` factor vectors sharing one
     value of ``v_k``, and votes for the active code with the smallest ``var_j / s_j^2``
     (variances with ``ddof = 1``).
  3. The majority-vote classifier maps each code to the factor it got most training votes
     for; accuracy is the fraction of votes it gets right. Chance is ``1 / num_factors``.

  It is not near chance for every entangled code: a random orthogonal rotation of
  dSprites-sized factors scored about 0.80 in this implementation.

  One deliberate difference: when some codes are pruned, disentanglement_lib records the vote
  at the position of the winner *among active codes* in a table indexed by *all* codes, and
  reports the number of all codes as ``num_active_dims``; here the vote goes to the winning
  code itself and ``num_active_dims`` counts active codes. The accuracies are the same either
  way (the misplacement relabels columns consistently in training and evaluation votes); only
  the vote table and ``num_active_dims`` differ.

  Args:
    sample_factors: draws factors, see :data:`FactorSampler`.
    representation: factors to codes, see :data:`RepresentationFn`.
    factor_sizes: number of values of each factor.
    rng: the only source of randomness.
    num_train: votes to fit the classifier.
    num_eval: fresh votes to score it.
    batch_size: factor vectors per vote.
    num_variance_estimate: points for the global standard deviations.
    prune_threshold: minimum global standard deviation of an active code.
    chunk_size: most factor vectors passed to ``representation`` at once; does not change
      the result.

  Returns:
    :class:`FactorVaeScores`; accuracies are 0 when every code is collapsed.
  """
  codes, _ = draw_codes(
    sample_factors, representation, factor_sizes, num_variance_estimate, rng, chunk_size=chunk_size
  )
  scale = np.std(codes, axis=0, ddof=1)
  active = scale >= prune_threshold
  if not active.any():
    return FactorVaeScores(train_accuracy=0.0, eval_accuracy=0.0, num_active_dims=0)
  args = (sample_factors, representation, factor_sizes)
  train_votes = _factor_vae_votes(*args, num_train, batch_size, rng, chunk_size, scale, active)
  classifier = np.argmax(train_votes, axis=0)  # [num_codes]: the factor each code stands for.
  codes_index = np.arange(train_votes.shape[1])
  eval_votes = _factor_vae_votes(*args, num_eval, batch_size, rng, chunk_size, scale, active)
  return FactorVaeScores(
    train_accuracy=float(train_votes[classifier, codes_index].sum() / train_votes.sum()),
    eval_accuracy=float(eval_votes[classifier, codes_index].sum() / eval_votes.sum()),
    num_active_dims=int(active.sum()),
  )


def all_metrics(
  sample_factors: FactorSampler,
  representation: RepresentationFn,
  factor_sizes: Sequence[int],
  rng: np.random.Generator,
  *,
  num_train: int = 10_000,
  num_test: int = 5_000,
  num_eval: int = 5_000,
  batch_size: int = 64,
  num_variance_estimate: int = 10_000,
  num_bins: int = 20,
  chunk_size: int = 4096,
) -> dict[str, float]:
  """Every metric of this module for one representation, with disentanglement_lib's counts.

  The defaults are :data:`DISENTANGLEMENT_LIB_COUNTS`; pass ``**CPU_COUNTS`` for a run ~10x
  cheaper and noisier. MIG, SAP and DCI share one draw of ``num_train`` training and
  ``num_test`` test points (disentanglement_lib draws afresh for each metric; the points are
  i.i.d. either way). The beta-VAE score needs ``2 * batch_size * (num_train + num_eval)``
  codes and the FactorVAE score ``num_variance_estimate + batch_size * (num_train +
  num_eval)``: about 2.9 million with the defaults, which is the dominant cost.

  Args:
    sample_factors: draws factors, see :data:`FactorSampler`.
    representation: factors to codes, see :data:`RepresentationFn`.
    factor_sizes: number of values of each factor.
    rng: the only source of randomness.
    num_train: training points of MIG, SAP, DCI; training points/votes of beta-VAE/FactorVAE.
    num_test: test points of SAP and DCI.
    num_eval: evaluation points/votes of beta-VAE and FactorVAE.
    batch_size: pairs (beta-VAE) or points (FactorVAE) per training point.
    num_variance_estimate: points for FactorVAE's global standard deviations.
    num_bins: histogram bins of MIG.
    chunk_size: most factor vectors passed to ``representation`` at once.

  Returns:
    A flat dict of floats: ``mig``, ``sap``, ``dci_disentanglement``, ``dci_completeness``,
    ``dci_informativeness_train``, ``dci_informativeness_test``, ``beta_vae_train_accuracy``,
    ``beta_vae_eval_accuracy``, ``factor_vae_train_accuracy``, ``factor_vae_eval_accuracy``,
    ``factor_vae_num_active_dims``.
  """
  draw = (sample_factors, representation, factor_sizes)
  codes_train, factors_train = draw_codes(*draw, num_train, rng, chunk_size=chunk_size)
  codes_test, factors_test = draw_codes(*draw, num_test, rng, chunk_size=chunk_size)
  split = (codes_train, factors_train, codes_test, factors_test)
  scores = {"mig": mig(codes_train, factors_train, num_bins), "sap": sap(*split, rng=rng)}
  dci_scores = dci(*split, rng=rng)
  scores["dci_disentanglement"] = dci_scores.disentanglement
  scores["dci_completeness"] = dci_scores.completeness
  scores["dci_informativeness_train"] = dci_scores.informativeness_train
  scores["dci_informativeness_test"] = dci_scores.informativeness_test
  counts = {"num_train": num_train, "num_eval": num_eval, "batch_size": batch_size}
  beta_vae = beta_vae_score(*draw, rng, **counts, chunk_size=chunk_size)
  scores["beta_vae_train_accuracy"] = beta_vae.train_accuracy
  scores["beta_vae_eval_accuracy"] = beta_vae.eval_accuracy
  factor_vae = factor_vae_score(
    *draw, rng, **counts, num_variance_estimate=num_variance_estimate, chunk_size=chunk_size
  )
  scores["factor_vae_train_accuracy"] = factor_vae.train_accuracy
  scores["factor_vae_eval_accuracy"] = factor_vae.eval_accuracy
  scores["factor_vae_num_active_dims"] = float(factor_vae.num_active_dims)
  return scores


def uniform_factor_sampler(factor_sizes: Sequence[int]) -> FactorSampler:
  """A :data:`FactorSampler` drawing each factor uniformly and independently."""
  sizes = tuple(int(s) for s in factor_sizes)

  def sample(num: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.integers(size, size=num) for size in sizes], axis=1)

  return sample
