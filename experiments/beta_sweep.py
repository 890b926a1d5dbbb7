"""A beta sweep trained as one compiled program, then evaluated: table, plot, traversals.

  python experiments/beta_sweep.py --config=configs/beta_sweep.py --workdir=runs/beta_sweep \\
    --config.num_epochs=5 --num_importance_samples=100

Trains (or resumes: run the same command again) every ``(beta, seed)`` of
``config.sweep`` with ``vae_jax.sweep.train_sweep``, then evaluates each
model's latest parameters on the test split with ``evaluate.make_per_example_fn``
(``K`` importance samples per example) and writes:

* ``--out_dir/results.csv`` and ``results.json``: per model beta, seed, test
  ELBO, rate, distortion, importance-sampled log-likelihood (with ``K`` and
  standard errors), active units;
* ``--docs_dir/beta_sweep_rate_distortion.png``: rate against distortion,
  labelled by beta, over lines of equal ELBO; ``beta_sweep_traversals.png``:
  the 3 most informative latents of each model swept from -3 to 3;
  ``beta_sweep_table.md``: the table as Markdown;
* ``--out_dir/traversals/<model>.png``: 8 traversal rows per model.
"""

import csv
import json
import logging as py_logging
import math
import pathlib
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import evaluate, input_pipeline, pictures, sweep, train, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(REPO / "configs/beta_sweep.py"), "Sweep config.")
flags.DEFINE_string("workdir", None, "Directory for the sweep's checkpoints and metrics.")
flags.DEFINE_integer("num_importance_samples", 100, "K: importance samples per test example.")
flags.DEFINE_string("out_dir", str(REPO / "results/beta_sweep"), "Where the table goes.")
flags.DEFINE_string("docs_dir", str(REPO / "docs"), "Where the plot and table for people go.")
flags.mark_flags_as_required(["workdir"])

COLUMNS = (
  "beta",
  "seed",
  "test_elbo",
  "rate",
  "distortion",
  "log_likelihood",
  "log_likelihood_se",
  "num_importance_samples",
  "active_units",
  "latents",
  "elbo_se",
)


def evaluate_sweep(config, workdir, num_samples: int) -> tuple[list[dict], dict]:
  """Per-model test metrics of the sweep's latest checkpoint, and its traversal images."""
  data = input_pipeline.load_dataset(config.dataset, config.data_dir, config.idx_dir)
  num_train, *event_shape = data["train"].images.shape
  step, trainer, state = sweep.restore_sweep(config, workdir, event_shape, num_train)
  model, likelihood = trainer.base.model, config.model.likelihood
  test_x = np.asarray(input_pipeline.eval_images(data["test"].images, config.binarization))
  fn = evaluate.make_per_example_fn(
    model, trainer.base.log_likelihood_fn, likelihood, num_samples=num_samples
  )
  decode = jax.jit(lambda params, z: evaluate.decoder_mean(model.decode(params, z), likelihood))
  rows, traversals = [], {}
  for i, (beta, seed) in enumerate(zip(trainer.betas, trainer.seeds, strict=True)):
    start = time.perf_counter()
    params = sweep.model_state(state, i).params
    # The key evaluate_workdir uses for the test split of a run with this seed.
    key = jax.random.fold_in(sweep.model_keys(seed)[train.KEY_EVAL], 0)
    values = evaluate.per_example_values(
      fn, params, test_x, key, evaluate.IW_BATCH_SIZE, progress=config.progress_bar
    )
    s = evaluate.summarize_split(values, math.prod(event_shape))
    rows.append(
      {
        "beta": beta,
        "seed": seed,
        "step": step,
        "test_elbo": s["elbo"],
        "elbo_se": s["elbo_standard_error"],
        "rate": s["rate"],
        "distortion": s["distortion"],
        "log_likelihood": -s["log_likelihood"]["nll_nats"],
        "log_likelihood_se": s["log_likelihood"]["standard_error_nats"],
        "num_importance_samples": num_samples,
        "active_units": s["active_units"],
        "latents": model.latents,
        "kl_per_dim": s["kl_per_dim"],
      }
    )
    logging.info(
      "beta=%g seed=%d: ELBO %.2f, R %.2f, D %.2f, log p(x) %.2f (K=%d), %d active, %.0f s",
      beta, seed, s["elbo"], s["rate"], s["distortion"], rows[-1]["log_likelihood"],
      num_samples, s["active_units"], time.perf_counter() - start,
    )  # fmt: skip
    kl = np.asarray(s["kl_per_dim"])
    visible = model.layer_latents[0]  # What a (two-layer) decoder reads.
    dims = [int(d) for d in np.argsort(-kl[:visible])[: min(8, visible)]]
    values_grid = np.linspace(np.full(len(dims), -3.0), np.full(len(dims), 3.0), 11, axis=1)
    images = pictures.traversal_images(
      lambda z, p=params: np.asarray(decode(p, z)), values["mean"][0], dims, values_grid
    )
    traversals[(beta, seed)] = (images, dims, kl)
  return rows, traversals


def rate_distortion_figure(rows: list[dict]) -> np.ndarray:
  """The rate-distortion plot of the table's rows, points in order of beta."""
  order = np.argsort([r["beta"] for r in rows])
  return pictures.rate_distortion_plot(
    np.array([rows[i]["rate"] for i in order]),
    np.array([rows[i]["distortion"] for i in order]),
    [f"beta={rows[i]['beta']:g}" for i in order],
    title="Test rate and distortion per beta (grey: equal ELBO; red: best)",
    size=420,
  )


def write_outputs(rows, traversals, out_dir: pathlib.Path, docs_dir: pathlib.Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  docs_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  (out_dir / "results.json").write_text(
    json.dumps(
      {
        "units": "nats per test example; rate = E KL(q(z|x)||p(z)), distortion = "
        "-E_q log p(x|z), test_elbo = -(rate + distortion), log_likelihood = "
        "importance-weighted bound with num_importance_samples samples per example",
        "models": rows,
      },
      indent=2,
    )
    + "\n"
  )
  order = np.argsort([r["beta"] for r in rows])
  figure = rate_distortion_figure(rows)
  writers.save_png(docs_dir / "beta_sweep_rate_distortion.png", figure)

  panels, labels = [], []
  for (beta, seed), (images, dims, kl) in traversals.items():
    grid = pictures.upscale(writers.image_grid(images, columns=11), 2)
    row_labels = [f"z{d} KL {kl[d]:.2f}" for d in dims]
    head = f"beta={beta:g}, seed={seed}: one latent swept from -3 to 3, others at test image 0"
    labelled = pictures.label_rows(grid, row_labels, cell=56, pad=2, header=head)
    writers.save_png(out_dir / "traversals" / f"{sweep.model_name(beta, seed)}.png", labelled)
    top = writers.image_grid(images[: 3 * 11], columns=11)
    panels.append(top)
    labels += [f"beta={beta:g} z{d} KL {kl[d]:.1f}" for d in dims[:3]]
  combined = pictures.label_rows(
    np.concatenate(panels), labels, cell=28, pad=1, header="Top-3 latents by KL, -3..3"
  )
  writers.save_png(docs_dir / "beta_sweep_traversals.png", combined)

  lines = [
    "| beta | seed | test ELBO | rate | distortion | log p(x) (IS, K) | active units |",
    "|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for i in order:
    r = rows[i]
    lines.append(
      f"| {r['beta']:g} | {r['seed']} | {r['test_elbo']:.2f} | {r['rate']:.2f} | "
      f"{r['distortion']:.2f} | {r['log_likelihood']:.2f} +- {r['log_likelihood_se']:.2f} "
      f"(K={r['num_importance_samples']}) | {r['active_units']}/{r['latents']} |"
    )
  (docs_dir / "beta_sweep_table.md").write_text("\n".join(lines) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax reports every save step at INFO; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname
  )
  config = FLAGS.config
  start = time.perf_counter()
  try:
    sweep.train_sweep(config, FLAGS.workdir)
  except train.Preempted as e:
    logging.warning("%s Run the same command to resume.", e)
    raise SystemExit(train.EXIT_CODE_PREEMPTED) from e
  train_s = time.perf_counter() - start
  rows, traversals = evaluate_sweep(config, FLAGS.workdir, FLAGS.num_importance_samples)
  for r in rows:
    r["sweep_train_wall_s"] = train_s
  write_outputs(rows, traversals, pathlib.Path(FLAGS.out_dir), pathlib.Path(FLAGS.docs_dir))
  logging.info("Wrote %s and %s", FLAGS.out_dir, FLAGS.docs_dir)


if __name__ == "__main__":
  app.run(main)
