"""Next-token cross-entropy alone: the teacher and scratch phases, and distillation at alpha = 0."""

from __future__ import annotations

import dataclasses
from typing import Any

from kdjax import losses, sharding
from kdjax.model import ModelConfig
from kdjax.objectives import base


@dataclasses.dataclass(frozen=True)
class CrossEntropy(base.NoOnPolicy):
  s_cfg: ModelConfig
  rules: sharding.Rules | None = None
  teacher_needs: base.TeacherNeeds = base.TeacherNeeds()

  def loss(self, params: Any, aux: Any, batch: base.Batch, teacher_out: Any, step):
    del aux, teacher_out, step
    s_logits_BxLxV = base.forward(self.s_cfg, params, batch, self.rules)
    ce = losses.cross_entropy(s_logits_BxLxV, batch["targets"], batch["mask"])
    return ce, {"loss": ce, "hard_loss": ce, "num_tokens": base.num_tokens(batch)}
