"""Step-dependent loss settings: alpha, temperature and feature weight, annealed over training.

A schedule moves a value from `start` (the plain config field: config.distill.alpha, .temperature
or .feature_weight) to `end` over `steps` optimizer steps, then holds `end`:

    constant   start                                        (the plain field, as if unscheduled)
    linear     start + (end - start) * t
    cosine     end + (start - end) * (1 + cos(pi * t)) / 2  (flat at both ends)

with t = min(step, steps) / steps and `step` the number of updates applied before this one
(TrainState.step: 0 on the first step), so the first step uses `start` exactly and every step from
`steps` on uses `end` exactly.

In a config each schedule is a small ConfigDict, overridable from the command line:

    --config.distill.alpha_schedule.kind=linear --config.distill.alpha_schedule.end=0.9

`steps=0` means the whole phase (resolved by the training loop with `resolved`). A constant
schedule returns `start` as the same Python float, so an unscheduled run traces exactly the step
it did before schedules existed; the others return a float32 scalar traced from the step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

KINDS = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Where a value goes from its start (kept by the caller); static, so hashable."""

  kind: str = "constant"
  end: float = 0.0
  steps: int = 0  # 0 = the phase's step count, filled in by `resolved`

  @classmethod
  def from_config(cls, d: Any) -> "Schedule":
    """From a {'kind', 'end', 'steps'} dict or ConfigDict (kdjax.settings.distill_section)."""
    return cls(kind=str(d["kind"]), end=float(d["end"]), steps=int(d["steps"]))

  @property
  def is_constant(self) -> bool:
    return self.kind == "constant"

  def resolved(self, total_steps: int) -> "Schedule":
    """`steps=0` replaced by `total_steps` (the phase's length)."""
    return self if self.steps > 0 else dataclasses.replace(self, steps=int(total_steps))


def value(schedule: Schedule, start: float, step: jax.Array | int) -> float | jax.Array:
  """The scheduled value at `step`: `start` itself when constant, else a float32 scalar."""
  if schedule.kind not in KINDS:
    raise ValueError(f"unknown schedule kind {schedule.kind!r}; use one of {KINDS}")
  if schedule.is_constant:
    return start
  if schedule.steps <= 0:
    raise ValueError(f"a {schedule.kind} schedule needs steps >= 1 (0 must be resolved to the "
                     "phase's steps first: Schedule.resolved)")
  step = jnp.asarray(step)
  t = jnp.minimum(step, schedule.steps).astype(jnp.float32) / schedule.steps
  start_f32, end_f32 = jnp.float32(start), jnp.float32(schedule.end)
  if schedule.kind == "linear":
    moving = start_f32 + (end_f32 - start_f32) * t
  else:
    moving = end_f32 + (start_f32 - end_f32) * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * t))
  # Past the schedule, `end` exactly: start + (end - start) * 1 may round to a neighbour of it.
  return jnp.where(step >= schedule.steps, end_f32, moving)


def bounds(schedule: Schedule, start: float) -> tuple[float, float]:
  """The least and greatest value the schedule takes (both schedules are monotone)."""
  if schedule.is_constant:
    return start, start
  return min(start, schedule.end), max(start, schedule.end)
