"""The Flax (linen) networks of every model; the only module that imports Flax.

Each network maps arrays to arrays. ``vae_jax.models`` assembles them into
posteriors, priors and likelihoods behind pure functions, so nothing outside
these two modules sees a Flax object. Parameter names are part of the
checkpoint format: ``hidden_<i>`` (and ``gate_<i>`` for gated units), ``mean``,
``logvar``, ``output``, ``log_variance``, ``conv_<i>``, ``deconv_<i>``,
``to_map``, ``mlp``, and the residual networks' ``stem``, ``level_<i>_block_<j>``,
``down_<i>``, ``up_<i>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "relu": jax.nn.relu,
  "tanh": jnp.tanh,
  "gelu": jax.nn.gelu,
  "elu": jax.nn.elu,
  "softplus": jax.nn.softplus,
  "swish": jax.nn.swish,
}

# Kernel initializers by config name. "lecun_normal" is Flax's default (a
# truncated normal of variance 1/fan_in); "he_normal" is the untruncated
# N(0, 2/fan_in) of the VampPrior code (utils/nn.py, he_init).
KERNEL_INITS: dict[str, Callable] = {
  "lecun_normal": nn.initializers.lecun_normal(),
  "he_normal": nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
}

# Bound on the learned observation log-variance: variances in [4.5e-5, 2.2e4].
LOG_VARIANCE_BOUND = 10.0


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


def hardtanh(x: Array, low: float, high: float) -> Array:
  """``clip(x, low, high)`` with PyTorch's ``Hardtanh`` gradient: 1 strictly inside, 0 at
  and beyond the bounds (``jnp.clip`` gives 1/2 exactly at a bound)."""
  inside = (x > low) & (x < high)
  return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, low, high)))


def bound_logvar(
  logvar: Array, soft_bound: float | None, clip: tuple[float, float] | None
) -> Array:
  """The encoder's log-variance, limited by ``soft_clamp`` to ``[-soft_bound, soft_bound]``
  or clipped to ``clip = (low, high)`` (the VampPrior code's ``Hardtanh(-6, 2)``)."""
  if clip is not None:
    return hardtanh(logvar, clip[0], clip[1])
  if soft_bound is not None:
    return soft_clamp(logvar, -soft_bound, soft_bound)
  return logvar


def _hidden_layers(
  h: Array,
  widths: Sequence[int],
  activation: str,
  gated: bool = False,
  kernel_init: str = "lecun_normal",
) -> Array:
  """Layers ``hidden_0, hidden_1, ...`` (and ``gate_<i>``) of the calling module.

  Called from a module's ``@nn.compact`` method, the layers' parameters belong to
  that module (the names above, at its top level).
  """
  init = KERNEL_INITS[kernel_init]
  for i, width in enumerate(widths):
    out = nn.Dense(width, kernel_init=init, name=f"hidden_{i}")(h)
    if gated:
      h = out * jax.nn.sigmoid(nn.Dense(width, kernel_init=init, name=f"gate_{i}")(h))
    else:
      h = ACTIVATIONS[activation](out)
  return h


class Encoder(nn.Module):
  """``x: [batch, *event_shape] -> (mean, logvar)``, each ``[batch, latents]``.

  An MLP over the flattened input (with ``condition: [batch, k]``, a conditional VAE's
  one-hot label, concatenated to it). ``logvar`` is soft-clamped to
  ``[-logvar_bound, logvar_bound]`` (``None`` disables the clamp), or clipped
  to ``logvar_clip`` when that is given.
  """

  hidden: Sequence[int]
  latents: int
  activation: str = "relu"
  logvar_bound: float | None = 30.0
  gated: bool = False
  kernel_init: str = "lecun_normal"
  logvar_clip: tuple[float, float] | None = None

  @nn.compact
  def __call__(self, x: Array, condition: Array | None = None) -> tuple[Array, Array]:
    h = x.reshape(x.shape[0], -1)
    if condition is not None:  # A conditional VAE's one-hot label, beside the input.
      h = jnp.concatenate([h, condition.astype(h.dtype)], axis=-1)
    h = _hidden_layers(h, self.hidden, self.activation, self.gated, self.kernel_init)
    return _gaussian_heads(self, h)


def _gaussian_heads(module: nn.Module, h: Array) -> tuple[Array, Array]:
  """Linear heads ``mean`` and ``logvar`` of the calling module, the log-variance bounded."""
  init = KERNEL_INITS[module.kernel_init]
  mean = nn.Dense(module.latents, kernel_init=init, name="mean")(h)
  logvar = nn.Dense(module.latents, kernel_init=init, name="logvar")(h)
  return mean, bound_logvar(logvar, module.logvar_bound, module.logvar_clip)


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
  gated: bool = False
  kernel_init: str = "lecun_normal"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    h = _hidden_layers(z, self.hidden, self.activation, self.gated, self.kernel_init)
    init = KERNEL_INITS[self.kernel_init]
    out = nn.Dense(math.prod(self.output_shape), kernel_init=init, name="output")(h)
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


class JointEncoder(nn.Module):
  """``(a, b) -> (mean, logvar)``: each input through its own layers, then joint layers.

  The VampPrior paper's ``q(z1 | x, z2)``: ``x`` and ``z2`` each through one
  gated layer (``a_hidden``, ``b_hidden``), concatenated, one more
  (``joint_hidden``), then the two heads. Inputs are flattened.
  """

  a_hidden: Sequence[int]
  b_hidden: Sequence[int]
  joint_hidden: Sequence[int]
  latents: int
  activation: str = "relu"
  logvar_bound: float | None = 30.0
  gated: bool = False
  kernel_init: str = "lecun_normal"
  logvar_clip: tuple[float, float] | None = None

  @nn.compact
  def __call__(self, a: Array, b: Array) -> tuple[Array, Array]:
    h = _joint_features(self, a, b)
    return _gaussian_heads(self, h)


class JointDecoder(nn.Module):
  """``(z1, z2) -> [batch, *output_shape]``: the VampPrior paper's ``p(x | z1, z2)``."""

  a_hidden: Sequence[int]
  b_hidden: Sequence[int]
  joint_hidden: Sequence[int]
  output_shape: Sequence[int]
  activation: str = "relu"
  learned_variance: bool = False
  init_log_variance: float = 0.0
  gated: bool = False
  kernel_init: str = "lecun_normal"

  @nn.compact
  def __call__(self, a: Array, b: Array) -> Array:
    h = _joint_features(self, a, b)
    init = KERNEL_INITS[self.kernel_init]
    out = nn.Dense(math.prod(self.output_shape), kernel_init=init, name="output")(h)
    return _with_variance(self, out.reshape(a.shape[0], *self.output_shape))


class _Branch(nn.Module):
  hidden: Sequence[int]
  activation: str
  gated: bool
  kernel_init: str

  @nn.compact
  def __call__(self, h: Array) -> Array:
    return _hidden_layers(h, self.hidden, self.activation, self.gated, self.kernel_init)


def _joint_features(module: nn.Module, a: Array, b: Array) -> Array:
  opts = (module.activation, module.gated, module.kernel_init)
  ha = _Branch(module.a_hidden, *opts, name="from_a")(a.reshape(a.shape[0], -1))
  hb = _Branch(module.b_hidden, *opts, name="from_b")(b.reshape(b.shape[0], -1))
  return _Branch(module.joint_hidden, *opts, name="joint")(jnp.concatenate([ha, hb], -1))


class ConvEncoder(nn.Module):
  """``x: [batch, h, w, c] -> (mean, logvar)``: stride-2 convolutions, then an MLP.

  Each entry of ``features`` is one 4x4 convolution with stride 2 ("SAME"
  padding), halving the height and width; the flattened result (and ``condition``, as in
  ``Encoder``) goes through ``hidden`` dense layers and the two linear heads.
  """

  features: Sequence[int]
  hidden: Sequence[int]
  latents: int
  activation: str = "relu"
  logvar_bound: float | None = 30.0
  kernel_init: str = "lecun_normal"
  logvar_clip: tuple[float, float] | None = None

  @nn.compact
  def __call__(self, x: Array, condition: Array | None = None) -> tuple[Array, Array]:
    act = ACTIVATIONS[self.activation]
    init = KERNEL_INITS[self.kernel_init]
    h = x
    for i, f in enumerate(self.features):
      conv = nn.Conv(f, (4, 4), strides=(2, 2), padding="SAME", kernel_init=init, name=f"conv_{i}")
      h = act(conv(h))
    return Encoder(
      self.hidden,
      self.latents,
      self.activation,
      self.logvar_bound,
      kernel_init=self.kernel_init,
      logvar_clip=self.logvar_clip,
      name="mlp",
    )(h, condition)


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
  kernel_init: str = "lecun_normal"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    act = ACTIVATIONS[self.activation]
    init = KERNEL_INITS[self.kernel_init]
    height, width, channels = self.output_shape
    scale = 2 ** len(self.features)
    h = _hidden_layers(z, self.hidden, self.activation, kernel_init=self.kernel_init)
    base = (height // scale, width // scale, self.features[-1])
    h = act(nn.Dense(math.prod(base), kernel_init=init, name="to_map")(h))
    h = h.reshape(z.shape[0], *base)
    out_channels = (*reversed(self.features[:-1]), channels)
    for i, f in enumerate(out_channels):
      deconv = nn.ConvTranspose(
        f, (4, 4), strides=(2, 2), padding="SAME", kernel_init=init, name=f"deconv_{i}"
      )
      h = deconv(h)
      if i < len(out_channels) - 1:
        h = act(h)
    return _with_variance(self, h)


class ResidualBlock(nn.Module):
  """``h + conv(act(conv(act(h))))``: a pre-activation residual block (He et al. 2016,
  "Identity mappings in deep residual networks") of two 3x3 convolutions with the
  input's channels. The second convolution starts at zero, so every block starts as
  the identity (as Fixup and ReZero do; VDVAE scales its last layer down likewise)."""

  activation: str = "relu"
  kernel_init: str = "lecun_normal"

  @nn.compact
  def __call__(self, h: Array) -> Array:
    act = ACTIVATIONS[self.activation]
    channels = h.shape[-1]
    init = KERNEL_INITS[self.kernel_init]
    r = nn.Conv(channels, (3, 3), padding="SAME", kernel_init=init, name="conv_0")(act(h))
    zeros = nn.initializers.zeros
    r = nn.Conv(channels, (3, 3), padding="SAME", kernel_init=zeros, name="conv_1")(act(r))
    return h + r


class ResidualEncoder(nn.Module):
  """``x: [batch, h, w, c] -> (mean, logvar)``: a residual convolutional encoder.

  A 3x3 convolution to ``features[0]`` channels, then for each level ``i``: ``blocks``
  residual blocks (``ResidualBlock``) at ``features[i]`` channels, followed (except at the
  last level) by a 4x4 stride-2 convolution to ``features[i + 1]`` channels that halves
  height and width. The flattened map (and ``condition``, as in ``Encoder``) goes through
  ``hidden`` dense layers and the two heads. Parameters: ``stem``, ``level_<i>_block_<j>``,
  ``down_<i>``, ``mlp``.
  """

  features: Sequence[int]
  blocks: int
  hidden: Sequence[int]
  latents: int
  activation: str = "relu"
  logvar_bound: float | None = 30.0
  kernel_init: str = "lecun_normal"
  logvar_clip: tuple[float, float] | None = None

  @nn.compact
  def __call__(self, x: Array, condition: Array | None = None) -> tuple[Array, Array]:
    init = KERNEL_INITS[self.kernel_init]
    h = nn.Conv(self.features[0], (3, 3), padding="SAME", kernel_init=init, name="stem")(x)
    for i in range(len(self.features)):
      for j in range(self.blocks):
        h = ResidualBlock(self.activation, self.kernel_init, name=f"level_{i}_block_{j}")(h)
      if i < len(self.features) - 1:
        down = nn.Conv(
          self.features[i + 1], (4, 4), strides=(2, 2), padding="SAME", kernel_init=init,
          name=f"down_{i}",
        )  # fmt: skip
        h = down(ACTIVATIONS[self.activation](h))
    h = ACTIVATIONS[self.activation](h)
    return Encoder(
      self.hidden,
      self.latents,
      self.activation,
      self.logvar_bound,
      kernel_init=self.kernel_init,
      logvar_clip=self.logvar_clip,
      name="mlp",
    )(h, condition)


class ResidualDecoder(nn.Module):
  """``z -> [batch, *output_shape]``: the mirror of ``ResidualEncoder``.

  Dense layers ``hidden``, a dense layer to a ``[h / 2**(n-1), w / 2**(n-1),
  features[-1]]`` map (``n = len(features)``), then for each level from the last: its
  ``blocks`` residual blocks, followed (except at the first level) by a 4x4 stride-2
  transposed convolution to the next level's channels, and last a 3x3 convolution to
  the likelihood's channels (``output_shape[-1]``), linear. Parameters: ``mlp``,
  ``to_map``, ``level_<i>_block_<j>``, ``up_<i>``, ``output`` (and ``log_variance``).
  """

  features: Sequence[int]
  blocks: int
  hidden: Sequence[int]
  output_shape: Sequence[int]
  activation: str = "relu"
  learned_variance: bool = False
  init_log_variance: float = 0.0
  kernel_init: str = "lecun_normal"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    act = ACTIVATIONS[self.activation]
    init = KERNEL_INITS[self.kernel_init]
    height, width, channels = self.output_shape
    scale = 2 ** (len(self.features) - 1)
    h = _hidden_layers(z, self.hidden, self.activation, kernel_init=self.kernel_init)
    base = (height // scale, width // scale, self.features[-1])
    h = nn.Dense(math.prod(base), kernel_init=init, name="to_map")(h).reshape(z.shape[0], *base)
    for i in reversed(range(len(self.features))):
      for j in range(self.blocks):
        h = ResidualBlock(self.activation, self.kernel_init, name=f"level_{i}_block_{j}")(h)
      if i > 0:
        up = nn.ConvTranspose(
          self.features[i - 1], (4, 4), strides=(2, 2), padding="SAME", kernel_init=init,
          name=f"up_{i}",
        )  # fmt: skip
        h = up(act(h))
    out = nn.Conv(channels, (3, 3), padding="SAME", kernel_init=init, name="output")(act(h))
    return _with_variance(self, out)


class Discriminator(nn.Module):
  """FactorVAE's discriminator, ``z: [batch, latents] -> [batch, 2]`` logits of "a sample of
  q(z)" and "a sample of the product of its marginals": ``hidden`` dense layers with
  leaky ReLU (slope 0.2), as in disentanglement_lib's ``fc_discriminator`` (six layers of
  1000 units). Parameters: ``hidden_<i>``, ``logits``."""

  hidden: Sequence[int]

  @nn.compact
  def __call__(self, z: Array) -> Array:
    h = z
    for i, width in enumerate(self.hidden):
      h = jax.nn.leaky_relu(nn.Dense(width, name=f"hidden_{i}")(h), 0.2)
    return nn.Dense(2, name="logits")(h)


class PseudoInputs(nn.Module):
  """The VampPrior's ``C`` learned pseudo-inputs ``u_c`` (Tomczak & Welling 2018).

  Stored as ``[C, *event_shape]`` and clipped to ``[0, 1]`` when used, as the
  paper's code does (``Hardtanh(0, 1)`` on an identity-fed linear layer),
  initialized from ``N(init_mean, init_std**2)`` (the code's defaults for
  binary images: 0.05 and 0.01).
  """

  num: int
  event_shape: Sequence[int]
  init_mean: float = 0.05
  init_std: float = 0.01

  @nn.compact
  def __call__(self) -> Array:
    def init(key, shape, dtype=jnp.float32):
      return self.init_mean + self.init_std * jax.random.normal(key, shape, dtype)

    u = self.param("pseudo_inputs", init, (self.num, *self.event_shape))
    return hardtanh(u, 0.0, 1.0)
