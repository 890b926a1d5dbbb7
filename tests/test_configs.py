"""Every config file and argument resolves, validates, and trains one step on its own model."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import config as config_lib
from vae_jax import likelihoods
from vae_jax import trainer as trainer_lib

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def load(name: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CASES = [
  ("mnist", None),
  ("mnist", "smoke"),
  ("fashion_mnist", None),
  ("fashion_mnist", "smoke"),
  ("mnist", "cvae"),
  ("fashion_mnist", "cvae,smoke"),
  ("fashion_mnist_2d", None),
  ("fashion_mnist_ae", None),
  ("beta_sweep", None),
  ("fashion_mnist_likelihood", None),
  ("fashion_mnist_likelihood", "vae_vampprior"),
  ("fashion_mnist_likelihood", "hvae"),
  ("fashion_mnist_likelihood", "hvae_vampprior"),
  ("fashion_mnist_likelihood", "vae,iwae"),
  ("fashion_mnist_likelihood", "hvae_vampprior,iwae"),
  ("fashion_mnist_likelihood", "vae,smoke"),
  ("fashion_mnist_likelihood", "vae_vampprior,smoke"),
  ("fashion_mnist_likelihood", "hvae,smoke"),
  ("fashion_mnist_likelihood", "hvae_vampprior,smoke"),
  ("fashion_mnist_likelihood", "hvae_vampprior,iwae,smoke"),
  ("fashion_mnist_likelihood", "legacy_mlp"),
  ("fashion_mnist_likelihood", "legacy_hvae"),
  ("fashion_mnist_likelihood", "legacy_conv_hvae,smoke"),
  ("fashion_mnist_continuous", None),
  ("fashion_mnist_continuous", "smoke"),
  ("iwae_mnist", "vae1"),
  ("iwae_mnist", "iwae1"),
  ("iwae_mnist", "vae2"),
  ("iwae_mnist", "iwae2"),
  ("iwae_mnist", "iwae2,smoke"),
]


@pytest.mark.parametrize("name, arg", CASES)
def test_config_validates_and_builds(name, arg):
  config = load(name).get_config(arg)
  config_lib.validate(config)
  trainer = trainer_lib.build_trainer(config, (28, 28, 1), num_train=60000)
  assert trainer.model.latents == sum(trainer.model.layer_latents)


# Configs of other images: (name, argument, one example's shape).
IMAGE_CASES = [
  ("cifar10", None, (32, 32, 3)),
  ("cifar10", "smoke", (32, 32, 3)),
  ("celeba_beta_sweep", None, (64, 64, 3)),
  ("celeba_beta_sweep", "smoke", (64, 64, 3)),
  ("dsprites_sweep", None, (64, 64, 1)),
  ("dsprites_sweep", "smoke", (64, 64, 1)),
]


@pytest.mark.parametrize("name, arg, event_shape", IMAGE_CASES)
def test_image_configs_validate_and_build(name, arg, event_shape):
  """Each builds for its images; the smoke variants also take a finite step (the full
  models' steps take minutes on a CPU)."""
  config = load(name).get_config(arg)
  config_lib.validate(config)
  trainer = trainer_lib.build_trainer(config, event_shape, num_train=400)
  if arg != "smoke":
    shapes = jax.eval_shape(trainer.init_state)
    assert jax.tree.leaves(shapes.params)
    return
  state = trainer.init_state()
  levels = jax.random.randint(jax.random.key(0), (config.batch_size, *event_shape), 0, 256)
  x = levels.astype(jnp.float32) / 255.0
  state, metrics = jax.jit(trainer.train_step)(state, x, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("name, arg", [c for c in CASES if c[1] and "smoke" in c[1]])
def test_smoke_config_takes_a_finite_step(name, arg):
  config = load(name).get_config(arg)
  trainer = trainer_lib.build_trainer(config, (28, 28, 1), num_train=400)
  state = trainer.init_state()
  x = (jax.random.uniform(jax.random.key(0), (config.batch_size, 28, 28, 1)) > 0.5).astype(
    jnp.float32
  )
  if config.model.num_classes:  # A conditional VAE reads (x, labels).
    x = (x, jnp.arange(config.batch_size) % config.model.num_classes)
  before = jax.tree.leaves(state.params)[0].copy()
  state, metrics = jax.jit(trainer.train_step)(state, x, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(before, jax.tree.leaves(state.params)[0])


def test_iwae_mnist_matches_the_paper():
  c = load("iwae_mnist").get_config("iwae2")
  assert (c.model.encoder_hidden, c.model.latents) == ((200, 200), 100)
  assert (c.model.top_hidden, c.model.top_latents) == ((100, 100), 50)
  assert (c.objective, c.num_samples, c.batch_size, c.num_epochs) == ("iwae", 50, 20, 3280)
  assert c.model.activation == "tanh" and c.optimizer.schedule == "iwae"
  c1 = load("iwae_mnist").get_config("vae1")
  assert (c1.objective, c1.num_samples, c1.model.stochastic_layers) == ("elbo", 1, 1)


@pytest.mark.parametrize(
  "name, arg", [("iwae_mnist", None), ("iwae_mnist", "vae3"), ("fashion_mnist_likelihood", "gated")]
)
def test_unknown_argument_is_one_clear_error(name, arg):
  with pytest.raises(ValueError, match="Unknown config argument"):
    load(name).get_config(arg)


@pytest.mark.parametrize("row", ["vae", "vae_vampprior", "hvae", "hvae_vampprior"])
def test_likelihood_rows_follow_the_vampprior_protocol(row):
  """The settings of Tomczak & Welling's and the Exemplar VAE's public code."""
  c = load("fashion_mnist_likelihood").get_config(row)
  assert (c.dataset, c.binarization, c.validation_examples) == ("fashion_mnist", "dynamic", 10000)
  m = c.model
  assert (m.latents, m.encoder_hidden, m.gated, m.logvar_clip) == (40, (300, 300), True, (-6, 2))
  assert m.kernel_init == "he_normal"
  assert (c.optimizer.name, c.optimizer.learning_rate, c.batch_size) == ("adam_normgrad", 5e-4, 100)
  assert (c.kl_warmup_epochs, c.early_stopping_patience_epochs, c.num_epochs) == (100, 50, 2000)
  assert m.stochastic_layers == (2 if row.startswith("hvae") else 1)
  if row.startswith("hvae"):
    assert (m.hierarchy, m.top_latents, m.top_hidden) == ("vampprior", 40, (300, 300))
  assert m.prior == ("vampprior" if row.endswith("vampprior") else "standard")
  if m.prior == "vampprior":
    assert (m.num_pseudo_inputs, m.pseudo_inputs_mean, m.pseudo_inputs_std) == (500, 0.05, 0.01)
  iwae = load("fashion_mnist_likelihood").get_config(f"{row},iwae")
  assert (iwae.objective, iwae.num_samples, iwae.kl_warmup_epochs) == ("iwae", 5, 0.0)
  assert iwae.gradient_estimator == ("plain" if m.prior == "vampprior" else "dreg")


def test_likelihood_config_arguments_are_never_silently_misread():
  module = load("fashion_mnist_likelihood")
  assert module.get_config().to_dict() == module.get_config("vae").to_dict()
  for bad in ("resnet", "vae,hvae", "hvae,big", "mlp", "legacy_mlp,vae"):
    with pytest.raises(ValueError, match="Unknown config argument"):
      module.get_config(bad)
  config = module.get_config("smoke,hvae")  # Order does not matter.
  assert config.model.stochastic_layers == 2 and config.num_epochs == 1


def test_grey_level_likelihoods_are_named_honestly():
  config = load("fashion_mnist").get_config("smoke")
  config.binarization = "none"
  assert "not a log-density" in _caveat(config)
  config.model.likelihood = "continuous_bernoulli"
  assert _caveat(config) is None
  trainer = trainer_lib.build_trainer(config, (28, 28, 1), num_train=400)
  state = trainer.init_state()
  x = jax.random.uniform(jax.random.key(0), (config.batch_size, 28, 28, 1))  # Grey levels.
  state, metrics = jax.jit(trainer.train_step)(state, x, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))
  config.binarization = "dynamic"
  config.model.likelihood = "bernoulli"
  assert _caveat(config) is None


def _caveat(config):
  return likelihoods.from_config(config).caveat(binarization=config.binarization, binary_data=False)


def test_every_declared_choice_is_implemented_and_nothing_else():
  """config.CHOICES declares each string field's names; each implementing module keeps one
  registry (or dispatch) of its own, and the two must agree."""
  from vae_jax import datasets, input_pipeline, likelihoods, models, networks, objectives, optim

  choices = config_lib.CHOICES
  assert set(choices["model.likelihood"]) == set(likelihoods.REGISTRY)
  assert set(choices["model.activation"]) == set(networks.ACTIVATIONS)
  assert set(choices["model.kernel_init"]) == set(networks.KERNEL_INITS)
  assert set(choices["optimizer.name"]) == set(optim.OPTIMIZERS)
  assert set(choices["optimizer.schedule"]) == set(optim.SCHEDULES)
  assert set(choices["dataset"]) == set(datasets.BUILT_IN)
  pixels = jnp.zeros((2, 2, 2, 1), jnp.uint8)
  for name in choices["binarization"]:
    input_pipeline.preprocess(pixels, name, jax.random.key(0))
  model = models.make_mlp_vae((4,), 2, encoder_hidden=(3,))
  for name in choices["objective"]:
    objectives.make_loss_fn(model, objectives.Spec(objective=name))
  for name in choices["gradient_estimator"]:
    objectives.make_loss_fn(model, objectives.Spec(objective="iwae", gradient_estimator=name))
  for field, unknown in [("objective", "vqvae"), ("optimizer.name", "lamb")]:
    with pytest.raises(config_lib.ConfigError, match=rf"config.{field}='{unknown}' is not one"):
      config_lib.check_choice(field, unknown)
