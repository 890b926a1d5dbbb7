"""Training aids: LR schedules, parameter EMA, KL warm-up, validation split with early
stopping, dequantized data, and the Fashion-MNIST likelihood config."""

import importlib.util
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax import (
  checkpointing,
  datasets,
  early_stopping,
  evaluate,
  input_pipeline,
  models,
  objectives,
  optim,
  train,
  writers,
)
from vae_jax import config as config_lib
from vae_jax import step as step_lib
from vae_jax import trainer as trainer_lib
from vae_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).parents[1]
EVENT_SHAPE = (28, 28, 1)


def _load_config_module(name: str):
  spec = importlib.util.spec_from_file_location(
    f"training_aids_{name}", REPO / "configs" / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _base(**flat):
  """``base_config()`` shrunk for smoke, with dotted-path overrides."""
  config = config_lib.base_config()
  config_lib.shrink_for_smoke(config)
  config.update_from_flattened_dict(flat)
  return config


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _trees_differ(a, b) -> bool:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), a, b))
  return any(leaves)


def _steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# --------------------------------------------------------------------------
# 1. Learning-rate schedules.


def _schedule(name, lr=0.01, num_epochs=5, steps_per_epoch=3, decay_rate=1.0):
  config = _base(
    **{
      "optimizer.schedule": name,
      "optimizer.learning_rate": lr,
      "optimizer.decay_rate": decay_rate,
      "num_epochs": num_epochs,
    }
  )
  return optim.learning_rate_schedule(config, steps_per_epoch)


def test_constant_schedule_is_the_float():
  lr = _schedule("constant", lr=0.0123)
  assert isinstance(lr, float) and lr == 0.0123


def test_cosine_schedule_starts_at_lr_and_ends_at_zero():
  sched = _schedule("cosine", lr=0.01, num_epochs=5, steps_per_epoch=4)
  assert float(sched(0)) == pytest.approx(0.01, rel=1e-6)
  assert float(sched(10)) == pytest.approx(0.005, rel=1e-5)  # Half way: half the rate.
  assert abs(float(sched(20))) < 1e-9
  assert abs(float(sched(25))) < 1e-9  # Stays at 0 past the end.
  assert float(sched(19)) > 0


def test_exponential_schedule_decays_once_per_epoch():
  sched = _schedule("exponential", lr=0.01, steps_per_epoch=4, decay_rate=0.5)
  for step, expected in [(0, 0.01), (3, 0.01), (4, 0.005), (7, 0.005), (8, 0.0025), (12, 0.00125)]:
    assert float(sched(step)) == pytest.approx(expected, rel=1e-6), step
  for bad in (0.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"config\.optimizer\.decay_rate"):
      config_lib.validate(_base(**{"optimizer.decay_rate": bad}))


def _iwae_stage(epoch: int) -> int:
  """The i with sum_{j<i} 3**j <= epoch < sum_{j<=i} 3**j."""
  i, end = 0, 1
  while epoch >= end:
    i += 1
    end += 3**i
  return i


def test_iwae_schedule_follows_burda_et_al():
  steps_per_epoch, lr = 3, 1e-3
  sched = _schedule("iwae", lr=lr, steps_per_epoch=steps_per_epoch)
  expected_stage = {0: 0, 1: 1, 3: 1, 4: 2, 12: 2, 13: 3, 39: 3, 40: 4, 1092: 6, 1093: 7, 3279: 7}
  for epoch, stage in expected_stage.items():
    assert _iwae_stage(epoch) == stage
    for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):
      assert float(sched(step)) == pytest.approx(lr * 10 ** (-stage / 7), rel=1e-5), (epoch, step)
  assert float(sched(3280 * steps_per_epoch)) == pytest.approx(lr / 10, rel=1e-5)


def test_unknown_schedule_names_the_choices():
  with pytest.raises(ValueError, match="linear") as info:
    _schedule("linear")
  for name in ("constant", "cosine", "exponential", "iwae"):
    assert repr(name) in str(info.value)
  with pytest.raises(ValueError, match=r"config\.optimizer\.schedule='linear'"):
    config_lib.validate(_base(**{"optimizer.schedule": "linear"}))
  for name in ("constant", "cosine", "exponential", "iwae"):
    config_lib.validate(_base(**{"optimizer.schedule": name}))


def _lr(schedule, step):
  return float(schedule(step)) if callable(schedule) else float(schedule)


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_resumable_change_of_num_epochs_keeps_every_learning_rate(name, tmp_path):
  """``num_epochs`` may change on resume because it "does not change the results"
  (README, Resume); then the learning rate of every step must stay what it was."""
  steps_per_epoch = 3
  old = _base(**{"optimizer.schedule": name, "optimizer.decay_rate": 0.5, "num_epochs": 2})
  workdir_lib.write_record(old, tmp_path)
  new = old.copy_and_resolve_references()
  new.num_epochs = 4
  refused = bool(workdir_lib.differences(new, tmp_path))
  old_lr = optim.learning_rate_schedule(old, steps_per_epoch)
  new_lr = optim.learning_rate_schedule(new, steps_per_epoch)
  changed = [
    (s, _lr(old_lr, s), _lr(new_lr, s))
    for s in range(2 * steps_per_epoch)
    if _lr(old_lr, s) != pytest.approx(_lr(new_lr, s), rel=1e-6)
  ]
  assert refused or not changed, (
    f"schedule {name!r}: resuming with num_epochs 2 -> 4 is accepted, but changes the "
    f"learning rate of already-scheduled steps (step, old, new): {changed}"
  )


# --------------------------------------------------------------------------
# 2. Parameter EMA.


def test_param_ema_follows_the_recursion_and_passes_updates_through():
  lr, decay = 0.1, 0.8
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}
  opt = optax.chain(optax.sgd(lr), optim.param_ema(decay))
  state = opt.init(params)
  assert isinstance(state[-1], optim.ParamEmaState)
  _assert_trees_equal(state[-1].ema, params)  # Starts at the initial parameters.

  rng = np.random.default_rng(0)
  ema = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  for _ in range(5):
    grads = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.float32(rng.normal())}
    updates, state = opt.update(grads, state, params)
    # The EMA does not change the updates: plain SGD's -lr * g.
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -lr * g, rtol=1e-6), updates, grads)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(
      lambda e, p: decay * e + (1 - decay) * np.asarray(p, np.float64), ema, params
    )
    jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-6), state[-1].ema, ema)
  assert _trees_differ(jax.device_get(state[-1].ema), jax.device_get(params))


def test_param_ema_rejects_bad_decay_and_missing_params():
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\)"):
      optim.param_ema(bad)
    with pytest.raises(ValueError, match=r"config\.optimizer\.ema_decay"):
      config_lib.validate(_base(**{"optimizer.ema_decay": bad}))
  opt = optim.param_ema(0.5)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="params"):
    opt.update(params, opt.init(params))


def _tiny_model():
  return models.make_mlp_vae(event_shape=EVENT_SHAPE, latents=2, encoder_hidden=(8,))


def _batch(seed=7, n=4):
  return jax.random.bernoulli(jax.random.key(seed), 0.3, (n, *EVENT_SHAPE)).astype(jnp.float32)


@pytest.mark.parametrize("clip", [None, 10.0])
def test_eval_params_is_the_ema_when_configured(clip):
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}
  grads = [jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.1 * i - 0.2), params) for i in range(4)]
  states = {}
  for ema_decay in (None, 0.5):
    config = _base(**{"optimizer.ema_decay": ema_decay, "optimizer.grad_clip_norm": clip})
    optimizer = optim.make_optimizer(config)
    state = step_lib.TrainState(jnp.int32(0), params, optimizer.init(params), jnp.int32(0))
    for g in grads:
      with jax.numpy_dtype_promotion("standard"):  # optax mixes dtypes (Adam's decay ** count).
        updates, opt_state = optimizer.update(g, state.opt_state, state.params)
        new = optax.apply_updates(state.params, updates)
      state = step_lib.TrainState(state.step + 1, new, opt_state, state.num_skipped)
    states[ema_decay] = state
  plain, with_ema = states[None], states[0.5]
  assert optim.eval_params(plain.opt_state, plain.params) is plain.params
  ema = optim.eval_params(with_ema.opt_state, with_ema.params)
  assert ema is with_ema.opt_state[-1].ema
  assert _trees_differ(jax.device_get(ema), jax.device_get(with_ema.params))
  # The EMA does not change the training trajectory.
  jax.tree.map(np.testing.assert_array_equal, plain.params, with_ema.params)


def test_fresh_state_with_ema_can_be_donated():
  """``initial_state`` then ``jax.jit(train_step, donate_argnums=0)``, as documented, with an
  EMA: the EMA must not share the parameters' buffers, or the donation fails."""
  config = _base(**{"optimizer.ema_decay": 0.5})
  trainer = trainer_lib.build_trainer(config, EVENT_SHAPE, 4 * config.batch_size)
  model, optimizer = trainer.model, trainer.optimizer
  step = jax.jit(trainer.train_step, donate_argnums=0)
  state = step_lib.initial_state(model, optimizer, jax.random.key(0), EVENT_SHAPE)
  state, metrics = step(state, _batch(), jax.random.key(1))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


# --------------------------------------------------------------------------
# 3. KL warm-up and the config checks of the training aids.


def test_kl_weight():
  assert float(objectives.kl_weight(2.0, jnp.int32(5), 0)) == 2.0
  assert float(objectives.kl_weight(2.0, jnp.int32(0), 10)) == 0.0
  assert float(objectives.kl_weight(2.0, jnp.int32(5), 10)) == pytest.approx(1.0)
  assert float(objectives.kl_weight(2.0, jnp.int32(10), 10)) == pytest.approx(2.0)
  assert float(objectives.kl_weight(2.0, jnp.int32(40), 10)) == pytest.approx(2.0)


def test_kl_warmup_scales_beta_in_the_train_step():
  beta, steps_per_epoch = 0.8, 4
  config = _base(beta=beta, kl_warmup_epochs=2.5)  # 10 warm-up steps.
  trainer = trainer_lib.build_trainer(config, EVENT_SHAPE, steps_per_epoch * config.batch_size)
  step_fn = jax.jit(trainer.train_step)
  state = trainer.init_state()
  batch = _batch()
  for step in (0, 1, 5, 9, 10, 15):
    _, metrics = step_fn(state._replace(step=jnp.int32(step)), batch, jax.random.key(1))
    expected = beta * min(1.0, step / 10)
    assert float(metrics["beta"]) == pytest.approx(expected, rel=1e-6, abs=1e-7), step
    # The loss is the negative ELBO with that KL weight.
    assert float(metrics["kl"]) > 0
    assert float(metrics["loss"]) == pytest.approx(
      -float(metrics["reconstruction"]) + expected * float(metrics["kl"]), rel=1e-5
    ), step


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"objective": "iwae", "kl_warmup_epochs": 1.0}, r"config\.kl_warmup_epochs"),
    ({"objective": "autoencoder", "kl_warmup_epochs": 1.0}, r"config\.kl_warmup_epochs"),
    ({"kl_warmup_epochs": -1.0}, r"config\.kl_warmup_epochs"),
    ({"free_bits": -0.5}, r"config\.free_bits"),
    ({"validation_examples": -1}, r"config\.validation_examples"),
    (
      {"validation_examples": 100, "early_stopping_patience_epochs": -1},
      r"config\.early_stopping_patience_epochs",
    ),
    ({"early_stopping_patience_epochs": 3}, r"needs a validation split.*config\.validation_ex"),
  ],
)
def test_validate_config_rejects_bad_training_aids(overrides, message):
  config = _base(**overrides)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


@pytest.mark.parametrize("objective", ["iwae", "autoencoder"])
def test_free_bits_needs_the_elbo_objective(objective):
  config = _base(objective=objective, free_bits=0.5)
  with pytest.raises(ValueError, match=r"config\.free_bits.*config\.objective='elbo'"):
    config_lib.validate(config)
  config.free_bits = 0.0  # The same config without free bits is valid and builds.
  config_lib.validate(config)
  trainer_lib.build_trainer(config, EVENT_SHAPE, 400)


def test_valid_training_aids_pass():
  config = _base(
    kl_warmup_epochs=2.0, free_bits=0.1, validation_examples=100, early_stopping_patience_epochs=3
  )
  config_lib.validate(config)
  trainer_lib.build_trainer(config, EVENT_SHAPE, 300)


# --------------------------------------------------------------------------
# 4. The validation split.


# --------------------------------------------------------------------------
# 5. Early stopping, end to end.


@pytest.fixture(scope="module")
def early_stopped_run(tfds_dir, tmp_path_factory):
  """A run that stops early: 300 training digits (9 steps per epoch), validation every
  2 epochs, patience 1 epoch, at most 6 epochs. Adam at learning rate 0 leaves the
  parameters unchanged, so the first validation ELBO (step 18) is never beaten and
  the evaluation at step 36 stops the run. ``snapshot`` is a copy of the finished workdir."""
  config = _load_config_module("mnist").get_config("smoke")
  config.data_dir = tfds_dir
  config.progress_bar = False
  config.validation_examples = 100
  config.early_stopping_patience_epochs = 1
  config.eval_every_steps = 18
  config.num_epochs = 6
  config.keep_checkpoints = 5
  config.optimizer.learning_rate = 0.0
  config.num_image_samples = 0
  root = tmp_path_factory.mktemp("early_stopping")
  state = train.train_and_evaluate(config, str(root / "run"))
  shutil.copytree(root / "run", root / "snapshot")
  return {"config": config, "state": state, "workdir": root / "run", "snapshot": root / "snapshot"}


def test_early_stopping_end_to_end(early_stopped_run):
  config, state, workdir = (early_stopped_run[k] for k in ("config", "state", "workdir"))
  assert int(state.step) == 36 < config.num_epochs * 9
  assert _steps(workdir / workdir_lib.BEST) == [18]
  assert _steps(workdir / "checkpoints") == [9, 18, 27, 36]
  rows = writers.read_metrics(workdir / "metrics.jsonl")
  val = [r for r in rows if r["split"] == "validation"]
  assert [r["step"] for r in val] == [18, 36]
  assert val[0]["elbo"] == val[1]["elbo"] and val[0]["neg_elbo"] == -val[0]["elbo"]
  assert max(r["step"] for r in rows) == 36

  # Again, even with more epochs allowed: the run is over, nothing trains or is written.
  again = config.copy_and_resolve_references()
  again.num_epochs = 8
  resumed = train.train_and_evaluate(again, str(workdir))
  assert int(resumed.step) == 36
  assert _steps(workdir / "checkpoints") == [9, 18, 27, 36]
  assert writers.read_metrics(workdir / "metrics.jsonl") == rows

  # A later, different checkpoint: evaluation still reads the best one.
  later = state._replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
  checkpointer.save(45, later)
  checkpointer.close()
  _, (target,) = evaluate.restore_targets(again, workdir, EVENT_SHAPE, 300)
  step, params = target.step, target.params
  assert step == 18
  _assert_trees_equal(params, state.params)

  results = evaluate.evaluate_workdir(again, workdir, num_samples=2, batch_size=50)
  assert results["checkpoint_step"] == 18
  assert (workdir / "eval" / "step_00000018_k2.json").is_file()
  assert results["train"]["num_examples"] == 300  # The validation split is held out.
  assert math.isfinite(results["test"]["log_likelihood"]["nll_nats"])


def test_early_stopped_run_killed_between_evaluations_resumes_like_uninterrupted(
  early_stopped_run, tmp_path
):
  """Killed after the checkpoint of step 27 (patience already spent, but no evaluation
  since step 18): the uninterrupted run went on to its evaluation at step 36."""
  workdir = tmp_path / "run"
  shutil.copytree(early_stopped_run["snapshot"], workdir)
  shutil.rmtree(workdir / "checkpoints" / "36")
  state = train.train_and_evaluate(early_stopped_run["config"], str(workdir))
  assert int(state.step) == 36, (
    f"resumed at step 27, the run stopped at step {int(state.step)} without evaluating; "
    "the uninterrupted run evaluated and stopped at step 36"
  )
  val = [r for r in writers.read_metrics(workdir / "metrics.jsonl") if r["split"] == "validation"]
  assert [r["step"] for r in val] == [18, 36]


# --------------------------------------------------------------------------
# 6. Dequantized data.


def test_dequantize_adds_uniform_noise_within_each_pixel_bin():
  pixels = jnp.tile(jnp.arange(256, dtype=jnp.uint8), 64).reshape(64, 16, 16, 1)
  x = input_pipeline.preprocess(pixels, "dequantize", jax.random.key(0))
  assert x.dtype == jnp.float32 and x.shape == pixels.shape
  p = np.asarray(pixels, np.float64)
  u = np.asarray(x, np.float64) * 256 - p  # Exact: a power-of-two scale.
  assert u.min() >= 0 and u.max() <= 1
  assert np.mean(u) == pytest.approx(0.5, abs=0.01)
  assert np.mean(u < 0.25) == pytest.approx(0.25, abs=0.01)
  assert np.mean(u[0] != u[1]) > 0.99  # Noise per pixel: equal pixels, other noise.
  again = input_pipeline.preprocess(pixels, "dequantize", jax.random.key(0))
  np.testing.assert_array_equal(x, again)
  other = np.asarray(input_pipeline.preprocess(pixels, "dequantize", jax.random.key(1)))
  assert np.mean(other != np.asarray(x)) > 0.99  # Fresh noise for another key.
  assert np.all(np.floor(other * 256) <= p) and np.all(np.floor(other * 256) >= p - 1)
  with pytest.raises(ValueError, match="key"):
    input_pipeline.preprocess(pixels, "dequantize")


def test_dequantized_eval_images_are_fixed():
  pixels = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
  a = np.asarray(input_pipeline.eval_images(pixels, "dequantize"))
  b = np.asarray(input_pipeline.eval_images(pixels, "dequantize"))
  np.testing.assert_array_equal(a, b)
  c = np.asarray(input_pipeline.eval_images(pixels, "dequantize", seed=1))
  assert np.mean(a != c) > 0.99
  u = a * 256 - pixels
  assert u.min() >= 0 and u.max() <= 1 and 0.45 < u.mean() < 0.55


# --------------------------------------------------------------------------
# 7. One run for parameter EMA and dequantized data, end to end (evaluation is
# slow on this machine, so both share a run): a learned-variance Gaussian on
# dequantized digits with an EMA, 12 steps, then 12 more at learning rate 0.

EMA_DECAY = 0.9


@pytest.fixture(scope="module")
def ema_dequantized_run(tfds_dir, tmp_path_factory):
  config = _load_config_module("mnist").get_config("smoke")
  config.data_dir = tfds_dir
  config.progress_bar = False
  config.model.likelihood = "gaussian_learned"
  config.binarization = "dequantize"
  config.optimizer.ema_decay = EMA_DECAY
  config.num_epochs = 1  # 12 steps.
  config.num_image_samples = 0
  workdir = tmp_path_factory.mktemp("ema") / "run"
  first = train.train_and_evaluate(config, str(workdir))
  first_rows = writers.read_metrics(workdir / "metrics.jsonl")
  # Resumed with frozen parameters: from here the EMA follows a known recursion.
  frozen = config.copy_and_resolve_references()
  frozen.num_epochs = 2
  frozen.optimizer.learning_rate = 0.0
  second = train.train_and_evaluate(frozen, str(workdir), allow_config_change=True)
  return {
    "config": config,
    "frozen": frozen,
    "workdir": workdir,
    "first": first,
    "first_rows": first_rows,
    "second": second,
  }


def test_ema_is_evaluated_and_survives_the_checkpoint(ema_dequantized_run, tfds_dir):
  run = ema_dequantized_run
  config, first, second = run["config"], run["first"], run["second"]
  assert int(first.step) == 12 and int(second.step) == 24
  ema_12 = optim.eval_params(first.opt_state, first.params)
  assert ema_12 is first.opt_state[-1].ema
  assert _trees_differ(jax.device_get(ema_12), jax.device_get(first.params))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(first.params)))

  # The loop's test ELBO at step 12 is that of the EMA, not of the raw parameters.
  trainer = trainer_lib.build_trainer(config, EVENT_SHAPE, 400)
  data = datasets.load("mnist", tfds_dir)
  test_x = input_pipeline.eval_images(data["test"].images, config.binarization)
  key = trainer.keys[step_lib.KEY_EVAL]
  row = [r for r in run["first_rows"] if r["split"] == "test"][-1]
  assert row["step"] == 12
  assert row["elbo"] == pytest.approx(float(trainer.eval_fn(ema_12, test_x, key)["elbo"]), rel=1e-6)
  raw_elbo = float(trainer.eval_fn(first.params, test_x, key)["elbo"])
  assert row["elbo"] != pytest.approx(raw_elbo, rel=1e-6)

  # The resumed run went on from the step-12 EMA: with the parameters frozen at p,
  # ema_24 = d**12 * ema_12 + (1 - d**12) * p (a restarted EMA would be p).
  _assert_trees_equal(second.params, first.params)
  w = EMA_DECAY**12
  expected = jax.tree.map(
    lambda e, p: w * np.asarray(e, np.float64) + (1 - w) * np.asarray(p, np.float64),
    ema_12,
    first.params,
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    jax.device_get(optim.eval_params(second.opt_state, second.params)),
    expected,
  )

  # The checkpoint holds the EMA, and evaluation reads it rather than the parameters.
  step, restored = checkpointing.restore_read_only(
    run["workdir"] / "checkpoints", trainer.abstract_state()
  )
  assert step == 24 and isinstance(restored.opt_state[-1], optim.ParamEmaState)
  _assert_trees_equal(
    optim.eval_params(restored.opt_state, restored.params),
    optim.eval_params(second.opt_state, second.params),
  )
  _, (target,) = evaluate.restore_targets(run["frozen"], run["workdir"], EVENT_SHAPE, 400)
  step, params = target.step, target.params
  assert step == 24 and target.source == "ema"
  _assert_trees_equal(params, optim.eval_params(second.opt_state, second.params))
  assert _trees_differ(jax.device_get(params), jax.device_get(second.params))


def test_dequantized_gaussian_run_reports_8bit_bits_per_dim(ema_dequantized_run):
  run = ema_dequantized_run
  workdir = run["workdir"]
  results = evaluate.evaluate_workdir(run["frozen"], workdir, num_samples=2, batch_size=50)
  assert results["binarization"] == "dequantize" and results["checkpoint_step"] == 24
  ll = results["test"]["log_likelihood"]
  d = 784
  expected = (ll["nll_nats"] + d * math.log(256)) / (d * math.log(2))
  assert ll["bits_per_dim"] == pytest.approx(expected, rel=1e-12)
  assert ll["bits_per_dim"] > 0  # An upper bound on -log2 of a probability.
  assert "dequantized density" in ll["bits_per_dim_note"]
  saved = json.loads((workdir / "eval" / "step_00000024_k2.json").read_text())
  assert saved["test"]["log_likelihood"]["bits_per_dim"] == ll["bits_per_dim"]


def test_best_checkpoint_not_from_this_runs_past_is_set_aside(tmp_path):
  """A best saved after the resumed step (or left by another run) is moved aside, kept."""
  mesh = step_lib.make_mesh(1)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = {"w": jax.device_put(jnp.arange(3.0), sharding)}
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params
  )

  def make(workdir, resumed_step):
    return early_stopping.BestCheckpoint(
      workdir / "best", abstract, sharding, resumed_step=resumed_step
    )

  for resumed in (10, None):  # Resumed before the best was saved; a fresh run.
    workdir = tmp_path / str(resumed)
    best = make(workdir, None)
    assert best.update(20, -100.0, params) and not best.update(30, -101.0, params)
    best.close()
    kept = make(workdir, 25)
    assert (kept.step, float(kept.elbos)) == (20, -100.0)
    kept.close()

    stale = make(workdir, resumed)
    assert (stale.step, float(stale.elbos)) == (-1, -float("inf"))
    assert stale.update(5, -200.0, params)  # A worse value wins: the stale one is not used.
    stale.close()
    (aside,) = workdir.glob("best_superseded_*")
    assert (aside / "20").is_dir()  # Kept, not deleted.
    final = make(workdir, 5)
    assert final.step == 5
    final.close()


def test_sweep_best_checkpoint_keeps_each_models_best(tmp_path):
  """Stacked: each model's best parameters and step, replaced only where that model improved."""
  mesh = step_lib.make_mesh(1)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32, sharding=sharding)}

  def params(value):
    return {"w": jax.device_put(jnp.full((3, 2), value), sharding)}

  best = early_stopping.BestCheckpoint(tmp_path / "best", abstract, sharding, None, num_models=3)
  assert list(best.update(1, np.array([-10.0, -20.0, -30.0]), params(1.0))) == [True] * 3
  better = best.update(2, np.array([-11.0, -19.0, np.nan]), params(2.0))
  assert list(better) == [False, True, False]  # NaN never wins.
  assert list(best.steps) == [1, 2, 1] and best.step == 1
  best.close()
  again = early_stopping.BestCheckpoint(tmp_path / "best", abstract, sharding, 2, num_models=3)
  np.testing.assert_array_equal(again.steps, [1, 2, 1])
  np.testing.assert_array_equal(again.elbos, [-10.0, -19.0, -30.0])
  np.testing.assert_array_equal(again._params["w"][:, 0], [1.0, 2.0, 1.0])
  again.close()


@pytest.mark.parametrize(
  ("best_steps", "step", "expected"),
  [
    ([10], 59, False),  # 49 epochs since the best.
    ([10], 60, True),
    ([0], 100, False),  # The best came during the warm-up (100): patience from its end.
    ([0], 150, True),
    ([10, 40], 60, False),  # A sweep stops when every model is out of patience.
    ([10, 40], 90, True),
  ],
)
def test_patience_counts_from_the_best_but_not_from_before_the_warmup(best_steps, step, expected):
  warmup_end = 100 if best_steps == [0] else 0
  assert early_stopping.patience_exhausted(step, np.array(best_steps), warmup_end, 50) is expected
