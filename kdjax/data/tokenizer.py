"""SentencePiece tokenizer with fixed special ids, trained in memory and saved atomically.

The special ids are part of the contract with the model code: padding is 0 everywhere (the packer
fills with 0 and the loss masks it), so they are pinned at training time rather than read back.

The model is lossless: no Unicode normalisation, whitespace kept as is, and byte fallback, so
`decode(encode(s)) == s` for any string and no id is ever `unk_id`.

A Hugging Face model's tokenizer (a model directory, tokenizer.json or tokenizer.model) is
`hf_tokenizer.HFTokenizer`, with the same interface (`TextTokenizer`) but its own special ids;
`load` and `train_or_load` return whichever a path holds.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import sentencepiece as spm

from kdjax.data import hf_tokenizer

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIAL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))
# Training reads lines (SentencePiece's sentences), so a newline never appears in the training
# data; as a user-defined symbol it is still one token instead of a byte-fallback token.
_NEWLINE = '\n'
_MAX_TRAINING_LINES = 2_000_000  # ~100 MB of text; the Shakespeare corpus is ~170k lines.
_SEED = 0


class TextTokenizer(Protocol):
  """What the pipeline and sampling need; a model without BOS (Qwen) has bos_id None."""

  pad_id: int  # a filler only: padding is found by segment id 0 and the mask, never by value
  bos_id: int | None
  eos_id: int | None

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list[int]:
    """Ids without BOS/EOS."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text without special tokens."""


class Tokenizer:
  """Text <-> ids. `encode` adds no BOS/EOS; `decode` drops pad/BOS/EOS."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    ids = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
      raise ValueError(f'SentencePiece model has special ids (pad, bos, eos, unk) = {ids}; '
                       f'kdjax needs {(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}. A Hugging Face '
                       f'model\'s tokenizer loads from its directory or its '
                       f'{hf_tokenizer.SENTENCEPIECE_MODEL}.')

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
    with open(path, 'rb') as f:
      return cls(f.read())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) not in _SPECIAL_IDS])


def load(path: str | os.PathLike[str]) -> Tokenizer | hf_tokenizer.HFTokenizer:
  """A Hugging Face tokenizer for a model directory, tokenizer.json or tokenizer.model; kdjax's
  own Tokenizer (special ids 0-3) for any other .model file."""
  if hf_tokenizer.is_hugging_face(path):
    return hf_tokenizer.load(path)
  return Tokenizer.load(path)


def _lines(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.split(_NEWLINE):
      if line.strip():
        yield line


def train(texts: Iterable[str], vocab_size: int, model_type: str = 'bpe',
          split_digits: bool = False) -> bytes:
  """Trains a SentencePiece model on the lines of `texts`; returns the serialized model.

  With `split_digits` every digit is a piece of its own (numbers are read digit by digit, as
  arithmetic needs).

  Deterministic: the same texts give the same bytes (fixed seed, ordered input, fixed threads).
  """
  spm.set_random_generator_seed(_SEED)
  model = io.BytesIO()
  try:
    _train_into(model, texts, vocab_size, model_type, split_digits)
  except RuntimeError as e:
    # SentencePiece refuses sizes below the corpus's character set or above what it can merge.
    reason = str(e).split("]")[-1].strip()
    raise ValueError(f'config.data.vocab_size={vocab_size} does not fit this corpus: {reason} '
                     'Choose another vocab_size.') from None
  return model.getvalue()


def _train_into(model: io.BytesIO, texts: Iterable[str], vocab_size: int, model_type: str,
                split_digits: bool):
  spm.SentencePieceTrainer.train(
      sentence_iterator=_lines(texts),
      model_writer=model,
      model_type=model_type,
      vocab_size=vocab_size,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
      user_defined_symbols=[_NEWLINE],
      # Lossless: no NFKC, keep every space, no dummy prefix (passages are encoded whole, so a
      # word after a newline must look like a word at the start of a training line).
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,  # verse indentation becomes one piece
      byte_fallback=True,
      split_digits=split_digits,
      character_coverage=1.0,
      input_sentence_size=_MAX_TRAINING_LINES,
      shuffle_input_sentence=True,  # only matters above the cap; seeded above
      num_threads=1,  # the corpus is small and one thread leaves nothing to chance
      minloglevel=2,
  )


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.model')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; the cache is shared like any data file
    os.replace(tmp_path, path)  # a reader sees the old file or the whole new one, never half
  except BaseException:
    os.unlink(tmp_path)
    raise


def train_or_load(
    texts: Iterable[str],
    model_path: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = 'bpe',
    split_digits: bool = False,
) -> Tokenizer | hf_tokenizer.HFTokenizer:
  """Loads model_path if it exists, else trains on `texts` (train split only!) and saves there.

  A Hugging Face tokenizer (see `load`) is only ever loaded, whatever vocab_size says: its
  vocabulary is its model's.
  """
  model_path = os.fspath(model_path)
  if hf_tokenizer.is_hugging_face(model_path):
    return hf_tokenizer.load(model_path)
  if os.path.exists(model_path):
    tokenizer = Tokenizer.load(model_path)
    if tokenizer.vocab_size != vocab_size:
      raise ValueError(f'{model_path} has vocab size {tokenizer.vocab_size}, not {vocab_size}; '
                       'delete it or point model_path elsewhere.')
    return tokenizer
  model_proto = train(texts, vocab_size, model_type, split_digits)
  _write_atomically(model_path, model_proto)
  return Tokenizer(model_proto)
