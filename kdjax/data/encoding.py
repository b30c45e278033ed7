"""A record -> a document of token ids and, per target, whether the loss counts it.

Every format gives ids d of one document; the pipeline trains on inputs d[:-1], targets d[1:],
and `weights` (1 = the loss counts that target, 0 = it does not, e.g. a prompt token):

  text               [BOS] text [EOS], every target counted
  prompt_completion  strings: [BOS] prompt completion [EOS]; the completion and EOS counted
                     message lists: the chat template over prompt + completion; the completion's
                     tokens (everything after the prompt and its generation prompt) counted
  chat               the chat template over the messages; by data.train_on the tokens of every
                     assistant turn ('assistant'), of the last one ('last_assistant'), or all

An answer's tokens are found by rendering the conversation up to the turn (with the generation
prompt) and through the turn, and requiring each rendering's ids to start the next one's: the ids
in between are the turn, including the template's end-of-turn token, which the student must learn
to stop on. A template for which that does not hold is refused (DataError), rather than training
on tokens it cannot place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kdjax.data import chat_template, records
from kdjax.data.records import DataError


class Encoder:
  """Callable: record -> {'inputs', 'targets', 'weights'} int32 arrays of one document."""

  def __init__(self, fmt: str, tokenizer: Any, chat: chat_template.Chat | None = None, *,
               train_on: str = "assistant", text_key: str = "text",
               messages_key: str = "messages", answer_logits: Any = None):
    if fmt not in records.FORMATS:
      raise DataError(f"data.format: {fmt!r} is not one of {records.FORMATS}.")
    self.fmt, self.tokenizer, self.chat, self.train_on = fmt, tokenizer, chat, train_on
    self.text_key, self.messages_key = text_key, messages_key
    # kdjax.data.answer_logits.AnswerLogits: a teacher's recorded top-k, attached per document.
    self.answer_logits = answer_logits
    self._bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    self._eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]

  def canonical(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return records.checked(record, self.fmt, self.text_key, self.messages_key, self.train_on)

  def ids_and_answers(self, record: Mapping[str, Any]) -> tuple[list[int], np.ndarray]:
    """The document's ids, and 1 at each id the loss counts as a target."""
    canon = self.canonical(record)
    if "text" in canon:
      ids = self._bos + self.tokenizer.encode(canon["text"]) + self._eos
      return ids, np.ones(len(ids), np.int32)
    if "messages" in canon:
      return self._chat(record, canon["messages"])
    prompt, completion = canon["prompt"], canon["completion"]
    if isinstance(prompt, str):
      head = self._bos + self.tokenizer.encode(prompt)
      ids = head + self.tokenizer.encode(completion) + self._eos
      return ids, _span(len(ids), len(head), len(ids))
    return self._prompted(record, prompt, completion)

  def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
    """The ids a model continues to answer `prompt` (records.prompt_of): what training puts
    before a completion, [BOS] prompt for a string, the chat template with its generation
    prompt for messages."""
    if isinstance(prompt, str):
      return self._bos + self.tokenizer.encode(prompt)
    return self._need_chat().ids(prompt, add_generation_prompt=True)

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    ids, answers = self.ids_and_answers(record)
    ids_ = np.asarray(ids, np.int32)
    weights = answers[1:]
    if self.fmt != "text" and not weights.any():
      raise DataError(f"{records.where(record)}: no answer tokens after tokenizing; check the "
                      "record's answer, or set data.train_on='all'.")
    doc = {"inputs": ids_[:-1], "targets": ids_[1:], "weights": weights}
    if self.answer_logits is not None:
      doc.update(self.answer_logits.attach(record, ids, answers))
    return doc

  @property
  def features(self) -> tuple[str, ...]:
    """The per-target arrays of every document, which packing cuts together."""
    extra = () if self.answer_logits is None else tuple(self.answer_logits.empty(0))
    return ("inputs", "targets", "weights") + extra

  def _need_chat(self) -> chat_template.Chat:
    if self.chat is None:
      raise DataError(f"data.format={self.fmt!r} with messages needs a chat template; set "
                      "data.chat_template.")
    return self.chat

  def _chat(self, record, messages) -> tuple[list[int], np.ndarray]:
    chat = self._need_chat()
    ids = chat.ids(messages)
    if self.train_on == "all":
      return ids, np.ones(len(ids), np.int32)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if self.train_on == "last_assistant":
      turns = turns[-1:]
    answers = np.zeros(len(ids), np.int32)
    for i in turns:
      before = chat.ids(messages[:i], add_generation_prompt=True)
      through = chat.ids(messages[:i + 1])
      _require_prefix(record, chat, before, through, f"messages[:{i}] with the generation prompt",
                      f"messages[:{i + 1}]")
      _require_prefix(record, chat, through, ids, f"messages[:{i + 1}]", "the whole conversation",
                      strict=False)
      answers[len(before):len(through)] = 1
    return ids, answers

  def _prompted(self, record, prompt, completion) -> tuple[list[int], np.ndarray]:
    chat = self._need_chat()
    ids = chat.ids(list(prompt) + list(completion))
    before = chat.ids(prompt, add_generation_prompt=completion[0]["role"] == "assistant")
    _require_prefix(record, chat, before, ids, "the prompt with the generation prompt",
                    "the prompt and completion")
    return ids, _span(len(ids), len(before), len(ids))


def _span(n: int, start: int, end: int) -> np.ndarray:
  answers = np.zeros(n, np.int32)
  answers[start:end] = 1
  return answers


def _require_prefix(record, chat, head: list[int], ids: list[int], head_name: str, name: str,
                    strict: bool = True) -> None:
  """`head` must start `ids` (and be shorter, if `strict`: the answer between them is not empty)."""
  if len(head) > len(ids) - strict or ids[:len(head)] != head:
    raise DataError(
        f"{records.where(record)}: with {chat.origin}, the tokens of {head_name} do not start "
        f"the tokens of {name}, so kdjax cannot find the answer's tokens; use a template that "
        "renders earlier turns the same whatever follows (data.chat_template), or set "
        "data.train_on='all'.")
