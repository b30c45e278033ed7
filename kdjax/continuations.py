"""The teacher's continuations of prompts, for sequence-level distillation (Kim & Rush, 2016).

Generation needs a model, so it lives here, above kdjax.data: `write_sequence_data` (behind
`scripts/teacher_answers.py --from_documents=N`) takes prompts from
kdjax.data.teacher_text.prompts_from_source, continues them with the teacher here, and stores the
texts with kdjax.data.teacher_text.write_dataset.

Shape letters as in kdjax's glossary: B batch, P prompt width (with left padding), A new tokens,
R = P + A.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from kdjax import experiment, inputs, preflight, sample, sharding, teacher_cache
from kdjax.data import teacher_text
from kdjax.data.tokenizer import TextTokenizer
from kdjax.model import ModelConfig


def _left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int) -> np.ndarray:
  """prompt_BxP at a fixed width P (sample.left_pad takes the batch's own): one program for all
  batches, whatever their longest prompt."""
  prompt_BxP = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in zip(prompt_BxP, prompts):
    row[width - len(prompt):] = prompt
  return prompt_BxP


def _cut_at_eos(new_ids: Sequence[int], eos_id: int | None) -> list[int]:
  new_ids = [int(i) for i in new_ids]
  if eos_id is not None and eos_id in new_ids:
    return new_ids[:new_ids.index(eos_id)]
  return new_ids


def continuation_ids(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, pad_id: int, eos_id: int | None,
                     temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, batch_size: int = 64,
                     rng: jax.Array | None = None, mesh=None) -> list[list[int]]:
  """For each prompt, its ids followed by the sampled new ids up to (without) the first eos_id.

  Batches of `batch_size` prompts go through sample.generate, left-padded to the longest prompt
  of all; the last batch is filled up with copies of its last prompt (their outputs dropped), so
  every batch has one shape and one compiled program serves them all. Batch i samples with
  fold_in(rng, i): the texts depend on (rng, prompts, batch_size), not on anything else.
  Temperature 0 is greedy, where top-k and top-p have no effect; top_k 0 and top_p 1.0 are off,
  as None is.
  """
  if not prompts:
    return []
  if empty := [i for i, p in enumerate(prompts) if not p]:
    raise ValueError(f'prompts {empty[:5]} have no tokens; every prompt needs at least one.')
  rng = jax.random.key(0) if rng is None else rng
  # One spelling of "off" for each, so equal settings share one compiled program.
  top_k, top_p = top_k or None, None if top_p is None or top_p >= 1.0 else top_p
  width = max(len(p) for p in prompts)
  out: list[list[int]] = []
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    batch = list(prompts[start:start + batch_size])
    real = len(batch)
    batch += [batch[-1]] * (batch_size - real)
    tokens_BxR = np.asarray(sample.generate(
        cfg, params, _left_pad(batch, width, pad_id), max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.fold_in(rng, i),
        mesh=mesh, prompt_lengths_B=np.asarray([len(p) for p in batch], np.int32)))
    for prompt, new_A in zip(batch[:real], tokens_BxR[:real, width:]):
      out.append([int(t) for t in prompt] + _cut_at_eos(new_A, eos_id))
  return out


def decode(tokenizer: TextTokenizer, ids: Sequence[int]) -> str:
  """Text of ids, without the ids past the tokenizer's vocabulary: a teacher whose vocab_size is
  padded past the tokenizer's may (rarely) sample one, and no tokenizer can decode it."""
  return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])


def generate_continuations(cfg: ModelConfig, params, tokenizer: TextTokenizer,
                           prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                           temperature: float = 1.0, top_k: int | None = None,
                           top_p: float | None = None, batch_size: int = 64,
                           rng: jax.Array | None = None, mesh=None) -> list[str]:
  """Each prompt and its sampled continuation (cut at the tokenizer's EOS), as text; see
  continuation_ids."""
  ids = continuation_ids(
      cfg, params, prompts, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
      eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
      batch_size=batch_size, rng=rng, mesh=mesh)
  return [decode(tokenizer, row) for row in ids]


def write_sequence_data(config: Any, workdir: str, out: str, *, num_prompts: int,
                        prompt_tokens: int, max_new_tokens: int | None, temperature: float,
                        top_k: int, top_p: float, batch_size: int) -> dict:
  """The teacher of `config`'s run continues the first `prompt_tokens` ids (after BOS) of
  `num_prompts` training documents drawn with config.seed; prompt and continuation are stored as
  a teacher_text dataset at `out` (never overwritten) that `distill.sequence_data=out` trains on.
  By default a prompt and its continuation fill config.data.seq_len tokens, one training row.
  Returns a summary (path, examples, tokens, new tokens per second)."""
  preflight.preflight(config, workdir, ("distilled",), teacher_only=True)
  if os.path.exists(out):  # before loading anything
    raise ValueError(f"{out} exists; teacher text is never overwritten: remove it or pass "
                     "another --out.")
  src = inputs.load_sources(config)  # checks the data and the tokenizer's fit
  if src.encode.fmt != "text":
    raise ValueError(f"--from_documents continues text documents; data.format is "
                     f"{src.encode.fmt!r}. Use text records, or give --prompts.")
  # {'text': ...} examples, whatever field of the user's records holds the text.
  train_source = grain.MapDataset.source(src.train).map(
      lambda r: {"text": src.encode.canonical(r)["text"]})
  tokenizer = src.tokenizer
  prompt_width = prompt_tokens + (tokenizer.bos_id is not None)
  max_new_tokens = max_new_tokens or int(config.data.seq_len) - prompt_width
  if max_new_tokens < 1 or prompt_width + max_new_tokens > config.teacher.max_len:
    raise ValueError(
        f"--max_new_tokens={max_new_tokens} with --prompt_tokens={prompt_tokens}: a sequence "
        f"must have new tokens and fit teacher.max_len={config.teacher.max_len}; lower "
        "--prompt_tokens or set --max_new_tokens.")
  prompts = teacher_text.prompts_from_source(train_source, tokenizer, num_prompts=num_prompts,
                                             prompt_tokens=prompt_tokens, seed=config.seed)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  teacher = experiment.load_teacher(config, workdir, mesh, rules)
  start = time.time()
  ids = continuation_ids(
      teacher.cfg, teacher.params, prompts, max_new_tokens=max_new_tokens,
      pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k,
      top_p=top_p, batch_size=batch_size, rng=jax.random.key(config.seed), mesh=mesh)
  seconds = time.time() - start
  new_tokens = sum(len(row) - len(p) for row, p in zip(ids, prompts))
  counts = {"examples": len(ids), "prompt_tokens": sum(map(len, prompts)),
            "new_tokens": new_tokens,
            "stopped_at_eos": sum(len(row) - len(p) < max_new_tokens
                                  for row, p in zip(ids, prompts)),
            "generation_seconds": round(seconds, 1)}
  metadata = {
      "teacher": teacher_cache.teacher_fingerprint(config, workdir),
      "data": {k: config.data[k] for k in ("name", "train_split", "text_key",
                                           "tokenizer_path", "vocab_size")},
      "prompts": {"num_prompts": num_prompts, "prompt_tokens": prompt_tokens,
                  "seed": int(config.seed)},
      "generation": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                     "top_k": top_k, "top_p": top_p, "batch_size": batch_size,
                     "rng_seed": int(config.seed)},
      "counts": counts,
  }
  path = teacher_text.write_dataset(out, {"train": [decode(tokenizer, row) for row in ids]},
                                    metadata=metadata)
  return {"path": path, "examples": len(ids), "tokens": counts["prompt_tokens"] + new_tokens,
          "new_tokens": new_tokens, "new_tokens_per_second": round(new_tokens / seconds, 1)}
