"""The PCA baseline: what a linear code of the same size achieves, in the model's units.

``fit_pca`` on the training split, then ``pca_baseline``: the test set's squared
error and its distortion (negative log-likelihood) under the model's likelihood
(a ``likelihoods.Likelihood``) with the PCA reconstruction as the mean, beside which
``--mode=evaluate`` reports the model's.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import likelihoods


class Pca(NamedTuple):
  """Principal components of a data set.

  Attributes:
    mean: ``[D]`` the data mean.
    components: ``[k, D]`` orthonormal directions, largest variance first.
    variances: ``[k]`` the variance along each.
    total_variance: the sum of the variances of all ``D`` dimensions.
  """

  mean: np.ndarray
  components: np.ndarray
  variances: np.ndarray
  total_variance: float

  def project(self, x: np.ndarray) -> np.ndarray:
    """``[n, D] -> [n, k]`` coordinates."""
    return (np.asarray(x, np.float64) - self.mean) @ self.components.T

  def reconstruct(self, x: np.ndarray) -> np.ndarray:
    """``[n, D] -> [n, D]``: the projection back in data space."""
    return self.mean + self.project(x) @ self.components


def fit_pca(x: np.ndarray, num_components: int, chunk: int = 10000) -> Pca:
  """PCA of ``x: [n, D]`` in float64.

  With more examples than dimensions: eigenvectors of the covariance, which is
  accumulated over chunks of rows (memory ``O(chunk * D + D**2)``); otherwise the
  SVD of the centred data, which is cheaper there. Both are exact.
  """
  x = np.asarray(x)
  n, d = x.shape
  if not 1 <= num_components <= d:
    raise ValueError(f"num_components must be in [1, {d}], got {num_components}.")
  mean = np.zeros(d)
  for start in range(0, n, chunk):
    mean += x[start : start + chunk].sum(0, dtype=np.float64)
  mean /= n
  if n <= d:
    _, singular, vt = np.linalg.svd(x.astype(np.float64) - mean, full_matrices=False)
    variances = singular**2 / n
    return Pca(mean, vt[:num_components], variances[:num_components], float(variances.sum()))
  cov = np.zeros((d, d))
  for start in range(0, n, chunk):
    xc = x[start : start + chunk].astype(np.float64) - mean
    cov += xc.T @ xc
  cov /= n
  eigenvalues, eigenvectors = np.linalg.eigh(cov)  # Ascending.
  top = np.argsort(eigenvalues)[::-1][:num_components]
  return Pca(mean, eigenvectors[:, top].T, eigenvalues[top], float(np.trace(cov)))


def pca_baseline(
  pca: Pca,
  train_x: np.ndarray,
  test_x: np.ndarray,
  likelihood: likelihoods.Likelihood,
  max_fit_examples: int = 10000,
) -> dict[str, Any]:
  """PCA's reconstruction error on the test set, in the model's units.

  Args:
    pca: fitted on the training split.
    train_x: ``[n, *event_shape]`` training data, to fit the likelihood's spread.
    test_x: ``[m, *event_shape]`` test data.
    likelihood: the model's ``p(x | z)``; the PCA reconstruction is its mean
      (``Likelihood.outputs_for_mean``).
    max_fit_examples: training examples used to choose the spread.

  Returns:
    ``mse_per_image`` (squared error summed over pixels, mean over images), and
    ``distortion``: the negative log-likelihood of the test set under ``likelihood``
    with the PCA reconstruction as its mean. What the mean leaves free (a Bernoulli
    parameter's distance from 0 and 1, a Gaussian's variance) is the candidate of
    ``likelihood.spreads`` with the best likelihood of the training images, reported
    under ``likelihood.spread_name`` (e.g. ``bernoulli_clip``, ``gaussian_variance``).
  """
  event_shape = test_x.shape[1:]

  def reconstruct(x: np.ndarray) -> np.ndarray:
    return pca.reconstruct(x.reshape(len(x), -1)).reshape(len(x), *event_shape)

  def nll(x: np.ndarray, mean: np.ndarray, spread) -> float:
    decoded = likelihood.outputs_for_mean(jnp.asarray(mean, jnp.float32), spread)
    return -float(np.mean(np.asarray(_log_prob(likelihood, decoded, jnp.asarray(x, jnp.float32)))))

  recon = reconstruct(test_x)
  flat_test, flat_recon = test_x.reshape(len(test_x), -1), recon.reshape(len(recon), -1)
  fit = train_x[:max_fit_examples]
  fit_recon = reconstruct(fit)
  candidates = likelihood.spreads(fit, fit_recon)
  spread = candidates[int(np.argmin([nll(fit, fit_recon, c) for c in candidates]))]
  return {
    "num_components": int(pca.components.shape[0]),
    "fit_on": f"train split ({train_x.shape[0]} examples), same preprocessing",
    "explained_variance_fraction": float(pca.variances.sum() / pca.total_variance),
    "mse_per_image": float(np.mean(np.sum((flat_recon - flat_test) ** 2, axis=-1))),
    likelihood.spread_name: spread,
    "distortion": nll(test_x, recon, spread),
  }


@functools.partial(jax.jit, static_argnums=0)
def _log_prob(likelihood: likelihoods.Likelihood, decoded: jax.Array, x: jax.Array) -> jax.Array:
  return likelihood.log_prob(decoded, x)
