"""Command line: ``python -m vae_jax.main --config=configs/mnist.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.beta=4 --config.model.latents=2``;
unknown fields and wrong types are errors. Running again with the same workdir
resumes from its latest checkpoint. A config with ``config.sweep.betas`` set
(``configs/beta_sweep.py``) trains every model of the sweep as one program.

``--mode=evaluate`` evaluates the workdir's parameters instead (the best on
validation, the EMA or the latest, or ``--eval_step=N``; see
``evaluate.params_source``): importance-sampled test log-likelihood with
``--eval_num_samples`` samples, ELBO parts, PCA baseline, figures; it writes
``WORKDIR/eval/step_<N>_k<K>.json`` (for a sweep, per model under
``WORKDIR/models/<name>/``).
"""

import gc
import logging as py_logging
import os
import pathlib
import sys
import traceback
import warnings

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import (
  checkpointing,
  evaluate,
  input_pipeline,
  likelihood,
  locks,
  loop,
  sweep,
  train,
  writers,
)
from vae_jax import config as config_lib

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
  likelihood.DEFAULT_NUM_IMPORTANCE_SAMPLES,
  "--mode=evaluate: importance samples K per test example for log p(x).",
  lower_bound=1,
)
flags.DEFINE_integer(
  "eval_step",
  None,
  "--mode=evaluate: the checkpoint step to evaluate (default: the best on validation, "
  "else the latest).",
  lower_bound=0,
)
flags.DEFINE_string(
  "compilation_cache",
  "~/.cache/vae_jax/xla",
  "Directory of JAX's persistent compilation cache: a rerun of a config (a resume, the same "
  "model on other data, a sweep's evaluation) loads its compiled programs instead of "
  "compiling them again. Empty: off. It never changes what is computed.",
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


def _quiet_orbax(record: py_logging.LogRecord) -> bool:
  """Orbax reports every save at INFO, and the traceback of a failed background write at
  ERROR: keep its warnings and errors as one line each (vae_jax reports the failure)."""
  if "/orbax/" not in record.pathname and record.name != "asyncio":
    return True
  record.exc_info, record.exc_text = None, None
  return record.levelno >= py_logging.WARNING


def run(config, workdir: str, mode: str = "train", **kwargs):
  """What the command does: train (a single run or a sweep) or evaluate."""
  if mode == "evaluate":
    return evaluate.evaluate_workdir(config, workdir, **kwargs)
  if config_lib.is_sweep(config):
    return sweep.train_sweep(config, workdir, **kwargs)
  return train.train_and_evaluate(config, workdir, **kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  loop.limit_malloc_arenas()  # Before the first device and checkpoint threads start.
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    # Cache every program: this model's take well under the default 1 s to compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if FLAGS.num_processes and FLAGS.num_processes > 1:
    # Collectives between CPU devices go through gloo; the setting only affects
    # the CPU backend (GPUs and TPUs use their own interconnect).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  try:
    config_lib.validate(FLAGS.config)  # Before anything is set up or written.
    train.check_workdir(FLAGS.workdir)
    logging.info("JAX devices: %s", jax.devices())
    logging.info("Config:\n%s", FLAGS.config)
    if FLAGS.mode == "evaluate":
      kwargs = {"num_samples": FLAGS.eval_num_samples, "eval_step": FLAGS.eval_step}
    else:
      kwargs = {"allow_config_change": FLAGS.allow_config_change}
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, **kwargs)
  except loop.Preempted as e:
    logging.warning("%s Run the same command to resume.", e)
    sys.exit(loop.EXIT_CODE_PREEMPTED)
  except USER_ERRORS as e:
    if not _raised_by_vae_jax(e):
      raise  # A library's own error: keep its traceback.
    _report_last(f"{type(e).__name__}: {e}")
    sys.exit(1)


def _report_last(message: str) -> None:
  """Logs ``message`` as the run's last line.

  A failed asynchronous checkpoint write leaves exceptions in Orbax's internal asyncio
  futures and coroutines, which asyncio logs ("exception was never retrieved") and Python
  warns about ("coroutine ... was never awaited") when they are garbage collected: at
  interpreter exit, after the line that says what to do. Collecting them first puts what
  can be collected above it; what asyncio or the warnings module would say after it
  repeats a failure already reported, and is not said.
  """
  gc.collect()
  logging.error("%s", message)
  py_logging.getLogger("asyncio").disabled = True
  warnings.simplefilter("ignore")


# Errors that vae_jax raises for things a user can fix; their message says how.
USER_ERRORS = (
  ValueError,
  FileNotFoundError,
  input_pipeline.DataError,
  checkpointing.CheckpointError,
  loop.NonFiniteError,
  locks.Busy,
  writers.WriteError,
)


def _raised_by_vae_jax(e: BaseException) -> bool:
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and f"{os.sep}vae_jax{os.sep}" in frames[-1].filename


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad ``--config`` or override as one line, not a traceback."""
  for arg in argv[1:]:
    if arg.startswith("--config=") and not pathlib.Path(arg[9:].split(":")[0]).is_file():
      sys.stderr.write(
        f"FATAL: --config={arg[9:]}: no such config file. Give a path such as "
        "configs/mnist.py (or configs/mnist.py:smoke).\n"
      )
      sys.exit(2)
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - any failure to build the config is the user's input.
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    # ml_collections wraps a KeyError's repr: unquote and unescape it.
    message = message.strip("'").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    sys.stderr.write(f"FATAL: bad flag or config override: {message}\n")
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
