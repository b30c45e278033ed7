"""Small data sets in every format kdjax reads (the user's own data), written by the tests.

The text is fake_corpus's pseudo-verse: plays split into paragraphs (text records), or into
user/assistant turns of alternating lines (chat records).
"""

from __future__ import annotations

import json
import os

from support import fake_corpus

TRAIN_WORKS = fake_corpus.TRAIN
EVAL_WORKS, VAL_WORKS = fake_corpus.HELD_OUT['test'], fake_corpus.HELD_OUT['validation']


def paragraphs(works, chars: int = 6000) -> list[str]:
  out = []
  for work in works:
    out += [p.strip() for p in fake_corpus.work_text(work, chars).split('\n\n') if p.strip()]
  return out


def conversations(works, chars: int = 6000) -> list[dict]:
  """Chats of 1-3 exchanges: a user line, then the next line as the assistant's answer."""
  chats = []
  for i, p in enumerate(paragraphs(works, chars)):
    lines = p.split('\n')
    turns = [{'role': ('user', 'assistant')[j % 2], 'content': line}
             for j, line in enumerate(lines[:2 * (1 + i % 3)])]
    if len(turns) >= 2:
      chats.append({'messages': turns[:len(turns) // 2 * 2]})
  return chats


def write_jsonl(path: str, rows: list[dict]) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return path


def write_parquet(path: str, rows: list[dict]) -> str:
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def write_txt(path: str, texts: list[str]) -> str:
  """Texts one per line (newlines inside a text become spaces)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(t.replace('\n', ' ') + '\n' for t in texts)
  return path


def text_splits(directory: str, fmt: str) -> dict[str, str]:
  """train (two files), eval and val files of text records in `fmt` (jsonl, parquet, txt);
  returns the --config.data.* values that name them."""
  write = {'jsonl': lambda p, t: write_jsonl(p, [{'text': x} for x in t]),
           'parquet': lambda p, t: write_parquet(p, [{'text': x} for x in t]),
           'txt': write_txt}[fmt]
  train = paragraphs(TRAIN_WORKS)
  half = len(train) // 2
  write(os.path.join(directory, f'train-0.{fmt}'), train[:half])
  write(os.path.join(directory, f'train-1.{fmt}'), train[half:])
  return {'train_files': os.path.join(directory, f'train-*.{fmt}'),
          'eval_files': write(os.path.join(directory, f'test.{fmt}'), paragraphs(EVAL_WORKS)),
          'val_files': write(os.path.join(directory, f'val.{fmt}'), paragraphs(VAL_WORKS))}


def save_hf_dataset(directory: str) -> str:
  """A DatasetDict of text records (train/test/validation) written with save_to_disk."""
  import datasets
  splits = {'train': TRAIN_WORKS, 'test': EVAL_WORKS, 'validation': VAL_WORKS}
  datasets.DatasetDict({
      name: datasets.Dataset.from_list([{'text': t} for t in paragraphs(works)])
      for name, works in splits.items()}).save_to_disk(directory)
  return directory
