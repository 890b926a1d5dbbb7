"""disentanglement_lib's six objectives side by side on dSprites, one model each.

  python experiments/objectives_table.py --work_dir=runs/objectives \\
    --out_dir=results/dsprites_objectives

For each objective of ``configs/dsprites_sweep.py`` (beta-VAE, AnnealedVAE, FactorVAE,
DIP-VAE-I, DIP-VAE-II, beta-TCVAE), trains one model of its grid (``--values`` picks which;
seed 0) with the main command under the chosen protocol (``--protocol``, default ``cpu``),
evaluates it with ``--mode=evaluate`` (importance-sampled log-likelihood with
``--eval_num_samples``, the five disentanglement metrics), and writes
``--out_dir/table.json`` and ``table.md``. Each model's workdir is kept under
``--work_dir``: run the command again to resume an interrupted model (finished ones and
their evaluations are kept). ``--table_only`` writes ``table.md`` again from
``table.json``.
"""

import json
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from vae_jax import files

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", None, "Where each objective's workdir goes.")
flags.DEFINE_string("out_dir", None, "Where table.json and table.md go.")
flags.DEFINE_enum("protocol", "cpu", ["full", "cpu", "smoke"], "configs/dsprites_sweep.py's.")
flags.DEFINE_integer("eval_num_samples", 10, "K of the evaluation.")
flags.DEFINE_list(
  "values",
  ["beta_vae=4", "annealed=25", "factor=30", "dip_i=10", "dip_ii=10", "tcvae=6"],
  "objective=value: the model of each objective's grid to train.",
)
flags.DEFINE_list("extra", [], "More overrides for every run, e.g. config.num_epochs=2.")
flags.DEFINE_bool(
  "table_only", False, "Only write table.md again from --out_dir/table.json; train nothing."
)
flags.mark_flags_as_required(["out_dir"])

# objective -> (its argument of configs/dsprites_sweep.py, the swept field's override).
_ARGS = {
  "beta_vae": ("", "sweep.betas"),
  "annealed": ("annealed", "sweep.field_values"),
  "factor": ("factor", "sweep.field_values"),
  "dip_i": ("dip_i", "sweep.field_values"),
  "dip_ii": ("dip_ii", "sweep.field_values"),
  "tcvae": ("tcvae", "sweep.betas"),
}
METRICS = ("beta_vae", "factor_vae", "mig", "sap", "dci_disentanglement", "dci_completeness")


def _run(args: list[str]) -> None:
  done = subprocess.run([sys.executable, "-m", "vae_jax.main", *args], cwd=REPO)
  if done.returncode:
    raise SystemExit(f"vae_jax.main {' '.join(args)} exited with {done.returncode}.")


def write_table(rows: dict[str, dict], out_dir: pathlib.Path) -> None:
  """``out_dir/table.md``: one row per objective, from ``table.json``'s rows."""
  header = (
    "| objective | model | test ELBO | log p(x) (IS, K) | rate | distortion | active | "
    + " | ".join(METRICS)
  )
  lines = [header + " |", "|---" + "|---:" * (6 + len(METRICS)) + "|"]
  for name, r in rows.items():
    scores = " | ".join(f"{r[m]:.3f}" for m in METRICS)
    lines.append(
      f"| {name} | {r['model']} | {r['test_elbo']:.1f} | "
      f"{r['log_likelihood_nats']:.1f} (K={r['num_importance_samples']}) | {r['rate']:.1f} | "
      f"{r['distortion']:.1f} | {r['active_units']} | {scores} |"
    )
  files.atomic_write(out_dir / "table.md", "\n".join(lines) + "\n")


def main(argv):
  del argv
  out_dir = files.expand(FLAGS.out_dir)
  if FLAGS.table_only:
    write_table(json.loads((out_dir / "table.json").read_text()), out_dir)
    print(f"Wrote {out_dir / 'table.md'}")
    return
  if FLAGS.work_dir is None:
    raise app.UsageError("--work_dir is required to train (or pass --table_only).")
  work = files.expand(FLAGS.work_dir)
  rows = {}
  for item in FLAGS.values:
    objective, value = item.split("=")
    arg, field = _ARGS[objective]
    spec = f"configs/dsprites_sweep.py:{FLAGS.protocol}" + (f",{arg}" if arg else "")
    workdir = work / objective
    overrides = [f"--config.{field}=({float(value)},)", "--config.sweep.seeds=(0,)"]
    overrides += [f"--{o}" if o.startswith("config.") else o for o in FLAGS.extra]
    start = time.perf_counter()
    _run([f"--config={spec}", f"--workdir={workdir}", *overrides, "--config.progress_bar=False"])
    train_s = time.perf_counter() - start
    _run(
      [
        f"--workdir={workdir}",
        "--mode=evaluate",
        f"--eval_num_samples={FLAGS.eval_num_samples}",
        "--config.progress_bar=False",
      ]
    )
    (model_dir,) = (workdir / "models").iterdir()
    result = json.loads(max((model_dir / "eval").glob("*.json")).read_text())
    test = result["test"]
    rows[objective] = {
      "config": spec,
      "model": model_dir.name,
      "objective": result["objective"],
      "checkpoint_step": result["checkpoint_step"],
      "log_likelihood_nats": -test["log_likelihood"]["nll_nats"],
      "num_importance_samples": result["num_importance_samples"],
      "test_elbo": test["elbo"],
      "rate": test["rate"],
      "distortion": test["distortion"],
      "active_units": test["active_units"],
      **{m: result["disentanglement"][m] for m in METRICS},
      "train_wall_s": train_s,
      "machine": result["machine"],
    }
    print(json.dumps({objective: rows[objective]}, indent=1), flush=True)
  out_dir.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out_dir / "table.json", json.dumps(rows, indent=1) + "\n")
  write_table(rows, out_dir)
  print(f"Wrote {out_dir}")


if __name__ == "__main__":
  app.run(main)
