"""A single training run: ``train_and_evaluate(config, workdir)``.

``SingleRun`` is the ``loop.Program`` of one model: its state is a ``step.TrainState``,
its batches come from the feed, and everything else (evaluation at each boundary,
images, the best parameters on validation, early stopping) is ``trainer.Program``'s,
shared with sweeps.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import config as config_lib
from vae_jax import input_pipeline, loop, optim, trainer
from vae_jax import step as step_lib
from vae_jax import workdir as workdir_lib
from vae_jax.models import Params
from vae_jax.step import TrainState


class SingleRun(trainer.Program):
  """One model: the ``loop.Program`` of ``config`` in ``workdir``."""

  stacked = False

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    built: trainer.Trainer,
    feed: input_pipeline.Feed,
    evaluation: input_pipeline.EvalData,
  ):
    ids = [trainer.ModelId("", config.seed, config.beta)]
    super().__init__(config, workdir, built, evaluation, ids, built.replicated)
    self.feed = feed
    self.chunk = built.make_chunk(feed.batch, batch_sharding=built.batch_sharding)

  def abstract_state(self) -> TrainState:
    return self.trainer.abstract_state()

  def init_state(self) -> TrainState:
    return self.trainer.init_state()

  def run_chunk(self, state: TrainState, step: int, num_steps: int):
    eps_key = self.trainer.keys[step_lib.KEY_EPS]
    return self.chunk(state, self.feed.inputs(step, num_steps), num_steps, eps_key)

  def num_skipped(self, state: TrainState) -> np.ndarray:
    return np.asarray([int(state.num_skipped)])

  def eval_params(self, state: TrainState) -> Params:
    return optim.eval_params(state.opt_state, state.params)

  def scores(self, params: Params, x, split: str) -> dict[str, np.ndarray]:
    key = self.trainer.keys[step_lib.KEY_EVAL]
    if split == "validation":
      key = jax.random.fold_in(key, 1)
    scores = jax.device_get(self.trainer.eval_fn(params, x, key))
    return {k: np.asarray([float(v)]) for k, v in scores.items()}

  def model_params(self, params: Params, i: int) -> Params:
    del i
    return params

  def abstract_params(self):
    return self.trainer.abstract_state().params


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, allow_config_change: bool = False
) -> TrainState:
  """Trains (or resumes) the VAE of ``config`` in ``workdir``; returns the final state.

  Raises:
    loop.Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was saved.
    loop.NonFiniteError: a non-finite loss, gradient or update (policy ``stop``,
      or more than ``config.max_nonfinite_skips`` skipped steps under ``skip``).
    config.ConfigError: the config is invalid, or differs from the workdir's run
      (unless ``allow_config_change``).
  """
  config_lib.validate(config)
  workdir = workdir_lib.prepare(config, workdir, allow_config_change)
  logging.info(
    "Config (the fields that differ from vae_jax.config.base_config()):\n%s",
    config_lib.describe(config),
  )
  with workdir_lib.lock(workdir):
    splits = input_pipeline.load_splits(config)
    built = trainer.build_trainer(config, splits.event_shape, splits.num_train)
    trainer.log_plan(built)
    evaluation = input_pipeline.eval_data(config, splits, built.replicated, built.model.likelihood)
    feed = built.feed(config, splits, built.replicated)
    del splits  # The device holds the data now (or the feed reads it); free the host copies.
    return loop.run(SingleRun(config, workdir, built, feed, evaluation), config)
