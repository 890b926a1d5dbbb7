"""Command line: ``python -m vae_jax.main --config=configs/mnist.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.beta=4 --config.model.latents=2``;
unknown fields and wrong types are errors. Running again with the same workdir
resumes from its latest checkpoint.
"""

import logging as py_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
config_flags.DEFINE_config_file(
  "config", None, "Path to a config file, e.g. configs/mnist.py[:smoke].", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax reports every save step at INFO; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname
  )
  logging.info("JAX devices: %s", jax.devices())
  logging.info("Config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
