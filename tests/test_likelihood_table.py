"""experiments/likelihood_table.py trains, evaluates and records a row; a rerun replaces it."""

import json
import pathlib
import subprocess
import sys

from conftest import process_env

REPO = pathlib.Path(__file__).parents[1]


def run(args, tfds_dir):
  cmd = [
    sys.executable,
    str(REPO / "experiments" / "likelihood_table.py"),
    f"--config={REPO / 'configs' / 'mnist.py'}:smoke",
    f"--config.data_dir={tfds_dir}",
    "--config.progress_bar=False",
    "--config.num_epochs=1",
    "--config.num_image_samples=0",
    "--num_importance_samples=3",
    *args,
  ]
  return subprocess.run(
    cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=process_env()
  )


def test_row_is_written_and_replaced(tmp_path, tfds_dir):
  out, work = tmp_path / "out", tmp_path / "run"
  common = [f"--workdir={work}", f"--out_dir={out}", "--name=smoke VAE", "--paper_nll=86.76"]
  first = run(common, tfds_dir)
  assert first.returncode == 0, first.stderr[-2000:]
  rows = json.loads((out / "table.json").read_text())
  row = rows["smoke VAE"]
  assert row["num_importance_samples"] == 3 and row["paper_nll"] == 86.76
  eval_json = json.loads(next((work / "eval").glob("step_*_k3.json")).read_text())
  assert row["nll_nats"] == eval_json["test"]["log_likelihood"]["nll_nats"]
  assert row["checkpoint_step"] == eval_json["checkpoint_step"]
  assert "| smoke VAE |" in (out / "table.md").read_text()

  again = run(common, tfds_dir)  # The finished run and its evaluation are kept.
  assert again.returncode == 0, again.stderr[-2000:]
  assert "is evaluated already" in again.stderr
  rows = json.loads((out / "table.json").read_text())
  assert list(rows) == ["smoke VAE"] and rows["smoke VAE"]["nll_nats"] == row["nll_nats"]


def test_curves_eval_json_and_an_unfinished_row(tmp_path, tfds_dir):
  out, work = tmp_path / "out", tmp_path / "run"
  done = run([f"--workdir={work}", f"--out_dir={out}", "--name=done"], tfds_dir)
  assert done.returncode == 0, done.stderr[-2000:]
  row = json.loads((out / "table.json").read_text())["done"]
  k = row["num_importance_samples"]
  copied = json.loads((out / f"run_eval_k{k}.json").read_text())
  assert copied["test"]["log_likelihood"]["nll_nats"] == row["nll_nats"]
  curves = [json.loads(x) for x in (out / "run_curves.jsonl").read_text().splitlines()]
  assert curves and {c["split"] for c in curves} == {"test"}  # No validation in this config.

  # A run with validation, recorded as unfinished: neither trained further nor evaluated.
  val_work = tmp_path / "val_run"
  common = ["--config.validation_examples=100", f"--out_dir={out}"]
  trained = run([*common, f"--workdir={val_work}", "--name=first"], tfds_dir)
  assert trained.returncode == 0, trained.stderr[-2000:]
  before = sorted(p.name for p in (val_work / "eval").iterdir())
  partial = run([*common, f"--workdir={val_work}", "--name=partial", "--unfinished"], tfds_dir)
  assert partial.returncode == 0, partial.stderr[-2000:]
  assert sorted(p.name for p in (val_work / "eval").iterdir()) == before
  rows = json.loads((out / "table.json").read_text())
  got = rows["partial"]
  assert got["status"] == "unfinished" and got["epochs_completed"] == 1
  val = [json.loads(x) for x in (out / "val_run_curves.jsonl").read_text().splitlines()]
  best = max(v["elbo"] for v in val if v["split"] == "validation")
  assert got["best_validation_neg_elbo"] == -best
  assert "| partial | unfinished: 1 of up to 1 epochs" in (out / "table.md").read_text()
  assert (out / "validation_curves.png").exists() and (out / "validation_curves.pdf").exists()
