"""The objectives beside the ELBO and IWAE: MIWAE, CIWAE and PIWAE (Rainforth et al. 2018),
DIP-VAE I and II (Kumar et al. 2018), FactorVAE with its discriminator (Kim & Mnih 2018),
and sweeps over their hyperparameters.

Each loss is checked against a computation written here from the paper's formula (NumPy,
or plain jax.numpy for gradients), independently of ``vae_jax.losses``."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax import config as config_lib
from vae_jax import evaluate, losses, models, objectives, sweep, train, trainer
from vae_jax import step as step_lib


def _np_iwae(log_w: np.ndarray) -> np.ndarray:
  """log (1/K) sum_k exp(log_w_k) over axis 0, in float64."""
  top = log_w.max(axis=0)
  return top + np.log(np.mean(np.exp(log_w - top), axis=0))


LOG_W = np.random.default_rng(0).normal(0.0, 3.0, (12, 5))  # 12 samples of 5 examples.


# --------------------------------------------------------------------------
# MIWAE, CIWAE, PIWAE.


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 12])
def test_miwae_is_the_mean_of_the_groups_iwae_bounds(groups):
  """(1/M) sum_m log (1/K) sum_k w_mk (Rainforth et al. 2018, eq. 10), and its gradient."""
  k = 12 // groups
  want = np.mean([_np_iwae(LOG_W[m * k : (m + 1) * k]) for m in range(groups)], axis=0)
  with jax.enable_x64(True):
    got = losses.miwae_bound(jnp.asarray(LOG_W), groups)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    grad = jax.grad(lambda a: jnp.sum(losses.miwae_bound(a, groups)))(jnp.asarray(LOG_W))
  # d/d log w_mk = softmax within the group / M.
  blocks = LOG_W.reshape(groups, k, 5)
  weights = np.exp(blocks - blocks.max(axis=1, keepdims=True))
  weights /= weights.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(grad), (weights / groups).reshape(12, 5), rtol=1e-12)


def test_miwae_ends_are_iwae_and_the_elbo():
  log_w = jnp.asarray(LOG_W, jnp.float32)
  np.testing.assert_allclose(
    losses.miwae_bound(log_w, 1), losses.iw_bound_from_log_weights(log_w), rtol=1e-6
  )
  np.testing.assert_allclose(losses.miwae_bound(log_w, 12), jnp.mean(log_w, axis=0), rtol=1e-6)
  with pytest.raises(ValueError, match="do not split into 5 equal groups"):
    losses.miwae_bound(log_w, 5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_ciwae_is_the_convex_combination(beta):
  want = beta * LOG_W.mean(axis=0) + (1 - beta) * _np_iwae(LOG_W)
  with jax.enable_x64(True):
    got = losses.ciwae_bound(jnp.asarray(LOG_W), beta)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def test_piwae_gives_each_network_its_own_bounds_gradient():
  """Value: IWAE of all samples; gradient through the encoder's path: MIWAE's; through the
  decoder's: IWAE's (Rainforth et al. 2018, section 4)."""
  with jax.enable_x64(True):
    log_w = jnp.asarray(LOG_W)

    def piwae(enc, dec):
      return jnp.sum(losses.piwae_bound(enc, dec, 3))

    g_enc, g_dec = jax.grad(piwae, argnums=(0, 1))(log_w, log_w)
    value = losses.piwae_bound(log_w, log_w, 3)
    want_enc = jax.grad(lambda a: jnp.sum(losses.miwae_bound(a, 3)))(log_w)
    want_dec = jax.grad(lambda a: jnp.sum(losses.iw_bound_from_log_weights(a)))(log_w)
  np.testing.assert_allclose(np.asarray(value), _np_iwae(LOG_W), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(g_enc), np.asarray(want_enc), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(g_dec), np.asarray(want_dec), rtol=1e-12)


# --------------------------------------------------------------------------
# DIP-VAE.


def _np_dip(mean, logvar, lambda_od, lambda_d, kind):
  """Kumar et al. 2018, eqs. 6-7: C = Cov[mu] (I), + E[diag sigma^2] (II)."""
  centred = mean - mean.mean(axis=0)
  cov = centred.T @ centred / len(mean)
  if kind == "ii":
    cov = cov + np.diag(np.exp(logvar).mean(axis=0))
  off = cov - np.diag(np.diag(cov))
  return lambda_od * np.sum(off**2) + lambda_d * np.sum((np.diag(cov) - 1) ** 2)


@pytest.mark.parametrize("kind", ["i", "ii"])
def test_dip_vae_penalty_matches_the_paper_and_its_gradient(kind):
  rng = np.random.default_rng(1)
  mean, logvar = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
  with jax.enable_x64(True):
    got = losses.dip_vae_regularizer(jnp.asarray(mean), jnp.asarray(logvar), 2.0, 7.0, kind)
    np.testing.assert_allclose(float(got), _np_dip(mean, logvar, 2.0, 7.0, kind), rtol=1e-12)
    grad = jax.grad(losses.dip_vae_regularizer, argnums=(0, 1))(
      jnp.asarray(mean), jnp.asarray(logvar), 2.0, 7.0, kind
    )
  # Central differences of the NumPy formula.
  h = 1e-6
  for arg, g in ((0, grad[0]), (1, grad[1])):
    for i, j in [(0, 0), (5, 3), (15, 2)]:
      args = [mean.copy(), logvar.copy()]
      args[arg][i, j] += h
      up = _np_dip(*args, 2.0, 7.0, kind)
      args[arg][i, j] -= 2 * h
      down = _np_dip(*args, 2.0, 7.0, kind)
      np.testing.assert_allclose(float(g[i, j]), (up - down) / (2 * h), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["i", "ii"])
def test_dip_vae_penalty_is_zero_for_an_identity_aggregate_covariance(kind):
  """Means whose batch covariance is exactly I (DIP-I, with no posterior variance) or
  I / 2 with variances 1/2 (DIP-II): nothing to penalize."""
  rng = np.random.default_rng(2)
  raw = rng.normal(size=(64, 5))
  raw -= raw.mean(axis=0)
  whitened = raw @ np.linalg.inv(np.linalg.cholesky(raw.T @ raw / 64)).T
  if kind == "i":
    mean, logvar = whitened, np.full((64, 5), -1e3)
  else:
    mean, logvar = whitened / math.sqrt(2), np.full((64, 5), math.log(0.5))
  with jax.enable_x64(True):
    got = losses.dip_vae_regularizer(jnp.asarray(mean), jnp.asarray(logvar), 10.0, 100.0, kind)
  assert abs(float(got)) < 1e-20


# --------------------------------------------------------------------------
# FactorVAE.


def test_factor_vae_estimates_and_permutation():
  logits = np.random.default_rng(3).normal(size=(8, 2))
  permuted_logits = np.random.default_rng(4).normal(size=(8, 2))
  tc = losses.factor_vae_total_correlation(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(tc), logits[:, 0] - logits[:, 1], rtol=1e-6)

  def log_softmax(a):
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))

  want = -0.5 * (log_softmax(logits)[:, 0].mean() + log_softmax(permuted_logits)[:, 1].mean())
  got = losses.factor_vae_discriminator_loss(jnp.asarray(logits), jnp.asarray(permuted_logits))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  z = jnp.arange(40.0).reshape(8, 5)
  shuffled = np.asarray(losses.permute_dims(jax.random.key(0), z))
  for j in range(5):  # Each column a permutation of itself, the columns independently.
    assert sorted(shuffled[:, j]) == sorted(np.asarray(z[:, j]))
  assert not all(np.array_equal(shuffled[:, 0] - j, shuffled[:, j] - 8 * j) for j in range(1, 5))


def _factor_config(smoke_config):
  config = smoke_config
  config.objective = "factor_vae"
  config.factor_vae.hidden = (16, 16)
  config.factor_vae.gamma = 20.0
  config.num_image_samples = 0
  return config


def test_factor_vae_step_is_a_hand_written_two_optimizer_step(smoke_config):
  """One train step against Kim & Mnih's algorithm written out: the VAE's Adam on the
  gradient of -ELBO + gamma TC with the discriminator fixed; the discriminator's Adam
  (1e-4, b1 0.5, b2 0.9) on the gradient of its cross-entropy with the codes fixed."""
  config = _factor_config(smoke_config)
  built = trainer.build_trainer(config, (28, 28, 1), 400)
  state = built.init_state()
  x = (jax.random.uniform(jax.random.key(0), (32, 28, 28, 1)) > 0.5).astype(jnp.float32)
  eps_key = built.keys[step_lib.KEY_EPS]
  new_state, metrics = jax.jit(built.train_step)(state, x, eps_key)

  model = built.model
  disc = objectives._discriminator(built.spec)
  key = jax.random.fold_in(eps_key, 0)
  eps_key_0, permute_key = jax.random.split(key)
  eps = losses.sample_eps(eps_key_0, (1, 32, model.latents))

  def codes_and_elbo(vae):
    mean, logvar = model.encode(vae, x)
    z = mean + jnp.exp(0.5 * logvar) * eps[0]
    log_px = model.likelihood(model.decode(vae, z), x)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1)
    return z, log_px - kl

  def vae_loss(vae, d_params):
    z, elbo = codes_and_elbo(vae)
    logits = disc.apply({"params": d_params}, z)
    return -jnp.mean(elbo) + 20.0 * jnp.mean(logits[:, 0] - logits[:, 1])

  def d_loss(d_params, z):
    joint = jax.nn.log_softmax(disc.apply({"params": d_params}, z))[:, 0]
    shuffled = losses.permute_dims(permute_key, z)
    marginal = jax.nn.log_softmax(disc.apply({"params": d_params}, shuffled))[:, 1]
    return -0.5 * (jnp.mean(joint) + jnp.mean(marginal))

  vae = {k: v for k, v in state.params.items() if k != "discriminator"}
  d_params = state.params["discriminator"]
  g_vae = jax.grad(vae_loss)(vae, d_params)
  z, _ = codes_and_elbo(vae)
  g_d = jax.grad(d_loss)(d_params, z)
  vae_opt, d_opt = optax.adam(1e-3), optax.adam(1e-4, b1=0.5, b2=0.9, eps=1e-8)
  with jax.numpy_dtype_promotion("standard"):  # optax mixes dtypes (as the step allows).
    u_vae, _ = vae_opt.update(g_vae, vae_opt.init(vae), vae)
    u_d, _ = d_opt.update(g_d, d_opt.init(d_params), d_params)
  want = {**optax.apply_updates(vae, u_vae), "discriminator": optax.apply_updates(d_params, u_d)}
  chex.assert_trees_all_close(new_state.params, want, rtol=1e-5, atol=1e-6)
  assert float(metrics["loss"]) == pytest.approx(
    float(vae_loss(vae, d_params) + d_loss(d_params, z)), rel=1e-5
  )


def test_factor_vae_resumes_bit_exactly_with_its_discriminator(smoke_config, tmp_path):
  config = _factor_config(smoke_config)
  straight = train.train_and_evaluate(config, tmp_path / "straight")
  half = config.copy_and_resolve_references()
  half.num_epochs = 1
  train.train_and_evaluate(half, tmp_path / "resumed")
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  assert "discriminator" in resumed.params
  chex.assert_trees_all_equal(resumed.params, straight.params)
  chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)


def _assert_each_model_is_its_single_run(config, state, tmp_path):
  """Model i of the sweep ``state`` (over ``config.sweep.field``) equals the single run of
  ``config`` with that field at its i-th value."""
  field = config.sweep.field
  for i, value in enumerate(config.sweep.field_values):
    single = config.copy_and_resolve_references()
    single.sweep.field, single.sweep.field_values = None, ()
    *parents, leaf = field.split(".")
    section = single
    for name in parents:
      section = section[name]
    section[leaf] = value
    one = train.train_and_evaluate(single, tmp_path / f"single_{i}")
    chex.assert_trees_all_close(
      sweep.model_state(state, i).params, one.params, rtol=1e-5, atol=1e-6
    )


def test_a_sweep_over_gamma_is_the_separate_runs(smoke_config, tmp_path):
  """Model i of a sweep over factor_vae.gamma equals the single run with that gamma."""
  config = _factor_config(smoke_config)
  config.num_epochs = 1
  config.sweep.field, config.sweep.field_values = "factor_vae.gamma", (5.0, 40.0)
  state = sweep.train_sweep(config, tmp_path / "sweep")
  _assert_each_model_is_its_single_run(config, state, tmp_path)
  d = state.models.params["discriminator"]
  assert not np.allclose(jax.tree.leaves(d)[0][0], jax.tree.leaves(d)[0][1])
  assert (tmp_path / "sweep/models/gamma_40_seed_0/metrics.jsonl").is_file()


def test_a_sweep_over_the_learning_rate_is_the_separate_runs(smoke_config, tmp_path):
  """The optimizer's learning rate as a sweep axis (a traced peak of a cosine schedule)
  gives each model exactly the single run with that learning rate."""
  config = smoke_config
  config.num_epochs, config.num_image_samples = 1, 0
  config.optimizer.schedule = "cosine"
  rates = (3e-4, 3e-3)
  config.sweep.field, config.sweep.field_values = "optimizer.learning_rate", rates
  state = sweep.train_sweep(config, tmp_path / "sweep")
  _assert_each_model_is_its_single_run(config, state, tmp_path)
  names = sorted(p.name for p in (tmp_path / "sweep/models").iterdir())
  assert names == ["learning_rate_0.0003_seed_0", "learning_rate_0.003_seed_0"]


@pytest.mark.parametrize(
  "objective, field", [("dip_vae_ii", "dip_vae.lambda_od"), ("elbo", "free_bits")]
)
def test_other_sweep_fields_train_their_models_apart(objective, field, smoke_config, tmp_path):
  config = smoke_config
  config.objective, config.num_epochs, config.num_image_samples = objective, 1, 0
  # Free bits of 0 (the plain KL) against 20 nats (no KL gradient while KL is below it).
  config.sweep.field, config.sweep.field_values = field, (0.0, 20.0)
  state = sweep.train_sweep(config, tmp_path / "sweep")
  p = jax.tree.leaves(state.models.params["encoder"])[0]
  assert not np.allclose(p[0], p[1])


@pytest.mark.parametrize(
  "field, objective, message",
  [
    ("model.latents", "elbo", r"may change the shapes of the parameters.*own --workdir"),
    ("optimizer.weight_decay", "elbo", r"not traced into the train step.*own --workdir"),
    ("model.latentz", "elbo", "no such config field"),
    ("factor_vae.gamma", "elbo", r"read by objective factor_vae, not by config.objective='elbo'"),
  ],
)
def test_a_field_that_cannot_be_swept_is_one_clear_error(field, objective, message):
  config = config_lib.base_config()
  config.objective = objective
  config.sweep.field, config.sweep.field_values = field, (2.0, 10.0)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


# Every model of a sweep is a single run the rules between fields allow: a sweep that
# would silently drop a setting, or train identical models, is refused like that run.
@pytest.mark.parametrize(
  "changes, message",
  [
    (  # Capacity would win over free bits: every model the same.
      {"sweep.field": "free_bits", "sweep.field_values": (0.5, 1.0), "capacity_nats": 5.0},
      r"model with free_bits=0.5 would be refused as a single run: config.capacity_nats",
    ),
    (  # The warm-up would be dropped for the capacity objective.
      {"sweep.field": "capacity_nats", "sweep.field_values": (5.0, 25.0), "kl_warmup_epochs": 1.0},
      r"capacity_nats=5 would be refused.*kl_warmup_epochs=0",
    ),
    (  # A value of 0 still builds the capacity objective, without the warm-up.
      {"sweep.field": "capacity_nats", "sweep.field_values": (0.0,), "kl_warmup_epochs": 1.0},
      r"builds that shaping of the KL term for every model",
    ),
    (  # The VampPrior has no KL per dimension (it crashed in the loss before).
      {"sweep.field": "free_bits", "sweep.field_values": (0.5, 1.0), "model.prior": "vampprior"},
      r"free_bits=0.5 would be refused.*VampPrior",
    ),
    (  # The importance-weighted bounds have no KL weight: identical models.
      {"objective": "miwae", "sweep.betas": (1.0, 4.0)},
      r"beta=4 would be refused.*'miwae' is an importance-weighted bound",
    ),
    (
      {"objective": "iwae", "sweep.field": "beta", "sweep.field_values": (1.0, 4.0)},
      r"beta=4 would be refused.*'iwae' is an importance-weighted bound",
    ),
    (  # A field without values took the betas as its values.
      {"objective": "factor_vae", "sweep.field": "factor_vae.gamma", "sweep.betas": (1.0, 4.0)},
      r"sweep.field='factor_vae.gamma' has no values: give them in sweep.field_values",
    ),
    (  # Values without a field became a beta sweep.
      {"sweep.field_values": (1.0, 4.0)},
      r"sweep.field_values is set but config.sweep.field is not",
    ),
  ],
)
def test_a_sweep_whose_models_a_single_run_would_refuse_is_refused(changes, message):
  config = config_lib.base_config()
  for path, value in changes.items():
    *parents, leaf = path.split(".")
    section = config
    for name in parents:
      section = section[name]
    section[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


@pytest.mark.parametrize("objective", ["ciwae", "piwae"])
def test_a_kl_weight_on_an_importance_weighted_bound_is_refused(objective):
  config = config_lib.base_config()
  config.objective, config.beta = objective, 4.0
  with pytest.raises(config_lib.ConfigError, match="importance-weighted bound"):
    config_lib.validate(config)


def test_factor_vae_reads_one_sample_per_example():
  config = config_lib.base_config()
  config.objective, config.num_samples = "factor_vae", 5
  with pytest.raises(config_lib.ConfigError, match="one posterior sample per example"):
    config_lib.validate(config)


def test_a_model_of_a_sweep_over_gamma_is_named_by_its_gamma(smoke_config):
  """Titles, log lines and the evaluation JSON name the swept value, not beta=1."""
  config = _factor_config(smoke_config)
  config.sweep.field, config.sweep.field_values = "factor_vae.gamma", (5.0, 40.0)
  names = [m.name for m in config_lib.sweep_models(config)]
  assert config_lib.swept_value(config, names[1]) == ("factor_vae.gamma", 40.0)
  assert config_lib.swept_value(config, "") is None
  model = models.make_model(config, (28, 28, 1))
  title = evaluate.model_title(config, model, 1.0, False, 0, ("factor_vae.gamma", 40.0))
  assert title.startswith("FactorVAE (gamma=40, seed=0, ") and "beta" not in title
