"""Sampling: KV-cache greedy generation equals argmax decoding by full recompute; left padding is
invisible; top-k / top-p keep what a numpy oracle keeps; sampling is seeded. What decoding runs
(layers unrolled, a cache widened between loops) computes what the full forward computes, and the
compiled decode loop updates its cache in place; kdjax.decode_speed reports sane figures.

The oracle for generation never touches the cache: each step it calls Transformer.apply (the
path that tests/test_model.py checks against a numpy decoder) on the whole of a row's unpadded
sequence so far. Shapes are tiny: B batch, P prompt width, N new tokens, V vocab.
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.quick import first_quick

from kdjax import decode_speed, sample
from kdjax.attention import rope_frequencies, rope_tables
from kdjax.model import KVCache, ModelConfig, Transformer, decode_params

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  mlp_dim=32, max_len=32)

# Between them, every feature the cache must carry: GQA in each; the windows (2, 3) are shorter
# than P + N = 12; global_every=2 mixes local and global layers, scanned and unrolled.
FAMILY_CFGS = {
    "gemma2_scan": dataclasses.replace(
        CFG, num_heads=4, num_kv_heads=2, sliding_window=3, global_every=2, attn_softcap=5.0,
        logit_softcap=3.0, post_norms=True, qk_norm=True, norm_plus_one=True, embed_scale=True,
        query_scale=0.3, activation="geglu"),
    "llama3_window_scan": dataclasses.replace(
        CFG, num_heads=4, num_kv_heads=2, rope_scaling=8.0, rope_original_max_len=8,
        qkv_bias=True, tie_embeddings=False, sliding_window=2),
    "gpt2_unrolled": dataclasses.replace(
        CFG, position_embedding="learned", norm="layernorm", activation="gelu", qkv_bias=True,
        out_bias=True, mlp_bias=True, scan_layers=False, sliding_window=3, global_every=2),
}

# Cached vs full forward: the same math with different key lengths (masked keys weigh exactly 0),
# so only f32 reduction order differs, ~1e-7 relative on O(1) logits (as test_model's SAME_*).
SAME_RTOL, SAME_ATOL = 1e-5, 1e-6


ORACLE_WIDTH = 16  # >= every P + N below


def _init(cfg, seed=3):
  """Params drawn in numpy into the tree `init` builds (traced under eval_shape: an eager init
  costs seconds here): O(1) logits, and biases and norm scales away from their init values."""
  shapes = nn.unbox(jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, x):
    z = rng.standard_normal(x.shape)
    offset = 1.0 if path[-1].key == "scale" and not cfg.norm_plus_one else 0.0
    return jnp.asarray(offset + (0.1 if path[-1].key == "bias" else 0.3) * z, x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def params():
  return _init(CFG)


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg):
  return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))


def _argmax_decode(params, prompt, n, cfg=CFG):
  """Greedy decoding by full recompute of the growing sequence. It sits at the start of a
  fixed ORACLE_WIDTH buffer so that it compiles once: the model is causal (test_model pins that
  bit-exactly), so the filler after the sequence cannot change the logits read at its end."""
  tokens = list(prompt)
  for _ in range(n):
    buffer_1xW = np.zeros((1, ORACLE_WIDTH), np.int32)
    buffer_1xW[0, :len(tokens)] = tokens
    logits_V = _logits_fn(cfg)(params, jnp.asarray(buffer_1xW))[0, len(tokens) - 1]
    tokens.append(int(jnp.argmax(logits_V)))
  return tokens


def test_greedy_equals_argmax_by_full_recompute_with_left_padding(params):
  prompts = [[5, 9, 11, 4], [7]]
  out = np.asarray(sample.generate(CFG, params, sample.left_pad(prompts), max_new_tokens=6))
  width = 4
  for row, prompt in zip(out, prompts):
    expected = _argmax_decode(params, prompt, 6)
    assert row[width - len(prompt):].tolist() == expected


def test_one_token_prompts_need_no_prefill(params):
  out = np.asarray(sample.generate(CFG, params, jnp.asarray([[5], [0]]), max_new_tokens=3,
                                   prompt_lengths_B=np.asarray([1, 1])))
  assert [row.tolist() for row in out] == [_argmax_decode(params, [t], 3) for t in (5, 0)]


@pytest.mark.parametrize("name", first_quick(list(FAMILY_CFGS)))
def test_greedy_kv_cache_equals_full_recompute_across_families(name):
  cfg = FAMILY_CFGS[name]
  p = _init(cfg)
  prompts, n = [[5, 9, 11, 4, 2], [7], [3, 8, 1]], 7
  out = np.asarray(sample.generate(cfg, p, sample.left_pad(prompts), max_new_tokens=n))
  assert out.shape == (3, 5 + n)
  for row, prompt in zip(out, prompts):
    assert row[5 - len(prompt):].tolist() == _argmax_decode(p, prompt, n, cfg)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
@pytest.mark.parametrize("name", ["gemma2_scan"])
def test_cached_forward_in_chunks_equals_full_forward(name):
  """Logits, not just their argmax: a left-padded batch fed as a 3-token prefill, then 1, 1, 1
  and 3 tokens, matches one full forward over the same tokens, segment ids and positions."""
  cfg = FAMILY_CFGS[name]
  p, model = _init(cfg), Transformer(cfg)
  cached = jax.jit(lambda p, t, s, q, c: model.apply({"params": p}, t, s, q, cache=c))
  tokens_BxL = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  segment_ids_BxL = jnp.asarray([[1] * 9, [0] * 3 + [1] * 6], jnp.int32)
  positions_BxL = jnp.asarray([list(range(9)), [0] * 3 + list(range(6))], jnp.int32)
  full_BxLxV = jax.jit(model.apply)({"params": p}, tokens_BxL, segment_ids_BxL, positions_BxL)

  cache, chunks = KVCache.zeros(cfg, 2, 9), []
  for start, stop in ((0, 3), (3, 4), (4, 5), (5, 6), (6, 9)):
    logits, cache = cached(p, tokens_BxL[:, start:stop], segment_ids_BxL[:, start:stop],
                           positions_BxL[:, start:stop], cache)
    chunks.append(logits)
  assert int(cache.index) == 9
  real = np.asarray(segment_ids_BxL) > 0
  np.testing.assert_allclose(np.asarray(jnp.concatenate(chunks, axis=1))[real],
                             np.asarray(full_BxLxV)[real], rtol=SAME_RTOL, atol=SAME_ATOL)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_top_k_one_is_greedy_and_sampling_is_seeded(params):
  prompt = sample.left_pad([[5, 6, 7]])
  greedy = sample.generate(CFG, params, prompt, max_new_tokens=5)
  top1 = sample.generate(CFG, params, prompt, max_new_tokens=5, temperature=1.0, top_k=1,
                         rng=jax.random.key(0))
  np.testing.assert_array_equal(greedy, top1)
  a = sample.generate(CFG, params, prompt, max_new_tokens=5, temperature=1.0,
                      rng=jax.random.key(1))
  b = sample.generate(CFG, params, prompt, max_new_tokens=5, temperature=1.0,
                      rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  # Other keys give other samples (vocab 32, 5 tokens, 4 keys: equal by chance ~never).
  others = [sample.generate(CFG, params, prompt, max_new_tokens=5, temperature=1.0,
                            rng=jax.random.key(k)) for k in (2, 3, 4, 5)]
  assert any(not np.array_equal(a, o) for o in others)


def test_tiny_top_p_is_greedy(params):
  prompt = sample.left_pad([[5, 6, 7]])
  greedy = sample.generate(CFG, params, prompt, max_new_tokens=5)
  nucleus = sample.generate(CFG, params, prompt, max_new_tokens=5, temperature=1.5, top_p=1e-6,
                            rng=jax.random.key(0))
  np.testing.assert_array_equal(greedy, nucleus)


def test_top_k_restricts_samples_to_the_k_most_likely(params):
  prompt = sample.left_pad([[5, 6, 7]])
  logits = _logits_fn(CFG)(params, prompt)[0, -1]
  top3 = set(np.argsort(np.asarray(logits))[-3:].tolist())
  firsts = {int(sample.generate(CFG, params, prompt, max_new_tokens=1, temperature=2.0, top_k=3,
                                rng=jax.random.key(k))[0, -1]) for k in range(30)}
  assert firsts <= top3 and len(firsts) > 1


def _np_kept(logits_V, top_k, top_p):
  """Indices a numpy float64 oracle keeps: top k by value, then the shortest most-likely prefix
  whose renormalised probability reaches top_p."""
  order = np.argsort(-logits_V, kind="stable")[:top_k or len(logits_V)]
  probs = np.exp(logits_V[order] - logits_V[order].max())
  probs /= probs.sum()
  if top_p is None:
    return set(order.tolist())
  mass = np.cumsum(probs)
  # A prefix mass within f32 rounding of top_p would make the answer a coin toss: pick other data.
  assert np.min(np.abs(mass - top_p)) > 1e-5
  n = int(np.searchsorted(mass, top_p)) + 1  # the first prefix with mass >= top_p
  return set(order[:n].tolist())


@pytest.mark.parametrize("top_k,top_p", [(None, 0.3), (None, 0.9), (None, 0.999), (5, 0.7),
                                         (3, None), (None, 1e-9)])
def test_filter_logits_keeps_the_nucleus_a_numpy_oracle_keeps(top_k, top_p):
  # Logits spread over several units, so nuclei range from one token to most of the vocab.
  logits_BxV = np.random.default_rng(1).normal(0.0, 2.0, (8, 40)).astype(np.float32)
  out_BxV = np.asarray(jax.jit(sample.filter_logits, static_argnums=(1, 2))(
      jnp.asarray(logits_BxV), top_k, top_p))
  sizes = set()
  for logits_V, row_V in zip(logits_BxV, out_BxV):
    kept = _np_kept(logits_V.astype(np.float64), top_k, top_p)
    assert set(np.flatnonzero(np.isfinite(row_V)).tolist()) == kept
    np.testing.assert_array_equal(row_V[sorted(kept)], logits_V[sorted(kept)])  # kept unchanged
    sizes.add(len(kept))
  if top_p is not None and top_p > 1e-6:
    assert len(sizes) > 1  # the rows exercise nuclei of different sizes


def test_top_p_samples_stay_in_the_nucleus(params):
  prompt = sample.left_pad([[5, 6, 7]])
  logits_V = np.asarray(_logits_fn(CFG)(params, prompt)[0, -1], np.float64)
  nucleus = _np_kept(logits_V / 2.0, None, 0.5)
  firsts = {int(sample.generate(CFG, params, prompt, max_new_tokens=1, temperature=2.0, top_p=0.5,
                                rng=jax.random.key(k))[0, -1]) for k in range(30)}
  assert firsts <= nucleus and len(firsts) > 1
  with pytest.raises(ValueError, match="top_p"):
    sample.generate(CFG, params, prompt, max_new_tokens=1, temperature=1.0, top_p=0.0)


def test_prompt_lengths_not_token_values_mark_the_padding(params):
  # With a Hugging Face tokenizer 0 may be a real token, and any id may be the filler.
  prompts, filler = [[0, 9, 0], [0], [5, 9, 11, 4]], 7
  lengths = np.asarray([len(p) for p in prompts])
  out = np.asarray(sample.generate(CFG, params, sample.left_pad(prompts, filler),
                                   max_new_tokens=4, prompt_lengths_B=lengths))
  for row, prompt in zip(out, prompts):
    assert row[4 - len(prompt):].tolist() == _argmax_decode(params, prompt, 4)


class _NoBosTokenizer:
  """ids = character codes; no BOS; the pad filler 0 is also a real token ('\\x00')."""

  pad_id, bos_id, eos_id = 0, None, 31

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


def test_generate_texts_starts_without_bos_and_decodes_without_padding(params):
  tok = _NoBosTokenizer()
  texts = sample.generate_texts(CFG, params, tok, ["\x00\x05", "\x09\x0b\x04"], max_new_tokens=3)
  for text, prompt in zip(texts, ([0, 5], [9, 11, 4])):
    assert tok.encode(text) == _argmax_decode(params, prompt, 3)
  with pytest.raises(ValueError, match="no tokens"):
    sample.generate_texts(CFG, params, tok, [""], max_new_tokens=1)


def _cached_logits(cfg, params, tokens_BxL, segment_ids_BxL, positions_BxL, chunks, slots):
  """Logits of the tokens fed to a KVCache chunk by chunk (start, stop), widened to `slots[j]`
  before chunk j, concatenated over the length."""
  model, cache, out = Transformer(cfg), KVCache.zeros(cfg, tokens_BxL.shape[0], slots[0]), []
  step = jax.jit(lambda p, t, s, q, c: model.apply({"params": p}, t, s, q, cache=c))
  for (start, stop), width in zip(chunks, slots):
    cache = cache.widened(width)
    logits, cache = step(params, tokens_BxL[:, start:stop], segment_ids_BxL[:, start:stop],
                         positions_BxL[:, start:stop], cache)
    out.append(logits)
  return np.asarray(jnp.concatenate(out, axis=1))


@pytest.mark.parametrize("name", first_quick(["llama3_window_scan", "gemma2_scan",
                                              "gpt2_unrolled"]))
def test_decode_params_in_widening_chunks_equal_the_full_forward(name):
  """The view decoding runs (decode_params), fed chunk by chunk through a cache that widens
  between chunks (as between decode loops), gives the full forward's logits, left padding
  included.

  The oracle is the full forward in float64: float32 rounding alone moves these logits (soft-
  capped, through post-norms) by a few 1e-6, the float32 full forward's own distance from it, so
  the cached logits must be no further from it than twice that (plus SAME_ATOL).
  """
  cfg = FAMILY_CFGS[name]
  p = _init(cfg)
  d_cfg, d_params = decode_params(cfg, p)
  assert not d_cfg.scan_layers and "layers" not in d_params
  tokens_BxL = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
  segment_ids_BxL = jnp.asarray([[1] * 7, [0] * 2 + [1] * 5], jnp.int32)
  positions_BxL = jnp.asarray([list(range(7)), [0] * 2 + list(range(5))], jnp.int32)
  real = np.asarray(segment_ids_BxL) > 0

  def full(cfg, p):
    return np.asarray(jax.jit(Transformer(cfg).apply)(
        {"params": p}, tokens_BxL, segment_ids_BxL, positions_BxL))[real]

  full_32 = full(cfg, p)
  with jax.enable_x64(True):
    full_64 = full(dataclasses.replace(cfg, dtype="float64", param_dtype="float64"),
                   jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), p))
  cached = _cached_logits(d_cfg, d_params, tokens_BxL, segment_ids_BxL, positions_BxL,
                          [(0, 4), (4, 5), (5, 7)], [5, 5, 7])[real]
  assert np.abs(cached - full_64).max() <= 2 * np.abs(full_32 - full_64).max() + SAME_ATOL


def test_decode_params_leave_the_stored_tree_alone():
  cfg = FAMILY_CFGS["llama3_window_scan"]  # scanned, untied
  p = _init(cfg)
  before = jax.tree.map(np.asarray, p)
  _, d_params = decode_params(cfg, p)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, p))
  for i in range(cfg.num_layers):
    jax.tree.map(lambda u, s, i=i: np.testing.assert_array_equal(u, s[i]),
                 d_params[f"layer_{i}"], p["layers"])
  np.testing.assert_array_equal(d_params["unembed_VxD"], p["unembed"]["kernel"].T)


def test_rope_table_lookup_equals_computed_tables_and_is_nan_past_it():
  inv_freq_K2 = rope_frequencies(CFG)
  positions_BxL = jnp.asarray([[0, 3, 7], [5, 1, 2]], jnp.int32)
  for table, direct in zip(rope_tables(positions_BxL, inv_freq_K2, 8),
                           rope_tables(positions_BxL, inv_freq_K2)):
    np.testing.assert_allclose(np.asarray(table), np.asarray(direct), rtol=1e-6, atol=1e-6)
  assert np.isnan(np.asarray(rope_tables(positions_BxL, inv_freq_K2, 7)[0])[0, 2]).all()


@pytest.mark.parametrize("max_new_tokens", [1, 31, 32, 100, 500])
@pytest.mark.parametrize("num_layers", [1, 8, 12, 40])
def test_decode_spans_cover_every_step_once_in_few_loops(max_new_tokens, num_layers):
  spans = sample.decode_spans(max_new_tokens, num_layers)
  assert spans[0][0] == 0 and spans[-1][1] == max_new_tokens
  assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
  assert len(spans) <= sample.MAX_SPANS
  assert len(spans) == 1 or len(spans) * num_layers <= sample.MAX_LOOP_LAYERS
  assert all(stop - start >= min(sample.MIN_SPAN, max_new_tokens) for start, stop in spans)


def _cache_copies_in_decode_loops(cfg, batch):
  """Copies of a KV-cache-shaped array inside the compiled decode loops' bodies."""
  p = _init(cfg)
  prompt_BxP = jnp.zeros((batch, 4), jnp.int32)
  hlo = sample.generate_step.lower(
      p, prompt_BxP, np.full((batch,), 4, np.int32), jax.random.key_data(jax.random.key(0)),
      cfg=cfg, max_new_tokens=40, temperature=0.0, top_k=None, top_p=None).compile().as_text()
  computations = {m.group(1): m.group(2) for m in re.finditer(
      r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}", hlo, re.S | re.M)}
  bodies = [computations[name] for name in re.findall(r"body=%([\w.\-]+)", hlo)]
  slots = "|".join(str(4 - 1 + stop) for _, stop in sample.decode_spans(40, cfg.num_layers))
  cache = rf"f32\[{batch * cfg.num_kv_heads},({slots}),{cfg.head_size}\]"
  assert bodies and all(re.search(cache, body) for body in bodies)  # the pattern does match
  return sum(len(re.findall(cache + r"\S* copy\(", body)) for body in bodies)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_updates_the_cache_in_place(batch):
  """Each step writes one slot per layer; a copy of a whole cache array in the loop would make a
  step's cost grow with the cache (batch 1 once did: XLA dropped the unit batch axis for the
  attention matmul and duplicated the cache write)."""
  assert _cache_copies_in_decode_loops(CFG, batch) == 0


def test_decode_speed_reports_positive_figures_per_batch_size(params):
  speed = decode_speed.decode_speed(CFG, params, batch_sizes=(1, 3), prompt_tokens=5,
                                    max_new_tokens=4, runs=2)
  assert list(speed) == ["1", "3"]
  for batch, row in speed.items():
    assert row["batch"] == int(batch) and len(row["run_s"]) == 2
    assert row["new_tokens_per_s"] > 0 and row["ms_per_token"] > 0
    assert row["params"] == CFG.num_params()
  np.testing.assert_array_equal(decode_speed.random_prompts(CFG, 3, 5),
                                decode_speed.random_prompts(CFG, 3, 5))
