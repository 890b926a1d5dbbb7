"""Sweeps: model i is its single run, resume is exact, one compile, sharding on many devices."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vae_jax import input_pipeline, losses, models, pictures, sweep, train, writers

REPO = pathlib.Path(__file__).parents[1]


def _sweep_config(smoke_config, betas=(0.5, 1.0, 4.0), seeds=(0, 0, 3)):
  config = smoke_config
  config.num_image_samples = 0
  config.sweep = ml_collections.ConfigDict({"betas": betas, "seeds": seeds})
  return config


def _single_run_with_sweep_data(config, beta, seed):
  """A single model trained by train's own chunk: its init/eps keys from ``seed``, data
  keys (shuffle, binarize) from ``config.seed``, as the sweep defines them."""
  data = input_pipeline.load_dataset(config.dataset, config.data_dir)
  images = jax.device_put(data["train"].images)
  single = config.copy_and_resolve_references()
  single.beta, single.seed = beta, seed
  trainer = train.build_trainer(single, images.shape[1:], images.shape[0])
  data_keys = sweep.model_keys(config.seed)
  state = trainer.init_state()
  total = config.num_epochs * trainer.steps_per_epoch
  step = 0
  while step < total:
    n = min(total - step, trainer.chunk_len)
    epoch = step // trainer.steps_per_epoch
    perms = jnp.stack(
      [
        train.epoch_permutation(data_keys[train.KEY_SHUFFLE], e, images.shape[0])
        for e in (epoch, epoch + 1)
      ]
    )
    state, _ = trainer.train_chunk(
      state, images, perms, epoch, n, trainer.keys[train.KEY_EPS], data_keys[train.KEY_BINARIZE]
    )
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
  del single_config["sweep"]
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
  data = input_pipeline.load_dataset(config.dataset, config.data_dir)
  images = jax.device_put(data["train"].images)
  trainer = sweep.build_sweep_trainer(config, images.shape[1:], images.shape[0])
  state = trainer.init_state()
  for n in (3, 4, 1, 7):  # Partial chunks and an epoch boundary.
    state, pending = sweep.run_steps(trainer, state, images, n)
  assert int(state.step) == 15
  assert pending[-1][2]["loss"].shape == (trainer.base.chunk_len, 3)
  assert trainer.sweep_chunk._cache_size() == 1


def test_bad_sweep_grids_are_clear_errors(smoke_config):
  config = _sweep_config(smoke_config, betas=(1.0, 2.0), seeds=(0, 1, 2))
  with pytest.raises(ValueError, match="one seed"):
    sweep.sweep_grid(config)
  config.sweep.seeds, config.sweep.betas = (0,), (1.0, -1.0)
  with pytest.raises(ValueError, match=">= 0"):
    sweep.sweep_grid(config)
  del config["sweep"]
  with pytest.raises(ValueError, match="configs/beta_sweep.py"):
    sweep.sweep_grid(config)


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
data = input_pipeline.load_dataset(config.dataset, config.data_dir)
images = data["train"].images
trainer = sweep.build_sweep_trainer(config, images.shape[1:], images.shape[0])
state = trainer.init_state()
state, _ = sweep.run_steps(trainer, state, trainer.replicated(images), 12)
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
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
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


def test_rate_distortion_plot_draws_points_and_elbo_lines():
  image = pictures.rate_distortion_plot(
    np.array([2.0, 10.0, 25.0]),
    np.array([300.0, 260.0, 240.0]),
    ["16", "1", "0.25"],
    title="test",
  )
  assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
  coloured = np.any(image != image[..., :1], axis=-1)  # Non-grey pixels: points and lines.
  assert coloured.sum() > 50


def _tiny_model_and_state(num_models=2):
  model = models.make_mlp_vae(event_shape=(28, 28, 1), latents=2, encoder_hidden=(8,))
  optimizer = optax.adam(1e-3)
  ll_fn = functools.partial(losses.bernoulli_log_likelihood, event_ndims=3)
  init = functools.partial(train.initial_state, model, optimizer, event_shape=(28, 28, 1))
  keys = jax.random.split(jax.random.key(0), num_models)
  state = sweep.SweepState(jnp.zeros((), jnp.int32), jax.jit(jax.vmap(init))(keys))
  batch = jax.random.bernoulli(jax.random.key(1), 0.3, (8, 28, 28, 1)).astype(jnp.float32)
  return model, optimizer, ll_fn, state, batch


def _at_step(state, step):
  models = state.models._replace(step=jnp.full_like(state.models.step, step))
  return sweep.SweepState(jnp.int32(step), models)


def test_kl_warmup_and_capacity_are_the_core_step_with_a_scheduled_loss():
  model, optimizer, ll_fn, state, batch = _tiny_model_and_state()
  betas, eps = jnp.array([1.0, 4.0]), jax.random.split(jax.random.key(2), 2)
  keys = sweep.SweepKeys(eps, betas)

  @jax.jit
  def core_step(state, beta, key):  # The single-run step, beta traced: one compile.
    loss_fn = train.make_loss_fn(model, ll_fn, beta, 1)
    return train.make_train_step(loss_fn, optimizer)(state, batch, key)

  @jax.jit
  def capacity_step(state, gamma, capacity, key):
    loss_fn = sweep.make_capacity_loss_fn(model, ll_fn, gamma, capacity, 1)
    return train.make_train_step(loss_fn, optimizer)(state, batch, key)

  warmup = jax.jit(
    sweep.make_sweep_step(
      model, ll_fn, optimizer, num_samples=1, schedule=sweep.Schedule("warmup", warmup_steps=4)
    )
  )
  capacity = jax.jit(
    sweep.make_sweep_step(
      model,
      ll_fn,
      optimizer,
      num_samples=1,
      schedule=sweep.Schedule("capacity", capacity_nats=3.0, capacity_steps=6),
    )
  )
  for step, scale, c in [(0, 0.0, 0.0), (2, 0.5, 1.0), (4, 1.0, 2.0), (9, 1.0, 3.0)]:
    at = _at_step(state, step)
    got_w, _ = warmup(at, batch, keys)
    got_c, metrics_c = capacity(at, batch, keys)
    np.testing.assert_allclose(np.asarray(metrics_c["capacity"]), [c, c], rtol=1e-6)
    for i in range(2):
      want_w, _ = core_step(sweep.model_state(at, i), betas[i] * scale, eps[i])
      chex.assert_trees_all_close(sweep.model_state(got_w, i), want_w, rtol=1e-5, atol=1e-6)
      want_c, _ = capacity_step(sweep.model_state(at, i), betas[i], c, eps[i])
      chex.assert_trees_all_close(sweep.model_state(got_c, i), want_c, rtol=1e-5, atol=1e-6)
  assert warmup._cache_size() == 1 and capacity._cache_size() == 1


def test_capacity_loss_is_rec_plus_gamma_times_distance_to_capacity():
  model, _, ll_fn, state, batch = _tiny_model_and_state(1)
  params, key = sweep.model_state(state, 0).params, jax.random.key(3)
  _, m = jax.jit(train.make_loss_fn(model, ll_fn, 1.0, 1))(params, batch, key)

  @jax.jit
  def capacity_loss(capacity):
    return sweep.make_capacity_loss_fn(model, ll_fn, 7.0, capacity, 1)(params, batch, key)

  for capacity in (0.0, 0.5 * float(m["kl"]), 2.0 * float(m["kl"]) + 1.0):
    loss, got = capacity_loss(capacity)
    want = -m["reconstruction"] + 7.0 * abs(m["kl"] - capacity)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(got["elbo"]), float(m["elbo"]), rtol=1e-6)


def test_schedule_config_errors(smoke_config):
  config = _sweep_config(smoke_config)
  config.sweep.schedule = "cyclic"
  with pytest.raises(ValueError, match="Unknown config.sweep.schedule 'cyclic'"):
    sweep.sweep_schedule(config)
  config.sweep.schedule, config.sweep.warmup_steps = "warmup", 0
  with pytest.raises(ValueError, match="warmup_steps"):
    sweep.sweep_schedule(config)


def test_non_finite_model_stops_the_sweep_before_saving(smoke_config, tmp_path):
  config = _sweep_config(smoke_config, betas=(1.0, 2.0), seeds=(0,))
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 1e30
  config.checkpoint_every_steps = config.log_every_steps = 1
  with pytest.raises(train.NonFiniteError, match=r"at step \d+ in model \d \(beta="):
    sweep.train_sweep(config, str(tmp_path / "run"))
  steps = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit())
  restored = sweep.checkpointing.Checkpointer(tmp_path / "run/checkpoints")
  _, state = restored.restore_latest(None) if steps else (None, None)
  restored.close()
  if state is not None:
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
