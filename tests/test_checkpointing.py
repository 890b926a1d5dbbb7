"""Checkpointer on Orbax's current API: which steps survive, read-only readers, no warnings;
workdirs written by earlier versions still resume."""

import json
import logging
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import process_env

from vae_jax import checkpointing

REPO = pathlib.Path(__file__).parents[1]


def _state(step: int) -> dict:
  return {"w": jnp.full((3, 2), float(step)), "b": jnp.arange(2.0) + step}


def _target() -> dict:
  return {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}


def _mentions_max_to_keep(records) -> list[str]:
  return [str(r) for r in records if "max_to_keep" in str(r)]


def test_keeps_the_newest_k_without_deprecation_warnings(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  caplog.set_level(logging.WARNING)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    checkpointer = checkpointing.Checkpointer(directory, max_to_keep=2)
    for step in range(5):
      checkpointer.save(step, _state(step))
    checkpointer.close()
    reader = checkpointing.Checkpointer(directory, max_to_keep=2, read_only=True)
    steps, latest = reader.all_steps(), reader.latest_step()
    step, restored = reader.restore_latest(_target())
    reader.close()

  python_warnings = [
    w.message for w in caught if issubclass(w.category, (DeprecationWarning, UserWarning))
  ]
  assert _mentions_max_to_keep(python_warnings) == []
  assert _mentions_max_to_keep(r.getMessage() for r in caplog.records) == []
  assert steps == [3, 4] and latest == 4
  assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["3", "4"]
  assert (directory / "4" / "default").is_dir()  # The layout older checkpoints have.
  assert checkpointing.saved_steps(directory) == [3, 4]
  assert step == 4
  np.testing.assert_array_equal(restored["w"], np.full((3, 2), 4.0))


def test_read_only_creates_and_deletes_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  reader = checkpointing.Checkpointer(directory, read_only=True)
  assert not directory.exists() and reader.restore_latest(_target()) is None
  with pytest.raises(checkpointing.CheckpointError, match="read-only"):
    reader.save(0, _state(0))
  reader.close()

  writer = checkpointing.Checkpointer(directory, max_to_keep=1)
  writer.save(7, _state(7))
  writer.close()
  junk = directory / "8.orbax-checkpoint-tmp-1234"  # A save killed half-way.
  junk.mkdir()
  reader = checkpointing.Checkpointer(directory, read_only=True)
  assert reader.restore_latest(_target())[0] == 7
  reader.close()
  assert junk.exists()  # A reader beside a running job leaves it alone;
  writer = checkpointing.Checkpointer(directory, max_to_keep=1)
  writer.save(8, _state(8))  # Orbax finishes its clean-up before the first save.
  writer.close()
  assert not junk.exists()  # the training run cleans it up when it saves again,
  assert checkpointing.saved_steps(directory) == [8]  # keeping one, as best/ does.
  step, restored = checkpointing.restore_read_only(directory, _target())
  assert step == 8
  np.testing.assert_array_equal(restored["b"], [8.0, 9.0])


def test_restore_refuses_other_shapes(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints")
  checkpointer.save(1, _state(1))
  checkpointer.wait()
  wrong = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(2)}
  with pytest.raises(checkpointing.CheckpointError, match=r"w: checkpoint \(3, 2\) vs this"):
    checkpointer.restore_latest(wrong)
  checkpointer.close()


def test_a_workdir_written_before_the_redesign_resumes(tmp_path, tfds_dir):
  """``tests/fixtures/workdir_0091dbe``: config.json and checkpoint 24 of
  ``--config=configs/mnist.py:smoke --config.dataset=mnist`` written by commit
  0091dbe (before the one-loop redesign). The current command resumes it under the
  config it recorded (no --config), with one more epoch.

  Today's ``:smoke`` also caps the training split at 400 images
  (``data.max_train_examples``), which that run's record does not say; given again,
  it is refused as the different config it is, naming the field."""
  workdir = tmp_path / "run"
  shutil.copytree(REPO / "tests" / "fixtures" / "workdir_0091dbe", workdir)
  command = [sys.executable, "-m", "vae_jax.main", f"--workdir={workdir}"]
  overrides = [
    f"--config.data_dir={tfds_dir}", "--config.num_epochs=3", "--config.progress_bar=False"
  ]  # fmt: skip
  refused = subprocess.run(
    [*command, "--config=configs/mnist.py:smoke", "--config.dataset=mnist", *overrides],
    cwd=REPO, capture_output=True, text=True, env=process_env(),
  )  # fmt: skip
  assert refused.returncode == 1 and "data.max_train_examples: workdir has None, now 400" in (
    refused.stderr
  )
  done = subprocess.run(
    [*command, *overrides], cwd=REPO, capture_output=True, text=True, env=process_env()
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed from checkpoint 24" in done.stderr
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert min(r["step"] for r in rows) > 24  # Steps 1-24 were not trained again.
  (last,) = [r for r in rows if r["split"] == "test" and r["step"] == 36]
  # The old run's test ELBO at step 24 was -536.24; twelve more steps improve it.
  assert -536.0 < last["elbo"] < -480.0, last
