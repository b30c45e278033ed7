"""The interface every distillation method implements, and the forward passes they share.

An objective is a frozen dataclass (static: a change recompiles the step) with

  teacher_needs   what the teacher's forward must hand it: a `TeacherNeeds`
  loss(params, aux, batch, teacher_out, step) -> (loss, metrics)

`loss` is all the step differentiates. `teacher_out` is the teacher's output as asked for (or
None); it arrives as a constant, computed outside `value_and_grad` under `stop_gradient`. `aux`
is TrainState.aux_params (the feature projection) or None; `step` is state.step, traced, which
drives the scheduled alpha, temperature and feature weight. `metrics` always holds 'loss' and
'num_tokens' (the unmasked targets the loss is a mean over).

An objective that learns from the student's own samples (kdjax.gkd) is the same objective with
`on_policy=True`: the transform of the batch happens in the step, not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from kdjax import features, qwix_model, sharding
from kdjax.model import ModelConfig, Transformer, unembedding

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: BxL int32; mask: BxL f32
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TeacherNeeds:
  """What one objective reads from the teacher's forward pass.

  output: 'none' (no teacher runs), 'logits' (t_logits_BxLxV) or 'final_hidden'
  ((t_hidden_BxLxD, t_unembed_DxV), for the chunked loss). With a feature plan the teacher also
  returns its mapped layers' hidden states and attention maps: teacher_out = (output, t_feats).
  """

  output: str = "none"
  plan: features.FeaturePlan | None = None


class Objective(Protocol):
  teacher_needs: TeacherNeeds
  needs_aux: bool  # whether `loss` reads aux (TrainState.aux_params) and the state must hold it

  def loss(self, params: Any, aux: Any, batch: Batch, teacher_out: Any,
           step: jax.Array) -> tuple[jax.Array, Metrics]:
    ...

  def with_on_policy(self) -> "Objective":
    """The objective on the student's own samples (kdjax.gkd), for objectives with a live
    teacher; others raise."""
    ...


class NoOnPolicy:
  """For objectives without a live teacher's distributions: nothing to learn on samples."""

  needs_aux = False

  def with_on_policy(self):
    raise ValueError(f"{type(self).__name__} has no on-policy form: on-policy distillation "
                     "needs a live teacher.")


def forward(cfg: ModelConfig, params: Any, batch: Batch, rules: sharding.Rules | None,
            final_hidden: bool = False) -> jax.Array:
  """logits_BxLxV (float32), or the final hidden_BxLxD with `final_hidden`."""
  with sharding.activation_rules(rules):
    return qwix_model.build(cfg).apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                  batch["positions"], return_final_hidden=final_hidden)


def num_tokens(batch: Batch) -> jax.Array:
  return jnp.sum(batch["mask"])


def make_teacher_forward(t_cfg: ModelConfig, needs: TeacherNeeds,
                         rules: sharding.Rules | None = None):
  """`teacher_forward(teacher_params, batch) -> teacher_out`, a constant for the student.

  `rules` bind the teacher's activation constraints; they may differ from the student's (say, a
  teacher sharded FSDP-only next to a tensor-parallel student).
  """
  t_model = Transformer(t_cfg)
  final_hidden = needs.output == "final_hidden"

  def teacher_forward(teacher_params, batch: Batch):
    with sharding.activation_rules(rules):
      if needs.plan is not None:
        out, t_feats = features.forward(t_model, t_cfg, teacher_params, batch, needs.plan,
                                        needs.plan.t_layers, final_hidden)
      else:
        out, t_feats = t_model.apply({"params": teacher_params}, batch["inputs"],
                                     batch["segment_ids"], batch["positions"],
                                     return_final_hidden=final_hidden), None
    if final_hidden:
      out = (out, unembedding(t_cfg, teacher_params))
    return jax.lax.stop_gradient(out if needs.plan is None else (out, t_feats))

  return teacher_forward


def soft_loss_settings(distill, step, on_policy: bool) -> dict[str, Any]:
  """The soft loss's divergence, alpha and temperature at `step`: on the student's own samples
  (kdjax.gkd) the generalized JSD alone (alpha 1, there is no ground truth), else the settings'."""
  knobs = distill.at(step)
  loss, alpha = ("generalized_jsd", 1.0) if on_policy else (distill.loss, knobs["alpha"])
  return dict(loss=loss, alpha=alpha, temperature=knobs["temperature"], beta=distill.beta,
              skew=distill.skew)
