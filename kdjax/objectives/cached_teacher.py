"""Distillation from an offline teacher cache (kdjax.teacher_cache): no teacher runs in the step.

Each batch carries the teacher's stored top-k ids and log-probs (and tail mass, or temperature-
drawn samples) for its tokens, written by scripts/cache_teacher.py; the soft loss is one of the
cache's estimators (config.distill.cache_estimator), blended with cross-entropy as in
kdjax.objectives.logits. The student's logits are cut to the cache's vocabulary: the cached ids
index the shared tokenizer's ids, never the student's padding rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kdjax import sharding
from kdjax.model import ModelConfig
from kdjax.objectives import base
from kdjax.settings import DistillSettings
from kdjax.teacher_cache import estimators


@dataclasses.dataclass(frozen=True)
class CachedTeacher(base.NoOnPolicy):
  s_cfg: ModelConfig
  distill: DistillSettings
  rules: sharding.Rules | None = None
  teacher_needs: base.TeacherNeeds = base.TeacherNeeds()

  def loss(self, params: Any, aux: Any, batch: base.Batch, teacher_out: Any, step):
    del aux, teacher_out
    d = self.distill
    knobs = d.at(step)
    s_logits_BxLxV = base.forward(self.s_cfg, params, batch, self.rules)
    if d.cache_vocab_size:
      s_logits_BxLxV = s_logits_BxLxV[..., :d.cache_vocab_size]
    return estimators.distillation_loss(
        s_logits_BxLxV, batch, batch["targets"], batch["mask"], estimator=d.cache_estimator,
        temperature=knobs["temperature"], alpha=knobs["alpha"])
