"""A decoder-only Transformer in Linen, shared by teacher and student.

Teacher and student are the same code with different `ModelConfig`s:

    logits_BxLxV = Transformer(cfg).apply({'params': params}, tokens_BxL)

Shape letters: B batch, L length, T = B * L tokens, D model width, H query heads, N key/value
heads, G = H / N query heads per key/value head, K head dim, F mlp width, V vocab, S layers,
C key/value cache slots.

For generation (kdjax.sample) the same module, with the same params, also runs incrementally:

    logits_BxLxV, cache = Transformer(cfg).apply({'params': params}, tokens_BxL, segment_ids_BxL,
                                                 positions_BxL, cache=cache)

writes the L tokens' keys and values into a `KVCache` and attends over every slot written so far.

Every param carries logical axis names ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
'layers', 'positions') so that shardings are derived from rules in the config, never written per parameter.
Attention softmax runs in float32 whatever `dtype` is; the layers run under `nn.scan`, so compile
time does not grow with depth.

The optional features (biases, q/k norms, (1 + w) norms, post-norms, scaled embeddings, query
scaling, attention soft-capping, sliding-window layers, Llama 3 RoPE scaling, learned positions)
cover the Llama, Mistral, Qwen2/3, Gemma 1/2 and GPT-2 families that kdjax.hf loads; every one is
off by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")  # gelu is the tanh approximation
POSITION_EMBEDDINGS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of one decoder. `head_dim=0` means d_model // num_heads."""

  vocab_size: int = 4096
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  mlp_dim: int = 512
  max_len: int = 512
  activation: str = "swiglu"
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  tie_embeddings: bool = True
  logit_softcap: float = 0.0  # 0 disables; Gemma 2 uses 30.
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  # Family features (see kdjax.hf); the defaults are a plain Llama-style decoder.
  qkv_bias: bool = False  # Qwen2, GPT-2
  out_bias: bool = False  # GPT-2: bias on the attention output projection
  mlp_bias: bool = False  # GPT-2
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys, before RoPE
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), w initialised at 0
  post_norms: bool = False  # Gemma 2: also normalise the attention and MLP outputs
  embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
  query_scale: float = 0.0  # 0 = head_dim ** -0.5; Gemma 2: query_pre_attn_scalar ** -0.5
  attn_softcap: float = 0.0  # 0 disables; Gemma 2 caps attention scores at 50
  sliding_window: int = 0  # 0 = global attention; else a query sees this many positions back
  global_every: int = 0  # with sliding_window: every n-th layer is global (Gemma 2: 2); 0 = none
  rope_scaling: float = 0.0  # Llama 3 frequency scaling factor; 0 = none
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  position_embedding: str = "rope"  # 'rope', or 'learned' (GPT-2; max_len rows)
  family: str = ""  # the Hugging Face model_type it came from and exports as; '' = llama

  @property
  def k(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    """Builds from a dict or ConfigDict, ignoring keys that are not model fields."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def is_local(self, layer: int) -> bool:
    """Whether `layer` attends within `sliding_window` only (Gemma 2: layers 0, 2, 4, ...)."""
    if self.sliding_window <= 0:
      return False
    return self.global_every <= 0 or (layer + 1) % self.global_every != 0

  def num_params(self) -> int:
    """Parameter count, computed from shapes without allocating anything."""
    shapes = jax.eval_shape(
        lambda: Transformer(self).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(shapes))


class KVCache(NamedTuple):
  """Every layer's keys and values for C token slots, and what masking needs to know of them.

  Slots fill left to right from `index`. A slot not written yet has segment id 0 (as padding
  does), so no real token attends to it; the cached keys are stored after RoPE, in the compute
  dtype, exactly as the full forward computes them.
  """

  k_SxBxCxNxK: jax.Array
  v_SxBxCxNxK: jax.Array
  segment_ids_BxC: jax.Array
  positions_BxC: jax.Array
  index: jax.Array  # int32 scalar: the first slot not yet written

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
    kv = jnp.zeros((cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.k), jnp.dtype(cfg.dtype))
    slots = jnp.zeros((batch, length), jnp.int32)
    return cls(kv, kv, slots, slots, jnp.zeros((), jnp.int32))


def _dense_init():
  # LeCun normal. DenseGeneral initialises its kernel flattened to 2-D (contracted x output), so
  # fan-in over axis -2 is right for DxHxK and HxKxD kernels alike.
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class _LogicalAxes(nn.LogicallyPartitioned):
  """A param's logical axis names, kept as metadata and never applied as a constraint on unbox.

  kdjax places params through jit out_shardings (train.init_params), so constraints on unbox add
  nothing, and they break: DenseGeneral initialises its kernel flat (2-D) and unboxes it before
  reshaping, and Flax re-runs that init under eval_shape on every apply to check shapes, so inside
  a mesh context a 3-name constraint would hit a 2-D value.
  """

  def unbox(self, apply_constraint=True):
    del apply_constraint
    return self.value


def _partitioned(init, names):
  def boxed_init(*args, **kwargs):
    return _LogicalAxes(init(*args, **kwargs), names)
  return boxed_init


class RMSNorm(nn.Module):
  """RMSNorm over the last axis in float32; `plus_one` scales by (1 + w) (Gemma)."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  plus_one: bool = False
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x_BxLxD):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale_D = self.param("scale", _partitioned(init, (self.axis_name,)),
                         (x_BxLxD.shape[-1],), self.param_dtype)
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    scale = scale_D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  if cfg.norm == "rmsnorm":
    return RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                   plus_one=cfg.norm_plus_one, name=name)
  return nn.LayerNorm(
      epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=_partitioned(nn.initializers.ones, ("embed",)),
      bias_init=_partitioned(nn.initializers.zeros, ("embed",)))


def rope_frequencies(cfg: ModelConfig):
  """inv_freq_K2, with Llama 3's scaling when `cfg.rope_scaling` > 0: wavelengths longer than
  original_max_len / low_freq_factor slow down by the factor, shorter than original_max_len /
  high_freq_factor stay, and those between blend smoothly."""
  k = cfg.k
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
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxLxL, cos_BxLxK2, sin_BxLxK2, kv_cache=None, cache_index=None):
    """Returns (out_BxLxD, kv_cache). `cos`/`sin` are None for learned positions (no rotation).

    Without a cache the L tokens attend to each other and kv_cache stays None. With
    `kv_cache` = (k_BxCxNxK, v_BxCxNxK), their keys and values are first written to slots
    `cache_index` .. +L-1, the queries attend over all C slots (`mask_BxLxL` is then BxLxC),
    and the updated pair is returned.
    """
    cfg = self.cfg
    h, n, k = cfg.num_heads, cfg.num_kv_heads, cfg.k
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def proj(heads, name, axis_name):
      return nn.DenseGeneral(
          (heads, k), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, name=name,
          kernel_init=_partitioned(_dense_init(), ("embed", axis_name, "head_dim")),
          bias_init=_partitioned(nn.initializers.zeros, (axis_name, "head_dim")))

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
        name="out", kernel_init=_partitioned(_dense_init(), ("heads", "head_dim", "embed")),
        bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
    )(out_BxLxHxK.reshape(b * l, h, k)).reshape(b, l, d), kv_cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def dense(features, name, names):
      return nn.Dense(features, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype,
                      name=name, kernel_init=_partitioned(_dense_init(), names),
                      bias_init=_partitioned(nn.initializers.zeros, names[1:]))

    # Tokens flattened to one axis (T = B * L, batch-major, so 'batch' sharding carries over):
    # plain 2-D matmuls, whose backward XLA:CPU runs about 30% faster than the 3-D form's.
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d)
    if cfg.activation in ("swiglu", "geglu"):
      act = jax.nn.silu if cfg.activation == "swiglu" else jax.nn.gelu
      h_TxF = act(dense(cfg.mlp_dim, "gate", ("embed", "mlp"))(x_TxD)) * dense(
          cfg.mlp_dim, "up", ("embed", "mlp"))(x_TxD)
    else:
      act = jax.nn.gelu if cfg.activation == "gelu" else jax.nn.relu
      h_TxF = act(dense(cfg.mlp_dim, "up", ("embed", "mlp"))(x_TxD))
    h_TxF = nn.with_logical_constraint(h_TxF, ("batch", "mlp"))
    self.sow("intermediates", "neuron_sq_F", jnp.mean(jnp.square(h_TxF.astype(jnp.float32)), 0))
    return dense(cfg.d_model, "down", ("mlp", "embed"))(h_TxF).reshape(b, l, d)


class Block(nn.Module):
  """Pre-norm residual block; the signature fits `nn.scan` (carry, broadcast args) -> (carry, y).

  y = (hidden, kv_cache): hidden is the block's output when `return_hidden`, else None, so scan
  stacks no SxBxLxD unasked; kv_cache is this layer's updated cache pair (see Attention), or None.
  """

  cfg: ModelConfig
  return_hidden: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxLxL, local_mask_BxLxL, cos_BxLxK2, sin_BxLxK2, is_local,
               kv_cache=None, cache_index=None):
    """`is_local` (a scanned bool per layer) picks `local_mask_BxLxL` over `mask_BxLxL`; with a
    cache (scanned per layer, `cache_index` broadcast) both masks are BxLxC."""
    cfg = self.cfg
    if local_mask_BxLxL is not None:
      mask_BxLxL = jnp.where(is_local, local_mask_BxLxL, mask_BxLxL)
    y_BxLxD, kv_cache = Attention(cfg, name="attn")(
        make_norm(cfg, "attn_norm")(x_BxLxD), mask_BxLxL, cos_BxLxK2, sin_BxLxK2, kv_cache,
        cache_index)
    if cfg.post_norms:
      y_BxLxD = make_norm(cfg, "post_attn_norm")(y_BxLxD)
    x_BxLxD = x_BxLxD + y_BxLxD
    y_BxLxD = Mlp(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_BxLxD))
    if cfg.post_norms:
      y_BxLxD = make_norm(cfg, "post_mlp_norm")(y_BxLxD)
    x_BxLxD = x_BxLxD + y_BxLxD
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return x_BxLxD, (x_BxLxD if self.return_hidden else None, kv_cache)


class Embed(nn.Embed):
  """nn.Embed whose lookup reads a gathered copy of the table (a no-op unless it is sharded).

  XLA cannot partition a gather from a vocab x embed sharded table into batch-sharded rows: it
  replicates through a slow path and warns ("involuntary full rematerialization"). Gathering the
  table first, as FSDP does for every weight, is the fast path; the gradient is reduce-scattered
  back to the shards. Names without a rule ('*_gathered') mean unsharded.
  """

  def __call__(self, tokens_BxL):
    table_VxD = nn.with_logical_constraint(self.embedding, ("vocab_gathered", "embed_gathered"))
    return jnp.take(table_VxD.astype(self.dtype), tokens_BxL, axis=0)


def _remat(block_cls, cfg: ModelConfig):
  if cfg.remat_policy == "none":
    return block_cls
  policy = None if cfg.remat_policy == "full" else jax.checkpoint_policies.checkpoint_dots
  # Under scan, CSE across iterations cannot happen, so prevent_cse only costs speed.
  return nn.remat(block_cls, policy=policy, prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None,
               return_hidden: bool = False, return_final_hidden: bool = False,
               cache: KVCache | None = None):
    """Returns logits_BxLxV (float32), and with `return_hidden` also hidden_SxBxLxD.

    `segment_ids_BxL` (0 = padding) restrict attention to the same packed document;
    `positions_BxL` restart per document. Both default to one unpacked sequence.
    `hidden_SxBxLxD` holds the residual stream after each of the S layers.
    With `return_final_hidden` it returns the final-normed hidden_BxLxD instead of logits, for
    losses that apply the unembedding themselves (`unembedding` gives it; see
    losses.chunked_distillation_loss).
    Per-layer attention maps (head-averaged, see `attention_probs`) are sown into the
    ATTENTION_MAPS collection when it is mutable; `collected_attention` stacks them SxBxLxL.

    With `cache` the L tokens fill its slots index .. index+L-1 and attend to every slot written
    so far (prefill a prompt, then decode one token per call), and the result comes back as
    (logits_BxLxV or hidden_BxLxD, updated cache). `positions_BxL` must then be given: only the
    caller knows where each row's document started.
    """
    cfg = self.cfg
    if cache is not None and (return_hidden or positions_BxL is None):
      raise ValueError("a cache needs positions_BxL and does not return per-layer hidden states")
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, l = tokens_BxL.shape
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))

    embed = Embed(
        cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype, name="embed",
        embedding_init=_partitioned(nn.initializers.normal(stddev=cfg.d_model ** -0.5),
                                    ("vocab", "embed")))
    x_BxLxD = embed(tokens_BxL)
    if cfg.embed_scale:  # Gemma rounds sqrt(d_model) to the compute dtype first
      x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** 0.5, dtype)
    if cfg.position_embedding == "learned":
      x_BxLxD = x_BxLxD + Embed(
          cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=param_dtype, name="pos_embed",
          embedding_init=_partitioned(nn.initializers.normal(stddev=0.01),
                                      ("positions", "embed")))(positions_BxL)
      cos_BxLxK2 = sin_BxLxK2 = None
    else:
      cos_BxLxK2, sin_BxLxK2 = rope_tables(positions_BxL, rope_frequencies(cfg))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    if cache is None:
      mask_BxLxL = attention_mask(segment_ids_BxL)
      key_positions_BxC = kv_SxBxCxNxK = cache_index = None
    else:  # the "BxLxL" masks below are BxLxC
      cache = cache._replace(
          segment_ids_BxC=jax.lax.dynamic_update_slice_in_dim(
              cache.segment_ids_BxC, segment_ids_BxL.astype(jnp.int32), cache.index, 1),
          positions_BxC=jax.lax.dynamic_update_slice_in_dim(
              cache.positions_BxC, positions_BxL.astype(jnp.int32), cache.index, 1))
      mask_BxLxL = cached_attention_mask(segment_ids_BxL, cache)
      key_positions_BxC, cache_index = cache.positions_BxC, cache.index
      kv_SxBxCxNxK = (cache.k_SxBxCxNxK, cache.v_SxBxCxNxK)
    local_BxLxL = (local_mask(mask_BxLxL, positions_BxL, cfg.sliding_window, key_positions_BxC)
                   if cfg.sliding_window > 0 else None)
    is_local_S = jnp.array([cfg.is_local(i) for i in range(cfg.num_layers)])

    block = _remat(Block, cfg)
    if cfg.scan_layers:
      layers = nn.scan(
          block, variable_axes={"params": 0, "intermediates": 0, ATTENTION_MAPS: 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, return_hidden, name="layers")
      x_BxLxD, (hidden_SxBxLxD, kv_SxBxCxNxK) = layers(
          x_BxLxD, mask_BxLxL, local_BxLxL, cos_BxLxK2, sin_BxLxK2, is_local_S, kv_SxBxCxNxK,
          cache_index)
    else:
      hidden, kvs = [], []
      for i in range(cfg.num_layers):
        layer_kv = None if kv_SxBxCxNxK is None else tuple(c[i] for c in kv_SxBxCxNxK)
        x_BxLxD, (_, layer_kv) = block(cfg, return_hidden, name=f"layer_{i}")(
            x_BxLxD, mask_BxLxL, local_BxLxL, cos_BxLxK2, sin_BxLxK2, is_local_S[i], layer_kv,
            cache_index)
        hidden.append(x_BxLxD)
        kvs.append(layer_kv)
      hidden_SxBxLxD = jnp.stack(hidden) if return_hidden else None
      if cache is not None:
        kv_SxBxCxNxK = tuple(jnp.stack(c) for c in zip(*kvs))
    if cache is not None:
      cache = cache._replace(k_SxBxCxNxK=kv_SxBxCxNxK[0], v_SxBxCxNxK=kv_SxBxCxNxK[1],
                             index=cache.index + tokens_BxL.shape[1])

    x_BxLxD = make_norm(cfg, "final_norm")(x_BxLxD)
    if return_final_hidden:
      if return_hidden:  # both: for feature losses next to the chunked loss (kdjax.features)
        return x_BxLxD, hidden_SxBxLxD
      return x_BxLxD if cache is None else (x_BxLxD, cache)
    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, name="unembed",
          kernel_init=_partitioned(_dense_init(), ("embed", "vocab")))(x_BxLxD)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    if cfg.logit_softcap > 0:
      logits_BxLxV = cfg.logit_softcap * jnp.tanh(logits_BxLxV / cfg.logit_softcap)
    if return_hidden:
      return logits_BxLxV, hidden_SxBxLxD
    return logits_BxLxV if cache is None else (logits_BxLxV, cache)


def unembedding(cfg: ModelConfig, params: Any) -> jax.Array:
  """unembed_DxV with logits = final_hidden @ unembed_DxV (before the soft-cap)."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["unembed"]["kernel"]


def collected_attention(cfg: ModelConfig, maps: Any) -> jax.Array:
  """attn_SxBxLxL from the ATTENTION_MAPS collection of `apply(..., mutable=[ATTENTION_MAPS])`,
  whether the layers ran under `nn.scan` (one stacked entry) or one module each."""
  if cfg.scan_layers:
    return maps["layers"]["attn"]["probs_BxLxL"][0]
  return jnp.stack([maps[f"layer_{i}"]["attn"]["probs_BxLxL"][0] for i in range(cfg.num_layers)])
