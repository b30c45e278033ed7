"""Batched sampling from a model (teacher or student) with a KV cache, compiled once per
(config, shapes, sampling settings).

Prompts are left-padded; padding gets segment id 0, so real tokens never attend to it, and
positions count from each prompt's first real token. Padding is known from `prompt_lengths_B`,
not from the token value: a Hugging Face tokenizer may use any id, 0 included, for a real token.
(Without lengths, `generate` takes PAD_ID = 0 as padding, which is right for kdjax's own
tokenizer only.)

Shape letters (the glossary is in kdjax/__init__.py): B batch, V vocab, P prompt tokens, A new
(sampled) tokens, R = P + A a sampled row.

One forward fills a `KVCache` with all but the last prompt token (their logits are never
computed); then `lax.scan` loops feed one token per step, the last prompt token first, attending
over the cache. Left padding puts every row's last prompt token in the same column, so the new
tokens of all rows share slots. The model runs as `model.decode_params` lays it out (layers
unrolled), so each step writes its slot of every layer's cache in place and reads weights and
cache where they lie. A step attends over all of its loop's slots, written or not, so the new
tokens come from a few loops (`decode_spans`), each with a cache just wide enough for its last
step, widened between loops: attention reads about as many slots as are in use, not P + A - 1.

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

from kdjax import quantize, sharding
from kdjax.data.tokenizer import TextTokenizer
from kdjax.teacher_cache.writer import compute_targets as teacher_cache_targets
from kdjax.model import KVCache, ModelConfig, Transformer, decode_params

PAD_ID = 0
# Decode loops (see decode_spans): each at least MIN_SPAN new tokens long, at most MAX_SPANS, and
# at most MAX_LOOP_LAYERS layers compiled across them.
MIN_SPAN = 32
MAX_SPANS = 4
MAX_LOOP_LAYERS = 32


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
             prompt_lengths_B: jax.Array | np.ndarray | None = None,
             record_topk: int = 0) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  """Returns tokens_BxR: the prompts followed by A = `max_new_tokens` sampled tokens (greedy at
  temperature 0). With `record_topk` = J > 0, returns (tokens_BxR, topk): at every new token,
  the model's top-J log-probs (temperature 1, before any filtering) of the distribution it was
  drawn from, and the log-mass outside them (kdjax.teacher_cache's keys, BxAxJ and BxA).

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
                top_p=top_p, record_topk=record_topk)
  if mesh is None:
    return generate_step(params, prompt_BxP, prompt_lengths_B, jax.random.key_data(rng),
                         **kwargs)
  rep = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    return generate_step(params, sharding.global_array(np.asarray(prompt_BxP), rep),
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
           vocab_limit: int = 0, record_topk: int = 0):
  """The traceable core of `generate` (no jit, no placement): tokens_BxR.

  The training step calls it to let the student sample its own continuations (kdjax.gkd); the
  output keeps whatever sharding the compiler propagates from the prompts. `vocab_limit` > 0
  samples only ids below it (a model's padding rows past the tokenizer, or past the vocabulary
  it shares with another model, are never drawn).
  """
  if max_new_tokens == 0:
    return prompt_BxP
  # A quantized student decodes its dequantized weights, a LoRA student its merged ones.
  cfg, params = decode_params(*quantize.float_view(cfg, params))
  model = Transformer(cfg)
  b, p = prompt_BxP.shape
  pick = functools.partial(_next_token, temperature=temperature, top_k=top_k, top_p=top_p)
  # Left padding: row b's real tokens are its last prompt_lengths_B[b] prompt positions.
  is_real_BxP = jnp.arange(p)[None, :] >= (p - prompt_lengths_B)[:, None]
  positions_BxP = jnp.maximum(jnp.cumsum(is_real_BxP, axis=1) - 1, 0).astype(jnp.int32)
  spans = decode_spans(max_new_tokens, cfg.num_layers)

  # Step i writes slot P - 1 + i and attends over slots 0 .. P - 1 + i: a span of steps that
  # stops before step `stop` needs P - 1 + stop slots.
  cache = KVCache.zeros(cfg, b, p - 1 + spans[0][1])
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
    if record_topk:  # what the model's distribution was where it drew next_B
      return (next_B, cache), (next_B, _topk(logits_BxV, record_topk))
    return (next_B, cache), next_B

  keys_A = jax.random.split(key, max_new_tokens)
  token_B, new = prompt_BxP[:, -1].astype(jnp.int32), []
  for start, stop in spans:
    cache = cache.widened(p - 1 + stop)
    (token_B, cache), new_xB = jax.lax.scan(step, (token_B, cache), keys_A[start:stop])
    new.append(new_xB)
  if record_topk:
    new, topk = [n for n, _ in new], [t for _, t in new]
    topk = {k: jnp.swapaxes(jnp.concatenate([t[k] for t in topk]), 0, 1) for k in topk[0]}
  new_AxB = jnp.concatenate(new)
  tokens_BxR = jnp.concatenate([prompt_BxP, new_AxB.T.astype(prompt_BxP.dtype)], axis=1)
  return (tokens_BxR, topk) if record_topk else tokens_BxR


def _topk(logits_BxV: jax.Array, j: int) -> dict[str, jax.Array]:
  """The top-j log-probs of softmax(logits_BxV) and the log-mass of the rest, per row."""
  targets = teacher_cache_targets(logits_BxV[:, None, :], top_k=j)
  return {k: v[:, 0] for k, v in targets.items()}


def decode_spans(max_new_tokens: int, num_layers: int = 1) -> list[tuple[int, int]]:
  """(start, stop) of the decode loops that sample new tokens start .. stop - 1, in order.

  A step attends over every slot of its loop's cache, written or not, so each loop's cache holds
  only the slots its steps reach, and is widened (copied once) for the next: attention reads
  about as many slots as are in use. Each loop compiles its own step, all `num_layers` layers
  unrolled, so there are few: spans of at least MIN_SPAN steps, at most MAX_SPANS of them, and
  fewer for deep models (MAX_LOOP_LAYERS), whose compile time would otherwise grow with them.
  """
  most = max(1, min(MAX_SPANS, MAX_LOOP_LAYERS // num_layers))
  spans = max(1, min(most, max_new_tokens // MIN_SPAN))
  bounds = [round(i * max_new_tokens / spans) for i in range(spans + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "record_topk"))
def generate_step(params, prompt_BxP, prompt_lengths_B, rng_data, *, cfg: ModelConfig,
                  max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, record_topk: int = 0):
  """`generate` compiled: its arrays placed, its settings static (kdjax.aot lowers it too)."""
  out = decode(params, prompt_BxP, prompt_lengths_B, jax.random.wrap_key_data(rng_data),
               cfg=cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
               top_p=top_p, record_topk=record_topk)
  if not jax.sharding.get_abstract_mesh().empty:
    out = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec()), out)
  return out
