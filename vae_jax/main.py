"""Command line: ``python -m vae_jax.main --config=configs/mnist.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.beta=4 --config.model.latents=2``;
unknown fields and wrong types are errors. Running again with the same workdir
resumes from its latest checkpoint.

``--mode=evaluate`` evaluates the workdir's latest checkpoint instead (importance-
sampled test log-likelihood with ``--eval_num_samples`` samples, ELBO parts, PCA
baseline, pictures) and writes ``WORKDIR/eval/step_<N>_k<K>.json``.
"""

import logging as py_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import evaluate, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
config_flags.DEFINE_config_file(
  "config", None, "Path to a config file, e.g. configs/mnist.py[:smoke].", lock_config=True
)
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume a workdir whose recorded config differs from --config (the differences are logged).",
)
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "Train (or resume), or evaluate.")
flags.DEFINE_integer(
  "eval_num_samples",
  evaluate.DEFAULT_NUM_IMPORTANCE_SAMPLES,
  "--mode=evaluate: importance samples K per test example for log p(x).",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-host: host:port of process 0. With --num_processes and --process_id, calls "
  "jax.distributed.initialize; on TPU pods and SLURM, --num_processes alone lets JAX detect "
  "the rest.",
)
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax reports every save step at INFO; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname
  )
  if FLAGS.num_processes and FLAGS.num_processes > 1:
    # Collectives between CPU devices go through gloo; the setting only affects
    # the CPU backend (GPUs and TPUs use their own interconnect).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  logging.info("JAX devices: %s", jax.devices())
  logging.info("Config:\n%s", FLAGS.config)
  if FLAGS.mode == "evaluate":
    evaluate.evaluate_workdir(FLAGS.config, FLAGS.workdir, FLAGS.eval_num_samples)
    return
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
  except train.Preempted as e:
    logging.warning("%s Run the same command to resume.", e)
    sys.exit(train.EXIT_CODE_PREEMPTED)


if __name__ == "__main__":
  app.run(main)
