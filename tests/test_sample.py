"""Sampling: greedy equals step-by-step argmax by full recompute; left padding is invisible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import sample
from kdjax.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  mlp_dim=32, max_len=32)


@pytest.fixture(scope="module")
def params():
  return Transformer(CFG).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]


def _argmax_decode(params, prompt, n):
  tokens = list(prompt)
  for _ in range(n):
    logits = Transformer(CFG).apply({"params": params}, jnp.asarray([tokens], jnp.int32))
    tokens.append(int(jnp.argmax(logits[0, -1])))
  return tokens


def test_greedy_equals_argmax_by_full_recompute_with_left_padding(params):
  prompts = [[5, 9, 11, 4], [7]]
  out = np.asarray(sample.generate(CFG, params, sample.left_pad(prompts), max_new_tokens=6))
  width = 4
  for row, prompt in zip(out, prompts):
    expected = _argmax_decode(params, prompt, 6)
    assert row[width - len(prompt):].tolist() == expected


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


def test_top_k_restricts_samples_to_the_k_most_likely(params):
  prompt = sample.left_pad([[5, 6, 7]])
  logits = Transformer(CFG).apply({"params": params}, prompt)[0, -1]
  top3 = set(np.argsort(np.asarray(logits))[-3:].tolist())
  firsts = {int(sample.generate(CFG, params, prompt, max_new_tokens=1, temperature=2.0, top_k=3,
                                rng=jax.random.key(k))[0, -1]) for k in range(30)}
  assert firsts <= top3 and len(firsts) > 1


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
