"""Batched sampling from a model, compiled once per (config, shapes).

Prompts are left-padded; padding gets segment id 0, so real tokens never attend to it, and
positions count from each prompt's first real token. Padding is known from `prompt_lengths_B`,
not from the token value: a Hugging Face tokenizer may use any id, 0 included, for a real token.
(Without lengths, `generate` takes PAD_ID = 0 as padding, which is right for kdjax's own
tokenizer only.) Each new token recomputes the whole prefix: simple and exact, and cheap at the
lengths used for printed samples.

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
from kdjax.model import ModelConfig, Transformer

PAD_ID = 0


def left_pad(prompts: list[list[int]], pad_id: int = PAD_ID) -> jax.Array:
  width = max(len(p) for p in prompts)
  return jnp.asarray([[pad_id] * (width - len(p)) + list(p) for p in prompts], jnp.int32)


def generate_texts(cfg: ModelConfig, params, tokenizer: TextTokenizer, prompts: Sequence[str], *,
                   max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                   rng: jax.Array | None = None, mesh=None) -> list[str]:
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
  out_BxT = np.asarray(generate(
      cfg, params, left_pad(prompt_ids, tokenizer.pad_id), max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, rng=rng, mesh=mesh, prompt_lengths_B=lengths_B))
  width = out_BxT.shape[1] - max_new_tokens
  return [tokenizer.decode(row[width - n:].tolist()) for row, n in zip(out_BxT, lengths_B)]


def generate(cfg: ModelConfig, params, prompt_BxP: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             rng: jax.Array | None = None, mesh=None,
             prompt_lengths_B: jax.Array | np.ndarray | None = None) -> jax.Array:
  """Returns tokens_Bx(P+N): the prompts followed by N sampled tokens (greedy at temperature 0).

  Row b's prompt is its last prompt_lengths_B[b] tokens; without lengths, every token that is
  not PAD_ID (kdjax's tokenizer only).
  """
  rng = jax.random.key(0) if rng is None else rng
  if prompt_lengths_B is None:
    prompt_lengths_B = np.sum(np.asarray(prompt_BxP) != PAD_ID, axis=1)
  prompt_lengths_B = np.asarray(prompt_lengths_B, np.int32)
  kwargs = dict(cfg=cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
  if mesh is None:
    return _generate(params, prompt_BxP, prompt_lengths_B, jax.random.key_data(rng), **kwargs)
  rep = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    return _generate(params, sharding.global_array(np.asarray(prompt_BxP), rep),
                     sharding.global_array(prompt_lengths_B, rep),
                     sharding.global_array(np.asarray(jax.random.key_data(rng)), rep), **kwargs)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k"))
def _generate(params, prompt_BxP, prompt_lengths_B, rng_data, *, cfg: ModelConfig,
              max_new_tokens: int, temperature: float, top_k: int | None) -> jax.Array:
  model = Transformer(cfg)
  b, p = prompt_BxP.shape
  total = p + max_new_tokens
  tokens_BxT = jnp.concatenate(
      [prompt_BxP, jnp.full((b, max_new_tokens), PAD_ID, jnp.int32)], axis=1)
  # Left padding: row b's real tokens are its last prompt_lengths_B[b] prompt positions.
  is_real_BxP = jnp.arange(p)[None, :] >= (p - prompt_lengths_B)[:, None]
  is_real_BxT = jnp.concatenate([is_real_BxP, jnp.ones((b, max_new_tokens), bool)], axis=1)
  segment_ids_BxT = is_real_BxT.astype(jnp.int32)
  positions_BxT = jnp.maximum(jnp.cumsum(is_real_BxT, axis=1) - 1, 0).astype(jnp.int32)
  rng = jax.random.wrap_key_data(rng_data)

  def body(i, carry):
    tokens_BxT, rng = carry
    logits_BxTxV = model.apply({"params": params}, tokens_BxT, segment_ids_BxT, positions_BxT)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, i - 1, axis=1, keepdims=False)
    rng, key = jax.random.split(rng)
    if temperature == 0.0:
      next_B = jnp.argmax(logits_BxV, axis=-1)
    else:
      logits_BxV = logits_BxV / temperature
      if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
      next_B = jax.random.categorical(key, logits_BxV, axis=-1)
    tokens_BxT = jax.lax.dynamic_update_index_in_dim(
        tokens_BxT, next_B.astype(jnp.int32)[:, None], i, axis=1)
    return tokens_BxT, rng

  tokens_BxT, _ = jax.lax.fori_loop(p, total, body, (tokens_BxT, rng))
  if not jax.sharding.get_abstract_mesh().empty:
    tokens_BxT = jax.lax.with_sharding_constraint(tokens_BxT, jax.sharding.PartitionSpec())
  return tokens_BxT
