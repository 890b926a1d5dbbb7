"""Command line: ``python -m vae_jax.main --config=configs/mnist.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.beta=4 --config.model.latents=2``;
unknown fields and wrong types are errors. Running again with the same workdir
resumes from its latest checkpoint; ``--config`` may then be left out, and the run
continues under the config it recorded (``WORKDIR/config.json``), changed only where
``--config.<field>=<value>`` says. A config with ``config.sweep.betas`` set
(``configs/beta_sweep.py``) trains every model of the sweep as one program.

``--mode=evaluate`` evaluates the workdir's parameters instead (the best on
validation, the EMA or the latest, or ``--eval_step=N``; see
``evaluate.params_source``): importance-sampled test log-likelihood with
``--eval_num_samples`` samples, ELBO parts, PCA baseline, figures; it writes
``WORKDIR/eval/step_<N>_k<K>.json`` (for a sweep, per model under
``WORKDIR/models/<name>/``).

A mistake the user can fix (``errors.UserError``: a bad value, missing data, a busy
workdir, a failed write) ends the command with one line saying what to do; anything
else is a bug and keeps its traceback.
"""

import gc
import logging as py_logging
import pathlib
import re
import sys
import traceback
import warnings

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import config as config_lib
from vae_jax import estimators, evaluate, files, loop, process, sweep, train
from vae_jax import workdir as workdir_lib
from vae_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume a workdir whose recorded config differs from --config (the differences are logged).",
)
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "Train (or resume), or evaluate.")
flags.DEFINE_integer(
  "eval_num_samples",
  estimators.DEFAULT_NUM_IMPORTANCE_SAMPLES,
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
flags.DEFINE_bool(
  "eval_again",
  False,
  "--mode=evaluate: evaluate even the models whose results at this step and K are "
  "written already (by default they are kept, so an interrupted evaluation continues).",
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
flags.mark_flags_as_required(["workdir"])

_CONFIG_HELP = (
  "Path to a config file, e.g. configs/mnist.py[:smoke]. Leave it out to resume or "
  "evaluate a workdir under the config it recorded."
)


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
  process.limit_malloc_arenas()  # Before the first device and checkpoint threads start.
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", str(files.expand(FLAGS.compilation_cache)))
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
    logging.info("JAX devices: %s", jax.devices())
    if _FROM_RECORD:
      logging.info("No --config: the config recorded in %s/config.json.", FLAGS.workdir)
    if FLAGS.mode == "evaluate":
      kwargs = {
        "num_samples": FLAGS.eval_num_samples,
        "eval_step": FLAGS.eval_step,
        "again": FLAGS.eval_again,
      }
    else:
      kwargs = {"allow_config_change": FLAGS.allow_config_change}
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, **kwargs)
  except loop.Preempted as e:
    _report_last(f"{e} Run the same command to resume.", error=False)
    sys.exit(e.exit_code)
  except UserError as e:
    _report_last(f"{type(e).__name__}: {e}")
    sys.exit(1)
  except KeyboardInterrupt:  # A second Ctrl-C in training, or Ctrl-C in an evaluation.
    what = (
      "Evaluations already written are kept"
      if FLAGS.mode == "evaluate"
      else ("The steps since the last checkpoint are lost")
    )
    _report_last(f"Interrupted (Ctrl-C). {what}; run the same command to continue.")
    sys.exit(130)


def _report_last(message: str, error: bool = True) -> None:
  """Logs ``message`` as the run's last line.

  A failed asynchronous checkpoint write leaves exceptions in Orbax's internal asyncio
  futures and coroutines, which asyncio logs ("exception was never retrieved") and Python
  warns about ("coroutine ... was never awaited") when they are garbage collected: at
  interpreter exit, after the line that says what to do. Collecting them first puts what
  can be collected above it; what asyncio or the warnings module would say after it
  repeats a failure already reported, and is not said.
  """
  gc.collect()
  (logging.error if error else logging.warning)("%s", message)
  py_logging.getLogger("asyncio").disabled = True
  warnings.simplefilter("ignore")


# Whether --config was left out and the workdir's record stands in for it.
_FROM_RECORD = False


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=value`` or ``--name value`` in ``argv`` (the last, as absl
  takes it), if given."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _fatal(message: str) -> None:
  sys.stderr.write(f"FATAL: {message}\n")
  sys.exit(2)


def _define_config(argv: list[str]) -> None:
  """Defines ``--config``: the config file named, or without one, the workdir's record."""
  global _FROM_RECORD
  spec = _flag_value(argv[1:], "config")
  if spec is not None:
    if not pathlib.Path(files.expand(spec.split(":")[0])).is_file():
      _fatal(
        f"--config={spec}: no such config file. Give a path such as configs/mnist.py (or "
        "configs/mnist.py:smoke)."
      )
    config_flags.DEFINE_config_file("config", None, _CONFIG_HELP, lock_config=True)
    return
  workdir = _flag_value(argv[1:], "workdir")
  record = files.expand(workdir) / workdir_lib.RECORD if workdir else None
  if record is None or not record.is_file():
    _fatal(
      "--config is missing. Give a config file, e.g. --config=configs/mnist.py; it can be "
      "left out only to resume or evaluate a workdir that holds a run (its config.json)."
    )
  try:
    recorded = workdir_lib.read_record(files.expand(workdir))
  except UserError as e:
    _fatal(str(e))
  config_flags.DEFINE_config_dict("config", recorded, _CONFIG_HELP, lock_config=True)
  _FROM_RECORD = True


# Fields a sweep varies across its models; anything else under config.sweep is unknown.
_SWEEP_AXES = ("betas", "seeds", "cross", "field", "field_values")


def _config_failure(e: BaseException, argv: list[str]) -> str:
  """One line for an error raised while building the config: where it arose in the config
  file (file:line), or which override was refused and why."""
  chain, seen = [], e
  while seen is not None and seen not in chain:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  spec = _flag_value(argv[1:], "config")
  config_file = pathlib.Path(files.expand(spec.split(":")[0])).resolve() if spec else None
  for err in chain:
    if isinstance(err, SyntaxError) and err.filename:
      return f"{err.filename}:{err.lineno}: SyntaxError: {err.msg}"
    frames = [
      f
      for f in traceback.extract_tb(err.__traceback__)
      if config_file is not None and pathlib.Path(f.filename).resolve() == config_file
    ]
    if frames:
      return f"{frames[-1].filename}:{frames[-1].lineno}: {type(err).__name__}: {err}"
  message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  # ml_collections wraps a KeyError's repr: unquote and unescape it.
  message = message.strip("'").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  unknown = re.search(r"--config\.sweep\.(\w+)", " ".join(a for a in argv if "sweep." in a))
  if unknown and unknown.group(1) not in _SWEEP_AXES:
    field = unknown.group(1)
    return (
      f"config.sweep has no field {field!r}: a sweep varies the seed and one scalar "
      "hyperparameter (sweep.betas, or sweep.field and sweep.field_values, e.g. "
      "--config.sweep.field=factor_vae.gamma --config.sweep.field_values='(10, 20)') across "
      f"models that share every shape. A field such as model.{field} changes the shapes "
      "of the parameters, so each value needs its own run: give each its own --workdir "
      f"and --config.model.{field}=<value>."
    )
  return f"bad flag or config override: {message}"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad ``--config`` or override as one line, not a traceback."""
  _define_config(argv)
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - any failure to build the config is the user's input.
    _fatal(_config_failure(e, argv))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
