"""kdjax.prune and scripts/prune.py: students cut from a teacher.

Oracles are independent of kdjax.prune: a float64 numpy forward of each layer's attention and MLP
(from the normed inputs the model captures) for the activation scores, an argsort per layer and
group for which units are kept, params sliced by hand from an explicit list of each param's head
and neuron axes, and students built by hand from the teacher's layers. Properties: keeping
everything is the identity (bitwise); a layer, key/value group, query head or neuron whose
contribution is exactly zero can be cut without changing the logits.

Tiny shapes: B=2, L=8, V=40, D=16, S=3 layers, H=4 query heads in N=2 groups (K=4), F=12.
"""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import checkpoint, hf, optim, prune, train
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.model import ModelConfig, Transformer
from kdjax.settings import DistillSettings
from kdjax.state import TrainState
from support import scripts_loader
from support.params import random_param  # norm scales and biases away from 1 and 0
from support.quick import first_quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, V = 2, 8, 40

BASE = ModelConfig(vocab_size=V, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2,
                   mlp_dim=12, max_len=16)
CONFIGS = {
    "llama_scan": BASE,
    "qwen_loop": dataclasses.replace(BASE, scan_layers=False, qkv_bias=True, out_bias=True,
                                     mlp_bias=True, qk_norm=True, tie_embeddings=False),
    # Layers local, global, local; soft-caps small enough to bend the scores.
    "gemma2_scan": dataclasses.replace(
        BASE, activation="geglu", norm_plus_one=True, post_norms=True, embed_scale=True,
        query_scale=0.3, attn_softcap=2.0, logit_softcap=5.0, sliding_window=3, global_every=2),
    "gpt2_loop": dataclasses.replace(
        BASE, scan_layers=False, num_kv_heads=4, activation="gelu", norm="layernorm",
        position_embedding="learned", qkv_bias=True, out_bias=True, mlp_bias=True),
}
CFG_IDS = list(CONFIGS)

# f32 model vs f64 oracle on the same f32 inputs: a handful of O(1) products and one softmax per
# value, ~1e-7 relative rounding; 1e-5 leaves 100x headroom and still sees any wrong axis or mask.
REF_RTOL = 1e-5
# kdjax vs kdjax where the math is the same but the program is not (scan vs loop, or a contraction
# that lost exactly-zero terms): only the f32 summation order changes, ~1e-7 on O(1) logits.
SAME_RTOL, SAME_ATOL = 1e-5, 1e-6


def reordered_sums_atol(logits):
  """The absolute error of reordering f32 sums whose terms are no larger than the logits: an
  element near zero that results from cancelling O(max |logit|) terms moves by a few ulps of
  those terms (1.6e-6 seen on the 2-core AMD EPYC of December 7, logits up to 3.7), not of
  itself. A unit cut that was not silent moves logits by orders of magnitude more."""
  return 2e-6 * float(np.abs(logits).max())


# ----------------------------------------------------------------------------- builders


@functools.lru_cache(maxsize=None)
def build(cfg: ModelConfig, seed: int = 0):
  """float32 params with the exact tree `init` makes (traced, not run), drawn in numpy."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])
  return jax.tree_util.tree_map_with_path(
      lambda path, s: np.asarray(random_param(path, s.shape, rng), np.float32), shapes)


@functools.lru_cache(maxsize=None)
def _jit_apply(cfg: ModelConfig):
  return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))


def logits_of(cfg, params, tokens_BxL):
  return np.asarray(_jit_apply(cfg)(params, tokens_BxL))


def tokens(seed=1, b=B, l=L):
  return np.random.default_rng(seed).integers(0, V, size=(b, l)).astype(np.int32)


def layer(cfg, params, i):
  """Layer i's params as numpy, whatever the layout."""
  if cfg.scan_layers:
    return jax.tree.map(lambda x: np.asarray(x)[i], params["layers"])
  return jax.tree.map(np.asarray, params[f"layer_{i}"])


def with_layers(cfg, params, layers):
  """`params` with its layers replaced by the list `layers`, in `cfg`'s layout."""
  rest = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layer_")}
  if cfg.scan_layers:
    return dict(rest, layers=jax.tree.map(lambda *xs: np.stack(xs), *layers))
  return dict(rest, **{f"layer_{i}": p for i, p in enumerate(layers)})


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("name", first_quick(CFG_IDS))
def test_keeping_everything_is_the_identity(name):
  cfg, params, toks = CONFIGS[name], build(CONFIGS[name]), tokens()
  scores = prune.activation_scores(cfg, params, toks)
  s_cfg, s_params = prune.prune_width(cfg, params, scores, num_heads=cfg.num_heads,
                                      num_kv_heads=cfg.num_kv_heads, mlp_dim=cfg.mlp_dim)
  s_cfg, s_params = prune.select_layers(s_cfg, s_params, range(cfg.num_layers))
  assert s_cfg == cfg
  assert_trees_equal(s_params, params)
  np.testing.assert_array_equal(logits_of(s_cfg, s_params, toks), logits_of(cfg, params, toks))
  # None keeps a width as it is.
  assert prune.prune_width(cfg, params, scores)[0] == cfg


# ----------------------------------------------------------------------------- depth


def _zero_layer_output(cfg, p):
  """Layer params whose block adds exactly 0 to the residual stream (post-norms of 0 are 0)."""
  p = jax.tree.map(np.copy, p)
  for sub in (p["attn"]["out"], p["mlp"]["down"]):
    for k in sub:
      sub[k][...] = 0
  return p


@pytest.mark.parametrize("name", CFG_IDS)
def test_selecting_layers_equals_skipping_a_silent_layer(name):
  """Teacher with layer 1 silenced == student of layers [0, 2], each layer keeping its attention
  kind (gemma2: local, global, local -> local, local)."""
  cfg, params, toks = CONFIGS[name], build(CONFIGS[name]), tokens()
  layers = [layer(cfg, params, i) for i in range(3)]
  silent = with_layers(cfg, params, [layers[0], _zero_layer_output(cfg, layers[1]), layers[2]])
  s_cfg, s_params = prune.select_layers(cfg, silent, [0, 2])
  assert s_cfg.num_layers == 2
  assert [s_cfg.is_local(j) for j in range(2)] == [cfg.is_local(0), cfg.is_local(2)]
  np.testing.assert_array_equal(logits_of(s_cfg, s_params, toks), logits_of(cfg, silent, toks))


@pytest.mark.parametrize("name", CFG_IDS)
def test_selected_layers_equal_a_student_built_by_hand(name):
  """The student from layers [0, 2] vs one built by hand in the loop layout from those layers."""
  cfg, params, toks = CONFIGS[name], build(CONFIGS[name]), tokens()
  s_cfg, s_params = prune.select_layers(cfg, params, [0, 2])
  by_hand_cfg = dataclasses.replace(cfg, num_layers=2, scan_layers=False,
                                    global_every=0 if cfg.sliding_window else cfg.global_every)
  rest = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layer_")}
  by_hand = dict(rest, layer_0=layer(cfg, params, 0), layer_1=layer(cfg, params, 2))
  assert s_cfg == dataclasses.replace(by_hand_cfg, scan_layers=cfg.scan_layers)
  if not cfg.scan_layers:
    assert_trees_equal(s_params, by_hand)
  np.testing.assert_allclose(logits_of(s_cfg, s_params, toks),
                             logits_of(by_hand_cfg, by_hand, toks), SAME_RTOL, SAME_ATOL)


def test_selected_layers_keep_their_local_or_global_kind():
  # Gemma 2's pattern: local, global, local, global. (Loop layout: no arrays to cut, so fast.)
  cfg = dataclasses.replace(BASE, num_layers=4, sliding_window=3, global_every=2,
                            scan_layers=False)
  params = build(cfg)
  for keep, global_every in (([0, 1, 2, 3], 2), ([0, 2], 0), ([1, 3], 1), ([0, 1], 2),
                             ([0, 3], 2), ([0, 2, 3], 3), ([2], 2), ([3], 1)):
    s_cfg, _ = prune.select_layers(cfg, params, keep)
    assert (s_cfg.num_layers, s_cfg.global_every, s_cfg.sliding_window) == (
        len(keep), global_every, 3), keep
    assert [s_cfg.is_local(j) for j in range(len(keep))] == [cfg.is_local(i) for i in keep]
  for keep in ([1, 2], [0, 1, 3], [1, 2, 3]):  # G L, L G G, G L G: no period expresses them
    with pytest.raises(ValueError, match="local"):
      prune.select_layers(cfg, params, keep)
  for keep in ([], [2, 0], [0, 0], [4], [-1]):
    with pytest.raises(ValueError, match="ascending"):
      prune.select_layers(cfg, params, keep)


# ----------------------------------------------------------------------------- scores


def np_rms(x, scale, plus_one, eps):
  x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return x * (1.0 + scale if plus_one else scale)


def np_rope(x_BxLxHxK, theta):
  k = x_BxLxHxK.shape[-1]
  angles = np.arange(x_BxLxHxK.shape[1])[:, None] * theta ** (-2.0 * np.arange(k // 2) / k)
  cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
  x1, x2 = x_BxLxHxK[..., :k // 2], x_BxLxHxK[..., k // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_gelu(x):  # the tanh approximation, as jax.nn.gelu's default
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_head_sq(cfg, a, x_BxLxD, local):
  """Mean square of each query head's attention output, from the normed input x_BxLxD."""
  def proj(name):
    y = np.einsum("bld,dhk->blhk", x_BxLxD, a[name]["kernel"])
    return y + a[name]["bias"] if cfg.qkv_bias else y
  q, k, v = proj("query"), proj("key"), proj("value")
  if cfg.qk_norm:
    q = np_rms(q, a["q_norm"]["scale"], cfg.norm_plus_one, cfg.norm_eps)
    k = np_rms(k, a["k_norm"]["scale"], cfg.norm_plus_one, cfg.norm_eps)
  if cfg.position_embedding == "rope":
    q, k = np_rope(q, cfg.rope_theta), np_rope(k, cfg.rope_theta)
  behind = np.arange(L)[:, None] - np.arange(L)[None, :]  # query l, key m: l - m
  allowed = (behind >= 0) & ((behind < cfg.sliding_window) if local else True)
  out = np.zeros((q.shape[2],))
  for h in range(cfg.num_heads):
    kv = h // (cfg.num_heads // cfg.num_kv_heads)
    s = np.einsum("blk,bmk->blm", q[:, :, h], k[:, :, kv]) * (
        cfg.query_scale or cfg.head_size ** -0.5)
    if cfg.attn_softcap:
      s = cfg.attn_softcap * np.tanh(s / cfg.attn_softcap)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("blm,bmk->blk", p / p.sum(-1, keepdims=True), v[:, :, kv])
    out[h] = np.mean(o ** 2)
  return out


def np_neuron_sq(cfg, m, x_BxLxD):
  def dense(name):
    y = x_BxLxD @ m[name]["kernel"]
    return y + m[name]["bias"] if cfg.mlp_bias else y
  act = {"swiglu": lambda z: z / (1 + np.exp(-z)), "geglu": np_gelu, "gelu": np_gelu,
         "relu": lambda z: np.maximum(z, 0)}[cfg.activation]
  h = act(dense("gate")) * dense("up") if "gate" in m else act(dense("up"))
  return np.mean(h ** 2, axis=(0, 1))


@pytest.mark.parametrize("name", CFG_IDS)
def test_scores_match_a_numpy_forward_of_each_layer(name):
  cfg, params, toks = CONFIGS[name], build(CONFIGS[name]), tokens()
  # The normed inputs of each layer's attention and MLP, captured (not sown) from the teacher.
  capture = jax.jit(lambda p, t: Transformer(cfg).apply(
      {"params": p}, t, mutable=["intermediates"],
      capture_intermediates=lambda module, _: module.name in ("attn_norm", "mlp_norm"))[1])
  inter = capture(params, toks)["intermediates"]

  def captured(module, i):
    x = np.asarray((inter["layers"] if cfg.scan_layers else inter[f"layer_{i}"])[module][
        "__call__"][0], np.float64)
    return x[i] if cfg.scan_layers else x

  scores = prune.activation_scores(cfg, params, toks)
  for i in range(3):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), layer(cfg, params, i))
    np.testing.assert_allclose(
        scores["heads"][i], np_head_sq(cfg, p["attn"], captured("attn_norm", i), cfg.is_local(i)),
        rtol=REF_RTOL)
    np.testing.assert_allclose(
        scores["neurons"][i], np_neuron_sq(cfg, p["mlp"], captured("mlp_norm", i)), rtol=REF_RTOL)


def test_scores_refuse_padding():
  segment_ids = np.ones((B, L), np.int32)
  segment_ids[1, 5:] = 0
  with pytest.raises(ValueError, match="padding"):
    prune.activation_scores(BASE, build(BASE), tokens(), segment_ids)


# ----------------------------------------------------------------------------- width


def oracle_units(scores_H, scores_F, h, n, new_h, new_n, new_f):
  """Kept (query heads, key/value heads, neurons) by argsort: the top new_n groups by summed
  score, the top new_h / new_n heads inside each, the top new_f neurons; all ascending."""
  g = h // n
  groups = sorted(np.argsort([scores_H[j * g:(j + 1) * g].sum() for j in range(n)])[::-1][:new_n])
  heads = sorted(j * g + int(i) for j in groups
                 for i in np.argsort(scores_H[j * g:(j + 1) * g])[::-1][:new_h // new_n])
  return np.array(heads), np.array(groups), np.sort(np.argsort(scores_F)[::-1][:new_f])


def sliced_layer(p, heads, kvs, neurons):
  """Teacher layer params cut by hand: each param's head, key/value head and neuron axes."""
  p = jax.tree.map(np.copy, p)
  a, m = p["attn"], p["mlp"]
  a["query"]["kernel"] = a["query"]["kernel"][:, heads]
  a["out"]["kernel"] = a["out"]["kernel"][heads]
  for kv in ("key", "value"):
    a[kv]["kernel"] = a[kv]["kernel"][:, kvs]
  for name, idx in (("query", heads), ("key", kvs), ("value", kvs)):
    if "bias" in a[name]:
      a[name]["bias"] = a[name]["bias"][idx]
  for name in ("gate", "up"):
    if name in m:
      m[name]["kernel"] = m[name]["kernel"][:, neurons]
      if "bias" in m[name]:
        m[name]["bias"] = m[name]["bias"][neurons]
  m["down"]["kernel"] = m["down"]["kernel"][neurons]
  return p


def _targets(cfg):
  """(num_heads, num_kv_heads) cases: within groups, and whole groups; MHA has groups of one."""
  if cfg.num_kv_heads == cfg.num_heads:
    return [(2, 2), (3, 3)]
  return [(2, None), (2, 1), (1, 1)]


@pytest.mark.parametrize("name", CFG_IDS)
def test_width_pruning_keeps_the_top_scored_units(name):
  cfg, params, toks = CONFIGS[name], build(CONFIGS[name]), tokens()
  scores = prune.activation_scores(cfg, params, toks)
  for row in (*scores["heads"], *scores["neurons"]):  # the oracle needs a strict order
    assert len(np.unique(row)) == len(row)
  new_f = 5
  for new_h, new_n in _targets(cfg):
    s_cfg, s_params = prune.prune_width(cfg, params, scores, num_heads=new_h,
                                        num_kv_heads=new_n, mlp_dim=new_f)
    new_n = cfg.num_kv_heads if new_n is None else new_n
    assert s_cfg == dataclasses.replace(cfg, num_heads=new_h, num_kv_heads=new_n, mlp_dim=new_f,
                                        head_dim=cfg.head_size)
    want = [sliced_layer(layer(cfg, params, i), *oracle_units(
        scores["heads"][i], scores["neurons"][i], cfg.num_heads, cfg.num_kv_heads, new_h, new_n,
        new_f)) for i in range(3)]
    assert_trees_equal(s_params, with_layers(cfg, params, want))


def _silenced(cfg, params, kv_head, out_heads, neurons):
  """Teacher params where `kv_head`'s values (so its whole group's outputs), the `out_heads`'
  output projections and the `neurons`' up projections are zero in every layer."""
  layers = []
  for i in range(cfg.num_layers):
    p = jax.tree.map(np.copy, layer(cfg, params, i))
    for k in p["attn"]["value"]:
      p["attn"]["value"][k][..., kv_head, :] = 0
    p["attn"]["out"]["kernel"][out_heads] = 0
    for k in p["mlp"]["up"]:
      p["mlp"]["up"][k][..., neurons] = 0
    layers.append(p)
  return with_layers(cfg, params, layers)


@pytest.mark.parametrize("name", first_quick(CFG_IDS))
def test_cutting_silent_units_leaves_the_logits_unchanged(name):
  cfg, toks = CONFIGS[name], tokens()
  g = cfg.num_heads // cfg.num_kv_heads
  # Key/value head 0 silences heads 0..g-1; out rows silence head g+1 (GQA) alone.
  out_heads = [g + 1] if g > 1 else []
  teacher = _silenced(cfg, build(cfg), kv_head=0, out_heads=out_heads, neurons=[1, 5])
  t_logits = logits_of(cfg, teacher, toks)
  scores = {k: np.array(v) for k, v in prune.activation_scores(cfg, teacher, toks).items()}
  # The sown scores see the silent group and neurons (their outputs are exactly zero)...
  assert np.all(scores["heads"][:, :g] == 0) and np.all(scores["heads"][:, g:] > 0)
  assert np.all(scores["neurons"][:, [1, 5]] == 0)
  s_cfg, s_params = prune.prune_width(cfg, teacher, scores, num_kv_heads=cfg.num_kv_heads - 1,
                                      num_heads=cfg.num_heads - g, mlp_dim=cfg.mlp_dim - 2)
  # ...and cutting them changes only the order of f32 sums: no term that was not zero is lost.
  np.testing.assert_allclose(logits_of(s_cfg, s_params, toks), t_logits, SAME_RTOL,
                             reordered_sums_atol(t_logits))
  if out_heads:
    # Head g+1's output projection is zero but its output is not, so its score is not: rank it
    # last in its group by hand. Groups 1.. (N = 2 here: group 1) then keep G - 1 heads each.
    scores["heads"][:, out_heads] = 0.0
    s_cfg, s_params = prune.prune_width(cfg, teacher, scores, num_kv_heads=cfg.num_kv_heads - 1,
                                        num_heads=(cfg.num_kv_heads - 1) * (g - 1))
    np.testing.assert_allclose(logits_of(s_cfg, s_params, toks), t_logits, SAME_RTOL,
                               reordered_sums_atol(t_logits))


def test_width_arguments_are_checked():
  scores = {"heads": np.ones((3, 4)), "neurons": np.ones((3, 12))}
  params = build(BASE)
  for kw in (dict(num_heads=3), dict(num_heads=6, num_kv_heads=3), dict(num_kv_heads=0),
             dict(num_heads=4, num_kv_heads=1), dict(mlp_dim=13), dict(mlp_dim=0)):
    with pytest.raises(ValueError, match="prune_width"):
      prune.prune_width(BASE, params, scores, **kw)
  with pytest.raises(ValueError, match="shapes"):
    prune.prune_width(BASE, params, {"heads": np.ones((2, 4)), "neurons": np.ones((3, 12))})
  with pytest.raises(ValueError, match="finite"):
    prune.prune_width(BASE, params, {"heads": np.full((3, 4), np.nan), "neurons": np.ones((3, 12))})


# ----------------------------------------------------------------------------- students


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_a_pruned_student_trains_with_the_teacher():
  t_cfg, t_params, toks = BASE, build(BASE), tokens()
  scores = prune.activation_scores(t_cfg, t_params, toks)
  s_cfg, s_params = prune.prune_width(t_cfg, t_params, scores, num_heads=2, mlp_dim=6)
  s_cfg, s_params = prune.select_layers(s_cfg, s_params, [0, 2])
  tc = ml_collections.ConfigDict(dict(steps=10, learning_rate=1e-2, warmup_steps=0,
                                     end_lr_fraction=1.0, weight_decay=0.0, grad_clip=1.0,
                                     b1=0.9, b2=0.95))
  tx, schedule = optim.make_optimizer(tc), optim.make_schedule(tc)
  # The pruned params have exactly the tree and shapes `init` builds for the new config.
  init_shapes = jax.eval_shape(
      lambda: Transformer(s_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  assert jax.tree.map(jnp.shape, nn.unbox(init_shapes["params"])) == jax.tree.map(jnp.shape,
                                                                                  s_params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=s_params,
                           opt_state=tx.init(s_params), rng=jax.random.key_data(jax.random.key(0)),
                           skipped_steps=jnp.zeros((), jnp.int32),
                           nonfinite_streak=jnp.zeros((), jnp.int32))
  step = jax.jit(train.make_train_step(s_cfg, tx, schedule, t_cfg=t_cfg,
                                       distill=DistillSettings(alpha=0.5)))
  batch = {"inputs": toks, "targets": np.roll(toks, -1, axis=1),
           "segment_ids": np.ones((B, L), np.int32),
           "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)),
           "mask": np.ones((B, L), np.float32)}
  losses = []
  for _ in range(3):
    state, metrics = step(state, t_params, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert int(state.skipped_steps) == 0


def test_save_and_load_round_trip(tmp_path):
  cfg, params = CONFIGS["qwen_loop"], build(CONFIGS["qwen_loop"])
  prune.save_model(str(tmp_path / "s"), cfg, params)
  with open(tmp_path / "s" / prune.CONFIG_FILE) as f:
    assert json.load(f) == dataclasses.asdict(cfg)
  l_cfg, l_params = prune.load_model(str(tmp_path / "s"))
  assert l_cfg == cfg
  assert_trees_equal(l_params, params)
  with pytest.raises(FileExistsError):
    prune.save_model(str(tmp_path / "s"), cfg, params)


# ----------------------------------------------------------------------------- script


def _script():
  return scripts_loader.load("prune")


def test_script_cuts_a_phase_checkpoint_teacher(tmp_path):
  """A kdjax teacher phase's checkpoint in, a smaller student that loads and runs out."""
  script = _script()
  t_cfg, t_params = BASE, build(BASE)
  # What a teacher phase saves; only the params and the run config matter here.
  state = TrainState(step=jnp.zeros((), jnp.int32), params=t_params, opt_state={},
                           rng=jax.random.key_data(jax.random.key(0)),
                           skipped_steps=jnp.zeros((), jnp.int32),
                           nonfinite_streak=jnp.zeros((), jnp.int32))
  ckpts = checkpoint.PhaseCheckpoints(str(tmp_path / "teacher"))
  ckpts.save(5, state, {}, {"teacher": dataclasses.asdict(t_cfg)})
  ckpts.wait()
  ckpts.close()

  cfg, params = script.load_phase_checkpoint(str(tmp_path / "teacher"), "teacher")
  assert cfg == t_cfg
  assert_trees_equal(params, t_params)
  # Two equal batches and a leftover row: averaging equal batches gives the batch's own scores,
  # and the leftover (which would change them) is left out.
  batch = tokens(seed=2)
  calibration = np.concatenate([batch, batch, tokens(seed=3, b=1)])
  mean = script.mean_scores(cfg, params, calibration, B)
  want = prune.activation_scores(cfg, params, batch)
  for k in want:
    np.testing.assert_allclose(mean[k], want[k], rtol=SAME_RTOL)
  s_cfg, s_params = script.prune_teacher(cfg, params, keep_layers=[0, 2], num_heads=2,
                                         mlp_dim=8, calibration_RxL=calibration, batch_size=B)
  script.save_model(str(tmp_path / "student"), s_cfg, s_params, "")
  assert os.path.isfile(tmp_path / "student" / "config.json")  # a Hugging Face directory
  l_cfg, l_params = script.load_model(str(tmp_path / "student"))
  assert l_cfg == dataclasses.replace(s_cfg, family="llama")
  assert_trees_equal(l_params, s_params)
  assert (l_cfg.num_layers, l_cfg.num_heads, l_cfg.num_kv_heads, l_cfg.mlp_dim) == (2, 2, 2, 8)
  logits = logits_of(l_cfg, l_params, tokens())
  assert logits.shape == (B, L, V) and np.all(np.isfinite(logits))


def test_script_text_calibration_is_the_text_in_bos_led_rows(tmp_path):
  tok_path = tmp_path / "tok.model"
  tok_path.write_bytes(tokenizer_lib.train(["alpha beta gamma delta epsilon"] * 50, 300))
  text = "alpha beta gamma delta epsilon. " * 40
  (tmp_path / "text.txt").write_text(text)
  rows = _script().text_calibration(str(tmp_path / "text.txt"), str(tok_path), 3, 6)
  assert rows.shape == (3, 6) and np.all(rows[:, 0] == tokenizer_lib.BOS_ID)
  tok = tokenizer_lib.Tokenizer.load(tok_path)
  assert tok.decode(rows[:, 1:].ravel()) == text[:len(tok.decode(rows[:, 1:].ravel()))]
  assert np.all(rows[:, 1:] > tokenizer_lib.EOS_ID)


@pytest.mark.slow
def test_script_command_line(tmp_path):
  prune.save_model(str(tmp_path / "t"), BASE, build(BASE))
  np.save(tmp_path / "calib.npy", tokens(seed=3, b=4))
  out = subprocess.run(
      [sys.executable, "scripts/prune.py", f"--teacher={tmp_path / 't'}",
       f"--output={tmp_path / 's'}", "--keep_layers=0,2", "--num_heads=2", "--mlp_dim=6",
       f"--calibration={tmp_path / 'calib.npy'}", "--batch_size=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=scripts_loader.subprocess_env(JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["student"]["num_layers"] == 2 and summary["student"]["mlp_dim"] == 6
  assert summary["student_params"] < summary["teacher_params"]
  assert hf.model_config(str(tmp_path / "s")) == dataclasses.replace(
      ModelConfig.from_dict(summary["student"]), family="llama")
