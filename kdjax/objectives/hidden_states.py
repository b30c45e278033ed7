"""Feature distillation: the logit objective (plain or chunked) plus hidden-state and attention-map
terms between mapped layers (kdjax.features has the maths and the layer map):

    loss = logit objective + feature_weight * hidden-state loss + attention_weight * attention KL

One student forward gives both the output the logit term needs and the mapped layers' features.
When the widths differ the student's states pass through a learned projection, TrainState's
aux_params['projection'], trained with the params and never exported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kdjax import features, qwix_model, sharding
from kdjax.model import ModelConfig
from kdjax.objectives import base
from kdjax.objectives.chunked_logits import ChunkedLogits
from kdjax.objectives.logits import Logits


@dataclasses.dataclass(frozen=True)
class HiddenStates:
  logit_term: Logits | ChunkedLogits
  plan: features.FeaturePlan

  @property
  def teacher_needs(self) -> base.TeacherNeeds:
    return base.TeacherNeeds(self.logit_term.teacher_needs.output, self.plan)

  @property
  def needs_aux(self) -> bool:
    """The learned projection between different widths lives in TrainState.aux_params."""
    return self.plan.projection

  @property
  def s_cfg(self) -> ModelConfig:
    return self.logit_term.s_cfg

  def with_on_policy(self) -> "HiddenStates":
    return dataclasses.replace(self, logit_term=dataclasses.replace(self.logit_term,
                                                                    on_policy=True))

  def loss(self, params: Any, aux: Any, batch: base.Batch, teacher_out: Any, step):
    chunked = isinstance(self.logit_term, ChunkedLogits)
    t_out, t_feats = teacher_out
    with sharding.activation_rules(self.logit_term.rules):
      s_out, s_feats = features.forward(qwix_model.build(self.s_cfg), self.s_cfg, params, batch,
                                        self.plan, self.plan.s_layers, chunked)
    if chunked:
      loss, metrics = self.logit_term.loss_from_hidden(params, s_out, t_out, batch, step)
    else:
      loss, metrics = self.logit_term.loss_from_logits(s_out, t_out, batch, step)
    projection = aux["projection"] if self.plan.projection else None
    terms = features.feature_losses(self.plan, s_feats, t_feats, projection, batch["mask"])
    if self.plan.hidden:
      loss = loss + self.logit_term.distill.at(step)["feature_weight"] * terms["feature_loss"]
    if self.plan.attention:
      loss = loss + self.logit_term.distill.attention_weight * terms["attention_loss"]
    return loss, dict(metrics, loss=loss, **terms)
