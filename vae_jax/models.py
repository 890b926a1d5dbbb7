"""Encoders and decoders (Flax linen), exposed as pure ``init``/``encode``/``decode``.

This is the only module that imports Flax. Everything else sees a ``Model``:
three pure functions over a plain parameter pytree
``{"encoder": ..., "decoder": ...}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

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
    for i, width in enumerate(self.hidden):
      h = act(nn.Dense(width, name=f"hidden_{i}")(h))
    mean = nn.Dense(self.latents, name="mean")(h)
    logvar = nn.Dense(self.latents, name="logvar")(h)
    if self.logvar_bound is not None:
      logvar = soft_clamp(logvar, -self.logvar_bound, self.logvar_bound)
    return mean, logvar


class Decoder(nn.Module):
  """``z: [batch, latents] -> [batch, *output_shape]`` logits or means."""

  hidden: Sequence[int]
  output_shape: Sequence[int]
  activation: str = "relu"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    act = ACTIVATIONS[self.activation]
    h = z
    for i, width in enumerate(self.hidden):
      h = act(nn.Dense(width, name=f"hidden_{i}")(h))
    size = 1
    for d in self.output_shape:
      size *= d
    out = nn.Dense(size, name="output")(h)
    return out.reshape(z.shape[0], *self.output_shape)


class Model(NamedTuple):
  """A VAE as pure functions.

  Attributes:
    init: ``(key, x) -> params``; ``x: [batch, *event_shape]`` fixes the shapes.
    encode: ``(params, x) -> (mean, logvar)``, each ``[batch, latents]``.
    decode: ``(params, z) -> [batch, *event_shape]`` (logits for a Bernoulli
      likelihood, means for a Gaussian one).
    latents: the latent dimensionality.
  """

  init: Callable[[Array, Array], Params]
  encode: Callable[[Params, Array], tuple[Array, Array]]
  decode: Callable[[Params, Array], Array]
  latents: int


def make_mlp_vae(
  event_shape: Sequence[int],
  latents: int,
  encoder_hidden: Sequence[int] = (500,),
  decoder_hidden: Sequence[int] | None = None,
  activation: str = "relu",
  logvar_bound: float | None = 30.0,
) -> Model:
  """An MLP VAE; the defaults are the Flax example's 784-500-20 / 20-500-784.

  Args:
    event_shape: shape of one example, e.g. ``(28, 28, 1)``.
    latents: latent dimensionality.
    encoder_hidden: hidden widths of the encoder, input to output.
    decoder_hidden: hidden widths of the decoder, latent to output (default:
      the encoder's, mirrored).
    activation: a key of ``ACTIVATIONS``.
    logvar_bound: soft bound on ``|logvar|`` (see ``soft_clamp``), or ``None``.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
  if latents < 1:
    raise ValueError(f"latents must be positive, got {latents}.")
  if decoder_hidden is None:
    decoder_hidden = tuple(reversed(tuple(encoder_hidden)))
  event_shape = tuple(event_shape)
  encoder = Encoder(tuple(encoder_hidden), latents, activation, logvar_bound)
  decoder = Decoder(tuple(decoder_hidden), event_shape, activation)

  def init(key: Array, x: Array) -> Params:
    if tuple(x.shape[1:]) != event_shape:
      raise ValueError(f"init got x of shape {x.shape}; the model expects [batch, *{event_shape}].")
    enc_key, dec_key = jax.random.split(key)
    z = jnp.zeros((x.shape[0], latents), x.dtype)
    return {
      "encoder": encoder.init(enc_key, x)["params"],
      "decoder": decoder.init(dec_key, z)["params"],
    }

  def encode(params: Params, x: Array) -> tuple[Array, Array]:
    if tuple(x.shape[1:]) != event_shape:
      raise ValueError(
        f"encode got x of shape {x.shape}, but the model was built for examples of shape "
        f"{event_shape}. Check the dataset and config.model fields."
      )
    return encoder.apply({"params": params["encoder"]}, x)

  def decode(params: Params, z: Array) -> Array:
    if z.ndim != 2 or z.shape[-1] != latents:
      raise ValueError(f"decode expects z of shape [batch, {latents}], got {z.shape}.")
    return decoder.apply({"params": params["decoder"]}, z)

  return Model(init=init, encode=encode, decode=decode, latents=latents)


def make_model(config: ml_collections.ConfigDict, event_shape: Sequence[int]) -> Model:
  """Builds the model described by ``config.model`` for examples of ``event_shape``."""
  m = config.model
  if m.kind != "mlp":
    raise ValueError(f"Unknown config.model.kind {m.kind!r}; available: 'mlp'.")
  return make_mlp_vae(
    event_shape=event_shape,
    latents=m.latents,
    encoder_hidden=tuple(m.encoder_hidden),
    decoder_hidden=tuple(m.decoder_hidden) if m.decoder_hidden is not None else None,
    activation=m.activation,
    logvar_bound=m.logvar_bound,
  )
