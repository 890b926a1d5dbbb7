"""A run's directory: what lives where, its record of the config, the resume rules, its lock.

``WORKDIR/config.json`` records the config of the run that wrote the checkpoints there.
Running the same command again resumes: the config given then may differ from the
record only in the fields of ``RESUMABLE_CHANGES`` (how long or how visibly a run goes,
not what it computes), unless the user says otherwise (``--allow_config_change``).
Without ``--config``, the command reads the record itself (``read_record``), so a
workdir is resumed or evaluated as it was trained, and ``--config.<field>`` overrides
change only what the user names. ``lock`` keeps a second process out while a run is
going.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import checkpointing, files, locks
from vae_jax import config as config_lib

# What lives where.
RECORD = "config.json"
RANDOM = "random.json"  # JAX's PRNG settings and the root key the run started with.
CHECKPOINTS = "checkpoints"
BEST = "best"  # The best parameters on validation (early_stopping.BestCheckpoint).
MODELS = "models"  # A sweep's per-model outputs: models/<name>/.
EVAL = "eval"
LOCK = ".lock"

# Fields that may change when a run resumes from its workdir: they change how
# long or how visibly it runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
  {
    # Except with optimizer.schedule="cosine", which decays over the run's length.
    "num_epochs",
    "num_train_steps",
    "early_stopping_patience_epochs",
    "steps_per_dispatch",  # How many steps one dispatch runs, not which steps.
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "num_image_samples",
    "progress_bar",
    "nonfinite_policy",
    "max_nonfinite_skips",
    "num_devices",
    "data_dir",
    "idx_dir",
    "disentanglement_counts",
    # How the training split reaches the device, not which batches: both feeds give
    # the same batches (tests/test_input_pipeline.py).
    "data.feed",
    "data.device_memory_mib",
    "data.read_threads",
  }
)
# Fields that older versions wrote and this one no longer has, with the value
# that behaves like this version's defaults: a record holding that value still
# resumes. (Sweeps' KL schedule became the top-level kl_warmup_epochs/capacity_*.)
_RETIRED_FIELDS = {"sweep.schedule": "constant"}
_RETIRED_UNUSED = ("sweep.warmup_steps", "sweep.capacity_nats", "sweep.capacity_steps")


def check(workdir: str | pathlib.Path) -> pathlib.Path:
  """``workdir`` as a path (``~`` expanded), if it is a directory or does not exist yet.

  Raises:
    config.ConfigError: it is a file.
  """
  workdir = files.expand(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise config_lib.ConfigError(
      f"--workdir={workdir} is a file; give a directory (new or a run's)."
    )
  return workdir


def lock(workdir: pathlib.Path):
  """Holds ``workdir``'s lock (process 0 of a multi-host run): a second run of the same
  workdir stops at once, naming the first, before it reads or writes anything there."""
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  return locks.exclusive(workdir / LOCK, wait=False, what=f"The workdir {workdir}")


def has_checkpoints(workdir: pathlib.Path) -> bool:
  return bool(checkpointing.saved_steps(pathlib.Path(workdir) / CHECKPOINTS))


def _recorded(workdir: pathlib.Path) -> dict[str, Any] | None:
  """The record's fields, flattened, a field missing from an older record at its default
  (which is how that run behaved); ``None`` without a record."""
  path = pathlib.Path(workdir) / RECORD
  if not path.exists():
    return None
  try:
    stored = config_lib.flatten(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
      f"{path} cannot be read ({e}); it is the record of the run in {workdir}. Restore it "
      "from a copy, or move the workdir aside."
    ) from e
  saved = {**config_lib.flat(config_lib.base_config()), **stored}
  for field, value in _RETIRED_FIELDS.items():
    if saved.get(field) == value:
      saved.pop(field)
  if "sweep.schedule" not in saved:
    for field in _RETIRED_UNUSED:
      saved.pop(field, None)
  if "num_train_steps" not in stored:
    # Written before an explicit steps_per_dispatch won over the platform's decision:
    # its value was an upper bound, which the platform's decision now is.
    saved["steps_per_dispatch"] = None
  return saved


def differences(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[str]:
  """Fields in which ``config`` differs from the run recorded in ``workdir/config.json``.

  Returns one ``"  field: workdir has A, now B"`` line per field, leaving out
  those allowed to change on resume (``RESUMABLE_CHANGES``). No record: none.
  """
  saved = _recorded(workdir)
  if saved is None:
    return []
  now = config_lib.flat(config)
  resumable = set(RESUMABLE_CHANGES)
  if "cosine" in (saved.get("optimizer.schedule"), now.get("optimizer.schedule")):
    resumable -= {"num_epochs", "num_train_steps"}  # The cosine schedule decays over them.
  return [
    f"  {k}: workdir has {saved.get(k)!r}, now {now.get(k)!r}"
    for k in sorted(set(saved) | set(now))
    if not _same(saved.get(k), now.get(k)) and k not in resumable
  ]


def _same(a: Any, b: Any) -> bool:
  """Equal values; NaN equals NaN (a record holding one still resumes under itself)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def check_resume(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, allow_change: bool = False
) -> list[str]:
  """Refuses a workdir whose checkpoints belong to a run of another config.

  A workdir without any checkpoint has nothing to protect. Differences (see
  ``differences``) raise ``ConfigError`` naming them, unless ``allow_change``;
  then they are returned for the caller to log.
  """
  if not has_checkpoints(workdir):
    return []
  diffs = differences(config, workdir)
  if diffs and not allow_change:
    raise config_lib.ConfigError(
      f"{workdir} holds a run with a different config:\n" + "\n".join(diffs) + "\n"
      "Resuming would mix two experiments. Use a new --workdir; or leave out --config to "
      "resume the run as it was recorded; or pass --allow_config_change if you mean to "
      "continue this run with the new values."
    )
  return diffs


def check_evaluation(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses to evaluate ``workdir`` under a config other than the one that trained it."""
  diffs = differences(config, workdir)
  if diffs:
    raise config_lib.ConfigError(
      f"{workdir} was trained with a different config:\n" + "\n".join(diffs) + "\n"
      "Leave out --config to evaluate it as it was recorded (--config.<field> overrides "
      "then change only what they name), or give the --config and overrides that trained it."
    )


def read_record(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config a workdir's run recorded: ``base_config()`` updated with its ``config.json``.

  Raises:
    config.ConfigError: the workdir has no record, or it cannot be read.
  """
  saved = _recorded(workdir)
  if saved is None:
    raise config_lib.ConfigError(
      f"{pathlib.Path(workdir) / RECORD} does not exist: {workdir} holds no run yet. Give "
      "--config to start one there."
    )
  config = config_lib.base_config()
  known = config_lib.flat(config)
  config.update_from_flattened_dict(
    {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
  )
  return config


def write_record(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Records ``config`` as ``workdir/config.json`` (atomically), and the random streams'
  settings as ``workdir/random.json`` if it has none yet (``check_random``)."""
  path = pathlib.Path(workdir) / RECORD
  with files.reporting(path):
    files.atomic_write(
      path, json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True) + "\n"
    )
  streams = pathlib.Path(workdir) / RANDOM
  if not streams.exists():
    with files.reporting(streams):
      files.atomic_write(streams, json.dumps(random_streams(config), indent=2) + "\n")


def random_streams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What, beside the config, decides a run's random numbers: JAX's PRNG implementation,
  whether threefry is partitionable (its draws differ between the two), and the key data
  of the run's root key (``jax.random.key(config.seed)``)."""
  key = jax.random.key(config.seed)
  return {
    "jax_default_prng_impl": str(jax.config.jax_default_prng_impl),
    "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    "root_key_data": [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()],
  }


def check_random(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses to resume ``workdir`` where its random streams would differ from those it
  started with (``workdir/random.json``; a run recorded before it existed is not checked).

  Raises:
    config.ConfigError: naming each setting that differs and how to restore it.
  """
  path = pathlib.Path(workdir) / RANDOM
  if not path.exists() or not has_checkpoints(workdir):
    return
  try:
    recorded = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
      f"{path} cannot be read ({e}); restore it or move it aside."
    ) from e
  now = random_streams(config)
  diffs = [
    f"  {k}: the run started with {recorded[k]!r}, now {now[k]!r}"
    for k in now
    if k in recorded and recorded[k] != now[k]
  ]
  if diffs:
    raise config_lib.ConfigError(
      f"{workdir} holds a run whose random streams differ from this process's:\n"
      + "\n".join(diffs)
      + "\nResuming would draw other noise and batches than the run began with. Set JAX's "
      "PRNG options as the run had them (e.g. JAX_THREEFRY_PARTITIONABLE=1, "
      "JAX_DEFAULT_PRNG_IMPL=threefry2x32), or use a new --workdir."
    )


def prepare(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, allow_change: bool
) -> pathlib.Path:
  """Checks ``workdir`` for a training run of ``config`` before anything is loaded or
  created there; returns it as a path. Allowed differences are logged.

  Raises:
    config.ConfigError: ``workdir`` is a file, or holds a run of another config (unless
      ``allow_change``).
  """
  workdir = check(workdir)
  diffs = check_resume(config, workdir, allow_change)
  check_random(config, workdir)
  if diffs:
    logging.warning("Config changed on resume (allowed by the caller):\n%s", "\n".join(diffs))
  return workdir
