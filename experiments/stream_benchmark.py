"""The streamed feed against the device-resident one: throughput, memory, preparation time.

Measures, in one run on one machine:

* **throughput**: steady-state training examples/s of the real training path
  (``trainer.build_trainer``, ``Trainer.feed`` and the multi-step chunk, with a dispatch's
  inputs fetched while the previous dispatch computes, as ``loop.run`` does), fed
  device-resident and streamed, alternately ``--repeats`` times each, on the config's
  dataset and model (default: Fashion-MNIST and the default MLP). Reported: the median
  of each, every pair's ratio and the ratio of the medians;
* **peak host memory** of whole training processes (``python -m vae_jax.main``,
  ``timings.json``'s ``peak_rss_mib``) over training splits of growing size, streamed and
  device-resident: the dataset resized to ``--memory_resize`` in RGB, so that it is many
  times the streamed runs' ``data.device_memory_mib``;
* **preparation time** of CIFAR-10 from its archive: ``--cifar_archive`` if given, else a
  file in the published format (50,000 + 10,000 records of random pixels) generated here,
  timed through ``datasets.open_source`` (the vae_jax builder: reading the archive, PNG
  encoding, writing ArrayRecord), then the decoding of the training split once
  (``Source.load``) and its stream file (``Source.stream_file``).

Run it alone on the machine; results go to ``--out`` (JSON):

  python experiments/stream_benchmark.py --config=configs/fashion_mnist.py \\
    --out=results/stream_benchmark.json
"""

import dataclasses
import io
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vae_jax import datasets, downloads, files, input_pipeline, trainer
from vae_jax import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(REPO / "configs/fashion_mnist.py"), "The run.")
flags.DEFINE_string(
  "out", None, "Where the results go (JSON). Required: nothing is written where you did not point."
)
flags.DEFINE_integer("repeats", 5, "Timed repeats of each feed.")
flags.DEFINE_integer("dispatches", 40, "Dispatches per timed repeat.")
flags.DEFINE_list("memory_sizes", ["7500", "15000", "30000", "60000"], "Training split sizes.")
flags.DEFINE_integer("memory_steps", 200, "Train steps of each memory run.")
flags.DEFINE_integer("memory_resize", 64, "Side of the RGB images of the memory runs.")
flags.DEFINE_integer("memory_cap_mib", 64, "data.device_memory_mib of the memory runs.")
flags.DEFINE_string("cifar_archive", None, "A copy of cifar-10-binary.tar.gz, if you have one.")
flags.DEFINE_string("work_dir", None, "Scratch directory (default: a temporary one).")
flags.mark_flags_as_required(["out"])


def _rate(config, splits, feed_name: str):
  """A function that times ``FLAGS.dispatches`` dispatches of the real chunk: examples/s."""
  built = trainer.build_trainer(config, splits.event_shape, splits.num_train)
  feed = built.feed(config, splits, built.replicated)
  assert isinstance(feed, input_pipeline.StreamFeed) == (feed_name == "stream")
  chunk = built.make_chunk(feed.batch, batch_sharding=built.batch_sharding)
  eps, n = built.keys[step_lib.KEY_EPS], built.chunk_len
  state = built.init_state()
  position = {"step": 0}

  def run(num_dispatches: int) -> float:
    nonlocal state
    step = position["step"]
    inputs = feed.inputs(step, n)
    start = time.perf_counter()
    for _ in range(num_dispatches):
      state, metrics = chunk(state, inputs, n, eps)  # Dispatched; computes while...
      step += n
      inputs = feed.inputs(step, n)  # ...the next dispatch's batches are fetched.
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    position["step"] = step
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    return num_dispatches * n * config.batch_size / seconds

  run(2)  # Compilation and the first reads.
  return run, built.chunk_len, feed


def throughput(config) -> dict:
  config.num_epochs = 1000  # The feeds' length; nothing trains that long here.
  splits = {name: input_pipeline.load_splits(config, feed=name) for name in ("device", "stream")}
  runs, feeds = {}, {}
  for name in ("device", "stream"):
    runs[name], chunk_len, feeds[name] = _rate(config, splits[name], name)
  rates = {"device": [], "stream": []}
  for _ in range(FLAGS.repeats):  # Alternately, so both see the same machine.
    for name in ("device", "stream"):
      rates[name].append(runs[name](FLAGS.dispatches))
  medians = {k: statistics.median(v) for k, v in rates.items()}
  return {
    "dataset": config.dataset,
    "num_train": splits["device"].num_train,
    "batch_size": config.batch_size,
    "steps_per_dispatch": chunk_len,
    "read_threads": feeds["stream"].read_threads,
    "read_ahead_batches": feeds["stream"].read_ahead,
    "examples_per_s": rates,
    "median_examples_per_s": medians,
    "pair_ratios_device_over_stream": [
      d / s for d, s in zip(rates["device"], rates["stream"], strict=True)
    ],
    "median_ratio_device_over_stream": medians["device"] / medians["stream"],
  }


def memory(config_path: str, data_dir: str, idx_dir: str | None, work: pathlib.Path) -> dict:
  side = FLAGS.memory_resize
  common = [
    sys.executable,
    "-m",
    "vae_jax.main",
    f"--config={config_path}",
    f"--config.data_dir={data_dir}",
    f"--config.data.resize=({side}, {side})",
    "--config.data.channels=3",
    f"--config.num_train_steps={FLAGS.memory_steps}",
    "--config.eval_every_steps=0",
    "--config.num_image_samples=0",
    "--config.progress_bar=False",
    f"--config.data.device_memory_mib={FLAGS.memory_cap_mib}",
    "--compilation_cache=",
  ]
  if idx_dir:
    common.append(f"--config.idx_dir={idx_dir}")
  rows = []
  for feed in ("stream", "device"):
    for size in FLAGS.memory_sizes:
      workdir = work / f"memory_{feed}_{size}"
      args = [*common, f"--workdir={workdir}", f"--config.data.max_train_examples={size}"]
      args.append(f"--config.data.feed={feed}")
      start = time.perf_counter()
      done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
      if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
      timings = json.loads((workdir / "timings.json").read_text())
      rows.append(
        {
          "feed": feed,
          "num_train": int(size),
          "train_split_mib": int(size) * side * side * 3 / 2**20,
          "peak_rss_mib": timings["peak_rss_mib"],
          "wall_s": time.perf_counter() - start,
        }
      )
      print(rows[-1], flush=True)
  return {
    "image": [side, side, 3],
    "device_memory_mib": FLAGS.memory_cap_mib,
    "train_steps": FLAGS.memory_steps,
    "runs": rows,
  }


def _generated_cifar(path: pathlib.Path) -> None:
  """A ``cifar-10-binary.tar.gz`` in the published layout with random pixels."""
  rng = np.random.default_rng(0)
  with tarfile.open(path, "w:gz", compresslevel=1) as tar:
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
      records = rng.integers(0, 256, (10000, 3073), dtype=np.uint8)
      records[:, 0] %= 10
      raw = records.tobytes()
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))


def preparation(work: pathlib.Path) -> dict:
  idx_dir = work / "cifar_files"
  idx_dir.mkdir()
  archive = idx_dir / "cifar-10-binary.tar.gz"
  if FLAGS.cifar_archive:
    archive.symlink_to(files.expand(FLAGS.cifar_archive).resolve())
    what = f"the published archive ({FLAGS.cifar_archive})"
  else:
    _generated_cifar(archive)
    what = "a generated archive in the published format (random pixels)"
    entry = datasets.BUILT_IN["cifar10"]
    stand_in = downloads.PublishedFile(
      archive.name, entry.files[0].url, archive.stat().st_size, downloads.sha256(archive)
    )
    datasets.BUILT_IN["cifar10"] = dataclasses.replace(entry, files=(stand_in,))
  data_dir = work / "cifar_tfds"
  start = time.perf_counter()
  source = datasets.open_source("cifar10", str(data_dir), str(idx_dir))
  prepare_s = time.perf_counter() - start
  start = time.perf_counter()
  train = source.load("train")
  load_s = time.perf_counter() - start
  start = time.perf_counter()
  source.stream_file("train")
  stream_s = time.perf_counter() - start
  return {
    "archive": what,
    "archive_bytes": archive.stat().st_size,
    "prepare_s": prepare_s,
    "prepare_images_per_s": 60000 / prepare_s,
    "decode_train_s": load_s,
    "stream_file_train_s": stream_s,
    "train_images": int(train.num_examples),
  }


def main(argv):
  del argv
  config = FLAGS.config
  config.progress_bar = False
  config_path = config_flags.get_config_filename(FLAGS["config"])
  work_dir = files.expand(FLAGS.work_dir) if FLAGS.work_dir else None
  with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
    work = pathlib.Path(tmp)
    results = {
      "command": " ".join(sys.argv),
      "machine": {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
      },
      "throughput": throughput(config),
    }
    print(json.dumps(results["throughput"], indent=1), flush=True)
    results["memory"] = memory(config_path, config.data_dir or "", config.idx_dir, work)
    results["cifar10_preparation"] = preparation(work)
  out = files.expand(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out, json.dumps(results, indent=1) + "\n")
  print(json.dumps({k: v for k, v in results.items() if k != "memory"}, indent=1))
  print(f"Wrote {out}")


if __name__ == "__main__":
  app.run(main)
