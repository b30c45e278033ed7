"""Logit distillation through the fused chunked vocabulary loss: the same loss as
kdjax.objectives.logits, computed from both models' final hidden states and unembeddings a chunk
of tokens at a time (losses.chunked_distillation_loss), so no [B, L, V] logits are ever held.
Worth it when vocab x seq_len is large (config.distill.loss_chunk_size > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from kdjax import losses, sharding
from kdjax.model import ModelConfig, unembedding
from kdjax.objectives import base
from kdjax.settings import DistillSettings


@dataclasses.dataclass(frozen=True)
class ChunkedLogits:
  s_cfg: ModelConfig
  distill: DistillSettings
  rules: sharding.Rules | None = None
  t_softcap: float = 0.0  # the teacher's logit soft-cap, applied inside the chunked loss
  on_policy: bool = False
  needs_aux = False  # a class constant, not a field
  teacher_needs: base.TeacherNeeds = base.TeacherNeeds("final_hidden")

  def with_on_policy(self) -> "ChunkedLogits":
    """This objective on the student's own samples: generalized JSD(beta), no cross-entropy."""
    return dataclasses.replace(self, on_policy=True)

  def loss(self, params: Any, aux: Any, batch: base.Batch, teacher_out: Any, step):
    del aux
    s_hidden_BxLxD = base.forward(self.s_cfg, params, batch, self.rules, final_hidden=True)
    return self.loss_from_hidden(params, s_hidden_BxLxD, teacher_out, batch, step)

  def loss_from_hidden(self, params: Any, s_hidden_BxLxD: jax.Array, teacher_out: Any,
                       batch: base.Batch, step):
    """The loss given the student's final hidden states and the teacher's (hidden, unembed)."""
    t_hidden_BxLxD, t_unembed_DxV = teacher_out
    s_unembed_DxV, t_unembed_DxV = losses.shared_vocab(unembedding(self.s_cfg, params),
                                                       t_unembed_DxV)
    return losses.chunked_distillation_loss(
        s_hidden_BxLxD, s_unembed_DxV, t_hidden_BxLxD, t_unembed_DxV, batch["targets"],
        batch["mask"], **base.soft_loss_settings(self.distill, step, self.on_policy),
        chunk_size=self.distill.loss_chunk_size,
        s_logit_softcap=self.s_cfg.logit_softcap, t_logit_softcap=self.t_softcap)
