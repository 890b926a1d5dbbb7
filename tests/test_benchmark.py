"""The benchmark script runs end to end on a tiny setting (so it cannot rot)."""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import FIXTURE_IDX_DIR, process_env

REPO = pathlib.Path(__file__).parents[1]


def test_flop_count_of_the_flax_example_model():
  # In a process of its own: importing the script defines its flags on absl's global FLAGS,
  # which would clash with vae_jax.main's in any later test of this process.
  code = """
import jax, jax.numpy as jnp
import benchmark
from vae_jax import models
model = models.make_mlp_vae((28, 28, 1), 20)
params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
print(benchmark.train_flops_per_example(params, 784))
"""
  env = process_env(PYTHONPATH=str(REPO / "experiments"))
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  # 4.10 MFLOP: forward 1.628, weight gradients 1.628, input gradients 0.844
  # (every layer but the first, whose input is the data).
  assert float(result.stdout.split()[-1]) == pytest.approx(4.100e6, rel=1e-4)


def test_benchmark_script_writes_its_json(tfds_dir, tmp_path):
  """A tiny setting of the whole benchmark: steady state, matmul rates, and one pair of
  end-to-end runs against the anchor (experiments/flax_anchor.py, in the repository; both
  on the 400-digit fixture, one epoch)."""
  out = tmp_path / "bench.json"
  result = subprocess.run(
    [
      sys.executable,
      "experiments/benchmark.py",
      "--config=configs/mnist.py:smoke",
      f"--config.data_dir={tfds_dir}",
      "--repeats=2",
      "--dispatches=2",
      "--square=128",
      "--matmul_gflop_per_call=0.02",
      "--end_to_end_epochs=1",
      "--pairs=1",
      f"--anchor_idx_dir={FIXTURE_IDX_DIR}",
      f"--out={out}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=process_env(),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(out.read_text())
  assert len(r["examples_per_sec"]["repeats"]) == 2
  assert (
    r["examples_per_sec"]["min"] <= r["examples_per_sec"]["median"] <= r["examples_per_sec"]["max"]
  )
  assert r["examples_per_sec"]["median"] > 0
  assert r["achieved_gflops"] == pytest.approx(
    r["examples_per_sec"]["median"] * r["train_flops_per_example"] / 1e9
  )
  assert r["per_step_loop_examples_per_sec"] > 0
  assert r["speedup_over_per_step_loop"] == pytest.approx(
    r["examples_per_sec"]["median"] / r["per_step_loop_examples_per_sec"]
  )
  assert r["matmul_gflops"]["square_128"] > 0 and r["matmul_gflops"]["model_shapes"] > 0
  assert r["compile_seconds"] > 0 and r["process_start_to_first_step_seconds"] > 0
  e2e = r["end_to_end"]
  (pair,) = e2e["pairs"]
  assert e2e["epochs"] == 1 and pair["anchor_s"] > 0 and pair["warm_s"] > 0
  assert pair["cold_ratio"] == pytest.approx(pair["cold_s"] / pair["anchor_s"])
  assert e2e["median_warm_ratio"] == pytest.approx(pair["warm_ratio"])
  assert pair["warm_test_neg_elbo"] > 0 and e2e["median_peak_rss_mb"]["warm"] > 0
  assert "experiments/flax_anchor.py" in e2e["anchor_command"]
  breakdown = e2e["median_breakdown_s"]["warm"]
  assert {"setup", "train", "evaluate", "save", "total"} <= set(breakdown)
  assert breakdown["total"] == pytest.approx(
    sum(v for k, v in breakdown.items() if k != "total"), rel=1e-6
  )


def test_sweep_benchmark_betas_are_distinct_for_any_number_of_models():
  """Log-spaced from 0.25 to 64 (2**k / 4 overflowed past a few dozen models); a range too
  narrow for distinct model names is an error, not a silent collision."""
  code = """
import sweep_benchmark as s
betas = s.log_spaced_betas(128, 0.25, 64.0)
assert len(set(betas)) == 128 and betas[0] == 0.25 and abs(betas[-1] - 64) < 1e-9, betas
assert sorted(betas) == list(betas)
assert s.log_spaced_betas(1, 0.25, 64.0) == (0.25,)
try:
  s.log_spaced_betas(1000, 1.0, 1.0001)
except ValueError as e:
  print("refused:", e)
"""
  env = process_env(PYTHONPATH=str(REPO / "experiments"))
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "refused: 1000 log-spaced betas" in result.stdout
