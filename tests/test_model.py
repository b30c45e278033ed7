"""Tests for kdjax.model against an independent float64 numpy decoder, plus structural properties.

Expected logits never come from kdjax: `np_forward` below is written from the math (embedding lookup,
pre-norm blocks, rotate-half RoPE, grouped-query causal attention over packed segments, GLU MLPs,
final norm, tied or untied unembedding, soft-cap) and only reads the arrays out of the Flax param
tree. Everything else is a property: causality (token changes and exact-zero gradients), GQA ==
MHA with repeated key/value heads, packed == unpacked, scan == loop, remat == no remat, logical axis
names on every param, and the full-size parameter count under `jax.eval_shape`.

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


def _perturb_norms(params, seed):
  """Norm scales 1 + N(0, 0.3^2) and biases N(0, 0.1^2), so that a norm that ignores or swaps its
  params cannot match the oracle (init values of exactly 1 and 0 would hide it)."""
  rng = np.random.default_rng(seed)

  def f(path, a):
    name = path[-1].key
    if name == "scale":
      return a + jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype)
    if name == "bias":
      return a + jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype)
    return a

  return jax.tree_util.tree_map_with_path(f, params)


@functools.lru_cache(maxsize=None)
def build(cfg: ModelConfig, seed: int = 0):
  """(model, boxed variables, unboxed params with perturbed norms); cached across tests."""
  model = Transformer(cfg)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
  params = _perturb_norms(nn.unbox(variables["params"]), seed)
  return model, variables, params


@functools.lru_cache(maxsize=None)
def jit_apply(cfg: ModelConfig, return_hidden: bool = False):
  model = Transformer(cfg)
  return jax.jit(lambda p, t, s, pos: model.apply({"params": p}, t, s, pos,
                                                  return_hidden=return_hidden))


def tokens(seed, shape=(B, L)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def packed_inputs():
  """Row 0: documents of 5 and 4 tokens, then 3 padding; row 1: one 12-token document."""
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * L], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(L))], np.int32)
  return jnp.asarray(seg), jnp.asarray(pos)


def unscan_params(params, num_layers):
  """Stacked 'layers' tree (leading axis S) -> per-layer 'layer_{i}' entries."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


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
    "gqa-untied-ln-swiglu-softcap-scan": dataclasses.replace(
        BASE, num_kv_heads=2, tie_embeddings=False, norm="layernorm", logit_softcap=2.0,
        norm_eps=1e-2),
}


@pytest.mark.parametrize("cfg", REF_CONFIGS.values(), ids=REF_CONFIGS.keys())
def test_matches_numpy_reference(cfg):
  _, _, params = build(cfg)
  toks = tokens(1)
  seg, pos = packed_inputs()
  logits, hidden = jit_apply(cfg, True)(params, toks, seg, pos)
  want_logits, want_hidden = np_forward(cfg, params, toks, seg, pos)
  assert logits.dtype == jnp.float32 and logits.shape == (B, L, V)
  # The oracle's logits must vary, or agreement would prove little.
  assert want_logits.std() > 0.3
  np.testing.assert_allclose(hidden, want_hidden, rtol=REF_RTOL, atol=REF_ATOL)
  np.testing.assert_allclose(logits, want_logits, rtol=REF_RTOL, atol=REF_ATOL)


def test_default_segments_and_positions_match_reference():
  """No segment ids / positions given: one unpacked causal sequence per row."""
  cfg = REF_CONFIGS["gqa-untied-ln-geglu-loop"]
  model, _, params = build(cfg)
  toks = tokens(2)
  logits = model.apply({"params": params}, toks)  # eager: no jit
  np.testing.assert_allclose(logits, np_forward(cfg, params, toks)[0], rtol=REF_RTOL,
                             atol=REF_ATOL)


def test_softcap_bounds_logits():
  cfg = REF_CONFIGS["gqa-tied-rms-gelu-softcap-scan"]
  _, _, params = build(cfg)
  params = jax.tree.map(lambda a: a * 4.0, params)  # push logits far into the cap
  seg, pos = packed_inputs()
  logits = jit_apply(cfg)(params, tokens(3), seg, pos)
  assert np.all(np.abs(np.asarray(logits)) <= cfg.logit_softcap)
  assert np.abs(np.asarray(logits)).max() > 0.9 * cfg.logit_softcap


# ----------------------------------------------------------------------------- 2. causality


CAUSAL_CFG = dataclasses.replace(BASE, num_kv_heads=2)


def test_causal_token_change_leaves_prefix_bit_identical():
  _, _, params = build(CAUSAL_CFG)
  apply = jit_apply(CAUSAL_CFG)
  seg = jnp.ones((B, L), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  toks = tokens(4)
  base = np.asarray(apply(params, toks, seg, pos))
  for i in (0, 3, L - 2):
    changed = toks.at[:, i + 1:].set((toks[:, i + 1:] + 7) % V)
    out = np.asarray(apply(params, changed, seg, pos))
    np.testing.assert_array_equal(out[:, :i + 1], base[:, :i + 1])
    # ...while the suffix does change: the test would pass vacuously otherwise.
    assert np.abs(out[:, i + 1:] - base[:, i + 1:]).max() > 1e-3


def _logits_of_embedding_delta(cfg, params, toks, seg, pos):
  """delta_BxLxD -> logits_BxLxV, where delta is added to the embedding lookup's output: a
  continuous input at each position, injected without changing kdjax."""
  model = Transformer(cfg)

  def f(delta_BxLxD):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
        out = out + delta_BxLxD.astype(out.dtype)
      return out

    with nn.intercept_methods(add_delta):
      return model.apply({"params": params}, toks, seg, pos)

  return f


def _position_jacobian_norms(cfg, seg, pos, toks_seed=5):
  """|d logits[b, i, :] / d embedding[b, j, :]| as a BxLxL array (i = output, j = input)."""
  _, _, params = build(cfg)
  toks = tokens(toks_seed)
  f = _logits_of_embedding_delta(cfg, params, toks, seg, pos)
  d = cfg.d_model
  jac = jax.jit(jax.jacrev(f))(jnp.zeros((B, L, d), jnp.float32))  # B x L x V x B x L x D
  jac = np.asarray(jac)
  # Rows only depend on their own batch row; keep the diagonal in b.
  jac_bb = np.stack([jac[b, :, :, b] for b in range(B)])  # B x L x V x L x D
  off_row = np.abs(jac[0, :, :, 1]).max() + np.abs(jac[1, :, :, 0]).max()
  return np.abs(jac_bb).sum(axis=(2, 4)), off_row  # B x L(i) x L(j)


def test_causal_gradients_exactly_zero_for_future_positions():
  seg = jnp.ones((B, L), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  norms, off_row = _position_jacobian_norms(CAUSAL_CFG, seg, pos)
  future = np.triu(np.ones((L, L), bool), k=1)  # j > i
  assert np.all(norms[:, future] == 0.0)
  assert np.all(norms[:, ~future] > 0.0)  # every past/current position does matter
  assert off_row == 0.0


def test_packed_gradients_exactly_zero_across_documents():
  seg, pos = packed_inputs()
  norms, _ = _position_jacobian_norms(CAUSAL_CFG, seg, pos)
  seg0 = np.asarray(seg[0])
  same_doc_causal = (seg0[:, None] == seg0[None, :]) & np.tril(np.ones((L, L), bool))
  assert np.all(norms[0][~same_doc_causal] == 0.0)
  assert np.all(norms[0][same_doc_causal] > 0.0)


# ----------------------------------------------------------------------------- 3. GQA == MHA


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa_cfg = dataclasses.replace(BASE, num_heads=4, num_kv_heads=2)
  mha_cfg = dataclasses.replace(gqa_cfg, num_kv_heads=4)
  _, _, gqa_params = build(gqa_cfg)
  group = gqa_cfg.num_heads // gqa_cfg.num_kv_heads
  attn = gqa_params["layers"]["attn"]
  # Kernels are S x D x N x K: query head h reads kv head h // G, so repeat each kv head G times
  # in place along N ([k0, k0, k1, k1]).
  mha_attn = dict(attn)
  for name in ("key", "value"):
    mha_attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], group, axis=2)}
  mha_params = {**gqa_params, "layers": {**gqa_params["layers"], "attn": mha_attn}}
  jax.tree.map(lambda a, b: None, mha_params, nn.unbox(build(mha_cfg)[1]["params"]))  # same tree
  assert mha_params["layers"]["attn"]["key"]["kernel"].shape == (2, 16, 4, 4)
  seg, pos = packed_inputs()
  toks = tokens(6)
  np.testing.assert_allclose(jit_apply(mha_cfg)(mha_params, toks, seg, pos),
                             jit_apply(gqa_cfg)(gqa_params, toks, seg, pos),
                             rtol=SAME_RTOL, atol=SAME_ATOL)


# ----------------------------------------------------------------------------- 4. packing


PACK_CFG = REF_CONFIGS["gqa-untied-ln-swiglu-softcap-scan"]


def test_packed_documents_equal_documents_alone():
  _, _, params = build(PACK_CFG)
  model = Transformer(PACK_CFG)
  doc_a, doc_b = tokens(7, (1, 5)), tokens(8, (1, 4))
  pad = tokens(9, (1, 3))
  row = jnp.concatenate([doc_a, doc_b, pad], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3], jnp.int32)
  packed = model.apply({"params": params}, row, seg, pos)
  alone_a = model.apply({"params": params}, doc_a)
  alone_b = model.apply({"params": params}, doc_b)
  np.testing.assert_allclose(packed[:, :5], alone_a, rtol=SAME_RTOL, atol=SAME_ATOL)
  np.testing.assert_allclose(packed[:, 5:9], alone_b, rtol=SAME_RTOL, atol=SAME_ATOL)


def test_padding_does_not_change_real_tokens():
  _, _, params = build(PACK_CFG)
  apply = jit_apply(PACK_CFG)
  doc = tokens(10, (1, 7))
  alone = Transformer(PACK_CFG).apply({"params": params}, doc)
  # Right padding (the packer's layout) and left padding, each with two different pad contents:
  # left padding precedes the document causally, so only the segment mask can hide it.
  for seed in (11, 12):
    pad = tokens(seed, (1, 5))
    right = apply(params, jnp.concatenate([doc, pad], 1),
                  jnp.asarray([[1] * 7 + [0] * 5], jnp.int32),
                  jnp.asarray([list(range(7)) + [0] * 5], jnp.int32))
    left = apply(params, jnp.concatenate([pad, doc], 1),
                 jnp.asarray([[0] * 5 + [1] * 7], jnp.int32),
                 jnp.asarray([[0] * 5 + list(range(7))], jnp.int32))
    np.testing.assert_allclose(right[:, :7], alone, rtol=SAME_RTOL, atol=SAME_ATOL)
    np.testing.assert_allclose(left[:, 5:], alone, rtol=SAME_RTOL, atol=SAME_ATOL)


# ----------------------------------------------------------------------------- 5. scan == loop


def test_scan_and_loop_give_same_logits():
  scan_cfg = REF_CONFIGS["gqa-untied-ln-swiglu-softcap-scan"]
  loop_cfg = dataclasses.replace(scan_cfg, scan_layers=False)
  _, _, params = build(scan_cfg)
  loop_params = unscan_params(params, scan_cfg.num_layers)
  # The converted tree is exactly the tree the loop model initialises.
  assert (jax.tree.structure(loop_params)
          == jax.tree.structure(nn.unbox(build(loop_cfg)[1]["params"])))
  seg, pos = packed_inputs()
  toks = tokens(13)
  np.testing.assert_allclose(jit_apply(loop_cfg)(loop_params, toks, seg, pos),
                             jit_apply(scan_cfg)(params, toks, seg, pos),
                             rtol=SAME_RTOL, atol=SAME_ATOL)


# ----------------------------------------------------------------------------- 6. remat


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_remat_policies_match_none(scan_layers):
  base = dataclasses.replace(BASE, num_kv_heads=2, scan_layers=scan_layers)
  _, _, params = build(base)
  seg, pos = packed_inputs()
  toks = tokens(14)
  weights = jnp.asarray(np.random.default_rng(15).standard_normal((B, L, V)), jnp.float32)

  def value_and_grad(cfg):
    model = Transformer(cfg)

    def loss(p):
      logits = model.apply({"params": p}, toks, seg, pos)
      return jnp.sum(logits * weights), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, want_logits), want_grads = value_and_grad(base)
  for policy in ("full", "dots"):
    (_, logits), grads = value_and_grad(dataclasses.replace(base, remat_policy=policy))
    np.testing.assert_allclose(logits, want_logits, rtol=SAME_RTOL, atol=SAME_ATOL)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=SAME_RTOL, atol=SAME_ATOL),
                 grads, want_grads)


# ----------------------------------------------------------------------------- 7. hidden states


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_return_hidden_reproduces_logits(scan_layers):
  cfg = dataclasses.replace(REF_CONFIGS["gqa-tied-rms-gelu-softcap-scan"], scan_layers=scan_layers)
  _, _, params = build(cfg)
  seg, pos = packed_inputs()
  toks = tokens(16)
  logits, hidden = jit_apply(cfg, True)(params, toks, seg, pos)
  assert hidden.shape == (cfg.num_layers, B, L, cfg.d_model)
  np.testing.assert_array_equal(logits, jit_apply(cfg)(params, toks, seg, pos))
  # Final norm + tied unembedding + soft-cap on the last layer's residual stream (float64 oracle).
  head = np_head(cfg, jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                 np.asarray(hidden[-1], np.float64))
  np.testing.assert_allclose(logits, head, rtol=REF_RTOL, atol=REF_ATOL)


# ----------------------------------------------------------------------------- 8. logical axes


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
  cfg = dataclasses.replace(REF_CONFIGS["gqa-untied-ln-swiglu-softcap-scan"],
                            scan_layers=scan_layers)
  variables = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0),
                                                           jnp.zeros((1, 8), jnp.int32)))
  leaves = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  seen = set()
  for path, leaf in leaves:
    keys = tuple(k.key for k in path)
    assert isinstance(leaf, nn.Partitioned), keys
    assert len(leaf.names) == leaf.value.ndim, keys
    in_layer = keys[0] == "layers" or keys[0].startswith("layer_")
    want = EXPECTED_NAMES[keys[1:] if in_layer else keys]
    if scan_layers and in_layer:
      want = ("layers",) + want
    assert leaf.names == want, keys
    seen.add(keys[1:] if in_layer else keys)
  assert seen == set(EXPECTED_NAMES)  # untied + layernorm + swiglu: every kind of param appears


# ----------------------------------------------------------------------------- 9. full size


def expected_num_params(cfg):
  d, h, n, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.k, cfg.mlp_dim
  norm = d if cfg.norm == "rmsnorm" else 2 * d  # scale (+ bias)
  mlp = (3 if cfg.activation in ("swiglu", "geglu") else 2) * d * f
  per_layer = d * h * k + 2 * d * n * k + h * k * d + mlp + 2 * norm
  unembed = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + cfg.num_layers * per_layer + norm + unembed


def test_full_size_param_count_under_eval_shape():
  # A Gemma-2-2B-shaped decoder: 2.6B params, built without allocating a byte of them.
  cfg = ModelConfig(vocab_size=256_000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                    head_dim=256, mlp_dim=9216, activation="geglu", logit_softcap=30.0)
  variables = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0),
                                                           jnp.zeros((1, 1), jnp.int32)))
  params = nn.unbox(variables["params"])
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  v, d, s, h, n, k, f = 256_000, 2304, 26, 8, 4, 256, 9216
  by_hand = v * d + s * (d * h * k + 2 * d * n * k + h * k * d + 3 * d * f + 2 * d) + d
  assert by_hand == 2_614_341_888
  assert sum(x.size for x in jax.tree.leaves(params)) == by_hand
  assert cfg.num_params() == by_hand
  assert params["layers"]["attn"]["query"]["kernel"].shape == (s, d, h, k)
  assert params["layers"]["attn"]["key"]["kernel"].shape == (s, d, n, k)
  assert params["layers"]["attn"]["out"]["kernel"].shape == (s, h, k, d)
  assert params["layers"]["mlp"]["down"]["kernel"].shape == (s, f, d)


@pytest.mark.parametrize("cfg", REF_CONFIGS.values(), ids=REF_CONFIGS.keys())
def test_num_params_matches_formula(cfg):
  assert cfg.num_params() == expected_num_params(cfg)


# ----------------------------------------------------------------------------- 10. bf16


def test_bf16_compute_close_to_f32():
  f32_cfg = dataclasses.replace(BASE, d_model=32, num_kv_heads=2)
  bf16_cfg = dataclasses.replace(f32_cfg, dtype="bfloat16")
  _, _, params = build(f32_cfg)  # float32 params drive both (param_dtype stays float32)
  seg, pos = packed_inputs()
  toks = tokens(17)
  want = np.asarray(jit_apply(f32_cfg)(params, toks, seg, pos))
  got = jit_apply(bf16_cfg)(params, toks, seg, pos)
  assert got.dtype == jnp.float32
  got = np.asarray(got)
  assert np.all(np.isfinite(got))
  assert 0.5 < want.std() < 2.0
  # bf16 keeps 8 significand bits: each rounding is <= 2^-9 ~ 0.002 relative. The logits go
  # through ~10 rounded matmul/norm stages (2 layers x attention + MLP, norms, unembedding), and
  # the final bf16 logits themselves are quantised to 2^-8 * |z| ~ 0.01 at |z| ~ 3, so a worst-case
  # error of a few hundredths is expected; 0.1 on std-1 logits is still far below what any real
  # bug (a dropped layer, a wrong head) produces. The mean error must be an order smaller.
  np.testing.assert_allclose(got, want, rtol=0, atol=0.1)
  assert np.abs(got - want).mean() < 0.02
