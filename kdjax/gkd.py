"""On-policy distillation (GKD, Agarwal et al. 2024): the student also learns on its own samples.

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, L1 = L + 1, P prompt
tokens, A new (sampled) tokens, R = P + A a sampled row.

With probability lambda = config.distill.on_policy_fraction, drawn afresh for every step from the
train state's key (one coin for all micro-batches of a step, so gradient accumulation does not
change lambda), the step replaces the batch by the student's own continuations of prompts cut
from it, and the loss on those continuations is
the generalized JSD (config.distill.beta) between teacher and student at the distillation
temperature; there is no cross-entropy term there, as there is no ground truth to predict. With
the other probability the step is the ordinary distillation step on the batch, whatever its loss.

Both branches sit in one `lax.cond` inside the compiled step: the student samples with its KV
cache (sample.decode) under the same shardings, and the teacher scores the samples in the same
forward pass as it scores data. The samples are integers drawn from params under stop_gradient:
no gradient flows through the sampling, as in GKD.

An on-policy batch keeps the data batch's shape [B, L]. Row b's prompt is the first P tokens of
the data row b, cut to the document that holds its last token (a packed row may start with the
end of another document; that part becomes padding, so neither model sees a context it was never
trained on). Then come A sampled tokens, then padding (segment 0) to L + 1 tokens. The loss
counts the predictions of sampled tokens (targets P .. R - 1) up to and including the first
sampled EOS: text after a document's end is not the student's continuation of it. The student
samples only ids below `vocab_size` (the tokenizer's ids that both models share), never padding
rows of its vocabulary, which the teacher could not score.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax import sample, sharding
from kdjax.model import ModelConfig
from kdjax.settings import OnPolicy  # defined with the other settings; gkd.OnPolicy too

Batch = dict[str, jax.Array]


def prompt_lengths(segment_ids_BxL: jax.Array, prompt_tokens: int) -> jax.Array:
  """Per row, how many of the first P tokens belong to the document of the P-th (at least 1)."""
  seg_BxP = segment_ids_BxL[:, :prompt_tokens]
  same_BxP = seg_BxP == seg_BxP[:, -1:]
  # Segments are contiguous: the last document's tokens are a suffix of the window.
  return jnp.maximum(jnp.sum(same_BxP, axis=1), 1).astype(jnp.int32)


def coin(key: jax.Array, fraction: float | jax.Array) -> jax.Array:
  """True with probability `fraction`: this batch is on-policy."""
  return jax.random.uniform(key, (), jnp.float32) < fraction


def student_batch(s_cfg: ModelConfig, params: Any, batch: Batch, key: jax.Array,
                  settings: OnPolicy, rules: sharding.Rules | None = None) -> Batch:
  """The batch of the student's continuations of prompts cut from `batch` (see the module doc)."""
  inputs_BxL = batch["inputs"]
  b, l = inputs_BxL.shape
  p, a = settings.lengths(l)
  lengths_B = prompt_lengths(batch["segment_ids"], p)
  with sharding.activation_rules(rules):
    tokens_BxR = sample.decode(jax.lax.stop_gradient(params), inputs_BxL[:, :p], lengths_B, key,
                               cfg=s_cfg, max_new_tokens=a, temperature=settings.temperature,
                               vocab_limit=settings.vocab_size)
  r = p + a
  tokens_BxL1 = jnp.pad(tokens_BxR, ((0, 0), (0, l + 1 - r)))
  index_L = jnp.arange(l)
  start_Bx1 = (p - lengths_B)[:, None]  # the prompt's first real column
  # Inputs start_b .. R - 2 are real and predict start_b + 1 .. R - 1.
  real_BxL = (index_L[None, :] >= start_Bx1) & (index_L < r - 1)[None, :]
  targets_BxL = tokens_BxL1[:, 1:]
  scored_BxL = real_BxL & (index_L >= p - 1)[None, :]
  if settings.eos_id >= 0:  # keep the first sampled EOS, drop what follows it
    eos_BxL = scored_BxL & (targets_BxL == settings.eos_id)
    scored_BxL &= (jnp.cumsum(eos_BxL, axis=1) - eos_BxL) == 0
  return {"inputs": tokens_BxL1[:, :l].astype(inputs_BxL.dtype),
          "targets": targets_BxL.astype(batch["targets"].dtype),
          "segment_ids": real_BxL.astype(batch["segment_ids"].dtype),
          "positions": jnp.maximum(index_L[None, :] - start_Bx1, 0).astype(
              batch["positions"].dtype),
          "mask": scored_BxL.astype(batch["mask"].dtype)}
