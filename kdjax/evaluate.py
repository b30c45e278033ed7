"""Held-out evaluation: perplexity, top-1 and top-5 agreement with the teacher, KL(teacher ||
model) and expected calibration error.

All are exact token-weighted means over the unmasked targets of the eval batches (each batch's
mean is re-weighted by its token count, the calibration bins are summed), whatever the batch
boundaries.

  top1_agreement  argmax(model) == argmax(teacher)
  top5_agreement  the teacher's argmax is among the model's 5 most likely tokens
  ece             expected calibration error of the model's next-token prediction: confidences
                  max_v p(v) in ECE_BINS equal-width bins on [0, 1], sum over bins of
                  (tokens in bin / tokens) |accuracy in bin - mean confidence in bin|

Shape letters as in the glossary of kdjax/__init__.py: B batch, L length, V vocab, I the ECE_BINS
calibration bins.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import lora, losses, quantize, qwix_model, sharding
from kdjax.model import ModelConfig, Transformer, unembedding

METRICS = ("loss", "accuracy", "top1_agreement", "top5_agreement", "kl_to_teacher")
ECE_BINS = 15


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


def evaluated_model(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """(cfg, params) as evaluation runs them: a quantized student's params really quantized
  (kdjax.quantize; int8/int4 kernels), a LoRA student's adapters merged; others as given."""
  if cfg.quant.weight:
    return quantize.quantize(cfg, params)
  if cfg.lora.rank:
    return cfg.plain, lora.merged(cfg, params)
  return cfg, params


def _module(cfg: ModelConfig):
  return qwix_model.build_ptq(cfg) if cfg.quant.weight else Transformer(cfg)


@functools.lru_cache(maxsize=8)
def make_eval_step(cfg: ModelConfig, t_cfg: ModelConfig, rules=None, t_rules=None,
                   chunk_size: int = 0):
  """One compiled eval step per (model, teacher, rules, chunk), reused across calls; `cfg` and
  its params as `evaluated_model` gives them. `chunk_size` > 0 reduces both models' logits a
  chunk of about that many tokens at a time (`chunked_sums`): no [B, L, V] logits are held."""
  model, t_model = _module(cfg), Transformer(t_cfg)

  @jax.jit
  def eval_step(params, t_params, batch):
    if chunk_size == 0:
      sums = _eval_sums(_apply(model, params, batch, rules),
                        _apply(t_model, t_params, batch, t_rules), batch["targets"], batch["mask"])
    else:
      heads = (_head(cfg, model, params, batch, rules),
               _head(t_cfg, t_model, t_params, batch, t_rules))
      sums = chunked_sums(_eval_sums, heads, batch["targets"], batch["mask"], chunk_size)
    return sums, jnp.sum(batch["mask"])

  return eval_step


def _eval_sums(logits_BxLxV, t_logits_BxLxV, targets, mask) -> dict[str, jax.Array]:
  """Every metric's token-weighted sum (and the calibration bins) over one batch or chunk."""
  logits_BxLxV, t_logits_BxLxV = losses.shared_vocab(logits_BxLxV, t_logits_BxLxV)
  n = jnp.sum(mask)
  means = {
      "loss": losses.cross_entropy(logits_BxLxV, targets, mask),
      "accuracy": losses.token_accuracy(logits_BxLxV, targets, mask),
      "top1_agreement": losses.top1_agreement(logits_BxLxV, t_logits_BxLxV, mask),
      "kl_to_teacher": losses.forward_kl(logits_BxLxV, t_logits_BxLxV, mask, temperature=1.0),
  }
  sums = {k: v * n for k, v in means.items()}
  # Top-5 by a rank count (ties count against the teacher's token): no sort of the vocab.
  t_top_BxL = jnp.argmax(t_logits_BxLxV, axis=-1)
  at_top_BxL = jnp.take_along_axis(logits_BxLxV, t_top_BxL[..., None], axis=-1)
  rank_BxL = jnp.sum(logits_BxLxV > at_top_BxL, axis=-1)
  sums["top5_agreement"] = jnp.sum(jnp.where(mask != 0, rank_BxL < 5, False))
  sums.update(calibration_sums(logits_BxLxV, targets, mask))
  return sums


def _head(cfg: ModelConfig, model, params, batch, rules):
  """(final hidden_BxLxD, unembed_DxV, soft-cap): the model's logits, not yet multiplied out."""
  with sharding.activation_rules(rules):
    hidden_BxLxD = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                               batch["positions"], return_final_hidden=True)
  # Unboxed: params straight from `init` still carry their logical axis names.
  return hidden_BxLxD, unembedding(cfg, nn.meta.unbox(params)), cfg.logit_softcap


def chunked_sums(sums_fn, heads, targets_BxL, mask_BxL, chunk_size: int):
  """The sum over chunks of `sums_fn(*logits_BxWxV of each head, targets_BxW, mask_BxW)`.

  `heads` are (hidden_BxLxD, unembed_DxV, softcap) per model. A chunk is chunk_size / B
  positions of every row (the batch axis stays whole, so a sharded batch stays sharded); the
  padding past L has mask 0, so `sums_fn` must weight by the mask, as token sums do.
  """
  xs = losses.length_chunks((targets_BxL, mask_BxL) + tuple(h for h, _, _ in heads), chunk_size)

  def chunk_sums(chunk):
    targets_BxW, mask_BxW, *hiddens = chunk
    logits = [losses.logits_from_hidden(h_BxWxD, unembed_DxV, softcap)
              for h_BxWxD, (_, unembed_DxV, softcap) in zip(hiddens, heads)]
    return sums_fn(*logits, targets_BxW, mask_BxW)

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(chunk_sums, jax.tree.map(lambda x: x[0], xs)))
  acc, _ = jax.lax.scan(lambda acc, c: (jax.tree.map(jnp.add, acc, chunk_sums(c)), None),
                        zeros, xs)
  return acc


def calibration_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                     mask_BxL: jax.Array) -> dict[str, jax.Array]:
  """Per-bin token counts, confidence sums and correct counts ([ECE_BINS] each, float32)."""
  probs_BxLxV = jax.nn.softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  conf_BxL = jnp.max(probs_BxLxV, axis=-1)
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
  bin_BxL = jnp.minimum((conf_BxL * ECE_BINS).astype(jnp.int32), ECE_BINS - 1)
  onehot_BxLxI = jax.nn.one_hot(bin_BxL, ECE_BINS) * (mask_BxL != 0)[..., None]
  return {"ece_count": jnp.sum(onehot_BxLxI, axis=(0, 1)),
          "ece_conf": jnp.einsum("bli,bl->i", onehot_BxLxI, conf_BxL),
          "ece_correct": jnp.einsum("bli,bl->i", onehot_BxLxI, correct_BxL)}


def expected_calibration_error(count_I, conf_I, correct_I) -> float:
  count_I, conf_I, correct_I = (np.asarray(x, np.float64) for x in (count_I, conf_I, correct_I))
  safe_I = np.maximum(count_I, 1.0)
  gap_I = np.abs(correct_I / safe_I - conf_I / safe_I)
  return float(np.sum(count_I * gap_I) / max(np.sum(count_I), 1.0))


@functools.lru_cache(maxsize=8)
def make_loss_sums_step(cfg: ModelConfig, rules=None, chunk_size: int = 0):
  """Validation's compiled step: (cross-entropy sum, token count) of a batch; `chunk_size` as in
  `make_eval_step`."""
  model = _module(cfg)

  @jax.jit
  def loss_sums(params, batch):
    n = jnp.sum(batch["mask"])
    if chunk_size == 0:
      logits_BxLxV = _apply(model, params, batch, rules)
      return losses.cross_entropy(logits_BxLxV, batch["targets"], batch["mask"]) * n, n
    ce_sum = lambda logits, targets, mask: losses.cross_entropy(logits, targets, mask) * jnp.sum(
        mask)
    return chunked_sums(ce_sum, (_head(cfg, model, params, batch, rules),), batch["targets"],
                        batch["mask"], chunk_size), n

  return loss_sums


def held_out_loss(cfg: ModelConfig, params: Any, batches: Sequence[dict[str, np.ndarray]],
                  placement: Placement | None = None, chunk_size: int = 0) -> float:
  """Token-weighted mean cross-entropy over `batches` (no teacher needed); `chunk_size` as in
  `make_eval_step`."""
  cfg, params = evaluated_model(cfg, params)
  loss_sums = make_loss_sums_step(cfg, placement and placement.rules, chunk_size)
  total, tokens = 0.0, 0.0
  for batch in batches:
    with _mesh_context(placement):
      s, n = jax.device_get(loss_sums(params, _placed(placement, batch)))
    total, tokens = total + float(s), tokens + float(n)
  return total / max(tokens, 1.0)


def evaluate(cfg: ModelConfig, params: Any, t_cfg: ModelConfig, t_params: Any,
             batches: Sequence[dict[str, np.ndarray]],
             placement: Placement | None = None, chunk_size: int = 0) -> dict[str, float]:
  """Token-weighted means over `batches`, plus `ppl` = exp(loss) and `tokens`; a quantized
  student is evaluated really quantized, a LoRA student merged (`evaluated_model`).
  `chunk_size` > 0 never holds [B, L, V] logits (config.data.eval_chunk_size)."""
  cfg, params = evaluated_model(cfg, params)
  eval_step = make_eval_step(cfg, t_cfg, placement and placement.rules,
                             placement and placement.t_rules, chunk_size)
  sums = {k: 0.0 for k in METRICS}
  bins = {k: np.zeros(ECE_BINS) for k in ("ece_count", "ece_conf", "ece_correct")}
  tokens = 0.0
  for batch in batches:
    with _mesh_context(placement):
      batch_sums, n = jax.device_get(eval_step(params, t_params, _placed(placement, batch)))
    for k in METRICS:
      sums[k] += float(batch_sums[k])
    for k in bins:
      bins[k] += np.asarray(batch_sums[k], np.float64)
    tokens += float(n)
  out = {k: v / max(tokens, 1.0) for k, v in sums.items()}
  out["ppl"] = math.exp(out["loss"])
  out["ece"] = expected_calibration_error(bins["ece_count"], bins["ece_conf"],
                                          bins["ece_correct"])
  out["tokens"] = tokens
  out["weight_bytes"] = quantize.weight_bytes(params)  # as evaluated: int4 counts half a byte
  return out
