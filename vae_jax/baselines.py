"""The PCA baseline: what a linear code of the same size achieves, in the model's units.

``fit_pca`` on the training split, then ``pca_baseline``: the test set's squared
error and its distortion (negative log-likelihood) under the model's likelihood
with the PCA reconstruction as the mean, beside which ``--mode=evaluate``
reports the model's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import losses


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


# Clipping levels tried for PCA reconstructions used as Bernoulli means.
_PCA_CLIPS = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)


_LOG_LIKELIHOODS = {
  "bernoulli": jax.jit(losses.bernoulli_log_likelihood),
  "continuous_bernoulli": jax.jit(losses.continuous_bernoulli_log_likelihood),
}


def _clipped_nll(likelihood: str, p: np.ndarray, x: np.ndarray, clip: float) -> np.ndarray:
  p = np.clip(p, clip, 1.0 - clip)
  logits = (np.log(p) - np.log1p(-p)).astype(np.float32)
  return -np.asarray(_LOG_LIKELIHOODS[likelihood](logits, np.asarray(x, np.float32)))


def pca_baseline(
  pca: Pca,
  train_x: np.ndarray,
  test_x: np.ndarray,
  likelihood: str,
  gaussian_variance: float = 1.0,
  max_fit_examples: int = 10000,
) -> dict[str, Any]:
  """PCA's reconstruction error on the test set, in the model's units.

  Args:
    pca: fitted on the training split.
    train_x: ``[n, D]`` training data, to choose the Bernoulli clipping level.
    test_x: ``[m, D]`` test data.
    likelihood: the model's (``bernoulli``, ``continuous_bernoulli`` or ``gaussian``;
      ``gaussian_learned`` is ``gaussian`` with the caller's variance).
    gaussian_variance: its ``c``, for ``gaussian``.
    max_fit_examples: training examples used to choose the clipping level.

  Returns:
    ``mse_per_image`` (squared error summed over pixels, mean over images), and
    ``distortion``: the negative log-likelihood of the test set under the
    model's likelihood with the PCA reconstruction as its mean (for the
    continuous Bernoulli: as its parameter lambda). A Bernoulli parameter must
    lie in (0, 1), so the reconstruction is clipped to ``[clip, 1 - clip]``,
    with ``clip`` the level in ``_PCA_CLIPS`` that minimizes the NLL on
    training images (reported as ``bernoulli_clip``).
  """
  recon = pca.reconstruct(test_x)
  out: dict[str, Any] = {
    "num_components": int(pca.components.shape[0]),
    "fit_on": f"train split ({train_x.shape[0]} examples), same preprocessing",
    "explained_variance_fraction": float(pca.variances.sum() / pca.total_variance),
    "mse_per_image": float(np.mean(np.sum((recon - test_x) ** 2, axis=-1))),
  }
  if likelihood in _LOG_LIKELIHOODS:
    fit = train_x[:max_fit_examples]
    fit_recon = pca.reconstruct(fit)
    nlls = [float(_clipped_nll(likelihood, fit_recon, fit, c).mean()) for c in _PCA_CLIPS]
    clip = _PCA_CLIPS[int(np.argmin(nlls))]
    out["bernoulli_clip"] = clip
    out["distortion"] = float(_clipped_nll(likelihood, recon, test_x, clip).mean())
  else:
    log_p = losses.gaussian_log_likelihood(
      jnp.asarray(recon, jnp.float32), jnp.asarray(test_x, jnp.float32), gaussian_variance
    )
    out["distortion"] = float(-np.mean(np.asarray(log_p)))
  return out
