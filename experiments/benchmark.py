"""Speed of vae_jax: end to end against the anchor, and against the machine's matmul rate.

Measures, in one process (plus child processes for the end-to-end runs):

* end to end, side by side: the project's command and the anchor (the Flax
  example with its step under ``jax.jit``, ``experiments/flax_anchor.py``)
  run alternately, ``--pairs`` times, as whole processes on the same data and
  epochs; each pair's wall-time ratio, the median ratio, peak RSS, and the
  project's own breakdown of where its seconds went (``WORKDIR/timings.json``).
  The project runs twice per pair: "cold" (an empty compilation cache, as a
  first run of a config) and "warm" (the cache that cold run filled, as every
  later run of it);

* the float32 matmul rate at the model's own layer shapes (forward and both
  backward products, batch ``config.batch_size``) and at a large square size;
* steady-state training examples/s of the real training path
  (``trainer.build_trainer`` and the device feed's chunk, exactly what ``main`` runs),
  median and spread over repeats, with the achieved GFLOP/s by the exact dense
  FLOP count and its ratio to the measured matmul rates;
* compile time of the train chunk and time from process start to the first
  finished step;
* the end-to-end wall time and peak RSS of
  ``python -m vae_jax.main --config=... --config.num_epochs=E`` (data loading,
  training, an evaluation and a checkpoint every epoch) in a fresh workdir.

Results go to a JSON file. Run (the anchor's setting: threshold-binarized
Fashion-MNIST, 10 epochs; the project's defaults: test ELBO, images and a
checkpoint every epoch):

  python experiments/benchmark.py --config=configs/fashion_mnist.py \\
    --config.binarization=threshold --out=results/benchmark_cpu.json

Run it alone on the machine: anything else running makes the figures worthless.
"""

import time

_PROCESS_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vae_jax import datasets, files, input_pipeline, process, trainer  # noqa: E402
from vae_jax import step as step_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(REPO / "configs/mnist.py"), "Config to benchmark.")
flags.DEFINE_string(
  "out",
  None,
  "Where to write the JSON results. Required: nothing is written where you did not point.",
)
flags.DEFINE_integer("repeats", 5, "Timed repeats of the steady-state measurement.")
flags.DEFINE_integer("dispatches", 10, "Train-chunk calls per timed repeat.")
flags.DEFINE_integer("square", 2048, "Size of the square matmul for the peak rate.")
flags.DEFINE_integer("end_to_end_epochs", 10, "Epochs of each end-to-end run (0: skip them).")
flags.DEFINE_integer("pairs", 3, "Alternating anchor/project pairs of end-to-end runs.")
flags.DEFINE_string(
  "anchor",
  str(REPO / "experiments" / "flax_anchor.py"),
  "The anchor script (the Flax example with a jitted step).",
)
flags.DEFINE_string(
  "anchor_idx_dir", "/usr/share/datasets/fashion-mnist", "IDX files the anchor reads."
)
flags.DEFINE_bool("synthetic_data", False, "Random uint8 images instead of the dataset.")
flags.DEFINE_float("matmul_gflop_per_call", 1.0, "Work per timed matmul call, in GFLOP.")
flags.mark_flags_as_required(["out"])


def _time(fn, *args, repeats: int) -> list[float]:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
  """Best-of-``repeats`` float32 GFLOP/s of ``[m, k] @ [k, n]``.

  The product runs many times inside one jitted loop (about
  ``--matmul_gflop_per_call`` GFLOP per call), so Python dispatch does not
  count. Each iteration scales ``a`` by a loop-dependent factor, which stops
  XLA from hoisting the product out of the loop. That scaling and the
  accumulation add ``m*k + m*n`` uncounted FLOPs per iteration (under 3% for
  the model's shapes), so the rate is slightly understated.
  """
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  iters = max(1, int(FLAGS.matmul_gflop_per_call * 1e9 // (2 * m * k * n)))

  @jax.jit
  def run(a, b):
    def body(i, acc):
      return acc + (a * (1.0 + 1e-9 * i.astype(jnp.float32))) @ b

    return jax.lax.fori_loop(0, iters, body, jnp.zeros((m, n), jnp.float32))

  return 2 * m * k * n * iters / min(_time(run, a, b, repeats=repeats)) / 1e9


def dense_layers(params) -> list[tuple[int, int]]:
  """(fan_in, fan_out) of every Dense kernel in the model's params."""
  return [
    tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    if jax.tree_util.keystr(path).endswith("['kernel']")
  ]


def train_flops_per_example(params, input_fan_in: int) -> float:
  """Exact dense FLOPs of one training example: forward, weight and input gradients.

  Forward and the weight gradient each cost ``2 * fan_in * fan_out`` per layer;
  the input gradient costs the same for every layer but the one reading the
  data (no gradient is needed with respect to the images).
  """
  total = 0.0
  for fan_in, fan_out in dense_layers(params):
    layer = 2.0 * fan_in * fan_out
    total += 2 * layer if fan_in == input_fan_in else 3 * layer
  return total


def model_shape_matmul_gflops(params, batch: int) -> float:
  """FLOP-weighted matmul rate over the model's own products at this batch size."""
  flops, seconds = 0.0, 0.0
  for fan_in, fan_out in dense_layers(params):
    for m, k, n in ((batch, fan_in, fan_out), (fan_in, batch, fan_out), (batch, fan_out, fan_in)):
      f = 2.0 * m * k * n
      flops += f
      seconds += f / (matmul_gflops(m, k, n) * 1e9)
  return flops / seconds / 1e9


def steady_state(config, splits):
  built = trainer.build_trainer(config, splits.event_shape, splits.num_train)
  state = built.init_state()
  # The device feed of the main command: the permutations of epochs 0 and 1, random gathers.
  feed = built.feed(config, splits, built.replicated)
  chunk = built.make_chunk(feed.batch, batch_sharding=built.batch_sharding)
  inputs, eps = feed.inputs(0, built.chunk_len), built.keys[step_lib.KEY_EPS]
  n = built.chunk_len

  start = time.perf_counter()
  chunk.lower(state, inputs, n, eps).compile()
  compile_s = time.perf_counter() - start
  state, m = chunk(state, inputs, 1, eps)
  jax.block_until_ready(m)
  first_step_s = time.perf_counter() - _PROCESS_START

  rates = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    for _ in range(FLAGS.dispatches):
      # Restart the epoch's positions so every dispatch runs n real steps.
      state = state._replace(step=jnp.zeros((), jnp.int32))
      state, m = chunk(state, inputs, n, eps)
    jax.block_until_ready(m)
    rates.append(FLAGS.dispatches * n * config.batch_size / (time.perf_counter() - start))
  assert np.all(np.isfinite(np.asarray(m["loss"]))), "non-finite loss in the benchmark"
  return built, state, rates, compile_s, first_step_s


def per_step_loop(trainer, config, host_images: np.ndarray, num_steps: int) -> float:
  """Examples/s of the naive loop: one jitted ``train_step`` per Python iteration.

  Batches are gathered and binarized on the host with numpy and copied to the
  device every step, and the loss comes back to the host every step: what a
  straightforward port of a PyTorch loop does. Same step function, same state.
  """
  step = jax.jit(trainer.train_step, donate_argnums=0)
  state = trainer.init_state()
  eps = trainer.keys[step_lib.KEY_EPS]
  rng = np.random.default_rng(0)
  bs, n = config.batch_size, host_images.shape[0]

  def host_batch(i):
    x = host_images[(i * bs) % (n - bs) :][:bs].astype(np.float32) / 255.0
    if config.binarization == "threshold":
      return (x > 0.5).astype(np.float32)
    if config.binarization == "dynamic":
      return (rng.random(x.shape, np.float32) < x).astype(np.float32)
    return x

  state, m = step(state, host_batch(0), eps)
  float(m["loss"])
  start = time.perf_counter()
  for i in range(num_steps):
    state, m = step(state, host_batch(i), eps)
    float(m["loss"])  # The per-step host read such loops do for logging.
  return num_steps * bs / (time.perf_counter() - start)


def _run(cmd: list[str], log_path: str) -> tuple[float, float]:
  """Runs ``cmd``; returns its wall seconds and peak RSS in MB.

  The peak is the child's own ``VmHWM`` (``process.peak_rss_mib``), read every 20 ms while it
  runs: ``wait4``'s ``ru_maxrss`` would report at least this benchmark's own peak, which
  Linux carries over the child's ``exec``.
  """
  start = time.perf_counter()
  peak = 0.0
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
      peak = max(peak, process.peak_rss_mib(proc.pid) or 0.0)
      time.sleep(0.02)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed; see {log_path}:\n{open(log_path).read()[-3000:]}")
  return wall, peak


def end_to_end_pairs(
  config_arg: str, overrides: list[str], epochs: int, pairs: int, batch_size: int = 128
) -> dict:
  """The project's command and the anchor, alternately, ``pairs`` times (see the docstring).
  The anchor runs at the config's ``batch_size`` (its own is the Flax example's 128)."""
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="vae_jax_bench_"))
  project = [
    sys.executable, "-m", "vae_jax.main", f"--config={config_arg}",
    f"--config.num_epochs={epochs}", "--config.progress_bar=False", *overrides,
  ]  # fmt: skip
  anchor = [
    sys.executable,
    str(files.expand(FLAGS.anchor)),
    str(files.expand(FLAGS.anchor_idx_dir)),
    str(epochs),
    *([str(batch_size)] if batch_size != 128 else []),
  ]
  runs = []
  for i in range(pairs):
    cache = scratch / f"cache_{i}"
    out = {}
    order = ("anchor", "cold", "warm") if i % 2 == 0 else ("cold", "warm", "anchor")
    for kind in order:
      log = str(scratch / f"{kind}_{i}.log")
      if kind == "anchor":
        out["anchor_s"], out["anchor_rss_mb"] = _run(anchor, log)
        continue
      workdir = scratch / f"{kind}_{i}"
      cmd = [*project, f"--workdir={workdir}", f"--compilation_cache={cache}"]
      out[f"{kind}_s"], out[f"{kind}_rss_mb"] = _run(cmd, log)
      out[f"{kind}_timings_s"] = json.loads((workdir / "timings.json").read_text())["seconds"]
      rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
      out[f"{kind}_test_neg_elbo"] = [r for r in rows if r["split"] == "test"][-1]["neg_elbo"]
      shutil.rmtree(workdir / "checkpoints")
    out["cold_ratio"] = out["cold_s"] / out["anchor_s"]
    out["warm_ratio"] = out["warm_s"] / out["anchor_s"]
    out["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    logging.info("pair %d: %s", i, {k: v for k, v in out.items() if "timings" not in k})
    runs.append(out)

  def median(key):
    return statistics.median(r[key] for r in runs)

  phases = sorted({k for r in runs for k in r["warm_timings_s"]})
  return {
    "project_command": " ".join(["python", *project[1:]]),
    "anchor_command": " ".join(["python", *anchor[1:]]),
    "epochs": epochs,
    "pairs": runs,
    "median_cold_ratio": median("cold_ratio"),
    "median_warm_ratio": median("warm_ratio"),
    "median_seconds": {k: median(f"{k}_s") for k in ("anchor", "cold", "warm")},
    "median_peak_rss_mb": {k: median(f"{k}_rss_mb") for k in ("anchor", "cold", "warm")},
    "median_breakdown_s": {
      kind: {p: statistics.median(r[f"{kind}_timings_s"].get(p, 0.0) for r in runs) for p in phases}
      for kind in ("cold", "warm")
    },
  }


def main(argv):
  config = FLAGS.config
  config.progress_bar = False
  del argv
  config_arg = config_flags.get_config_filename(FLAGS["config"])
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]

  if FLAGS.synthetic_data:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
    labels = np.zeros(60000, np.int32)
    test = datasets.Split(images[:100], labels[:100])
    data = {"train": datasets.Split(images, labels), "test": test}
    data_source = "synthetic uint8 60000x28x28x1"
  else:
    data = datasets.load(config.dataset, config.data_dir, config.idx_dir)
    data_source = f"{config.dataset} train split"
  splits = input_pipeline.cut(config, data)
  host_images = np.asarray(splits.train.images)
  images = splits.train.images

  trainer, state, rates, compile_s, first_step_s = steady_state(config, splits)
  flops = train_flops_per_example(state.params, int(np.prod(images.shape[1:])))
  median = statistics.median(rates)
  square = FLAGS.square
  peak_square = matmul_gflops(square, square, square, repeats=5)
  peak_model = model_shape_matmul_gflops(state.params, config.batch_size)
  achieved = median * flops / 1e9

  loop_rate = per_step_loop(trainer, config, host_images, FLAGS.dispatches * trainer.chunk_len)

  results = {
    "device": str(jax.devices()[0].device_kind),
    "platform": jax.default_backend(),
    "num_devices": jax.device_count(),
    "mesh_devices": trainer.mesh.size,
    "cpu": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "jax_version": jax.__version__,
    "config": config_arg,
    "overrides": overrides,
    "data": data_source,
    "batch_size": config.batch_size,
    "steps_per_dispatch": trainer.chunk_len,
    "binarization": config.binarization,
    "train_flops_per_example": flops,
    "examples_per_sec": {
      "median": median,
      "min": min(rates),
      "max": max(rates),
      "repeats": rates,
    },
    "per_step_loop_examples_per_sec": loop_rate,
    "speedup_over_per_step_loop": median / loop_rate,
    "achieved_gflops": achieved,
    "matmul_gflops": {f"square_{square}": peak_square, "model_shapes": peak_model},
    "fraction_of_matmul_peak": {
      f"square_{square}": achieved / peak_square,
      "model_shapes": achieved / peak_model,
    },
    "compile_seconds": compile_s,
    "process_start_to_first_step_seconds": first_step_s,
  }
  if FLAGS.end_to_end_epochs:
    results["end_to_end"] = end_to_end_pairs(
      config_arg, overrides, FLAGS.end_to_end_epochs, FLAGS.pairs, config.batch_size
    )
  out = files.expand(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out, json.dumps(results, indent=2) + "\n")
  logging.info("Wrote %s:\n%s", out, json.dumps(results, indent=2))
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
