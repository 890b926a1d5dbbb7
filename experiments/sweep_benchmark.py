"""Is a sweep of M models in one program faster than M single runs one after another?

Measures, on the real training path of each (``sweep.build_sweep_trainer`` and its
vmapped chunk, and ``trainer.build_trainer`` and its chunk per beta, as
``train_and_evaluate`` runs it), the wall time of ``--steps`` train steps:

* ``sweep_s``: one sweep of M models, all steps;
* ``sequential_s``: M single-model runs of the same steps, one after another
  (each beta is its own program: ``make_loss_fn`` closes over ``beta``);
* ``ratio = sweep_s / sequential_s`` (the target is <= 0.9), steady state
  (compiled already) and with each side's compile time included;
* the number of programs compiled for the sweep's chunk (must be 1).

The two sides alternate ``--repeats`` times, so load from other jobs hits both;
``uptime``'s load averages are recorded with each repeat. Run:

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
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import files, input_pipeline, sweep, trainer
from vae_jax import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(REPO / "configs/beta_sweep.py"), "Sweep config.")
flags.DEFINE_string(
  "out", None, "JSON output. Required: nothing is written where you did not point."
)
flags.DEFINE_integer("num_models", 8, "M: models in the sweep (betas 2**k / 4, k = 0..M-1).")
flags.DEFINE_integer("steps", 400, "Train steps per model per timed repeat.")
flags.DEFINE_integer("repeats", 3, "Alternating timed repeats of both sides.")
flags.mark_flags_as_required(["out"])


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
  config.sweep.betas = tuple(2.0**k / 4 for k in range(FLAGS.num_models))
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
  for beta in config.sweep.betas:
    c = config.copy_and_resolve_references()
    c.beta = beta
    t = time.perf_counter()
    built = trainer.build_trainer(c, event_shape, num_train)
    chunk = built.make_chunk(feed.batch, batch_sharding=built.batch_sharding)
    state = _run_single(built, chunk, built.init_state(), feed, built.chunk_len)
    single_first_s.append(time.perf_counter() - t)
    singles.append((built, chunk))
    single_states.append(state)

  repeats = []
  for r in range(FLAGS.repeats):
    load_before = _load()
    t = time.perf_counter()
    sweep_state, pending = sweep.run_steps(st, sweep_state, sweep_feed, FLAGS.steps, sweep_chunk)
    jax.block_until_ready((sweep_state, pending))
    sweep_s = time.perf_counter() - t
    t = time.perf_counter()
    for i, (built, chunk) in enumerate(singles):
      single_states[i] = _run_single(built, chunk, single_states[i], feed, FLAGS.steps)
    sequential_s = time.perf_counter() - t
    repeats.append(
      {
        "sweep_s": sweep_s,
        "sequential_s": sequential_s,
        "ratio": sweep_s / sequential_s,
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": _load(),
      }
    )
    logging.info("repeat %d: %s", r, repeats[-1])

  ratios = [x["ratio"] for x in repeats]
  m, steps, bs = FLAGS.num_models, FLAGS.steps, config.batch_size
  sweep_med = statistics.median(x["sweep_s"] for x in repeats)
  seq_med = statistics.median(x["sequential_s"] for x in repeats)
  # With compile: the first chunk of each side plus the steady-state time.
  first_chunk = st.base.chunk_len
  results = {
    "what": f"{m} models x {steps} steps at batch {bs}: one vmapped sweep vs {m} single runs",
    "model": f"784-{'-'.join(map(str, config.model.encoder_hidden))}-{config.model.latents}",
    "dataset": config.dataset,
    "batch_size": bs,
    "num_models": m,
    "steps_per_model": steps,
    "betas": list(config.sweep.betas),
    "repeats": repeats,
    "ratio_median": statistics.median(ratios),
    "ratio_min": min(ratios),
    "ratio_max": max(ratios),
    "ratio_of_median_times": sweep_med / seq_med,
    "sweep_examples_per_sec_median": m * steps * bs / sweep_med,
    "sequential_examples_per_sec_median": m * steps * bs / seq_med,
    "sweep_compiles": st.sweep_chunk._cache_size(),
    "sequential_compiles": sum(s.train_chunk._cache_size() for s in singles),
    "sweep_first_chunk_s": sweep_first_s,
    "sequential_first_chunk_s_total": sum(single_first_s),
    "first_chunk_steps": first_chunk,
    "ratio_with_compile": (sweep_first_s + sweep_med) / (sum(single_first_s) + seq_med),
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
    "ratio sweep/sequential: median %.3f (min %.3f, max %.3f); compiles %d; wrote %s",
    results["ratio_median"],
    results["ratio_min"],
    results["ratio_max"],
    results["sweep_compiles"],
    out,
  )


if __name__ == "__main__":
  app.run(main)
