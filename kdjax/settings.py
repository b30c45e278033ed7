"""The config boundary: an ml_collections ConfigDict becomes frozen settings dataclasses once.

Library code reads these dataclasses, never the ConfigDict: a field's default lives in one place
(here, or ModelConfig in kdjax.model), and configs build their sections from these defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from kdjax import features, gkd, schedules


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The static part of the loss; a change here recompiles the step."""

  loss: str = "forward_kl"
  temperature: float = 1.0
  alpha: float = 0.5
  beta: float = 0.5
  skew: float = 0.1
  # > 0: the fused chunked loss from final hidden states; no [B, L, V] logits are held.
  loss_chunk_size: int = 0
  # Feature distillation (kdjax.features); 0 weights leave it out of the step entirely.
  feature_weight: float = 0.0
  feature_loss: str = "mse"  # 'mse' or 'cosine'
  feature_layers: tuple[tuple[int, int], ...] = ()  # (student, teacher) pairs; () = uniform
  attention_weight: float = 0.0
  # Each starts from the plain field above (kdjax.schedules); constant = unscheduled.
  alpha_schedule: schedules.Schedule = schedules.Schedule()
  temperature_schedule: schedules.Schedule = schedules.Schedule()
  feature_weight_schedule: schedules.Schedule = schedules.Schedule()
  # Offline teacher (kdjax.teacher_cache): non-empty = the soft loss reads the batch's cached
  # t_* arrays with this estimator (cache_losses) and the step runs no teacher; cache_vocab_size
  # is the cache's vocabulary, which the student's logits are cut to (padding rows past it).
  cache_estimator: str = ""
  cache_vocab_size: int = 0
  # On-policy distillation (kdjax.gkd); None = off.
  on_policy: gkd.OnPolicy | None = None

  @classmethod
  def from_config(cls, d: Any) -> "DistillSettings":
    schedule = lambda name: schedules.Schedule.from_config(d.get(name, None))
    return cls(loss=d.loss, temperature=float(d.temperature), alpha=float(d.alpha),
               beta=float(d.get("beta", 0.5)), skew=float(d.get("skew", 0.1)),
               loss_chunk_size=int(d.get("loss_chunk_size", 0)),
               feature_weight=float(d.get("feature_weight", 0.0)),
               feature_loss=str(d.get("feature_loss", "mse")),
               feature_layers=tuple((int(i), int(j)) for i, j in d.get("feature_layers", ())),
               attention_weight=float(d.get("attention_weight", 0.0)),
               alpha_schedule=schedule("alpha_schedule"),
               temperature_schedule=schedule("temperature_schedule"),
               feature_weight_schedule=schedule("feature_weight_schedule"),
               cache_estimator=(str(d.get("cache_estimator", "topk_residual"))
                                if d.get("teacher_cache", "") else ""),
               on_policy=gkd.OnPolicy(
                   fraction=float(d.on_policy_fraction),
                   prompt_tokens=int(d.get("on_policy_prompt_tokens", 32)),
                   new_tokens=int(d.get("on_policy_new_tokens", 0)),
                   temperature=float(d.get("on_policy_temperature", 1.0)))
               if d.get("on_policy_fraction", 0.0) > 0 else None)

  def _schedules(self) -> dict[str, tuple[schedules.Schedule, float]]:
    return {"alpha": (self.alpha_schedule, self.alpha),
            "temperature": (self.temperature_schedule, self.temperature),
            "feature_weight": (self.feature_weight_schedule, self.feature_weight)}

  def at(self, step) -> dict[str, float | jax.Array]:
    """alpha, temperature and feature_weight for the update after `step` updates: the plain
    Python floats where unscheduled, traced float32 scalars where scheduled."""
    return {name: schedules.value(s, start, step) for name, (s, start) in self._schedules().items()}

  @property
  def uses_teacher(self) -> bool:
    """Whether any term of the loss reads a teacher (live or cached): False for alpha == 0 held
    constant with no feature term and no on-policy batches, which is cross-entropy alone."""
    soft = self.alpha > 0 or not self.alpha_schedule.is_constant
    return soft or any(features.terms_on(self)) or self.on_policy is not None

  @property
  def scheduled(self) -> tuple[str, ...]:
    """Names of the settings that follow a non-constant schedule (logged every step)."""
    return tuple(name for name, (s, _) in self._schedules().items() if not s.is_constant)

  def resolved(self, total_steps: int) -> "DistillSettings":
    """Schedules with `steps=0` stretched over the phase's `total_steps`."""
    return dataclasses.replace(
        self, alpha_schedule=self.alpha_schedule.resolved(total_steps),
        temperature_schedule=self.temperature_schedule.resolved(total_steps),
        feature_weight_schedule=self.feature_weight_schedule.resolved(total_steps))
