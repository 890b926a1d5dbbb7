"""VAEs as pure functions: posteriors, priors and likelihood parameters behind ``Model``.

Everything outside this module and ``networks.py`` (the Flax layers) sees a
``Model``: pure functions over a plain parameter pytree ``{"encoder": ...,
"decoder": ...}``, where ``"encoder"`` holds every parameter of the inference
network ``q(z | x)`` and ``"decoder"`` every parameter of the generative model
``p(z) p(x | z)`` (the split DReG's gradients rely on).

The families, each usable with every objective and with the evaluation:

* one stochastic layer, ``kind="mlp"`` (the Flax example; Kingma & Welling
  2014) or ``kind="conv"`` (stride-2 convolutions), dense layers optionally
  gated (the VampPrior paper's ``GatedDense``);
* two stochastic layers, ``hierarchy="iwae"``: ``q(z1 | x) q(z2 | z1)`` and
  ``p(z2) p(z1 | z2) p(x | z1)`` (Burda et al. 2015), with the MLP or
  convolutional networks at ``x``;
* two stochastic layers, ``hierarchy="vampprior"``: ``q(z2 | x) q(z1 | x, z2)``
  and ``p(z2) p(z1 | z2) p(x | z1, z2)`` (Tomczak & Welling 2018, section 3);
* the prior of the top layer: ``N(0, I)`` (``prior="standard"``) or the
  VampPrior, ``p(z) = (1/C) sum_c q(z | u_c)`` at ``C`` learned pseudo-inputs
  (``prior="vampprior"``; its KL has no closed form and is estimated by
  ``log q - log p`` at the samples).

Every model draws its latents from given standard-normal noise ``eps`` of
shape ``[K, batch, latents]`` (all layers' latents concatenated, bottom layer
first), so the caller owns the randomness and every sample is reproducible.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from vae_jax import config as config_lib
from vae_jax import likelihoods, losses, networks

Array = jax.Array
Params = Any


class PosteriorSample(NamedTuple):
  """``K`` draws from ``q(z | x)`` with what every objective needs of them.

  Attributes:
    z: ``[K, batch, latents]`` the samples (all layers, bottom first).
    log_q: ``[K, batch]`` ``log q(z | x)`` at the samples.
    log_prior: ``[K, batch]`` ``log p(z)`` at the samples.
    kl: ``[K, batch]`` an unbiased estimate of ``KL(q(z | x) || p(z))`` (the
      rate): the closed form for a layer whose prior is ``N(0, I)``, and the
      single-sample ``log q - log p`` for a layer whose prior is conditional
      or a mixture.
    kl_per_dim: ``[K, batch, latents]`` per-dimension terms that sum to
      ``kl``, where the prior factorizes over dimensions; ``None`` for the
      VampPrior, whose density does not.
  """

  z: Array
  log_q: Array
  log_prior: Array
  kl: Array
  kl_per_dim: Array | None


class Model(NamedTuple):
  """A VAE as pure functions.

  Attributes:
    init: ``(key, x) -> params``; ``x: [batch, *event_shape]`` fixes the shapes.
    encode: ``(params, x) -> (mean, logvar)``, each ``[batch, latents]``: the
      posterior's means and log-variances; for two layers, both layers' along
      the "mean path" (each layer conditioned on the other's mean).
    decode: ``(params, z) -> [batch, *likelihood.decoder_shape(event_shape)]``: the
      parameters of ``p(x | z)`` (logits for a Bernoulli likelihood, means for a
      Gaussian one, ``[..., 2]`` means and log-variances for a learned variance).
      ``z: [batch, latents]``.
    posterior: ``(params, x, eps, stop_density_gradient=False) ->
      PosteriorSample`` from noise ``eps: [K, batch, latents]``. With
      ``stop_density_gradient``, ``log q`` is evaluated with
      ``stop_gradient``-ed posterior parameters (gradients reach the encoder
      only through ``z``), as DReG needs.
    sample_prior: ``(params, key, n) -> z [n, latents]`` ancestral samples.
    latents: total latent dimensionality.
    layer_latents: latents per stochastic layer, bottom (``x``-facing) first.
    closed_form_kl: one diagonal-Gaussian layer under ``N(0, I)``: ``encode``
      gives ``q``'s parameters and ``decode`` reads ``z``, so
      ``losses.elbo(key, x, *encode(params, x), decode, model.likelihood)`` is its ELBO.
    decoder_reads: how many of the latents (bottom first) ``decode`` reads.
    likelihood: ``p(x | z)`` given ``decode``'s outputs (``likelihoods.Likelihood``).
    num_classes: ``k > 0`` for a conditional VAE (Sohn et al. 2015): ``q(z | x, y)`` and
      ``p(x | z, y)`` read the one-hot label ``y`` of ``k`` classes, the prior is
      ``N(0, I)``. Its inputs are ``(x, labels)`` pairs, ``labels: [batch]`` int. Only
      its ``init`` (which takes ``x`` alone) runs as it is; ``encode``, ``decode``,
      ``posterior`` and ``sample_prior`` raise until the labels are fixed by ``given``
      (``bind`` does this for any model and its inputs).
    given: ``labels -> Model``, for a conditional VAE: the ordinary model of ``p(x, z | y)``
      for those labels (``num_classes`` 0); the functions of a ``given`` model tile
      ``labels`` over the ``K`` samples of a ``[K * batch]`` call.
  """

  init: Callable[[Array, Array], Params]
  encode: Callable[[Params, Array], tuple[Array, Array]]
  decode: Callable[[Params, Array], Array]
  posterior: Callable[..., PosteriorSample]
  sample_prior: Callable[[Params, Array, int], Array]
  latents: int
  layer_latents: tuple[int, ...]
  closed_form_kl: bool = False
  decoder_reads: int | None = None
  likelihood: likelihoods.Likelihood = likelihoods.BERNOULLI
  num_classes: int = 0
  given: Callable[[Array], Model] | None = None


def bind(model: Model, inputs: Any) -> tuple[Model, Array]:
  """``(the model to apply, x)``: for a conditional VAE, whose ``inputs`` are ``(x, labels)``,
  ``model.given(labels)`` and ``x``; for any other model, ``model`` and ``inputs``.

  Raises:
    ValueError: a conditional VAE given inputs that are not an ``(x, labels)`` pair.
  """
  if not model.num_classes:
    return model, inputs
  if not (isinstance(inputs, tuple | list) and len(inputs) == 2):
    raise ValueError(
      f"A conditional VAE ({model.num_classes} classes) reads (x, labels) pairs, got "
      f"{type(inputs).__name__}: pass the labels beside the images."
    )
  x, labels = inputs
  return model.given(labels), x


def images_of(inputs: Any) -> Array:
  """The images of a model's inputs: ``x``, or ``x`` of an ``(x, labels)`` pair."""
  return inputs[0] if isinstance(inputs, tuple | list) else inputs


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
  *,
  stop_density_gradient: bool = False,
) -> LogWeights:
  """Importance log-weights of ``model`` at the samples ``model.posterior`` draws from
  ``eps: [K, batch, latents]``, decoding the ``K * batch`` latents in one call. A
  conditional VAE's ``x`` is an ``(x, labels)`` pair (``bind``)."""
  model, x = bind(model, x)
  post = model.posterior(params, x, eps, stop_density_gradient=stop_density_gradient)
  decode = functools.partial(model.decode, params)
  log_px_z = losses.sample_log_likelihoods(post.z, x, decode, model.likelihood)
  return LogWeights(log_px_z + post.log_prior - post.log_q, log_px_z, post)


def prior_samples(
  model: Model, params: Params, key: Array, n: int, labels: Array | None = None
) -> Array:
  """Mean images of ``p(x | z)`` for ``n`` draws ``z ~ p(z)``: ``[n, *event_shape]``.

  For a conditional VAE, ``labels: [n]`` are the classes to draw (``p(x | z, y)``); by
  default each class in turn, ``0, 1, ..., k - 1, 0, ...``.
  """
  if model.num_classes:
    if labels is None:
      labels = jnp.arange(n) % model.num_classes
    model = model.given(labels)
  z = model.sample_prior(params, key, n)
  return model.likelihood.mean(model.decode(params, z))


def class_samples(model: Model, params: Params, key: Array, per_class: int) -> Array:
  """A conditional VAE's generations per class: ``[k * per_class, *event_shape]``, row
  ``c`` (``per_class`` images) of class ``c``, column ``j`` from the same ``z_j ~ N(0, I)``
  in every row, so a column shows one style in every class.

  Raises:
    ValueError: ``model`` is not conditional.
  """
  if not model.num_classes:
    raise ValueError("class_samples needs a conditional VAE (config.model.num_classes > 0).")
  k = model.num_classes
  z = model.given(jnp.zeros((per_class,), jnp.int32)).sample_prior(params, key, per_class)
  labels = jnp.repeat(jnp.arange(k), per_class)
  given = model.given(labels)
  return given.likelihood.mean(given.decode(params, jnp.tile(z, (k, 1))))


def reconstructions(model: Model, params: Params, x: Array) -> Array:
  """Mean images of ``p(x | z = posterior mean)`` for each image in ``x`` (for a conditional
  VAE, ``(x, labels)``)."""
  model, x = bind(model, x)
  mean, _ = model.encode(params, x)
  return model.likelihood.mean(model.decode(params, mean))


# --------------------------------------------------------------------------
# Checks and reshapes.


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


def _check_z(z: Array, latents: int) -> None:
  if z.ndim != 2 or z.shape[-1] != latents:
    raise ValueError(f"decode expects z of shape [batch, {latents}], got {z.shape}.")


def _merge(a: Array) -> Array:  # [K, B, ...] -> [K * B, ...]
  return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _split(a: Array, k: int) -> Array:  # [K * B, ...] -> [K, B, ...]
  return a.reshape(k, a.shape[0] // k, *a.shape[1:])


def _apply(module, params: Params, *inputs: Array):
  return module.apply({"params": params}, *inputs)


def _stop(tree):
  return jax.tree.map(jax.lax.stop_gradient, tree)


def _gaussian_log_q(z: Array, mean: Array, logvar: Array) -> Array:
  """``log q(z_d)`` per dimension for ``z: [K, B, d]`` and ``mean, logvar: [B, d]`` or
  ``[K, B, d]``."""
  return losses.diag_gaussian_log_prob_per_dim(
    z, jnp.broadcast_to(mean, z.shape), jnp.broadcast_to(logvar, z.shape)
  )


# --------------------------------------------------------------------------
# Priors of the top layer.


class _Prior(NamedTuple):
  """A prior over the top layer's latents ``[..., d]``.

  ``init(key) -> params or None``; ``log_prob(params, encoder_params, z)``;
  ``sample(params, encoder_params, key, n) -> [n, d]``; ``standard``: it is
  ``N(0, I)`` (closed-form KL).
  """

  init: Callable[[Array], Params]
  log_prob: Callable[[Params, Params, Array], Array]
  sample: Callable[[Params, Params, Array, int], Array]
  standard: bool


def _standard_prior(latents: int) -> _Prior:
  def sample(params, enc, key, n):
    del params, enc
    return losses.sample_eps(key, (n, latents))

  return _Prior(
    init=lambda key: None,
    log_prob=lambda params, enc, z: losses.standard_normal_log_prob(z),
    sample=sample,
    standard=True,
  )


def _vamp_prior(
  pseudo: networks.PseudoInputs, encode_top: Callable[[Params, Array], tuple[Array, Array]]
) -> _Prior:
  """``p(z) = (1/C) sum_c q(z | u_c)``, ``q`` the encoder of the top layer (``encode_top``)."""

  def components(params, enc):
    return encode_top(enc, pseudo.apply({"params": params}))

  def log_prob(params, enc, z):
    means, logvars = components(params, enc)
    return losses.diag_gaussian_mixture_log_prob(z, means, logvars)

  def sample(params, enc, key, n):
    pick_key, eps_key = jax.random.split(key)
    means, logvars = components(params, enc)
    c = jax.random.randint(pick_key, (n,), 0, pseudo.num)
    return losses.gaussian_sample(
      means[c], logvars[c], losses.sample_eps(eps_key, (n, means.shape[1]))
    )

  return _Prior(
    init=lambda key: pseudo.init(key)["params"], log_prob=log_prob, sample=sample, standard=False
  )


# --------------------------------------------------------------------------
# One stochastic layer.


def from_encoder_decoder(
  init: Callable[[Array, Array], Params] | None,
  encode: Callable[[Params, Array], tuple[Array, Array]],
  decode: Callable[[Params, Array], Array],
  latents: int,
  likelihood: likelihoods.Likelihood = likelihoods.BERNOULLI,
) -> Model:
  """A one-stochastic-layer ``Model`` with prior N(0, I) from pure functions.

  ``encode(params, x) -> (mean, logvar)`` and ``decode(params, z)`` may be any
  JAX functions (Flax or not), ``decode`` giving the parameters ``likelihood`` reads;
  this adds the ``posterior`` and ``sample_prior`` every objective and the evaluation
  use (``estimators`` then estimates ``log p(x)`` of your model).
  """
  model = _one_layer(init, encode, decode, latents, _standard_prior(latents), lambda p: p)
  return model._replace(likelihood=likelihood)


def _one_layer(init, encode, decode, latents: int, prior: _Prior, prior_params) -> Model:
  """``q(z | x)`` a diagonal Gaussian from ``encode``; ``prior_params(params)`` selects the
  prior's parameters (``None`` for ``N(0, I)``)."""

  def posterior(
    params: Params, x: Array, eps: Array, stop_density_gradient: bool = False
  ) -> PosteriorSample:
    _check_eps(eps, x, latents)
    mean, logvar = encode(params, x)
    z = losses.gaussian_sample(mean, logvar, eps)
    if stop_density_gradient:
      mean, logvar = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)
    log_q = jnp.sum(_gaussian_log_q(z, mean, logvar), -1)
    if prior.standard:
      kl_per_dim = jnp.broadcast_to(losses.kl_divergence_per_dim(mean, logvar), z.shape)
      kl = jnp.sum(kl_per_dim, -1)
      log_prior = losses.standard_normal_log_prob(z)
    else:
      log_prior = prior.log_prob(prior_params(params), params["encoder"], z)
      kl, kl_per_dim = log_q - log_prior, None
    return PosteriorSample(z, log_q, log_prior, kl, kl_per_dim)

  def sample_prior(params: Params, key: Array, n: int) -> Array:
    enc = params["encoder"] if not prior.standard else None
    return prior.sample(prior_params(params), enc, key, n)

  return Model(
    init, encode, decode, posterior, sample_prior, latents, (latents,), prior.standard, latents
  )


def _conditional(
  encoder, decoder, event_shape, latents: int, num_classes: int, likelihood
) -> Model:
  """A conditional VAE (Sohn et al. 2015) of one Gaussian layer under ``N(0, I)``:
  ``q(z | x, y)`` reads the one-hot label beside ``x`` (``networks.Encoder``'s
  ``condition``), ``p(x | z, y)`` reads it beside ``z``."""

  def one_hot(labels: Array) -> Array:
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def tiled(y: Array, rows: int) -> Array:  # [B, k] -> [rows, k] for rows = K * B.
    if rows % y.shape[0]:
      raise ValueError(
        f"{rows} rows of z do not tile the {y.shape[0]} labels: pass [K * batch] rows."
      )
    return jnp.tile(y, (rows // y.shape[0], 1))

  def init(key: Array, x: Array) -> Params:
    _check_x(event_shape, x, "init")
    enc_key, dec_key = jax.random.split(key)
    y = jnp.zeros((x.shape[0], num_classes), x.dtype)
    z = jnp.zeros((x.shape[0], latents + num_classes), x.dtype)
    return {
      "encoder": encoder.init(enc_key, x, y)["params"],
      "decoder": decoder.init(dec_key, z)["params"],
    }

  def given(labels: Array) -> Model:
    y = one_hot(labels)

    def encode(params: Params, x: Array) -> tuple[Array, Array]:
      _check_x(event_shape, x, "encode")
      return _apply(encoder, params["encoder"], x, tiled(y, x.shape[0]))

    def decode(params: Params, z: Array) -> Array:
      _check_z(z, latents)
      zy = jnp.concatenate([z, tiled(y, z.shape[0]).astype(z.dtype)], axis=-1)
      return _apply(decoder, params["decoder"], zy)

    model = _one_layer(init, encode, decode, latents, _standard_prior(latents), lambda p: None)
    return model._replace(likelihood=likelihood)

  def unbound(*args, **kwargs):
    del args, kwargs
    raise ValueError(
      "A conditional VAE's functions need its labels: use models.bind(model, (x, labels)) "
      "or model.given(labels)."
    )

  return Model(
    init, unbound, unbound, unbound, unbound, latents, (latents,), True, latents,
    likelihood=likelihood, num_classes=num_classes, given=given,
  )  # fmt: skip


def _single_layer(encoder, decoder, event_shape, latents: int, prior_kind: str, pseudo) -> Model:
  """A one-stochastic-layer VAE from Flax encoder/decoder modules."""
  vamp = prior_kind == "vampprior"

  def encode(params: Params, x: Array) -> tuple[Array, Array]:
    _check_x(event_shape, x, "encode")
    return _apply(encoder, params["encoder"], x)

  def decoder_params(params: Params) -> Params:
    return params["decoder"]["p_x"] if vamp else params["decoder"]

  def init(key: Array, x: Array) -> Params:
    _check_x(event_shape, x, "init")
    enc_key, dec_key = jax.random.split(key)
    z = jnp.zeros((x.shape[0], latents), x.dtype)
    params = {
      "encoder": encoder.init(enc_key, x)["params"],
      "decoder": decoder.init(dec_key, z)["params"],
    }
    if vamp:
      prior_key = jax.random.fold_in(key, 2)
      params["decoder"] = {"p_x": params["decoder"], "p_z": prior.init(prior_key)}
    return params

  def decode(params: Params, z: Array) -> Array:
    _check_z(z, latents)
    return _apply(decoder, decoder_params(params), z)

  if vamp:
    prior = _vamp_prior(pseudo, lambda enc, u: _apply(encoder, enc, u))
    return _one_layer(init, encode, decode, latents, prior, lambda p: p["decoder"]["p_z"])
  return _one_layer(init, encode, decode, latents, _standard_prior(latents), lambda p: None)


# --------------------------------------------------------------------------
# Two stochastic layers.


def _two_layer_iwae(
  x_encoder,
  x_decoder,
  top_hidden: Sequence[int],
  event_shape,
  latents: int,
  top_latents: int,
  net_options: dict[str, Any],
) -> Model:
  """``q(z1 | x) q(z2 | z1)`` and ``p(z2) p(z1 | z2) p(x | z1)`` (Burda et al. 2015).

  ``x_encoder`` gives ``q(z1 | x)``, ``x_decoder`` gives ``p(x | z1)``; the
  conditionals between the layers are MLPs with ``top_hidden`` widths (up) and
  their mirror (down), as in the IWAE paper's 100-100 layers.
  """
  q_z2 = networks.Encoder(tuple(top_hidden), top_latents, **net_options)
  p_z1 = networks.Encoder(tuple(reversed(tuple(top_hidden))), latents, **net_options)
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

  def encode(params: Params, x: Array) -> tuple[Array, Array]:
    _check_x(event_shape, x, "encode")
    enc = params["encoder"]
    mean1, logvar1 = _apply(x_encoder, enc["q_z1"], x)
    mean2, logvar2 = _apply(q_z2, enc["q_z2"], mean1)
    return jnp.concatenate([mean1, mean2], -1), jnp.concatenate([logvar1, logvar2], -1)

  def decode(params: Params, z: Array) -> Array:
    _check_z(z, total)
    return _apply(x_decoder, params["decoder"]["p_x"], z[:, :latents])

  def posterior(
    params: Params, x: Array, eps: Array, stop_density_gradient: bool = False
  ) -> PosteriorSample:
    _check_x(event_shape, x, "posterior")
    _check_eps(eps, x, total)
    k = eps.shape[0]
    enc, dec = params["encoder"], params["decoder"]
    mean1, logvar1 = _apply(x_encoder, enc["q_z1"], x)
    z1 = losses.gaussian_sample(mean1, logvar1, eps[..., :latents])
    mean2, logvar2 = (_split(a, k) for a in _apply(q_z2, enc["q_z2"], _merge(z1)))
    z2 = losses.gaussian_sample(mean2, logvar2, eps[..., latents:])
    if stop_density_gradient:  # Densities of q at fixed parameters; z keeps its path.
      mean1, logvar1 = jax.lax.stop_gradient(mean1), jax.lax.stop_gradient(logvar1)
      mean2, logvar2 = (_split(a, k) for a in _apply(q_z2, _stop(enc["q_z2"]), _merge(z1)))
    log_q1 = _gaussian_log_q(z1, mean1, logvar1)
    log_q2 = losses.diag_gaussian_log_prob(z2, mean2, logvar2)
    prior_mean1, prior_logvar1 = (_split(a, k) for a in _apply(p_z1, dec["p_z1"], _merge(z2)))
    log_p1 = losses.diag_gaussian_log_prob_per_dim(z1, prior_mean1, prior_logvar1)
    log_p2 = losses.standard_normal_log_prob(z2)
    kl_per_dim = jnp.concatenate(
      [log_q1 - log_p1, losses.kl_divergence_per_dim(mean2, logvar2)], -1
    )
    return PosteriorSample(
      z=jnp.concatenate([z1, z2], -1),
      log_q=jnp.sum(log_q1, -1) + log_q2,
      log_prior=jnp.sum(log_p1, -1) + log_p2,
      kl=jnp.sum(kl_per_dim, -1),
      kl_per_dim=kl_per_dim,
    )

  def sample_prior(params: Params, key: Array, n: int) -> Array:
    key2, key1 = jax.random.split(key)
    z2 = losses.sample_eps(key2, (n, top_latents))
    mean1, logvar1 = _apply(p_z1, params["decoder"]["p_z1"], z2)
    z1 = losses.reparameterize(key1, mean1, logvar1)
    return jnp.concatenate([z1, z2], -1)

  return Model(
    init, encode, decode, posterior, sample_prior, total, (latents, top_latents), False, latents
  )


def _two_layer_vampprior(
  event_shape,
  output_shape,
  latents: int,
  top_latents: int,
  encoder_hidden: Sequence[int],
  decoder_hidden: Sequence[int],
  top_hidden: Sequence[int],
  prior_kind: str,
  pseudo,
  net_options: dict[str, Any],
  variance: dict[str, Any],
) -> Model:
  """``q(z2 | x) q(z1 | x, z2)`` and ``p(z2) p(z1 | z2) p(x | z1, z2)`` (Tomczak & Welling
  2018, "HVAE"; their models/HVAE_2level.py).

  With ``encoder_hidden = decoder_hidden = top_hidden = (300, 300)`` these are
  the paper's networks: ``q(z2 | x)`` an MLP of ``encoder_hidden``;
  ``q(z1 | x, z2)`` one layer of ``encoder_hidden[0]`` on each input, joined
  by one of ``encoder_hidden[-1]``; ``p(z1 | z2)`` an MLP of ``top_hidden``;
  ``p(x | z1, z2)`` one layer of ``decoder_hidden[0]`` on each input, joined by
  one of ``decoder_hidden[-1]``.
  """
  q_z2 = networks.Encoder(tuple(encoder_hidden), top_latents, **net_options)
  q_z1 = networks.JointEncoder(
    (encoder_hidden[0],), (encoder_hidden[0],), (encoder_hidden[-1],), latents, **net_options
  )
  p_z1 = networks.Encoder(tuple(top_hidden), latents, **net_options)
  dec_options = {k: v for k, v in net_options.items() if k not in ("logvar_bound", "logvar_clip")}
  p_x = networks.JointDecoder(
    (decoder_hidden[0],),
    (decoder_hidden[0],),
    (decoder_hidden[-1],),
    output_shape,
    **dec_options,
    **variance,
  )
  total = latents + top_latents
  vamp = prior_kind == "vampprior"
  prior = (
    _vamp_prior(pseudo, lambda enc, u: _apply(q_z2, enc["q_z2"], u))
    if vamp
    else _standard_prior(top_latents)
  )

  def init(key: Array, x: Array) -> Params:
    _check_x(event_shape, x, "init")
    keys = jax.random.split(key, 5)
    b = x.shape[0]
    z1, z2 = jnp.zeros((b, latents), x.dtype), jnp.zeros((b, top_latents), x.dtype)
    params = {
      "encoder": {
        "q_z2": q_z2.init(keys[0], x)["params"],
        "q_z1": q_z1.init(keys[1], x, z2)["params"],
      },
      "decoder": {
        "p_z1": p_z1.init(keys[2], z2)["params"],
        "p_x": p_x.init(keys[3], z1, z2)["params"],
      },
    }
    if vamp:
      params["decoder"]["p_z2"] = prior.init(keys[4])
    return params

  def tile(x: Array, k: int) -> Array:  # [B, ...] -> [K * B, ...]
    return _merge(jnp.broadcast_to(x[None], (k, *x.shape)))

  def encode(params: Params, x: Array) -> tuple[Array, Array]:
    _check_x(event_shape, x, "encode")
    enc = params["encoder"]
    mean2, logvar2 = _apply(q_z2, enc["q_z2"], x)
    mean1, logvar1 = _apply(q_z1, enc["q_z1"], x, mean2)
    return jnp.concatenate([mean1, mean2], -1), jnp.concatenate([logvar1, logvar2], -1)

  def decode(params: Params, z: Array) -> Array:
    _check_z(z, total)
    return _apply(p_x, params["decoder"]["p_x"], z[:, :latents], z[:, latents:])

  def posterior(
    params: Params, x: Array, eps: Array, stop_density_gradient: bool = False
  ) -> PosteriorSample:
    _check_x(event_shape, x, "posterior")
    _check_eps(eps, x, total)
    k = eps.shape[0]
    enc, dec = params["encoder"], params["decoder"]
    mean2, logvar2 = _apply(q_z2, enc["q_z2"], x)
    z2 = losses.gaussian_sample(mean2, logvar2, eps[..., latents:])
    xk = tile(x, k)
    mean1, logvar1 = (_split(a, k) for a in _apply(q_z1, enc["q_z1"], xk, _merge(z2)))
    z1 = losses.gaussian_sample(mean1, logvar1, eps[..., :latents])
    if stop_density_gradient:  # Densities of q at fixed parameters; z keeps its path.
      mean2, logvar2 = jax.lax.stop_gradient(mean2), jax.lax.stop_gradient(logvar2)
      mean1, logvar1 = (_split(a, k) for a in _apply(q_z1, _stop(enc["q_z1"]), xk, _merge(z2)))
    log_q1 = losses.diag_gaussian_log_prob_per_dim(z1, mean1, logvar1)
    log_q2 = _gaussian_log_q(z2, mean2, logvar2)
    prior_mean1, prior_logvar1 = (_split(a, k) for a in _apply(p_z1, dec["p_z1"], _merge(z2)))
    log_p1 = losses.diag_gaussian_log_prob_per_dim(z1, prior_mean1, prior_logvar1)
    kl1 = log_q1 - log_p1
    if prior.standard:
      log_p2 = losses.standard_normal_log_prob(z2)
      kl2 = jnp.broadcast_to(losses.kl_divergence_per_dim(mean2, logvar2), z2.shape)
      kl_per_dim = jnp.concatenate([kl1, kl2], -1)
      kl = jnp.sum(kl_per_dim, -1)
    else:
      log_p2 = prior.log_prob(dec["p_z2"], enc, z2)
      kl = jnp.sum(kl1, -1) + jnp.sum(log_q2, -1) - log_p2
      kl_per_dim = None
    return PosteriorSample(
      z=jnp.concatenate([z1, z2], -1),
      log_q=jnp.sum(log_q1, -1) + jnp.sum(log_q2, -1),
      log_prior=jnp.sum(log_p1, -1) + log_p2,
      kl=kl,
      kl_per_dim=kl_per_dim,
    )

  def sample_prior(params: Params, key: Array, n: int) -> Array:
    key2, key1 = jax.random.split(key)
    dec = params["decoder"]
    z2 = prior.sample(dec.get("p_z2"), params["encoder"], key2, n)
    mean1, logvar1 = _apply(p_z1, dec["p_z1"], z2)
    z1 = losses.reparameterize(key1, mean1, logvar1)
    return jnp.concatenate([z1, z2], -1)

  return Model(
    init, encode, decode, posterior, sample_prior, total, (latents, top_latents), False, total
  )


# --------------------------------------------------------------------------
# Construction.


def make_vae(
  event_shape: Sequence[int],
  latents: int,
  *,
  kind: str = "mlp",
  encoder_hidden: Sequence[int] = (500,),
  decoder_hidden: Sequence[int] | None = None,
  conv_features: Sequence[int] = (32, 64),
  res_blocks: int = 2,
  activation: str = "relu",
  logvar_bound: float | None = 30.0,
  logvar_clip: tuple[float, float] | None = None,
  gated: bool = False,
  kernel_init: str = "lecun_normal",
  stochastic_layers: int = 1,
  hierarchy: str = "iwae",
  top_latents: int = 50,
  top_hidden: Sequence[int] = (100, 100),
  prior: str = "standard",
  num_pseudo_inputs: int = 500,
  pseudo_inputs_init: tuple[float, float] = (0.05, 0.01),
  likelihood: likelihoods.Likelihood = likelihoods.BERNOULLI,
  num_classes: int = 0,
) -> Model:
  """A VAE of any supported kind (see the module docstring).

  The options are the fields of ``config.model`` (documented in
  ``config.base_config``) and are checked by the same ``config.check_model``.

  Args:
    event_shape: shape of one example, e.g. ``(28, 28, 1)``.
    latents: latent dimensionality (of the bottom layer ``z1`` for two layers).
    kind: ``"mlp"``, ``"conv"`` or ``"resnet"``: the networks that read ``x`` and write it.
    encoder_hidden: dense widths of the encoder, input to output (after the
      convolutions for ``"conv"``).
    decoder_hidden: dense widths of the decoder, latent to output (default:
      the encoder's, mirrored).
    conv_features: channels of the stride-2 convolutions (``"conv"``), or of each
      resolution (``"resnet"``: ``networks.ResidualEncoder``).
    res_blocks: residual blocks per resolution (``"resnet"`` only).
    activation: a key of ``networks.ACTIVATIONS`` (not used by gated layers).
    logvar_bound: soft bound on ``|logvar|`` (see ``networks.soft_clamp``), or ``None``.
    logvar_clip: ``(low, high)``: clip the encoders' log-variances to this range
      instead (the VampPrior code's ``Hardtanh(-6, 2)``).
    gated: gated dense layers ``(W1 h + b1) * sigmoid(W2 h + b2)`` (MLP only).
    kernel_init: a key of ``networks.KERNEL_INITS``.
    stochastic_layers: 1 or 2.
    hierarchy: two layers only: ``"iwae"`` or ``"vampprior"`` (module docstring).
    top_latents: dimensionality of ``z2`` (two layers only).
    top_hidden: widths of the MLP between the layers (``"iwae"``: ``z1 -> z2``,
      mirrored for ``z2 -> z1``; ``"vampprior"``: ``z2 -> z1``).
    prior: ``"standard"`` or ``"vampprior"``, the prior of the top layer.
    num_pseudo_inputs: ``C``, the VampPrior's pseudo-inputs.
    pseudo_inputs_init: ``(mean, std)`` of their normal initialization.
    likelihood: ``p(x | z)``; the decoder outputs what it reads
      (``likelihood.decoder_shape``) and holds its shared learned variance, if any.
    num_classes: ``k > 0``: a conditional VAE on labels ``0 .. k - 1`` (one stochastic
      layer, standard prior; ``Model.num_classes``).

  Raises:
    config.ConfigError: an unknown or inconsistent option, naming it.
  """
  section = config_lib.base_config().model
  section.update(
    kind=kind,
    latents=latents,
    encoder_hidden=tuple(encoder_hidden),
    decoder_hidden=tuple(decoder_hidden) if decoder_hidden is not None else None,
    conv_features=tuple(conv_features),
    res_blocks=res_blocks,
    activation=activation,
    logvar_bound=logvar_bound,
    logvar_clip=tuple(logvar_clip) if logvar_clip is not None else None,
    gated=gated,
    kernel_init=kernel_init,
    stochastic_layers=stochastic_layers,
    hierarchy=hierarchy,
    top_latents=top_latents,
    top_hidden=tuple(top_hidden),
    prior=prior,
    num_pseudo_inputs=num_pseudo_inputs,
    likelihood=likelihood.name,
    num_classes=num_classes,
  )
  config_lib.check_model(section)
  event_shape = tuple(event_shape)
  output_shape = likelihood.decoder_shape(event_shape)
  encoder_hidden = tuple(encoder_hidden)
  if decoder_hidden is None:
    decoder_hidden = tuple(reversed(encoder_hidden))
  decoder_hidden = tuple(decoder_hidden)
  shared = likelihood.shared_log_variance
  variance = {"learned_variance": shared is not None, "init_log_variance": shared or 0.0}
  top = top_latents if stochastic_layers == 2 else latents
  pseudo = networks.PseudoInputs(num_pseudo_inputs, event_shape, *pseudo_inputs_init)
  clip = tuple(logvar_clip) if logvar_clip is not None else None
  enc_options = {"activation": activation, "logvar_bound": logvar_bound, "logvar_clip": clip}
  enc_options["kernel_init"] = kernel_init
  dec_options = {"activation": activation, "kernel_init": kernel_init, **variance}
  if gated:  # The convolutional networks have no gated form (check_model refuses it).
    enc_options["gated"] = dec_options["gated"] = True
  if stochastic_layers == 2 and hierarchy == "vampprior":
    model = _two_layer_vampprior(
      event_shape,
      output_shape,
      latents,
      top,
      encoder_hidden,
      decoder_hidden,
      top_hidden,
      prior,
      pseudo,
      enc_options,
      variance,
    )
    return model._replace(likelihood=likelihood)
  if kind == "mlp":
    encoder = networks.Encoder(encoder_hidden, latents, **enc_options)
    decoder = networks.Decoder(decoder_hidden, output_shape, **dec_options)
  else:
    conv_features = tuple(conv_features)
    halvings = len(conv_features) - (kind == "resnet")
    scale = 2**halvings
    if len(event_shape) != 3 or event_shape[0] % scale or event_shape[1] % scale:
      raise config_lib.ConfigError(
        f"kind={kind!r} with {halvings} stride-2 layers needs examples [h, w, c] "
        f"with h and w multiples of {scale}; got {event_shape}. Use fewer "
        "config.model.conv_features, or kind='mlp'."
      )
    if kind == "conv":
      encoder = networks.ConvEncoder(conv_features, encoder_hidden, latents, **enc_options)
      decoder = networks.ConvDecoder(conv_features, decoder_hidden, output_shape, **dec_options)
    else:
      encoder = networks.ResidualEncoder(
        conv_features, res_blocks, encoder_hidden, latents, **enc_options
      )
      decoder = networks.ResidualDecoder(
        conv_features, res_blocks, decoder_hidden, output_shape, **dec_options
      )
  if num_classes:
    model = _conditional(encoder, decoder, event_shape, latents, num_classes, likelihood)
  elif stochastic_layers == 1:
    model = _single_layer(encoder, decoder, event_shape, latents, prior, pseudo)
  else:
    model = _two_layer_iwae(
      encoder, decoder, top_hidden, event_shape, latents, top_latents, enc_options
    )
  return model._replace(likelihood=likelihood)


def make_mlp_vae(
  event_shape: Sequence[int],
  latents: int,
  encoder_hidden: Sequence[int] = (500,),
  decoder_hidden: Sequence[int] | None = None,
  activation: str = "relu",
  logvar_bound: float | None = 30.0,
  likelihood: likelihoods.Likelihood = likelihoods.BERNOULLI,
) -> Model:
  """An MLP VAE; the defaults are the Flax example's 784-500-20 / 20-500-784 with a
  Bernoulli likelihood."""
  return make_vae(
    event_shape,
    latents,
    kind="mlp",
    encoder_hidden=encoder_hidden,
    decoder_hidden=decoder_hidden,
    activation=activation,
    logvar_bound=logvar_bound,
    likelihood=likelihood,
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
    res_blocks=m.res_blocks,
    activation=m.activation,
    logvar_bound=m.logvar_bound,
    logvar_clip=tuple(m.logvar_clip) if m.logvar_clip is not None else None,
    gated=m.gated,
    kernel_init=m.kernel_init,
    stochastic_layers=m.stochastic_layers,
    hierarchy=m.hierarchy,
    top_latents=m.top_latents,
    top_hidden=tuple(m.top_hidden),
    prior=m.prior,
    num_pseudo_inputs=m.num_pseudo_inputs,
    pseudo_inputs_init=(m.pseudo_inputs_mean, m.pseudo_inputs_std),
    likelihood=likelihoods.from_config(config),
    num_classes=m.num_classes,
  )
