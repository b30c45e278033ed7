"""Next-token cross-entropy alone: the teacher and scratch phases, and distillation at alpha = 0.

With `chunk_size` > 0 (config.teacher_train / student_train.loss_chunk_size) the loss comes from
the final hidden states a chunk of tokens at a time (losses.chunked_cross_entropy), so no
[B, L, V] logits are held: what a 128k-256k vocabulary needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kdjax import losses, sharding
from kdjax.model import ModelConfig, unembedding
from kdjax.objectives import base


@dataclasses.dataclass(frozen=True)
class CrossEntropy(base.NoOnPolicy):
  s_cfg: ModelConfig
  rules: sharding.Rules | None = None
  chunk_size: int = 0  # tokens per chunk of the fused loss; 0 = whole logits
  teacher_needs: base.TeacherNeeds = base.TeacherNeeds()

  def loss(self, params: Any, aux: Any, batch: base.Batch, teacher_out: Any, step):
    del aux, teacher_out, step
    if self.chunk_size > 0:
      s_hidden_BxLxD = base.forward(self.s_cfg, params, batch, self.rules, final_hidden=True)
      return losses.chunked_cross_entropy(
          s_hidden_BxLxD, unembedding(self.s_cfg, params), batch["targets"], batch["mask"],
          chunk_size=self.chunk_size, logit_softcap=self.s_cfg.logit_softcap)
    s_logits_BxLxV = base.forward(self.s_cfg, params, batch, self.rules)
    ce = losses.cross_entropy(s_logits_BxLxV, batch["targets"], batch["mask"])
    return ce, {"loss": ce, "hard_loss": ce, "num_tokens": base.num_tokens(batch)}
