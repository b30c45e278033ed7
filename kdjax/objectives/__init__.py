"""Distillation methods, one file each, behind one interface (kdjax.objectives.base):

  cross_entropy    next-token cross-entropy alone (teacher and scratch phases, alpha = 0)
  logits           a divergence between temperature-scaled teacher and student logits + CE
  chunked_logits   the same loss, fused and chunked over tokens: no [B, L, V] logits held
  cached_teacher   the soft loss from an offline teacher cache; no teacher runs
  hidden_states    a logit objective plus hidden-state and attention-map terms

`make` picks the objective that a phase's settings describe. Sequence-level distillation (training
on the teacher's text) and on-policy distillation (on the student's samples, kdjax.gkd) are not
objectives: they change the data or the batch, and the step applies the objective to either.

Adding a method = one file here with a frozen dataclass that has `teacher_needs` and `loss`, and
the config value that selects it in `make`.
"""

from __future__ import annotations

from kdjax import features, sharding
from kdjax.model import ModelConfig
from kdjax.objectives.base import Objective, TeacherNeeds, make_teacher_forward
from kdjax.objectives.cached_teacher import CachedTeacher
from kdjax.objectives.chunked_logits import ChunkedLogits
from kdjax.objectives.cross_entropy import CrossEntropy
from kdjax.objectives.hidden_states import HiddenStates
from kdjax.objectives.logits import Logits
from kdjax.settings import DistillSettings

__all__ = ["Objective", "TeacherNeeds", "make", "make_teacher_forward", "CachedTeacher",
           "ChunkedLogits", "CrossEntropy", "HiddenStates", "Logits"]


def make(s_cfg: ModelConfig, distill: DistillSettings | None = None,
         t_cfg: ModelConfig | None = None, rules: sharding.Rules | None = None,
         ce_chunk_size: int = 0) -> Objective:
  """The objective of a phase: cross-entropy without a teacher or cache (chunked over
  `ce_chunk_size` tokens when > 0); the cache's estimator
  with `distill.cache_estimator`; else the logit loss (chunked when `distill.loss_chunk_size`),
  wrapped with feature terms when `distill` weights any."""
  if t_cfg is not None and distill is None:
    raise ValueError("objectives.make: a teacher needs DistillSettings.")
  if t_cfg is None and any(features.terms_on(distill)):
    raise ValueError("objectives.make: feature distillation needs the teacher's t_cfg (a "
                     "teacher cache holds no hidden states or attention maps).")
  if distill is not None and distill.cache_estimator:
    if t_cfg is not None:
      raise ValueError("objectives.make: a teacher cache replaces the teacher; pass t_cfg=None.")
    return CachedTeacher(s_cfg, distill, rules)
  if distill is None or t_cfg is None:
    return CrossEntropy(s_cfg, rules, chunk_size=ce_chunk_size)
  if distill.loss_chunk_size > 0:
    logit_term = ChunkedLogits(s_cfg, distill, rules, t_softcap=t_cfg.logit_softcap)
  else:
    logit_term = Logits(s_cfg, distill, rules)
  plan = features.make_plan(distill, s_cfg, t_cfg)
  return logit_term if plan is None else HiddenStates(logit_term, plan)
