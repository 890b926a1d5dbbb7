"""Observation models ``p(x | z)``: one object per likelihood, holding all vae_jax needs of it.

A ``Likelihood`` is what the decoder's outputs mean. It gives, in one place (as
distrax's distributions give ``log_prob`` and ``mean`` together):

* ``log_prob(decoded, x)``: ``log p(x | z)`` per example, in nats, summed over every
  axis of ``x`` but the first (the batch), computed by the public functions of
  ``vae_jax.losses``. The object is callable as that function, so it is a
  ``log_likelihood_fn`` for ``losses.elbo`` and ``losses.iw_bound``;
* ``mean(decoded)``: the image to draw, in [0, 1];
* ``decoder_shape(event_shape)``: the decoder outputs it reads per example, and
  ``shared_log_variance``: the initial value of a learned log-variance shared by all
  pixels, which the decoder then holds (``None``: none);
* ``check_data(low, high)``: the data range it is defined for (one error otherwise);
* ``caveat(...)``: what a reader of its numbers must know, or ``None``;
* ``bits_per_dim(...)``: ``-log p(x)`` in nats as bits per dimension, where that
  number means something (a probability of discrete data), else ``None``;
* ``outputs_for_mean(mean, spread)`` and ``spreads(...)``: decoder outputs whose mean is
  a given image, for baselines that predict only a mean (PCA).

``REGISTRY`` maps ``config.model.likelihood`` to its class; ``from_config`` builds one.
Adding a likelihood is one class here, its name in ``config.CHOICES``, and its tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vae_jax import config as config_lib
from vae_jax import losses

Array = jax.Array

# Clipping levels tried for a mean image used as a Bernoulli parameter (PCA baseline).
_CLIPS = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)


@dataclasses.dataclass(frozen=True)
class Likelihood:
  """``p(x | z)`` given the decoder's outputs; see the module docstring."""

  name: ClassVar[str]
  # The name under which baselines report the spread they chose (see ``spreads``).
  spread_name: ClassVar[str]
  # The data range the likelihood is defined for, [low, high].
  data_range: ClassVar[tuple[float, float]] = (-math.inf, math.inf)
  # Whether log_prob is a log-probability of discrete data (binary images, or pixel
  # levels), so that -log p(x) / (D ln 2) is bits per dimension as it stands.
  discrete: ClassVar[bool] = False

  def log_prob(self, decoded: Array, x: Array) -> Array:
    """``log p(x | z)``: ``decoded: [batch, *decoder_shape]``, ``x: [batch, *event_shape]``
    -> ``[batch]`` nats."""
    raise NotImplementedError

  def __call__(self, decoded: Array, x: Array) -> Array:
    return self.log_prob(decoded, x)

  def mean(self, decoded: Array) -> Array:
    """``E[x | z]`` (clipped to [0, 1] where the support is wider): ``[batch, *event_shape]``."""
    raise NotImplementedError

  def decoder_shape(self, event_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The decoder outputs per example that ``log_prob`` reads (before a shared variance)."""
    return tuple(event_shape)

  @property
  def shared_log_variance(self) -> float | None:
    """The initial value of a log-variance the decoder learns, shared by all pixels."""
    return None

  def check_data(self, low: float, high: float) -> None:
    """Raises ``config.ConfigError`` if data spanning ``[low, high]`` lies outside the range
    this likelihood is defined for."""
    lo, hi = self.data_range
    if not lo <= low <= high <= hi:
      raise config_lib.ConfigError(
        f"The preprocessed data span [{low}, {high}], but config.model.likelihood="
        f"{self.name!r} is defined for data in [{lo}, {hi}]. Check the dataset and "
        "config.binarization."
      )

  def caveat(self, *, binarization: str, binary_data: bool) -> str | None:
    """What a reader of this likelihood's numbers must know for this data, or ``None``."""
    del binarization, binary_data
    return None

  def bits_per_dim(
    self, nll_nats: float, num_dims: int, *, binarization: str, binary_data: bool, bits: int = 8
  ) -> float | None:
    """``-log p(x)`` in nats as bits per dimension, or ``None`` where it means nothing.

    * A probability of discrete data (``discrete``): ``nll / (D ln 2)``.
    * A density on dequantized data ``x = (level + u) / 2**bits``: by Jensen,
      ``-log P(levels) <= -log p(x) + D ln 2**bits``, so ``(nll + D bits ln 2) / (D ln 2)``
      bounds the levels' bits per dimension (Theis et al. 2016, section 3.1).
    * Any other density of continuous data: ``None`` (a density is not a probability).

    Args:
      nll_nats: ``-log p(x)`` per example, in nats.
      num_dims: ``D``, the dimensions of one example (3072 for 32x32x3).
      binarization: ``config.binarization``, how the data were preprocessed.
      binary_data: the dataset's images are binary already (dSprites).
      bits: the data's bit depth, for dequantized data.
    """
    del binary_data
    if self.discrete:
      return nll_nats / (num_dims * math.log(2.0))
    if binarization == "dequantize":
      return (nll_nats + num_dims * bits * math.log(2.0)) / (num_dims * math.log(2.0))
    return None

  def outputs_for_mean(self, mean: Array, spread: float | None) -> Array:
    """Decoder outputs whose ``p(x | z)`` has mean ``mean: [n, *event_shape]`` (moved inside
    the support as ``spread`` says), for baselines that predict a mean image only."""
    raise NotImplementedError

  def spreads(self, fit_x: np.ndarray, fit_mean: np.ndarray) -> tuple[float | None, ...]:
    """Candidate ``spread`` values for ``outputs_for_mean``; a baseline keeps the one with
    the best likelihood of ``fit_x`` (training data) given ``fit_mean``."""
    del fit_x, fit_mean
    return (None,)


def _event_ndims(x: Array) -> int:
  return jnp.ndim(x) - 1


def _logits(p: Array, clip: float) -> Array:
  p = jnp.clip(p, clip, 1.0 - clip)
  return jnp.log(p) - jnp.log1p(-p)


@dataclasses.dataclass(frozen=True)
class Bernoulli(Likelihood):
  """Decoder logits; ``losses.bernoulli_log_likelihood``. A probability of binary images;
  for grey levels only the negative binary cross-entropy (see ``caveat``)."""

  name: ClassVar[str] = "bernoulli"
  spread_name: ClassVar[str] = "bernoulli_clip"
  data_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

  def log_prob(self, decoded: Array, x: Array) -> Array:
    return losses.bernoulli_log_likelihood(decoded, x, event_ndims=_event_ndims(x))

  def mean(self, decoded: Array) -> Array:
    return jax.nn.sigmoid(decoded)

  def bits_per_dim(
    self, nll_nats: float, num_dims: int, *, binarization: str, binary_data: bool, bits: int = 8
  ) -> float | None:
    """A probability of binary images (binarized, or binary already): ``nll / (D ln 2)``;
    of grey levels it is no probability (see ``caveat``): ``None``."""
    del bits
    if binary_data or binarization in ("dynamic", "threshold"):
      return nll_nats / (num_dims * math.log(2.0))
    return None

  def caveat(self, *, binarization: str, binary_data: bool) -> str | None:
    if binarization in ("none", "dequantize") and not binary_data:
      return (
        f"likelihood='bernoulli' on grey levels (binarization={binarization!r}): the "
        "reconstruction term is the negative binary cross-entropy, not a log-density of the "
        "data, so 'log-likelihoods' and ELBOs are not bounds on log p(x); use "
        "model.likelihood='continuous_bernoulli' for a density of grey levels, or a "
        "binarization."
      )
    return None

  def outputs_for_mean(self, mean: Array, spread: float | None) -> Array:
    return _logits(mean, spread)

  def spreads(self, fit_x: np.ndarray, fit_mean: np.ndarray) -> tuple[float | None, ...]:
    del fit_x, fit_mean
    return _CLIPS


@dataclasses.dataclass(frozen=True)
class ContinuousBernoulli(Likelihood):
  """Decoder logits; the continuous Bernoulli density of grey levels in [0, 1]
  (Loaiza-Ganem & Cunningham 2019), ``losses.continuous_bernoulli_log_likelihood``."""

  name: ClassVar[str] = "continuous_bernoulli"
  spread_name: ClassVar[str] = "bernoulli_clip"
  data_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

  def log_prob(self, decoded: Array, x: Array) -> Array:
    return losses.continuous_bernoulli_log_likelihood(decoded, x, event_ndims=_event_ndims(x))

  def mean(self, decoded: Array) -> Array:
    return losses.continuous_bernoulli_mean(decoded)

  def outputs_for_mean(self, mean: Array, spread: float | None) -> Array:
    # The image is used as the parameter lambda (not as the mean, which differs).
    return _logits(mean, spread)

  def spreads(self, fit_x: np.ndarray, fit_mean: np.ndarray) -> tuple[float | None, ...]:
    del fit_x, fit_mean
    return _CLIPS


@dataclasses.dataclass(frozen=True)
class Gaussian(Likelihood):
  """Decoder means, a fixed variance ``variance``; ``losses.gaussian_log_likelihood``."""

  name: ClassVar[str] = "gaussian"
  spread_name: ClassVar[str] = "gaussian_variance"
  variance: float = 1.0

  def log_prob(self, decoded: Array, x: Array) -> Array:
    return losses.gaussian_log_likelihood(
      decoded, x, variance=self.variance, event_ndims=_event_ndims(x)
    )

  def mean(self, decoded: Array) -> Array:
    return jnp.clip(decoded, 0.0, 1.0)

  def outputs_for_mean(self, mean: Array, spread: float | None) -> Array:
    del spread
    return mean

  def spreads(self, fit_x: np.ndarray, fit_mean: np.ndarray) -> tuple[float | None, ...]:
    del fit_x, fit_mean
    return (self.variance,)


@dataclasses.dataclass(frozen=True)
class GaussianLearned(Likelihood):
  """Decoder means and one learned variance shared by all pixels (the sigma-VAE of Rybkin
  et al. 2021): decoder outputs ``[..., 2]`` (means, log-variances);
  ``losses.gaussian_log_likelihood_learned``. ``variance`` is the initial variance."""

  name: ClassVar[str] = "gaussian_learned"
  spread_name: ClassVar[str] = "gaussian_variance"
  variance: float = 1.0

  def log_prob(self, decoded: Array, x: Array) -> Array:
    return losses.gaussian_log_likelihood_learned(decoded, x, event_ndims=_event_ndims(x))

  def mean(self, decoded: Array) -> Array:
    return jnp.clip(decoded[..., 0], 0.0, 1.0)

  @property
  def shared_log_variance(self) -> float | None:
    return math.log(self.variance)

  def outputs_for_mean(self, mean: Array, spread: float | None) -> Array:
    log_variance = jnp.full(mean.shape, math.log(spread), mean.dtype)
    return jnp.stack([mean, log_variance], -1)

  def spreads(self, fit_x: np.ndarray, fit_mean: np.ndarray) -> tuple[float | None, ...]:
    # The maximum-likelihood variance of a Gaussian with these means: the mean squared error.
    return (float(np.mean((np.asarray(fit_mean) - np.asarray(fit_x)) ** 2)),)


# Log-scales a baseline that predicts only a mean image tries (see ``Likelihood.spreads``).
_LOG_SCALES = (-5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0)


@dataclasses.dataclass(frozen=True)
class _Discretized(Likelihood):
  """A probability of pixel levels ``k / (L - 1)``, ``L = 2**bits`` (``binarization="none"``):
  bits per dimension are ``-log P / (D ln 2)``. The decoder gives, per channel, a mean in
  the ``[-1, 1]`` space and a log-scale: outputs ``[..., 2 c]``."""

  spread_name: ClassVar[str] = "log_scale"
  data_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
  discrete: ClassVar[bool] = True
  bits: int = 8

  @property
  def num_levels(self) -> int:
    return 2**self.bits

  def decoder_shape(self, event_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*event_shape[:-1], 2 * event_shape[-1])

  def mean(self, decoded: Array) -> Array:
    c = decoded.shape[-1] // 2
    return jnp.clip((decoded[..., :c] + 1.0) / 2.0, 0.0, 1.0)

  def outputs_for_mean(self, mean: Array, spread: float | None) -> Array:
    return jnp.concatenate([2.0 * mean - 1.0, jnp.full(mean.shape, spread, mean.dtype)], -1)

  def spreads(self, fit_x: np.ndarray, fit_mean: np.ndarray) -> tuple[float | None, ...]:
    del fit_x, fit_mean
    return _LOG_SCALES


@dataclasses.dataclass(frozen=True)
class DiscretizedLogistic(_Discretized):
  """Each channel of each pixel a discretized logistic (Kingma et al. 2016, IAF):
  ``losses.discretized_logistic_log_likelihood``."""

  name: ClassVar[str] = "discretized_logistic"

  def log_prob(self, decoded: Array, x: Array) -> Array:
    return losses.discretized_logistic_log_likelihood(
      decoded, x, self.num_levels, event_ndims=_event_ndims(x)
    )


@dataclasses.dataclass(frozen=True)
class DiscretizedGaussian(_Discretized):
  """Each channel of each pixel a discretized Gaussian:
  ``losses.discretized_gaussian_log_likelihood``."""

  name: ClassVar[str] = "discretized_gaussian"

  def log_prob(self, decoded: Array, x: Array) -> Array:
    return losses.discretized_gaussian_log_likelihood(
      decoded, x, self.num_levels, event_ndims=_event_ndims(x)
    )


@dataclasses.dataclass(frozen=True)
class DiscretizedLogisticMixture(_Discretized):
  """Each pixel's channels jointly a mixture of ``components`` discretized logistics with
  PixelCNN++'s linear channel coupling (Salimans et al. 2017; VDVAE, NVAE):
  ``losses.discretized_logistic_mixture_log_likelihood``. Decoder outputs per pixel:
  ``losses.mixture_num_params(components, c)`` (``10 K`` for RGB)."""

  name: ClassVar[str] = "discretized_logistic_mixture"
  components: int = 10

  def decoder_shape(self, event_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*event_shape[:-1], losses.mixture_num_params(self.components, event_shape[-1]))

  def log_prob(self, decoded: Array, x: Array) -> Array:
    return losses.discretized_logistic_mixture_log_likelihood(
      decoded, x, self.components, self.num_levels
    )

  def mean(self, decoded: Array) -> Array:
    c = _mixture_channels(decoded.shape[-1], self.components)
    return losses.discretized_logistic_mixture_mean(decoded, self.components, c)

  def outputs_for_mean(self, mean: Array, spread: float | None) -> Array:
    """All the weight on the first component (logit 0 against -30), its means ``mean``,
    log-scales ``spread`` and no coupling."""
    K, c = self.components, mean.shape[-1]
    pixels = mean.shape[:-1]
    logits = jnp.full((*pixels, K), -30.0, mean.dtype).at[..., 0].set(0.0)
    means = jnp.zeros((*pixels, c, K), mean.dtype).at[..., 0].set(2.0 * mean - 1.0)
    log_scales = jnp.full((*pixels, c, K), spread, mean.dtype)
    coefficients = jnp.zeros((*pixels, c * (c - 1) // 2 * K), mean.dtype)
    parts = [logits, means.reshape(*pixels, c * K), log_scales.reshape(*pixels, c * K)]
    return jnp.concatenate([*parts, coefficients], -1)


def _mixture_channels(num_params: int, components: int) -> int:
  for c in (1, 2, 3, 4):
    if losses.mixture_num_params(components, c) == num_params:
      return c
  raise ValueError(f"{num_params} outputs per pixel are no mixture of {components} components.")


BERNOULLI = Bernoulli()  # The default of the models' constructors.

REGISTRY: dict[str, type[Likelihood]] = {
  cls.name: cls
  for cls in (
    Bernoulli,
    ContinuousBernoulli,
    Gaussian,
    GaussianLearned,
    DiscretizedLogistic,
    DiscretizedGaussian,
    DiscretizedLogisticMixture,
  )
}


def from_config(config: ml_collections.ConfigDict) -> Likelihood:
  """The likelihood ``config.model`` names, with its parameters."""
  m = config.model
  config_lib.check_choice("model.likelihood", m.likelihood)
  cls = REGISTRY[m.likelihood]
  if cls in (Gaussian, GaussianLearned):
    return cls(variance=m.gaussian_variance)
  if cls is DiscretizedLogisticMixture:
    return cls(bits=config.data.bits, components=m.mixture_components)
  if issubclass(cls, _Discretized):
    return cls(bits=config.data.bits)
  return cls()
