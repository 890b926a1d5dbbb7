"""Colour images on the CPU: test bits/dim per likelihood, and the residual VAE's speed.

Two measurements, written to ``--out`` (JSON) with the machine:

* **likelihoods**: for each likelihood, ``configs/cifar10.py:smoke``'s residual VAE trained
  for ``--steps`` steps on all 6,100 training patches of the offline colour photographs
  (``photos``), then ``--mode=evaluate`` with ``--eval_num_samples`` importance samples on
  the 1,300 test patches. Reported: the test ELBO and the importance-sampled
  ``-log p(x)`` in bits/dim (``-log2 P / 3072`` for the discretized likelihoods; the bound
  ``(nll + 3072 * 8 ln 2) / (3072 ln 2)`` for the densities on dequantized pixels);
* **throughput**: steady-state training examples/s at 32x32x3 of vae_jax's residual VAE
  (the real training path: ``trainer.build_trainer`` and the device feed's chunk, as
  ``main`` runs it) against the same network a user writes in Linen with a jitted step
  and host-side batches (``ResidualVAE`` below), alternately, ``--repeats`` times; both
  use the mixture likelihood of ``vae_jax.losses``, the public function a user imports.

  python experiments/colour_benchmark.py --out=results/colour_benchmark.json
"""

import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from vae_jax import datasets, files, input_pipeline, losses, trainer
from vae_jax import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string(
  "out", None, "Where the results go (JSON). Required: nothing is written where you did not point."
)
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: a temporary one).")
flags.DEFINE_integer("steps", 1000, "Train steps of each likelihood's run.")
flags.DEFINE_integer("eval_num_samples", 100, "Importance samples per test patch.")
flags.DEFINE_integer("repeats", 3, "Timed repeats of each side of the throughput.")
flags.DEFINE_integer("timed_steps", 30, "Steps per timed repeat.")
flags.DEFINE_list("features", ["32", "64", "128"], "Residual VAE channels per resolution.")
flags.DEFINE_integer("batch_size", 64, "Batch of the throughput runs.")
flags.DEFINE_integer("components", 10, "Mixture components of the throughput runs.")

# (name, likelihood, binarization)
LIKELIHOODS = (
  ("discretized_logistic_mixture", "discretized_logistic_mixture", "none"),
  ("discretized_logistic", "discretized_logistic", "none"),
  ("discretized_gaussian", "discretized_gaussian", "none"),
  ("gaussian_learned, dequantized", "gaussian_learned", "dequantize"),
  ("continuous_bernoulli, dequantized", "continuous_bernoulli", "dequantize"),
)
flags.mark_flags_as_required(["out"])


def likelihood_table(data_dir: str, work: pathlib.Path) -> list[dict]:
  rows = []
  for name, likelihood, binarization in LIKELIHOODS:
    workdir = work / likelihood
    common = [sys.executable, "-m", "vae_jax.main", f"--workdir={workdir}", "--compilation_cache="]
    train = [
      *common,
      "--config=configs/cifar10.py:smoke",
      f"--config.data_dir={data_dir}",
      f"--config.model.likelihood={likelihood}",
      f"--config.binarization={binarization}",
      "--config.data.max_train_examples=6100",  # All of them (None is no CLI value).
      f"--config.num_train_steps={FLAGS.steps}",
      f"--config.eval_every_steps={FLAGS.steps}",
      "--config.progress_bar=False",
    ]
    start = time.perf_counter()
    for args in (
      train,
      [*common, "--mode=evaluate", f"--eval_num_samples={FLAGS.eval_num_samples}"],
    ):
      done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
      if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    (path,) = (workdir / "eval").glob("*.json")
    test = json.loads(path.read_text())["test"]
    rows.append(
      {
        "likelihood": name,
        "binarization": binarization,
        "test_elbo_bits_per_dim": test["elbo_bits_per_dim"],
        "test_bits_per_dim": test["log_likelihood"]["bits_per_dim"],
        "standard_error_bits_per_dim": test["log_likelihood"]["standard_error_bits_per_dim"],
        "active_units": test["active_units"],
        "wall_s": time.perf_counter() - start,
      }
    )
    print(rows[-1], flush=True)
  return rows


# --------------------------------------------------------------------------
# The Linen residual VAE a user writes, with a jitted step and host batches.


class Block(nn.Module):
  @nn.compact
  def __call__(self, h):
    c = h.shape[-1]
    r = nn.Conv(c, (3, 3), padding="SAME")(nn.relu(h))
    r = nn.Conv(c, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros)(nn.relu(r))
    return h + r


class ResidualVAE(nn.Module):
  features: tuple[int, ...]
  latents: int
  hidden: int
  outputs: int

  @nn.compact
  def __call__(self, x, key):
    h = nn.Conv(self.features[0], (3, 3), padding="SAME")(x)
    for i in range(len(self.features)):
      h = Block()(h)
      if i + 1 < len(self.features):
        h = nn.Conv(self.features[i + 1], (4, 4), strides=(2, 2), padding="SAME")(nn.relu(h))
    h = nn.relu(nn.Dense(self.hidden)(nn.relu(h).reshape(x.shape[0], -1)))
    mean, logvar = nn.Dense(self.latents)(h), nn.Dense(self.latents)(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    side = x.shape[1] // 2 ** (len(self.features) - 1)
    h = nn.relu(nn.Dense(self.hidden)(z))
    h = nn.Dense(side * side * self.features[-1])(h).reshape(x.shape[0], side, side, -1)
    for i in reversed(range(len(self.features))):
      h = Block()(h)
      if i > 0:
        up = nn.ConvTranspose(self.features[i - 1], (4, 4), strides=(2, 2), padding="SAME")
        h = up(nn.relu(h))
    decoded = nn.Conv(self.outputs, (3, 3), padding="SAME")(nn.relu(h))
    return decoded, mean, logvar


def anchor_rate(images: np.ndarray, features, batch: int, components: int):
  """A function timing ``n`` steps of the user's loop: examples/s."""
  model = ResidualVAE(tuple(features), 128, 512, losses.mixture_num_params(components, 3))
  x0 = jnp.zeros((batch, 32, 32, 3), jnp.float32)
  params = model.init(jax.random.key(0), x0, jax.random.key(1))["params"]
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)

  def loss(params, x, key):
    decoded, mean, logvar = model.apply({"params": params}, x, key)
    log_p = losses.discretized_logistic_mixture_log_likelihood(decoded, x, components)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1)
    return jnp.mean(kl - log_p)

  @jax.jit
  def train_step(params, opt_state, x, key):
    grads = jax.grad(loss)(params, x, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(0)
  state = {"params": params, "opt": opt_state, "i": 0}

  def run(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      idx = rng.integers(0, len(images), batch)
      x = jnp.asarray(images[idx].astype(np.float32) / 255.0)
      key = jax.random.fold_in(jax.random.key(2), state["i"])
      state["params"], state["opt"] = train_step(state["params"], state["opt"], x, key)
      state["i"] += 1
    jax.block_until_ready(state["params"])
    return n * batch / (time.perf_counter() - start)

  run(2)
  return run


def vae_jax_rate(config, splits):
  built = trainer.build_trainer(config, splits.event_shape, splits.num_train)
  feed = built.feed(config, splits, built.replicated)
  chunk = built.make_chunk(feed.batch, batch_sharding=built.batch_sharding)
  eps, n = built.keys[step_lib.KEY_EPS], built.chunk_len
  state = {"state": built.init_state(), "step": 0}

  def run(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps // n):
      step = state["step"]
      state["state"], metrics = chunk(state["state"], feed.inputs(step, n), n, eps)
      state["step"] = step + n
    jax.block_until_ready(metrics)
    return (steps // n) * n * config.batch_size / (time.perf_counter() - start)

  run(2 * n)
  return run, n


def cifar10_config(arg: str):
  """``configs/cifar10.py``'s ``get_config(arg)``."""
  spec = importlib.util.spec_from_file_location("cifar10", REPO / "configs" / "cifar10.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    data_dir = str(files.expand(FLAGS.data_dir)) if FLAGS.data_dir else str(work / "tfds")
    results = {
      "command": " ".join(sys.argv),
      "machine": {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
      },
    }
    source = datasets.open_source("photos", data_dir)
    images = source.load("train").images
    config = cifar10_config("smoke")
    config.data_dir, config.progress_bar = data_dir, False
    config.data.max_train_examples = None
    config.model.conv_features = tuple(int(f) for f in FLAGS.features)
    config.model.encoder_hidden, config.model.latents = (512,), 128
    config.model.mixture_components = FLAGS.components
    config.batch_size = FLAGS.batch_size
    config.num_epochs = 1000
    splits = input_pipeline.load_splits(config, feed="device")
    ours, chunk_len = vae_jax_rate(config, splits)
    anchor = anchor_rate(images, config.model.conv_features, FLAGS.batch_size, FLAGS.components)
    rates = {"vae_jax": [], "linen_anchor": []}
    for _ in range(FLAGS.repeats):
      rates["vae_jax"].append(ours(FLAGS.timed_steps))
      rates["linen_anchor"].append(anchor(FLAGS.timed_steps))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    results["throughput"] = {
      "model": (
        f"residual VAE, channels {config.model.conv_features}, 1 block per resolution, "
        f"dense 512, 128 latents, mixture of {FLAGS.components} logistics, 32x32x3"
      ),
      "batch_size": FLAGS.batch_size,
      "steps_per_dispatch": chunk_len,
      "examples_per_s": rates,
      "median_examples_per_s": medians,
      "ratio_vae_jax_over_anchor": medians["vae_jax"] / medians["linen_anchor"],
    }
    print(json.dumps(results["throughput"], indent=1), flush=True)
    results["likelihoods"] = {
      "data": "photos: 6,100 training and 1,300 test 32x32 patches",
      "model": "configs/cifar10.py:smoke's residual VAE",
      "train_steps": FLAGS.steps,
      "eval_num_samples": FLAGS.eval_num_samples,
      "rows": likelihood_table(data_dir, work),
    }
  out = files.expand(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out, json.dumps(results, indent=1) + "\n")
  print(f"Wrote {out}")


if __name__ == "__main__":
  app.run(main)
