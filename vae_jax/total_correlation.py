"""beta-TCVAE's decomposition of the KL term, estimated on a minibatch (Chen et al. 2018).

Chen, Li, Grosse & Duvenaud, "Isolating Sources of Disentanglement in Variational
Autoencoders", NeurIPS 2018. With ``n`` uniform over a dataset of ``N`` points, ``q(z, n) =
q(z | x_n) / N``, aggregate posterior ``q(z) = (1/N) sum_n q(z | x_n)`` and prior ``p(z) =
prod_d p(z_d)``, the average KL term splits into three (their "ELBO TC-decomposition"):

  E_n KL(q(z|x_n) || p(z)) = I_q(z; n)                        index-code mutual information
                           + KL(q(z) || prod_d q(z_d))        total correlation (TC)
                           + sum_d KL(q(z_d) || p(z_d))       dimension-wise KL

and each term is an expectation over ``(z, n) ~ q(z, n)`` of a difference of ``log q(z | x_n)``,
``log q(z)``, ``sum_d log q(z_d)`` and ``log p(z)``. The densities ``q(z)`` and ``q(z_d)``
are sums over the whole dataset; the functions here estimate them from the batch itself: for
``M`` samples ``z_i ~ q(z | x_i)`` of a minibatch, with the Gaussian posteriors
``q(z | x_j) = N(mean_j, diag(exp(logvar_j)))`` of the same batch,

* minibatch weighted sampling (MWS, Chen et al., derived in their appendix):
  ``log q(z_i) ~ logsumexp_j log q(z_i | x_j) - log(N M)``, and the same per dimension for
  ``log q(z_id)``: :func:`log_qz_mws`;
* a stratified estimator, :func:`log_qz_stratified`: the sample's own posterior enters with
  its exact weight ``1/N`` and the other ``M - 1`` stand for the other ``N - 1`` data points,
  weight ``(N - 1) / (N (M - 1))`` each. Inside the log it is unbiased when the other batch
  members are uniform draws from the rest of the dataset, and exact when the batch is the
  whole dataset. It is in the spirit of the paper's minibatch stratified sampling (MSS) but
  its weights are derived here, not taken from the paper.

**MWS is not a consistent estimator of the values.** ``exp`` of the MWS estimate is
``(1/N) (1/M) sum_j q(z_i | x_j)``, i.e. ``1/N`` times a density estimate. Where the batch's
posteriors overlap (``(1/M) sum_j q(z_i | x_j) ~ q(z_i)``), an MWS log-density is low by
``log N``; where they are disjoint (only the own term counts), by ``log M``. MWS's TC is
therefore high by ``sum_d o_d - o`` for offsets ``o`` of the joint and ``o_d`` of the
marginals: ``(D - 1) log N`` when everything overlaps, ``(D - 1) log M`` when nothing does, and
up to ``D log N - log M`` in the common case of disjoint joint but overlapping 1-D marginals.
The offsets cancel in the sum of the three terms, and a constant offset does not change
gradients, which is how beta-TCVAE uses MWS; to *report* a TC value, use the stratified
estimator.
``tests/test_total_correlation.py`` checks both estimators against exact computations.

Besides the standard library, everything here imports only ``jax`` and the densities of
``vae_jax.losses``: pure functions on arrays
that work under ``jax.jit`` and ``jax.vmap`` (``dataset_size`` is a Python int, static under
``jit``). Units are nats.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vae_jax import losses

Array = jax.Array


class TCDecomposition(NamedTuple):
  """Per-sample estimates of Chen et al.'s three KL terms, each ``[M]`` in nats.

  For sample ``z_i ~ q(z | x_i)``:

  * ``index_code_mi = log q(z_i | x_i) - log q(z_i)``;
  * ``total_correlation = log q(z_i) - sum_d log q(z_id)``;
  * ``dimension_wise_kl = sum_d log q(z_id) - log p(z_i)``, ``p = N(0, I)``.

  Their sum is ``log q(z_i | x_i) - log p(z_i)``, the one-sample estimate of
  ``KL(q(z | x_i) || p(z))``, whatever estimator gave ``log q``. Batch means estimate the three
  terms of the decomposition.
  """

  index_code_mi: Array
  total_correlation: Array
  dimension_wise_kl: Array


def _check_inputs(z: Array, mean: Array, logvar: Array, dataset_size: int) -> int:
  """Checks shapes at trace time; returns ``dataset_size`` as an int."""
  for name, a in (("z", z), ("mean", mean), ("logvar", logvar)):
    if jnp.ndim(a) != 2:
      raise ValueError(f"{name} must be [M, latent], got shape {jnp.shape(a)}.")
    if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating-point array, got {jnp.asarray(a).dtype}.")
  if not jnp.shape(z) == jnp.shape(mean) == jnp.shape(logvar):
    raise ValueError(
      "z, mean and logvar must have the same shape [M, latent], got "
      f"{jnp.shape(z)}, {jnp.shape(mean)} and {jnp.shape(logvar)}."
    )
  try:
    count = None if isinstance(dataset_size, bool) else operator.index(dataset_size)
  except TypeError:
    count = None
  batch = jnp.shape(z)[0]
  if count is None or count < batch:
    raise ValueError(
      f"dataset_size must be a Python int >= the batch size {batch} (the number of data points "
      f"the batch is drawn from), got {dataset_size!r}. Under jax.jit pass it as a static "
      "argument."
    )
  return count


def _log_q_pairs(z: Array, mean: Array, logvar: Array) -> Array:
  """``[M, M, latent]``: ``log N(z[i, d]; mean[j, d], exp(logvar[j, d]))``."""
  shape = (z.shape[0], *mean.shape)
  return losses.diag_gaussian_log_prob_per_dim(
    jnp.broadcast_to(z[:, None, :], shape),
    jnp.broadcast_to(mean[None], shape),
    jnp.broadcast_to(logvar[None], shape),
  )


def log_qz_mws(z: Array, mean: Array, logvar: Array, dataset_size: int) -> tuple[Array, Array]:
  """Minibatch weighted sampling estimates of ``log q(z_i)`` and ``sum_d log q(z_id)``.

  Chen et al. (2018), minibatch weighted sampling (``log(N M)`` as in the paper's reference
  code, github.com/rtqichen/beta-tcvae):

    log q(z_i)         ~ logsumexp_j log q(z_i | x_j)           - log(N M)
    sum_d log q(z_id)  ~ sum_d [logsumexp_j log q(z_id | x_j)   - log(N M)]

  See the module docstring: as values these are low by between ``log M`` (disjoint posteriors)
  and ``log N`` (overlapping posteriors) per density.

  Args:
    z: ``[M, latent]`` samples, ``z[i] ~ q(z | x_i)``.
    mean: ``[M, latent]`` posterior means of the batch.
    logvar: ``[M, latent]`` posterior log-variances of the batch.
    dataset_size: ``N``, the number of points the batch was drawn from (``N >= M``).

  Returns:
    ``(log_qz, log_prod_qzj)``, each ``[M]``.
  """
  n = _check_inputs(z, mean, logvar, dataset_size)
  pairs = _log_q_pairs(z, mean, logvar)
  log_norm = math.log(n) + math.log(z.shape[0])
  log_qz = losses.logsumexp(pairs.sum(axis=-1), axis=1) - log_norm
  log_prod_qzj = jnp.sum(losses.logsumexp(pairs, axis=1) - log_norm, axis=-1)
  return log_qz, log_prod_qzj


def _stratified_log_weights(batch: int, dataset_size: int, dtype) -> Array:
  """``[M, M]`` log-weights: ``1/N`` on the diagonal, ``(N - 1) / (N (M - 1))`` elsewhere."""
  own = -math.log(dataset_size)
  other = math.log(dataset_size - 1) - math.log(dataset_size) - math.log(batch - 1)
  return jnp.where(jnp.eye(batch, dtype=bool), own, other).astype(dtype)


def log_qz_stratified(
  z: Array, mean: Array, logvar: Array, dataset_size: int
) -> tuple[Array, Array]:
  """Stratified estimates of ``log q(z_i)`` and ``sum_d log q(z_id)``.

  With ``w_ii = 1/N`` and ``w_ij = (N - 1) / (N (M - 1))`` for ``j != i`` (the weights sum to
  1 over ``j``):

    log q(z_i)         ~ logsumexp_j [log w_ij + log q(z_i | x_j)]
    sum_d log q(z_id)  ~ sum_d logsumexp_j [log w_ij + log q(z_id | x_j)]

  ``q(z_i) = (1/N) q(z_i | x_i) + (1/N) sum_{n != i} q(z_i | x_n)``: the first term is exact
  and the second is estimated by the other ``M - 1`` batch members, unbiasedly (inside the
  log) when they are uniform draws from the other ``N - 1`` points. The log adds the usual
  Jensen bias, about ``-Var / (2 (M - 1))`` for the relative variance ``Var`` of
  ``q(z_i | x_n) / q(z_i)`` over ``n``. When the batch is the whole dataset the estimate is
  exact.

  Args:
    z: ``[M, latent]`` samples, ``z[i] ~ q(z | x_i)``, ``M >= 2``.
    mean: ``[M, latent]`` posterior means of the batch.
    logvar: ``[M, latent]`` posterior log-variances of the batch.
    dataset_size: ``N``, the number of points the batch was drawn from (``N >= M``).

  Returns:
    ``(log_qz, log_prod_qzj)``, each ``[M]``.
  """
  n = _check_inputs(z, mean, logvar, dataset_size)
  batch = z.shape[0]
  if batch < 2:
    raise ValueError("The stratified estimator needs a batch of at least 2 samples.")
  pairs = _log_q_pairs(z, mean, logvar)
  log_w = _stratified_log_weights(batch, n, pairs.dtype)
  log_qz = losses.logsumexp(log_w + pairs.sum(axis=-1), axis=1)
  log_prod_qzj = jnp.sum(losses.logsumexp(log_w[:, :, None] + pairs, axis=1), axis=-1)
  return log_qz, log_prod_qzj


_ESTIMATORS = {"mws": log_qz_mws, "stratified": log_qz_stratified}


def total_correlation_mws(z: Array, mean: Array, logvar: Array, dataset_size: int) -> Array:
  """Per-sample MWS estimates of the total correlation, ``[M]``: ``log q(z_i) - sum_d log q(z_id)``.

  The term beta-TCVAE penalizes (Chen et al. 2018). As a value it is offset, e.g. high by
  ``(D - 1) log N`` when the batch's posteriors overlap (see the module docstring).
  """
  log_qz, log_prod_qzj = log_qz_mws(z, mean, logvar, dataset_size)
  return log_qz - log_prod_qzj


def tc_decomposition(
  z: Array, mean: Array, logvar: Array, dataset_size: int, *, estimator: str = "mws"
) -> TCDecomposition:
  """Per-sample beta-TCVAE decomposition of the KL term (Chen et al. 2018).

  Args:
    z: ``[M, latent]`` samples, ``z[i] ~ q(z | x_i)``.
    mean: ``[M, latent]`` posterior means of the batch.
    logvar: ``[M, latent]`` posterior log-variances of the batch.
    dataset_size: ``N``, the number of points the batch was drawn from (``N >= M``).
    estimator: ``"mws"`` (:func:`log_qz_mws`, as in the paper's training objective) or
      ``"stratified"`` (:func:`log_qz_stratified`, for values you report).

  Returns:
    :class:`TCDecomposition` of ``[M]`` arrays; their sum is
    ``log q(z_i | x_i) - log p(z_i)`` with ``p = N(0, I)``.
  """
  try:
    estimate = _ESTIMATORS[estimator]
  except KeyError:
    raise ValueError(
      f"estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}."
    ) from None
  log_qz, log_prod_qzj = estimate(z, mean, logvar, dataset_size)
  log_qz_given_x = losses.diag_gaussian_log_prob(z, mean, logvar)
  log_pz = losses.standard_normal_log_prob(z)
  return TCDecomposition(
    index_code_mi=log_qz_given_x - log_qz,
    total_correlation=log_qz - log_prod_qzj,
    dimension_wise_kl=log_prod_qzj - log_pz,
  )
