"""The best parameters on validation, and early stopping: one hook for single runs and sweeps.

With ``config.validation_examples``, a program evaluates the validation split at each
evaluation boundary and hands the ELBOs to ``EarlyStopping.update``: the parameters
with the best validation ELBO so far are kept in ``WORKDIR/best`` (one Orbax
checkpoint, replaced atomically; for a sweep, every model's best in one stacked
checkpoint), and the run stops once every model has gone
``early_stopping_patience_epochs`` without a better one, counted from its best step
but not from before the KL warm-up ends (as the VampPrior code counts). A resumed run
that had already stopped is recognised at its start (``already_stopped``).
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vae_jax import checkpointing

Params = Any


class BestCheckpoint:
  """The parameters with the best validation ELBO so far, in ``directory``.

  One Orbax checkpoint ``{"params", "elbo"}`` named by its step, replaced
  atomically when a better one comes: the value and the parameters cannot
  disagree after a crash. Each save completes before the train state of the
  same step is saved, so a resumed run never lacks a best it has passed.
  For a sweep, ``params`` are stacked over models and ``elbo`` and ``step``
  are ``[M]``: each model keeps its own best.

  A best that the resumed run has not reached (saved after its latest
  checkpoint, or left by another run when this one starts fresh) belongs to
  no state this run holds: it is moved to ``<directory>_superseded_<time>``
  (kept, not deleted) and recomputed.
  """

  def __init__(
    self,
    directory: pathlib.Path,
    abstract_params: Params,
    sharding,
    resumed_step: int | None,
    num_models: int | None = None,
  ) -> None:
    self._sharding = sharding
    self.stacked = num_models is not None
    target = self.target(abstract_params, sharding, num_models)
    self._ckpt = checkpointing.Checkpointer(directory, max_to_keep=1)
    shape = (num_models,) if self.stacked else ()
    self.steps = np.full(shape, -1)
    self.elbos = np.full(shape, -np.inf)
    self._params = None
    restored = self._ckpt.restore_latest(target)
    if restored is None:
      return
    step, tree = restored
    if resumed_step is not None and step <= resumed_step:
      self.elbos = np.asarray(tree["elbo"], np.float64)
      self.steps = np.asarray(tree["step"]) if self.stacked else np.asarray(step)
      self._params = tree["params"]
      return
    self._ckpt.close()
    if jax.process_index() == 0:
      aside = directory.with_name(f"{directory.name}_superseded_{int(time.time())}")
      directory.rename(aside)
      logging.warning(
        "Best checkpoint %d is not from this run's past (resumed at step %s); moved it to %s.",
        step,
        resumed_step,
        aside,
      )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vae_jax: best checkpoint set aside")
    self._ckpt = checkpointing.Checkpointer(directory, max_to_keep=1)

  @staticmethod
  def target(abstract_params: Params, sharding, num_models: int | None = None) -> dict[str, Any]:
    """The saved tree's structure, for restoring it: ``{"params", "elbo"}`` (and
    ``"step"`` for a sweep, whose ``elbo`` and ``step`` are ``[M]``)."""
    if num_models is None:
      return {
        "params": abstract_params,
        "elbo": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding),
      }
    vector = functools.partial(jax.ShapeDtypeStruct, (num_models,), sharding=sharding)
    return {"params": abstract_params, "elbo": vector(jnp.float32), "step": vector(jnp.int32)}

  @property
  def step(self) -> int:
    """The step of the best parameters (the earliest over models, for a sweep)."""
    return int(np.min(self.steps))

  def update(self, step: int, elbo: float | np.ndarray, params: Params) -> np.ndarray:
    """Saves ``params`` where ``elbo`` beats the best so far; returns where it did."""
    better = np.asarray(elbo, np.float64) > self.elbos  # NaN never wins.
    if not better.any():
      return better
    if self.stacked:
      if self._params is None:
        self._params = params
      keep = jax.device_put(jnp.asarray(better), self._sharding)
      self._params = jax.tree.map(
        lambda new, old: jnp.where(keep.reshape(-1, *([1] * (new.ndim - 1))), new, old),
        params,
        self._params,
      )
      self.steps = np.where(better, step, self.steps)
      self.elbos = np.where(better, elbo, self.elbos)
      tree = {
        "params": self._params,
        "elbo": jax.device_put(jnp.asarray(self.elbos, jnp.float32), self._sharding),
        "step": jax.device_put(jnp.asarray(self.steps, jnp.int32), self._sharding),
      }
    else:
      self.steps, self.elbos = np.asarray(step), np.asarray(float(elbo))
      tree = {"params": params, "elbo": jax.device_put(jnp.float32(elbo), self._sharding)}
    self._ckpt.save(step, tree)
    self._ckpt.wait()  # Committed before the train state of this step is saved.
    return better

  def close(self) -> None:
    self._ckpt.close()


def patience_exhausted(
  step: int, best_steps: np.ndarray, warmup_end: int, patience_steps: int
) -> bool:
  """Whether every model has gone ``patience_steps`` without a better validation ELBO,
  counting from its best step but not from before the KL warm-up ends."""
  if not patience_steps:
    return False
  since = step - np.maximum(np.asarray(best_steps), warmup_end)
  return bool(np.all(since >= patience_steps))


class EarlyStopping:
  """The best parameters on validation (``BestCheckpoint``) and the patience rule.

  Args:
    config: the run's config (patience, KL warm-up, evaluation interval).
    steps_per_epoch: to turn epochs into steps.
    directory: ``WORKDIR/best``.
    abstract_params: the (stacked, for a sweep) parameters' shapes and shardings.
    sharding: where the scalars live.
    resumed_step: the step the run resumed at, ``None`` for a fresh start.
    num_models: ``M`` for a sweep, ``None`` for a single run.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    directory: pathlib.Path,
    abstract_params: Params,
    sharding,
    resumed_step: int | None,
    num_models: int | None = None,
  ):
    self._warmup_end = round(config.kl_warmup_epochs * steps_per_epoch)
    self._patience = config.early_stopping_patience_epochs * steps_per_epoch
    self.patience_epochs = config.early_stopping_patience_epochs
    self._eval_every = config.eval_every_steps or steps_per_epoch
    self.directory = directory
    self.best = BestCheckpoint(directory, abstract_params, sharding, resumed_step, num_models)

  def exhausted(self, step: int) -> bool:
    """Whether every model has run out of patience at ``step``."""
    return patience_exhausted(step, self.best.steps, self._warmup_end, self._patience)

  def already_stopped(self, step: int) -> bool:
    """Whether a run resumed at ``step`` had stopped there. Checked where the loop checks
    it, after an evaluation: a run killed between evaluations goes on to the next one, as
    it would have without the kill."""
    return bool(self.best.step >= 0 and step % self._eval_every == 0 and self.exhausted(step))

  def update(self, step: int, elbos: np.ndarray, params: Params) -> tuple[np.ndarray, bool]:
    """Keeps ``params`` where the validation ``elbos`` beat the best so far; returns
    ``(where they did, whether to stop now)``."""
    better = self.best.update(step, elbos if self.best.stacked else float(elbos[0]), params)
    return np.atleast_1d(better), self.exhausted(step)

  def close(self) -> None:
    self.best.close()
