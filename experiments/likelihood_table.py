"""One row of the likelihood table: train (or resume) a config, estimate -log p(x), record it.

  python experiments/likelihood_table.py --config=configs/fashion_mnist_likelihood.py:hvae \\
    --workdir=runs/fm_hvae --name="HVAE, Gaussian prior" --paper_nll=227.37 \\
    --num_importance_samples=5000

Trains the run with ``vae_jax.train.train_and_evaluate`` (a finished run is not
trained further; an interrupted one resumes), evaluates it with
``vae_jax.evaluate.evaluate_workdir`` using ``K`` importance samples (or, with
``--reuse_eval``, reads that evaluation's JSON if the workdir already has it),
and writes the row into ``--out_dir/table.json`` (one entry per ``--name``,
replaced on a rerun) and ``--out_dir/table.md``. Each row holds the command's
config, the checkpoint step, ``-log p(x)`` with its standard error and ``K``,
the test ELBO, the paper's number, the machine and the wall times.
"""

import json
import pathlib
import platform
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import evaluate, train
from vae_jax.main import limit_malloc_arenas

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config of the row's run.")
flags.DEFINE_string("workdir", None, "The run's directory.")
flags.DEFINE_string("name", None, "The row's name in the table (e.g. 'MLP VAE').")
flags.DEFINE_float("paper_nll", None, "The published -log p(x) to compare with, in nats.")
flags.DEFINE_integer("num_importance_samples", 5000, "K: importance samples per test image.")
flags.DEFINE_bool("reuse_eval", False, "Read WORKDIR/eval/step_<N>_k<K>.json if it exists.")
flags.DEFINE_bool("allow_config_change", False, "As for vae_jax.main (fine-tuning a copy).")
flags.DEFINE_string("out_dir", str(REPO / "results/likelihood"), "Where table.json/.md go.")
flags.mark_flags_as_required(["config", "workdir", "name"])


def run_row(config, workdir: str, num_samples: int, reuse_eval: bool, allow_change: bool) -> dict:
  """Trains (resumes) and evaluates one run; returns its table row."""
  start = time.perf_counter()
  state = train.train_and_evaluate(config, workdir, allow_config_change=allow_change)
  train_s = time.perf_counter() - start
  step = int(state.step)
  cached = pathlib.Path(workdir) / "eval" / f"step_{step:08d}_k{num_samples}.json"
  start = time.perf_counter()
  if reuse_eval and cached.exists() and not config.validation_examples:
    results = json.loads(cached.read_text())
    logging.info("Reusing %s", cached)
  else:
    results = evaluate.evaluate_workdir(config, workdir, num_samples)
  eval_s = time.perf_counter() - start
  ll = results["test"]["log_likelihood"]
  return {
    "nll_nats": ll["nll_nats"],
    "standard_error_nats": ll["standard_error_nats"],
    "num_importance_samples": results["num_importance_samples"],
    "test_neg_elbo": results["test"]["neg_elbo"],
    "active_units": results["test"]["active_units"],
    "checkpoint_step": results["checkpoint_step"],
    "params": results.get("params", "latest checkpoint"),
    "workdir": str(workdir),
    "config": json.loads(config.to_json()),
    "train_wall_s_this_call": train_s,
    "eval_wall_s_this_call": eval_s,
    "eval_timings_s": results.get("timings_s"),
    "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, "
    f"{jax.device_count()} device(s), jax {jax.__version__}",
  }


def write_table(rows: dict[str, dict], out_dir: pathlib.Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "table.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
  lines = [
    "| model | -log p(x), nats (IS, K) | paper | test -ELBO | active units | step |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for name, r in rows.items():
    paper = "-" if r.get("paper_nll") is None else f"{r['paper_nll']:.2f}"
    lines.append(
      f"| {name} | {r['nll_nats']:.2f} +- {r['standard_error_nats']:.2f} "
      f"(K={r['num_importance_samples']}) | {paper} | {r['test_neg_elbo']:.2f} | "
      f"{r['active_units']} | {r['checkpoint_step']} |"
    )
  (out_dir / "table.md").write_text("\n".join(lines) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  limit_malloc_arenas()  # As vae_jax.main does: flat memory over thousands of saves.
  out_dir = pathlib.Path(FLAGS.out_dir)
  path = out_dir / "table.json"
  rows = json.loads(path.read_text()) if path.exists() else {}
  row = run_row(
    FLAGS.config,
    FLAGS.workdir,
    FLAGS.num_importance_samples,
    FLAGS.reuse_eval,
    FLAGS.allow_config_change,
  )
  row["paper_nll"] = FLAGS.paper_nll
  rows[FLAGS.name] = row
  write_table(rows, out_dir)
  logging.info("%s: -log p(x) = %.2f nats; wrote %s", FLAGS.name, row["nll_nats"], out_dir)


if __name__ == "__main__":
  app.run(main)
