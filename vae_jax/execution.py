"""How a run executes on its platform: the decisions made once, when a run is built.

One rule lives here. XLA's CPU backend runs a convolution inside a loop or conditional
body (``lax.scan``, ``lax.cond``, ``while``) many times slower than the same convolution
at the top level of a program: jax-ml/jax#12868 ("Convolution is significantly slower
inside a loop body (CPU)", open since 2022). Measured here with jax 0.10.2 on a 2-core
x86-64 CPU: the dSprites convolutional VAE's train step took 0.20 s alone and 1.8 s
inside a ``lax.scan`` (docs/performance.md). Dense layers and accelerators are not
affected. So, on CPU, a convolutional model takes one train step per dispatch, outside
any loop, and the evaluation's short loops are unrolled; everything else dispatches
``DEFAULT_STEPS_PER_DISPATCH`` steps in one scanned call. An explicit
``config.steps_per_dispatch`` wins over the rule. ``plan`` makes the decision,
``Plan.reason`` says why, and the run logs it; the train step, the evaluation and the
importance-sampling estimator read the ``Plan``, never the platform.

If a later XLA runs convolutions in loop bodies at full speed, the rule should go: the
timings in docs/performance.md say how to check.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

# Train steps per dispatch when neither the config nor the platform rule says otherwise.
DEFAULT_STEPS_PER_DISPATCH = 100


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a run executes.

  Attributes:
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``: the platform of the run's devices.
    steps_per_dispatch: train steps per jitted call (before capping at an epoch).
    unroll_loops: unroll the evaluation's short loops (full-split ELBO, importance
      samples) instead of running them as ``lax.scan`` loops.
    reason: why, in a sentence, for the log.
  """

  platform: str
  steps_per_dispatch: int
  unroll_loops: bool
  reason: str


def platform() -> str:
  """The platform of the devices a run uses (``jax.devices()[0]``, as the mesh does)."""
  return jax.devices()[0].platform


def plan(config: ml_collections.ConfigDict, on: str | None = None) -> Plan:
  """The execution plan of ``config`` on platform ``on`` (default: this process's)."""
  on = on or platform()
  convolutions_in_loops_are_slow = on == "cpu" and config.model.kind in ("conv", "resnet")
  if config.steps_per_dispatch is not None:
    steps, reason = config.steps_per_dispatch, "config.steps_per_dispatch"
    if convolutions_in_loops_are_slow and steps > 1:
      reason += (
        " (a convolutional model on CPU runs several times slower in a scanned dispatch, "
        "jax-ml/jax#12868; None would choose 1)"
      )
  elif convolutions_in_loops_are_slow:
    steps = 1
    reason = (
      "a convolutional model on CPU: one step per dispatch, outside any loop, since XLA:CPU "
      "runs convolutions inside loop bodies many times slower (jax-ml/jax#12868)"
    )
  else:
    steps, reason = DEFAULT_STEPS_PER_DISPATCH, f"the default on {on}"
  return Plan(
    platform=on,
    steps_per_dispatch=steps,
    unroll_loops=convolutions_in_loops_are_slow,
    reason=reason,
  )
