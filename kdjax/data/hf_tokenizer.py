"""Tokenizers of Hugging Face models: the ids transformers (5.x) gives, without importing it.

A model directory holds `tokenizer.json` (Llama 3, Qwen; most hub repos), `tokenizer.model`
(SentencePiece: Gemma, Llama 2, Mistral) or both, next to tokenizer_config.json,
special_tokens_map.json and config.json. `load` prefers tokenizer.json and runs it with the
`tokenizers` library; otherwise it runs tokenizer.model with `sentencepiece`.

What transformers adds around those libraries, and what this module mirrors:

- tokenizer.json: transformers runs the file as written, except for LlamaTokenizer (Llama 2,
  Mistral), whose pipeline it rebuilds from the file's vocabulary and merges: no normalizer, a
  Metaspace pre-tokenizer that puts "▁" before the text unless it already starts with a space,
  and a decoder that strips that space again. `_rebuild_like_transformers` does the same.
- tokenizer.model: transformers 5 converts the model to a `tokenizers` BPE; the segmentation is
  SentencePiece's, so `sentencepiece` gives the same pieces. Around it transformers (a) matches
  added and special tokens ("<s>", "<bos>", ...) in the text first and never splits them, and
  (b) adds the "▁" prefix only where Metaspace would: to the first piece of text when the model
  has a dummy prefix ("first"; every piece of text between special tokens when
  tokenizer_config says legacy=true), and never to text that already starts with a space.

Special ids come from tokenizer_config.json, then special_tokens_map.json, then config.json,
then the SentencePiece model itself; the first file that names a token decides, so Qwen's
`"bos_token": null` means no BOS even though its config.json has a bos_token_id.

kdjax finds padding by segment id 0 and the loss mask, never by token value, so `pad_id` is only
a filler: the model's pad token, else its EOS (transformers' usual `pad_token = eos_token`, and
`decode` drops it), else 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2  # needs protobuf, a dependency of TFDS
from tokenizers import decoders, pre_tokenizers

TOKENIZER_JSON = 'tokenizer.json'
SENTENCEPIECE_MODEL = 'tokenizer.model'
TOKENIZER_CONFIG = 'tokenizer_config.json'
SPECIAL_TOKENS_MAP = 'special_tokens_map.json'
MODEL_CONFIG = 'config.json'
# Everything transformers reads to rebuild a tokenizer; an exported model needs all that exist.
TOKENIZER_FILES = (
    TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, 'added_tokens.json',
    'vocab.json', 'merges.txt', 'chat_template.jinja', 'chat_template.json',
)
_LLAMA_CLASSES = ('LlamaTokenizer', 'LlamaTokenizerFast', 'CodeLlamaTokenizer',
                  'CodeLlamaTokenizerFast')
_SPECIAL_NAMES = ('bos', 'eos', 'pad', 'unk')
_SPACE = '▁'  # SentencePiece's and Metaspace's visible space


class UnreadableTokenizer(ValueError):
  """A tokenizer file that exists but cannot be parsed."""


def is_hugging_face(path: str | os.PathLike[str]) -> bool:
  """A directory, a tokenizer.json or a tokenizer.model; any other .model file is kdjax's own."""
  path = os.fspath(path)
  return os.path.isdir(path) or os.path.basename(path) in (TOKENIZER_JSON, SENTENCEPIECE_MODEL)


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
  """Whether `path` is a tokenizer.json / tokenizer.model, or a directory holding one."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return any(os.path.isfile(os.path.join(path, n)) for n in (TOKENIZER_JSON, SENTENCEPIECE_MODEL))
  return os.path.isfile(path) and is_hugging_face(path)


# Text in many scripts, digits, whitespace runs and punctuation: two tokenizers that give it the
# same ids, with the same size and special ids, are one tokenizer for every practical purpose.
_PROBE = ("The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42 1e-9\n"
          "  indented\tand\ttabbed  lines;\n\nCafé naïve façade — Ünïcödé. Привет, мир! "
          "東京で会いましょう。 안녕하세요 مرحبا שלום नमस्ते 🙂🚀 <tag attr=\"x\"> {json: [1, 2]} "
          "def f(x): return x ** 2  # code\n" * 2)


def difference(a: 'HFTokenizer', b: 'HFTokenizer') -> str | None:
  """None if `a` and `b` act alike (size, special ids, ids of a multilingual probe text), else
  what differs first, in a few words."""
  for name in ('vocab_size', 'bos_id', 'eos_id'):
    if getattr(a, name) != getattr(b, name):
      return f'{name} {getattr(a, name)} vs {getattr(b, name)}'
  ids_a, ids_b = a.encode(_PROBE), b.encode(_PROBE)
  if ids_a != ids_b:
    at = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y),
              min(len(ids_a), len(ids_b)))
    return f'ids differ from token {at} of a probe text: {ids_a[at:at + 3]} vs {ids_b[at:at + 3]}'
  return None


def copy_files(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> list[str]:
  """Copies the tokenizer files of a model directory (TOKENIZER_FILES that exist); returns them."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  if TOKENIZER_JSON not in names and SENTENCEPIECE_MODEL not in names:
    raise FileNotFoundError(f'{src_dir} has neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}.')
  os.makedirs(dst_dir, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return names


def load(path: str | os.PathLike[str]) -> HFTokenizer:
  """The tokenizer of a model directory, or of its tokenizer.json / tokenizer.model file."""
  path = os.fspath(path)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isdir(path):
    json_path, model_path = (os.path.join(path, n) for n in (TOKENIZER_JSON, SENTENCEPIECE_MODEL))
    path = json_path if os.path.isfile(json_path) else model_path
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} at {path}.')
  config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
  if os.path.basename(path) == TOKENIZER_JSON:
    backend = _JsonBackend(path, config)
  else:
    backend = _SentencePieceBackend(path, config)
  return HFTokenizer(backend, _special_tokens(directory, config))


class HFTokenizer:
  """Text <-> ids of a Hugging Face model; the interface of kdjax's own `Tokenizer`.

  `encode` adds no special tokens (transformers' add_special_tokens=False) unless asked to;
  `decode` drops special tokens (skip_special_tokens=True). `bos_id` and `eos_id` may be None.
  """

  def __init__(self, backend: _JsonBackend | _SentencePieceBackend,
               special: Mapping[str, str | int | None]):
    self._backend = backend
    ids = {name: _token_id(backend, name, special) for name in _SPECIAL_NAMES}
    self.bos_id: int | None = ids['bos']
    self.eos_id: int | None = ids['eos']
    self.unk_id: int | None = ids['unk']
    self.pad_id: int = next(i for i in (ids['pad'], ids['eos'], 0) if i is not None)
    # transformers treats every named special token as special, whatever the file says.
    self._skip = backend.special_ids | {i for i in ids.values() if i is not None}
    backend.set_special_ids(self.bos_id, self.eos_id)

  @property
  def vocab_size(self) -> int:
    """One more than the largest id the tokenizer produces (a model may have more rows)."""
    return self._backend.vocab_size

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """transformers' ids; add_special_tokens=True adds what its default call adds (e.g. BOS)."""
    return self._backend.encode(text, add_special_tokens)

  def decode(self, ids: Sequence[int]) -> str:
    return self._backend.decode([int(i) for i in ids if int(i) not in self._skip])


# ------------------------------------------------------------------------------ special tokens


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _content(token: Any) -> str | None:
  """A token as tokenizer_config writes it: a string, {'content': ...} or null."""
  return token.get('content') if isinstance(token, Mapping) else token


def _special_tokens(directory: str, config: Mapping[str, Any]) -> dict[str, str | int | None]:
  """name -> token string, id (from config.json) or None, for each name some file mentions."""
  special: dict[str, str | int | None] = {}
  for tokens in (config, _read_json(os.path.join(directory, SPECIAL_TOKENS_MAP))):
    for name in _SPECIAL_NAMES:
      if name not in special and f'{name}_token' in tokens:
        special[name] = _content(tokens[f'{name}_token'])
  model_config = _read_json(os.path.join(directory, MODEL_CONFIG))
  for name in _SPECIAL_NAMES:
    token_id = model_config.get(f'{name}_token_id')
    if name not in special and token_id is not None:
      # Llama 3.1 lists several EOS ids; the first is the one its tokenizer calls eos_token.
      special[name] = token_id[0] if isinstance(token_id, list) else token_id
  return special


def _token_id(backend, name: str, special: Mapping[str, str | int | None]) -> int | None:
  """The id of special token `name`: as the files say (None if they say null), else the
  tokenizer model's own."""
  if name not in special:
    return backend.default_ids.get(name)
  token = special[name]
  if token is None or isinstance(token, int):
    return token
  token_id = backend.token_to_id(token)
  if token_id is None:
    raise UnreadableTokenizer(f'{name}_token {token!r} is not in the tokenizer\'s vocabulary.')
  return token_id


# ---------------------------------------------------------------------------------- tokenizer.json


class _JsonBackend:
  """tokenizer.json through the `tokenizers` library."""

  def __init__(self, path: str, config: Mapping[str, Any]):
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust library raises a bare Exception
      raise UnreadableTokenizer(f'{path} is not a readable tokenizer.json ({e}).') from None
    if config.get('tokenizer_class') in _LLAMA_CLASSES:
      _rebuild_like_transformers(self._tok, config)
    self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.default_ids: dict[str, int] = {}

  def set_special_ids(self, bos_id: int | None, eos_id: int | None) -> None:
    del bos_id, eos_id  # the file's post-processor names its own special tokens

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    # transformers ignores tokenizer_config's add_bos_token when tokenizer.json exists: the
    # file's post-processor alone decides the special tokens.
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)


def _prefix_settings(config: Mapping[str, Any], model_default: bool) -> tuple[bool, bool]:
  """(add a "▁" prefix at all, before every piece of text rather than only the first)."""
  add_prefix = config.get('add_prefix_space')
  return (model_default if add_prefix is None else bool(add_prefix)), bool(config.get('legacy'))


def _rebuild_like_transformers(tok: tokenizers.Tokenizer, config: Mapping[str, Any]) -> None:
  """The pipeline transformers' LlamaTokenizer builds around the file's vocabulary and merges."""
  add_prefix, every_piece = _prefix_settings(config, model_default=True)
  scheme = ('always' if every_piece else 'first') if add_prefix else 'never'
  tok.normalizer = None
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme=scheme,
                                               split=False)
  steps = [decoders.Replace(_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(' ', 1, 0)] if add_prefix else []))


# --------------------------------------------------------------------------------- tokenizer.model


def _added_tokens(proto, sp: spm.SentencePieceProcessor, config: Mapping[str, Any]):
  """(token -> (id, special), token -> (lstrip, rstrip)): the tokens transformers matches in the
  text before the model runs: the model's control and user-defined pieces and its unk piece,
  tokenizer_config's added tokens, and every special token it names."""
  kind = sentencepiece_model_pb2.ModelProto.SentencePiece
  added = {p.piece: (i, p.type == kind.CONTROL) for i, p in enumerate(proto.pieces)
           if p.type in (kind.CONTROL, kind.USER_DEFINED)}
  added[sp.id_to_piece(sp.unk_id())] = (sp.unk_id(), True)
  strip = {}
  for token_id, token in config.get('added_tokens_decoder', {}).items():
    if token.get('single_word'):
      raise UnreadableTokenizer(f'added token {token["content"]!r} is single_word, which kdjax '
                                'does not implement for SentencePiece models.')
    added[token['content']] = (int(token_id), bool(token.get('special', True)))
    strip[token['content']] = (bool(token.get('lstrip')), bool(token.get('rstrip')))
  named = [_content(config.get(f'{name}_token')) for name in _SPECIAL_NAMES]
  for key in ('additional_special_tokens', 'extra_special_tokens'):
    extra = config.get(key) or []
    named += [_content(t) for t in (extra.values() if isinstance(extra, Mapping) else extra)]
  for content in named:
    if content is not None and content not in added and sp.piece_to_id(content) != sp.unk_id():
      added[content] = (sp.piece_to_id(content), True)
  return added, strip


class _SentencePieceBackend:
  """tokenizer.model through `sentencepiece`, with transformers' added tokens and prefix rule."""

  def __init__(self, path: str, config: Mapping[str, Any]):
    proto = sentencepiece_model_pb2.ModelProto()
    try:
      with open(path, 'rb') as f:
        proto.ParseFromString(f.read())
      # The prefix is added here, by transformers' rule, so SentencePiece must not add its own.
      self._add_prefix, self._every_piece = _prefix_settings(
          config, model_default=proto.normalizer_spec.add_dummy_prefix)
      proto.normalizer_spec.add_dummy_prefix = False
      self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as e:  # protobuf's DecodeError or SentencePiece's RuntimeError
      raise UnreadableTokenizer(f'{path} is not a readable SentencePiece model ({e}).') from None
    self._config = config
    self.default_ids = {name: i for name, i in (
        ('bos', self._sp.bos_id()), ('eos', self._sp.eos_id()), ('pad', self._sp.pad_id()),
        ('unk', self._sp.unk_id())) if i >= 0}
    self._added, self._strip = _added_tokens(proto, self._sp, config)
    self._template: tuple[list[int], list[int]] = ([], [])
    num_pieces = len(proto.pieces)
    self._beyond_model = {i: t for t, (i, _) in self._added.items() if i >= num_pieces}
    self.special_ids = {i for i, special in self._added.values() if special}
    self.vocab_size = max([num_pieces, *(i + 1 for i in self._beyond_model)])
    # Leftmost-longest, as transformers' matcher: at each position the longest token wins.
    self._pattern = re.compile(
        '|'.join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)))

  def set_special_ids(self, bos_id: int | None, eos_id: int | None) -> None:
    # Without tokenizer.json, transformers adds BOS/EOS only where tokenizer_config asks.
    add_bos, add_eos = self._config.get('add_bos_token'), self._config.get('add_eos_token')
    self._template = ([bos_id] if add_bos and bos_id is not None else [],
                      [eos_id] if add_eos and eos_id is not None else [])

  def token_to_id(self, token: str) -> int | None:
    if token in self._added:
      return self._added[token][0]
    token_id = self._sp.piece_to_id(token)
    return None if token_id == self._sp.unk_id() else token_id

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    ids, start = [], 0
    for match in self._pattern.finditer(text):
      end, after = self._stripped_span(text, match, start)
      ids += self._encode_text(text[start:end], at_start=start == 0)
      ids.append(self._added[match.group()][0])
      start = after
    ids += self._encode_text(text[start:], at_start=start == 0)
    return [*self._template[0], *ids, *self._template[1]] if add_special_tokens else ids

  def _stripped_span(self, text: str, match: re.Match, start: int) -> tuple[int, int]:
    """(end of the text before the token, start of the text after it): lstrip/rstrip tokens
    absorb the whitespace beside them."""
    lstrip, rstrip = self._strip.get(match.group(), (False, False))
    end, after = match.start(), match.end()
    while lstrip and end > start and text[end - 1].isspace():
      end -= 1
    while rstrip and after < len(text) and text[after].isspace():
      after += 1
    return end, after

  def _encode_text(self, text: str, at_start: bool) -> list[int]:
    if not text:
      return []
    if self._add_prefix and (at_start or self._every_piece) and not text.startswith((' ', _SPACE)):
      text = ' ' + text
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: list[int]) -> str:
    parts, run = [], []
    for i in ids:
      if i in self._beyond_model:
        parts += [self._sp.decode(run), self._beyond_model[i]]
        run = []
      else:
        run.append(i)
    text = ''.join(parts) + self._sp.decode(run)
    # transformers' decoder strips the one space that stands for the prefix.
    return text[1:] if self._add_prefix and text.startswith(' ') else text
