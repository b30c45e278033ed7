"""Logit distillation (Hinton et al. 2015): a divergence between the temperature-scaled teacher
and student distributions over the vocabulary, blended with next-token cross-entropy:

    loss = alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE

D is any divergence of kdjax.losses (config.distill.loss). On the student's own samples
(`on_policy`, kdjax.gkd) the loss is the generalized JSD(beta) alone: there is no ground truth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from kdjax import losses, sharding
from kdjax.model import ModelConfig
from kdjax.objectives import base
from kdjax.settings import DistillSettings


@dataclasses.dataclass(frozen=True)
class Logits:
  s_cfg: ModelConfig
  distill: DistillSettings
  rules: sharding.Rules | None = None
  on_policy: bool = False
  needs_aux = False  # a class constant, not a field
  teacher_needs: base.TeacherNeeds = base.TeacherNeeds("logits")

  def with_on_policy(self) -> "Logits":
    """This objective on the student's own samples: generalized JSD(beta), no cross-entropy."""
    return dataclasses.replace(self, on_policy=True)

  def loss(self, params: Any, aux: Any, batch: base.Batch, teacher_out: Any, step):
    del aux
    s_logits_BxLxV = base.forward(self.s_cfg, params, batch, self.rules)
    return self.loss_from_logits(s_logits_BxLxV, teacher_out, batch, step)

  def loss_from_logits(self, s_logits_BxLxV: jax.Array, t_logits_BxLxV: jax.Array,
                       batch: base.Batch, step):
    """The loss given both models' logits (kdjax.objectives.hidden_states reuses it)."""
    s_logits_BxLxV, t_logits_BxLxV = losses.shared_vocab(s_logits_BxLxV, t_logits_BxLxV)
    return losses.distillation_loss(
        s_logits_BxLxV, t_logits_BxLxV, batch["targets"], batch["mask"],
        **base.soft_loss_settings(self.distill, step, self.on_policy))
