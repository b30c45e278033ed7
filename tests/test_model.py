"""Tests for kdjax.model against an independent float64 numpy decoder, plus structural properties.

Expected logits never come from kdjax: `np_forward` below is written from the math (embedding lookup,
pre-norm blocks, rotate-half RoPE, grouped-query causal attention over packed segments, GLU MLPs,
final norm, tied or untied unembedding, soft-cap) and only reads the arrays out of the Flax param
tree. Everything else is a property: causality (token changes and exact-zero gradients), GQA ==
MHA with repeated key/value heads, packed == unpacked, scan == loop, remat == no remat, logical axis
names on every param, init scales, and the full-size parameter count under `jax.eval_shape`.

Params for the numerical tests are drawn in numpy into the exact tree `init` builds (traced under
`eval_shape`), which saves a jitted init per config; `test_init_scales` covers `init` itself.

Shapes are tiny (V=50, D=16..32, 2 layers, L=8..12): B batch, L length, D model width, H query
heads, N key/value heads, K head dim, F mlp width, V vocab, S layers.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.model import ModelConfig, Transformer
from support.params import random_param, unscan_params

B, L, V = 2, 12, 50

# f32 model vs f64 oracle. Logits are O(1) sums of O(D) products through two residual layers; f32
# rounding (2^-24 ~ 6e-8 relative per op) accumulates to ~1e-6 here, so 1e-4 leaves headroom while
# still catching any real mistake (a wrong RoPE sign, head mapping or eps changes logits by >1e-2).
REF_RTOL, REF_ATOL = 1e-4, 1e-4
# kdjax vs kdjax where the math is identical but shapes or program structure differ (different L,
# scan vs loop, remat): only f32 reduction order can change, ~1e-7 relative on O(1) values.
SAME_RTOL, SAME_ATOL = 1e-5, 1e-6

BASE = ModelConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=4, num_kv_heads=4,
                   mlp_dim=32, max_len=64)


# ----------------------------------------------------------------------------- numpy oracle


def np_norm(x, p, kind, eps):
  if kind == "rmsnorm":
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * p["scale"]
  mu = x.mean(axis=-1, keepdims=True)
  var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu_tanh(x):
  # The tanh approximation (GPT-2, Gemma's "gelu_pytorch_tanh"); kdjax uses jax.nn.gelu's default.
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_rope(x_BxLxHxK, positions_BxL, theta):
  k = x_BxLxHxK.shape[-1]
  inv_freq = theta ** (-2.0 * np.arange(k // 2) / k)
  ang = positions_BxL[:, :, None, None].astype(np.float64) * inv_freq  # Bx L x 1 x K/2
  cos, sin = np.cos(ang), np.sin(ang)
  x1, x2 = x_BxLxHxK[..., : k // 2], x_BxLxHxK[..., k // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_attention(cfg, p, x_BxLxD, segment_ids_BxL, positions_BxL):
  h, n = cfg.num_heads, cfg.num_kv_heads
  k = p["query"]["kernel"].shape[-1]
  q = np.einsum("bld,dhk->blhk", x_BxLxD, p["query"]["kernel"])
  kk = np.einsum("bld,dnk->blnk", x_BxLxD, p["key"]["kernel"])
  v = np.einsum("bld,dnk->blnk", x_BxLxD, p["value"]["kernel"])
  q = np_rope(q, positions_BxL, cfg.rope_theta)
  kk = np_rope(kk, positions_BxL, cfg.rope_theta)
  b, length = segment_ids_BxL.shape
  causal = np.arange(length)[None, :] <= np.arange(length)[:, None]  # [l, m]: m <= l
  allowed = causal[None] & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
  out = np.zeros((b, length, h, k))
  for head in range(h):
    kv = head // (h // n)
    s = np.einsum("blk,bmk->blm", q[:, :, head], kk[:, :, kv]) * k ** -0.5
    s = np.where(allowed, s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    out[:, :, head] = np.einsum("blm,bmk->blk", probs, v[:, :, kv])
  return np.einsum("blhk,hkd->bld", out, p["out"]["kernel"])


def np_mlp(cfg, p, x):
  up = x @ p["up"]["kernel"]
  if cfg.activation == "swiglu":
    hid = np_silu(x @ p["gate"]["kernel"]) * up
  elif cfg.activation == "geglu":
    hid = np_gelu_tanh(x @ p["gate"]["kernel"]) * up
  elif cfg.activation == "gelu":
    hid = np_gelu_tanh(up)
  else:
    hid = np.maximum(up, 0.0)
  return hid @ p["down"]["kernel"]


def np_layer_params(cfg, params, i):
  if cfg.scan_layers:
    return jax.tree.map(lambda a: a[i], params["layers"])
  return params[f"layer_{i}"]


def np_head(cfg, params, x_BxLxD):
  """Final norm, unembedding and soft-cap: residual stream -> logits."""
  x = np_norm(x_BxLxD, params["final_norm"], cfg.norm, cfg.norm_eps)
  if cfg.tie_embeddings:
    z = x @ params["embed"]["embedding"].T
  else:
    z = x @ params["unembed"]["kernel"]
  if cfg.logit_softcap > 0:
    z = cfg.logit_softcap * np.tanh(z / cfg.logit_softcap)
  return z


def np_forward(cfg, params, tokens_BxL, segment_ids_BxL=None, positions_BxL=None):
  """Returns (logits_BxLxV, hidden_SxBxLxD) in float64."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens_BxL = np.asarray(tokens_BxL)
  b, length = tokens_BxL.shape
  if segment_ids_BxL is None:
    segment_ids_BxL = np.ones((b, length), np.int32)
  if positions_BxL is None:
    positions_BxL = np.broadcast_to(np.arange(length), (b, length))
  segment_ids_BxL, positions_BxL = np.asarray(segment_ids_BxL), np.asarray(positions_BxL)
  x = params["embed"]["embedding"][tokens_BxL]
  hidden = []
  for i in range(cfg.num_layers):
    p = np_layer_params(cfg, params, i)
    x = x + np_attention(cfg, p["attn"], np_norm(x, p["attn_norm"], cfg.norm, cfg.norm_eps),
                         segment_ids_BxL, positions_BxL)
    x = x + np_mlp(cfg, p["mlp"], np_norm(x, p["mlp_norm"], cfg.norm, cfg.norm_eps))
    hidden.append(x)
  return np_head(cfg, params, x), np.stack(hidden)


# ----------------------------------------------------------------------------- shared builders


@functools.lru_cache(maxsize=None)
def param_shapes(cfg: ModelConfig):
  """The boxed (nn.Partitioned) param tree as ShapeDtypeStructs: `init` traced, nothing run."""
  return jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]


@functools.lru_cache(maxsize=None)
def build(cfg: ModelConfig, seed: int = 0):
  """Unboxed float32 params with the exact tree `init` makes, drawn in numpy (a jitted init
  costs seconds of compile per config; the tree is what matters here, `init` is tested below)."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(param_shapes(cfg))
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(random_param(path, s.shape, rng), jnp.float32), shapes)


@functools.lru_cache(maxsize=None)
def jit_apply(cfg: ModelConfig):
  """(params, tokens, segment_ids, positions) -> (logits_BxLxV, hidden_SxBxLxD), compiled once
  per config and shape and shared by every test."""
  model = Transformer(cfg)
  return jax.jit(lambda p, t, s, pos: model.apply({"params": p}, t, s, pos, return_hidden=True))


def logits_of(cfg, params, toks, seg=None, pos=None):
  b, length = toks.shape
  seg = jnp.ones((b, length), jnp.int32) if seg is None else seg
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)) if pos is None else pos
  return jit_apply(cfg)(params, toks, seg, pos)[0]


def tokens(seed, shape=(B, L)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def packed_inputs():
  """Row 0: documents of 5 and 4 tokens, then 3 padding; row 1: one 12-token document."""
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * L], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(L))], np.int32)
  return jnp.asarray(seg), jnp.asarray(pos)


def expected_num_params(cfg):
  d, h, n, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.mlp_dim
  norm = d if cfg.norm == "rmsnorm" else 2 * d  # scale (+ bias)
  mlp = (3 if cfg.activation in ("swiglu", "geglu") else 2) * d * f
  per_layer = d * h * k + 2 * d * n * k + h * k * d + mlp + 2 * norm
  unembed = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + cfg.num_layers * per_layer + norm + unembed


# ----------------------------------------------------------------------------- 1. oracle


REF_CONFIGS = {
    "mha-tied-rms-swiglu-scan": BASE,
    "gqa-untied-ln-geglu-loop": dataclasses.replace(
        BASE, num_kv_heads=2, tie_embeddings=False, norm="layernorm", activation="geglu",
        scan_layers=False),
    "gqa-tied-rms-gelu-softcap-scan": dataclasses.replace(
        BASE, d_model=32, num_kv_heads=2, activation="gelu", logit_softcap=1.5),
    # MQA with head_dim set explicitly so that H*K != D, and a small theta so every RoPE
    # frequency turns through a sizeable angle within L=12.
    "mqa-untied-rms-relu-headdim-loop": dataclasses.replace(
        BASE, num_kv_heads=1, head_dim=8, tie_embeddings=False, activation="relu",
        rope_theta=100.0, scan_layers=False),
    # A large eps, so that using it wrongly (or not at all) shows.
    "gqa-untied-ln-swiglu-softcap-scan": dataclasses.replace(
        BASE, num_kv_heads=2, tie_embeddings=False, norm="layernorm", logit_softcap=2.0,
        norm_eps=1e-2),
}
parametrize_ref = pytest.mark.parametrize("cfg", REF_CONFIGS.values(), ids=REF_CONFIGS.keys())

# The workhorse for property tests: GQA (G=2), tied, RMSNorm, SwiGLU, scanned.
GQA = dataclasses.replace(BASE, num_kv_heads=2)


@parametrize_ref
def test_matches_numpy_reference(cfg):
  params = build(cfg)
  toks = tokens(1)
  seg, pos = packed_inputs()
  logits, hidden = jit_apply(cfg)(params, toks, seg, pos)
  want_logits, want_hidden = np_forward(cfg, params, toks, seg, pos)
  assert logits.dtype == jnp.float32 and logits.shape == (B, L, V)
  assert want_logits.std() > 0.3  # the oracle's logits vary, or agreement would prove little
  np.testing.assert_allclose(hidden, want_hidden, rtol=REF_RTOL, atol=REF_ATOL)
  np.testing.assert_allclose(logits, want_logits, rtol=REF_RTOL, atol=REF_ATOL)


def test_default_segments_and_positions_match_reference():
  """No segment ids or positions given: one unpacked causal sequence per row."""
  cfg = REF_CONFIGS["gqa-untied-ln-geglu-loop"]
  params, toks = build(cfg), tokens(2)
  logits = jax.jit(Transformer(cfg).apply)({"params": params}, toks)
  np.testing.assert_allclose(logits, np_forward(cfg, params, toks)[0], rtol=REF_RTOL,
                             atol=REF_ATOL)


def test_softcap_bounds_logits():
  cfg = REF_CONFIGS["gqa-tied-rms-gelu-softcap-scan"]
  params = jax.tree.map(lambda a: a * 4.0, build(cfg))  # push raw logits far past the cap
  logits = np.asarray(logits_of(cfg, params, tokens(3), *packed_inputs()))
  assert np.all(np.abs(logits) <= cfg.logit_softcap)
  assert np.abs(logits).max() > 0.9 * cfg.logit_softcap


# ----------------------------------------------------------------------------- 2. causality


def test_causal_token_change_leaves_prefix_bit_identical():
  params, toks = build(GQA), tokens(4)
  base = np.asarray(logits_of(GQA, params, toks))
  for i in (0, 3, L - 2):
    changed = toks.at[:, i + 1:].set((toks[:, i + 1:] + 7) % V)
    out = np.asarray(logits_of(GQA, params, changed))
    # Masked scores are exp(finfo.min - max) = 0 exactly, so the prefix is bit-identical.
    np.testing.assert_array_equal(out[:, :i + 1], base[:, :i + 1])
    assert np.abs(out[:, i + 1:] - base[:, i + 1:]).max() > 1e-3  # not vacuous


@functools.lru_cache(maxsize=None)
def embedding_grad_fn(cfg):
  """(delta_BxLxD, params, tokens, segment_ids, positions, w_BxLxV) -> d sum(logits * w) / d delta,
  where delta is added to the embedding lookup's output: a continuous input at every position,
  injected with a method interceptor so kdjax needs no test hook."""
  model = Transformer(cfg)

  def loss(delta_BxLxD, params, toks, seg, pos, w_BxLxV):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
        out = out + delta_BxLxD.astype(out.dtype)
      return out

    with nn.intercept_methods(add_delta):
      logits = model.apply({"params": params}, toks, seg, pos)
    return jnp.sum(logits * w_BxLxV)

  return jax.jit(jax.grad(loss))


def position_grad_norms(cfg, seg, pos):
  """norms[b, i, c, j] = |d <w, logits[b, i, :]> / d embedding[c, j, :]| (one VJP per (b, i)).

  One reverse pass per output position rather than `jax.jacrev`: jacrev vmaps the VJP over all
  B*L*V cotangents, and jaxlib 0.10.2's CPU backend miscompiles that batched VJP (its YNNPACK
  fusion gets `a + b * sum(b * a, -1)` wrong once a[N, 24, 16] passes 2^15 elements, leaking
  gradient across batch rows; `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` avoids it).
  A plain VJP is also exactly what training runs."""
  params, toks = build(cfg), tokens(5)
  grad = embedding_grad_fn(cfg)
  w = np.random.default_rng(6).standard_normal((B, L, V)).astype(np.float32)
  delta = jnp.zeros((B, L, cfg.d_model), jnp.float32)
  norms = np.zeros((B, L, B, L))
  for b in range(B):
    for i in range(L):
      w_bi = np.zeros_like(w)
      w_bi[b, i] = w[b, i]
      g = np.asarray(grad(delta, params, toks, seg, pos, jnp.asarray(w_bi)))
      norms[b, i] = np.abs(g).sum(-1)
  return norms


def test_causal_gradients_exactly_zero_for_future_positions():
  seg = jnp.ones((B, L), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  norms = position_grad_norms(GQA, seg, pos)
  past = np.tril(np.ones((L, L), bool))  # [i, j]: j <= i
  for b in range(B):
    for c in range(B):
      if c != b:  # rows of a batch never interact
        assert np.all(norms[b, :, c] == 0.0)
      else:
        assert np.all(norms[b, :, b][~past] == 0.0)  # exactly zero, not small
        assert np.all(norms[b, :, b][past] > 0.0)  # every earlier position matters


def test_packed_gradients_exactly_zero_across_documents():
  seg, pos = packed_inputs()
  norms = position_grad_norms(GQA, seg, pos)
  seg0 = np.asarray(seg[0])
  may_attend = (seg0[:, None] == seg0[None, :]) & np.tril(np.ones((L, L), bool))
  assert np.all(norms[0, :, 0][~may_attend] == 0.0)
  assert np.all(norms[0, :, 0][may_attend] > 0.0)


# ----------------------------------------------------------------------------- 3. GQA == MHA


def test_gqa_equals_mha_with_repeated_kv_heads():
  mha_cfg = dataclasses.replace(GQA, num_kv_heads=GQA.num_heads)
  gqa_params = build(GQA)
  group = GQA.num_heads // GQA.num_kv_heads
  attn = gqa_params["layers"]["attn"]
  # Kernels are S x D x N x K and query head h reads kv head h // G, so each kv head is repeated
  # G times in place along N: [k0, k0, k1, k1].
  mha_attn = {**attn, **{name: {"kernel": jnp.repeat(attn[name]["kernel"], group, axis=2)}
                         for name in ("key", "value")}}
  mha_params = {**gqa_params, "layers": {**gqa_params["layers"], "attn": mha_attn}}
  assert jax.tree.map(jnp.shape, mha_params) == jax.tree.map(jnp.shape, build(mha_cfg))
  seg, pos = packed_inputs()
  toks = tokens(7)
  np.testing.assert_allclose(logits_of(mha_cfg, mha_params, toks, seg, pos),
                             logits_of(GQA, gqa_params, toks, seg, pos),
                             rtol=SAME_RTOL, atol=SAME_ATOL)


# ----------------------------------------------------------------------------- 4. packing


def test_packed_documents_equal_documents_alone_and_padding_is_inert():
  params = build(GQA)
  doc_a, doc_b = tokens(8, (5,)), tokens(9, (5,))
  alone = logits_of(GQA, params, jnp.stack([doc_a, doc_b]))  # 2 x 5, unpacked

  def packed(pad_seed):
    # Row 0: a, b, 2 padding (the packer's layout); row 1: 7 padding, then a. Left padding
    # precedes the document causally, so only the segment mask can hide it.
    pad = tokens(pad_seed, (9,))
    toks = jnp.stack([jnp.concatenate([doc_a, doc_b, pad[:2]]),
                      jnp.concatenate([pad[2:], doc_a])])
    seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [0] * 7 + [1] * 5], jnp.int32)
    pos = jnp.asarray([[0, 1, 2, 3, 4] * 2 + [0, 0], [0] * 7 + [0, 1, 2, 3, 4]], jnp.int32)
    return np.asarray(logits_of(GQA, params, toks, seg, pos))

  got = packed(10)
  np.testing.assert_allclose(got[0, :5], alone[0], rtol=SAME_RTOL, atol=SAME_ATOL)
  np.testing.assert_allclose(got[0, 5:10], alone[1], rtol=SAME_RTOL, atol=SAME_ATOL)
  np.testing.assert_allclose(got[1, 7:], alone[0], rtol=SAME_RTOL, atol=SAME_ATOL)
  # Different padding contents: the real tokens' logits are bit-identical (masked weights are 0).
  other = packed(11)
  np.testing.assert_array_equal(other[0, :10], got[0, :10])
  np.testing.assert_array_equal(other[1, 7:], got[1, 7:])


# ----------------------------------------------------------------------------- 5. scan == loop


def test_scan_and_loop_give_same_logits():
  loop_cfg = dataclasses.replace(GQA, scan_layers=False)
  params = build(GQA)
  loop_params = unscan_params(params, GQA.num_layers)
  # The converted tree is exactly the tree the loop model initialises.
  assert jax.tree.map(jnp.shape, loop_params) == jax.tree.map(jnp.shape, build(loop_cfg))
  seg, pos = packed_inputs()
  toks = tokens(12)
  np.testing.assert_allclose(logits_of(loop_cfg, loop_params, toks, seg, pos),
                             logits_of(GQA, params, toks, seg, pos),
                             rtol=SAME_RTOL, atol=SAME_ATOL)


# ----------------------------------------------------------------------------- 6. remat


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
@pytest.mark.parametrize("scan_layers,policies", [(True, ("full", "dots")), (False, ("full",))],
                         ids=["scan", "loop"])
def test_remat_policies_match_none(scan_layers, policies):
  # The policy is independent of scanning; the loop case covers remat's prevent_cse=True branch.
  base = dataclasses.replace(GQA, scan_layers=scan_layers)
  params = build(GQA)
  params = params if scan_layers else unscan_params(params, GQA.num_layers)
  seg, pos = packed_inputs()
  toks = tokens(13)
  w = jnp.asarray(np.random.default_rng(14).standard_normal((B, L, V)), jnp.float32)

  def logits_and_grads(cfg):
    model = Transformer(cfg)

    def loss(p):
      logits = model.apply({"params": p}, toks, seg, pos)
      return jnp.sum(logits * w), logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)

  want_grads, want_logits = logits_and_grads(base)
  for policy in policies:
    grads, logits = logits_and_grads(dataclasses.replace(base, remat_policy=policy))
    np.testing.assert_allclose(logits, want_logits, rtol=SAME_RTOL, atol=SAME_ATOL)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=SAME_RTOL, atol=SAME_ATOL),
                 grads, want_grads)


# ----------------------------------------------------------------------------- 7. hidden states


@pytest.mark.parametrize("name", ["gqa-tied-rms-gelu-softcap-scan",
                                  "mqa-untied-rms-relu-headdim-loop"])
def test_return_hidden_reproduces_logits(name):
  cfg = REF_CONFIGS[name]
  params = build(cfg)
  seg, pos = packed_inputs()
  toks = tokens(15)
  logits, hidden = jit_apply(cfg)(params, toks, seg, pos)
  assert hidden.shape == (cfg.num_layers, B, L, cfg.d_model)
  # Final norm + unembedding + soft-cap (float64 oracle) on the last layer's residual stream.
  head = np_head(cfg, jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                 np.asarray(hidden[-1], np.float64))
  np.testing.assert_allclose(logits, head, rtol=REF_RTOL, atol=REF_ATOL)
  # return_hidden only adds an output: the logits equal the plain call's.
  plain = jax.jit(Transformer(cfg).apply)({"params": params}, toks, seg, pos)
  np.testing.assert_allclose(plain, logits, rtol=SAME_RTOL, atol=SAME_ATOL)


# ----------------------------------------------------------------------------- 8. init


EXPECTED_NAMES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("unembed", "kernel"): ("embed", "vocab"),
    ("final_norm", "scale"): ("embed",),
    ("final_norm", "bias"): ("embed",),
    ("attn", "query", "kernel"): ("embed", "heads", "head_dim"),
    ("attn", "key", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("attn", "value", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("attn", "out", "kernel"): ("heads", "head_dim", "embed"),
    ("attn_norm", "scale"): ("embed",),
    ("attn_norm", "bias"): ("embed",),
    ("mlp_norm", "scale"): ("embed",),
    ("mlp_norm", "bias"): ("embed",),
    ("mlp", "gate", "kernel"): ("embed", "mlp"),
    ("mlp", "up", "kernel"): ("embed", "mlp"),
    ("mlp", "down", "kernel"): ("mlp", "embed"),
}


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_every_param_has_logical_axis_names(scan_layers):
  # Untied + LayerNorm + SwiGLU: every kind of param appears.
  cfg = dataclasses.replace(REF_CONFIGS["gqa-untied-ln-swiglu-softcap-scan"],
                            scan_layers=scan_layers)
  leaves = jax.tree_util.tree_flatten_with_path(
      param_shapes(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  seen = set()
  for path, leaf in leaves:
    keys = tuple(k.key for k in path)
    assert isinstance(leaf, nn.Partitioned), keys
    assert len(leaf.names) == leaf.value.ndim, keys
    in_layer = keys[0] == "layers" or keys[0].startswith("layer_")
    key = keys[1:] if in_layer else keys
    want = ("layers",) + EXPECTED_NAMES[key] if scan_layers and in_layer else EXPECTED_NAMES[key]
    assert leaf.names == want, keys
    seen.add(key)
  assert seen == set(EXPECTED_NAMES)
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(param_shapes(cfg)))) == (
      expected_num_params(cfg))


def test_init_scales():
  """LeCun fan-in init over the contracted dims of each kernel (D for q/k/v, H*K for out), unit
  norm scales, embedding std D^-0.5. D=32, H=4, K=8 so that a fan-in over a single axis (H or K)
  would be off by 2x or more; each std is estimated from >= 1024 samples (~2% standard error)."""
  cfg = dataclasses.replace(GQA, d_model=32, head_dim=8, mlp_dim=64)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0),
                                                   jnp.zeros((1, 8), jnp.int32))["params"])
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, nn.unbox(param_shapes(cfg)))
  layers = params["layers"]
  want_std = {
      "embedding": (params["embed"]["embedding"], 32 ** -0.5),
      "query": (layers["attn"]["query"]["kernel"], 32 ** -0.5),
      "key": (layers["attn"]["key"]["kernel"], 32 ** -0.5),
      "out": (layers["attn"]["out"]["kernel"], 32 ** -0.5),  # fan-in H*K = 32
      "gate": (layers["mlp"]["gate"]["kernel"], 32 ** -0.5),
      "down": (layers["mlp"]["down"]["kernel"], 64 ** -0.5),
  }
  for name, (x, std) in want_std.items():
    assert x.size >= 1024, name
    np.testing.assert_allclose(np.std(np.asarray(x)), std, rtol=0.1, err_msg=name)
  np.testing.assert_array_equal(layers["attn_norm"]["scale"], 1.0)
  # The layers are initialised independently (split_rngs), not copies of one another.
  assert not np.allclose(layers["attn"]["query"]["kernel"][0], layers["attn"]["query"]["kernel"][1])


# ----------------------------------------------------------------------------- 9. full size


def test_full_size_param_count_under_eval_shape():
  # A Gemma-2-2B-shaped decoder: 2.6B params, counted without allocating any of them.
  cfg = ModelConfig(vocab_size=256_000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                    head_dim=256, mlp_dim=9216, activation="geglu", logit_softcap=30.0)
  params = nn.unbox(param_shapes(cfg))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  v, d, s, h, n, k, f = 256_000, 2304, 26, 8, 4, 256, 9216
  by_hand = v * d + s * (d * h * k + 2 * d * n * k + h * k * d + 3 * d * f + 2 * d) + d
  # Gemma 2 2B's published 2,614,341,888 also counts its post-attention/post-MLP norms
  # (2 * 26 * 2304 = 119,808), which this decoder does not have.
  assert by_hand == 2_614_341_888 - 2 * s * d == 2_614_222_080
  assert sum(x.size for x in jax.tree.leaves(params)) == by_hand
  assert cfg.num_params() == by_hand
  attn = params["layers"]["attn"]
  assert attn["query"]["kernel"].shape == (s, d, h, k)
  assert attn["key"]["kernel"].shape == (s, d, n, k)
  assert attn["out"]["kernel"].shape == (s, h, k, d)
  assert params["layers"]["mlp"]["down"]["kernel"].shape == (s, f, d)


@parametrize_ref
def test_param_count_matches_formula(cfg):
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(param_shapes(cfg)))) == (
      expected_num_params(cfg))


# ----------------------------------------------------------------------------- 10. bf16


def test_bf16_compute_close_to_f32():
  bf16_cfg = dataclasses.replace(BASE, dtype="bfloat16")
  params = build(BASE)  # float32 params drive both (param_dtype stays float32)
  seg, pos = packed_inputs()
  toks = tokens(16)
  want = np.asarray(logits_of(BASE, params, toks, seg, pos))
  got = logits_of(bf16_cfg, params, toks, seg, pos)
  assert got.dtype == jnp.float32
  got = np.asarray(got)
  assert np.all(np.isfinite(got))
  assert 0.5 < want.std() < 2.0
  # bf16 keeps 8 significand bits: each rounding is <= 2^-9 ~ 0.002 relative. The logits pass
  # through ~10 rounded stages (2 layers x attention + MLP, norms, unembedding) and are themselves
  # rounded to bf16 (spacing 2^-6 ~ 0.016 at |z| ~ 3) before the float32 cast, so errors of a few
  # hundredths are expected; 0.1 on std-1 logits is still far below what a real bug (a dropped
  # layer, a wrong head) produces. The mean error must be an order smaller.
  np.testing.assert_allclose(got, want, rtol=0, atol=0.1)
  assert np.abs(got - want).mean() < 0.02
