"""On-policy distillation (GKD, Agarwal et al. 2024): the student also learns on its own samples.

Shape letters: B batch, L length, P prompt tokens, N new tokens, T = P + N.

With probability lambda = config.distill.on_policy_fraction, drawn afresh for every batch (every
micro-batch with gradient accumulation) from the train state's key, the step replaces the batch
by the student's own continuations of prompts cut from it, and the loss on those continuations is
the generalized JSD (config.distill.beta) between teacher and student at the distillation
temperature; there is no cross-entropy term there, as there is no ground truth to predict. With
the other probability the step is the ordinary distillation step on the batch, whatever its loss.

Both branches sit in one `lax.cond` inside the compiled step: the student samples with its KV
cache (sample.decode) under the same shardings, and the teacher scores the samples in the same
forward pass as it scores data. The samples are integers drawn from params under stop_gradient:
no gradient flows through the sampling, as in GKD.

An on-policy batch keeps the data batch's shape [B, L]: row b is the first P tokens of the data
row b (one segment, positions from 0), then N sampled tokens, then padding (segment 0) to L + 1
tokens; the loss counts the N predictions of sampled tokens only (mask 1 at targets P .. T - 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kdjax import sample, sharding
from kdjax.model import ModelConfig

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  fraction: float  # lambda: the probability that a batch is the student's own samples
  prompt_tokens: int  # P, cut from the start of each data row
  new_tokens: int = 0  # N; 0 = fill the row: N = L + 1 - P
  temperature: float = 1.0  # the student's sampling temperature (GKD samples at 1)

  def lengths(self, seq_len: int) -> tuple[int, int]:
    """(P, N) for rows of `seq_len` tokens."""
    n = self.new_tokens or seq_len + 1 - self.prompt_tokens
    if not 1 <= self.prompt_tokens <= seq_len or n < 1 or self.prompt_tokens + n > seq_len + 1:
      raise ValueError(f"on-policy prompt_tokens={self.prompt_tokens} and new_tokens="
                       f"{self.new_tokens} do not fit rows of {seq_len} tokens: need "
                       f"1 <= P <= {seq_len} and 1 <= N <= {seq_len} + 1 - P.")
    return self.prompt_tokens, n


def coin(key: jax.Array, fraction: float | jax.Array) -> jax.Array:
  """True with probability `fraction`: this batch is on-policy."""
  return jax.random.uniform(key, (), jnp.float32) < fraction


def student_batch(s_cfg: ModelConfig, params: Any, batch: Batch, key: jax.Array,
                  settings: OnPolicy, rules: sharding.Rules | None = None) -> Batch:
  """The batch of the student's continuations of prompts cut from `batch` (see the module doc)."""
  inputs_BxL = batch["inputs"]
  b, l = inputs_BxL.shape
  p, n = settings.lengths(l)
  prompt_BxP = inputs_BxL[:, :p]
  with sharding.activation_rules(rules):
    tokens_BxT = sample.decode(jax.lax.stop_gradient(params), prompt_BxP,
                               jnp.full((b,), p, jnp.int32), key, cfg=s_cfg, max_new_tokens=n,
                               temperature=settings.temperature)
  t = p + n
  tokens_BxL1 = jnp.pad(tokens_BxT, ((0, 0), (0, l + 1 - t)))
  index_L = jnp.arange(l)
  real_BxL = jnp.broadcast_to(index_L < t - 1, (b, l))  # inputs 0 .. T - 2 predict 1 .. T - 1
  return {"inputs": tokens_BxL1[:, :l].astype(inputs_BxL.dtype),
          "targets": tokens_BxL1[:, 1:].astype(batch["targets"].dtype),
          "segment_ids": real_BxL.astype(batch["segment_ids"].dtype),
          "positions": jnp.broadcast_to(index_L, (b, l)).astype(batch["positions"].dtype),
          "mask": (real_BxL & (index_L >= p - 1)[None, :]).astype(batch["mask"].dtype)}
