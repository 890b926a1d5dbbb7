"""Training: one compile, chunk == steps, end-to-end outputs, exact resume, NaN stop."""

import json
import pathlib
import platform
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import process_env
from PIL import Image

from vae_jax import (
  checkpointing,
  execution,
  input_pipeline,
  loop,
  losses,
  models,
  objectives,
  optim,
  process,
  train,
  trainer,
  writers,
)
from vae_jax import config as config_lib
from vae_jax import step as step_lib
from vae_jax.input_pipeline import preprocess


def _loss(model, beta, num_samples, objective="elbo", **options):
  """``objectives.make_loss_fn`` of these options; ``step`` defaults to 0."""
  fn = objectives.make_loss_fn(model, objectives.Spec(objective, num_samples, **options), beta)
  return lambda params, x, key, step=0: fn(params, x, key, jnp.asarray(step, jnp.int32))


REPO = pathlib.Path(__file__).parents[1]


def _tiny_parts(batch_size=8, seed=0):
  model = models.make_mlp_vae(event_shape=(28, 28, 1), latents=2, encoder_hidden=(8,))
  optimizer = optax.adam(1e-3)
  loss_fn = _loss(model, 1.0, 1)
  state = step_lib.initial_state(model, optimizer, jax.random.key(seed), (28, 28, 1))
  return model, optimizer, loss_fn, state


def _batches(n, batch_size=8):
  return jax.random.bernoulli(jax.random.key(7), 0.3, (n, batch_size, 28, 28, 1)).astype(
    jnp.float32
  )


def test_train_step_compiles_once_and_donates_state():
  _, optimizer, loss_fn, state = _tiny_parts()
  step_fn = jax.jit(
    chex.assert_max_traces(step_lib.make_train_step(loss_fn, optimizer), n=1), donate_argnums=0
  )
  key = jax.random.key(3)
  for batch in _batches(5):
    old = state
    state, metrics = step_fn(state, batch, key)
  assert int(state.step) == 5
  assert np.isfinite(float(metrics["loss"]))
  assert old.params["encoder"]["mean"]["kernel"].is_deleted()  # Donated, not copied.


def test_eps_key_is_folded_with_the_step():
  """Same state, batch and key but another step number -> other noise -> other loss."""
  _, optimizer, loss_fn, state = _tiny_parts()
  step_fn = jax.jit(step_lib.make_train_step(loss_fn, optimizer))
  batch, key = _batches(1)[0], jax.random.key(0)
  _, m0 = step_fn(state, batch, key)
  _, m0_again = step_fn(state, batch, key)
  _, m5 = step_fn(state._replace(step=jnp.int32(5)), batch, key)
  assert float(m0["loss"]) == float(m0_again["loss"])
  assert float(m0["loss"]) != float(m5["loss"])


@pytest.mark.parametrize("chunk_len", [4, 1])  # 1: no loop around the step.
def test_chunk_equals_single_steps_and_compiles_once(chunk_len):
  _, optimizer, loss_fn, state = _tiny_parts()
  step = step_lib.make_train_step(loss_fn, optimizer)
  images = jax.random.randint(jax.random.key(1), (40, 28, 28, 1), 0, 256).astype(jnp.uint8)
  steps_per_epoch = 40 // 8
  shuffle_key, eps_key, bin_key = jax.random.key(2), jax.random.key(3), jax.random.key(4)
  feed = input_pipeline.DeviceFeed(
    images=images,
    batch_size=8,
    binarization="dynamic",
    binarize_key=bin_key,
    permutations=input_pipeline.Permutations(shuffle_key, 40),
  )
  chunk = step_lib.make_train_chunk(step, feed.batch, chunk_len=chunk_len)
  perms = [input_pipeline.epoch_permutation(shuffle_key, e, 40) for e in range(4)]

  # Reference: one jitted step at a time, batches built the documented way.
  ref = jax.tree.map(jnp.copy, state)
  ref_step = jax.jit(step)
  ref_losses = []
  for s in range(11):
    idx = perms[s // steps_per_epoch][(s % steps_per_epoch) * 8 : (s % steps_per_epoch + 1) * 8]
    batch = preprocess(images[idx], "dynamic", jax.random.fold_in(bin_key, s))
    ref, m = ref_step(ref, batch, eps_key)
    ref_losses.append(float(m["loss"]))

  # Chunks of 4, 1, 4, 2 steps: crossing epoch boundaries, partial chunks.
  got_losses, s = [], 0
  for n in (4, 1, 4, 2) if chunk_len == 4 else (1,) * 11:
    state, m = chunk(state, feed.inputs(s, n), n, eps_key)
    got_losses.extend(np.asarray(m["loss"][:n]).tolist())
    assert np.all(np.asarray(m["loss"][n:]) == 0)
    s += n
  assert int(state.step) == 11
  np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(state.params, ref.params, rtol=1e-5, atol=1e-6)
  assert chunk._cache_size() == 1


@pytest.mark.parametrize(
  "kind, platform, steps_per_dispatch, expected, unroll",
  [
    ("conv", "cpu", None, 1, True),  # The rule: one step, no loop (jax-ml/jax#12868).
    ("conv", "gpu", None, 100, False),
    ("mlp", "cpu", None, 100, False),
    ("conv", "cpu", 20, 20, True),  # An explicit number wins.
    ("mlp", "gpu", 7, 7, False),
  ],
)
def test_the_platform_decision_is_made_once_and_an_explicit_number_wins(
  kind, platform, steps_per_dispatch, expected, unroll
):
  config = config_lib.base_config()
  config.model.kind, config.steps_per_dispatch = kind, steps_per_dispatch
  plan = execution.plan(config, platform)
  assert (plan.steps_per_dispatch, plan.unroll_loops) == (expected, unroll)
  assert ("12868" in plan.reason) == (kind == "conv" and platform == "cpu")


def test_the_trainer_reads_the_plan_capped_at_an_epoch(smoke_config):
  smoke_config.steps_per_dispatch = None
  built = trainer.build_trainer(smoke_config, (28, 28, 1), 400)
  assert built.chunk_len == 12  # 100 by default, capped at the 12 steps of an epoch.
  smoke_config.model.kind = "conv"
  built = trainer.build_trainer(smoke_config, (28, 28, 1), 400)
  assert built.chunk_len == (1 if jax.devices()[0].platform == "cpu" else 12)
  assert built.plan == execution.plan(smoke_config)


def _checkpoint_steps(workdir):
  ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


def test_train_and_evaluate_writes_everything(smoke_config, tmp_path):
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(smoke_config, str(workdir))
  steps_per_epoch = 400 // smoke_config.batch_size
  assert int(state.step) == 2 * steps_per_epoch

  assert _checkpoint_steps(workdir) == [steps_per_epoch, 2 * steps_per_epoch]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["latents"] == 2 and saved["batch_size"] == 32

  rows = writers.read_metrics(workdir / "metrics.jsonl")
  test_rows = [r for r in rows if r["split"] == "test"]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in test_rows] == [steps_per_epoch, 2 * steps_per_epoch]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 24]
  for r in test_rows:
    assert r["elbo"] == pytest.approx(r["reconstruction"] - r["kl"], rel=1e-5)
    assert r["kl"] >= 0 and r["neg_elbo"] == -r["elbo"]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # It learns.
  assert all(r["examples_per_sec"] > 0 for r in train_rows)

  for name in ("prior_samples", "reconstructions"):
    png = workdir / "images" / f"{name}_{2 * steps_per_epoch:08d}.png"
    image = np.asarray(Image.open(png))
    assert image.ndim == 2 and image.shape[0] > 28 and image.shape[1] > 28
    assert image.std() > 0

  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("test/elbo")] == [steps_per_epoch, 2 * steps_per_epoch]
  assert acc.Scalars("test/elbo")[-1].value == pytest.approx(test_rows[-1]["elbo"], rel=1e-6)
  assert "prior_samples" in acc.Tags()["images"]


def test_resume_is_bit_exact(smoke_config, tmp_path):
  full = train.train_and_evaluate(smoke_config, str(tmp_path / "full"))

  half_config = smoke_config.copy_and_resolve_references()
  half_config.num_epochs = 1
  half = train.train_and_evaluate(half_config, str(tmp_path / "resumed"))
  assert int(half.step) == 12
  resumed = train.train_and_evaluate(smoke_config, str(tmp_path / "resumed"))

  assert int(resumed.step) == int(full.step)
  chex.assert_trees_all_equal(resumed.params, full.params)
  chex.assert_trees_all_equal(resumed.opt_state, full.opt_state)

  full_rows = writers.read_metrics(tmp_path / "full" / "metrics.jsonl")
  resumed_rows = writers.read_metrics(tmp_path / "resumed" / "metrics.jsonl")
  keys = [(r["step"], r["split"]) for r in resumed_rows]
  assert len(keys) == len(set(keys)), "a step was logged twice"
  assert keys == sorted(keys, key=lambda k: (k[0], k[1] == "test"))
  # Evaluations are identical; the interrupted run adds a train row at its end.
  assert [r for r in resumed_rows if r["split"] == "test"] == [
    r for r in full_rows if r["split"] == "test"
  ]
  assert {(r["step"], r["split"]) for r in full_rows} <= set(keys)
  assert (12, "train") in keys


def test_non_finite_loss_stops_before_checkpointing(smoke_config, tmp_path):
  config = smoke_config
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 1e30  # Diverges to inf/NaN within a few steps.
  config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  with pytest.raises(
    loop.NonFiniteError, match=r"Non-finite loss, gradient or update at step (\d+)"
  ) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  bad_step = int(e.value.args[0].split("at step ")[1].split(" ")[0])
  steps = _checkpoint_steps(tmp_path / "run")
  # The newest checkpoint is the state before the bad step (none if it was step 0),
  # and every one of them is finite.
  assert (not steps and bad_step == 0) or max(steps) == bad_step
  for step in steps:
    restored = ocp.StandardCheckpointer().restore(
      tmp_path / "run" / "checkpoints" / str(step) / "default"
    )
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored))


def test_workdir_with_another_config_is_refused(smoke_config, tmp_path):
  config = smoke_config
  config.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path / "run"))
  other = config.copy_and_resolve_references()
  other.beta = 4.0
  with pytest.raises(ValueError, match=r"beta: workdir has 1.0, now 4.0"):
    train.train_and_evaluate(other, str(tmp_path / "run"))


def test_bad_config_values_are_clear_errors(smoke_config, tmp_path):
  smoke_config.batch_size = 0
  with pytest.raises(ValueError, match=r"config.batch_size=0 is out of range"):
    train.train_and_evaluate(smoke_config, str(tmp_path / "run"))


def test_cli_rejects_unknown_config_field(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "vae_jax.main",
      "--config=configs/mnist.py:smoke",
      f"--workdir={tmp_path}",
      "--config.not_a_field=1",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=process_env(),
  )
  assert result.returncode != 0
  assert "not_a_field" in result.stderr


def _iwae_setup():
  model = models.make_mlp_vae(event_shape=(6,), latents=2, encoder_hidden=(5,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))
  x = jax.random.bernoulli(jax.random.key(1), 0.4, (8, 6)).astype(jnp.float32)
  return model, params, x


def test_iwae_with_one_sample_is_the_elbo_in_expectation():
  model, params, x = _iwae_setup()
  iwae = jax.jit(_loss(model, 1.0, 1, "iwae"))
  elbo = jax.jit(_loss(model, 1.0, 1, "elbo"))
  key = jax.random.key(3)
  # k = 1: the bound is the single log-weight itself.
  log_w = losses.iw_log_weights(
    key,
    x,
    *model.encode(params, x),
    lambda z: model.decode(params, z),
    model.likelihood,
    num_samples=1,
  )
  assert float(iwae(params, x, key)[0]) == pytest.approx(-float(jnp.mean(log_w)), rel=1e-6)
  # Over many keys it averages to the ELBO (which uses the closed-form KL): 4 standard errors.
  keys = jax.random.split(jax.random.key(4), 4000)
  diff = jax.vmap(lambda k: iwae(params, x, k)[0] - elbo(params, x, k)[0])(keys)
  se = float(jnp.std(diff)) / np.sqrt(len(keys))
  assert abs(float(jnp.mean(diff))) < 4 * se


def test_iwae_with_more_samples_is_a_tighter_bound():
  model, params, x = _iwae_setup()
  keys = jax.random.split(jax.random.key(5), 200)

  def mean_loss(objective, k):
    fn = jax.jit(_loss(model, 1.0, k, objective))
    return float(jnp.mean(jax.vmap(lambda key: fn(params, x, key)[0])(keys)))

  assert mean_loss("iwae", 50) < mean_loss("iwae", 5) < mean_loss("elbo", 1)


def test_iwae_trains_and_rejects_beta():
  model, params, x = _iwae_setup()
  optimizer = optax.adam(1e-2)
  loss_fn = _loss(model, 1.0, 10, "iwae")
  step = jax.jit(step_lib.make_train_step(loss_fn, optimizer))
  state = step_lib.initial_state(model, optimizer, jax.random.key(0), (6,))
  first = None
  for i in range(200):
    state, m = step(state, x, jax.random.key(i))
    first = first if first is not None else float(m["loss"])
  assert float(m["loss"]) < first
  config = config_lib.base_config()
  config.objective, config.beta = "iwae", 4.0
  with pytest.raises(ValueError, match="importance-weighted bound, which has no KL weight"):
    config_lib.validate(config)


def test_normalize_each_gradient_is_adam_normgrads_first_step():
  """Tomczak & Welling's AdamNormGrad: each parameter's gradient g / (||g|| + 1e-7)."""
  grads = {"w": jnp.array([[3.0, 4.0]]), "b": jnp.array([0.0, 0.0]), "s": jnp.array(-2.0)}
  updates, _ = optim.normalize_each_gradient().update(grads, optax.EmptyState())
  np.testing.assert_allclose(updates["w"], [[0.6, 0.8]], rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], [0.0, 0.0])  # A zero gradient stays zero.
  np.testing.assert_allclose(updates["s"], -1.0, rtol=1e-6)


def test_process_env_drops_the_callers_jax_settings(monkeypatch):
  """Tests that start a process set the environment they assume (not the caller's)."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.setenv("JAX_ENABLE_X64", "1")
  env = process_env(VAE_JAX_IDX_DIR="")
  assert "XLA_FLAGS" not in env and "JAX_ENABLE_X64" not in env
  assert env["JAX_PLATFORMS"] == "cpu" and env["VAE_JAX_IDX_DIR"] == ""
  assert process_env(XLA_FLAGS="x")["XLA_FLAGS"] == "x"


def test_save_refuses_a_non_finite_state(tmp_path):
  """The last line of defence: nothing non-finite anywhere in the state is written."""
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
  good = {"params": {"w": jnp.ones(3)}, "opt": {"mu": jnp.zeros(3)}, "step": jnp.int32(1)}
  loop.save(ckpt, 1, good)
  ckpt.wait()
  bad = jax.tree.map(lambda x: x, good)
  bad["opt"]["mu"] = jnp.array([0.0, jnp.inf, 0.0])  # Only the optimizer state.
  with pytest.raises(loop.NonFiniteError, match=r"state at step 2 holds NaN or infinite values"):
    loop.save(ckpt, 2, bad)
  ckpt.close()
  assert checkpointing.saved_steps(tmp_path / "checkpoints") == [1]


def test_malloc_arenas_are_capped_unless_the_environment_sets_them(monkeypatch):
  monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
  assert not process.limit_malloc_arenas()  # The user's setting is glibc's to apply.
  monkeypatch.delenv("MALLOC_ARENA_MAX")
  if not sys.platform.startswith("linux") or not platform.libc_ver()[0] == "glibc":
    pytest.skip("mallopt(M_ARENA_MAX) exists only in glibc; this platform has another libc.")
  assert process.limit_malloc_arenas()


def test_peak_rss_is_the_processs_own_not_its_parents():
  # A small child of this large process: getrusage's ru_maxrss would report at least the
  # parent's peak (Linux carries it over exec); VmHWM is the child's own.
  parent = process.peak_rss_mib()
  assert parent > 150  # JAX alone is about 240 MiB.
  # The child waits on its stdin, so it is alive while measured, however loaded the machine.
  child = subprocess.Popen(
    [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.readline()"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=process_env(),
  )  # fmt: skip
  assert child.stdout.readline().strip() == "ready"
  peak = process.peak_rss_mib(child.pid)
  child.communicate("go\n")
  assert 1 < peak < parent / 2
  assert process.peak_rss_mib(child.pid) is None  # Exited and reaped.


def test_log_rows_leave_out_values_with_nothing_to_average():
  """No NaN in metrics.jsonl by design: a window without a sampled gradient norm (the
  run's last, shorter one) or with every step skipped leaves those values out."""
  nan = float("nan")

  def window(grad_norm, finite):
    w = loop._Window()
    w.rows.append({
      "loss": np.array([[1.0], [3.0]]),
      "grad_norm": np.array([[g] for g in grad_norm]),
      "finite": np.array([[f] for f in finite]),
    })  # fmt: skip
    w.seconds = 2.0
    return w.scalars(0, batch_size=4)

  assert window([nan, 5.0], [True, True]) == {
    "loss": 2.0, "grad_norm": 5.0, "examples_per_sec": 4.0, "skipped_steps": 0.0
  }  # fmt: skip
  assert window([nan, nan], [True, True]) == {
    "loss": 2.0, "examples_per_sec": 4.0, "skipped_steps": 0.0
  }  # fmt: skip
  assert window([nan, 5.0], [True, False]) == {
    "loss": 1.0, "examples_per_sec": 4.0, "skipped_steps": 1.0
  }  # fmt: skip
  assert window([nan, nan], [False, False]) == {"examples_per_sec": 4.0, "skipped_steps": 2.0}
