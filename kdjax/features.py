"""Feature distillation: the student matches the teacher's hidden states and attention maps.

Beyond the output distribution, a student can be taught what the teacher computes inside (FitNets,
Romero et al. 2015; TinyBERT, Jiao et al. 2020; MiniLM, Wang et al. 2020). For each mapped layer
pair (student layer i, teacher layer j):

  hidden states   student layer i's output (the residual stream after the layer, before the final
                  norm) against teacher layer j's, by MSE or cosine distance
                  (losses.hidden_state_loss). When the widths differ, the student's states first
                  pass through a learned linear map D_s -> D_t, one per pair.
  attention maps  KL(teacher || student) between the two layers' head-averaged attention maps
                  (losses.attention_kl). Head-averaged because teacher and student differ in head
                  count and key/value grouping (GQA): the mean of softmax(q k^T) over a layer's H
                  query heads is a distribution over keys per query, whatever H and N are.

    total = alpha * soft + (1 - alpha) * hard + feature_weight * hidden + attention_weight * attn

The projection is training state, not part of the student: it lives in TrainState.aux_params, is
updated by the same optimizer (inside the same global-norm clip), checkpointed in the 'train' item
with the optimizer state, and never enters TrainState.params, which is what evaluation and export
read. With equal widths there is no projection (the identity) and no aux_params.

The layer map is config.distill.feature_layers, [[student_layer, teacher_layer], ...]; [] is the
uniform map (`uniform_layer_map`), one pair per student layer. Both terms use the same pairs.

Cost: the hidden term keeps every layer's S x B x L x D states of both models, the attention term
every layer's S x B x L x L float32 maps plus an extra B x H x L x L softmax per layer (the fused
attention kernel exposes no probabilities); the mapped layers are picked after the scan.
Shape letters as in the glossary of kdjax/__init__.py: S layers, B batch, L length, D width (D_s,
D_t the student's and the teacher's), H query heads, N key/value heads, M mapped layer pairs (one
projection each).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.layers import LogicalAxes
from kdjax.model import ATTENTION_MAPS, ModelConfig, collected_attention

# Logical axes of the projection kernel MxD_sxD_t: one per pair (unsharded, like stacked layers),
# the student's width sharded as its params' 'embed', the teacher's width replicated by default.
PROJECTION_AXES = ("layers", "embed", "teacher_embed")


def uniform_layer_map(s_layers: int, t_layers: int) -> tuple[tuple[int, int], ...]:
  """Student layer i <-> teacher layer round((i + 1) * S_t / S_s) - 1, halves rounded up and the
  result floored at 0: every student layer once, evenly spread, the last on the teacher's last.
  With S_t = k * S_s that is i <-> (i + 1) * k - 1 (TinyBERT's map); e.g. S_s = 2, S_t = 5 gives
  (0, 2), (1, 4) and S_s = 3, S_t = 4 gives (0, 0), (1, 2), (2, 3)."""
  # Integer form of floor(x + 1/2) with x = (i + 1) * S_t / S_s: exact, no float rounding.
  return tuple((i, max(0, (2 * (i + 1) * t_layers + s_layers) // (2 * s_layers) - 1))
               for i in range(s_layers))


@dataclasses.dataclass(frozen=True)
class FeaturePlan:
  """The static shape of the feature terms of one student/teacher pair."""

  s_layers: tuple[int, ...]
  t_layers: tuple[int, ...]
  hidden: bool  # the hidden-state term is on
  attention: bool  # the attention-map term is on
  hidden_loss: str  # 'mse' or 'cosine'
  s_width: int
  t_width: int

  @property
  def projection(self) -> bool:
    """Whether the student's hidden states need the learned map to the teacher's width."""
    return self.hidden and self.s_width != self.t_width


def terms_on(distill: Any) -> tuple[bool, bool]:
  """(hidden, attention): which terms `distill` (settings.DistillSettings) asks for; see
  DistillSettings.feature_terms."""
  return (False, False) if distill is None else distill.feature_terms


def make_plan(distill: Any, s_cfg: ModelConfig, t_cfg: ModelConfig | None) -> FeaturePlan | None:
  """The plan for `distill` (settings.DistillSettings), or None when both terms are off (or there is
  no teacher): then nothing of this module runs and the step is what it was without it."""
  hidden, attention = terms_on(distill)
  if t_cfg is None or not (hidden or attention):
    return None
  pairs = (tuple(tuple(p) for p in distill.feature_layers)
           or uniform_layer_map(s_cfg.num_layers, t_cfg.num_layers))
  for i, j in pairs:
    if not (0 <= i < s_cfg.num_layers and 0 <= j < t_cfg.num_layers):
      raise ValueError(f"feature layer pair ({i}, {j}) is out of range for a {s_cfg.num_layers}-"
                       f"layer student and a {t_cfg.num_layers}-layer teacher")
  return FeaturePlan(s_layers=tuple(int(i) for i, _ in pairs),
                     t_layers=tuple(int(j) for _, j in pairs), hidden=hidden,
                     attention=attention, hidden_loss=distill.feature_loss,
                     s_width=s_cfg.d_model, t_width=t_cfg.d_model)


def init_projection(plan: FeaturePlan, rng: jax.Array) -> dict[str, Any]:
  """{'kernel': MxD_sxD_t} (boxed with PROJECTION_AXES), LeCun normal over the student's width,
  so a projected state starts at about the student's own scale."""
  init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                          out_axis=-1, batch_axis=(0,))
  kernel_MxDsxDt = init(rng, (len(plan.s_layers), plan.s_width, plan.t_width), jnp.float32)
  return {"kernel": LogicalAxes(kernel_MxDsxDt, PROJECTION_AXES)}


def project(projection: dict[str, Any], s_hidden_MxBxLxD: jax.Array) -> jax.Array:
  """The student's mapped hidden states at the teacher's width, MxBxLxD_t, in float32."""
  return jnp.einsum("mbld,mde->mble", s_hidden_MxBxLxD, projection["kernel"],
                    preferred_element_type=jnp.float32)


def forward(model: nn.Module, cfg: ModelConfig, params: Any, batch: dict[str, jax.Array],
            plan: FeaturePlan, layers: tuple[int, ...], final_hidden: bool):
  """(out, feats): the model's usual output (logits_BxLxV, or the final hidden_BxLxD with
  `final_hidden`) and feats = {'hidden': MxBxLxD, 'attention': MxBxLxL} of `layers`, each
  present only when its term is on."""
  out = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                    batch["positions"], return_hidden=plan.hidden,
                    return_final_hidden=final_hidden,
                    mutable=[ATTENTION_MAPS] if plan.attention else False)
  if plan.attention:
    out, collections = out
  if plan.hidden:
    out, hidden_SxBxLxD = out
  picked_M = np.asarray(layers, np.int32)  # static: a gather of whole layers
  feats = {}
  if plan.hidden:
    feats["hidden"] = hidden_SxBxLxD[picked_M]
  if plan.attention:
    feats["attention"] = collected_attention(cfg, collections[ATTENTION_MAPS])[picked_M]
  return out, feats


def feature_losses(plan: FeaturePlan, s_feats: dict[str, jax.Array], t_feats: dict[str, jax.Array],
                   projection: dict[str, Any] | None, mask_BxL: jax.Array) -> dict[str, jax.Array]:
  """{'feature_loss': the hidden-state term, 'attention_loss': the attention term}, unweighted,
  each present only when on."""
  out = {}
  if plan.hidden:
    s_hidden_MxBxLxD = s_feats["hidden"]
    if plan.projection:
      s_hidden_MxBxLxD = project(projection, s_hidden_MxBxLxD)
    out["feature_loss"] = losses.hidden_state_loss(s_hidden_MxBxLxD, t_feats["hidden"], mask_BxL,
                                                   kind=plan.hidden_loss)
  if plan.attention:
    out["attention_loss"] = losses.attention_kl(s_feats["attention"], t_feats["attention"],
                                                mask_BxL)
  return {k: v.astype(jnp.float32) for k, v in out.items()}
