"""Records of a user's data: the three formats, detected and checked, in one canonical form.

A record is one JSON object (a JSONL line, a Parquet row, a Hugging Face dataset row):

  text               {text_key: "..."}
  chat               {messages_key: [{"role": ..., "content": "..."}, ...]}, or ShareGPT's
                     {"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}
  prompt_completion  {"prompt": ..., "completion": ...}: both strings, or both message lists

`canonical` turns a record into {'text': str}, {'messages': [...]} or {'prompt': ...,
'completion': ...} with roles in ROLES, or raises DataError naming the record's place and the fix.
Nothing here tokenizes; kdjax.data.encoding does that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("text", "chat", "prompt_completion")
TRAIN_ON = ("assistant", "last_assistant", "all")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_KEY = "conversations"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function_response": "tool",
                   "observation": "tool"}
# Where a record came from ("data/train.jsonl:12"); sources add it, canonical forms drop it.
WHERE = "_kdjax_where"


class DataError(ValueError):
  """Bad data, said in one line that names the file and line (or record) and the fix."""


def where(record: Mapping[str, Any]) -> str:
  return str(record.get(WHERE, "a record"))


def _fail(record: Mapping[str, Any], message: str) -> DataError:
  return DataError(f"{where(record)}: {message}")


def detect(record: Any, text_key: str, messages_key: str) -> str:
  """The format of a first record, by the fields it has."""
  if not isinstance(record, Mapping):
    raise DataError(f"a record must be a JSON object, got {type(record).__name__}; write one "
                    "object per record.")
  if isinstance(record.get(messages_key), list) or isinstance(record.get(_SHAREGPT_KEY), list):
    return "chat"
  if "prompt" in record and "completion" in record:
    return "prompt_completion"
  if isinstance(record.get(text_key), (str, bytes)):
    return "text"
  fields = sorted(k for k in record if k != WHERE)
  raise _fail(record, f"cannot tell the format from its fields {fields}; give a "
                      f"'{text_key}' string (data.text_key), a '{messages_key}' list "
                      "(data.messages_key), or 'prompt' and 'completion', or set data.format.")


def canonical(record: Any, fmt: str, text_key: str, messages_key: str) -> dict[str, Any]:
  """The record in kdjax's form for `fmt` (see the module docstring)."""
  if not isinstance(record, Mapping):
    raise DataError(f"a record must be a JSON object, got {type(record).__name__}; write one "
                    "object per record.")
  if fmt == "text":
    return {"text": _string(record, text_key, f"data.text_key={text_key!r}")}
  if fmt == "chat":
    return {"messages": _messages_of(record, messages_key)}
  for key in ("prompt", "completion"):
    if key not in record:
      raise _fail(record, f"missing field '{key}' of a prompt_completion record; add it or set "
                          "data.format.")
  prompt, completion = record["prompt"], record["completion"]
  if isinstance(prompt, (str, bytes)) and isinstance(completion, (str, bytes)):
    return {"prompt": _string(record, "prompt", ""), "completion": _string(record, "completion", "")}
  if isinstance(prompt, list) and isinstance(completion, list):
    return {"prompt": _messages(record, prompt, "prompt"),
            "completion": _messages(record, completion, "completion")}
  raise _fail(record, f"'prompt' and 'completion' must both be strings or both be message lists "
                      f"(got {type(prompt).__name__} and {type(completion).__name__}); fix the "
                      "record.")


def _string(record: Mapping[str, Any], key: str, setting: str) -> str:
  if key not in record:
    hint = f" ({setting})" if setting else ""
    raise _fail(record, f"missing field '{key}'{hint}; add it to every record or point the "
                        "setting at the field that holds the text.")
  value = record[key]
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if not isinstance(value, str):
    raise _fail(record, f"field '{key}' must be a string, got {type(value).__name__}; fix the "
                        "record.")
  return value


def _messages_of(record: Mapping[str, Any], messages_key: str) -> list[dict[str, str]]:
  if isinstance(record.get(messages_key), list):
    return _messages(record, record[messages_key], messages_key)
  if isinstance(record.get(_SHAREGPT_KEY), list):
    return _messages(record, record[_SHAREGPT_KEY], _SHAREGPT_KEY)
  if messages_key in record:
    raise _fail(record, f"field '{messages_key}' must be a list of messages, got "
                        f"{type(record[messages_key]).__name__}; fix the record.")
  raise _fail(record, f"missing field '{messages_key}' (data.messages_key) of a chat record; add "
                      "it, or set data.messages_key to the field that holds the messages.")


def _messages(record: Mapping[str, Any], raw: Sequence[Any], key: str) -> list[dict[str, str]]:
  if not raw:
    raise _fail(record, f"'{key}' holds no messages; remove the record or add its turns.")
  return [_message(record, m, f"{key}[{i}]") for i, m in enumerate(raw)]


def _message(record: Mapping[str, Any], m: Any, at: str) -> dict[str, str]:
  if not isinstance(m, Mapping):
    raise _fail(record, f"{at} must be an object with 'role' and 'content', got "
                        f"{type(m).__name__}; fix the record.")
  sharegpt = "from" in m and "role" not in m
  role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
  for k in (role_key, content_key):
    if k not in m:
      raise _fail(record, f"{at} has no '{k}'; every message needs '{role_key}' and "
                          f"'{content_key}'.")
  role, content = m[role_key], m[content_key]
  roles = _SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
  if role not in roles:
    raise _fail(record, f"{at} has unknown role {role!r}; use one of {sorted(roles)}.")
  if not isinstance(content, str):
    raise _fail(record, f"{at}.{content_key} must be a string, got {type(content).__name__}; "
                        "flatten content parts to text.")
  return {"role": roles[role], "content": content}


def check_answers(record: Mapping[str, Any], canon: Mapping[str, Any], train_on: str) -> None:
  """Refuses a chat record whose answer would be empty under `train_on` (no assistant turn)."""
  if train_on != "all" and "messages" in canon:
    if not any(m["role"] == "assistant" for m in canon["messages"]):
      raise _fail(record, "the conversation has no assistant message, so it has no answer "
                          "tokens to learn; add one, drop the record, or set data.train_on='all'.")


def checked(record: Any, fmt: str, text_key: str, messages_key: str,
            train_on: str) -> dict[str, Any]:
  """`canonical`, refusing a record without answer tokens under `train_on` as well."""
  canon = canonical(record, fmt, text_key, messages_key)
  check_answers(record, canon, train_on)
  return canon


def prompt_of(record: Any, messages_key: str) -> dict[str, Any]:
  """A record as a prompt to answer: {'prompt': str or messages, 'reference': str or None}.

  Prompt records are {'prompt': ...} (a 'completion' beside it is the reference answer) or chat
  records, whose prompt is the conversation before its last assistant turn (that turn is the
  reference; a conversation ending with a user turn has none).
  """
  if not isinstance(record, Mapping):
    raise DataError(f"a record must be a JSON object, got {type(record).__name__}; write one "
                    "object per record.")
  if "prompt" in record:
    prompt, reference = record["prompt"], record.get("completion")
    if isinstance(prompt, list):
      prompt = _messages(record, prompt, "prompt")
      if isinstance(reference, list):
        reference = "".join(m["content"] for m in _messages(record, reference, "completion"))
    else:
      prompt = _string(record, "prompt", "")
    if reference is not None and not isinstance(reference, str):
      raise _fail(record, "'completion' (the reference answer) must be a string or messages; "
                          "fix the record.")
    return {"prompt": prompt, "reference": reference}
  if isinstance(record.get(messages_key), list) or isinstance(record.get(_SHAREGPT_KEY), list):
    messages = _messages_of(record, messages_key)
    reference = None
    if messages[-1]["role"] == "assistant":
      messages, reference = messages[:-1], messages[-1]["content"]
    if not messages or messages[-1]["role"] not in ("user", "tool"):
      raise _fail(record, "a chat prompt must end with a user (or tool) turn, optionally followed "
                          "by one assistant turn, the reference answer; fix the record.")
    return {"prompt": messages, "reference": reference}
  fields = sorted(k for k in record if k != WHERE)
  raise _fail(record, f"no prompt in its fields {fields}; give 'prompt' (a string or messages) "
                      f"or '{messages_key}' (data.messages_key) ending with a user turn.")


def text_of(canon: Mapping[str, Any]) -> str:
  """All the text of a canonical record (what a tokenizer trained on this data should see)."""
  if "text" in canon:
    return canon["text"]
  if "messages" in canon:
    return "\n".join(m["content"] for m in canon["messages"])
  parts = [canon["prompt"], canon["completion"]]
  return "\n".join(p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in parts)
