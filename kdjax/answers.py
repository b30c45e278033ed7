"""A model answers prompts: batched by length, sampled with a KV cache, cut at a stop token.

The library behind scripts/teacher_answers.py (a teacher's answers, written as training records)
and task evaluation (kdjax.task: each model's answers, scored). Prompts are records
(records.prompt_of): {'prompt': str or messages} with an optional reference 'completion', or a
chat whose last assistant turn is the reference. A model continues exactly the ids training puts
before a completion (Encoder.prompt_ids): [BOS] prompt, or the chat template with its generation
prompt.

Shape letters (the glossary is in kdjax/__init__.py): B batch, P prompt tokens, A new tokens,
J top-k entries per token.

Prompts are sorted by length and cut into batches of equal-ish length, so padding stays small,
and the batch width is rounded up to a multiple of `_WIDTH_STEP` so that few shapes compile. A
batch is `num_samples` rows per prompt; each answer stops at its first stop id (kept in its ids,
so training learns to stop) or at `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kdjax import hf, sample, sharding
from kdjax.data import chat_template, encoding, hf_tokenizer, records
from kdjax.data.records import DataError
from kdjax.model import ModelConfig

_WIDTH_STEP = 8


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How answers are drawn: temperature 0 is greedy (top_k 0 and top_p 1 are off)."""

  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1
  seed: int = 0

  def problems(self) -> list[str]:
    """What is wrong with these settings, as '<flag> <why>' phrases (empty when nothing)."""
    return [f"{name} {why}" for name, bad, why in (
        ("max_new_tokens", self.max_new_tokens < 1, "must be >= 1"),
        ("temperature", self.temperature < 0, "must be >= 0 (0 is greedy)"),
        ("top_k", self.top_k < 0, "must be >= 0 (0 is off)"),
        ("top_p", not 0 < self.top_p <= 1, "must be in (0, 1] (1 is off)"),
        ("num_samples", self.num_samples < 1, "must be >= 1"),
        ("num_samples", self.temperature == 0 and self.num_samples > 1,
         "above 1 needs temperature > 0 (greedy answers are all the same)")) if bad]


@dataclasses.dataclass(frozen=True)
class Prompt:
  index: int  # the record's place in its source
  record: dict[str, Any]  # as read, with its place (records.WHERE)
  prompt: str | list[dict[str, str]]
  reference: str | None
  ids: tuple[int, ...]


@dataclasses.dataclass
class Model:
  """A model that answers: its shapes and params, how its prompts become ids, where it stops."""

  cfg: ModelConfig
  params: Any
  encoder: encoding.Encoder
  stop_ids: tuple[int, ...]
  mesh: Any = None


@dataclasses.dataclass(frozen=True)
class Answer:
  prompt: int  # Prompt.index
  sample: int
  ids: tuple[int, ...]  # the new ids, through the stop id when there is one
  text: str  # the new ids before the stop id, decoded
  finished: bool  # stopped on a stop id (else cut at max_new_tokens)
  topk: dict[str, np.ndarray] | None = None  # per new id: top-k ids/log-probs, tail log-mass


def stop_ids(tokenizer: Any, extra: Sequence[int] = ()) -> tuple[int, ...]:
  """The ids an answer ends on: the tokenizer's EOS and any `extra` (a chat model's end of turn,
  e.g. from its generation_config.json)."""
  ids = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
  return tuple(dict.fromkeys(ids + [int(i) for i in extra]))


def hf_stop_ids(directory: str) -> tuple[int, ...]:
  """A Hugging Face model's end ids: `eos_token_id` (an id or a list) of its
  generation_config.json, else of its config.json (chat models end turns on their own token)."""
  for name in ("generation_config.json", "config.json"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path) as f:
        eos = json.load(f).get("eos_token_id")
      if eos is not None:
        return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
  return ()


def hf_model(directory: str, mesh) -> tuple[Model, dict[str, str]]:
  """A Hugging Face model directory as a Model: its params (read-only, into `mesh`), its
  tokenizer and chat template, and its end ids; and a description of it for a manifest."""
  cfg = hf.model_config(directory)
  tok = hf_tokenizer.load(directory)
  params = hf.load_params(directory, cfg, mesh, sharding.DEFAULT_RULES)
  encoder = encoding.Encoder("chat", tok, chat_template.load(tok, directory, ""))
  model = Model(cfg, params, encoder, stop_ids(tok, hf_stop_ids(directory)), mesh)
  return model, {"teacher_hf": os.path.abspath(directory)}


def read_prompts(source: Sequence[Any], encoder: encoding.Encoder, *, max_len: int,
                 max_new_tokens: int, name: str) -> list[Prompt]:
  """Every record of `source` as a Prompt, checked: one DataError line for a bad record, a
  prompt that leaves no room for max_new_tokens within the model's max_len, or no prompt."""
  if not len(source):
    raise DataError(f"{name}: no prompts; give a file of prompt or chat records.")
  prompts = []
  for i in range(len(source)):
    record = source[i]
    p = records.prompt_of(record, encoder.messages_key)
    ids = tuple(encoder.prompt_ids(p["prompt"]))
    if not ids:
      raise DataError(f"{records.where(record)}: the prompt has no tokens and the tokenizer no "
                      "BOS to start from; give it some text.")
    if len(ids) + max_new_tokens > max_len:
      raise DataError(f"{records.where(record)}: the prompt is {len(ids)} tokens, and with "
                      f"max_new_tokens={max_new_tokens} the answer needs "
                      f"{len(ids) + max_new_tokens} positions, above the model's max_len="
                      f"{max_len}; shorten the prompt or lower max_new_tokens.")
    prompts.append(Prompt(i, record, p["prompt"], p["reference"], ids))
  return prompts


def plan_batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[int]]:
  """Prompt indices (positions in `prompts`) in batches of at most `batch_size`, shortest first
  (ties by index): the same prompts and size always give the same batches."""
  order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].ids), i))
  return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def answer(model: Model, prompts: Sequence[Prompt], sampling: Sampling, *, key: jax.Array,
           record_topk: int = 0, batch_size: int = 0) -> list[Answer]:
  """The answers of one batch: `num_samples` per prompt, prompt by prompt.

  `key` draws the whole batch's samples; `record_topk` > 0 also returns, at every new id, the
  model's top-k log-probs (temperature 1) and the log-mass outside them. A batch of fewer than
  `batch_size` prompts is padded with copies of its last one (their answers are dropped), so
  that every batch of a run has one shape and compiles once per width.
  """
  real = [p for p in prompts for _ in range(sampling.num_samples)]
  rows = real + [real[-1]] * (max(batch_size, len(prompts)) - len(prompts)) * sampling.num_samples
  width = -(-max(len(p.ids) for p in rows) // _WIDTH_STEP) * _WIDTH_STEP
  pad = model.encoder.tokenizer.pad_id or 0
  prompt_BxP = np.asarray([[pad] * (width - len(p.ids)) + list(p.ids) for p in rows], np.int32)
  out = sample.generate(
      model.cfg, model.params, prompt_BxP, max_new_tokens=sampling.max_new_tokens,
      temperature=sampling.temperature, top_k=sampling.top_k or None,
      top_p=None if sampling.top_p >= 1 else sampling.top_p, rng=key, mesh=model.mesh,
      prompt_lengths_B=np.asarray([len(p.ids) for p in rows], np.int32),
      **({"record_topk": record_topk} if record_topk else {}))
  tokens_BxR, topk = out if record_topk else (out, None)
  new_BxA = np.asarray(tokens_BxR)[:, width:]
  topk = None if topk is None else {k: np.asarray(v) for k, v in topk.items()}
  answers = []
  for r, p in enumerate(real):
    ids, finished = _cut(new_BxA[r].tolist(), model.stop_ids)
    body = ids[:-1] if finished else ids
    answers.append(Answer(
        p.index, r % sampling.num_samples, tuple(ids),
        model.encoder.tokenizer.decode(body), finished,
        None if topk is None else {k: v[r, :len(ids)] for k, v in topk.items()}))
  return answers


def _cut(ids: list[int], stops: Sequence[int]) -> tuple[list[int], bool]:
  for a, token in enumerate(ids):
    if token in stops:
      return ids[:a + 1], True
  return ids, False


def as_record(prompt: Prompt, ans: Answer) -> dict[str, Any]:
  """The answer as a training record in the prompt's own format (text completions for string
  prompts, an assistant turn for messages), with the prompt record's other fields kept."""
  kept = {k: v for k, v in prompt.record.items()
          if k not in ("prompt", "completion", "messages", "conversations", records.WHERE)}
  turn = {"role": "assistant", "content": ans.text}
  if isinstance(prompt.prompt, str):
    body = {"prompt": prompt.prompt, "completion": ans.text}
  elif "prompt" in prompt.record:
    body = {"prompt": prompt.prompt, "completion": [turn]}
  else:
    body = {"messages": list(prompt.prompt) + [turn]}
  return {**body, **kept, "prompt_index": prompt.index, "sample": ans.sample,
          "finished": ans.finished}


def answer_all(model: Model, prompts: Sequence[Prompt], sampling: Sampling, *,
               batch_size: int) -> list[Answer]:
  """Every prompt's answers in prompt order (task evaluation: greedy, in memory)."""
  out = []
  for c, batch in enumerate(plan_batches(prompts, batch_size)):
    out += answer(model, [prompts[i] for i in batch], sampling,
                  key=jax.random.fold_in(jax.random.key(sampling.seed), c),
                  batch_size=batch_size)
  return sorted(out, key=lambda a: (a.prompt, a.sample))
