"""A decoder-only Transformer in Linen, shared by teacher and student.

Teacher and student are the same code with different `ModelConfig`s:

    logits_BxLxV = Transformer(cfg).apply({'params': params}, tokens_BxL)

Shape letters: B batch, L length, T = B * L tokens, D model width, H query heads, N key/value
heads, G = H / N query heads per key/value head, K head dim, F mlp width, V vocab, S layers.

Every param carries logical axis names ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
'layers') so that shardings are derived from rules in the config, never written per parameter.
Attention softmax runs in float32 whatever `dtype` is; the layers run under `nn.scan`, so compile
time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
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

  @property
  def k(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    """Builds from a dict or ConfigDict, ignoring keys that are not model fields."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def num_params(self) -> int:
    """Parameter count, computed from shapes without allocating anything."""
    shapes = jax.eval_shape(
        lambda: Transformer(self).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(shapes))


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
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    scale_D = self.param("scale", _partitioned(nn.initializers.ones, ("embed",)),
                         (x_BxLxD.shape[-1],), self.param_dtype)
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    scale = scale_D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x * scale).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  if cfg.norm == "rmsnorm":
    return RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)
  return nn.LayerNorm(
      epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=_partitioned(nn.initializers.ones, ("embed",)),
      bias_init=_partitioned(nn.initializers.zeros, ("embed",)))


def rope_tables(positions_BxL, head_dim: int, theta: float):
  """cos and sin, each BxLx(K/2), in float32 (the rotate-half convention)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
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


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxLxL, cos_BxLxK2, sin_BxLxK2):
    cfg = self.cfg
    h, n, k = cfg.num_heads, cfg.num_kv_heads, cfg.k
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def proj(heads, name, axis_name):
      return nn.DenseGeneral(
          (heads, k), use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
          kernel_init=_partitioned(_dense_init(), ("embed", axis_name, "head_dim")))

    # Projections on tokens flattened to one axis (see Mlp), reshaped back for attention.
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d)
    q_BxLxHxK = proj(h, "query", "heads")(x_TxD).reshape(b, l, h, k)
    k_BxLxNxK = proj(n, "key", "kv_heads")(x_TxD).reshape(b, l, n, k)
    v_BxLxNxK = proj(n, "value", "kv_heads")(x_TxD).reshape(b, l, n, k)
    q_BxLxHxK = apply_rope(q_BxLxHxK, cos_BxLxK2, sin_BxLxK2)
    k_BxLxNxK = apply_rope(k_BxLxNxK, cos_BxLxK2, sin_BxLxK2)

    # Grouped-query attention (query heads g*G .. g*G+G-1 share key/value head g), scores and
    # softmax in float32, masked scores at finfo.min (so exp gives exactly 0). JAX's fused
    # attention: cuDNN's kernel on GPU where it applies, XLA's elsewhere (2x faster on CPU than
    # the plain einsums it replaces).
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask=mask_BxLxL[:, None], scale=k ** -0.5)
    out_BxLxHxK = nn.with_logical_constraint(out_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    return nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=param_dtype,
        name="out", kernel_init=_partitioned(_dense_init(), ("heads", "head_dim", "embed")),
    )(out_BxLxHxK.reshape(b * l, h, k)).reshape(b, l, d)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def dense(features, name, names):
      return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                      kernel_init=_partitioned(_dense_init(), names))

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
    return dense(cfg.d_model, "down", ("mlp", "embed"))(h_TxF).reshape(b, l, d)


class Block(nn.Module):
  """Pre-norm residual block; the signature fits `nn.scan` (carry, broadcast args) -> (carry, y).

  y is the block's output when `return_hidden`, else None, so scan stacks no SxBxLxD unasked.
  """

  cfg: ModelConfig
  return_hidden: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxLxL, cos_BxLxK2, sin_BxLxK2):
    x_BxLxD = x_BxLxD + Attention(self.cfg, name="attn")(
        make_norm(self.cfg, "attn_norm")(x_BxLxD), mask_BxLxL, cos_BxLxK2, sin_BxLxK2)
    x_BxLxD = x_BxLxD + Mlp(self.cfg, name="mlp")(make_norm(self.cfg, "mlp_norm")(x_BxLxD))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return x_BxLxD, (x_BxLxD if self.return_hidden else None)


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
               return_hidden: bool = False, return_final_hidden: bool = False):
    """Returns logits_BxLxV (float32), and with `return_hidden` also hidden_SxBxLxD.

    `segment_ids_BxL` (0 = padding) restrict attention to the same packed document;
    `positions_BxL` restart per document. Both default to one unpacked sequence.
    `hidden_SxBxLxD` holds the residual stream after each of the S layers.
    With `return_final_hidden` it returns the final-normed hidden_BxLxD instead of logits, for
    losses that apply the unembedding themselves (`unembedding` gives it; see
    losses.chunked_distillation_loss).
    """
    cfg = self.cfg
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
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    mask_BxLxL = attention_mask(segment_ids_BxL)
    cos_BxLxK2, sin_BxLxK2 = rope_tables(positions_BxL, cfg.k, cfg.rope_theta)

    block = _remat(Block, cfg)
    if cfg.scan_layers:
      layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, return_hidden, name="layers")
      x_BxLxD, hidden_SxBxLxD = layers(x_BxLxD, mask_BxLxL, cos_BxLxK2, sin_BxLxK2)
    else:
      hidden = []
      for i in range(cfg.num_layers):
        x_BxLxD, _ = block(cfg, return_hidden, name=f"layer_{i}")(
            x_BxLxD, mask_BxLxL, cos_BxLxK2, sin_BxLxK2)
        hidden.append(x_BxLxD)
      hidden_SxBxLxD = jnp.stack(hidden) if return_hidden else None

    x_BxLxD = make_norm(cfg, "final_norm")(x_BxLxD)
    if return_final_hidden:
      return x_BxLxD
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
    return logits_BxLxV


def unembedding(cfg: ModelConfig, params: Any) -> jax.Array:
  """unembed_DxV with logits = final_hidden @ unembed_DxV (before the soft-cap)."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["unembed"]["kernel"]
