"""Sweeps: model i is its single run, resume is exact, one compile, sharding on many devices."""

import functools
import json
import pathlib
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import process_env

from vae_jax import (
  checkpointing,
  input_pipeline,
  loop,
  models,
  objectives,
  sweep,
  train,
  trainer,
  writers,
)
from vae_jax import config as config_lib
from vae_jax import step as step_lib
from vae_jax import workdir as workdir_lib


def _loss(model, beta, num_samples, objective="elbo", **options):
  """``objectives.make_loss_fn`` of these options; ``step`` defaults to 0."""
  fn = objectives.make_loss_fn(model, objectives.Spec(objective, num_samples, **options), beta)
  return lambda params, x, key, step=0: fn(params, x, key, jnp.asarray(step, jnp.int32))


REPO = pathlib.Path(__file__).parents[1]


def _sweep_config(smoke_config, betas=(0.5, 1.0, 4.0), seeds=(0, 0, 3)):
  config = smoke_config
  config.num_image_samples = 0
  config.sweep.betas, config.sweep.seeds = betas, seeds
  return config


def _single_run_with_sweep_data(config, beta, seed):
  """A single model trained by the single run's chunk: its init/eps keys from ``seed``,
  data keys (shuffle, binarize) from ``config.seed``, as the sweep defines them."""
  splits = input_pipeline.load_splits(config)
  single = config.copy_and_resolve_references()
  single.beta, single.seed, single.sweep.betas = beta, seed, ()
  built = trainer.build_trainer(single, splits.event_shape, splits.num_train)
  data_keys = trainer.build_trainer(config, splits.event_shape, splits.num_train)
  feed = data_keys.feed(config, splits, None)  # config.seed's data stream.
  chunk = built.make_chunk(feed.batch)
  state = built.init_state()
  total = config.num_epochs * built.steps_per_epoch
  step = 0
  while step < total:
    n = min(total - step, built.chunk_len)
    state, _ = chunk(state, feed.inputs(step, n), n, built.keys[step_lib.KEY_EPS])
    step += n
  return state


def test_each_model_is_its_single_run_and_resume_is_exact(smoke_config, tmp_path):
  config = _sweep_config(smoke_config)
  state = sweep.train_sweep(config, str(tmp_path / "sweep"))
  steps = config.num_epochs * (400 // config.batch_size)
  assert int(state.step) == steps
  np.testing.assert_array_equal(np.asarray(state.models.step), [steps] * 3)

  # Model 1 (beta=1, seed=0 == config.seed) is exactly train_and_evaluate's run.
  single_config = config.copy_and_resolve_references()
  single_config.beta = 1.0
  single_config.sweep.betas = ()
  single = train.train_and_evaluate(single_config, str(tmp_path / "single"))
  chex.assert_trees_all_close(
    sweep.model_state(state, 1).params, single.params, rtol=1e-5, atol=1e-6
  )
  chex.assert_trees_all_close(
    sweep.model_state(state, 1).opt_state, single.opt_state, rtol=1e-5, atol=1e-6
  )
  # Its test ELBOs, logged by the sweep, match the single run's.
  sweep_rows = writers.read_metrics(tmp_path / "sweep/models/beta_1_seed_0/metrics.jsonl")
  single_rows = writers.read_metrics(tmp_path / "single/metrics.jsonl")
  sweep_test = [(r["step"], r["elbo"]) for r in sweep_rows if r["split"] == "test"]
  single_test = [(r["step"], r["elbo"]) for r in single_rows if r["split"] == "test"]
  assert [s for s, _ in sweep_test] == [s for s, _ in single_test]
  np.testing.assert_allclose([e for _, e in sweep_test], [e for _, e in single_test], rtol=1e-5)

  # Model 2 (beta=4, seed=3): the single run of seed 3 with the sweep's data stream.
  ref = _single_run_with_sweep_data(config, 4.0, 3)
  chex.assert_trees_all_close(sweep.model_state(state, 2).params, ref.params, rtol=1e-5, atol=1e-6)
  # Models differ from each other (beta and seed matter).
  p = state.models.params["decoder"]
  assert not np.allclose(jax.tree.leaves(p)[0][0], jax.tree.leaves(p)[0][1])

  # Resume: one epoch, stop, then the same command with two epochs.
  half = config.copy_and_resolve_references()
  half.num_epochs = 1
  sweep.train_sweep(half, str(tmp_path / "resumed"))
  resumed = sweep.train_sweep(config, str(tmp_path / "resumed"))
  chex.assert_trees_all_equal(resumed, state)
  rows = writers.read_metrics(tmp_path / "resumed/models/beta_4_seed_3/metrics.jsonl")
  keys = [(r["step"], r["split"]) for r in rows]
  assert len(keys) == len(set(keys))
  full_rows = writers.read_metrics(tmp_path / "sweep/models/beta_4_seed_3/metrics.jsonl")
  assert [r for r in rows if r["split"] == "test"] == [r for r in full_rows if r["split"] == "test"]


def test_sweep_chunk_compiles_once_for_any_chunk_length(smoke_config):
  config = _sweep_config(smoke_config)
  splits = input_pipeline.load_splits(config)
  built = sweep.build_sweep_trainer(config, splits.event_shape, splits.num_train)
  feed = built.base.feed(config, splits, built.sharding())
  chunk = built.base.make_chunk(feed.batch, built.sweep_step)
  state = built.init_state()
  for n in (3, 4, 1, 7):  # Partial chunks and an epoch boundary.
    state, metrics = sweep.run_steps(built, state, feed, n, chunk)
  assert int(state.step) == 15
  assert metrics["loss"].shape == (built.base.chunk_len, 3)
  assert chunk._cache_size() == 1


def test_bad_sweep_grids_are_clear_errors(smoke_config):
  config = _sweep_config(smoke_config, betas=(1.0, 2.0), seeds=(0, 1, 2))
  with pytest.raises(ValueError, match="one seed"):
    config_lib.sweep_grid(config)
  config.sweep.seeds, config.sweep.betas = (0,), (1.0, -1.0)
  with pytest.raises(ValueError, match=">= 0"):
    config_lib.validate(config)
  config.sweep.betas = (1.0, 1.0)
  with pytest.raises(ValueError, match="repeated"):
    config_lib.validate(config)
  config.sweep.betas = ()
  with pytest.raises(ValueError, match="empty"):
    config_lib.sweep_grid(config)


_SHARDED = """
import json, sys
import jax, chex, ml_collections
sys.path.insert(0, {tests!r})
from test_sweep import _single_run_with_sweep_data
from vae_jax import input_pipeline, sweep


config = ml_collections.ConfigDict(json.loads({config!r}))
config.model.encoder_hidden = tuple(config.model.encoder_hidden)
config.num_epochs = 1
config.sweep.betas, config.sweep.seeds = (0.5, 4.0), (0,)
for k in ("encoder_hidden", "conv_features", "top_hidden"):
  config.model[k] = tuple(config.model[k])
config.sweep.betas, config.sweep.seeds = tuple(config.sweep.betas), tuple(config.sweep.seeds)
splits = input_pipeline.load_splits(config)
trainer = sweep.build_sweep_trainer(config, splits.event_shape, splits.num_train)
state = trainer.init_state()
feed = trainer.base.feed(config, splits, trainer.sharding())
state, _ = sweep.run_steps(trainer, state, feed, 12)
ref = _single_run_with_sweep_data(config, 4.0, 0)
# Batch-sharded gradients are summed in another order: equal to float tolerance.
chex.assert_trees_all_close(sweep.model_state(state, 1).params, ref.params, rtol=1e-4, atol=1e-5)
kernel = state.models.params["encoder"]["mean"]["kernel"]
print("RESULT" + json.dumps({{
  "devices": jax.device_count(),
  "mesh": dict(trainer.mesh.shape),
  "spec": str(kernel.sharding.spec),
  "shard_shapes": sorted({{tuple(s.data.shape) for s in kernel.addressable_shards}}),
  "mesh_4_models": dict(sweep.sweep_mesh(4, 32).shape),
  "mesh_3_models": dict(sweep.sweep_mesh(3, 32).shape),
}}))
"""


def test_model_and_batch_axes_are_sharded_over_host_devices(smoke_config):
  config = _sweep_config(smoke_config)
  code = _SHARDED.format(tests=str(REPO / "tests"), config=config.to_json())
  env = process_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT")[-1])
  assert out["devices"] == 4
  # 2 models on 4 devices: the model axis on 2, each batch split over the other 2.
  assert out["mesh"] == {"model": 2, "batch": 2}
  assert "'model'" in out["spec"]
  assert out["shard_shapes"] == [[1, 16, 2]]  # [models, hidden, latents] per device.
  assert out["mesh_4_models"] == {"model": 4, "batch": 1}  # One model per device.
  assert out["mesh_3_models"] == {"model": 1, "batch": 4}  # gcd(3, 4) = 1.


def _tiny_model_and_state(num_models=2):
  model = models.make_mlp_vae(event_shape=(28, 28, 1), latents=2, encoder_hidden=(8,))
  optimizer = optax.adam(1e-3)
  init = functools.partial(step_lib.initial_state, model, optimizer, event_shape=(28, 28, 1))
  keys = jax.random.split(jax.random.key(0), num_models)
  state = sweep.SweepState(jnp.zeros((), jnp.int32), jax.jit(jax.vmap(init))(keys))
  batch = jax.random.bernoulli(jax.random.key(1), 0.3, (8, 28, 28, 1)).astype(jnp.float32)
  return model, optimizer, state, batch


def _at_step(state, step):
  models = state.models._replace(step=jnp.full_like(state.models.step, step))
  return sweep.SweepState(jnp.int32(step), models)


def test_kl_warmup_and_capacity_are_the_single_runs_step_with_each_models_beta():
  """The sweep step is the single run's step (objectives.make_loss_fn with the same
  schedule), vmapped with each model's beta: warm-up and capacity over steps included."""
  model, optimizer, state, batch = _tiny_model_and_state()
  betas, eps = jnp.array([1.0, 4.0]), jax.random.split(jax.random.key(2), 2)
  keys = sweep.SweepKeys(eps, betas, {})
  specs = {
    "warmup": objectives.Spec(warmup_steps=4),
    "capacity": objectives.Spec(capacity_nats=3.0, capacity_steps=6),
  }
  for name, spec in specs.items():
    trainer = types.SimpleNamespace(
      loss_fn=lambda beta, hyper, spec=spec: objectives.make_loss_fn(model, spec, beta, hyper),
      optimizer_for=lambda hyper: optimizer,
    )
    swept = jax.jit(sweep.make_sweep_step(trainer))

    @jax.jit
    def single(state, beta, key, spec=spec):  # The single run's step, beta traced.
      loss_fn = objectives.make_loss_fn(model, spec, beta)
      return step_lib.make_train_step(loss_fn, optimizer)(state, batch, key)

    for step, scale, c in [(0, 0.0, 0.0), (2, 0.5, 1.0), (4, 1.0, 2.0), (9, 1.0, 3.0)]:
      at = _at_step(state, step)
      got, metrics = swept(at, batch, keys)
      for i in range(2):
        want, want_metrics = single(sweep.model_state(at, i), betas[i], eps[i])
        chex.assert_trees_all_close(sweep.model_state(got, i), want, rtol=1e-5, atol=1e-6)
        if name == "warmup":
          np.testing.assert_allclose(metrics["beta"][i], betas[i] * scale, rtol=1e-6)
        else:
          np.testing.assert_allclose(metrics["capacity"][i], c, rtol=1e-6)
    assert swept._cache_size() == 1


def test_capacity_loss_is_rec_plus_gamma_times_distance_to_capacity():
  model, _, state, batch = _tiny_model_and_state(1)
  params, key = sweep.model_state(state, 0).params, jax.random.key(3)
  _, m = jax.jit(_loss(model, 1.0, 1))(params, batch, key)
  spec = objectives.Spec(capacity_nats=10.0, capacity_steps=10)
  capacity_loss = jax.jit(objectives.make_loss_fn(model, spec, 7.0))
  for step in (0, 3, 10, 20):
    capacity = 10.0 * min(1.0, step / 10)
    loss, got = capacity_loss(params, batch, key, jnp.int32(step))
    want = -m["reconstruction"] + 7.0 * abs(m["kl"] - capacity)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(got["elbo"]), float(m["elbo"]), rtol=1e-6)
    np.testing.assert_allclose(float(got["capacity"]), capacity, rtol=1e-6)


def test_non_finite_model_stops_the_sweep_before_saving(smoke_config, tmp_path):
  config = _sweep_config(smoke_config, betas=(1.0, 2.0), seeds=(0,))
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 1e30
  config.checkpoint_every_steps = config.log_every_steps = 1
  with pytest.raises(
    loop.NonFiniteError, match=r"at step \d+ in model beta_\S+ \(beta=|state at step \d+ holds NaN"
  ):
    sweep.train_sweep(config, str(tmp_path / "run"))
  steps = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit())
  restored = checkpointing.Checkpointer(tmp_path / "run/checkpoints")
  _, state = restored.restore_latest(None) if steps else (None, None)
  restored.close()
  if state is not None:
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_main_command_trains_evaluates_and_reports_a_sweep(tfds_dir, tmp_path):
  """``python -m vae_jax.main`` with a sweep config trains every model, resumes, evaluates
  each with --mode=evaluate, and experiments/beta_sweep.py reports them."""
  workdir = tmp_path / "sweep"
  common = [
    "--config=configs/beta_sweep.py:smoke",
    "--config.dataset=mnist",
    f"--config.data_dir={tfds_dir}",
    "--config.progress_bar=False",
    f"--workdir={workdir}",
  ]

  def main(*args):
    cmd = [sys.executable, "-m", "vae_jax.main", *common, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr

  main()
  names = ("beta_0.5_seed_0", "beta_4_seed_0")
  for name in names:
    rows = writers.read_metrics(workdir / "models" / name / "metrics.jsonl")
    assert {r["split"] for r in rows} == {"train", "test"}
  assert workdir_lib.read_record(workdir).sweep.betas == (0.5, 4.0)
  assert "Resumed from checkpoint 12" in main("--config.num_epochs=2")
  main("--mode=evaluate", "--eval_num_samples=3")
  for name, beta in zip(names, (0.5, 4.0), strict=True):
    saved = json.loads((workdir / "models" / name / "eval" / "step_00000024_k3.json").read_text())
    assert (saved["beta"], saved["seed"], saved["checkpoint_step"]) == (beta, 0, 24)
    assert (workdir / "models" / name / "figures" / "traversals_00000024.pdf").is_file()
  out, docs = tmp_path / "out", tmp_path / "docs"
  report = [
    sys.executable,
    "experiments/beta_sweep.py",
    f"--workdir={workdir}",
    f"--data_dir={tfds_dir}",
    f"--out_dir={out}",
    f"--docs_dir={docs}",
  ]
  proc = subprocess.run(report, cwd=REPO, capture_output=True, text=True, env=process_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((out / "results.json").read_text())["models"]
  assert [r["beta"] for r in rows] == [0.5, 4.0]
  for name in ("rate_distortion", "metrics", "traversals"):
    assert (docs / f"beta_sweep_{name}.pdf").is_file(), name
  assert "| 0.5 | 0 |" in (docs / "beta_sweep_table.md").read_text()


def test_sweep_records_its_config_only_after_its_checkpoints_restored(smoke_config, tmp_path):
  config = _sweep_config(smoke_config, betas=(1.0, 2.0), seeds=(0,))
  config.num_epochs = 1
  sweep.train_sweep(config, str(tmp_path / "run"))
  record = (tmp_path / "run" / "config.json").read_text()
  bigger = config.copy_and_resolve_references()
  bigger.model.latents = 3
  with pytest.raises(checkpointing.CheckpointError, match="does not match"):
    sweep.train_sweep(bigger, str(tmp_path / "run"), allow_config_change=True)
  assert (tmp_path / "run" / "config.json").read_text() == record


def test_a_crossed_grid_has_every_beta_with_every_seed(smoke_config):
  config = _sweep_config(smoke_config, betas=(1.0, 4.0, 8.0), seeds=(0, 1))
  with pytest.raises(ValueError, match="one seed"):
    config_lib.sweep_grid(config)
  config.sweep.cross = True
  betas, seeds = config_lib.sweep_grid(config)
  assert list(zip(betas, seeds, strict=True)) == [
    (1.0, 0), (4.0, 0), (8.0, 0), (1.0, 1), (4.0, 1), (8.0, 1)
  ]  # fmt: skip
