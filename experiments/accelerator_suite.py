"""What a GPU can tell us, in one command: five phases, each within a time budget.

  python experiments/accelerator_suite.py --out_dir=OUT --work_dir=WORK

Phases, in order of value (``--phases`` picks some; each is a JSON file in ``--out_dir``):

a. speed (``phase_a.json``): ``experiments/benchmark.py`` on the default run
   (``configs/fashion_mnist.py``, threshold-binarized, 10 epochs) against the jitted Flax
   anchor (``experiments/flax_anchor.py``) on the same device: steady-state examples/s,
   matmul rates, and whole processes side by side with their wall-time ratio; at batch 128
   and at ``--large_batch`` (4096, a batch that fills the device).
b. sweeps (``phase_b.json``): ``experiments/sweep_benchmark.py`` at 1, 8, 32 and 128 models:
   the cost of one step of the sweep and of one model-step, against one model's step
   (single runs are timed beside the sweep up to 8 models; larger sweeps alone,
   ``--nosequential``).
c. likelihood table (``phase_c.json``): the rows of ``configs/fashion_mnist_likelihood.py``
   that the CPU could not train (VampPrior, HVAE, HVAE with VampPrior), each to its early
   stop and evaluated with K = 5000 by ``experiments/likelihood_table.py``, then IWAE
   fine-tuning of the best of them (``--iwae_finetune_epochs`` epochs of the k = 5 bound at
   learning rate 1e-4, in a copy of its workdir). Resumable: the runs live in
   ``WORK/c/runs``; a phase cut by its budget stops its run with SIGTERM (which saves a
   checkpoint), and the same command continues it. Rows already in ``WORK/c/table/table.json``
   are kept, not trained again.
d. dSprites (``phase_d.json``): the ``full`` protocol sweep of ``configs/dsprites_sweep.py``
   (18 models, 299,520 steps) as far as its budget goes, resumable as phase c. It needs the
   published npz (``DATA_ROOT/dsprites/`` or ``DATA_ROOT``); without it the phase is
   recorded as skipped, with the reason.
e. determinism (``phase_e.json``): two identical short runs of the default config (separate
   processes, no compilation cache) and whether their parameters are bit-identical; a run
   of N steps against N/2 steps and a resume to N; the XLA_FLAGS in effect; the test ELBO at
   ``matmul_precision`` "default" against "highest"; on a GPU, the identical pair again with
   ``--xla_gpu_deterministic_ops=true``.

How it runs: this process never starts JAX's backend. A probe process records the machine
(JAX version, backend, devices); then each phase runs in a worker process (this script with
``--worker``), which runs the scripts above as its own children. A phase's time is its
budget plus whatever the phases before it left unused (the last phase: all that is left),
and never past ``--budget_s`` from the start. Near the end of that time the worker stops
its child (SIGTERM, then SIGKILL) and records the phase as ``cut``; at the end the suite
kills the worker's whole process tree whatever state it is in. A phase that fails records
its error; the next phase runs either way. Each phase file is written atomically (a unique
temporary name, then ``os.replace``) as the phase goes and when it ends, and ``suite.json``
(machine, environment, each phase's status ``ok``/``cut``/``failed``/``skipped`` and wall
time, the goals) after every phase, so an interrupted suite still leaves its JSON. At most
six files go to ``--out_dir``; logs, the benchmarks' own JSON, workdirs and prepared data
stay in ``--work_dir``.

Data: the four Fashion-MNIST IDX files in ``DATA_ROOT/fashion-mnist`` (or the system's
``/usr/share/datasets/fashion-mnist``); ``experiments/accelerator_wheels.sh`` puts them in
``.accel/data``, the default ``--data_root``. Children get
``XLA_PYTHON_CLIENT_MEM_FRACTION=--gpu_memory_fraction`` unless the environment sets how
JAX takes GPU memory, so a benchmark and the runs it starts fit on one device together.

``--dry_run`` runs every phase at tiny sizes on the tests' 400-digit MNIST fixture
(``tests/fixtures/mnist_tiny``) and the rendered ``dsprites_smoke`` grid, on any machine:
``tests/test_accelerator_suite.py`` runs it on the CPU so the suite cannot rot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback

from absl import app, flags, logging

from vae_jax import dsprites, files, locks, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "mnist_tiny"
SYSTEM_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
DSPRITES_FILE = dsprites.PUBLISHED_FILENAME
# The environment as this process found it: children get it (plus what run() adds).
ORIGINAL_ENV = dict(os.environ)

PHASES = {
  "a": "speed: the default run and steady state against the jitted Flax anchor",
  "b": "sweeps: per-step cost of 1, 8, 32 and 128 models against one model",
  "c": "likelihood table: VampPrior, HVAE and HVAE-VampPrior rows, IWAE fine-tuning",
  "d": "dSprites: the full protocol sweep, as far as the budget goes",
  "e": "determinism: identical runs, resume, matmul precision",
}
# Seconds each phase is given (plus what earlier phases left unused); about 9 minutes in all.
DEFAULT_BUDGETS = {"a": 170, "b": 100, "c": 120, "d": 40, "e": 100}
STATUSES = ("ok", "cut", "failed", "skipped")
# What the children's environment says about devices and numerics, recorded in suite.json.
ENV_KEYS = (
  "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS",
  "JAX_DEFAULT_MATMUL_PRECISION", "JAX_ENABLE_X64",
)  # fmt: skip
# Rows of configs/fashion_mnist_likelihood.py: (argument, name in the table, published NLL).
LIKELIHOOD_ROWS = (
  ("vae_vampprior", "VAE, VampPrior", 227.35),
  ("hvae", "HVAE, Gaussian prior", 227.37),
  ("hvae_vampprior", "HVAE, VampPrior", 226.72),
)
IWAE_ROW = "IWAE k=5 fine-tuning of the best row"

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "out_dir", None, "Where suite.json and phase_<x>.json go (on a device machine: $OUT)."
)
flags.DEFINE_string(
  "work_dir",
  "~/.cache/vae_jax/accelerator_suite",
  "Logs, the benchmarks' JSON, prepared data and the resumable runs of phases c and d.",
)
flags.DEFINE_string(
  "data_root",
  str(REPO / ".accel" / "data"),
  "Holds fashion-mnist/ (the four IDX files) and, for phase d, dsprites/ (the npz).",
)
flags.DEFINE_bool("dry_run", False, "Every phase at tiny sizes on the tests' fixtures.")
flags.DEFINE_list("phases", list(PHASES), "The phases to run, in the order a to e.")
flags.DEFINE_float("budget_s", 540.0, "Seconds for the whole suite, from its start.")
flags.DEFINE_list(
  "phase_budgets",
  [],
  "Budgets in seconds that replace the defaults "
  + ", ".join(f"{k}={v}" for k, v in DEFAULT_BUDGETS.items())
  + " (e.g. c=300). Scaled down together if they sum to more than --budget_s.",
)
flags.DEFINE_integer("large_batch", None, "Phase a's large batch (default 4096; dry run 256).")
flags.DEFINE_integer("pairs", None, "Phase a's anchor/project pairs (default 2; dry run 1).")
flags.DEFINE_list("sweep_models", None, "Phase b's sweep sizes (default 1,8,32,128; dry 1,3).")
flags.DEFINE_integer("num_importance_samples", None, "Phase c's K (default 5000; dry run 3).")
flags.DEFINE_integer(
  "iwae_finetune_epochs", None, "Phase c's epochs of IWAE fine-tuning (default 50; dry 1)."
)
flags.DEFINE_float(
  "gpu_memory_fraction",
  0.3,
  "XLA_PYTHON_CLIENT_MEM_FRACTION for each child, unless the environment sets it (or "
  "XLA_PYTHON_CLIENT_PREALLOCATE).",
)
flags.DEFINE_list(
  "stub_sleep",
  [],
  "For tests: these phases run a child that sleeps instead of their work: the worker cuts "
  "them at their deadline.",
)
flags.DEFINE_list(
  "stub_hang",
  [],
  "For tests: these phases' workers start a sleeping child and then hang themselves: the "
  "suite kills the whole tree at the end of their time.",
)
flags.DEFINE_string("worker", None, "Internal: run this one phase (the suite starts workers).")
flags.DEFINE_float("deadline", None, "Internal: the worker's end, in time.time() seconds.")
flags.mark_flags_as_required(["out_dir"])


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How big each phase's work is: the real suite's, or the dry run's."""

  epochs: int  # a: end-to-end epochs of each run.
  at_128: bool  # a: batch 128 before the large batch (the dry run: the large batch alone).
  pairs: int  # a: anchor/project pairs per batch size.
  large_batch: int  # a.
  benchmark_flags: tuple[str, ...]  # a: extra benchmark.py flags.
  sweep_models: tuple[int, ...]  # b.
  sequential_max: int  # b: single runs are timed beside sweeps of up to this many models.
  sweep_steps: int  # b.
  sweep_repeats: int  # b.
  likelihood_rows: tuple[str, ...]  # c: arguments of LIKELIHOOD_ROWS.
  num_importance_samples: int  # c.
  iwae_finetune_epochs: int  # c.
  determinism_steps: int  # e: N (the resumed run stops at N / 2 first).


REAL = Sizes(
  epochs=10,
  at_128=True,
  pairs=2,
  large_batch=4096,
  benchmark_flags=(),
  sweep_models=(1, 8, 32, 128),
  sequential_max=8,
  sweep_steps=400,
  sweep_repeats=3,
  likelihood_rows=tuple(arg for arg, _, _ in LIKELIHOOD_ROWS),
  num_importance_samples=5000,
  iwae_finetune_epochs=50,
  determinism_steps=400,
)
# Every code path once, at sizes two busy CPU cores run in about two minutes: one batch size
# (batch 128's benchmark is tests/test_benchmark.py's), one likelihood row (the VAE with the
# VampPrior) and its IWAE fine-tuning.
DRY = Sizes(
  epochs=1,
  at_128=False,
  pairs=1,
  large_batch=256,
  benchmark_flags=("--repeats=2", "--dispatches=2", "--square=128", "--matmul_gflop_per_call=0.02"),
  sweep_models=(1, 3),
  sequential_max=1,
  sweep_steps=8,
  sweep_repeats=2,
  likelihood_rows=("vae_vampprior",),
  num_importance_samples=3,
  iwae_finetune_epochs=1,
  determinism_steps=8,
)


def sizes() -> Sizes:
  base = DRY if FLAGS.dry_run else REAL
  models = tuple(int(m) for m in FLAGS.sweep_models or ())
  return dataclasses.replace(
    base,
    large_batch=FLAGS.large_batch or base.large_batch,
    pairs=FLAGS.pairs or base.pairs,
    sweep_models=models or base.sweep_models,
    num_importance_samples=FLAGS.num_importance_samples or base.num_importance_samples,
    iwae_finetune_epochs=FLAGS.iwae_finetune_epochs or base.iwae_finetune_epochs,
  )


def budgets() -> dict[str, float]:
  """Each selected phase's budget, scaled down together to fit ``--budget_s``."""
  chosen = dict(DEFAULT_BUDGETS)
  for item in FLAGS.phase_budgets:
    name, _, value = item.partition("=")
    if name not in PHASES or not value:
      raise app.UsageError(f"--phase_budgets: {item!r} is not <phase>=<seconds>.")
    chosen[name] = float(value)
  selected = {p: chosen[p] for p in PHASES if p in FLAGS.phases}
  total = sum(selected.values())
  scale = min(1.0, FLAGS.budget_s / total) if total else 1.0
  return {p: b * scale for p, b in selected.items()}


# --------------------------------------------------------------------------
# Processes.


def _children_of() -> dict[int, list[int]]:
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
    if not entry.isdigit():
      continue
    try:
      stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
    except OSError:
      continue
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    children.setdefault(ppid, []).append(int(entry))
  return children


def signal_group(pgid: int, sig: int) -> None:
  """Sends ``sig`` to process group ``pgid``, if any process of it is left."""
  try:
    os.killpg(pgid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
  """Sends ``sig`` to ``pid`` (a child not yet waited for: its pid cannot have been reused),
  every process below it, and its process group."""
  children, tree, todo = _children_of(), [], [pid]
  while todo:
    p = todo.pop()
    tree.append(p)
    todo += children.get(p, [])
  for p in tree:
    try:
      os.kill(p, sig)
    except (ProcessLookupError, PermissionError):
      pass
  signal_group(pid, sig)


def child_env(**extra: str) -> dict[str, str]:
  """The environment of every child: this process's as it started, the repository on
  PYTHONPATH, unbuffered output, and a share of GPU memory each (see the module doc)."""
  env = dict(ORIGINAL_ENV)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  if not {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(env):
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(FLAGS.gpu_memory_fraction)
  env.update(extra)
  return env


def _tail(path: pathlib.Path, chars: int = 3000) -> str:
  try:
    return path.read_text(errors="replace")[-chars:]
  except OSError:
    return ""


def _write_json(path: pathlib.Path, record: dict) -> None:
  files.atomic_write(path, json.dumps(record, indent=1, sort_keys=False, default=str) + "\n")


def _read_json(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


# --------------------------------------------------------------------------
# A phase, in its worker process.


class Cut(Exception):
  """The phase's time ran out."""


class Skip(Exception):
  """The phase cannot run here (the reason is the message)."""


class PhaseRun:
  """One phase's record, children and deadline, in the worker."""

  def __init__(self, phase: str, deadline: float):
    self.phase, self.deadline = phase, deadline
    self.sizes = sizes()
    self.dry = FLAGS.dry_run
    self.out_path = files.expand(FLAGS.out_dir) / f"phase_{phase}.json"
    self.work = files.expand(FLAGS.work_dir)
    self.dir = self.work / phase
    self.dir.mkdir(parents=True, exist_ok=True)
    self.logs = self.work / "logs"
    self.logs.mkdir(parents=True, exist_ok=True)
    self.errors: list[str] = []
    self.record = {
      "phase": phase,
      "title": PHASES[phase],
      "status": "running",
      "dry_run": self.dry,
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "results": {},
      "children": [],
    }

  @property
  def results(self) -> dict:
    return self.record["results"]

  def save(self) -> None:
    _write_json(self.out_path, self.record)

  def left(self) -> float:
    return self.deadline - time.time()

  # The data every phase but d reads: the fixture as "mnist" in a dry run.
  def data_flags(self) -> list[str]:
    tfds = f"--config.data_dir={self.work / 'tfds'}"
    if self.dry:
      return ["--config.dataset=mnist", f"--config.idx_dir={FIXTURE}", tfds]
    return [f"--config.idx_dir={self.idx_dir()}", tfds]

  def idx_dir(self) -> pathlib.Path:
    if self.dry:
      return FIXTURE
    for d in (files.expand(FLAGS.data_root) / "fashion-mnist", SYSTEM_FASHION_MNIST):
      if (d / "train-images-idx3-ubyte.gz").is_file():
        return d
    raise FileNotFoundError(
      f"No Fashion-MNIST IDX files in {files.expand(FLAGS.data_root) / 'fashion-mnist'} or "
      f"{SYSTEM_FASHION_MNIST}: run experiments/accelerator_wheels.sh (it copies them to "
      ".accel/data) or pass --data_root."
    )

  def run(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Runs ``cmd`` (in the repository) until it ends or the phase's time is nearly up.

    Out of time, the child's process group (it and what it started) gets SIGTERM (a
    training run saves a checkpoint and exits); whatever is left of it 15 s later, SIGKILL;
    and ``Cut`` is raised. Returns the child's entry (also appended to the record):
    command, return code, wall seconds, log.
    """
    log = self.logs / f"{self.phase}_{name}.log"
    entry = {"name": name, "command": " ".join(cmd), "log": str(log)}
    self.record["children"].append(entry)
    if self.left() <= 1:
      entry["status"] = "cut before it started"
      raise Cut(f"{name}: no time left")
    start = time.perf_counter()
    with open(log, "w") as out:
      proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env or child_env(),
        start_new_session=True,
      )  # fmt: skip
      try:
        proc.wait(timeout=max(self.left(), 0.1))
      except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGTERM)  # The child leads its own group.
        try:
          proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
          kill_tree(proc.pid)  # Still running: it and everything below it.
          proc.wait()
        signal_group(proc.pid, signal.SIGKILL)  # Whatever of its group outlived it.
        entry.update(status="cut", rc=proc.returncode, wall_s=time.perf_counter() - start)
        self.save()
        raise Cut(f"{name}: stopped at the phase's deadline") from None
    entry.update(rc=proc.returncode, wall_s=time.perf_counter() - start)
    entry["status"] = "ok" if proc.returncode == 0 else "failed"
    if proc.returncode != 0:
      entry["log_tail"] = _tail(log)
      self.errors.append(f"{name} exited with {proc.returncode}; see {log}")
    self.save()
    return entry

  def finish(self, status: str, error: str | None = None) -> None:
    if status == "ok" and self.errors:
      status = "failed"
    self.record["status"] = status
    if error or self.errors:
      self.record["error"] = "\n".join([*self.errors, *([error] if error else [])])
    self.record["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
    self.save()


PY = sys.executable


def phase_a(pr: PhaseRun) -> None:
  """benchmark.py at batch 128, then at the large batch; each JSON embedded whole, as
  ``batch_<size>``, with the speed-ups over the anchor (the inverse wall-time ratios)."""
  s = pr.sizes
  for batch in (128, s.large_batch) if s.at_128 else (s.large_batch,):
    label = f"batch_{batch}"
    out = pr.dir / f"benchmark_{label}.json"
    out.unlink(missing_ok=True)
    cmd = [
      PY, "experiments/benchmark.py", "--config=configs/fashion_mnist.py",
      "--config.binarization=threshold", *pr.data_flags(), f"--config.batch_size={batch}",
      f"--anchor_idx_dir={pr.idx_dir()}", f"--end_to_end_epochs={s.epochs}",
      f"--pairs={s.pairs}", *s.benchmark_flags, f"--out={out}",
    ]  # fmt: skip
    if pr.run(label, cmd)["status"] == "ok":
      result = json.loads(out.read_text())
      e2e = result.get("end_to_end", {})
      if e2e:
        result["speedup_over_anchor"] = {
          "cold": 1 / e2e["median_cold_ratio"],
          "warm": 1 / e2e["median_warm_ratio"],
        }
      pr.results[label] = result
      pr.save()


def phase_b(pr: PhaseRun) -> None:
  """sweep_benchmark.py per sweep size; one model's step from the single runs beside it."""
  s = pr.sizes
  config = "configs/beta_sweep.py:smoke" if pr.dry else "configs/beta_sweep.py"
  for m in s.sweep_models:
    out = pr.dir / f"sweep_{m}.json"
    out.unlink(missing_ok=True)
    sequential = "--sequential" if m <= s.sequential_max else "--nosequential"
    cmd = [
      PY, "experiments/sweep_benchmark.py", f"--config={config}", *pr.data_flags(),
      f"--num_models={m}", f"--steps={s.sweep_steps}", f"--repeats={s.sweep_repeats}",
      sequential, f"--out={out}",
    ]  # fmt: skip
    if pr.run(f"models_{m}", cmd)["status"] == "ok":
      pr.results[f"models_{m}"] = json.loads(out.read_text())
      pr.results["summary"] = sweep_summary(pr.results)
      pr.save()


def sweep_summary(results: dict) -> dict:
  """Per sweep size: one sweep step and one model-step, against one model's step (the single
  runs timed beside that sweep, else those beside the smallest sweep that had them)."""
  runs = {int(k.split("_")[1]): v for k, v in results.items() if k.startswith("models_")}
  singles = {m: r["per_model_step_s_median"]["sequential"] for m, r in runs.items()}
  fallback = next((singles[m] for m in sorted(singles) if singles[m]), None)
  out = {}
  for m, r in sorted(runs.items()):
    one = singles[m] or fallback
    step = r["sweep_step_s_median"]
    out[str(m)] = {
      "sweep_step_s": step,
      "per_model_step_s": r["per_model_step_s_median"]["sweep"],
      "one_model_step_s": one,
      "sweep_step_over_one_model_step": step / one if one else None,
      "per_model_step_over_one_model_step": step / m / one if one else None,
    }
  return out


def _metrics(workdir: pathlib.Path) -> list[dict]:
  """The rows of ``workdir``'s ``metrics.jsonl`` (none without one; a torn line dropped)."""
  return writers.read_metrics(workdir / "metrics.jsonl")


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def row_progress(workdir: pathlib.Path) -> dict:
  """How far a likelihood run got: its epochs (validation rows) and best validation -ELBO."""
  val = [r for r in _metrics(workdir) if r.get("split") == "validation"]
  steps = _checkpoint_steps(workdir)
  out = {"epochs_completed": len(val), "latest_checkpoint_step": steps[-1] if steps else None}
  if val:
    best = max(range(len(val)), key=lambda i: val[i]["elbo"])
    out.update(best_validation_neg_elbo=-val[best]["elbo"], best_epoch=best + 1)
  return out


def phase_c(pr: PhaseRun) -> None:
  """The likelihood rows in order, each trained to its early stop and evaluated; then IWAE
  fine-tuning of the best. Finished rows (in table.json at this K) are kept."""
  s, k = pr.sizes, pr.sizes.num_importance_samples
  runs, table_dir = pr.dir / "runs", pr.dir / "table"
  rows = pr.results.setdefault("rows", {})

  def table() -> dict:
    return _read_json(table_dir / "table.json") or {}

  def finished(name: str) -> dict | None:
    row = table().get(name)
    ok = row and "nll_nats" in row and row.get("num_importance_samples") == k
    return row if ok else None

  def train_row(name: str, arg: str, workdir: pathlib.Path, extra: list[str], paper) -> None:
    kept = finished(name)
    if kept:
      rows[name] = {"status": "kept", **_row_numbers(kept)}
      return
    before = row_progress(workdir)
    cmd = [
      PY, "experiments/likelihood_table.py",
      f"--config=configs/fashion_mnist_likelihood.py:{arg}{',smoke' if pr.dry else ''}",
      *pr.data_flags(), "--config.progress_bar=False", f"--workdir={workdir}",
      f"--name={name}", f"--num_importance_samples={k}", f"--out_dir={table_dir}", *extra,
      *([f"--paper_nll={paper}"] if paper is not None else []),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
      entry = pr.run(name.replace(" ", "_").replace(",", "").replace("=", ""), cmd)
    except Cut:
      rows[name] = _progress_entry("cut", workdir, before, time.perf_counter() - start)
      raise
    done = finished(name)
    status = "finished" if done else "failed"
    rows[name] = {
      **_progress_entry(status, workdir, before, entry["wall_s"]),
      **(_row_numbers(done) if done else {}),
    }
    pr.save()

  chosen = [row for row in LIKELIHOOD_ROWS if row[0] in s.likelihood_rows]
  for arg, name, paper in chosen:
    train_row(name, arg, runs / f"fm_{arg}", [], paper)
    pr.results["table_md"] = _tail(table_dir / "table.md", 10000)
    pr.save()

  # IWAE fine-tuning of the best finished row, in a copy of its workdir.
  target = runs / "iwae_finetune"
  base_path = runs / "iwae_finetune_base.json"
  base = _read_json(base_path)
  if base is None:
    done = {a: finished(n) for a, n, _ in chosen}
    if not all(done.values()):
      rows[IWAE_ROW] = {"status": "waiting for the rows above to finish"}
      return
    arg = min(done, key=lambda a: done[a]["nll_nats"])
    source = runs / f"fm_{arg}"
    epochs = row_progress(source)["epochs_completed"]
    shutil.rmtree(target, ignore_errors=True)
    # Not its best parameters, evaluations or figures: the fine-tuning's own are kept.
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("best", "eval", "figures"))
    base = {"arg": arg, "name": dict((a, n) for a, n, _ in LIKELIHOOD_ROWS)[arg], "epochs": epochs}
    _write_json(base_path, base)
  extra = [
    "--allow_config_change",
    "--config.optimizer.learning_rate=1e-4",
    "--config.early_stopping_patience_epochs=0",
    f"--config.num_epochs={base['epochs'] + s.iwae_finetune_epochs}",
  ]
  try:
    train_row(IWAE_ROW, f"{base['arg']},iwae", target, extra, None)
  finally:
    rows[IWAE_ROW]["base_row"] = base["name"]
    pr.results["table_md"] = _tail(table_dir / "table.md", 10000)


def _row_numbers(row: dict) -> dict:
  keys = (
    "nll_nats", "standard_error_nats", "num_importance_samples", "paper_nll", "test_neg_elbo",
    "active_units", "checkpoint_step", "workdir",
  )  # fmt: skip
  return {k: row.get(k) for k in keys}


def _progress_entry(status: str, workdir: pathlib.Path, before: dict, wall_s: float) -> dict:
  after = row_progress(workdir)
  epochs = after["epochs_completed"] - before["epochs_completed"]
  return {
    "status": status,
    **after,
    "epochs_this_call": epochs,
    "wall_s_this_call": wall_s,
    "seconds_per_epoch_this_call": wall_s / epochs if epochs else None,
  }


def phase_d(pr: PhaseRun) -> None:
  """The dSprites sweep (smoke grid in a dry run), resumed from its workdir."""
  tfds = pr.work / "tfds"
  if pr.dry:
    config, data = "configs/dsprites_sweep.py:smoke", []
  else:
    root = files.expand(FLAGS.data_root)
    candidates = (root / "dsprites" / DSPRITES_FILE, root / DSPRITES_FILE)
    npz = next((p for p in candidates if p.is_file()), None)
    prepared = list(tfds.glob("dsprites_images/dsprites/*/dataset_info.json"))
    if npz is None and not prepared:
      raise Skip(
        f"The published dSprites file {DSPRITES_FILE} is not in {root / 'dsprites'} (or "
        f"{root}) and no prepared copy is in {tfds}: no dataset can be downloaded on the "
        "device machine. Put the file there (experiments/accelerator_wheels.sh "
        "--with-dsprites FILE) and run the suite with --phases=d."
      )
    config = "configs/dsprites_sweep.py"
    data = [f"--config.idx_dir={npz.parent}"] if npz else []
  workdir = pr.dir / "dsprites_full"
  before, timings, t0 = _checkpoint_steps(workdir), workdir / "timings.json", time.time()
  cmd = [
    PY, "-m", "vae_jax.main", f"--config={config}", f"--workdir={workdir}", *data,
    f"--config.data_dir={tfds}", "--config.progress_bar=False",
  ]  # fmt: skip
  pr.results.update(config=config, workdir=str(workdir))
  try:
    entry = pr.run("dsprites", cmd)
  finally:
    after = _checkpoint_steps(workdir)
    models = sorted((workdir / "models").glob("*/metrics.jsonl"))
    train = [r for r in _metrics(models[0].parent) if r.get("split") == "train"] if models else []
    pr.results.update(
      latest_checkpoint_step_before=before[-1] if before else None,
      latest_checkpoint_step=after[-1] if after else None,
      # The first model's last training row (its step and examples/s), and where the
      # process's seconds went (vae_jax.loop.Stopwatch's file, written by a run that ends,
      # not by one that SIGTERM stops).
      last_train_row=train[-1] if train else None,
      timings=_read_json(timings) if timings.is_file() and timings.stat().st_mtime > t0 else None,
      log_tail=_tail(pr.logs / "d_dsprites.log", 2000),
    )
  pr.results["finished"] = entry["status"] == "ok"


def hash_checkpoint(workdir: pathlib.Path) -> dict:
  """SHA-256 of the latest checkpoint's parameters and of its whole state."""
  import hashlib

  import numpy as np
  import orbax.checkpoint as ocp

  step = _checkpoint_steps(workdir)[-1]
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(workdir / "checkpoints" / str(step) / "default")

  def digest(node) -> str:
    leaves = []

    def walk(n, path):
      if isinstance(n, dict):
        for key in n:
          walk(n[key], f"{path}/{key}")
      elif isinstance(n, list | tuple):
        for i, v in enumerate(n):
          walk(v, f"{path}/{i}")
      else:
        leaves.append((path, np.asarray(n)))

    walk(node, "")
    h = hashlib.sha256()
    for path, a in sorted(leaves, key=lambda t: t[0]):
      h.update(f"{path} {a.dtype} {a.shape}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

  params = tree["params"] if isinstance(tree, dict) else tree[1]
  return {"step": step, "params_sha256": digest(params), "state_sha256": digest(tree)}


def phase_e(pr: PhaseRun) -> None:
  """Identical runs, a resume, two matmul precisions; on a GPU, deterministic ops too."""
  n = pr.sizes.determinism_steps
  shutil.rmtree(pr.dir, ignore_errors=True)  # Fresh runs every call.
  pr.dir.mkdir(parents=True)
  xla_flags = ORIGINAL_ENV.get("XLA_FLAGS", "")
  pr.results.update(
    xla_flags_in_effect=xla_flags,
    jax_default_matmul_precision_env=ORIGINAL_ENV.get("JAX_DEFAULT_MATMUL_PRECISION"),
    steps=n,
  )
  config = "configs/fashion_mnist.py:smoke" if pr.dry else "configs/fashion_mnist.py"
  base = [
    PY, "-m", "vae_jax.main", f"--config={config}", *pr.data_flags(),
    "--config.progress_bar=False", "--config.num_image_samples=0", "--compilation_cache=",
  ]  # fmt: skip
  runs: dict[str, dict] = {}
  pr.results["runs"] = runs

  def train(name: str, steps: int, *extra: str, workdir: str | None = None, env=None) -> None:
    wd = pr.dir / (workdir or name)
    cmd = [*base, f"--workdir={wd}", f"--config.num_train_steps={steps}", *extra]
    entry = pr.run(name, cmd, env=env)
    runs[name] = {"wall_s": entry["wall_s"], "ok": entry["status"] == "ok", "workdir": str(wd)}
    if entry["status"] == "ok":
      tests = [r for r in _metrics(wd) if r.get("split") == "test"]
      runs[name]["test_neg_elbo"] = -tests[-1]["elbo"] if tests else None
    pr.save()

  train("first", n)
  train("second", n)
  train("half", n // 2, workdir="resumed")
  train("resumed", n)
  backend = _probe_backend()
  pr.results["backend"] = backend
  if backend != "cpu":  # On CPUs float32 products are full precision whatever it says.
    train("highest", n, "--config.matmul_precision=highest")
  if backend == "gpu":
    det = " ".join([xla_flags, "--xla_gpu_deterministic_ops=true"]).strip()
    env = child_env(XLA_FLAGS=det)
    pr.results["deterministic_ops_xla_flags"] = det
    train("deterministic_first", n, env=env)
    train("deterministic_second", n, env=env)

  for name, r in runs.items():
    if r["ok"] and name != "half":
      r.update(hash_checkpoint(pathlib.Path(r["workdir"])))

  def same(a: str, b: str, key: str = "params_sha256"):
    ra, rb = runs.get(a, {}), runs.get(b, {})
    return ra[key] == rb[key] if key in ra and key in rb else None

  pr.results["identical_runs_bit_identical"] = same("first", "second")
  pr.results["resume_bit_exact"] = same("first", "resumed")
  pr.results["resume_state_bit_exact"] = same("first", "resumed", "state_sha256")
  default, highest = (runs.get(k, {}).get("test_neg_elbo") for k in ("first", "highest"))
  pr.results["matmul_precision"] = {
    "config": "config.matmul_precision of training; test ELBOs are computed at 'highest'",
    "default_test_neg_elbo": default,
    "highest_test_neg_elbo": highest,
    "difference_nats": highest - default if None not in (default, highest) else None,
    "params_identical": same("first", "highest"),
  }
  if backend == "gpu":
    pr.results["deterministic_ops"] = {
      "identical_runs_bit_identical": same("deterministic_first", "deterministic_second"),
      "same_as_default_ops": same("first", "deterministic_first"),
    }


def _probe_backend() -> str | None:
  suite = _read_json(files.expand(FLAGS.out_dir) / "suite.json") or {}
  return (suite.get("machine") or {}).get("backend")


STUB = [PY, "-c", "import time; time.sleep(100000)"]


def phase_stub(pr: PhaseRun) -> None:
  pr.run("stub_sleep", STUB)


def phase_hang(pr: PhaseRun) -> None:
  subprocess.Popen(STUB, start_new_session=True)
  time.sleep(100000)  # Past any deadline: only the suite's kill ends this.


PHASE_FUNCTIONS = {"a": phase_a, "b": phase_b, "c": phase_c, "d": phase_d, "e": phase_e}


def worker_main(phase: str) -> None:
  pr = PhaseRun(phase, FLAGS.deadline)
  pr.save()
  try:
    if phase in FLAGS.stub_hang:
      phase_hang(pr)
    (phase_stub if phase in FLAGS.stub_sleep else PHASE_FUNCTIONS[phase])(pr)
  except Cut as e:
    pr.finish("cut", str(e))
  except Skip as e:
    pr.record["reason"] = str(e)
    pr.finish("skipped")
  except Exception:  # noqa: BLE001 - recorded; the suite goes on.
    pr.finish("failed", traceback.format_exc())
  else:
    pr.finish("ok")


# --------------------------------------------------------------------------
# The suite.

PROBE = """
import json, os, platform, subprocess, sys, time
start = time.perf_counter()
import jax, jaxlib
devices = jax.devices()
info = {
  "python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
  "backend": jax.default_backend(), "device_count": jax.device_count(),
  "device_kinds": sorted({d.device_kind for d in devices}),
  "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
  "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
  "jax_start_s": time.perf_counter() - start,
}
for name in ("flax", "optax", "orbax.checkpoint", "tensorflow_datasets", "numpy"):
  try:
    info[name] = __import__(name, fromlist=["_"]).__version__
  except Exception as e:
    info[name] = f"not importable: {e}"
try:
  info["nvidia_smi"] = subprocess.run(
    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
    capture_output=True, text=True, timeout=30).stdout.strip()
except OSError:
  pass
print("PROBE " + json.dumps(info))
"""

# (phase, what, where in the phase's results, comparison, target)
GOALS = (
  ("a", "default run end to end, speed-up over the jitted Flax anchor (warm cache)", ">=", 3.0),
  ("b", "one step of 8 sweep models / one step of one model", "<=", 1.5),
  ("c", "VAE, VampPrior: -log p(x), K = 5000 (nats)", "<=", 227.35),
  ("c", "HVAE, Gaussian prior: -log p(x), K = 5000 (nats)", "<=", 227.37),
  ("c", "HVAE, VampPrior: -log p(x), K = 5000 (nats)", "<=", 226.72),
)


def goal_values(out_dir: pathlib.Path, dry_run: bool) -> list[dict]:
  """Each goal with its measured value (``None``: not measured) and whether it is met
  (``None`` in a dry run, whose numbers measure nothing)."""

  def results(phase):
    return (_read_json(out_dir / f"phase_{phase}.json") or {}).get("results", {})

  def get(fn):
    try:
      return fn()
    except (KeyError, TypeError, ZeroDivisionError):
      return None

  rows = results("c").get("rows", {})
  values = [
    get(lambda: results("a")["batch_128"]["speedup_over_anchor"]["warm"]),
    get(lambda: results("b")["summary"]["8"]["sweep_step_over_one_model_step"]),
    *(get(lambda n=name: rows[n]["nll_nats"]) for _, name, _ in LIKELIHOOD_ROWS),
  ]
  out = []
  for (phase, what, op, target), value in zip(GOALS, values, strict=True):
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    met = None if dry_run else met
    out.append({"phase": phase, "goal": f"{what} {op} {target}", "value": value, "met": met})
  return out


def probe(work: pathlib.Path) -> dict:
  log = work / "logs" / "probe.log"
  try:
    result = subprocess.run(
      [PY, "-c", PROBE], capture_output=True, text=True, timeout=180, env=child_env()
    )
  except subprocess.TimeoutExpired:
    return {"error": "the probe took more than 180 s"}
  log.write_text(result.stdout + result.stderr)
  lines = [x for x in result.stdout.splitlines() if x.startswith("PROBE ")]
  if result.returncode != 0 or not lines:
    return {"error": f"the probe failed ({result.returncode}): {result.stderr[-2000:]}"}
  return json.loads(lines[-1].removeprefix("PROBE "))


def suite_main() -> None:
  unknown = [p for p in FLAGS.phases + FLAGS.stub_sleep + FLAGS.stub_hang if p not in PHASES]
  if unknown:
    raise app.UsageError(f"Unknown phases {unknown}; they are {', '.join(PHASES)}.")
  start = time.time()
  end = start + FLAGS.budget_s
  out_dir, work = files.expand(FLAGS.out_dir), files.expand(FLAGS.work_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (work / "logs").mkdir(parents=True, exist_ok=True)
  plan = budgets()
  with locks.exclusive(work / ".suite.lock", wait=False, what=f"the suite's work dir {work}"):
    suite = {
      "command": " ".join(["python", *sys.argv]),
      "dry_run": FLAGS.dry_run,
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "budget_s": FLAGS.budget_s,
      "phase_budgets_s": plan,
      "work_dir": str(work),
      "host": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
      "environment": {k: child_env().get(k) for k in ENV_KEYS},
      "phases": {p: {"status": "pending", "file": f"phase_{p}.json"} for p in plan},
    }
    suite_path = out_dir / "suite.json"

    def save():
      suite["wall_s"] = time.time() - start
      suite["goals"] = goal_values(out_dir, FLAGS.dry_run)
      _write_json(suite_path, suite)

    save()
    suite["machine"] = probe(work)
    save()
    logging.info("Machine: %s", suite["machine"])
    slack = 0.0
    for phase, budget in plan.items():
      last = phase == list(plan)[-1]  # The last phase may use all the time that is left.
      allotted = end - time.time() if last else min(budget + slack, end - time.time())
      entry = suite["phases"][phase]
      entry["allotted_s"] = allotted
      phase_path = out_dir / f"phase_{phase}.json"
      phase_path.unlink(missing_ok=True)
      if allotted < 5:
        entry.update(status="skipped", reason="no time left in --budget_s", wall_s=0.0)
        _write_json(phase_path, {"phase": phase, "title": PHASES[phase], **entry})
        save()
        continue
      entry["status"] = "running"
      save()
      logging.info("Phase %s (%.0f s): %s", phase, allotted, PHASES[phase])
      record = run_worker(phase, allotted, work)
      used = record["wall_s"]
      slack = max(0.0, allotted - used)
      entry.update(status=record["status"], wall_s=used)
      if "reason" in record:
        entry["reason"] = record["reason"]
      save()
      logging.info("Phase %s: %s after %.0f s", phase, record["status"], used)
    suite["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
  print(json.dumps({p: e["status"] for p, e in suite["phases"].items()}))


def run_worker(phase: str, allotted: float, work: pathlib.Path) -> dict:
  """Runs phase ``phase``'s worker for at most ``allotted`` seconds; returns its record,
  completed here if the worker could not (killed at the end of its time, or crashed)."""
  out_path = files.expand(FLAGS.out_dir) / f"phase_{phase}.json"
  log = work / "logs" / f"worker_{phase}.log"
  start = time.time()
  # The worker stops its children a little before the end, to record what they reached.
  margin = min(25.0, 0.2 * allotted)
  cmd = [PY, str(pathlib.Path(__file__).resolve()), *sys.argv[1:], f"--worker={phase}"]
  cmd.append(f"--deadline={start + allotted - margin}")
  killed = False
  with open(log, "w") as out:
    proc = subprocess.Popen(
      cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
      start_new_session=True,
    )  # fmt: skip
    try:
      proc.wait(timeout=allotted)
    except subprocess.TimeoutExpired:
      kill_tree(proc.pid)
      proc.wait()
      killed = True
  record = _read_json(out_path) or {"phase": phase, "title": PHASES[phase], "results": {}}
  if killed:
    record["status"] = "cut"
    record["error"] = f"the worker was stopped at the end of its {allotted:.0f} s"
  elif record.get("status") not in STATUSES:
    record["status"] = "failed"
    record["error"] = f"the worker exited with {proc.returncode}:\n{_tail(log)}"
  record["wall_s"] = time.time() - start
  record["allotted_s"] = allotted
  _write_json(out_path, record)
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    worker_main(FLAGS.worker)
  else:
    suite_main()


if __name__ == "__main__":
  app.run(main)
