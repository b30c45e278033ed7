"""Batched sampling from a model (teacher or student) with a KV cache, compiled once per
(config, shapes, sampling settings).

Prompts are left-padded; padding gets segment id 0, so real tokens never attend to it, and
positions count from each prompt's first real token. Padding is known from `prompt_lengths_B`,
not from the token value: a Hugging Face tokenizer may use any id, 0 included, for a real token.
(Without lengths, `generate` takes PAD_ID = 0 as padding, which is right for kdjax's own
tokenizer only.)

Shape letters (the glossary is in kdjax/__init__.py): B batch, V vocab, P prompt tokens, A new
(sampled) tokens, R = P + A a sampled row.

One forward fills a `KVCache` of P + A - 1 slots with all but the last prompt token (their logits
are never computed); then a `lax.scan` feeds one token per step, the last prompt token first,
attending over the cache. Left padding puts every row's last prompt token in the same column, so
the new tokens of all rows share slots.

Sampling follows Hugging Face's order: logits / temperature, then top-k, then top-p (nucleus) on
what top-k kept; temperature 0 is greedy (argmax) and ignores top-k and top-p.

Given a `mesh`, the prompts and the key are placed replicated on it and the tokens come back
replicated, so every process of a multi-host run can read them; the params keep their shardings.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import sharding
from kdjax.data.tokenizer import TextTokenizer
from kdjax.model import KVCache, ModelConfig, Transformer

PAD_ID = 0


def left_pad(prompts: list[list[int]], pad_id: int = PAD_ID) -> jax.Array:
  width = max(len(p) for p in prompts)
  return jnp.asarray([[pad_id] * (width - len(p)) + list(p) for p in prompts], jnp.int32)


def generate_texts(cfg: ModelConfig, params, tokenizer: TextTokenizer, prompts: Sequence[str], *,
                   max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, rng: jax.Array | None = None,
                   mesh=None) -> list[str]:
  """Each prompt followed by its sampled continuation, as text.

  A prompt starts with BOS where the tokenizer has one (as the training documents do); the
  padding is dropped before decoding, since its filler may be a real token.
  """
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  prompt_ids = [bos + tokenizer.encode(p) for p in prompts]
  if not prompt_ids:
    return []
  if empty := [p for p, ids in zip(prompts, prompt_ids) if not ids]:
    raise ValueError(f"prompts {empty} have no tokens and the tokenizer has no BOS to start "
                     "from; give them some text.")
  lengths_B = np.asarray([len(ids) for ids in prompt_ids], np.int32)
  out_BxR = np.asarray(generate(
      cfg, params, left_pad(prompt_ids, tokenizer.pad_id), max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, mesh=mesh,
      prompt_lengths_B=lengths_B))
  width = out_BxR.shape[1] - max_new_tokens
  return [tokenizer.decode(row[width - n:].tolist()) for row, n in zip(out_BxR, lengths_B)]


def generate(cfg: ModelConfig, params, prompt_BxP: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array | None = None, mesh=None,
             prompt_lengths_B: jax.Array | np.ndarray | None = None) -> jax.Array:
  """Returns tokens_BxR: the prompts followed by A = `max_new_tokens` sampled tokens (greedy at
  temperature 0).

  Row b's prompt is its last prompt_lengths_B[b] tokens; without lengths, every token that is
  not PAD_ID (kdjax's tokenizer only). `top_p` in (0, 1] keeps the nucleus (see filter_logits).
  """
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  rng = jax.random.key(0) if rng is None else rng
  if prompt_lengths_B is None:
    prompt_lengths_B = np.sum(np.asarray(prompt_BxP) != PAD_ID, axis=1)
  prompt_lengths_B = np.asarray(prompt_lengths_B, np.int32)
  kwargs = dict(cfg=cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p)
  if mesh is None:
    return _generate(params, prompt_BxP, prompt_lengths_B, jax.random.key_data(rng), **kwargs)
  rep = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    return _generate(params, sharding.global_array(np.asarray(prompt_BxP), rep),
                     sharding.global_array(prompt_lengths_B, rep),
                     sharding.global_array(np.asarray(jax.random.key_data(rng)), rep), **kwargs)


def filter_logits(logits_BxV: jax.Array, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """logits_BxV with every token outside the top k, then outside the nucleus, at -inf.

  The nucleus is the smallest set of most likely tokens whose probability (softmax of what top-k
  kept) reaches top_p; it always holds the most likely token. Tokens tied with its least likely
  member stay too, so the result does not depend on how a sort orders ties.
  """
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p is not None and top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    probs_BxV = jax.nn.softmax(sorted_BxV.astype(jnp.float32), axis=-1)
    # Mass strictly before each sorted token: the first's is 0 < top_p, so it is always kept; a
    # token is kept while the ones before it fall short of top_p.
    before_BxV = jnp.concatenate([jnp.zeros_like(probs_BxV[:, :1]),
                                  jnp.cumsum(probs_BxV[:, :-1], axis=-1)], axis=-1)
    cutoff_Bx1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1,
                         keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def _next_token(logits_BxV, key, temperature: float, top_k: int | None,
                top_p: float | None) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / temperature, top_k, top_p)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def decode(params, prompt_BxP: jax.Array, prompt_lengths_B: jax.Array, key: jax.Array, *,
           cfg: ModelConfig, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None,
           vocab_limit: int = 0) -> jax.Array:
  """The traceable core of `generate` (no jit, no placement): tokens_BxR.

  The training step calls it to let the student sample its own continuations (kdjax.gkd); the
  output keeps whatever sharding the compiler propagates from the prompts. `vocab_limit` > 0
  samples only ids below it (a model's padding rows past the tokenizer, or past the vocabulary
  it shares with another model, are never drawn).
  """
  if max_new_tokens == 0:
    return prompt_BxP
  model = Transformer(cfg)
  b, p = prompt_BxP.shape
  pick = functools.partial(_next_token, temperature=temperature, top_k=top_k, top_p=top_p)
  # Left padding: row b's real tokens are its last prompt_lengths_B[b] prompt positions.
  is_real_BxP = jnp.arange(p)[None, :] >= (p - prompt_lengths_B)[:, None]
  positions_BxP = jnp.maximum(jnp.cumsum(is_real_BxP, axis=1) - 1, 0).astype(jnp.int32)

  cache = KVCache.zeros(cfg, b, p + max_new_tokens - 1)
  if p > 1:  # prefill; the final hidden state is unused, so XLA drops it and no BxPxV exists
    _, cache = model.apply({"params": params}, prompt_BxP[:, :-1],
                           is_real_BxP[:, :-1].astype(jnp.int32), positions_BxP[:, :-1],
                           return_final_hidden=True, cache=cache)

  def step(carry, key):
    token_B, cache = carry
    # The token fed now sits in slot cache.index: row b's position index - (P - len_b).
    position_Bx1 = (cache.index - p + prompt_lengths_B)[:, None].astype(jnp.int32)
    logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None],
                                      jnp.ones((b, 1), jnp.int32), position_Bx1, cache=cache)
    logits_BxV = logits_Bx1xV[:, 0, :vocab_limit] if vocab_limit else logits_Bx1xV[:, 0]
    next_B = pick(logits_BxV, key)
    return (next_B, cache), next_B

  keys_A = jax.random.split(key, max_new_tokens)
  _, new_AxB = jax.lax.scan(step, (prompt_BxP[:, -1].astype(jnp.int32), cache), keys_A)
  return jnp.concatenate([prompt_BxP, new_AxB.T.astype(prompt_BxP.dtype)], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p"))
def _generate(params, prompt_BxP, prompt_lengths_B, rng_data, *, cfg: ModelConfig,
              max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None) -> jax.Array:
  tokens_BxR = decode(params, prompt_BxP, prompt_lengths_B, jax.random.wrap_key_data(rng_data),
                      cfg=cfg, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p)
  if not jax.sharding.get_abstract_mesh().empty:
    tokens_BxR = jax.lax.with_sharding_constraint(tokens_BxR, jax.sharding.PartitionSpec())
  return tokens_BxR
