"""Faults users met (issue 24, kinds 3 to 6): processes sharing files, messages that mislead
or say too little, paths, and reports keyed by less than a model's identity.

Each test is the example the issue gave, run as a user runs it (the command line, in a
subprocess) where that is what failed."""

import errno
import json
import pathlib
import re
import subprocess
import sys
import threading

import pytest
from conftest import FIXTURE_IDX_DIR, process_env
from test_faults import Run

from vae_jax import evaluate, files, loop, writers

REPO = pathlib.Path(__file__).parents[1]


def _main(*args, home=None, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "vae_jax.main", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=process_env(**({"HOME": str(home)} if home else {})),
  )


@pytest.fixture(scope="module")
def trained(tfds_dir, tmp_path_factory):
  """A finished smoke run (2 epochs of 12 steps)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  run = Run(
    workdir, tfds_dir, args=["--config=configs/mnist.py:smoke", "--config.progress_bar=False"]
  )
  assert run.finish() == 0, "".join(run.log[-20:])
  return workdir


# --------------------------------------------------------------------------
# 3. Processes sharing files.


def test_two_evaluations_of_one_workdir_take_turns_and_both_succeed(trained, tfds_dir, tmp_path):
  """The second waits for the first (holding the evaluation's lock, mid-evaluation), then
  finds its results written and keeps them; neither crashes, no file is shared."""
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  evaluate_args = ["--mode=evaluate", "--eval_num_samples=3", "--config.progress_bar=False"]
  first = Run(workdir, tfds_dir, args=evaluate_args, hold=r"Evaluating checkpoint of")
  first.wait_held()
  second = Run(workdir, tfds_dir, args=evaluate_args)
  assert second.wait_for(r"Waiting for process \d+"), "".join(second.log[-10:])
  first.release()
  assert first.finish() == 0, "".join(first.log[-20:])
  assert second.finish() == 0, "".join(second.log[-20:])
  assert any("is evaluated already" in line for line in second.log)
  results = json.loads((workdir / "eval" / "step_00000024_k3.json").read_text())
  assert results["checkpoint_step"] == 24
  leftovers = [p for p in workdir.rglob("*") if p.name.startswith(".") and "tmp" in p.name]
  assert not leftovers


def test_atomic_writes_from_many_threads_never_share_a_temporary_file(tmp_path):
  """Every atomic write has its own temporary name (a fixed ``x.tmp`` is what two
  evaluations collided on): 32 writers of one file, each file whole at the end."""
  target = tmp_path / "shared.json"
  errors = []

  def write(i):
    try:
      for _ in range(20):
        files.atomic_write(target, json.dumps({"writer": i, "pad": "x" * 10_000}))
    except Exception as e:  # noqa: BLE001 - collected for the assertion.
      errors.append(e)

  threads = [threading.Thread(target=write, args=(i,)) for i in range(32)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert json.loads(target.read_text())["pad"] == "x" * 10_000
  assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def test_two_metric_writers_of_one_directory_keep_separate_event_files(tmp_path):
  """TensorBoard event files are named by process and writer, so two evaluations writing
  the same directory never overwrite each other's events."""
  a, b = writers.MetricWriter(tmp_path), writers.MetricWriter(tmp_path)
  a.write_scalars(1, "test", {"elbo": -1.0})
  b.write_scalars(1, "test", {"elbo": -2.0})
  a.close()
  b.close()
  events = sorted(p.name for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
  assert len(events) == 2 and events[0] != events[1]


# --------------------------------------------------------------------------
# 4. Messages.


@pytest.mark.parametrize(
  "source, message",
  [
    ("def get_config(arg=None):\n  return (\n", r"bad_config\.py:\d+: SyntaxError"),
    (
      "def get_config(arg=None):\n  x = 1\n  raise ValueError('no such protocol')\n",
      r"bad_config\.py:3: ValueError: no such protocol",
    ),
  ],
  ids=["syntax_error", "raises"],
)
def test_a_broken_config_file_is_one_line_naming_file_and_line(source, message, tmp_path):
  config_file = tmp_path / "bad_config.py"
  config_file.write_text(source)
  result = _main(f"--config={config_file}", f"--workdir={tmp_path / 'w'}")
  assert result.returncode != 0
  lines = [x for x in result.stderr.splitlines() if x.strip()]
  assert len(lines) == 1 and re.search(message, lines[0]), lines
  assert not (tmp_path / "w").exists()


def test_a_sweep_field_that_is_no_axis_says_why(tmp_path):
  result = _main(
    "--config=configs/beta_sweep.py:smoke",
    f"--workdir={tmp_path / 'w'}",
    "--config.sweep.latents=2,10",
  )
  assert result.returncode != 0
  assert "config.sweep has no field 'latents'" in result.stderr
  assert "--config.model.latents=<value>" in result.stderr
  assert "FATAL: bad flag or config override: \"'latents'\"" not in result.stderr


def test_a_non_finite_loss_before_any_checkpoint_says_so():
  """Not "the latest checkpoint is step None"."""
  assert "step None" not in loop._latest(None)
  assert "no checkpoint was saved yet" in loop._latest(None)
  assert loop._latest(12) == "the latest checkpoint is step 12"


@pytest.mark.parametrize(
  "code, cause",
  [
    (errno.ENOSPC, "No space left on device"),
    (errno.EACCES, "Permission denied"),
    (errno.EROFS, "Read-only file system"),
    (errno.ENOENT, "No such file or directory"),
  ],
)
def test_a_failed_write_names_the_cause_the_os_gave(code, cause, tmp_path):
  with pytest.raises(files.WriteError) as raised:
    with files.reporting(tmp_path / "metrics.jsonl"):
      raise OSError(code, cause, str(tmp_path / "metrics.jsonl"))
  message = str(raised.value)
  assert cause in message and "metrics.jsonl" in message
  if code != errno.ENOSPC:
    assert "free space" not in message.lower()


def test_running_a_finished_run_again_says_so_and_keeps_its_timings(trained, tfds_dir, tmp_path):
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  timings = (workdir / "timings.json").read_text()
  again = Run(
    workdir, tfds_dir, args=["--config=configs/mnist.py:smoke", "--config.progress_bar=False"]
  )
  assert again.finish() == 0
  assert any("This run is finished: it reached step 24 of 24" in x for x in again.log)
  assert (workdir / "timings.json").read_text() == timings


def test_a_start_logs_what_a_reader_needs(tmp_path):
  """The config as the fields that differ from the defaults (no 80-line YAML dump with
  ``!!python/tuple`` tags), and nothing about downloading while preparing offline data."""
  result = _main(
    "--config=configs/mnist.py:smoke",
    f"--workdir={tmp_path / 'w'}",
    f"--config.data_dir={tmp_path / 'tfds'}",
    f"--config.idx_dir={FIXTURE_IDX_DIR}",
    "--config.progress_bar=False",
    "--config.num_epochs=1",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout + result.stderr
  assert "!!python" not in out and "Downloading and preparing dataset" not in out
  assert "Config (the fields that differ from vae_jax.config.base_config()):" in out
  assert "  model.latents = 2" in out and "  beta =" not in out
  assert "Preparing mnist from" in out


# A failure inside vae_jax's own code (patched in, as a shape check or assertion would
# raise it from the run) must keep its traceback; a UserError raised from the very same
# frame is one line. The class decides, not the file the last frame is in.
_RAISE_FROM_RUN = """
import sys
from absl import app
from vae_jax import errors, main, models
exc = {"user": errors.UserError, "bug": AssertionError}[sys.argv.pop(1)]
def make_model(config, event_shape):  # Stands in for models.make_model failing inside.
  raise exc("the message of a failure inside make_model")
models.make_model = make_model
app.run(main.main, flags_parser=main._parse_flags)
"""


@pytest.mark.parametrize("kind", ["user", "bug"])
def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(kind, tfds_dir, tmp_path):
  result = subprocess.run(
    [sys.executable, "-c", _RAISE_FROM_RUN, kind, "--config=configs/mnist.py:smoke"]
    + [f"--workdir={tmp_path / 'run'}", f"--config.data_dir={tfds_dir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=process_env(),
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert "the message of a failure inside make_model" in result.stderr
  if kind == "bug":
    assert "Traceback" in result.stderr and "AssertionError" in result.stderr
  else:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# --------------------------------------------------------------------------
# 5. Paths.


def test_a_workdir_under_the_home_directory_is_expanded(tfds_dir, tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  result = _main(
    "--config=configs/mnist.py:smoke",
    "--workdir=~/runs/x",
    f"--config.data_dir={tfds_dir}",
    "--config.progress_bar=False",
    "--config.num_epochs=1",
    "--compilation_cache=~/cache",
    home=home,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert (home / "runs" / "x" / "config.json").is_file() and (home / "cache").is_dir()
  assert not (REPO / "~").exists()


@pytest.mark.parametrize(
  "script", ["benchmark.py", "stream_benchmark.py", "colour_benchmark.py", "sweep_benchmark.py"]
)
def test_benchmarks_write_only_where_they_are_pointed(script):
  """No default output inside the repository: without --out, one line asks for it."""
  result = subprocess.run(
    [sys.executable, f"experiments/{script}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=process_env(),
  )
  assert result.returncode != 0
  assert "--out" in result.stderr and "must have a value other than None" in result.stderr


# --------------------------------------------------------------------------
# 6. A sweep's models named by their whole identity.


def test_models_of_one_beta_with_two_seeds_are_told_apart(tfds_dir, tmp_path):
  """The per-model log line and the figures' titles name beta and seed."""
  run = Run(
    tmp_path / "sweep",
    tfds_dir,
    args=[
      "--config=configs/beta_sweep.py:smoke",
      "--config.dataset=mnist",
      "--config.sweep.betas=(1.0,)",
      "--config.sweep.seeds=(0, 1)",
      "--config.sweep.cross=True",
      "--config.num_epochs=1",
      "--config.progress_bar=False",
    ],
  )
  assert run.finish() == 0, "".join(run.log[-20:])
  (line,) = [x for x in run.log if "test ELBO (nats) per model" in x]
  assert "beta_1_seed_0" in line and "beta_1_seed_1" in line
  config = type("C", (), {"objective": "elbo"})
  likelihood = type("L", (), {"name": "bernoulli"})
  model = type("M", (), {"latents": 2, "likelihood": likelihood, "num_classes": 0})
  titles = {evaluate.model_title(config, model, 1.0, False, seed) for seed in (0, 1)}
  assert titles == {
    "VAE (beta=1, seed=0, 2 latents, bernoulli)",
    "VAE (beta=1, seed=1, 2 latents, bernoulli)",
  }
