"""An experiment's inputs: its records, tokenizer, chat template and encoder, its training streams
and its eval/val batches, from config.data.

The records come from (kdjax.data.sources) local files (data.train_files, ...), a Hugging Face
dataset on disk (data.hf_dataset), or a TFDS dataset by name (data.name, the default). Their format
(data.format: text, chat or prompt_completion) is detected from the first train record when not
given. Every record of every split is checked before anything is compiled, and the first train
records are encoded, so that bad data, a chat template kdjax cannot read, or answers it cannot
find are refused in one line before any work (and before the workdir is touched).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import numpy as np

from kdjax import cli, config_check, preflight
from kdjax.data import (chat_template, encoding, hf_tokenizer, hosts, pipeline, records,
                        shakespeare, sources)
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.settings import DataSettings

_ENCODED_UP_FRONT = 64  # train records encoded before any work, to refuse bad data early


@dataclasses.dataclass
class Sources:
  """The records of each split, and how they become token ids."""

  train: Sequence[Any]
  eval: Sequence[Any]
  val: Sequence[Any]
  tokenizer: tokenizer_lib.TextTokenizer
  encode: encoding.Encoder


@dataclasses.dataclass
class Data:
  tokenizer: tokenizer_lib.TextTokenizer
  make_train_iter: Callable[[int], Iterator]  # seed -> endless batches with get/set_state
  eval_batches: list[dict[str, np.ndarray]]
  val_batches: list[dict[str, np.ndarray]]  # held-out batches that choose the best checkpoint
  tokens_per_step: int
  # (source, seed) -> the same kind of stream over another source of {'text'} examples (the
  # teacher's continuations of sequence-level distillation).
  make_stream: Callable[[Any, int], Iterator] | None = None
  encode: encoding.Encoder | None = None


def data_dir(config: Any) -> str:
  return os.path.expanduser(config.data.data_dir or os.environ.get(
      "TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets")))


def load_sources(config: Any) -> Sources:
  """Every split's records, the tokenizer and the encoder, all checked (see the module doc)."""
  d, root = DataSettings.from_config(config.data), data_dir(config)
  if d.train_files or d.hf_dataset:
    splits, name = _user_splits(d, root)
    fmt = d.format or _detected(d, splits["train"])
  else:
    if d.name == "shakespeare":
      shakespeare.build_shakespeare(root, archive=d.archive or None)
    splits = {s: load_split(d, f"{s}_split", root) for s in sources.SPLITS}
    name, fmt = d.name, "text"  # TFDS examples are {'text'} already (data.text_key applied)
  text_key = d.text_key if d.train_files or d.hf_dataset else "text"
  check = lambda r: records.checked(r, fmt, text_key, d.messages_key, d.train_on)
  if d.train_files or d.hf_dataset:  # a TFDS dataset's examples are text by construction
    for split in sources.SPLITS:  # every record, before a tokenizer is trained on them
      for i in range(len(splits[split])):
        check(splits[split][i])
    if d.mix_files:  # e.g. ground truth next to a teacher's answers
      mix = sources.read_files(d.mix_files, "mix_files", d.txt_unit)
      for i in range(len(mix)):
        check(mix[i])
      splits["train"] = sources.Mixed(splits["train"], mix, d.mix_weight)
  tok = load_tokenizer(d, root, splits["train"], name, lambda r: records.text_of(check(r)))
  preflight.check_vocab(config, tok.vocab_size)  # a trained tokenizer exists only now
  chat = chat_template.load(tok, d.tokenizer_path, d.chat_template) if fmt != "text" else None
  encode = encoding.Encoder(fmt, tok, chat, train_on=d.train_on, text_key=text_key,
                            messages_key=d.messages_key)
  for i in range(min(len(splits["train"]), _ENCODED_UP_FRONT)):
    encode(splits["train"][i])  # the chat template and the answers, before any work
  return Sources(splits["train"], splits["eval"], splits["val"], tok, encode)


def prepare_data(config: Any) -> Data:
  """The training streams and eval/val batches of `load_sources(config)`."""
  d = DataSettings.from_config(config.data)
  src = load_sources(config)
  num_shards = d.num_shards

  def make_stream(source, seed: int, encode: encoding.Encoder | None = None):
    # This process's streams (see data/hosts.py): the global batch is the same on any number
    # of processes, and each process tokenizes only its rows.
    return hosts.HostBatches(
        lambda s: pipeline.train_iterator(source, src.tokenizer, seq_len=d.seq_len,
                                          batch_size=d.batch_size // num_shards, seed=seed,
                                          shard_index=s, shard_count=num_shards, encode=encode),
        num_shards)

  batches = lambda source, n: pipeline.eval_batches(
      source, src.tokenizer, seq_len=d.seq_len, batch_size=d.eval_batch_size, max_batches=n,
      encode=src.encode)
  return Data(src.tokenizer, lambda seed: make_stream(src.train, seed, src.encode),
              batches(src.eval, d.eval_batches), batches(src.val, d.val_batches),
              d.batch_size * d.seq_len, make_stream, src.encode)


def _user_splits(d: DataSettings, root: str) -> tuple[dict[str, Sequence[Any]], str]:
  """train/eval/val records of files or a dataset directory, and a name for the tokenizer."""
  if d.train_files:
    given = {"train": sources.read_files(d.train_files, "train_files", d.txt_unit)}
    for split in ("eval", "val"):
      spec = getattr(d, f"{split}_files")
      given[split] = sources.read_files(spec, f"{split}_files", d.txt_unit) if spec else None
    files = sorted(sources.expand(d.train_files, "train_files"))
    key = "\n".join(f"{os.path.abspath(f)} {os.path.getsize(f)}" for f in files)
  else:
    splits = sources.read_hf_dataset(d.hf_dataset, os.path.join(root, "hf_datasets"))
    if d.train_split not in splits:
      raise records.DataError(f"data.train_split: {d.hf_dataset} has no split "
                              f"{d.train_split!r} (it has {sorted(splits)}); choose one.")
    given = {"train": splits[d.train_split], "eval": splits.get(d.eval_split),
             "val": splits.get(d.val_split)}
    key = os.path.abspath(d.hf_dataset)
  held = sources.hold_out(given["train"], given,
                          {"eval": d.eval_fraction, "val": d.val_fraction})
  return held, "data-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _detected(d: DataSettings, train: Sequence[Any]) -> str:
  first = train[0]
  fmt = records.detect(first, d.text_key, d.messages_key)
  print(f"kdjax: data.format='' -> {fmt!r}, from the fields of {records.where(first)}",
        file=sys.stderr)
  return fmt


def load_split(d: Any, field: str, root: str):
  """The examples of TFDS split `d.<field>`; an unknown or empty split names the field."""
  split = getattr(d, field)  # d: config.data or DataSettings
  try:
    source = pipeline.load_source(d.name, split, root, text_key=d.text_key)
  except (KeyError, ValueError) as e:  # TFDS: unknown split, or an empty slice such as 'x[:0]'
    raise config_check.ConfigError(
        f"config.data.{field}: cannot load split {split!r} of {d.name!r} "
        f"({cli.one_line(e, 150)}); choose an existing, non-empty split.") from None
  if len(source) == 0:
    raise config_check.ConfigError(
        f"config.data.{field}: split {split!r} of {d.name!r} has no examples; choose a "
        "non-empty split.")
  return source


def load_tokenizer(d: Any, root: str, train_source, name: str | None = None,
                   to_text: Callable[[Any], str] | None = None) -> tokenizer_lib.TextTokenizer:
  """The given tokenizer file, or the cached one trained on the train split (trained if absent)."""
  if d.tokenizer_path and not os.path.exists(d.tokenizer_path):
    raise config_check.ConfigError(
        f"config.data.tokenizer_path: {d.tokenizer_path} does not exist; point it at a "
        "Hugging Face model directory, a tokenizer.json, a SentencePiece .model file, or set it "
        "to '' to train one on the train split.")
  name = name or d.name
  digits = "_digits" if getattr(d, "split_digits", False) else ""
  path = d.tokenizer_path or os.path.join(root, "tokenizers",
                                          f"{name}_bpe{d.vocab_size}{digits}.model")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    return tokenizer_lib.train_or_load(
        pipeline.texts(train_source, d.tokenizer_max_documents or None, to_text), path,
        d.vocab_size, split_digits=bool(digits))
  except (RuntimeError, hf_tokenizer.UnreadableTokenizer) as e:  # not a tokenizer file
    raise config_check.ConfigError(
        f"config.data.tokenizer_path: {path} is not a readable tokenizer "
        f"({cli.one_line(e, 120)}); replace it, or delete it to retrain.") from None
