"""Data parallelism over several devices (CPU host devices stand in for GPUs/TPUs).

XLA's device count is fixed when JAX starts, so each case runs in a subprocess
with ``--xla_force_host_platform_device_count=8``.
"""

import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import process_env

REPO = pathlib.Path(__file__).parents[1]

SCRIPT = textwrap.dedent(
  """
  import importlib.util, json, shutil, sys
  import jax, numpy as np
  from vae_jax import train
  from vae_jax import trainer as trainer_lib

  data_dir, out = sys.argv[1], sys.argv[2]
  spec = importlib.util.spec_from_file_location("c", "configs/mnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def config(num_devices, epochs=2):
    c = module.get_config("smoke")
    c.data_dir, c.progress_bar, c.num_devices, c.num_epochs = data_dir, False, num_devices, epochs
    return c

  def max_diff(a, b):
    return max(
      float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )

  root = out + "_runs"
  one = train.train_and_evaluate(config(1), root + "/one")
  eight = train.train_and_evaluate(config(8), root + "/eight")
  # A checkpoint written on 8 devices (after 1 epoch) resumes on 1 and on 2.
  train.train_and_evaluate(config(8, epochs=1), root + "/to1")
  shutil.copytree(root + "/to1", root + "/to2")
  to1 = train.train_and_evaluate(config(1), root + "/to1")
  to2 = train.train_and_evaluate(config(2), root + "/to2")
  bad = config(8)
  bad.batch_size = 36
  try:
    trainer_lib.build_trainer(bad, (28, 28, 1), 400)
    error = None
  except ValueError as e:
    error = str(e)
  json.dump({
    "devices": jax.device_count(),
    "param_sharding": str(eight.params["encoder"]["mean"]["kernel"].sharding),
    "eight_vs_one": max_diff(eight.params, one.params),
    "resumed_on_1_vs_eight": max_diff(to1.params, eight.params),
    "resumed_on_2_vs_eight": max_diff(to2.params, eight.params),
    "steps": [int(s.step) for s in (one, eight, to1, to2)],
    "indivisible_batch_error": error,
  }, open(out, "w"))
  """
)


def test_eight_devices_match_one_and_checkpoints_move_between_topologies(tfds_dir, tmp_path):
  out = tmp_path / "result.json"
  env = process_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT, tfds_dir, str(out)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["devices"] == 8
  assert "'data': 8" in r["param_sharding"]
  assert r["steps"] == [24, 24, 24, 24]
  # Same global batch, same keys: equal up to the order of float reductions.
  assert r["eight_vs_one"] < 1e-5
  assert r["resumed_on_1_vs_eight"] < 1e-5
  assert r["resumed_on_2_vs_eight"] < 1e-5
  assert "not divisible by the 8 devices" in r["indivisible_batch_error"]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("feed", ["device", "stream"])
def test_two_processes_on_localhost_train_like_one(feed, tfds_dir, smoke_config, tmp_path):
  """jax.distributed with a coordinator on 127.0.0.1: two CPU processes, one device each.
  Streamed, each process reads only its half of every batch: the halves are disjoint and
  make the whole batch, and the run equals the single process's."""
  import numpy as np

  from vae_jax import checkpointing, train, writers
  from vae_jax import trainer as trainer_lib

  workdir = tmp_path / "two"
  port = _free_port()
  common = [
    sys.executable,
    "-m",
    "vae_jax.main",
    "--config=configs/mnist.py:smoke",
    f"--workdir={workdir}",
    f"--config.data_dir={tfds_dir}",
    "--config.progress_bar=False",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    f"--config.data.feed={feed}",
  ]
  procs = [
    subprocess.Popen(
      [*common, f"--process_id={i}"],
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      env=process_env(),
    )
    for i in (0, 1)
  ]
  logs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  assert all("Data-parallel over 2 device(s)" in log for log in logs)
  if feed == "stream":
    rows = [
      re.search(r"process (\d) of 2 reads rows \[(\d+), (\d+)\) of each batch of 32", log)
      for log in logs
    ]
    assert all(rows), logs[0][-2000:]
    assert sorted((int(r[1]), int(r[2]), int(r[3])) for r in rows) == [(0, 0, 16), (1, 16, 32)]

  single = train.train_and_evaluate(smoke_config, str(tmp_path / "one"))
  # The 2-process checkpoint restores on this 1-device process, through the
  # target shardings of the code path a resume takes.
  target = trainer_lib.build_trainer(smoke_config, (28, 28, 1), 400).abstract_state()
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
  step, two = ckpt.restore_latest(target)
  ckpt.close()
  assert step == 24
  for a, b in zip(jax_leaves(single.params), jax_leaves(two.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  rows = writers.read_metrics(workdir / "metrics.jsonl")
  keys = [(r["step"], r["split"]) for r in rows]
  assert len(keys) == len(set(keys)), "both processes wrote metrics"


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)
