"""Held-out evaluation: perplexity, top-1 agreement with the teacher, KL(teacher || model).

All three are exact token-weighted means over the unmasked targets of the eval batches (each
batch's mean is re-weighted by its token count), whatever the batch boundaries.

Every process holds the same eval batches in full. Given a `Placement` (mesh and rules), each batch
becomes a global array split over (data, fsdp) and the step traces under the mesh, so evaluation
is data-parallel and works on many hosts; the returned sums are scalars every process can read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses, sharding
from kdjax.model import ModelConfig, Transformer

METRICS = ("loss", "accuracy", "top1_agreement", "kl_to_teacher")


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where evaluation runs: the mesh, and the rules of the model's and the teacher's activations."""

  mesh: Any
  rules: sharding.Rules | None = None
  t_rules: sharding.Rules | None = None

  def batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: sharding.global_array(v, sharding.batch_sharding(self.mesh))
            for k, v in batch.items()}


def _placed(placement: Placement | None, batch):
  return batch if placement is None else placement.batch(batch)


def _mesh_context(placement: Placement | None):
  return contextlib.nullcontext() if placement is None else jax.set_mesh(placement.mesh)


def _apply(model, params, batch, rules):
  with sharding.activation_rules(rules):
    return model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                       batch["positions"])


@functools.lru_cache(maxsize=8)
def make_eval_step(cfg: ModelConfig, t_cfg: ModelConfig, rules=None, t_rules=None):
  """One compiled eval step per (model, teacher, rules), reused across calls."""
  model, t_model = Transformer(cfg), Transformer(t_cfg)

  @jax.jit
  def eval_step(params, t_params, batch):
    logits_BxLxV = _apply(model, params, batch, rules)
    t_logits_BxLxV = _apply(t_model, t_params, batch, t_rules)
    logits_BxLxV, t_logits_BxLxV = losses.shared_vocab(logits_BxLxV, t_logits_BxLxV)
    targets, mask = batch["targets"], batch["mask"]
    n = jnp.sum(mask)
    means = {
        "loss": losses.cross_entropy(logits_BxLxV, targets, mask),
        "accuracy": losses.token_accuracy(logits_BxLxV, targets, mask),
        "top1_agreement": losses.top1_agreement(logits_BxLxV, t_logits_BxLxV, mask),
        "kl_to_teacher": losses.forward_kl(logits_BxLxV, t_logits_BxLxV, mask, temperature=1.0),
    }
    return {k: v * n for k, v in means.items()}, n

  return eval_step


@functools.lru_cache(maxsize=8)
def _loss_sums(cfg: ModelConfig, rules=None):
  model = Transformer(cfg)

  @jax.jit
  def loss_sums(params, batch):
    logits_BxLxV = _apply(model, params, batch, rules)
    n = jnp.sum(batch["mask"])
    return losses.cross_entropy(logits_BxLxV, batch["targets"], batch["mask"]) * n, n

  return loss_sums


def held_out_loss(cfg: ModelConfig, params: Any, batches: Sequence[dict[str, np.ndarray]],
                  placement: Placement | None = None) -> float:
  """Token-weighted mean cross-entropy over `batches` (no teacher needed)."""
  loss_sums = _loss_sums(cfg, placement and placement.rules)
  total, tokens = 0.0, 0.0
  for batch in batches:
    with _mesh_context(placement):
      s, n = jax.device_get(loss_sums(params, _placed(placement, batch)))
    total, tokens = total + float(s), tokens + float(n)
  return total / max(tokens, 1.0)


def evaluate(cfg: ModelConfig, params: Any, t_cfg: ModelConfig, t_params: Any,
             batches: Sequence[dict[str, np.ndarray]],
             placement: Placement | None = None) -> dict[str, float]:
  """Token-weighted means over `batches`, plus `ppl` = exp(loss) and `tokens`."""
  eval_step = make_eval_step(cfg, t_cfg, placement and placement.rules,
                             placement and placement.t_rules)
  sums = {k: 0.0 for k in METRICS}
  tokens = 0.0
  for batch in batches:
    with _mesh_context(placement):
      batch_sums, n = jax.device_get(eval_step(params, t_params, _placed(placement, batch)))
    for k in METRICS:
      sums[k] += float(batch_sums[k])
    tokens += float(n)
  out = {k: v / max(tokens, 1.0) for k, v in sums.items()}
  out["ppl"] = math.exp(out["loss"])
  out["tokens"] = tokens
  return out
