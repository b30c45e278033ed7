"""Attention: RoPE, the masks, grouped-query attention (fused or soft-capped) and its maps.

`Attention` is one layer's self-attention; the rest are the pure functions it and the decoder
(kdjax.model) build on: RoPE tables (with Llama 3 frequency scaling), the causal block-diagonal
mask over packed documents (also against a `KVCache`'s slots, and narrowed to a sliding window),
soft-capped attention (Gemma 2) and the head-averaged attention distribution that feature
distillation reads (kdjax.features).

Shape letters as in the glossary of kdjax/__init__.py: B batch, L length (queries), T = B * L
tokens, D model width, H query heads, N key/value heads, G = H / N query heads per key/value head,
K head size, K2 = K / 2, C key/value cache slots. Scores and softmax run in float32 whatever the
compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def rope_tables(positions_BxL, inv_freq_K2):
  """cos and sin, each BxLx(K/2), in float32 (the rotate-half convention)."""
  inv_freq = inv_freq_K2
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
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


class Attention(nn.Module):
  """One layer's grouped-query self-attention, optionally over a KV cache's slots."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxLxL, cos_BxLxK2, sin_BxLxK2, kv_cache=None, cache_index=None):
    """Returns (out_BxLxD, kv_cache). `cos`/`sin` are None for learned positions (no rotation).

    Without a cache the L tokens attend to each other and kv_cache stays None. With
    `kv_cache` = (k_BxCxNxK, v_BxCxNxK), their keys and values are first written to slots
    `cache_index` .. +L-1, the queries attend over all C slots (`mask_BxLxL` is then BxLxC),
    and the updated pair is returned.

    Projections, RoPE, cache write, attention and output stay in one method (about 65 lines):
    Linen names the projections by where this compact method creates them.
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
    q_BxLxHxK = proj(h, "query", "heads")(x_TxD).reshape(b, l, h, k)
    k_BxLxNxK = proj(n, "key", "kv_heads")(x_TxD).reshape(b, l, n, k)
    v_BxLxNxK = proj(n, "value", "kv_heads")(x_TxD).reshape(b, l, n, k)
    if cfg.qk_norm:
      q_BxLxHxK = qk_norm("q_norm")(q_BxLxHxK)
      k_BxLxNxK = qk_norm("k_norm")(k_BxLxNxK)
    if cos_BxLxK2 is not None:
      q_BxLxHxK = apply_rope(q_BxLxHxK, cos_BxLxK2, sin_BxLxK2)
      k_BxLxNxK = apply_rope(k_BxLxNxK, cos_BxLxK2, sin_BxLxK2)
    if kv_cache is not None:
      # From here on the keys are the C cache slots; the L new ones among them.
      kv_cache = tuple(jax.lax.dynamic_update_slice_in_dim(c_BxCxNxK, x_BxLxNxK, cache_index, 1)
                       for c_BxCxNxK, x_BxLxNxK in zip(kv_cache, (k_BxLxNxK, v_BxLxNxK)))
      k_BxLxNxK, v_BxLxNxK = kv_cache

    # Grouped-query attention (query heads g*G .. g*G+G-1 share key/value head g), scores and
    # softmax in float32, masked scores at finfo.min (so exp gives exactly 0). JAX's fused
    # attention: cuDNN's kernel on GPU where it applies, XLA's elsewhere (2x faster on CPU than
    # the plain einsums it replaces).
    scale = cfg.query_scale or k ** -0.5
    if cfg.attn_softcap > 0:  # the fused kernel has no soft-cap
      out_BxLxHxK = _softcapped_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask_BxLxL, scale,
                                          cfg.attn_softcap)
    else:
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask=mask_BxLxL[:, None], scale=scale)
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
