"""Held-out evaluation: perplexity, top-1 agreement with the teacher, KL(teacher || model).

All three are exact token-weighted means over the unmasked targets of the eval batches (each
batch's mean is re-weighted by its token count), whatever the batch boundaries.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.model import ModelConfig, Transformer

METRICS = ("loss", "accuracy", "top1_agreement", "kl_to_teacher")


@functools.lru_cache(maxsize=8)
def make_eval_step(cfg: ModelConfig, t_cfg: ModelConfig):
  """One compiled eval step per (model, teacher) config pair, reused across calls."""
  model, t_model = Transformer(cfg), Transformer(t_cfg)

  @jax.jit
  def eval_step(params, t_params, batch):
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    logits_BxLxV = model.apply({"params": params}, *args)
    t_logits_BxLxV = t_model.apply({"params": t_params}, *args)
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
def _loss_sums(cfg: ModelConfig):
  model = Transformer(cfg)

  @jax.jit
  def loss_sums(params, batch):
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                               batch["positions"])
    n = jnp.sum(batch["mask"])
    return losses.cross_entropy(logits_BxLxV, batch["targets"], batch["mask"]) * n, n

  return loss_sums


def held_out_loss(cfg: ModelConfig, params: Any,
                  batches: Sequence[dict[str, np.ndarray]]) -> float:
  """Token-weighted mean cross-entropy over `batches` (no teacher needed)."""
  loss_sums = _loss_sums(cfg)
  total, tokens = 0.0, 0.0
  for batch in batches:
    s, n = jax.device_get(loss_sums(params, batch))
    total, tokens = total + float(s), tokens + float(n)
  return total / max(tokens, 1.0)


def evaluate(cfg: ModelConfig, params: Any, t_cfg: ModelConfig, t_params: Any,
             batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
  """Token-weighted means over `batches`, plus `ppl` = exp(loss) and `tokens`."""
  eval_step = make_eval_step(cfg, t_cfg)
  sums = {k: 0.0 for k in METRICS}
  tokens = 0.0
  for batch in batches:
    batch_sums, n = jax.device_get(eval_step(params, t_params, batch))
    for k in METRICS:
      sums[k] += float(batch_sums[k])
    tokens += float(n)
  out = {k: v / max(tokens, 1.0) for k, v in sums.items()}
  out["ppl"] = math.exp(out["loss"])
  out["tokens"] = tokens
  return out
