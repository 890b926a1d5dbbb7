"""What is trained: each objective a small function of ``vae_jax.losses``' public math.

* ``elbo``: the (beta-)ELBO. For a one-layer Gaussian VAE under ``N(0, I)``
  (``Model.closed_form_kl``) it *is* ``losses.elbo``: the train step
  differentiates exactly the function a user imports. Other models (two
  stochastic layers, the VampPrior) go through ``model.posterior`` and the
  same ``losses.elbo_from_terms``, which is where beta multiplies the KL.
* ``iwae``: ``losses.iw_bound_from_log_weights`` of the posterior's log-weights
  (Burda et al. 2015), or with DReG gradients ``losses.dreg_iw_bound``
  (Tucker et al. 2019).
* ``autoencoder``: the deterministic baseline, ``log p(x | z = mean)``.
* ``miwae``, ``ciwae``, ``piwae``: the bounds of Rainforth et al. (2018) from the same
  log-weights (``losses.miwae_bound``, ``ciwae_bound``, ``piwae_bound``).
* ``beta_tcvae``: the ELBO with the total correlation of the aggregate posterior
  weighted by beta instead of 1 (Chen et al. 2018, with their alpha = gamma = 1):
  ``ELBO - (beta - 1) TC``, TC by minibatch weighted sampling over the dataset's
  ``N`` points (``vae_jax.total_correlation``).
* ``factor_vae``: the ELBO minus gamma times the total correlation that a discriminator
  estimates (Kim & Mnih 2018). The discriminator is an *auxiliary network*: its
  parameters live in the train state beside the VAE's (``params["discriminator"]``,
  ``AUXILIARY``), with an optimizer of their own (``optim.with_auxiliary``), and its
  loss is added to the VAE's in one surrogate whose gradient reaches each network only
  through its own loss (``jax.lax.stop_gradient`` on the other's inputs). So one
  ``jax.grad`` and one optimizer update train both, in the same step, checkpoint, sweep
  and non-finite policy as every other objective.
* ``dip_vae_i``, ``dip_vae_ii``: the ELBO minus DIP-VAE's penalty on the aggregate
  posterior's covariance (Kumar et al. 2018, ``losses.dip_vae_regularizer``).
* KL shaping, one schedule over steps for single runs and sweeps: linear
  warm-up of beta (``kl_weight``), free bits (``losses.free_bits_kl``) and
  capacity annealing (``losses.capacity_objective``, Burgess et al. 2018).

Noise for every sample of ``z`` comes from ``losses.sample_eps``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vae_jax import config as config_lib
from vae_jax import losses, models, networks, total_correlation
from vae_jax.models import Model, Params

Array = jax.Array
Metrics = dict[str, Array]
LossFn = Callable[[Params, Array, Array, Array], tuple[Array, Metrics]]


# --------------------------------------------------------------------------
# The KL weight over training.


def kl_weight(beta: float | Array, step: Array, warmup_steps: int) -> float | Array:
  """``beta * min(1, step / warmup_steps)``: linear KL warm-up (``warmup_steps=0``: beta)."""
  if warmup_steps <= 0:
    return beta
  return beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def capacity_at(step: Array, capacity_nats: float, capacity_steps: int) -> Array:
  """``C_t = capacity_nats * min(1, step / capacity_steps)`` (Burgess et al. 2018)."""
  return capacity_nats * jnp.minimum(1.0, step.astype(jnp.float32) / capacity_steps)


class Spec(NamedTuple):
  """An objective and its options (the config fields of the same names).

  ``warmup_steps`` and ``capacity_steps`` are in train steps (the config's
  epochs times the steps per epoch); ``capacity_nats = 0`` turns capacity off.
  """

  objective: str = "elbo"
  num_samples: int = 1
  gradient_estimator: str = "plain"
  free_bits: float = 0.0
  warmup_steps: int = 0
  capacity_nats: float = 0.0
  capacity_steps: int = 1
  dataset_size: int = 1  # beta_tcvae: N, the training examples the batches are drawn from.
  num_groups: int = 1  # miwae, piwae: M groups of num_samples.
  ciwae_beta: float = 0.5
  gamma: float = 10.0  # factor_vae
  discriminator_hidden: tuple[int, ...] = (1000,) * 6  # factor_vae
  lambda_od: float = 10.0  # dip_vae_*
  lambda_d: float = 100.0  # dip_vae_*


# config.SWEEP_FIELDS other than beta -> the Spec field a sweep's model traces it into.
SWEEP_SPEC_FIELDS = {
  "free_bits": "free_bits",
  "capacity_nats": "capacity_nats",
  "ciwae_beta": "ciwae_beta",
  "factor_vae.gamma": "gamma",
  "dip_vae.lambda_od": "lambda_od",
  "dip_vae.lambda_d": "lambda_d",
}


class Auxiliary(NamedTuple):
  """A network an objective trains beside the VAE: its parameters are
  ``params[name]``, made by ``init(key, model)``; ``optim.with_auxiliary`` gives them
  their own optimizer."""

  name: str
  init: Callable[[Array, Model], Params]


def _discriminator(spec: Spec) -> networks.Discriminator:
  return networks.Discriminator(tuple(spec.discriminator_hidden))


def auxiliary(spec: Spec) -> Auxiliary | None:
  """The auxiliary network of ``spec``'s objective, or ``None``.

  Adding an objective with a network of its own takes: a branch here returning its
  ``Auxiliary``; its loss in ``make_loss_fn``, reading ``params[name]`` and adding the
  network's own loss with the VAE's inputs held constant; its optimizer in
  ``optim.AUXILIARY_OPTIMIZERS``; and its name in ``config.AUXILIARY_OBJECTIVES``.
  """
  if spec.objective == "factor_vae":

    def init(key: Array, model: Model) -> Params:
      z = jnp.zeros((1, model.latents), jnp.float32)
      return _discriminator(spec).init(key, z)["params"]

    return Auxiliary("discriminator", init)
  return None


# --------------------------------------------------------------------------
# The objectives.


def elbo(
  model: Model,
  params: Params,
  x: Array,
  key: Array,
  *,
  beta: float | Array = 1.0,
  num_samples: int = 1,
) -> losses.ElboOutput:
  """The per-example beta-ELBO of any model, ``[batch]`` parts in nats.

  ``losses.elbo`` itself (with ``model.likelihood`` as its ``log_likelihood_fn``) for a
  model with ``closed_form_kl``; otherwise the Monte Carlo reconstruction and KL
  estimates of ``model.posterior`` at ``num_samples`` samples, combined by
  ``losses.elbo_from_terms``. A conditional VAE's ``x`` is ``(x, labels)``: its ELBO
  bounds ``log p(x | y)``.
  """
  model, x = models.bind(model, x)
  if model.closed_form_kl:
    mean, logvar = model.encode(params, x)
    decode = functools.partial(model.decode, params)
    return losses.elbo(
      key, x, mean, logvar, decode, model.likelihood, beta=beta, num_samples=num_samples
    )
  eps = losses.sample_eps(key, (num_samples, x.shape[0], model.latents))
  lw = models.log_weights(model, params, x, eps)
  reconstruction = jnp.mean(lw.log_px_z, axis=0)
  kl = jnp.mean(lw.posterior.kl, axis=0)
  return losses.ElboOutput(losses.elbo_from_terms(reconstruction, kl, beta), reconstruction, kl)


def _dreg_bound(model, params, x, eps) -> Array:
  """``losses.dreg_iw_bound`` of the log-weights computed along its two gradient paths:
  the encoder's only through ``z`` (decoder and ``q``'s parameters fixed), the
  decoder's with ``z`` fixed. Same values, two gradient paths."""
  stop = jax.lax.stop_gradient
  enc_only = {"encoder": params["encoder"], "decoder": stop(params["decoder"])}
  log_w_enc = models.log_weights(model, enc_only, x, eps, stop_density_gradient=True).log_w
  dec_only = {"encoder": stop(params["encoder"]), "decoder": params["decoder"]}
  log_w_dec = models.log_weights(model, dec_only, x, eps).log_w
  return losses.dreg_iw_bound(log_w_enc, log_w_dec)


def _split_paths(params: Params) -> tuple[Params, Params]:
  """``params`` twice: with the decoder's held constant, and with the encoder's."""
  stop = jax.lax.stop_gradient
  enc_only = {**params, "decoder": stop(params["decoder"])}
  dec_only = {**params, "encoder": stop(params["encoder"])}
  return enc_only, dec_only


def make_loss_fn(
  model: Model, spec: Spec, beta: float | Array = 1.0, hyper: dict[str, Array] | None = None
) -> LossFn:
  """``loss_fn(params, x, key, step) -> (loss, metrics)``: batch means, in nats (for a
  conditional VAE, ``x`` is ``(x, labels)``).

  ``beta`` may be a Python float (a single run) or a traced scalar (one model
  of a sweep). ``step`` (a traced int32 scalar) drives the KL schedules.
  Metrics: ``loss``; ``elbo``, the beta=1 bound (for ``iwae`` the mean
  log-weight, an ELBO estimate from the same samples; for ``autoencoder`` only
  the reconstruction term, not a bound); ``reconstruction``
  (``E_q log p(x|z)``; for ``iwae`` the mean log-weight plus ``kl``); ``kl``
  (the true KL, whatever free bits or capacity do); plus ``beta`` under
  warm-up and ``capacity`` under capacity annealing.

  ``hyper`` maps ``Spec`` fields (``free_bits``, ``capacity_nats``, ``ciwae_beta``,
  ``gamma``, ``lambda_od``, ``lambda_d``) to traced values that replace ``spec``'s: one
  model of a sweep over that field.

  Raises:
    config.ConfigError: an unknown objective or gradient estimator.
  """
  config_lib.check_choice("objective", spec.objective)
  config_lib.check_choice("gradient_estimator", spec.gradient_estimator)
  if model.num_classes:
    # A conditional VAE: batches are (x, labels); the objective is that of the model
    # given the batch's labels, a bound on log p(x | y).
    def conditional_loss_fn(params, inputs, key, step):
      bound, x = models.bind(model, inputs)
      return make_loss_fn(bound, spec, beta, hyper)(params, x, key, step)

    return conditional_loss_fn
  hyper = dict(hyper or {})
  # Which form the KL term takes is decided by the config (and what a sweep varies), not
  # by the traced values.
  uses_capacity = bool(spec.capacity_nats) or "capacity_nats" in hyper
  uses_free_bits = bool(spec.free_bits) or "free_bits" in hyper
  spec = spec._replace(**hyper)
  k = spec.num_samples

  def summary(loss: Array, reconstruction: Array, kl: Array) -> Metrics:
    return {
      "loss": loss,
      "elbo": jnp.mean(reconstruction - kl),  # The beta=1 bound, for comparison.
      "reconstruction": jnp.mean(reconstruction),
      "kl": jnp.mean(kl),
    }

  def autoencoder(params, x, key, step):
    del key, step
    mean, _ = model.encode(params, x)
    reconstruction = model.likelihood(model.decode(params, mean), x)
    return summary(-jnp.mean(reconstruction), reconstruction, jnp.zeros_like(reconstruction))

  def iwae(params, x, key, step):
    del step
    eps = losses.sample_eps(key, (k, x.shape[0], model.latents))
    log_w, _, post = models.log_weights(model, params, x, eps)
    if spec.gradient_estimator == "dreg":
      bound = _dreg_bound(model, params, x, eps)
    else:
      bound = losses.iw_bound_from_log_weights(log_w, axis=0)
    kl = jnp.mean(post.kl, axis=0)
    return summary(-jnp.mean(bound), jnp.mean(log_w, axis=0) + kl, kl)  # elbo = mean log w.

  def free_bits(params, x, key, step):
    eps = losses.sample_eps(key, (k, x.shape[0], model.latents))
    _, log_px_z, post = models.log_weights(model, params, x, eps)
    reconstruction = jnp.mean(log_px_z, axis=0)
    kl_term = losses.free_bits_kl(post.kl_per_dim, spec.free_bits)
    beta_t = kl_weight(beta, step, spec.warmup_steps)
    loss = -jnp.mean(losses.elbo_from_terms(reconstruction, kl_term, beta_t))
    return summary(loss, reconstruction, jnp.mean(post.kl, axis=0))

  def capacity(params, x, key, step):
    parts = elbo(model, params, x, key, num_samples=k)
    c_t = capacity_at(step, spec.capacity_nats, spec.capacity_steps)
    rec, kl = jnp.mean(parts.reconstruction), jnp.mean(parts.kl)
    loss = -losses.capacity_objective(rec, kl, beta, c_t)
    return {**summary(loss, parts.reconstruction, parts.kl), "capacity": c_t}

  def beta_tcvae(params, x, key, step):
    del step
    eps = losses.sample_eps(key, (1, x.shape[0], model.latents))
    _, log_px_z, post = models.log_weights(model, params, x, eps)
    mean, logvar = model.encode(params, x)
    tc = total_correlation.total_correlation_mws(post.z[0], mean, logvar, spec.dataset_size)
    reconstruction, kl = log_px_z[0], post.kl[0]
    elbo_terms = losses.elbo_from_terms(reconstruction, kl)
    loss = -jnp.mean(elbo_terms) + (beta - 1.0) * jnp.mean(tc)
    return {**summary(loss, reconstruction, kl), "total_correlation_mws": jnp.mean(tc)}

  def grouped(bound_fn):
    def objective(params, x, key, step):
      del step
      eps = losses.sample_eps(key, (spec.num_groups * k, x.shape[0], model.latents))
      log_w, _, post = models.log_weights(model, params, x, eps)
      bound = bound_fn(params, x, eps, log_w)
      kl = jnp.mean(post.kl, axis=0)
      return summary(-jnp.mean(bound), jnp.mean(log_w, axis=0) + kl, kl)

    return objective

  def piwae_bound(params, x, eps, log_w):
    del log_w
    enc_only, dec_only = _split_paths(params)
    log_w_enc = models.log_weights(model, enc_only, x, eps).log_w
    log_w_dec = models.log_weights(model, dec_only, x, eps).log_w
    return losses.piwae_bound(log_w_enc, log_w_dec, spec.num_groups)

  def dip_vae(kind):
    def objective(params, x, key, step):
      del step  # No KL schedule: config.validate refuses one beside a DIP-VAE.
      parts = elbo(model, params, x, key, beta=beta, num_samples=k)
      mean, logvar = model.encode(params, x)
      penalty = losses.dip_vae_regularizer(mean, logvar, spec.lambda_od, spec.lambda_d, kind)
      loss = -jnp.mean(parts.elbo) + penalty
      return {**summary(loss, parts.reconstruction, parts.kl), "dip_penalty": penalty}

    return objective

  def factor_vae(params, x, key, step):
    del step  # No KL schedule: config.validate refuses one beside FactorVAE.
    eps_key, permute_key = jax.random.split(key)
    eps = losses.sample_eps(eps_key, (1, x.shape[0], model.latents))
    _, log_px_z, post = models.log_weights(model, params, x, eps)
    reconstruction, kl, z = log_px_z[0], post.kl[0], post.z[0]
    discriminator = _discriminator(spec)
    stop = jax.lax.stop_gradient
    d_params = params["discriminator"]
    # The VAE's loss: the discriminator held constant.
    tc = losses.factor_vae_total_correlation(discriminator.apply({"params": stop(d_params)}, z))
    elbo_terms = losses.elbo_from_terms(reconstruction, kl, beta)
    vae_loss = -jnp.mean(elbo_terms) + spec.gamma * jnp.mean(tc)
    # The discriminator's loss: the codes held constant.
    z_fixed = stop(z)
    logits_joint = discriminator.apply({"params": d_params}, z_fixed)
    logits_permuted = discriminator.apply(
      {"params": d_params}, losses.permute_dims(permute_key, z_fixed)
    )
    d_loss = losses.factor_vae_discriminator_loss(logits_joint, logits_permuted)
    return {
      **summary(vae_loss + d_loss, reconstruction, kl),
      "vae_loss": vae_loss,
      "discriminator_loss": d_loss,
      "total_correlation": jnp.mean(tc),
    }

  def plain_elbo(params, x, key, step):
    beta_t = kl_weight(beta, step, spec.warmup_steps)
    parts = elbo(model, params, x, key, beta=beta_t, num_samples=k)
    return summary(-jnp.mean(parts.elbo), parts.reconstruction, parts.kl)

  # The ELBO's KL term: shaped by capacity annealing, or free bits, or neither.
  shaped_elbo = capacity if uses_capacity else free_bits if uses_free_bits else plain_elbo
  fn = {
    "elbo": shaped_elbo,
    "iwae": iwae,
    "miwae": grouped(lambda p, x, e, log_w: losses.miwae_bound(log_w, spec.num_groups)),
    "ciwae": grouped(lambda p, x, e, log_w: losses.ciwae_bound(log_w, spec.ciwae_beta)),
    "piwae": grouped(piwae_bound),
    "autoencoder": autoencoder,
    "beta_tcvae": beta_tcvae,
    "factor_vae": factor_vae,
    "dip_vae_i": dip_vae("i"),
    "dip_vae_ii": dip_vae("ii"),
  }[spec.objective]

  def loss_fn(params: Params, x: Array, key: Array, step: Array) -> tuple[Array, Metrics]:
    metrics = fn(params, x, key, step)
    if spec.warmup_steps > 0:
      metrics["beta"] = jnp.asarray(kl_weight(beta, step, spec.warmup_steps), jnp.float32)
    return metrics["loss"], metrics

  return loss_fn
