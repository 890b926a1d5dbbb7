"""The report of a beta sweep: table, rate-distortion plot, metrics against beta, traversals.

Train and evaluate with the main command, then report:

  python -m vae_jax.main --config=configs/beta_sweep.py --workdir=runs/beta_sweep
  python -m vae_jax.main --config=configs/beta_sweep.py --workdir=runs/beta_sweep \\
    --mode=evaluate --eval_num_samples=100
  python experiments/beta_sweep.py --workdir=runs/beta_sweep

Reads each model's newest evaluation (``WORKDIR/models/<name>/eval/*.json``, the
largest K of the latest step) and the evaluated parameters (as ``--mode=evaluate``
chose them), and writes, into ``--out_dir`` (default ``WORKDIR/report``):

* ``results.csv`` and ``results.json``: per model beta, seed, test ELBO, rate,
  distortion, importance-sampled log-likelihood (with ``K`` and standard errors), both
  in bits/dim where the likelihood makes them one (a probability of the data, or a
  dequantized density), active units, and the disentanglement scores when the
  evaluation computed them;
* ``beta_sweep_table.md``: the table as Markdown;
* ``beta_sweep_rate_distortion.{png,pdf}``: rate against distortion, each model
  labelled by beta and seed, over lines of equal ELBO;
* ``beta_sweep_metrics.{png,pdf}``: each metric against beta, seeds as points;
* ``beta_sweep_traversals.{png,pdf}``: the 3 most informative latents of each model
  swept around test image 0's code, rows named by beta and seed.

``--docs_dir`` puts the table and figures elsewhere (the project's own docs/ are
written only when named: ``--out_dir=results/beta_sweep --docs_dir=docs``).
"""

import csv
import json
import logging as py_logging
import pathlib

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import config as config_lib
from vae_jax import evaluate, figures, files, input_pipeline, pictures
from vae_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "The sweep's config (default: the workdir's config.json)."
)
flags.DEFINE_string("workdir", None, "The sweep's directory, trained and evaluated.")
flags.DEFINE_string("data_dir", None, "TFDS data directory, if not the one the sweep recorded.")
flags.DEFINE_string("out_dir", None, "Where the results go (default: WORKDIR/report).")
flags.DEFINE_string(
  "docs_dir", None, "Where the Markdown table and the figures go (default: --out_dir)."
)
flags.mark_flags_as_required(["workdir"])

COLUMNS = (
  "name",
  "field",
  "value",
  "beta",
  "seed",
  "step",
  "test_elbo",
  "elbo_se",
  "rate",
  "distortion",
  "log_likelihood",
  "log_likelihood_se",
  "num_importance_samples",
  "bits_per_dim",
  "elbo_bits_per_dim",
  "active_units",
  "latents",
)
# Disentanglement scores copied from the evaluation JSON when present.
SCORES = ("mig", "sap", "dci_disentanglement", "dci_completeness", "beta_vae", "factor_vae")


def latest_eval(model_dir: pathlib.Path) -> dict:
  """The newest evaluation of a model: the latest step, the largest K among its files.

  Raises:
    FileNotFoundError: the model was not evaluated.
  """
  paths = sorted((model_dir / "eval").glob("step_*.json"))
  if not paths:
    raise FileNotFoundError(
      f"{model_dir} has no evaluation: run the main command with --mode=evaluate first."
    )

  def key(p: pathlib.Path):
    parts = p.stem.split("_")
    return int(parts[1]), int(parts[2][1:]) if len(parts) > 2 else 0

  return json.loads(max(paths, key=key).read_text())


def rows_of(config, workdir: pathlib.Path) -> list[dict]:
  """One row per model of the sweep, from its newest evaluation."""
  rows = []
  for m in config_lib.sweep_models(config):
    e = latest_eval(workdir / "models" / m.name)
    t = e["test"]
    row = {
      "name": m.name,
      "field": m.field,
      "value": m.value,
      "beta": m.beta,
      "seed": m.seed,
      "step": e["checkpoint_step"],
      "test_elbo": t["elbo"],
      "elbo_se": t["elbo_standard_error"],
      "rate": t["rate"],
      "distortion": t["distortion"],
      "log_likelihood": -t["log_likelihood"]["nll_nats"],
      "log_likelihood_se": t["log_likelihood"]["standard_error_nats"],
      "num_importance_samples": e["num_importance_samples"],
      # -log p(x) and -ELBO in bits per dimension, where the likelihood makes them one
      # (a probability of the data, or a dequantized density): else None.
      "bits_per_dim": t["log_likelihood"]["bits_per_dim"],
      "elbo_bits_per_dim": t.get("elbo_bits_per_dim"),
      "active_units": t["active_units"],
      "latents": e["latents"],
      "kl_per_dim": t.get("kl_per_dim"),
      "posterior_mean_variance": t["posterior_mean_variance"],
    }
    for name in SCORES:
      if name in e.get("disentanglement", {}):
        row[name] = e["disentanglement"][name]
    rows.append(row)
  return rows


def _short(row: dict) -> str:
  return row["field"].split(".")[-1]


def _label(row: dict) -> str:
  """A model's name in figures: its swept value and seed (``beta=4 seed=1``)."""
  return f"{_short(row)}={row['value']:g} seed={row['seed']}"


def traversal_figure(config, workdir: pathlib.Path, rows: list[dict]):
  """The top-3 latents of every model swept around test image 0's code, one figure, each
  row named by the model's beta and seed."""
  splits = input_pipeline.load_splits(config)
  test_x = np.asarray(
    input_pipeline.eval_images(splits.test.images[:1], config.binarization, bits=config.data.bits)
  )
  model, targets = evaluate.restore_targets(config, workdir, splits.event_shape, splits.num_train)
  by_name = {t.name: t for t in targets}
  images, labels = [], []
  for row in rows:
    params = by_name[row["name"]].params
    code = np.asarray(jax.jit(model.encode)(params, test_x)[0])
    summary = {k: row[k] for k in ("kl_per_dim", "posterior_mean_variance") if row[k] is not None}
    dims, values, names, _ = evaluate.traversal_rows(model, summary, code, False, max_rows=3)
    decode = evaluate.mean_decoder(model, params)
    images.append(pictures.traversal_images(decode, code[0], dims, values))
    labels += [f"{_label(row)} {n}" for n in names]
  return figures.traversal_figure(
    np.concatenate(images),
    labels,
    values[0],
    title="Top-3 latents by KL, swept around test image 0",
  )


def write_outputs(rows: list[dict], out_dir: pathlib.Path, docs_dir: pathlib.Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  docs_dir.mkdir(parents=True, exist_ok=True)
  scores = [s for s in SCORES if any(s in r for r in rows)]
  with files.atomic_path(out_dir / "results.csv") as tmp, open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=(*COLUMNS, *scores), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  summary = {
    "units": "nats per test example; rate = E KL(q(z|x)||p(z)), distortion = "
    "-E_q log p(x|z), test_elbo = -(rate + distortion), log_likelihood = "
    "importance-weighted bound with num_importance_samples samples per example; "
    "bits_per_dim = -log_likelihood / (D ln 2) and elbo_bits_per_dim = -test_elbo / "
    "(D ln 2) (plus the bit depth for dequantized data), null where meaningless",
    "models": rows,
  }
  files.atomic_write(out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
  order = np.argsort([r["value"] for r in rows], kind="stable")
  fig = figures.rate_distortion_figure(
    np.array([rows[i]["rate"] for i in order]),
    np.array([rows[i]["distortion"] for i in order]),
    [_label(rows[i]) for i in order],
    title=f"Test rate and distortion per {_short(rows[0])} (grey: equal ELBO; red: best)",
  )
  figures.save_figure(fig, docs_dir / "beta_sweep_rate_distortion")
  values = {
    "rate (nats)": [r["rate"] for r in rows],
    "distortion (nats)": [r["distortion"] for r in rows],
    "active units": [r["active_units"] for r in rows],
    **{s: [r.get(s, np.nan) for r in rows] for s in scores},
  }
  fig = figures.metric_vs_beta_figure(
    [r["value"] for r in rows],
    [r["seed"] for r in rows],
    values,
    title=f"Per model, by {_short(rows[0])}",
    axis_label=r"$\beta$" if rows[0]["field"] == "beta" else rows[0]["field"],
  )
  figures.save_figure(fig, docs_dir / "beta_sweep_metrics")
  bits = all(r["bits_per_dim"] is not None for r in rows)
  header = f"| {_short(rows[0])} | seed | test ELBO | rate | distortion | log p(x) (IS, K) |"
  header += " bits/dim |" if bits else ""
  header += " active units |"
  lines = [header + "".join(f" {s} |" for s in scores)]
  lines.append("|---:" * (7 + bits + len(scores)) + "|")
  for i in order:
    r = rows[i]
    line = (
      f"| {r['value']:g} | {r['seed']} | {r['test_elbo']:.2f} | {r['rate']:.2f} | "
      f"{r['distortion']:.2f} | {r['log_likelihood']:.2f} +- {r['log_likelihood_se']:.2f} "
      f"(K={r['num_importance_samples']}) |"
    )
    line += f" {r['bits_per_dim']:.4f} |" if bits else ""
    line += f" {r['active_units']}/{r['latents']} |"
    lines.append(line + "".join(f" {r.get(s, float('nan')):.3f} |" for s in scores))
  files.atomic_write(docs_dir / "beta_sweep_table.md", "\n".join(lines) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname
  )
  workdir = files.expand(FLAGS.workdir)
  config = FLAGS.config
  if config is None:
    config = workdir_lib.read_record(workdir)
  if FLAGS.data_dir:
    config.data_dir = str(files.expand(FLAGS.data_dir))
  out_dir = files.expand(FLAGS.out_dir) if FLAGS.out_dir else workdir / "report"
  docs_dir = files.expand(FLAGS.docs_dir) if FLAGS.docs_dir else out_dir
  rows = rows_of(config, workdir)
  write_outputs(rows, out_dir, docs_dir)
  figures.save_figure(traversal_figure(config, workdir, rows), docs_dir / "beta_sweep_traversals")
  logging.info("Wrote %s%s", out_dir, f" and {docs_dir}" if docs_dir != out_dir else "")


if __name__ == "__main__":
  app.run(main)
