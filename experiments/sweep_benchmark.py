"""Is a sweep of M models in one program faster than M single runs one after another?

Measures, on the real training path of each (``sweep.build_sweep_trainer`` and its
vmapped chunk, and ``trainer.build_trainer`` and its chunk per beta, as
``train_and_evaluate`` runs it), the wall time of ``--steps`` train steps:

* ``sweep_s``: one sweep of M models, all steps;
* ``sequential_s``: M single-model runs of the same steps, one after another
  (each beta is its own program: ``make_loss_fn`` closes over ``beta``);
* ``ratio = sweep_s / sequential_s`` (the target is <= 0.9), steady state
  (compiled already) and with each side's compile time included;
* the cost of one model-step on each side (``side_s / (M * steps)``) and of one step of
  the whole sweep (``sweep_s / steps``), medians over the repeats;
* the number of programs compiled for each side's chunk (the sweep's must be 1), and the
  number compiled while timing (must be 0: each side runs a first chunk, compiling it,
  before any timing).

The models' betas are log-spaced from ``--beta_min`` to ``--beta_max`` (distinct for any
``--num_models``). The two sides alternate ``--repeats`` times, so load from other jobs
hits both; ``uptime``'s load averages are recorded with each repeat. ``--nosequential``
times the sweep alone (M single runs of 128 models would take M times as long to build
and compile). Run:

  python experiments/sweep_benchmark.py --config=configs/beta_sweep.py \\
    --out=results/beta_sweep/benchmark_cpu.json
"""

import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import config as config_lib
from vae_jax import files, input_pipeline, sweep, trainer
from vae_jax import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(REPO / "configs/beta_sweep.py"), "Sweep config.")
flags.DEFINE_string(
  "out", None, "JSON output. Required: nothing is written where you did not point."
)
flags.DEFINE_integer("num_models", 8, "M: models in the sweep.", lower_bound=1)
flags.DEFINE_float("beta_min", 0.25, "The smallest beta; the M betas are log-spaced.")
flags.DEFINE_float("beta_max", 64.0, "The largest beta (M = 1: beta_min alone).")
flags.DEFINE_integer("steps", 400, "Train steps per model per timed repeat.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Alternating timed repeats of both sides.", lower_bound=1)
flags.DEFINE_bool(
  "sequential",
  True,
  "Also time M single runs one after another (--nosequential: the sweep alone).",
)
flags.mark_flags_as_required(["out"])


def log_spaced_betas(num_models: int, beta_min: float, beta_max: float) -> tuple[float, ...]:
  """``num_models`` betas log-spaced from ``beta_min`` to ``beta_max`` (one: ``beta_min``).

  Raises:
    ValueError: the range is not positive and increasing, or the betas would not have
      distinct names (``config.model_name`` keeps 6 significant digits).
  """
  if beta_min <= 0 or (num_models > 1 and beta_max <= beta_min):
    raise ValueError(f"Need 0 < beta_min < beta_max, got {beta_min} and {beta_max}.")
  betas = tuple(float(b) for b in np.geomspace(beta_min, beta_max, num_models))
  if len({config_lib.model_name(b, 0) for b in betas}) != num_models:
    raise ValueError(
      f"{num_models} log-spaced betas in [{beta_min}, {beta_max}] are not distinct to 6 "
      "significant digits: widen the range."
    )
  return betas


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _run_single(built, chunk, state, feed, steps: int):
  step, end = int(state.step), int(state.step) + steps
  while step < end:
    n = min(end - step, built.chunk_len)
    state, metrics = chunk(state, feed.inputs(step, n), n, built.keys[step_lib.KEY_EPS])
    step += n
  jax.block_until_ready((state, metrics))
  return state


def main(argv):
  del argv
  config = FLAGS.config
  config.sweep.betas = log_spaced_betas(FLAGS.num_models, FLAGS.beta_min, FLAGS.beta_max)
  config.sweep.seeds = (config.seed,)
  splits = input_pipeline.load_splits(config)
  event_shape, num_train = splits.event_shape, splits.num_train

  # Sweep: build, first call (compile + one chunk).
  t = time.perf_counter()
  st = sweep.build_sweep_trainer(config, event_shape, num_train)
  sweep_feed = st.base.feed(config, splits, st.sharding())
  sweep_chunk = st.base.make_chunk(sweep_feed.batch, st.sweep_step)
  sweep_state = st.init_state()
  sweep_state, pending = sweep.run_steps(
    st, sweep_state, sweep_feed, st.base.chunk_len, sweep_chunk
  )
  jax.block_until_ready((sweep_state, pending))
  sweep_first_s = time.perf_counter() - t
  # Every single run reads the sweep's data stream (config.seed's), as the sweep's models do.
  feed = sweep_feed

  singles, single_states, single_first_s = [], [], []
  for beta in config.sweep.betas if FLAGS.sequential else ():
    c = config.copy_and_resolve_references()
    c.beta = beta
    t = time.perf_counter()
    built = trainer.build_trainer(c, event_shape, num_train)
    chunk = built.make_chunk(feed.batch, batch_sharding=built.batch_sharding)
    state = _run_single(built, chunk, built.init_state(), feed, built.chunk_len)
    single_first_s.append(time.perf_counter() - t)
    singles.append((built, chunk))
    single_states.append(state)

  def compiled() -> tuple[int, int]:
    return sweep_chunk._cache_size(), sum(chunk._cache_size() for _, chunk in singles)

  m, steps, bs = FLAGS.num_models, FLAGS.steps, config.batch_size
  compiled_before = compiled()
  repeats = []
  for r in range(FLAGS.repeats):
    load_before = _load()
    t = time.perf_counter()
    sweep_state, pending = sweep.run_steps(st, sweep_state, sweep_feed, steps, sweep_chunk)
    jax.block_until_ready((sweep_state, pending))
    sweep_s = time.perf_counter() - t
    row = {"sweep_s": sweep_s, "sweep_per_model_step_s": sweep_s / (m * steps)}
    if singles:
      t = time.perf_counter()
      for i, (built, chunk) in enumerate(singles):
        single_states[i] = _run_single(built, chunk, single_states[i], feed, steps)
      sequential_s = time.perf_counter() - t
      row["sequential_s"] = sequential_s
      row["sequential_per_model_step_s"] = sequential_s / (m * steps)
      row["ratio"] = sweep_s / sequential_s
    row["load_avg_1_5_15_before"] = load_before
    row["load_avg_1_5_15_after"] = _load()
    repeats.append(row)
    logging.info("repeat %d: %s", r, row)
  compiled_after = compiled()

  def median(key):
    values = [x[key] for x in repeats if key in x]
    return statistics.median(values) if values else None

  sweep_med, seq_med = median("sweep_s"), median("sequential_s")
  ratios = [x["ratio"] for x in repeats] if singles else None
  # With compile: the first chunk of each side plus the steady-state time.
  first_chunk = st.base.chunk_len
  versus = f"{m} single runs" if singles else "no single runs (--nosequential)"
  results = {
    "what": f"{m} models x {steps} steps at batch {bs}: one vmapped sweep vs {versus}",
    "model": f"784-{'-'.join(map(str, config.model.encoder_hidden))}-{config.model.latents}",
    "dataset": config.dataset,
    "batch_size": bs,
    "num_models": m,
    "steps_per_model": steps,
    "betas": list(config.sweep.betas),
    "sequential": bool(singles),
    "repeats": repeats,
    # One step of every model of the sweep, and one model-step on each side (medians).
    "sweep_step_s_median": sweep_med / steps,
    "per_model_step_s_median": {
      "sweep": median("sweep_per_model_step_s"),
      "sequential": median("sequential_per_model_step_s"),
    },
    "ratio_median": statistics.median(ratios) if singles else None,
    "ratio_min": min(ratios) if singles else None,
    "ratio_max": max(ratios) if singles else None,
    "ratio_of_median_times": sweep_med / seq_med if singles else None,
    "sweep_examples_per_sec_median": m * steps * bs / sweep_med,
    "sequential_examples_per_sec_median": m * steps * bs / seq_med if singles else None,
    "sweep_compiles": compiled_after[0],
    "sequential_compiles": compiled_after[1],
    "compiles_during_timing": sum(compiled_after) - sum(compiled_before),
    "sweep_first_chunk_s": sweep_first_s,
    "sequential_first_chunk_s_total": sum(single_first_s) if singles else None,
    "first_chunk_steps": first_chunk,
    "ratio_with_compile": (
      (sweep_first_s + sweep_med) / (sum(single_first_s) + seq_med) if singles else None
    ),
    "machine": {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "jax": jax.__version__,
    },
  }
  out = files.expand(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out, json.dumps(results, indent=2) + "\n")
  logging.info(
    "%d models: %.3g s per sweep step, %.3g s per model-step (sequential: %s; ratio %s); "
    "compiles %d (%d while timing); wrote %s",
    m,
    results["sweep_step_s_median"],
    results["per_model_step_s_median"]["sweep"],
    results["per_model_step_s_median"]["sequential"],
    results["ratio_median"],
    results["sweep_compiles"],
    results["compiles_during_timing"],
    out,
  )


if __name__ == "__main__":
  app.run(main)
