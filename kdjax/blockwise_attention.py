"""Blockwise causal attention with an online softmax (flash-style), and the choice of kernel.

`ModelConfig.attention_impl` picks how a layer's full (uncached) attention runs:

  'xla'        jax.nn.dot_product_attention with XLA's own implementation (the default; soft-capped
               layers run kdjax's einsums, attention._softcapped_attention).
  'blockwise'  `blockwise_attention` below: queries in blocks of `attention_block_size`, each block
               visiting only the key blocks at or before its own (the mask is causal), with a
               running max and sum so that no [B, H, L, L] score tensor exists, and each query
               block under `jax.checkpoint`, so its backward recomputes the block's scores instead
               of keeping them. Soft-capping works here too.
  'cudnn'      jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's fused kernel on an
               NVIDIA GPU (bf16/fp16 only; the call fails elsewhere, at compile time).

The batch and head axes stay whole and leading, so data and tensor parallelism shard this as
they shard the plain form (an earlier batch-row `lax.map` serialised the batch axis instead).

Shape letters as in kdjax/__init__.py: Y a query block's positions, Z a key block's, X the keys
up to a query block's end; N key/value heads and G query heads per key/value head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "blockwise", "cudnn")
# The ModelConfig fields that choose how attention is computed, not what it computes: a run may
# resume, export to Hugging Face, or keep its teacher caches across a change of them.
ATTENTION_KERNEL_FIELDS = ("attention_impl", "attention_block_size")


def _key_block(carry, q_BxNxGxYxK, k_BxNxZxK, v_BxNxZxK, mask_BxYxZ, scale, cap):
  """One key block's step of the online softmax: (max, sum, unnormalised output) updated."""
  m_BxNxGxY, l_BxNxGxY, acc_BxNxGxYxK = carry
  s_BxNxGxYxZ = jnp.einsum("bngyk,bnzk->bngyz", q_BxNxGxYxK, k_BxNxZxK,
                           preferred_element_type=jnp.float32) * scale
  if cap > 0:
    s_BxNxGxYxZ = cap * jnp.tanh(s_BxNxGxYxZ / cap)
  allowed_Bx1x1xYxZ = mask_BxYxZ[:, None, None]
  s_BxNxGxYxZ = jnp.where(allowed_Bx1x1xYxZ, s_BxNxGxYxZ, jnp.finfo(jnp.float32).min)
  m_new_BxNxGxY = jnp.maximum(m_BxNxGxY, s_BxNxGxYxZ.max(-1))
  # Masked scores weigh exactly 0, also while a row has seen no allowed key yet (its max is
  # finfo.min then, and exp(s - max) would be 1); the rescale of earlier blocks is exp(old - new).
  p_BxNxGxYxZ = jnp.where(allowed_Bx1x1xYxZ, jnp.exp(s_BxNxGxYxZ - m_new_BxNxGxY[..., None]), 0.0)
  rescale_BxNxGxY = jnp.exp(m_BxNxGxY - m_new_BxNxGxY)
  l_new_BxNxGxY = l_BxNxGxY * rescale_BxNxGxY + p_BxNxGxYxZ.sum(-1)
  acc_new_BxNxGxYxK = acc_BxNxGxYxK * rescale_BxNxGxY[..., None] + jnp.einsum(
      "bngyz,bnzk->bngyk", p_BxNxGxYxZ.astype(v_BxNxZxK.dtype), v_BxNxZxK,
      preferred_element_type=jnp.float32)
  return m_new_BxNxGxY, l_new_BxNxGxY, acc_new_BxNxGxYxK


def _query_block(q_BxNxGxYxK, k_BxNxXxK, v_BxNxXxK, mask_BxYxX, scale: float, block: int,
                 cap: float):
  """Attention of one query block over its X keys (those up to the block's end), one key block
  at a time. Returns out_BxNxGxYxK in float32."""
  b, n, g, y, kd = q_BxNxGxYxK.shape
  carry = (jnp.full((b, n, g, y), jnp.finfo(jnp.float32).min, jnp.float32),
           jnp.zeros((b, n, g, y), jnp.float32), jnp.zeros((b, n, g, y, kd), jnp.float32))
  for start in range(0, k_BxNxXxK.shape[2], block):
    stop = start + block
    carry = _key_block(carry, q_BxNxGxYxK, k_BxNxXxK[:, :, start:stop],
                       v_BxNxXxK[:, :, start:stop], mask_BxYxX[:, :, start:stop], scale, cap)
  _, l_BxNxGxY, acc_BxNxGxYxK = carry
  return acc_BxNxGxYxK / l_BxNxGxY[..., None]


def blockwise_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask_BxLxL, scale: float, block: int,
                        cap: float = 0.0):
  """Causal grouped-query attention, out_BxLxHxK in q's dtype, block by block.

  `mask_BxLxL` (True = may attend) must be causal, as every mask of kdjax.attention is: key
  blocks after a query block are skipped, not computed. Every query must be allowed at least one
  key (its own position is, in every kdjax mask); a row with none gives NaN, where the plain
  form gives the mean of v. Scores and softmax run in float32 (the products with
  preferred_element_type float32, scaled there), as in the plain form. L need not divide by
  `block`: the last block is shorter. The blocks are unrolled (L / block query blocks, and
  (L / block)^2 / 2 block pairs), so compile time grows with that count; a sliding window does
  not shorten the key blocks a query block visits.
  """
  b, l, h, kd = q_BxLxHxK.shape
  n = k_BxLxNxK.shape[2]
  g = h // n
  q_BxNxGxLxK = q_BxLxHxK.reshape(b, l, n, g, kd).transpose(0, 2, 3, 1, 4)
  k_BxNxLxK = k_BxLxNxK.transpose(0, 2, 1, 3)
  v_BxNxLxK = v_BxLxNxK.transpose(0, 2, 1, 3)
  query_block = jax.checkpoint(_query_block, static_argnums=(4, 5, 6))
  out_blocks = []
  for start in range(0, l, block):
    stop = min(start + block, l)
    out_blocks.append(query_block(
        q_BxNxGxLxK[:, :, :, start:stop], k_BxNxLxK[:, :, :stop], v_BxNxLxK[:, :, :stop],
        mask_BxLxL[:, start:stop, :stop], scale, block, cap))
  out_BxNxGxLxK = jnp.concatenate(out_blocks, axis=3)
  return out_BxNxGxLxK.transpose(0, 3, 1, 2, 4).reshape(b, l, h, kd).astype(q_BxLxHxK.dtype)
