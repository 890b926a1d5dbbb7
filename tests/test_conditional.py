"""The conditional VAE (Sohn et al. 2015): q(z | x, y) and p(x | z, y), y a one-hot label."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import config as config_lib
from vae_jax import estimators, evaluate, input_pipeline, losses, models, objectives, sweep, train
from vae_jax import step as step_lib


def _np_elbo(params, x, labels, eps, num_classes):
  """The CVAE's ELBO in float64 NumPy from the paper's definition, for an MLP of one hidden
  ReLU layer each way: encoder [x, y] -> (mean, logvar), decoder [z, y] -> Bernoulli logits."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  y = np.eye(num_classes)[labels]
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  e, d = p["encoder"], p["decoder"]
  h = np.maximum(np.concatenate([flat, y], 1) @ e["hidden_0"]["kernel"] + e["hidden_0"]["bias"], 0)
  mean = h @ e["mean"]["kernel"] + e["mean"]["bias"]
  logvar = h @ e["logvar"]["kernel"] + e["logvar"]["bias"]
  z = mean + np.exp(0.5 * logvar) * np.asarray(eps, np.float64)
  g = np.maximum(np.concatenate([z, y], 1) @ d["hidden_0"]["kernel"] + d["hidden_0"]["bias"], 0)
  logits = g @ d["output"]["kernel"] + d["output"]["bias"]
  log_px = np.sum(flat * logits - np.logaddexp(0.0, logits), axis=1)
  kl = 0.5 * np.sum(np.exp(logvar) + mean**2 - 1.0 - logvar, axis=1)
  return log_px - kl


def test_the_conditional_elbo_is_the_papers():
  model = models.make_vae((4, 4, 1), 3, encoder_hidden=(5,), logvar_bound=None, num_classes=4)
  x = (jax.random.uniform(jax.random.key(0), (6, 4, 4, 1)) > 0.5).astype(jnp.float32)
  labels = jnp.array([0, 1, 2, 3, 1, 0])
  params = model.init(jax.random.key(1), x)
  key = jax.random.key(2)
  got = objectives.elbo(model, params, (x, labels), key).elbo
  eps = losses.sample_eps(key, (1, 6, 3))[0]
  np.testing.assert_allclose(got, _np_elbo(params, x, labels, eps, 4), rtol=1e-5)
  # The label matters: another label gives another ELBO.
  other = objectives.elbo(model, params, (x, (labels + 1) % 4), key).elbo
  assert not np.allclose(got, other)
  # The training objective is that ELBO, averaged: loss = -mean ELBO.
  loss, _ = objectives.make_loss_fn(model, objectives.Spec())(params, (x, labels), key, 0)
  np.testing.assert_allclose(loss, -np.mean(got), rtol=1e-6)


def test_a_conditional_model_needs_its_labels():
  model = models.make_vae((4, 4, 1), 3, encoder_hidden=(5,), num_classes=4)
  params = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match=r"reads \(x, labels\) pairs"):
    objectives.elbo(model, params, jnp.zeros((2, 4, 4, 1)), jax.random.key(1))
  with pytest.raises(ValueError, match="need its labels"):
    model.encode(params, jnp.zeros((2, 4, 4, 1)))


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"dataset": "dsprites_smoke"}, "has factors instead"),
    ({"data.feed": "stream"}, "device-resident feed"),
    ({"model.stochastic_layers": 2}, "one stochastic layer"),
    ({"model.prior": "vampprior"}, "one stochastic layer"),
  ],
)
def test_what_a_conditional_vae_cannot_do_is_one_clear_error(changes, message):
  config = config_lib.base_config()
  config.model.num_classes = 10
  for path, value in changes.items():
    section, _, field = path.rpartition(".")
    (config[section] if section else config)[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_labels_beyond_num_classes_are_one_clear_error(smoke_config):
  smoke_config.model.num_classes = 5
  with pytest.raises(config_lib.ConfigError, match=r"range over \[0, 9\].*10 or more"):
    input_pipeline.load_splits(smoke_config)


@pytest.fixture(scope="module")
def trained(tfds_dir, tmp_path_factory):
  """A CVAE trained for 1,000 steps on the tiny real-MNIST fixture (400 digits)."""
  from conftest import load_config

  config = load_config("mnist", "smoke")
  config.data_dir, config.progress_bar = tfds_dir, False
  config.model.num_classes, config.model.latents, config.model.encoder_hidden = 10, 4, (128,)
  config.num_train_steps, config.num_image_samples = 1000, 0
  workdir = tmp_path_factory.mktemp("cvae")
  state = train.train_and_evaluate(config, workdir)
  splits = input_pipeline.load_splits(config)
  return config, workdir, state, splits, models.make_model(config, splits.event_shape)


def test_conditional_samples_follow_their_class(trained):
  """Generations of class c (50 draws of z, the same z for every class) average to an image
  nearer the training images of class c than those of any other class, for at least 8 of
  the 10 digits; an untrained model's generations do not (every class looks alike)."""
  _, _, state, splits, model = trained
  x = splits.train.images.reshape(len(splits.train.images), -1) / 255.0
  class_means = np.stack([x[splits.train.labels == c].mean(0) for c in range(10)])

  def nearest_class(params):
    samples = models.class_samples(model, params, jax.random.key(0), 50)
    per_class = np.asarray(samples).reshape(10, 50, -1).mean(1)
    return np.argmin(((per_class[:, None] - class_means[None]) ** 2).sum(-1), axis=1)

  assert np.sum(nearest_class(state.params) == np.arange(10)) >= 8
  untrained = model.init(jax.random.key(0), jnp.zeros((1, *splits.event_shape)))
  assert np.sum(nearest_class(untrained) == np.arange(10)) <= 2


def test_the_evaluation_reports_the_conditional_log_likelihood(trained):
  """``--mode=evaluate`` of a CVAE reports log p(x | y), and the JSON says so: the importance-
  sampled estimate with the test labels (recomputed here with the evaluation's keys), which
  is higher than with every label shifted by one class."""
  config, workdir, state, splits, model = trained
  results = evaluate.evaluate_workdir(config, workdir, num_samples=20)
  assert results["conditional_on_label"] is True
  assert any("eval_class_samples" in path for path in results["images"])
  test_x = np.asarray(input_pipeline.eval_images(splits.test.images, config.binarization))
  labels = np.asarray(splits.test.labels, np.int32)
  fn = estimators.make_per_example_fn(model, num_samples=20)
  eval_key = step_lib.run_keys(config.seed)[step_lib.KEY_EVAL]
  key = jax.random.fold_in(eval_key, 0)  # The test split's tag.

  def nll(y):
    values = estimators.per_example_values(fn, state.params, (test_x, y), key, 50)
    return -float(np.mean(values["log_px"]))

  assert results["test"]["log_likelihood"]["nll_nats"] == pytest.approx(nll(labels), rel=1e-5)
  assert nll(labels) < nll((labels + 1) % 10) - 1.0
  json.dumps(results)  # Every number is JSON.


def test_a_conditional_sweep_trains_each_model_as_its_single_run(smoke_config, tmp_path):
  config = smoke_config
  config.model.num_classes, config.num_train_steps, config.num_image_samples = 10, 24, 0
  config.sweep.betas = (1.0, 4.0)
  state = sweep.train_sweep(config, tmp_path / "sweep")
  single = config.copy_and_resolve_references()
  single.sweep.betas, single.beta = (), 4.0
  one = train.train_and_evaluate(single, tmp_path / "beta_4")
  chex.assert_trees_all_close(sweep.model_state(state, 1).params, one.params, rtol=1e-5, atol=1e-6)
