"""One row of the likelihood table: train (or resume) a config, estimate -log p(x), record it.

  python experiments/likelihood_table.py --config=configs/fashion_mnist_likelihood.py:hvae \\
    --workdir=runs/fm_hvae --name="HVAE, Gaussian prior" --paper_nll=227.37 \\
    --num_importance_samples=5000

Trains the run with ``vae_jax.train.train_and_evaluate`` (a finished run is not
trained further; an interrupted one resumes), evaluates it with
``vae_jax.evaluate.evaluate_workdir`` using ``K`` importance samples (keeping that
evaluation's JSON if the workdir already has it; ``--noreuse_eval`` evaluates again),
and writes the row into ``--out_dir/table.json`` (one entry per ``--name``,
replaced on a rerun) and ``--out_dir/table.md``. Each row holds the command's
config, the checkpoint step, ``-log p(x)`` with its standard error and ``K``,
the test ELBO, the paper's number, the machine and the wall times. Beside the
table go the run's evaluation JSON (``<run>_eval_k<K>.json``, ``<run>`` the
workdir's name), its validation and test curves (``<run>_curves.jsonl``, from
``metrics.jsonl``) and ``validation_curves.{png,pdf}``: the validation -ELBO of
every row's run against epochs.

``--unfinished`` records a run that cannot finish on this machine without
training or evaluating it: how far it got (epochs, best validation ELBO and
where) and its curves, so the table says what each missing number would take.
"""

import json
import pathlib
import platform
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import evaluate, figures, files, locks, loop, process, train, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config of the row's run.")
flags.DEFINE_string("workdir", None, "The run's directory.")
flags.DEFINE_string("name", None, "The row's name in the table (e.g. 'MLP VAE').")
flags.DEFINE_float("paper_nll", None, "The published -log p(x) to compare with, in nats.")
flags.DEFINE_integer("num_importance_samples", 5000, "K: importance samples per test image.")
flags.DEFINE_bool(
  "reuse_eval",
  True,
  "Keep WORKDIR/eval/step_<N>_k<K>.json if it exists (--noreuse_eval: evaluate again).",
)
flags.DEFINE_bool("allow_config_change", False, "As for vae_jax.main (fine-tuning a copy).")
flags.DEFINE_string(
  "out_dir", None, "Where table.json/.md go. Required: nothing is written where you did not point."
)
flags.DEFINE_bool("unfinished", False, "Record how far the run got; do not train or evaluate.")
flags.mark_flags_as_required(["config", "workdir", "name", "out_dir"])


def run_row(config, workdir: str, num_samples: int, reuse_eval: bool, allow_change: bool) -> dict:
  """Trains (resumes) and evaluates one run; returns its table row."""
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir, allow_config_change=allow_change)
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  results = evaluate.evaluate_workdir(config, workdir, num_samples, again=not reuse_eval)
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
    "eval_wall_s": results.get("wall_time_s"),
    "eval_timings_s": results.get("timings_s"),
    "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, "
    f"{jax.device_count()} device(s), jax {jax.__version__}",
  }


def copy_curves(workdir: pathlib.Path, out_dir: pathlib.Path) -> list[dict]:
  """Writes the run's validation and test rows to ``<run>_curves.jsonl``; returns them."""
  rows = writers.read_metrics(workdir / "metrics.jsonl")
  kept = [r for r in rows if r.get("split") in ("validation", "test")]
  out_dir.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
  files.atomic_write(out_dir / f"{workdir.name}_curves.jsonl", text)
  return kept


def progress_row(config, workdir: pathlib.Path, curves: list[dict]) -> dict:
  """How far an unfinished run got, from its curves (one validation row per epoch)."""
  val = [r for r in curves if r["split"] == "validation"]
  if not val:
    raise ValueError(f"{workdir} has no validation rows yet; nothing to record.")
  if config.eval_every_steps:
    raise ValueError("--unfinished counts epochs by validation rows: needs eval_every_steps=0.")
  best = max(range(len(val)), key=lambda i: val[i]["elbo"])
  return {
    "status": "unfinished",
    "epochs_completed": len(val),
    "last_step": val[-1]["step"],
    "best_validation_neg_elbo": -val[best]["elbo"],
    "best_epoch": best + 1,
    "last_validation_neg_elbo": -val[-1]["elbo"],
    "max_epochs": config.num_epochs,
    "patience_epochs": config.early_stopping_patience_epochs,
    "workdir": str(workdir),
    "config": json.loads(config.to_json()),
  }


def write_curves_figure(rows: dict[str, dict], out_dir: pathlib.Path) -> None:
  """``validation_curves.{png,pdf}``: each row's validation -ELBO against epochs."""
  curves = {}
  for name, r in rows.items():
    rows_of_run = writers.read_metrics(out_dir / f"{pathlib.Path(r['workdir']).name}_curves.jsonl")
    val = [v for v in rows_of_run if v["split"] == "validation"]
    if val:
      epochs = range(1, len(val) + 1)
      curves[name] = (list(epochs), [-v["elbo"] for v in val])
  if curves:
    fig = figures.curves_figure(
      curves,
      xlabel="epoch",
      ylabel="validation -ELBO (nats)",
      title="Validation -ELBO (one evaluation per epoch)",
      ylim_from=min(100, min(len(x) for x, _ in curves.values()) // 2),
    )
    figures.save_figure(fig, out_dir / "validation_curves")


def write_table(rows: dict[str, dict], out_dir: pathlib.Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out_dir / "table.json", json.dumps(rows, indent=1, sort_keys=True) + "\n")
  lines = [
    "| model | -log p(x), nats (IS, K) | paper | test -ELBO | active units | step |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for name, r in rows.items():
    paper = "-" if r.get("paper_nll") is None else f"{r['paper_nll']:.2f}"
    if r.get("status") == "unfinished":
      lines.append(
        f"| {name} | unfinished: {r['epochs_completed']} of up to {r['max_epochs']} epochs, "
        f"best validation -ELBO {r['best_validation_neg_elbo']:.2f} (epoch {r['best_epoch']}) | "
        f"{paper} | - | - | {r['last_step']} |"
      )
      continue
    lines.append(
      f"| {name} | {r['nll_nats']:.2f} +- {r['standard_error_nats']:.2f} "
      f"(K={r['num_importance_samples']}) | {paper} | {r['test_neg_elbo']:.2f} | "
      f"{r['active_units']} | {r['checkpoint_step']} |"
    )
  files.atomic_write(out_dir / "table.md", "\n".join(lines) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  process.limit_malloc_arenas()  # As vae_jax.main does: flat memory over thousands of saves.
  out_dir = files.expand(FLAGS.out_dir)
  workdir = files.expand(FLAGS.workdir)
  if FLAGS.unfinished:
    row = progress_row(FLAGS.config, workdir, copy_curves(workdir, out_dir))
  else:
    try:
      row = run_row(
        FLAGS.config,
        workdir,
        FLAGS.num_importance_samples,
        FLAGS.reuse_eval,
        FLAGS.allow_config_change,
      )
    except loop.Preempted as e:  # SIGTERM or Ctrl-C in training: a checkpoint was saved.
      logging.warning("%s Run the same command to continue.", e)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C in the evaluation (or a second one in training).
      logging.warning("Interrupted (Ctrl-C). Run the same command to continue.")
      sys.exit(130)
    copy_curves(workdir, out_dir)
    k = row["num_importance_samples"]
    eval_json = workdir / "eval" / f"step_{row['checkpoint_step']:08d}_k{k}.json"
    files.atomic_write(out_dir / f"{workdir.name}_eval_k{k}.json", eval_json.read_bytes())
  row["paper_nll"] = FLAGS.paper_nll
  # Rows of one table are often run at once, each in its own process: each reads the
  # table, adds its row and writes it back holding the table's lock, so none is lost.
  out_dir.mkdir(parents=True, exist_ok=True)
  with locks.exclusive(out_dir / ".table.lock", wait=True, what=f"the table in {out_dir}"):
    path = out_dir / "table.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    rows[FLAGS.name] = row
    write_table(rows, out_dir)
    write_curves_figure(rows, out_dir)
  logging.info("%s: wrote %s", FLAGS.name, out_dir)


if __name__ == "__main__":
  app.run(main)
