"""Attention: RoPE, the masks, grouped-query attention (fused or soft-capped) and its maps.

`Attention` is one layer's self-attention; the rest are the pure functions it and the decoder
(kdjax.model) build on: RoPE tables (with Llama 3 frequency scaling), the causal block-diagonal
mask over packed documents (also against a `KVCache`'s slots, and narrowed to a sliding window),
soft-capped attention (Gemma 2), attention over a KV cache's slots, and the head-averaged
attention distribution that feature distillation reads (kdjax.features).

Shape letters as in the glossary of kdjax/__init__.py: B batch, L length (queries), T = B * L
tokens, D model width, H query heads, N key/value heads, G = H / N query heads per key/value head,
K head size, K2 = K / 2, C key/value cache slots, BN = B * N (row b's key/value head n at
b * N + n), GL = G * L (the query rows of one key/value head). Scores and softmax run in float32
whatever the compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.blockwise_attention import blockwise_attention
from kdjax.layers import RMSNorm, dense_init, partitioned

if TYPE_CHECKING:  # kdjax.model imports this module; the config and cache are only read here
  from kdjax.model import KVCache, ModelConfig


def rope_frequencies(cfg: ModelConfig):
  """inv_freq_K2, with Llama 3's scaling when `cfg.rope_scaling` > 0: wavelengths longer than
  original_max_len / low_freq_factor slow down by the factor, shorter than original_max_len /
  high_freq_factor stay, and those between blend smoothly."""
  k = cfg.head_size
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  if cfg.rope_scaling <= 0:
    return inv_freq
  factor, low, high = cfg.rope_scaling, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > cfg.rope_original_max_len / low, inv_freq / factor, inv_freq)
  smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= cfg.rope_original_max_len / high) & (
      wavelen <= cfg.rope_original_max_len / low)
  return jnp.where(medium, blended, scaled)


def rope_tables(positions_BxL, inv_freq_K2, max_position: int = 0):
  """cos and sin, each BxLx(K/2), in float32 (the rotate-half convention).

  With `max_position` > 0 they are looked up in a table of positions 0 .. max_position - 1 (NaN
  past it), the same numbers up to rounding. Decoding does: XLA folds the table at compile time,
  where it would recompute cos and sin inside every fused consumer (each layer's queries and
  keys, for each head), every step.
  """
  if max_position > 0:
    tables = rope_tables(jnp.arange(max_position)[None], inv_freq_K2)  # each 1 x max x K2
    return tuple(jnp.take(t[0], positions_BxL, axis=0, mode="fill", fill_value=jnp.nan)
                 for t in tables)
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_K2[None, None, :]
  return jnp.cos(angles_BxLxK2), jnp.sin(angles_BxLxK2)


def apply_rope(x_BxLxHxK, cos_BxLxK2, sin_BxLxK2):
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos_BxLxK2[:, :, None, :], sin_BxLxK2[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def attention_mask(segment_ids_BxL):
  """Causal and block-diagonal over packed documents: BxLxL, True = may attend."""
  length = segment_ids_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_LxL[None] & same_doc_BxLxL


def local_mask(mask_BxLxL, positions_BxL, window: int, key_positions_BxC=None):
  """`mask_BxLxL` narrowed to keys fewer than `window` positions behind the query.

  The keys are the queries themselves unless `key_positions_BxC` (a cache's slots) are given.
  """
  if key_positions_BxC is None:
    key_positions_BxC = positions_BxL
  behind_BxLxC = positions_BxL[:, :, None] - key_positions_BxC[:, None, :]
  return mask_BxLxL & (behind_BxLxC < window)


def cached_attention_mask(segment_ids_BxL, cache: KVCache):
  """BxLxC, True = may attend: the L queries sit in slots index .. index+L-1 of `cache` (already
  written there) and see earlier-or-same slots of their own document, never padding's or unwritten
  slots (segment id 0 differs from every real query's)."""
  length, slots = segment_ids_BxL.shape[1], cache.segment_ids_BxC.shape[1]
  causal_LxC = jnp.arange(slots)[None, :] <= cache.index + jnp.arange(length)[:, None]
  same_doc_BxLxC = segment_ids_BxL[:, :, None] == cache.segment_ids_BxC[:, None, :]
  return causal_LxC[None] & same_doc_BxLxC


def _softcapped_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask_BxLxL, scale, cap):
  """Attention with scores capped at +-cap by cap * tanh(s / cap) (Gemma 2), in float32."""
  b, l, h, kd = q_BxLxHxK.shape
  n = k_BxLxNxK.shape[2]
  q_BxLxNxGxK = q_BxLxHxK.reshape(b, l, n, h // n, kd).astype(jnp.float32)
  s_BxNxGxLxL = jnp.einsum("bqngk,bsnk->bngqs", q_BxLxNxGxK,
                           k_BxLxNxK.astype(jnp.float32)) * scale
  s_BxNxGxLxL = cap * jnp.tanh(s_BxNxGxLxL / cap)
  s_BxNxGxLxL = jnp.where(mask_BxLxL[:, None, None], s_BxNxGxLxL,
                          jnp.finfo(jnp.float32).min)
  p_BxNxGxLxL = jax.nn.softmax(s_BxNxGxLxL, axis=-1)
  out = jnp.einsum("bngqs,bsnk->bqngk", p_BxNxGxLxL, v_BxLxNxK.astype(jnp.float32))
  return out.reshape(b, l, h, kd).astype(q_BxLxHxK.dtype)


def cached_attention(q_BxLxHxK, k_BNxCxK, v_BNxCxK, mask_BxLxC, scale, cap=0.0):
  """The L queries' attention over a KV cache's C slots: the full forward's maths (scores and
  softmax in float32, soft-capped when cap > 0, masked at finfo.min) on the cache's layout.

  The cache holds row b's key/value head n at BN index b * N + n, its C slots contiguous, so both
  products are matmuls batched over BN that read the cache where it lies. With the full forward's
  key layout (BxCxNxK) XLA would first copy every layer's cache into this order, every decode
  step; with separate B and N axes, it copies it too when B = 1 (dropping that axis for the
  matmul duplicates the cache write).
  """
  b, l, h, kd = q_BxLxHxK.shape
  n, c = k_BNxCxK.shape[0] // b, k_BNxCxK.shape[1]
  g = h // n
  # Query heads g*G .. g*G+G-1 share key/value head g: its GL = G * L query rows, head-major.
  q_BNxGLxK = q_BxLxHxK.reshape(b, l, n, g, kd).transpose(0, 2, 3, 1, 4).reshape(b * n, g * l, kd)
  s_BNxGLxC = jnp.einsum("rqk,rck->rqc", q_BNxGLxK, k_BNxCxK,
                         preferred_element_type=jnp.float32) * scale
  if cap > 0:
    s_BNxGLxC = cap * jnp.tanh(s_BNxGLxC / cap)
  mask_BNxGLxC = jnp.broadcast_to(mask_BxLxC[:, None, None], (b, n, g, l, c)).reshape(
      b * n, g * l, c)
  s_BNxGLxC = jnp.where(mask_BNxGLxC, s_BNxGLxC, jnp.finfo(jnp.float32).min)
  p_BNxGLxC = jax.nn.softmax(s_BNxGLxC, axis=-1).astype(v_BNxCxK.dtype)
  out_BNxGLxK = jnp.einsum("rqc,rck->rqk", p_BNxGLxC, v_BNxCxK)
  return out_BNxGLxK.reshape(b, n, g, l, kd).transpose(0, 3, 1, 2, 4).reshape(b, l, h, kd)


# The collection that per-layer attention maps are sown into: `apply(..., mutable=[ATTENTION_MAPS])`
# asks for them (kdjax.features); otherwise none is computed.
ATTENTION_MAPS = "attention_maps"


def attention_probs(q_BxLxHxK, k_BxLxNxK, mask_BxLxL, scale, cap=0.0):
  """The head-averaged attention distribution p_BxLxL (float32): the mean over the H query heads
  of softmax(q k^T * scale), soft-capped and masked as the layer's own attention is.

  Averaged over heads, a layer's map is comparable between models with different head counts and
  key/value groupings (teacher and student): each row is a distribution over the keys.
  """
  b, l, h, kd = q_BxLxHxK.shape
  n = k_BxLxNxK.shape[2]
  q_BxLxNxGxK = q_BxLxHxK.reshape(b, l, n, h // n, kd).astype(jnp.float32)
  s_BxNxGxLxL = jnp.einsum("bqngk,bsnk->bngqs", q_BxLxNxGxK,
                           k_BxLxNxK.astype(jnp.float32)) * scale
  if cap > 0:
    s_BxNxGxLxL = cap * jnp.tanh(s_BxNxGxLxL / cap)
  s_BxNxGxLxL = jnp.where(mask_BxLxL[:, None, None], s_BxNxGxLxL,
                          jnp.finfo(jnp.float32).min)
  return jnp.mean(jax.nn.softmax(s_BxNxGxLxL, axis=-1), axis=(1, 2))


def _projections_side_by_side(x_TxD, params, dtype, widths):
  """The query, key and value projections (Attention's DenseGeneral params) as one matmul over
  their kernels side by side, in `dtype` as DenseGeneral computes them: q_TxHK, k_TxNK, v_TxNK
  (`widths` = HK, NK, NK), each the same dot products as its own projection's.

  Decoding reads every weight once per token, and one pass over the three kernels runs faster
  than three. In a decode loop the kernels are loop invariant: XLA concatenates them once,
  outside the loop.
  """
  names = ("query", "key", "value")
  kernel_DxQKV = jnp.concatenate(
      [params[name]["kernel"].reshape(x_TxD.shape[1], -1) for name in names], axis=1)
  qkv_TxQKV = jnp.dot(x_TxD.astype(dtype), kernel_DxQKV.astype(dtype))
  if "bias" in params["query"]:
    qkv_TxQKV = qkv_TxQKV + jnp.concatenate(
        [params[name]["bias"].reshape(-1) for name in names]).astype(dtype)[None]
  return jnp.split(qkv_TxQKV, [widths[0], widths[0] + widths[1]], axis=1)


class Attention(nn.Module):
  """One layer's grouped-query self-attention, optionally over a KV cache's slots."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxLxL, cos_BxLxK2, sin_BxLxK2, kv_cache=None, cache_index=None):
    """Returns (out_BxLxD, kv_cache). `cos`/`sin` are None for learned positions (no rotation).

    Without a cache the L tokens attend to each other and kv_cache stays None. With
    `kv_cache` = (k_BNxCxK, v_BNxCxK), their keys and values are first written to slots
    `cache_index` .. +L-1, the queries attend over all C slots (`mask_BxLxL` is then BxLxC; see
    cached_attention), and the updated pair is returned.

    Projections, RoPE, cache write, attention and output stay in one method (about 70 lines):
    Linen names the projections by where this compact method creates them. Decoding reads the
    projection kernels itself, side by side (see _projections_side_by_side).
    """
    cfg = self.cfg
    h, n, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def proj(heads, name, axis_name):
      return nn.DenseGeneral(
          (heads, k), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, name=name,
          kernel_init=partitioned(dense_init(), ("embed", axis_name, "head_dim")),
          bias_init=partitioned(nn.initializers.zeros, (axis_name, "head_dim")))

    def qk_norm(name):
      return RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                     plus_one=cfg.norm_plus_one, axis_name="head_dim", name=name)

    # Projections on tokens flattened to one axis (see Mlp), reshaped back for attention.
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d)
    if kv_cache is not None and not self.is_initializing():  # decoding
      q_TxHK, k_TxNK, v_TxNK = _projections_side_by_side(
          x_TxD, nn.meta.unbox(self.variables["params"]), dtype, (h * k, n * k, n * k))
    else:
      q_TxHK, k_TxNK, v_TxNK = (proj(h, "query", "heads")(x_TxD), proj(n, "key", "kv_heads")(x_TxD),
                                proj(n, "value", "kv_heads")(x_TxD))
    q_BxLxHxK = q_TxHK.reshape(b, l, h, k)
    k_BxLxNxK = k_TxNK.reshape(b, l, n, k)
    v_BxLxNxK = v_TxNK.reshape(b, l, n, k)
    if cfg.qk_norm:
      q_BxLxHxK = qk_norm("q_norm")(q_BxLxHxK)
      k_BxLxNxK = qk_norm("k_norm")(k_BxLxNxK)
    if cos_BxLxK2 is not None:
      q_BxLxHxK = apply_rope(q_BxLxHxK, cos_BxLxK2, sin_BxLxK2)
      k_BxLxNxK = apply_rope(k_BxLxNxK, cos_BxLxK2, sin_BxLxK2)
    # Grouped-query attention (query heads g*G .. g*G+G-1 share key/value head g), scores and
    # softmax in float32, masked scores at finfo.min (so exp gives exactly 0).
    scale = cfg.query_scale or k ** -0.5
    if kv_cache is not None:
      # The L new keys and values go to slots cache_index .. +L-1 first: written before the
      # read, the update is in place (XLA copies a loop-carried cache read before its update).
      kv_cache = tuple(
          jax.lax.dynamic_update_slice_in_dim(
              c_BNxCxK, x_BxLxNxK.transpose(0, 2, 1, 3).reshape(b * n, l, k), cache_index, 1)
          for c_BNxCxK, x_BxLxNxK in zip(kv_cache, (k_BxLxNxK, v_BxLxNxK)))
      out_BxLxHxK = cached_attention(q_BxLxHxK, *kv_cache, mask_BxLxL, scale, cfg.attn_softcap)
      # The C slots in the full forward's layout, for the maps below.
      k_BxLxNxK = kv_cache[0].reshape(b, n, -1, k).transpose(0, 2, 1, 3)
    elif cfg.attention_impl == "blockwise":  # kdjax.blockwise_attention
      out_BxLxHxK = blockwise_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask_BxLxL, scale,
                                        cfg.attention_block_size, cfg.attn_softcap)
    elif cfg.attn_softcap > 0:  # the fused kernel has no soft-cap
      out_BxLxHxK = _softcapped_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask_BxLxL, scale,
                                          cfg.attn_softcap)
    else:  # JAX's fused attention: XLA's (2x faster on CPU than the plain einsums it replaces),
      # or cuDNN's kernel when asked for ('cudnn': NVIDIA GPUs, bf16/fp16).
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask=mask_BxLxL[:, None], scale=scale,
          implementation="cudnn" if cfg.attention_impl == "cudnn" else None)
    out_BxLxHxK = nn.with_logical_constraint(out_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    # Mean square of each head's output, for width pruning (kdjax.prune); a no-op unless the
    # 'intermediates' collection is mutable.
    self.sow("intermediates", "head_sq_H",
             jnp.mean(jnp.square(out_BxLxHxK.astype(jnp.float32)), axis=(0, 1, 3)))
    # Opt-in, as an extra B x H x L x L softmax; never at init, where every collection is mutable.
    if self.is_mutable_collection(ATTENTION_MAPS) and not self.is_initializing():
      self.sow(ATTENTION_MAPS, "probs_BxLxL", attention_probs(
          q_BxLxHxK, k_BxLxNxK, mask_BxLxL, scale, cfg.attn_softcap))
    return nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), use_bias=cfg.out_bias, dtype=dtype, param_dtype=param_dtype,
        name="out", kernel_init=partitioned(dense_init(), ("heads", "head_dim", "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
    )(out_BxLxHxK.reshape(b * l, h, k)).reshape(b, l, d), kv_cache
