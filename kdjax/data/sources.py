"""Records from local files and from Hugging Face datasets on disk, split into train/eval/val.

Files (`data.train_files`, `data.eval_files`, `data.val_files`): comma-separated globs (or
directories) of

  .jsonl, .jsonl.gz  one JSON object per line (blank lines skipped)
  .json              one JSON list of objects
  .parquet           one record per row
  .txt               {'text': ...} per line, per paragraph or per file (`data.txt_unit`)

A Hugging Face dataset (`data.hf_dataset`): a directory written by `save_to_disk`, or a local
dataset repository of parquet/jsonl files, read offline with the `datasets` library; its splits
are taken by name (data.train_split, data.eval_split, data.val_split).

Without eval or val files (or without such a split), a held-out fraction of the train records is
used instead, chosen by a hash of each record's content: every run and every host agrees, and a
duplicated record never sits on both sides. Every record a source returns is a dict carrying
records.WHERE ("data/train.jsonl:12"), so that any later error names its place.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdjax.data.records import WHERE, DataError

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")
TXT_UNITS = ("line", "paragraph", "file")
SPLITS = ("train", "eval", "val")


class _Table:
  """Rows of one file or dataset split, each with a place for error messages."""

  def __init__(self, rows: Sequence[Any], label: str, lines: Sequence[int] | None = None):
    self.rows, self.label, self.lines = rows, label, lines

  def __len__(self) -> int:
    return len(self.rows)

  def row(self, i: int) -> dict[str, Any]:
    return dict(self.rows[i])

  def where(self, i: int) -> str:
    return f"{self.label}:{self.lines[i]}" if self.lines is not None else f"{self.label} row {i}"


class _ArrowTable(_Table):
  def row(self, i: int) -> dict[str, Any]:
    return self.rows.slice(i, 1).to_pylist()[0]


class Records(Sequence):
  """Random access to the records of several tables, in order, optionally a subset of them."""

  def __init__(self, tables: Sequence[_Table], indices: np.ndarray | None = None):
    self._tables = list(tables)
    self._starts = np.cumsum([0] + [len(t) for t in self._tables]).tolist()
    self._indices = indices

  def __len__(self) -> int:
    return self._starts[-1] if self._indices is None else len(self._indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i = int(i % len(self) if self._indices is None else self._indices[i])
    t = bisect.bisect_right(self._starts, i) - 1
    table, local = self._tables[t], i - self._starts[t]
    return {**table.row(local), WHERE: table.where(local)}

  def subset(self, indices: np.ndarray) -> Records:
    base = np.arange(len(self)) if self._indices is None else self._indices
    return Records(self._tables, base[indices])


# ------------------------------------------------------------------------------------ files


def _setting(field: str) -> str:
  """The setting a user wrote: a data field by its name ('train_files'), others in full
  ('task.test_files', '--prompts')."""
  return field if "." in field or field.startswith("-") else f"data.{field}"


def expand(spec: str, field: str) -> list[str]:
  """The files a comma-separated list of globs or directories names, in a stable order."""
  paths: list[str] = []
  for pattern in (p.strip() for p in spec.split(",") if p.strip()):
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
      matches = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                       if n.endswith(EXTENSIONS))
    else:
      matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
    if not matches:
      raise DataError(f"{_setting(field)}: {pattern!r} matches no file; check the path (relative "
                      f"paths start at {os.getcwd()}) or the glob.")
    paths += [m for m in matches if m not in paths]
  for path in paths:
    if not path.endswith(EXTENSIONS):
      raise DataError(f"{_setting(field)}: {path} is not a file kdjax reads ({', '.join(EXTENSIONS)}); "
                      "convert it or leave it out of the glob.")
  return paths


def read_files(spec: str, field: str, txt_unit: str = "line") -> Records:
  return Records([_read_file(path, field, txt_unit) for path in expand(spec, field)])


def _read_file(path: str, field: str, txt_unit: str) -> _Table:
  if os.path.getsize(path) == 0:
    raise DataError(f"{path}: empty file; add records or leave it out of {_setting(field)}.")
  try:
    if path.endswith(".parquet"):
      table = _read_parquet(path)
    elif path.endswith(".txt"):
      table = _read_txt(path, txt_unit)
    elif path.endswith(".json"):
      table = _read_json_list(path)
    else:
      table = _read_jsonl(path)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as "
                    "UTF-8.") from None
  except (OSError, EOFError) as e:  # e.g. a truncated or mislabelled .gz
    raise DataError(f"{path}: cannot be read ({e}); check the file.") from None
  if len(table) == 0:
    raise DataError(f"{path}: holds no records; add records or leave it out of {_setting(field)}.")
  return table


def _read_jsonl(path: str) -> _Table:
  opener = gzip.open if path.endswith(".gz") else open
  rows, lines = [], []
  with opener(path, "rt", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        value = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix or "
                        "remove the line.") from None
      if not isinstance(value, dict):
        raise DataError(f"{path}:{n}: a record must be a JSON object, got "
                        f"{type(value).__name__}; write one object per line.")
      rows.append(value)
      lines.append(n)
  return _Table(rows, path, np.asarray(lines, np.int64))


def _read_json_list(path: str) -> _Table:
  with open(path, encoding="utf-8") as f:
    try:
      value = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file.") from None
  if not isinstance(value, list):
    raise DataError(f"{path}: a .json file must hold a list of records, got "
                    f"{type(value).__name__}; write a list, or one object per line as .jsonl.")
  for i, row in enumerate(value):
    if not isinstance(row, dict):
      raise DataError(f"{path} row {i}: a record must be a JSON object, got "
                      f"{type(row).__name__}; fix the file.")
  return _Table(value, path)


def _read_parquet(path: str) -> _Table:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    return _ArrowTable(pq.read_table(path, memory_map=True), path)
  except (pa.ArrowException, ValueError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); check "
                    "the file.") from None


def _read_txt(path: str, unit: str) -> _Table:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if unit == "file":
    return _Table([{"text": text}], path, np.asarray([1]))
  rows, lines, block, start = [], [], [], 0
  for n, line in enumerate(text.split("\n"), 1):
    if unit == "line":
      if line.strip():
        rows.append({"text": line})
        lines.append(n)
      continue
    if line.strip():  # paragraphs: blocks of non-blank lines
      start = start or n
      block.append(line)
    elif block:
      rows.append({"text": "\n".join(block)})
      lines.append(start)
      block, start = [], 0
  if block:
    rows.append({"text": "\n".join(block)})
    lines.append(start)
  return _Table(rows, path, np.asarray(lines, np.int64))


# ------------------------------------------------------------------------ Hugging Face datasets


def read_hf_dataset(path: str, cache_dir: str) -> dict[str, Records]:
  """Split name -> records of a dataset directory, read with `datasets` and no network."""
  # Read by `datasets` at import: a local directory must never reach for the hub.
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import datasets

  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise DataError(f"data.hf_dataset: {path} is not a directory; give a directory written by "
                    "save_to_disk, or a folder of parquet/jsonl files.")
  saved = any(os.path.exists(os.path.join(path, n)) for n in ("dataset_dict.json", "state.json"))
  try:
    ds = (datasets.load_from_disk(path) if saved else
          datasets.load_dataset(path, cache_dir=cache_dir))
  except Exception as e:  # datasets raises many types; the cause goes into the one line
    reason = " ".join(str(e).split())[:200]
    raise DataError(f"data.hf_dataset: cannot read {path} ({type(e).__name__}: {reason}); give "
                    "a directory written by save_to_disk, or a folder of parquet/jsonl files.") \
        from None
  splits = {"train": ds} if isinstance(ds, datasets.Dataset) else dict(ds)
  return {name: Records([_Table(split, f"{path}[{name}]")]) for name, split in splits.items()}


# ------------------------------------------------------------------------------------ mixed


class Mixed(Sequence):
  """`main`'s records with `extra`'s mixed in, a `weight` fraction of the whole.

  Every record of `main` appears once; record i of the mix is from `extra` when the running
  share floor((i + 1) * weight) steps up, so any stretch of the mix holds `weight` of `extra`'s
  records to within one, and `extra` is cycled through (repeated) as often as that takes. The
  training pipeline shuffles the mix like any source.
  """

  def __init__(self, main: Sequence[Any], extra: Sequence[Any], weight: float):
    if not 0 < weight < 1 or not len(main) or not len(extra):
      raise ValueError(f"Mixed needs records on both sides and 0 < weight < 1, got {weight}")
    self._main, self._extra, self._weight = main, extra, float(weight)
    # The shortest mix that holds every main record (n records hold floor(n * weight) extra).
    n = len(main)
    while n - self._extra_before(n) < len(main):
      n += 1
    self._len = n

  def __len__(self) -> int:
    return self._len

  def _extra_before(self, i: int) -> int:
    return int(np.floor(i * self._weight))

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    k = self._extra_before(i)
    if self._extra_before(i + 1) > k:
      return self._extra[k % len(self._extra)]
    return self._main[i - k]


# ---------------------------------------------------------------------------------- held out


def bucket(row: Mapping[str, Any]) -> float:
  """A record's place in [0, 1), from its content alone (the same on every host and run)."""
  content = {k: v for k, v in row.items() if k != WHERE}
  key = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str).encode()
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64


def hold_out(train: Records, given: Mapping[str, Records | None],
             fractions: Mapping[str, float]) -> dict[str, Records]:
  """train/eval/val records: the given ones, and for each missing one its fraction of the
  train records by `bucket` (val below val_fraction, eval next, train the rest)."""
  missing = [s for s in ("val", "eval") if given.get(s) is None]
  if not missing:
    return {"train": train, **given}
  buckets = np.asarray([bucket(train[i]) for i in range(len(train))])
  lo, out = 0.0, dict(given)
  keep = np.ones(len(train), bool)
  for split in missing:
    hi = lo + fractions[split]
    chosen = (buckets >= lo) & (buckets < hi)
    field = f"data.{split}_fraction"
    if not chosen.any():
      raise DataError(f"{field}={fractions[split]:g} holds out no record of the {len(train)} "
                      f"train records; raise it, or give data.{split}_files.")
    out[split] = train.subset(np.flatnonzero(chosen))
    keep &= ~chosen
    lo = hi
    print(f"kdjax: {split} data: {int(chosen.sum())} of {len(train)} train records held out "
          f"by a hash of their content ({field}={fractions[split]:g})", file=sys.stderr)
  if not keep.any():
    raise DataError("data.eval_fraction + data.val_fraction leave no train records; lower them.")
  out["train"] = train.subset(np.flatnonzero(keep))
  return out
