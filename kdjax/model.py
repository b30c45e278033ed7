"""A decoder-only Transformer in Linen, shared by teacher and student.

Teacher and student are the same code with different `ModelConfig`s:

    logits_BxLxV = Transformer(cfg).apply({'params': params}, tokens_BxL)

Shape letters as in the glossary of kdjax/__init__.py: B batch, L length, D model width, N key/value
heads, K head size (`ModelConfig.head_size`; K2 = K / 2), V vocab, S layers, C key/value cache
slots.

For generation (kdjax.sample) the same module, with the same params, also runs incrementally:

    logits_BxLxV, cache = Transformer(cfg).apply({'params': params}, tokens_BxL, segment_ids_BxL,
                                                 positions_BxL, cache=cache)

writes the L tokens' keys and values into a `KVCache` and attends over every slot written so far.
Decoding runs it on `decode_params(cfg, params)`, the same model with its layers unrolled, so
that each step updates every layer's cache in place (a scan over layers copies them every step).

Every param carries logical axis names ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
'layers', 'positions') so that shardings are derived from rules in the config, never written per parameter.
Attention softmax runs in float32 whatever `dtype` is; the layers run under `nn.scan`, so compile
time does not grow with depth. The attention maths (RoPE, masks, grouped-query attention) lives in
kdjax.attention; norms, the MLP and the logical-axis boxing of params in kdjax.layers.

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

from kdjax.attention import (ATTENTION_MAPS, Attention, attention_mask, cached_attention_mask,
                             local_mask, rope_frequencies, rope_tables)
from kdjax.layers import Mlp, dense_init, make_norm, partitioned
from kdjax.student_options import DENSE_LAYERS, LoraConfig, QuantConfig  # noqa: F401

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")  # gelu is the tanh approximation
POSITION_EMBEDDINGS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
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
  # How full-sequence attention runs (kdjax.blockwise_attention): 'xla', 'blockwise' (online
  # softmax over key blocks of attention_block_size positions), or 'cudnn' (NVIDIA, bf16/fp16).
  attention_impl: str = "xla"
  attention_block_size: int = 128
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
  # Qwix interception of a student (kdjax.qwix_model); off by default, never on a teacher.
  quant: QuantConfig = QuantConfig()
  lora: LoraConfig = LoraConfig()

  @property
  def head_size(self) -> int:
    """K, the width of one attention head: `head_dim` if set, else d_model // num_heads."""
    return self.head_dim or self.d_model // self.num_heads

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    """Builds from a dict or ConfigDict, ignoring keys that are not model fields."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    nested = {"quant": QuantConfig, "lora": LoraConfig}
    return cls(**{k: nested[k](**dict(v)) if k in nested and not isinstance(v, nested[k]) else v
                  for k, v in d.items() if k in names})

  @property
  def plain(self) -> "ModelConfig":
    """The same decoder without Qwix interception (a LoRA student's merged weights run here)."""
    return dataclasses.replace(self, quant=QuantConfig(), lora=LoraConfig())

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
  dtype, exactly as the full forward computes them. Each layer's keys and values are arrays of
  their own (not one stacked array), row b's head n at BN = b * N + n with its slots contiguous:
  a decode step then writes its new slot in place and reads the cache without copying it (see
  kdjax.attention.cached_attention).
  """

  k_BNxCxK: tuple[jax.Array, ...]  # one per layer
  v_BNxCxK: tuple[jax.Array, ...]
  segment_ids_BxC: jax.Array
  positions_BxC: jax.Array
  index: jax.Array  # int32 scalar: the first slot not yet written

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
    def kv():
      return tuple(jnp.zeros((batch * cfg.num_kv_heads, length, cfg.head_size),
                             jnp.dtype(cfg.dtype)) for _ in range(cfg.num_layers))
    slots = jnp.zeros((batch, length), jnp.int32)
    return cls(kv(), kv(), slots, slots, jnp.zeros((), jnp.int32))

  def widened(self, length: int) -> "KVCache":
    """The same cache with `length` slots: unwritten ones added at the end (one copy of it)."""
    extra = length - self.segment_ids_BxC.shape[1]
    if extra < 0:
      raise ValueError(f"a cache of {self.segment_ids_BxC.shape[1]} slots cannot narrow to "
                       f"{length}")

    def pad(x, axis):
      return jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])

    return self._replace(k_BNxCxK=tuple(pad(x, 1) for x in self.k_BNxCxK),
                         v_BNxCxK=tuple(pad(x, 1) for x in self.v_BNxCxK),
                         segment_ids_BxC=pad(self.segment_ids_BxC, 1),
                         positions_BxC=pad(self.positions_BxC, 1))


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
    cache (this layer's pair, `cache_index` shared) both masks are BxLxC."""
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
  # 'dots' keeps every matmul's output, attention's [B, H, L, L] scores among them (where no
  # fused kernel runs); 'dots_no_batch' keeps the weight matmuls' outputs only and recomputes
  # attention, which is what long rows at large batch need.
  policy = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
            "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            }[cfg.remat_policy]
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
    caller knows where each row's document started; RoPE reads them from a table of
    max(C, max_len) positions (NaN past it).

    Longer than kdjax's usual function on purpose: this is the one place a reader checks the
    model's maths in order (embed, masks, layers scanned or unrolled, cache, head), and Linen
    names submodules by where this compact method creates them.
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
        embedding_init=partitioned(nn.initializers.normal(stddev=cfg.d_model ** -0.5),
                                    ("vocab", "embed")))
    x_BxLxD = embed(tokens_BxL)
    if cfg.embed_scale:  # Gemma rounds sqrt(d_model) to the compute dtype first
      x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** 0.5, dtype)
    if cfg.position_embedding == "learned":
      x_BxLxD = x_BxLxD + Embed(
          cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=param_dtype, name="pos_embed",
          embedding_init=partitioned(nn.initializers.normal(stddev=0.01),
                                      ("positions", "embed")))(positions_BxL)
      cos_BxLxK2 = sin_BxLxK2 = None
    else:  # a cached token's position is below its slot: a table of C (or max_len) positions
      cos_BxLxK2, sin_BxLxK2 = rope_tables(
          positions_BxL, rope_frequencies(cfg),
          0 if cache is None else max(cache.segment_ids_BxC.shape[1], cfg.max_len))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    if cache is None:
      mask_BxLxL = attention_mask(segment_ids_BxL)
      key_positions_BxC = cache_index = None
    else:  # the "BxLxL" masks below are BxLxC
      cache = cache._replace(
          segment_ids_BxC=jax.lax.dynamic_update_slice_in_dim(
              cache.segment_ids_BxC, segment_ids_BxL.astype(jnp.int32), cache.index, 1),
          positions_BxC=jax.lax.dynamic_update_slice_in_dim(
              cache.positions_BxC, positions_BxL.astype(jnp.int32), cache.index, 1))
      mask_BxLxL = cached_attention_mask(segment_ids_BxL, cache)
      key_positions_BxC, cache_index = cache.positions_BxC, cache.index
    local_BxLxL = (local_mask(mask_BxLxL, positions_BxL, cfg.sliding_window, key_positions_BxC)
                   if cfg.sliding_window > 0 else None)
    is_local_S = jnp.array([cfg.is_local(i) for i in range(cfg.num_layers)])

    block = _remat(Block, cfg)
    if cfg.scan_layers:
      # A cache's per-layer arrays ride through the scan stacked, in copies made per call:
      # decoding runs the layers unrolled instead (see decode_params).
      kv_SxBNxCxK = None if cache is None else (jnp.stack(cache.k_BNxCxK),
                                                 jnp.stack(cache.v_BNxCxK))
      layers = nn.scan(
          block, variable_axes={"params": 0, "intermediates": 0, ATTENTION_MAPS: 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, return_hidden, name="layers")
      x_BxLxD, (hidden_SxBxLxD, kv_SxBNxCxK) = layers(
          x_BxLxD, mask_BxLxL, local_BxLxL, cos_BxLxK2, sin_BxLxK2, is_local_S, kv_SxBNxCxK,
          cache_index)
      if cache is not None:
        kvs = list(zip(*(tuple(c) for c in kv_SxBNxCxK)))
    else:
      hidden, kvs = [], []
      for i in range(cfg.num_layers):
        layer_kv = None if cache is None else (cache.k_BNxCxK[i], cache.v_BNxCxK[i])
        x_BxLxD, (_, layer_kv) = block(cfg, return_hidden, name=f"layer_{i}")(
            x_BxLxD, mask_BxLxL, local_BxLxL, cos_BxLxK2, sin_BxLxK2, is_local_S[i], layer_kv,
            cache_index)
        hidden.append(x_BxLxD)
        kvs.append(layer_kv)
      hidden_SxBxLxD = jnp.stack(hidden) if return_hidden else None
    if cache is not None:
      k_BNxCxK, v_BNxCxK = zip(*kvs)
      cache = cache._replace(k_BNxCxK=tuple(k_BNxCxK), v_BNxCxK=tuple(v_BNxCxK),
                             index=cache.index + tokens_BxL.shape[1])

    x_BxLxD = make_norm(cfg, "final_norm")(x_BxLxD)
    if return_final_hidden:
      if return_hidden:  # both: for feature losses next to the chunked loss (kdjax.features)
        return x_BxLxD, hidden_SxBxLxD
      return x_BxLxD if cache is None else (x_BxLxD, cache)
    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    elif "unembed_VxD" in self.variables.get("params", {}):  # see decode_params
      logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD.astype(dtype),
                                self.variables["params"]["unembed_VxD"].astype(dtype))
    else:
      logits_BxLxV = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, name="unembed",
          kernel_init=partitioned(dense_init(), ("embed", "vocab")))(x_BxLxD)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    if cfg.logit_softcap > 0:
      logits_BxLxV = cfg.logit_softcap * jnp.tanh(logits_BxLxV / cfg.logit_softcap)
    if return_hidden:
      return logits_BxLxV, hidden_SxBxLxD
    return logits_BxLxV if cache is None else (logits_BxLxV, cache)


def decode_params(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """The same model as decoding (kdjax.sample) runs it fastest: its layers unrolled (the scanned
  'layers' params, stacked S first, become 'layer_0' .. 'layer_{S-1}', as `scan_layers=False`
  names them) and an untied unembedding output-major ('unembed_VxD', in the compute dtype).

  Unrolled, each layer's weights and cache are buffers of their own that XLA reads in place; a
  scan over layers copies each layer's slice of the stacked weights and cache out (and back)
  every step. The output-major unembedding is the layout XLA's CPU matmul reads fastest for a
  batch of rows, as torch.nn.Linear keeps it. The stored params keep their tree and the model
  computes the same from either: this view is made per call, one copy of the weights.
  """
  cfg, params = unstack_layers(cfg, params)
  if not cfg.tie_embeddings:
    params["unembed_VxD"] = params.pop("unembed")["kernel"].T.astype(jnp.dtype(cfg.dtype))
  return cfg, params


def unstack_layers(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """(cfg, params) with the layers unrolled: scanned 'layers' params, stacked S first, become
  'layer_0' .. 'layer_{S-1}' as `scan_layers=False` names them (same maths; no-op if unrolled)."""
  params = dict(params)
  if cfg.scan_layers:
    stacked = params.pop("layers")
    for i in range(cfg.num_layers):
      params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    # Remat only matters under differentiation, which no caller of this is.
    cfg = dataclasses.replace(cfg, scan_layers=False, remat_policy="none")
  return cfg, params


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
