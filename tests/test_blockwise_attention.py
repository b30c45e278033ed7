"""kdjax.blockwise_attention: the same attention as the plain form, without its [B, H, L, L] scores.

The oracle is numpy in float64: softmax(q k^T * scale) over the allowed keys, times v, per query
head with its key/value head. Gradients are compared with the plain einsum form's (JAX autodiff
of a different program), and the model with attention_impl='blockwise' with the default one.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import attention, config_check
from kdjax.blockwise_attention import blockwise_attention
from kdjax.model import ModelConfig, Transformer


def numpy_attention(q, k, v, mask, scale, cap=0.0):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, l, h, kd = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for head in range(h):
    s = np.einsum("bqk,bsk->bqs", q[:, :, head], k[:, :, head // g]) * scale
    if cap > 0:
      s = cap * np.tanh(s / cap)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, :, head] = np.einsum("bqs,bsk->bqk", p, v[:, :, head // g])
  return out


def inputs(b=2, l=37, h=4, n=2, kd=8, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, l, heads, kd)).astype(np.float32) for heads in (h, n, n))
  # Row 0 one document; row 1 three packed documents and trailing padding (segment 0).
  segments = np.ones((b, l), np.int32)
  segments[1] = np.repeat([1, 2, 3, 0], [10, 15, 7, l - 32])
  return q, k, v, np.asarray(attention.attention_mask(jnp.asarray(segments)))


# Blocks that divide L = 37 unevenly, with and without the soft-cap, and one block for all of L.
@pytest.mark.parametrize("block, cap", [(8, 0.0), (16, 5.0), (64, 0.0)])
def test_matches_numpy_for_any_block_size_packed_documents_and_soft_cap(block, cap):
  q, k, v, mask = inputs()
  got = blockwise_attention(q, k, v, mask, 0.35, block, cap)
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, mask, 0.35, cap),
                             rtol=2e-5, atol=2e-6)


def test_matches_numpy_with_a_sliding_window():
  q, k, v, mask = inputs()
  positions = np.broadcast_to(np.arange(mask.shape[1]), mask.shape[:2])
  local = np.asarray(attention.local_mask(jnp.asarray(mask), jnp.asarray(positions), 5))
  got = blockwise_attention(q, k, v, local, 0.35, 8)
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, local, 0.35),
                             rtol=2e-5, atol=2e-6)


def test_gradients_equal_the_plain_forms():
  q, k, v, mask = inputs(seed=1)
  w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)

  def plain(q, k, v):  # the layer's default ('xla'): jax.nn.dot_product_attention
    return jnp.sum(w * jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=0.35))

  def blocks(q, k, v):
    return jnp.sum(w * blockwise_attention(q, k, v, mask, 0.35, 16))

  want = jax.grad(plain, argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(blocks, argnums=(0, 1, 2)))(q, k, v)
  for g, w_ in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_keep_float32_scores():
  q, k, v, mask = inputs()
  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  got = blockwise_attention(q16, k16, v16, mask, 0.35, 16)
  assert got.dtype == jnp.bfloat16
  want = numpy_attention(*(np.asarray(x, np.float32) for x in (q16, k16, v16)), mask, 0.35)
  # The only bf16 roundings: q * scale, the probabilities before p @ v, and the output.
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=3e-2, atol=3e-2)


def test_no_score_tensor_spans_the_whole_sequence():
  """The point of the blocks: no intermediate holds L x L scores per head."""
  b, l, h, kd, block = 1, 96, 2, 8, 32
  q, k, v, mask = (jnp.zeros((b, l, h, kd)),) * 3 + (attention.attention_mask(
      jnp.ones((b, l), jnp.int32)),)

  def hlo(attention):
    return jax.jit(jax.grad(lambda q: attention(q).sum())).lower(q).compile().as_text()

  plain = hlo(lambda q: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None]))
  blocks = hlo(lambda q: blockwise_attention(q, k, v, mask, 1.0, block))
  whole = re.compile(rf"f32\[[\d,]*{l},{l}\]")  # any tensor ending in L x L
  assert whole.search(plain)  # the check would see them
  assert not whole.search(blocks), whole.search(blocks)
  assert f"f32[{b},{h},1,{block},{block}]" in blocks  # the block pairs' scores


def test_model_with_blockwise_attention_gives_the_same_logits_and_gradients():
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=48, max_len=24)
  blockwise = dataclasses.replace(cfg, attention_impl="blockwise", attention_block_size=8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 21)), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(0), tokens)["params"]

  @jax.jit
  def logits_and_grads(params):
    def loss(params, model_cfg):
      logits = Transformer(model_cfg).apply({"params": params}, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)), logits
    return [jax.grad(loss, has_aux=True)(params, c)[::-1] for c in (cfg, blockwise)]

  want, got = logits_and_grads(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4,
                                                        atol=1e-5), want, got)


def test_cudnn_asks_jax_for_cudnns_kernel(monkeypatch):
  """Only a GPU can run it; the layer's part is to ask for it."""
  calls = []

  def record(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return jnp.zeros(args[0].shape, args[0].dtype)

  monkeypatch.setattr(jax.nn, "dot_product_attention", record)
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=48, max_len=8, scan_layers=False)
  tokens = jnp.zeros((1, 8), jnp.int32)
  for impl in ("xla", "cudnn"):
    model = Transformer(dataclasses.replace(cfg, attention_impl=impl))
    model.apply(model.init(jax.random.key(0), tokens), tokens)
  assert calls and set(calls[:len(calls) // 2]) == {None} and set(calls[len(calls) // 2:]) == {
      "cudnn"}


@pytest.mark.parametrize("update, message", [
    (dict(attention_impl="flash"), "student.attention_impl: unknown 'flash'"),
    (dict(attention_block_size=0), "student.attention_block_size: must be a positive"),
    (dict(attention_impl="cudnn"), "student.attention_impl: 'cudnn' needs dtype bfloat16"),
])
def test_bad_attention_settings_are_refused_naming_the_field(update, message):
  cfg = dataclasses.asdict(ModelConfig())
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check_model({**cfg, **update}, "student")
