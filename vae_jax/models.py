"""Encoders and decoders (Flax linen), exposed as pure functions.

This is the only module that imports Flax. Everything else sees a ``Model``:
pure functions over a plain parameter pytree ``{"encoder": ..., "decoder":
...}``, where ``"encoder"`` holds every parameter of the inference network
``q(z | x)`` and ``"decoder"`` every parameter of the generative model
``p(z) p(x | z)`` (the split DReG's gradients rely on).

Three families, each usable with every objective and with the evaluation:

* ``kind="mlp"``: one stochastic layer, MLP encoder and decoder (the Flax
  example; the VAE of Kingma & Welling 2014 and Burda et al. 2015).
* ``kind="conv"``: one stochastic layer, stride-2 convolutional encoder and
  transposed-convolutional decoder.
* ``stochastic_layers=2`` with either: the two-stochastic-layer model of Burda
  et al. (2015), ``q(z1 | x) q(z2 | z1)`` and ``p(z2) p(z1 | z2) p(x | z1)``,
  whose ``x``-facing networks are the MLP or convolutional ones.

Every model draws its latents from given standard-normal noise ``eps`` of
shape ``[K, batch, latents]`` (all layers' latents concatenated, bottom layer
first), so the caller owns the randomness and every sample is reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vae_jax import losses

Array = jax.Array
Params = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "relu": jax.nn.relu,
  "tanh": jnp.tanh,
  "gelu": jax.nn.gelu,
  "elu": jax.nn.elu,
  "softplus": jax.nn.softplus,
  "swish": jax.nn.swish,
}


def soft_clamp(x: Array, low: float, high: float) -> Array:
  """Smoothly bounds ``x`` to about ``[low, high]``; the identity well inside.

  ``x + softplus(low - x) - softplus(x - high)``: at distance ``d`` from the
  nearer bound the deviation from ``x`` is ``softplus(-d)`` (below 1e-8 for
  ``d > 18``, and ``x`` itself to float precision in the middle), and far
  outside the result approaches the bound. Used on the encoder's log-variance
  so that ``exp(logvar)`` and the KL stay finite by construction. The gradient
  ``1 - sigmoid(low - x) - sigmoid(x - high)`` is 1 inside and decays smoothly
  beyond the bounds.
  """
  return x + jax.nn.softplus(low - x) - jax.nn.softplus(x - high)


def _hidden_layers(h: Array, widths: Sequence[int], act: Callable[[Array], Array]) -> Array:
  """Dense layers ``hidden_0, hidden_1, ...`` of the calling module, each followed by ``act``.

  Called from a module's ``@nn.compact`` method, the layers belong to that module.
  """
  for i, width in enumerate(widths):
    h = act(nn.Dense(width, name=f"hidden_{i}")(h))
  return h


class Encoder(nn.Module):
  """``x: [batch, *event_shape] -> (mean, logvar)``, each ``[batch, latents]``.

  An MLP over the flattened input. ``logvar`` is soft-clamped to
  ``[-logvar_bound, logvar_bound]`` (``None`` disables the clamp).
  """

  hidden: Sequence[int]
  latents: int
  activation: str = "relu"
  logvar_bound: float | None = 30.0

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    act = ACTIVATIONS[self.activation]
    h = x.reshape(x.shape[0], -1)
    h = _hidden_layers(h, self.hidden, act)
    mean = nn.Dense(self.latents, name="mean")(h)
    logvar = nn.Dense(self.latents, name="logvar")(h)
    if self.logvar_bound is not None:
      logvar = soft_clamp(logvar, -self.logvar_bound, self.logvar_bound)
    return mean, logvar


class Decoder(nn.Module):
  """``z: [batch, latents] -> [batch, *output_shape]`` logits or means.

  With ``learned_variance`` the output gains a last axis of size 2: the means
  and a learned log-variance shared by all pixels (one parameter, initialized
  to ``init_log_variance``; the sigma-VAE of Rybkin et al. 2021).
  """

  hidden: Sequence[int]
  output_shape: Sequence[int]
  activation: str = "relu"
  learned_variance: bool = False
  init_log_variance: float = 0.0

  @nn.compact
  def __call__(self, z: Array) -> Array:
    act = ACTIVATIONS[self.activation]
    h = z
    h = _hidden_layers(h, self.hidden, act)
    out = nn.Dense(math.prod(self.output_shape), name="output")(h)
    out = out.reshape(z.shape[0], *self.output_shape)
    return _with_variance(self, out)


def _with_variance(module: nn.Module, out: Array) -> Array:
  if not module.learned_variance:
    return out
  log_variance = module.param(
    "log_variance", nn.initializers.constant(module.init_log_variance), ()
  )
  # Soft-bounded like the encoder's, so exp() stays finite whatever the step size.
  log_variance = soft_clamp(log_variance, -LOG_VARIANCE_BOUND, LOG_VARIANCE_BOUND)
  return jnp.stack([out, jnp.broadcast_to(log_variance, out.shape).astype(out.dtype)], -1)


# Bound on the learned observation log-variance: variances in [4.5e-5, 2.2e4].
LOG_VARIANCE_BOUND = 10.0


class ConvEncoder(nn.Module):
  """``x: [batch, h, w, c] -> (mean, logvar)``: stride-2 convolutions, then an MLP.

  Each entry of ``features`` is one 4x4 convolution with stride 2 ("SAME"
  padding), halving the height and width; the flattened result goes through
  ``hidden`` dense layers and the two linear heads.
  """

  features: Sequence[int]
  hidden: Sequence[int]
  latents: int
  activation: str = "relu"
  logvar_bound: float | None = 30.0

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    act = ACTIVATIONS[self.activation]
    h = x
    for i, f in enumerate(self.features):
      h = act(nn.Conv(f, (4, 4), strides=(2, 2), padding="SAME", name=f"conv_{i}")(h))
    return Encoder(self.hidden, self.latents, self.activation, self.logvar_bound, name="mlp")(h)


class ConvDecoder(nn.Module):
  """``z -> [batch, h, w, c]``: an MLP, then stride-2 transposed convolutions.

  The mirror of ``ConvEncoder``: dense layers ``hidden``, a dense layer to a
  ``[h / 2**n, w / 2**n, features[-1]]`` map, then ``n = len(features)``
  4x4 transposed convolutions with stride 2 (to ``features[-2], ...,
  features[0]`` channels, the last one to the image's channels, linear).
  """

  features: Sequence[int]
  hidden: Sequence[int]
  output_shape: Sequence[int]
  activation: str = "relu"
  learned_variance: bool = False
  init_log_variance: float = 0.0

  @nn.compact
  def __call__(self, z: Array) -> Array:
    act = ACTIVATIONS[self.activation]
    height, width, channels = self.output_shape
    scale = 2 ** len(self.features)
    h = z
    h = _hidden_layers(h, self.hidden, act)
    base = (height // scale, width // scale, self.features[-1])
    h = act(nn.Dense(math.prod(base), name="to_map")(h)).reshape(z.shape[0], *base)
    out_channels = (*reversed(self.features[:-1]), channels)
    for i, f in enumerate(out_channels):
      h = nn.ConvTranspose(f, (4, 4), strides=(2, 2), padding="SAME", name=f"deconv_{i}")(h)
      if i < len(out_channels) - 1:
        h = act(h)
    return _with_variance(self, h)


class PosteriorSample(NamedTuple):
  """``K`` draws from ``q(z | x)`` with what every objective needs of them.

  Attributes:
    z: ``[K, batch, latents]`` the samples (all layers, bottom first).
    log_q: ``[K, batch]`` ``log q(z | x)`` at the samples.
    log_prior: ``[K, batch]`` ``log p(z)`` at the samples.
    kl_per_dim: ``[K, batch, latents]`` per-dimension KL terms whose sum over
      dimensions is an unbiased estimate of ``KL(q(z | x) || p(z))``: exact
      (closed form) for a layer with a standard-normal prior, and the
      single-sample ``log q - log p`` for a layer whose prior is conditional.
  """

  z: Array
  log_q: Array
  log_prior: Array
  kl_per_dim: Array


class Model(NamedTuple):
  """A VAE as pure functions.

  Attributes:
    init: ``(key, x) -> params``; ``x: [batch, *event_shape]`` fixes the shapes.
    encode: ``(params, x) -> (mean, logvar)``, each ``[batch, latents]``: the
      posterior's means and log-variances; for two layers, those of ``z1`` and
      of ``q(z2 | z1 = mean of z1)`` concatenated (the "mean path").
    decode: ``(params, z) -> [batch, *event_shape]`` (logits for a Bernoulli
      likelihood, means for a Gaussian one, ``[..., 2]`` means and
      log-variances for a learned variance). ``z: [batch, latents]``; a
      hierarchical decoder reads the bottom layer only.
    posterior: ``(params, x, eps, stop_density_gradient=False) ->
      PosteriorSample`` from noise ``eps: [K, batch, latents]``. With
      ``stop_density_gradient``, ``log q`` is evaluated with
      ``stop_gradient``-ed posterior parameters (gradients reach the encoder
      only through ``z``), as DReG needs.
    sample_prior: ``(params, key, n) -> z [n, latents]`` ancestral samples.
    latents: total latent dimensionality.
    layer_latents: latents per stochastic layer, bottom (``x``-facing) first.
  """

  init: Callable[[Array, Array], Params]
  encode: Callable[[Params, Array], tuple[Array, Array]]
  decode: Callable[[Params, Array], Array]
  posterior: Callable[..., PosteriorSample]
  sample_prior: Callable[[Params, Array, int], Array]
  latents: int
  layer_latents: tuple[int, ...]


class LogWeights(NamedTuple):
  """What every objective and estimator reads off ``K`` posterior samples.

  Attributes:
    log_w: ``[K, batch]`` ``log p(x | z) + log p(z) - log q(z | x)``.
    log_px_z: ``[K, batch]`` ``log p(x | z)``.
    posterior: the ``PosteriorSample`` they come from.
  """

  log_w: Array
  log_px_z: Array
  posterior: PosteriorSample


def log_weights(
  model: Model,
  params: Params,
  x: Array,
  eps: Array,
  log_likelihood_fn: Callable[[Array, Array], Array],
  *,
  stop_density_gradient: bool = False,
) -> LogWeights:
  """Importance log-weights of ``model`` at the samples ``model.posterior`` draws from
  ``eps: [K, batch, latents]``, decoding the ``K * batch`` latents in one call."""
  post = model.posterior(params, x, eps, stop_density_gradient=stop_density_gradient)
  decode = functools.partial(model.decode, params)
  log_px_z = losses.sample_log_likelihoods(post.z, x, decode, log_likelihood_fn)
  return LogWeights(log_px_z + post.log_prior - post.log_q, log_px_z, post)


def _check_x(event_shape: tuple[int, ...], x: Array, what: str) -> None:
  if tuple(x.shape[1:]) != event_shape:
    raise ValueError(
      f"{what} got x of shape {x.shape}, but the model was built for examples of shape "
      f"{event_shape}: pass [batch, *{event_shape}]. Check the dataset and config.model fields."
    )


def _check_eps(eps: Array, x: Array, latents: int) -> None:
  if eps.ndim != 3 or eps.shape[1:] != (x.shape[0], latents):
    raise ValueError(
      f"eps must be [K, batch, latents] = [K, {x.shape[0]}, {latents}], got {eps.shape}."
    )


def _merge(a: Array) -> Array:  # [K, B, ...] -> [K * B, ...]
  return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _split(a: Array, k: int) -> Array:  # [K * B, ...] -> [K, B, ...]
  return a.reshape(k, a.shape[0] // k, *a.shape[1:])


def from_encoder_decoder(
  init: Callable[[Array, Array], Params] | None,
  encode: Callable[[Params, Array], tuple[Array, Array]],
  decode: Callable[[Params, Array], Array],
  latents: int,
) -> Model:
  """A one-stochastic-layer ``Model`` with prior N(0, I) from pure functions.

  ``encode(params, x) -> (mean, logvar)`` and ``decode(params, z)`` may be any
  JAX functions (Flax or not); this adds the ``posterior`` and
  ``sample_prior`` every objective and the evaluation use.
  """

  def posterior(
    params: Params, x: Array, eps: Array, stop_density_gradient: bool = False
  ) -> PosteriorSample:
    _check_eps(eps, x, latents)
    mean, logvar = encode(params, x)
    # losses.reparameterize's formula, from given noise.
    z = mean[None] + jnp.exp(0.5 * logvar)[None] * eps
    if stop_density_gradient:
      mean, logvar = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)
    shape = z.shape
    log_q = losses.diag_gaussian_log_prob(
      z, jnp.broadcast_to(mean, shape), jnp.broadcast_to(logvar, shape)
    )
    kl = jnp.broadcast_to(losses.kl_divergence_per_dim(mean, logvar), shape)
    return PosteriorSample(z, log_q, losses.standard_normal_log_prob(z), kl)

  def sample_prior(params: Params, key: Array, n: int) -> Array:
    del params
    return jax.random.normal(key, (n, latents))

  return Model(init, encode, decode, posterior, sample_prior, latents, (latents,))


def _single_layer(encoder: nn.Module, decoder: nn.Module, event_shape, latents: int) -> Model:
  """A one-stochastic-layer VAE with prior N(0, I) from Flax encoder/decoder modules."""

  def init(key: Array, x: Array) -> Params:
    _check_x(event_shape, x, "init")
    enc_key, dec_key = jax.random.split(key)
    z = jnp.zeros((x.shape[0], latents), x.dtype)
    return {
      "encoder": encoder.init(enc_key, x)["params"],
      "decoder": decoder.init(dec_key, z)["params"],
    }

  def encode(params: Params, x: Array) -> tuple[Array, Array]:
    _check_x(event_shape, x, "encode")
    return encoder.apply({"params": params["encoder"]}, x)

  def decode(params: Params, z: Array) -> Array:
    if z.ndim != 2 or z.shape[-1] != latents:
      raise ValueError(f"decode expects z of shape [batch, {latents}], got {z.shape}.")
    return decoder.apply({"params": params["decoder"]}, z)

  return from_encoder_decoder(init, encode, decode, latents)


def _two_layer(
  x_encoder: nn.Module,
  x_decoder: nn.Module,
  top_hidden: Sequence[int],
  event_shape,
  latents: int,
  top_latents: int,
  activation: str,
  logvar_bound: float | None,
) -> Model:
  """``q(z1 | x) q(z2 | z1)`` and ``p(z2) p(z1 | z2) p(x | z1)`` (Burda et al. 2015).

  ``x_encoder`` gives ``q(z1 | x)``, ``x_decoder`` gives ``p(x | z1)``; the
  conditionals between the layers are MLPs with ``top_hidden`` widths (up) and
  their mirror (down), as in the IWAE paper's 100-100 layers.
  """
  q_z2 = Encoder(tuple(top_hidden), top_latents, activation, logvar_bound)
  p_z1 = Encoder(tuple(reversed(tuple(top_hidden))), latents, activation, logvar_bound)
  total = latents + top_latents

  def init(key: Array, x: Array) -> Params:
    _check_x(event_shape, x, "init")
    keys = jax.random.split(key, 4)
    z1 = jnp.zeros((x.shape[0], latents), x.dtype)
    z2 = jnp.zeros((x.shape[0], top_latents), x.dtype)
    return {
      "encoder": {
        "q_z1": x_encoder.init(keys[0], x)["params"],
        "q_z2": q_z2.init(keys[1], z1)["params"],
      },
      "decoder": {
        "p_z1": p_z1.init(keys[2], z2)["params"],
        "p_x": x_decoder.init(keys[3], z1)["params"],
      },
    }

  def apply(module, p, inputs):
    return module.apply({"params": p}, inputs)

  def encode(params: Params, x: Array) -> tuple[Array, Array]:
    _check_x(event_shape, x, "encode")
    enc = params["encoder"]
    mean1, logvar1 = apply(x_encoder, enc["q_z1"], x)
    mean2, logvar2 = apply(q_z2, enc["q_z2"], mean1)
    return jnp.concatenate([mean1, mean2], -1), jnp.concatenate([logvar1, logvar2], -1)

  def decode(params: Params, z: Array) -> Array:
    if z.ndim != 2 or z.shape[-1] != total:
      raise ValueError(f"decode expects z of shape [batch, {total}], got {z.shape}.")
    return apply(x_decoder, params["decoder"]["p_x"], z[:, :latents])

  def posterior(
    params: Params, x: Array, eps: Array, stop_density_gradient: bool = False
  ) -> PosteriorSample:
    _check_x(event_shape, x, "posterior")
    _check_eps(eps, x, total)
    k = eps.shape[0]
    enc, dec = params["encoder"], params["decoder"]
    mean1, logvar1 = apply(x_encoder, enc["q_z1"], x)
    z1 = mean1[None] + jnp.exp(0.5 * logvar1)[None] * eps[..., :latents]
    mean2, logvar2 = (_split(a, k) for a in apply(q_z2, enc["q_z2"], _merge(z1)))
    z2 = mean2 + jnp.exp(0.5 * logvar2) * eps[..., latents:]
    if stop_density_gradient:  # Densities of q at fixed parameters; z keeps its path.
      mean1, logvar1 = jax.lax.stop_gradient(mean1), jax.lax.stop_gradient(logvar1)
      mean2, logvar2 = (
        _split(a, k) for a in apply(q_z2, jax.lax.stop_gradient(enc["q_z2"]), _merge(z1))
      )
    shape1 = z1.shape
    log_q1 = losses.diag_gaussian_log_prob_per_dim(
      z1, jnp.broadcast_to(mean1, shape1), jnp.broadcast_to(logvar1, shape1)
    )
    log_q2 = losses.diag_gaussian_log_prob(z2, mean2, logvar2)
    prior_mean1, prior_logvar1 = (_split(a, k) for a in apply(p_z1, dec["p_z1"], _merge(z2)))
    log_p1 = losses.diag_gaussian_log_prob_per_dim(z1, prior_mean1, prior_logvar1)
    log_p2 = losses.standard_normal_log_prob(z2)
    kl = jnp.concatenate([log_q1 - log_p1, losses.kl_divergence_per_dim(mean2, logvar2)], -1)
    return PosteriorSample(
      z=jnp.concatenate([z1, z2], -1),
      log_q=jnp.sum(log_q1, -1) + log_q2,
      log_prior=jnp.sum(log_p1, -1) + log_p2,
      kl_per_dim=kl,
    )

  def sample_prior(params: Params, key: Array, n: int) -> Array:
    key2, key1 = jax.random.split(key)
    z2 = jax.random.normal(key2, (n, top_latents))
    mean1, logvar1 = apply(p_z1, params["decoder"]["p_z1"], z2)
    z1 = losses.reparameterize(key1, mean1, logvar1)
    return jnp.concatenate([z1, z2], -1)

  return Model(init, encode, decode, posterior, sample_prior, total, (latents, top_latents))


def make_vae(
  event_shape: Sequence[int],
  latents: int,
  *,
  kind: str = "mlp",
  encoder_hidden: Sequence[int] = (500,),
  decoder_hidden: Sequence[int] | None = None,
  conv_features: Sequence[int] = (32, 64),
  activation: str = "relu",
  logvar_bound: float | None = 30.0,
  stochastic_layers: int = 1,
  top_latents: int = 50,
  top_hidden: Sequence[int] = (100, 100),
  learned_variance: bool = False,
  init_log_variance: float = 0.0,
) -> Model:
  """A VAE of any supported kind (see the module docstring).

  Args:
    event_shape: shape of one example, e.g. ``(28, 28, 1)``.
    latents: latent dimensionality (of the bottom layer ``z1`` for two layers).
    kind: ``"mlp"`` or ``"conv"``: the networks that read ``x`` and write it.
    encoder_hidden: dense widths of the encoder, input to output (after the
      convolutions for ``"conv"``).
    decoder_hidden: dense widths of the decoder, latent to output (default:
      the encoder's, mirrored).
    conv_features: channels of the stride-2 convolutions (``"conv"`` only).
    activation: a key of ``ACTIVATIONS``.
    logvar_bound: soft bound on ``|logvar|`` (see ``soft_clamp``), or ``None``.
    stochastic_layers: 1, or 2 for ``q(z1|x) q(z2|z1)``, ``p(z2) p(z1|z2) p(x|z1)``.
    top_latents: dimensionality of ``z2`` (two layers only).
    top_hidden: widths of the MLP ``z1 -> z2`` (and, mirrored, ``z2 -> z1``).
    learned_variance: the decoder also outputs a learned, shared observation
      log-variance (for a Gaussian likelihood).
    init_log_variance: its initial value.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
  if latents < 1:
    raise ValueError(f"latents must be positive, got {latents}.")
  if stochastic_layers not in (1, 2):
    raise ValueError(f"stochastic_layers must be 1 or 2, got {stochastic_layers}.")
  if stochastic_layers == 2 and top_latents < 1:
    raise ValueError(f"top_latents must be positive, got {top_latents}.")
  event_shape = tuple(event_shape)
  encoder_hidden = tuple(encoder_hidden)
  if decoder_hidden is None:
    decoder_hidden = tuple(reversed(encoder_hidden))
  variance = {"learned_variance": learned_variance, "init_log_variance": init_log_variance}
  if kind == "mlp":
    encoder = Encoder(encoder_hidden, latents, activation, logvar_bound)
    decoder = Decoder(tuple(decoder_hidden), event_shape, activation, **variance)
  elif kind == "conv":
    conv_features = tuple(conv_features)
    scale = 2 ** len(conv_features)
    if len(event_shape) != 3 or event_shape[0] % scale or event_shape[1] % scale:
      raise ValueError(
        f"kind='conv' with {len(conv_features)} stride-2 layers needs examples [h, w, c] "
        f"with h and w multiples of {scale}; got {event_shape}. Use fewer "
        "config.model.conv_features, or kind='mlp'."
      )
    encoder = ConvEncoder(conv_features, encoder_hidden, latents, activation, logvar_bound)
    decoder = ConvDecoder(conv_features, tuple(decoder_hidden), event_shape, activation, **variance)
  else:
    raise ValueError(f"Unknown model kind {kind!r}; available: 'mlp', 'conv'.")
  if stochastic_layers == 1:
    return _single_layer(encoder, decoder, event_shape, latents)
  return _two_layer(
    encoder, decoder, top_hidden, event_shape, latents, top_latents, activation, logvar_bound
  )


def make_mlp_vae(
  event_shape: Sequence[int],
  latents: int,
  encoder_hidden: Sequence[int] = (500,),
  decoder_hidden: Sequence[int] | None = None,
  activation: str = "relu",
  logvar_bound: float | None = 30.0,
) -> Model:
  """An MLP VAE; the defaults are the Flax example's 784-500-20 / 20-500-784."""
  return make_vae(
    event_shape,
    latents,
    kind="mlp",
    encoder_hidden=encoder_hidden,
    decoder_hidden=decoder_hidden,
    activation=activation,
    logvar_bound=logvar_bound,
  )


def make_model(config: ml_collections.ConfigDict, event_shape: Sequence[int]) -> Model:
  """Builds the model described by ``config.model`` for examples of ``event_shape``."""
  m = config.model
  return make_vae(
    event_shape,
    m.latents,
    kind=m.kind,
    encoder_hidden=tuple(m.encoder_hidden),
    decoder_hidden=tuple(m.decoder_hidden) if m.decoder_hidden is not None else None,
    conv_features=tuple(m.conv_features),
    activation=m.activation,
    logvar_bound=m.logvar_bound,
    stochastic_layers=m.stochastic_layers,
    top_latents=m.top_latents,
    top_hidden=tuple(m.top_hidden),
    learned_variance=m.likelihood == "gaussian_learned",
    init_log_variance=math.log(m.gaussian_variance) if m.gaussian_variance > 0 else 0.0,
  )
