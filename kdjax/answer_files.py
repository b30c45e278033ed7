"""A model's answers to a file of prompts, written as a dataset that data.train_files reads:
resumable after a kill, split across processes. scripts/teacher_answers.py is its command line.

  <out>/plan.json              what is being answered: a hash of the prompts' ids, the sampling
                               settings, the batch size, the top-k and the teacher; a rerun
                               with other ones is refused
  <out>/parts/part-CCCCCC.*    batch C's answers (.jsonl) and their recorded top-k (.topk, an
                               ArrayRecord file written first): each written whole, as a
                               temporary file renamed, so a killed run leaves whole parts only
  <out>/answers.jsonl          every answer, prompt by prompt and sample by sample, each with
                               `answer_id` = its line; written once every part exists
  <out>/topk.array_record      with record_topk: line k's recorded top-k, and
  <out>/topk_manifest.json     their layout (kdjax.data.answer_logits reads both)
  <out>/manifest.json          counts, tokens, seconds, settings and the teacher

Batches come from answers.plan_batches (prompts sorted by length), and batch C draws its samples
with fold_in(key(seed), C): the same prompts and settings give the same answers however often
the run is interrupted and on however many processes. Batch C belongs to process C mod P, which
runs it on the devices of its own `model.mesh`; a rerun skips every part that exists, so each
prompt is answered exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from array_record.python import array_record_module as array_record
import grain
import jax
import tqdm

from kdjax import answers
from kdjax.data import answer_logits
from kdjax.teacher_cache import format as cache_format

PLAN, MANIFEST, ANSWERS = "plan.json", "manifest.json", "answers.jsonl"
_WRITER_OPTIONS = "group_size:1"  # every record its own chunk: random access


def _write_atomically(path: str, write) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  write(tmp)
  os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  _write_atomically(path, write)


def _write_records(path: str, records: Sequence[bytes]) -> None:
  def write(tmp):
    writer = array_record.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    for r in records:
      writer.write(r)
    writer.close()
  _write_atomically(path, write)


def plan(prompts: Sequence[answers.Prompt], sampling: answers.Sampling, *, batch_size: int,
         record_topk: int, teacher: dict[str, Any]) -> dict[str, Any]:
  ids = hashlib.sha256(json.dumps([list(p.ids) for p in prompts]).encode()).hexdigest()
  return {"prompts": len(prompts), "prompt_ids_sha256": ids,
          "sampling": dataclasses.asdict(sampling), "batch_size": batch_size,
          "record_topk": record_topk, "teacher": teacher}


def _check_plan(out: str, wanted: dict[str, Any]) -> None:
  path = os.path.join(out, PLAN)
  if not os.path.exists(path):
    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    _write_text(path, json.dumps(wanted, indent=1, sort_keys=True))
    return
  with open(path) as f:
    have = json.load(f)
  if have != json.loads(json.dumps(wanted)):
    changed = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
    raise ValueError(f"--out: {out} holds answers of other prompts or settings ({', '.join(changed)} "
                     "differ); rerun with the same ones to resume, or choose another --out.")


def _part(out: str, c: int, ext: str) -> str:
  return os.path.join(out, "parts", f"part-{c:06d}.{ext}")


def write(model: answers.Model, prompts: Sequence[answers.Prompt], sampling: answers.Sampling,
          out: str, *, batch_size: int, record_topk: int = 0, teacher: dict | None = None,
          process_index: int = 0, process_count: int = 1,
          progress: bool = True) -> dict[str, Any] | None:
  """Answers this process's batches that have no part yet; then, if every part exists, writes
  the dataset. Returns the manifest once the dataset is complete, else None."""
  _check_plan(out, plan(prompts, sampling, batch_size=batch_size, record_topk=record_topk,
                        teacher=teacher or {}))
  batches = answers.plan_batches(prompts, batch_size)
  mine = [c for c in range(len(batches)) if c % process_count == process_index]
  todo = [c for c in mine if not os.path.exists(_part(out, c, "jsonl"))]
  topk_manifest = (answer_logits.new_manifest(
      top_k=record_topk, vocab_size=model.cfg.vocab_size,
      max_new_tokens=sampling.max_new_tokens, teacher=teacher) if record_topk else None)
  start, new_tokens = time.perf_counter(), 0
  bar = tqdm.tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress,
                  desc="answering", unit="batch", file=sys.stderr)
  for c in todo:
    got = answers.answer(model, [prompts[i] for i in batches[c]], sampling,
                         key=jax.random.fold_in(jax.random.key(sampling.seed), c),
                         record_topk=record_topk, batch_size=batch_size)
    if record_topk:  # before the jsonl: a part counts as done once its jsonl exists
      _write_records(_part(out, c, "topk"), [
          answer_logits.encode(i, len(a.ids), answer_logits.ids_digest(a.ids), a.topk,
                               topk_manifest) for i, a in enumerate(got)])
    lines = [json.dumps({**answers.as_record(prompts[a.prompt], a), "new_tokens": len(a.ids)},
                        ensure_ascii=False) for a in got]
    _write_text(_part(out, c, "jsonl"), "".join(line + "\n" for line in lines))
    new_tokens += sum(len(a.ids) for a in got)
    bar.update(1)
    bar.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
  bar.close()
  if not all(os.path.exists(_part(out, c, "jsonl")) for c in range(len(batches))):
    return None
  return _merge(out, len(batches), topk_manifest, new_tokens, time.perf_counter() - start)


def _merge(out: str, num_parts: int, topk_manifest: dict | None, new_tokens: int,
           seconds: float) -> dict[str, Any]:
  """answers.jsonl (and its top-k) from the parts, in prompt order, and the manifest."""
  rows = []  # (prompt, sample, record, part, index in part)
  for c in range(num_parts):
    with open(_part(out, c, "jsonl"), encoding="utf-8") as f:
      for i, line in enumerate(f):
        record = json.loads(line)
        rows.append((record["prompt_index"], record["sample"], record, c, i))
  rows.sort(key=lambda r: r[:2])
  if topk_manifest is not None:
    sources = {c: grain.sources.ArrayRecordDataSource([_part(out, c, "topk")])
               for c in range(num_parts)}
    fields = topk_manifest["layout"]
    encoded = []
    for line, (_, _, _, c, i) in enumerate(rows):
      rec = cache_format.decode_record(sources[c][i], fields)
      topk = {cache_format.FIELD_KEYS[k]: rec[k] for k in ("topk_ids", "topk_logprobs",
                                                           "residual")}
      encoded.append(answer_logits.encode(line, int(rec["row"]), rec["digest"], topk,
                                          topk_manifest))
    _write_records(os.path.join(out, answer_logits.RECORDS), encoded)
    _write_text(os.path.join(out, answer_logits.MANIFEST), json.dumps(topk_manifest, indent=1))
  lines = [json.dumps({**r[2], answer_logits.ANSWER_ID: k}, ensure_ascii=False)
           for k, r in enumerate(rows)]
  _write_text(os.path.join(out, ANSWERS), "".join(line + "\n" for line in lines))
  records = [r[2] for r in rows]
  manifest = {"answers": len(records), "prompts": len({r["prompt_index"] for r in records}),
              "finished": sum(bool(r["finished"]) for r in records),
              "new_tokens": sum(r["new_tokens"] for r in records),
              "tokens_this_run": new_tokens, "seconds_this_run": round(seconds, 3),
              "path": os.path.join(out, ANSWERS),
              "topk": os.path.join(out, answer_logits.RECORDS) if topk_manifest else None}
  with open(os.path.join(out, PLAN)) as f:
    manifest["plan"] = json.load(f)
  _write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1))
  return manifest

