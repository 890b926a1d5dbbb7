"""Fingerprints of short CPU runs: the final parameters' hash and the test ELBO of each.

  python experiments/fingerprint.py --out=results/fingerprints/after.json
  python experiments/fingerprint.py \
    --compare=results/fingerprints/before.json,results/fingerprints/after.json

Every config's ``:smoke`` variant (and a few overrides that reach the training
aids: DReG, free bits, EMA, early stopping, sweep schedules) is trained as a
user would run it, ``python -m vae_jax.main --config=...:smoke``, on the tiny
real-MNIST fixture (400 training and 100 test digits in
``tests/fixtures/mnist_tiny``), in a fresh workdir. The latest checkpoint is
then read back with Orbax directly (no vae_jax code), and its parameter leaves
are hashed (SHA-256 over sorted paths, dtypes, shapes and bytes). A refactor
that leaves the arithmetic alone leaves every hash unchanged; ``--compare``
prints the runs whose hash or test ELBO differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "mnist_tiny"
FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the fingerprints (JSON).")
flags.DEFINE_string("compare", None, "Two fingerprint files, comma-separated: print differences.")
flags.DEFINE_string("only", None, "Run only the cases whose name contains this.")

# name -> (config argument, overrides). Every run reads the fixture as "mnist".
CASES: dict[str, tuple[str, list[str]]] = {
  "mnist": ("configs/mnist.py:smoke", []),
  "fashion_mnist": ("configs/fashion_mnist.py:smoke", []),
  "fashion_mnist_2d": ("configs/fashion_mnist_2d.py:smoke", []),
  "fashion_mnist_ae": ("configs/fashion_mnist_ae.py:smoke", []),
  "fashion_mnist_continuous": ("configs/fashion_mnist_continuous.py:smoke", []),
  "likelihood_mlp": ("configs/fashion_mnist_likelihood.py:legacy_mlp,smoke", []),
  "likelihood_hvae": ("configs/fashion_mnist_likelihood.py:legacy_hvae,smoke", []),
  "likelihood_conv_hvae": ("configs/fashion_mnist_likelihood.py:legacy_conv_hvae,smoke", []),
  "protocol_vae": ("configs/fashion_mnist_likelihood.py:vae,smoke", []),
  "protocol_vae_vampprior": ("configs/fashion_mnist_likelihood.py:vae_vampprior,smoke", []),
  "protocol_hvae": ("configs/fashion_mnist_likelihood.py:hvae,smoke", []),
  "protocol_hvae_vampprior": ("configs/fashion_mnist_likelihood.py:hvae_vampprior,smoke", []),
  "protocol_vae_iwae": ("configs/fashion_mnist_likelihood.py:vae,iwae,smoke", []),
  "iwae_vae1": ("configs/iwae_mnist.py:vae1,smoke", []),
  "iwae_iwae1": ("configs/iwae_mnist.py:iwae1,smoke", []),
  "iwae_vae2": ("configs/iwae_mnist.py:vae2,smoke", []),
  "iwae_iwae2": ("configs/iwae_mnist.py:iwae2,smoke", []),
  "iwae1_dreg": ("configs/iwae_mnist.py:iwae1,smoke", ["--config.gradient_estimator=dreg"]),
  "free_bits_ema": (
    "configs/fashion_mnist.py:smoke",
    ["--config.free_bits=0.1", "--config.optimizer.ema_decay=0.9"],
  ),
  "early_stopping_warmup": (
    "configs/fashion_mnist.py:smoke",
    [
      "--config.validation_examples=100",
      "--config.early_stopping_patience_epochs=1",
      "--config.kl_warmup_epochs=1",
      "--config.num_epochs=4",
    ],
  ),
  "sweep": ("configs/beta_sweep.py:smoke", []),
  # Before the redesign these were --config.sweep.schedule=warmup (warmup_steps=5000)
  # and =capacity (capacity_nats=25, capacity_steps=20000); the smoke run has 12
  # steps per epoch, so these epochs are the same numbers of steps.
  "sweep_warmup": ("configs/beta_sweep.py:smoke", ["--config.kl_warmup_epochs=416.6666666666667"]),
  "sweep_capacity": (
    "configs/beta_sweep.py:smoke",
    ["--config.capacity_nats=25", "--config.capacity_epochs=1666.6666666666667"],
  ),
}

# How a sweep config is trained. Before the one-loop redesign (commit 0091dbe)
# the main command did not run sweeps (it trained one model), so the "before"
# fingerprints were taken with --sweep_command=train_sweep (vae_jax.sweep.train_sweep);
# since then, `python -m vae_jax.main` runs sweeps.
flags.DEFINE_enum("sweep_command", "main", ["main", "train_sweep"], "How sweeps are started.")


def hash_params(tree) -> str:
  """SHA-256 over the sorted (path, dtype, shape, bytes) of every array leaf."""
  leaves = []

  def walk(node, path):
    if isinstance(node, dict):
      for k in node:
        walk(node[k], f"{path}/{k}")
    elif isinstance(node, list | tuple):
      for i, v in enumerate(node):
        walk(v, f"{path}/{i}")
    else:
      leaves.append((path, np.asarray(node)))

  walk(tree, "")
  h = hashlib.sha256()
  for path, a in sorted(leaves, key=lambda t: t[0]):
    h.update(path.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def read_checkpoint(checkpoints: pathlib.Path) -> tuple[int, dict]:
  import orbax.checkpoint as ocp

  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  step = steps[-1]
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(checkpoints / str(step) / "default")
  return step, tree


def last_test_elbo(metrics: pathlib.Path) -> float:
  rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  return [r["elbo"] for r in rows if r["split"] == "test"][-1]


def run_case(name: str, config_arg: str, overrides: list[str], tfds_dir: str) -> dict:
  workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"fp_{name}_"))
  args = [
    f"--config={REPO / config_arg.split(':')[0]}:{config_arg.split(':')[1]}",
    f"--workdir={workdir}",
    "--config.dataset=mnist",
    f"--config.data_dir={tfds_dir}",
    "--config.progress_bar=False",
    *overrides,
  ]
  sweep = "beta_sweep" in config_arg
  if sweep and FLAGS.sweep_command == "train_sweep":
    code = (
      "import sys; from absl import flags; from ml_collections import config_flags\n"
      "config_flags.DEFINE_config_file('config')\n"
      "flags.DEFINE_string('workdir', None, '')\n"
      "flags.FLAGS(sys.argv)\n"
      "from vae_jax import sweep\n"
      "sweep.train_sweep(flags.FLAGS.config, flags.FLAGS.workdir)\n"
    )
    cmd = [sys.executable, "-c", code, *args]
  else:
    cmd = [sys.executable, "-m", "vae_jax.main", *args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    return {"error": proc.stderr[-2000:], "command": " ".join(cmd[1:])}
  step, tree = read_checkpoint(workdir / "checkpoints")
  out = {"command": " ".join(["python", *cmd[1:]]), "step": step, "wall_s": round(seconds, 1)}
  if sweep:
    models = tree["models"] if isinstance(tree, dict) else tree[1]
    params = models["params"] if isinstance(models, dict) else models[1]
    out["params_sha256"] = hash_params(params)
    out["test_elbo"] = {
      d.name: last_test_elbo(d / "metrics.jsonl") for d in sorted((workdir / "models").iterdir())
    }
  else:
    params = tree["params"] if isinstance(tree, dict) else tree[1]
    out["params_sha256"] = hash_params(params)
    out["test_elbo"] = last_test_elbo(workdir / "metrics.jsonl")
  return out


def compare(a_path: str, b_path: str) -> int:
  a, b = (json.loads(pathlib.Path(p).read_text())["runs"] for p in (a_path, b_path))
  differ = 0
  for name in sorted(set(a) | set(b)):
    ra, rb = a.get(name, {}), b.get(name, {})
    same = ra.get("params_sha256") == rb.get("params_sha256") and ra.get("test_elbo") == rb.get(
      "test_elbo"
    )
    differ += not same
    print(
      f"{'same   ' if same else 'DIFFERS'} {name}: "
      f"{ra.get('params_sha256', '-')[:12]} {ra.get('test_elbo')} -> "
      f"{rb.get('params_sha256', '-')[:12]} {rb.get('test_elbo')}"
    )
  return differ


def main(argv):
  del argv
  if FLAGS.compare:
    a, b = FLAGS.compare.split(",")
    raise SystemExit(1 if compare(a, b) else 0)
  if not FLAGS.out:
    raise app.UsageError("Give --out (or --compare).")
  tfds_dir = tempfile.mkdtemp(prefix="fp_tfds_")
  subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys; from vae_jax import datasets; "
      "datasets.load('mnist', data_dir=sys.argv[1], idx_dir=sys.argv[2])",
      tfds_dir,
      str(FIXTURE),
    ],
    check=True,
  )
  runs = {}
  for name, (config_arg, overrides) in CASES.items():
    if FLAGS.only and FLAGS.only not in name:
      continue
    runs[name] = run_case(name, config_arg, overrides, tfds_dir)
    print(name, runs[name].get("params_sha256", runs[name].get("error")), flush=True)
  import jax

  result = {
    "what": "final-parameter SHA-256 and last test ELBO of each smoke run (tiny MNIST fixture)",
    "git_commit": subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip(),
    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__},
    "runs": runs,
  }
  out = pathlib.Path(FLAGS.out).expanduser()
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
