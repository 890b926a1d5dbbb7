"""Fault injection: kills, preemption, NaNs, corrupt checkpoints, bad input.

Every fault is real: runs are separate processes killed with signals, poisoned
batches carry NaN through the real train step, checkpoint files are truncated
on disk. The promise under test: nothing is lost, nothing wrong is saved, and
the final parameters equal those of an uninterrupted run bit for bit.
"""

import gzip
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import held_run
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FIXTURE_IDX_DIR, process_env

from vae_jax import datasets, input_pipeline, loop, losses, networks, train, writers
from vae_jax import step as step_lib

REPO = pathlib.Path(__file__).parents[1]
# 4 epochs of 12 steps; a checkpoint every 6 steps; 16-sample evaluation images.
CLI_ARGS = [
  "--config=configs/mnist.py:smoke",
  "--config.num_epochs=4",
  "--config.checkpoint_every_steps=6",
  "--config.progress_bar=False",
]
TOTAL_STEPS = 48


def _final_params(workdir: pathlib.Path, step: int = TOTAL_STEPS):
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")
  return restored["params"]


def _assert_same_params(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _metric_keys(workdir):
  rows = writers.read_metrics(workdir / "metrics.jsonl")
  return [(r["step"], r["split"]) for r in rows], rows


# The same schedule for a sweep of two models (beta 0.5 and 4) on the fixture.
SWEEP_ARGS = [
  "--config=configs/beta_sweep.py:smoke",
  "--config.dataset=mnist",
  *CLI_ARGS[1:],
]


class Run:
  """A training process whose log is read line by line as it runs.

  With ``hold=REGEX`` the process runs under ``tests/held_run.py``: the first log line
  matching ``REGEX`` stops the thread that logged it until ``release()``, so the test
  acts on the run at that point, which the run cannot move past (or end before) on a
  fast or a loaded machine alike.
  """

  def __init__(self, workdir, tfds_dir, extra=(), args=CLI_ARGS, hold=None):
    workdir = pathlib.Path(workdir)
    self.gate = workdir.parent / f".{workdir.name}_gate_{time.monotonic_ns()}"
    env = process_env()
    if hold is None:
      cmd = [sys.executable, "-m", "vae_jax.main"]
    else:
      cmd = [sys.executable, str(REPO / "tests" / "held_run.py")]
      env = process_env(VAE_JAX_TEST_HOLD=hold, VAE_JAX_TEST_GATE=str(self.gate))
    cmd += [f"--workdir={workdir}", *args, f"--config.data_dir={tfds_dir}", *extra]
    self.proc = subprocess.Popen(
      cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    self.log: list[str] = []

  def wait_for(self, pattern: str) -> bool:
    """Reads the log until ``pattern`` appears (True) or the process ends (False)."""
    for line in self.proc.stderr:
      self.log.append(line)
      if re.search(pattern, line):
        return True
    return False

  def wait_held(self) -> str:
    """Waits until the run is held at its ``hold`` line; returns that line."""
    assert self.wait_for(held_run.HELD), "the run ended before its hold:\n" + "".join(
      self.log[-20:]
    )
    return self.log[-1]

  def release(self) -> None:
    self.gate.touch()

  def finish(self, timeout: float = 300) -> int:
    self.release()
    _, err = self.proc.communicate(timeout=timeout)
    self.log.extend((err or "").splitlines())
    return self.proc.returncode

  def kill(self, sig=signal.SIGKILL):
    assert self.proc.poll() is None, "the run ended before the signal:\n" + "".join(self.log[-5:])
    self.proc.send_signal(sig)


@pytest.fixture(scope="module")
def reference(tfds_dir, tmp_path_factory):
  """An uninterrupted run of the CLI configuration."""
  workdir = tmp_path_factory.mktemp("reference")
  run = Run(workdir, tfds_dir)
  assert run.finish() == 0, "".join(run.log[-30:])
  return workdir


# --------------------------------------------------------------------------
# 1. Kill at any moment, resume exactly.

# Each entry: the log line at which the run is held and then SIGKILLed, one entry per
# consecutive attempt; the last attempt runs to the end. A held run cannot move past its
# line, so each kill lands exactly there, however fast or loaded the machine.
# Orbax's writer thread logs "Renaming <step>.orbax-checkpoint-tmp to <step>" just before
# the rename that commits a checkpoint: held there, every file of the save is written and
# the checkpoint is not yet committed. (Orbax 0.11 names the directory
# <step>.orbax-checkpoint-tmp-<timestamp>; 0.12 drops the timestamp: both match.)
_MID_WRITE = r"Renaming .*checkpoints/{step}\.orbax-checkpoint-tmp(-\d+)? to .*checkpoints/{step}$"
KILL_SCHEDULES = {
  "during_checkpoint_write": [_MID_WRITE.format(step=12)],
  "during_evaluation": [r"Evaluating at step 24\b"],
  "four_kills_at_steps_and_saves": [
    r"Starting a new run",  # Before compilation and the first steps.
    _MID_WRITE.format(step=12),  # Checkpoint 6 committed, 12 half-written.
    r"Resumed from checkpoint 6\b",  # Right after a restore.
    r"Saving checkpoint at step 42\b",  # A late save, about to start.
  ],
}


@pytest.mark.parametrize("schedule", KILL_SCHEDULES, ids=list(KILL_SCHEDULES))
def test_sigkill_then_resume_is_bit_exact(schedule, reference, tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  for pattern in KILL_SCHEDULES[schedule]:
    run = Run(workdir, tfds_dir, hold=pattern)
    run.wait_held()
    run.kill()
    assert run.finish() == -signal.SIGKILL
  final = Run(workdir, tfds_dir)
  assert final.finish() == 0, "".join(final.log[-30:])
  assert any("Resumed from checkpoint" in line for line in final.log)

  _assert_same_params(_final_params(workdir), _final_params(reference))
  keys, rows = _metric_keys(workdir)
  ref_keys, ref_rows = _metric_keys(reference)
  assert keys == ref_keys  # No gaps, no duplicated steps.
  test_rows = [r for r in rows if r["split"] == "test"]
  assert test_rows == [r for r in ref_rows if r["split"] == "test"]
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert not leftovers, f"half-written checkpoints left behind: {leftovers}"


def test_a_streamed_run_killed_mid_epoch_resumes_bit_exact(reference, tfds_dir, tmp_path):
  """The training split streamed from the prepared files (Grain's threads reading ahead):
  killed while checkpoint 24 is half-written (saves go one at a time, so 18 is committed),
  the run resumes from checkpoint 18, half-way through the second epoch, and ends
  bit-identical to the uninterrupted device-fed run, whose batches the stream reproduces."""
  stream = ["--config.data.feed=stream"]
  workdir = tmp_path / "run"
  run = Run(workdir, tfds_dir, extra=stream, hold=_MID_WRITE.format(step=24))
  run.wait_held()
  run.kill()
  assert run.finish() == -signal.SIGKILL
  assert any("Streaming the first 400 images of decoded-train" in line for line in run.log)
  final = Run(workdir, tfds_dir, extra=stream)
  assert final.finish() == 0, "".join(final.log[-30:])
  assert any("Resumed from checkpoint 18" in line for line in final.log)
  _assert_same_params(_final_params(workdir), _final_params(reference))
  keys, _ = _metric_keys(workdir)
  assert keys == _metric_keys(reference)[0]


# --------------------------------------------------------------------------
# 2. Preemption.


@pytest.fixture(scope="module")
def sweep_reference(tfds_dir, tmp_path_factory):
  """An uninterrupted sweep of the CLI configuration."""
  workdir = tmp_path_factory.mktemp("sweep_reference")
  run = Run(workdir, tfds_dir, args=SWEEP_ARGS)
  assert run.finish() == 0, "".join(run.log[-30:])
  return workdir


@pytest.mark.parametrize(
  "kind, sig", [("single", signal.SIGTERM), ("sweep", signal.SIGTERM), ("single", signal.SIGINT)]
)
def test_sigterm_saves_current_step_and_exits_143(kind, sig, request, tfds_dir, tmp_path):
  """Within one dispatch of the signal, for a single run and a sweep alike (one loop); Ctrl-C
  (SIGINT) the same, with exit code 130 and no traceback."""
  reference = request.getfixturevalue("reference" if kind == "single" else "sweep_reference")
  args = CLI_ARGS if kind == "single" else SWEEP_ARGS
  workdir = tmp_path / "run"
  # Held in the evaluation at step 12 while the signal arrives: the loop then saves the
  # checkpoint due at 12, runs one more dispatch (3 steps, to the log boundary at 15) and
  # acts on the signal there, not at the next checkpoint (18) or evaluation (24).
  run = Run(workdir, tfds_dir, args=args, hold=r"Evaluating at step 12\b")
  run.wait_held()
  run.kill(sig)
  code = run.finish()
  assert code == (143 if sig == signal.SIGTERM else 130), "".join(run.log[-20:])
  assert not any("Traceback" in x for x in run.log)
  (line,) = [x for x in run.log if f"{sig.name}: saving checkpoint at step" in x]
  assert int(re.search(r"step (\d+)", line).group(1)) == 15
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [6, 12, 15]

  final = Run(workdir, tfds_dir, args=args)
  assert final.finish() == 0
  assert any("Resumed from checkpoint 15" in x for x in final.log)
  if kind == "single":
    _assert_same_params(_final_params(workdir), _final_params(reference))
  else:
    _assert_same_params(_final_sweep_params(workdir), _final_sweep_params(reference))


def test_ctrl_c_in_an_evaluation_keeps_what_is_done_and_the_rerun_continues(
  sweep_reference, tfds_dir, tmp_path
):
  """Ctrl-C while the second model of a sweep is being evaluated: one line, exit 130, the
  first model's results kept; the same command then evaluates only the second."""
  workdir = tmp_path / "sweep"
  shutil.copytree(sweep_reference, workdir)
  evaluate = ["--mode=evaluate", "--eval_num_samples=3"]
  run = Run(workdir, tfds_dir, args=[*SWEEP_ARGS, *evaluate], hold=r"Evaluating model beta_4")
  run.wait_held()
  run.kill(signal.SIGINT)
  assert run.finish() == 130
  assert "Interrupted (Ctrl-C). Evaluations already written are kept" in run.log[-1]
  assert not any("Traceback" in line for line in run.log)
  first = workdir / "models/beta_0.5_seed_0/eval/step_00000048_k3.json"
  written = first.read_bytes()
  assert not (workdir / "models/beta_4_seed_0/eval").exists()

  again = Run(workdir, tfds_dir, args=[*SWEEP_ARGS, *evaluate])
  assert again.finish() == 0, "".join(again.log[-20:])
  assert any(
    "beta_0.5_seed_0 of the sweep (step 48, K=3) is evaluated already" in x for x in again.log
  )
  assert any("Evaluating model beta_4_seed_0" in x for x in again.log)
  assert first.read_bytes() == written
  assert (workdir / "models/beta_4_seed_0/eval/step_00000048_k3.json").is_file()


def _final_sweep_params(workdir: pathlib.Path, step: int = TOTAL_STEPS):
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")
  return restored["models"]["params"]


# --------------------------------------------------------------------------
# 3. Non-finite values from a poisoned batch.

# Index of the training image that turns its batches to NaN: with seed 0 it is
# in step 4 of epoch 0 and step 18 (epoch 1), so a checkpoint precedes it.
POISON_IMAGE = 3


@pytest.fixture(scope="module")
def poisoned_tfds_dir(tmp_path_factory):
  """The fixture with one training image marked (top-left pixel 7) for poisoning."""
  idx_dir = tmp_path_factory.mktemp("poison_idx")
  for f in FIXTURE_IDX_DIR.glob("*.gz"):
    shutil.copy(f, idx_dir / f.name)
  path = idx_dir / "train-images-idx3-ubyte.gz"
  raw = bytearray(gzip.decompress(path.read_bytes()))
  raw[16 + POISON_IMAGE * 784] = 7  # Header is 16 bytes; pixel (0, 0) of the image.
  path.write_bytes(gzip.compress(bytes(raw)))
  data_dir = tmp_path_factory.mktemp("poison_tfds")
  datasets.load("mnist", data_dir=str(data_dir), idx_dir=str(idx_dir))
  return str(data_dir)


@pytest.fixture
def poisoning(monkeypatch):
  """Every batch holding the marked image becomes NaN inside the jitted step."""
  real = input_pipeline.preprocess

  def poisoned(images, binarization, key=None, bits=8):
    x = real(images, binarization, key, bits)
    marked = jnp.any(images[:, 0, 0, 0] == 7)
    return jnp.where(marked, jnp.nan, x)

  monkeypatch.setattr(input_pipeline, "preprocess", poisoned)


def _poisoned_steps(config, num_train=400):
  shuffle_key = jax.random.fold_in(jax.random.key(config.seed), step_lib.KEY_SHUFFLE)
  steps_per_epoch = num_train // config.batch_size
  steps = []
  for epoch in range(config.num_epochs):
    order = np.asarray(input_pipeline.epoch_permutation(shuffle_key, epoch, num_train))
    pos = int(np.argmax(order == POISON_IMAGE))
    if pos < steps_per_epoch * config.batch_size:
      steps.append(epoch * steps_per_epoch + pos // config.batch_size)
  return steps


def test_poisoned_batch_stops_the_run_naming_the_step(
  smoke_config, poisoned_tfds_dir, poisoning, tmp_path
):
  config = smoke_config
  config.data_dir = poisoned_tfds_dir
  config.checkpoint_every_steps = 1
  first_bad = _poisoned_steps(config)[0]
  assert first_bad == 4
  with pytest.raises(loop.NonFiniteError, match=rf"at step {first_bad} \(loss=nan"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
  assert ckpts and max(ckpts) == first_bad  # The state before the bad step, not after.
  for step in ckpts:
    state = ocp.StandardCheckpointer().restore(
      tmp_path / "run" / "checkpoints" / str(step) / "default"
    )
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_skip_policy_drops_poisoned_updates_and_counts_them(
  smoke_config, poisoned_tfds_dir, poisoning, tmp_path
):
  config = smoke_config
  config.data_dir = poisoned_tfds_dir
  config.nonfinite_policy = "skip"
  bad_steps = _poisoned_steps(config)
  assert len(bad_steps) == 2
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.num_skipped) == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  rows = [
    r for r in writers.read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"
  ]
  assert sum(r["skipped_steps"] for r in rows) == 2
  assert all(np.isfinite(r["loss"]) for r in rows)  # Means over the applied steps.


def test_skip_policy_stops_after_the_limit(smoke_config, poisoned_tfds_dir, poisoning, tmp_path):
  config = smoke_config
  config.data_dir = poisoned_tfds_dir
  config.nonfinite_policy = "skip"
  config.max_nonfinite_skips = 1
  with pytest.raises(loop.NonFiniteError, match=r"2 non-finite steps were skipped"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


# --------------------------------------------------------------------------
# 4. Corrupt or incompatible checkpoints.


def test_truncated_latest_checkpoint_falls_back_to_previous(smoke_config, tmp_path, caplog):
  config = smoke_config
  config.checkpoint_every_steps = 6
  reference_state = train.train_and_evaluate(
    config.copy_and_resolve_references(), str(tmp_path / "ref")
  )

  half = config.copy_and_resolve_references()
  half.num_epochs = 1
  train.train_and_evaluate(half, str(tmp_path / "run"))
  latest = tmp_path / "run" / "checkpoints" / "12"
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  # And a half-written save that never committed:
  junk = tmp_path / "run" / "checkpoints" / "18.orbax-checkpoint-tmp-1234"
  junk.mkdir()
  (junk / "partial").write_bytes(b"\0" * 100)

  with caplog.at_level("WARNING"):
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert any(
    "Checkpoint 12" in r.message and "cannot be restored" in r.message for r in caplog.records
  )
  _assert_same_params(state.params, reference_state.params)
  # The unreadable checkpoint is kept for inspection, outside the checkpoint directory.
  (kept,) = (tmp_path / "run" / "checkpoints_unreadable").iterdir()
  assert kept.name.startswith("12-")
  assert not junk.exists()  # The uncommitted save was cleaned up.


def test_checkpoint_of_other_shapes_names_both(smoke_config, tmp_path):
  config = smoke_config
  config.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path / "run"))
  other = config.copy_and_resolve_references()
  other.model.latents = 3
  with pytest.raises(
    Exception, match=r"encoder/mean/kernel: checkpoint \(16, 2\) vs this config \(16, 3\)"
  ):
    train.train_and_evaluate(other, str(tmp_path / "run"), allow_config_change=True)


# --------------------------------------------------------------------------
# 5. The workdir is the user's.


def test_config_change_is_refused_then_allowed_on_request(smoke_config, tmp_path):
  config = smoke_config
  config.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path / "run"))
  other = config.copy_and_resolve_references()
  other.optimizer.learning_rate = 3e-4
  other.num_epochs = 2
  with pytest.raises(ValueError, match=r"optimizer.learning_rate: workdir has 0.001, now 0.0003"):
    train.train_and_evaluate(other, str(tmp_path / "run"))
  state = train.train_and_evaluate(other, str(tmp_path / "run"), allow_config_change=True)
  assert int(state.step) == 24
  assert '"learning_rate": 0.0003' in (tmp_path / "run" / "config.json").read_text()


# --------------------------------------------------------------------------
# 6. Bad input from the command line.


def _cli(*args, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", "vae_jax.main", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=process_env(VAE_JAX_IDX_DIR=""),
  )


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.batch_size=abc", r"batch_size"),
    ("--config.model.latentz=3", r"latentz"),
    ("--config.dataset=cifar100", r"config.dataset='cifar100' is not one of \('mnist'.*tfds:"),
    ("--config.binarization=otsu", r"config.binarization='otsu' is not one of"),
    ("--config.idx_dir=/nonexistent", r"lacks train-images-idx3-ubyte.gz"),
  ],
  ids=["wrong_type", "unknown_field", "unknown_dataset", "bad_value", "missing_idx_files"],
)
def test_bad_command_line_input_gives_one_clear_error(override, message, tmp_path):
  result = _cli(
    "--config=configs/mnist.py:smoke",
    f"--workdir={tmp_path}",
    f"--config.data_dir={tmp_path / 'tfds'}",
    override,
  )
  assert result.returncode != 0
  assert re.search(message, result.stderr), result.stderr[-2000:]
  if "Traceback" in result.stderr:  # Flag parsing errors come from absl, without one.
    raise AssertionError(f"a traceback instead of one message:\n{result.stderr[-2000:]}")


def test_offline_without_data_stops_with_instructions(tmp_path):
  """The command offline: one message saying where to put the files. That it cannot hang
  on name resolution is test_datasets.py::test_reachability_probe_is_bounded."""
  result = _cli(
    "--config=configs/mnist.py",
    f"--workdir={tmp_path}",
    f"--config.data_dir={tmp_path / 'tfds'}",
  )
  assert result.returncode == 1
  assert "VAE_JAX_IDX_DIR" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------
# 7. Numerics at the extremes.


@pytest.mark.parametrize("raw_logvar", [-100.0, -30.0, 0.0, 30.0, 100.0, 1e4])
def test_elbo_finite_for_extreme_encoder_outputs(raw_logvar):
  """The encoder's soft clamp keeps |logvar| <= 30, so KL and eps stay finite."""
  x = jnp.array([[0.0, 1.0, 1.0, 0.0]])

  def objective(raw, logits_scale):
    logvar = networks.soft_clamp(jnp.full((1, 2), raw), -30.0, 30.0)
    mean = jnp.array([[0.5, -0.5]])
    decode = lambda z: logits_scale * jnp.tanh(z @ jnp.ones((2, 4)))  # noqa: E731
    return jnp.sum(losses.elbo(jax.random.key(0), x, mean, logvar, decode).elbo)

  for scale in (1.0, 1e4):
    value, grads = jax.value_and_grad(objective, argnums=(0, 1))(raw_logvar, scale)
    assert np.isfinite(value)
    assert all(np.isfinite(g) for g in grads)


def test_kl_matches_float64_at_extreme_logvar():
  mean = np.array([[0.0, 3.0, -2.0]], np.float64)
  logvar = np.array([[-100.0, -30.0, 30.0]], np.float64)
  want = 0.5 * (np.exp(logvar) + mean**2 - 1.0 - logvar)
  got = losses.kl_divergence_per_dim(
    jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


# --------------------------------------------------------------------------
# 8. Nothing non-finite reaches a checkpoint, whatever makes it so.


def test_finite_gradient_with_an_infinite_update_stops_before_saving(tfds_dir, tmp_path):
  """SGD at 1e38: loss and gradient of step 0 are finite, the update is not."""
  result = _cli(
    "--config=configs/mnist.py:smoke",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data_dir={tfds_dir}",
    "--config.optimizer.name=sgd",
    "--config.optimizer.learning_rate=1e38",
    "--config.checkpoint_every_steps=1",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1",
  )
  assert result.returncode == 1, result.stderr[-2000:]
  # The update of step 0 is infinite: its parameters, then step 1's loss, are not finite.
  assert re.search(
    r"Non-finite loss, gradient or update at step 1 \(loss=|train state at step 1 holds NaN",
    result.stderr,
  ), result.stderr[-2000:]
  assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.optimizer.learning_rate=nan"], r"config.optimizer.learning_rate must be finite"),
    (["--config.optimizer.learning_rate=-0.001"], r"learning_rate=-0.001 is out of range"),
    (["--config.beta=nan"], r"config.beta must be finite"),
    (["--config.free_bits=nan"], r"config.free_bits must be finite"),
    (["--config.model.gaussian_variance=nan"], r"config.model.gaussian_variance must be finite"),
    (["--config.model.encoder_hidden=(-5,)"], r"config.model.encoder_hidden must be a non-empty"),
    (["--config.model.encoder_hidden=(32.5,)"], r"config.model.encoder_hidden must be a non-emp"),
    (["--config=configs/does_not_exist.py"], r"no such config file"),
    (["--workdir=FILE"], r"is a file"),
  ],
  ids=["lr_nan", "lr_negative", "beta_nan", "free_bits_nan", "variance_nan", "widths_negative",
       "widths_float", "no_config_file", "workdir_is_a_file"],
)  # fmt: skip
def test_bad_values_are_one_line_errors_and_create_nothing(args, message, tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  if args == ["--workdir=FILE"]:
    workdir.write_text("not a directory")
    args = [f"--workdir={workdir}"]
  result = _cli(
    "--config=configs/mnist.py:smoke",
    f"--workdir={workdir}",
    f"--config.data_dir={tfds_dir}",
    *args,
  )
  assert result.returncode in (1, 2), result.stderr[-2000:]
  assert re.search(message, result.stderr), result.stderr[-2000:]
  lines = [x for x in result.stderr.splitlines() if x.strip()]
  assert len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert workdir.is_file() if "FILE" in str(args) or workdir.is_file() else not workdir.exists()


def test_a_record_holding_nan_still_matches_itself(tmp_path):
  from vae_jax import config as config_lib
  from vae_jax import workdir as workdir_lib

  config = config_lib.base_config()
  config.optimizer.ema_decay = float("nan")  # As an older version could have recorded.
  workdir_lib.write_record(config, tmp_path)
  assert workdir_lib.differences(config, tmp_path) == []


def test_resuming_into_a_smaller_model_names_each_array(tfds_dir, tmp_path):
  common = ["--config=configs/mnist.py:smoke", f"--workdir={tmp_path / 'run'}"]
  common += [f"--config.data_dir={tfds_dir}", "--config.num_epochs=1"]
  assert _cli(*common, "--config.model.encoder_hidden=(16,16)").returncode == 0
  for hidden in ("(16,)", "(16,16,16)"):  # Smaller, then larger.
    result = _cli(*common, f"--config.model.encoder_hidden={hidden}", "--allow_config_change")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "does not match the model of this config" in result.stderr
    if hidden == "(16,)":
      expected = r"params/encoder/hidden_1/kernel: checkpoint \(16, 16\) vs this config missing"
    else:
      expected = r"params/encoder/hidden_2/kernel: checkpoint missing vs this config \(16, 16\)"
    assert re.search(expected, result.stderr), result.stderr[-2000:]
    for wrong in ("partial_restore", "damaged", "Traceback"):
      assert wrong not in result.stderr, result.stderr[-2000:]


# --------------------------------------------------------------------------
# 9. Writes that fail, and two processes in one directory.


# Sets the file-size limit, ignores SIGXFSZ (so a write past it fails with EFBIG instead of
# killing the process) and execs the command: a small Python process of its own, not a
# preexec_fn, which would run Python in a child forked from this multithreaded one.
_WITH_FILE_SIZE_LIMIT = (
  "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
  "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
  "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def _limited_run(workdir, tfds_dir, max_file_bytes):
  """The CLI run with every file it writes limited to ``max_file_bytes`` (EFBIG past it),
  standing in for a full disk."""
  cmd = [sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, str(max_file_bytes)]
  cmd += ["-m", "vae_jax.main", f"--workdir={workdir}", *CLI_ARGS, f"--config.data_dir={tfds_dir}"]
  return subprocess.run(
    cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=process_env()
  )


@pytest.mark.parametrize(
  ("max_file_bytes", "error"),
  [(64 * 1024, "CheckpointError: Writing a checkpoint"), (2048, "Error: ")],
  ids=["checkpoints", "metrics_and_tensorboard"],
)
def test_a_failed_write_stops_the_run_at_once_and_the_same_command_resumes(
  max_file_bytes, error, reference, tfds_dir, tmp_path
):
  workdir = tmp_path / "run"
  result = _limited_run(workdir, tfds_dir, max_file_bytes)
  assert result.returncode == 1, result.stderr[-3000:]
  # The run ends on one line saying what failed and what to do (Orbax and asyncio may log
  # their own background failure above it), and no traceback of vae_jax's.
  last = [x for x in result.stderr.splitlines() if x.strip()][-1]
  assert error in last and "run the same command" in last, result.stderr[-3000:]
  assert f"{os.sep}vae_jax{os.sep}" not in result.stderr.replace(last, ""), result.stderr[-3000:]
  final = Run(workdir, tfds_dir)
  assert final.finish() == 0, "".join(final.log[-30:])
  _assert_same_params(_final_params(workdir), _final_params(reference))


def test_metric_writer_uses_no_background_thread(tmp_path):
  import threading

  before = set(threading.enumerate())
  w = writers.MetricWriter(tmp_path)
  w.write_scalars(1, "train", {"loss": 1.0})
  w.write_image(1, "grid", np.zeros((4, 4, 1), np.uint8))
  assert set(threading.enumerate()) - before == set()
  w.close()


def test_a_second_run_of_a_workdir_refuses_and_the_first_finishes(reference, tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  first = Run(workdir, tfds_dir, hold=r"Starting a new run")  # Holding the workdir's lock.
  first.wait_held()
  second = _cli(*CLI_ARGS, f"--workdir={workdir}", f"--config.data_dir={tfds_dir}")
  assert second.returncode == 1
  assert re.search(r"The workdir .* is in use by process \d+", second.stderr), second.stderr
  assert first.finish() == 0, "".join(first.log[-30:])
  keys, rows = _metric_keys(workdir)
  ref_keys, _ = _metric_keys(reference)
  assert keys == ref_keys  # Nothing of the first run's metrics was lost.
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


def test_processes_sharing_a_data_directory_both_succeed(tmp_path):
  """Two runs preparing the same fresh data directory at once: one prepares, one waits."""
  data_dir = tmp_path / "tfds"
  cmds = [
    [
      sys.executable, "-m", "vae_jax.main", "--config=configs/mnist.py:smoke",
      f"--workdir={tmp_path / f'run{i}'}", f"--config.data_dir={data_dir}",
      f"--config.idx_dir={FIXTURE_IDX_DIR}", "--config.num_epochs=1",
      "--config.progress_bar=False",
    ]
    for i in (0, 1)
  ]  # fmt: skip
  procs = [
    subprocess.Popen(c, cwd=REPO, stderr=subprocess.PIPE, text=True, env=process_env())
    for c in cmds
  ]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  a, b = (_final_params(tmp_path / f"run{i}", 12) for i in (0, 1))
  _assert_same_params(a, b)


@pytest.mark.parametrize("seed", [2**32, 2**32 + 5, -1])
def test_a_seed_that_would_repeat_another_seeds_streams_is_refused(seed):
  """jax.random.key keeps 32 bits: 2**32 + 5 would silently be the run of seed 5."""
  from vae_jax import config as config_lib

  config = config_lib.base_config()
  config.seed = seed
  with pytest.raises(config_lib.ConfigError, match=r"config.seed"):
    config_lib.validate(config)
  config.seed = 0
  config.sweep.betas, config.sweep.seeds = (1.0, 2.0), (0, 2**32)
  with pytest.raises(config_lib.ConfigError, match=r"seeds must be integers in \[0, 2\*\*32\)"):
    config_lib.validate(config)


def test_a_resume_under_other_prng_settings_is_refused(smoke_config, tmp_path):
  """The run records JAX's PRNG settings and root key; resuming where they differ (another
  threefry mode here, as an older JAX's default) would draw other streams: refused."""
  import json

  from vae_jax import config as config_lib

  smoke_config.num_epochs = 1
  workdir = tmp_path / "run"
  train.train_and_evaluate(smoke_config, workdir)
  record = json.loads((workdir / "random.json").read_text())
  assert record["jax_default_prng_impl"] == "threefry2x32"
  assert record["root_key_data"] == [0, 0]  # Seed 0.
  record["jax_threefry_partitionable"] = not record["jax_threefry_partitionable"]
  (workdir / "random.json").write_text(json.dumps(record))
  smoke_config.num_epochs = 2
  with pytest.raises(config_lib.ConfigError, match=r"jax_threefry_partitionable: the run started"):
    train.train_and_evaluate(smoke_config, workdir)
