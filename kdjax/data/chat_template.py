"""Chat templates: a conversation -> token ids, as the model's own template writes it.

A Hugging Face tokenizer directory's template (chat_template.jinja, chat_template.json or the
`chat_template` of tokenizer_config.json, in that order, as transformers 5 reads them) is rendered
with jinja2 the way transformers' `apply_chat_template` renders it: a sandboxed environment
(`ImmutableSandboxedEnvironment`: the template is untrusted input), trim_blocks and lstrip_blocks,
the loop-control extension, `{% generation %}` blocks rendered as their body, transformers'
`tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`, and the tokenizer's named
special tokens (bos_token, eos_token, ...) as variables. The text is then tokenized with no
special tokens added (the template writes them), which gives transformers' ids.

One difference on purpose: a template that *prints* a variable kdjax does not pass (say
`{{ date_string }}` without a default) is refused with one line, where transformers would print
nothing. Tests of undefined values (`is defined`, `if x`, loops) behave as in transformers.

BuiltinChat is kdjax's template for tokenizers without one (its own SentencePiece tokenizers):

  [BOS] <|system|>\\n{content}\\n <|user|>\\n{content}\\n <|assistant|>\\n{content}[EOS] ...

with no spaces between the pieces: each message is its role header, its content, then a newline,
except that an assistant turn ends with EOS (the token a student must learn to stop on). The
generation prompt is `<|assistant|>\\n`. Each piece is tokenized on its own, so a conversation's
ids always start with the ids of any of its prefixes.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kdjax.data.records import DataError

BUILTIN = "builtin"
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
Messages = Sequence[Mapping[str, str]]


class Chat(Protocol):
  origin: str  # where the template comes from, for messages

  def ids(self, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """The token ids of `messages`, and of the assistant header after them if asked."""


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): its body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _PrintRefused(jinja2.Undefined):
  """An undefined value that may be tested or iterated but not printed."""

  def __str__(self) -> str:
    self._fail_with_undefined_error()
    return ""


class _Namespace(jinja2.utils.Namespace):
  """jinja2's namespace without underscore attributes (they would reach Python internals)."""

  def __init__(*args, **kwargs):  # noqa: N805 - jinja2's own signature trick
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'.")


class _Dict:
  """`dict(...)` for templates, without handing them the dict type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja2's own tojson escapes HTML characters; chat templates expect plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def compile_template(source: str, origin: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
                                      undefined=_PrintRefused)
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                     namespace=_Namespace)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise DataError(f"{origin}: the chat template does not parse (line {e.lineno}: {e.message}); "
                    "fix it or set data.chat_template.") from None


class JinjaChat:
  """A Hugging Face chat template over a tokenizer whose `encode` adds no special tokens."""

  def __init__(self, source: str, tokenizer: Any, special_tokens: Mapping[str, str], origin: str):
    self.origin = origin
    self._template = compile_template(source, origin)
    self._tokenizer = tokenizer
    self._special = dict(special_tokens)

  def text(self, messages: Messages, add_generation_prompt: bool = False) -> str:
    try:
      return self._template.render(messages=[dict(m) for m in messages], tools=None,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **self._special)
    except jinja2.UndefinedError as e:
      raise DataError(f"{self.origin}: the chat template needs a variable kdjax does not give it "
                      f"({e.message}); give the template a default for it, or set "
                      "data.chat_template to another template.") from None
    except jinja2.TemplateError as e:  # raise_exception(...) in the template, or a bad call
      raise DataError(f"{self.origin}: the chat template refused the conversation "
                      f"({e.message}); fix the record or the template.") from None

  def ids(self, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    return list(self._tokenizer.encode(self.text(messages, add_generation_prompt)))


class BuiltinChat:
  """kdjax's own template (see the module docstring)."""

  origin = "the built-in chat template"

  def __init__(self, tokenizer: Any):
    self._tokenizer = tokenizer
    self._newline = tokenizer.encode("\n")

  def _header(self, role: str) -> list[int]:
    return self._tokenizer.encode(f"<|{role}|>\n")

  def ids(self, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    tok = self._tokenizer
    out = [] if tok.bos_id is None else [tok.bos_id]
    for m in messages:
      end = [tok.eos_id] if m["role"] == "assistant" and tok.eos_id is not None else self._newline
      out += self._header(m["role"]) + tok.encode(m["content"]) + end
    return out + (self._header("assistant") if add_generation_prompt else [])


def find_template(directory: str) -> tuple[str, str] | None:
  """(template source, the file it came from) of a tokenizer directory, or None."""
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return f.read(), jinja_path
  for name in ("chat_template.json", "tokenizer_config.json"):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    if isinstance(template, str) and template:
      return template, path
  return None


def special_tokens(directory: str) -> dict[str, str]:
  """The named special tokens as strings (transformers' `special_tokens_map`)."""
  found: dict[str, str] = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    for attr in _SPECIAL_ATTRIBUTES:
      token = config.get(attr)
      token = token.get("content") if isinstance(token, Mapping) else token
      if attr not in found and attr in config and token is not None:
        found[attr] = str(token)
  return found


def load(tokenizer: Any, tokenizer_path: str, setting: str) -> Chat:
  """The chat template `data.chat_template` names: '' = the tokenizer directory's own template
  (the built-in one if it has none), 'builtin', or a .jinja file."""
  directory = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
  if setting == BUILTIN:
    return BuiltinChat(tokenizer)
  specials = special_tokens(directory) if tokenizer_path else {}
  if setting:
    if not os.path.isfile(setting):
      raise DataError(f"data.chat_template: {setting} is not a file; give a .jinja file, "
                      f"'{BUILTIN}', or '' for the tokenizer's own template.")
    with open(setting, encoding="utf-8") as f:
      return JinjaChat(f.read(), tokenizer, specials, setting)
  found = find_template(directory) if tokenizer_path else None
  if found is None:
    return BuiltinChat(tokenizer)
  return JinjaChat(found[0], tokenizer, specials, found[1])
