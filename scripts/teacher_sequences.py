"""Samples the teacher's continuations of prompts from the training documents and stores them as
a TFDS dataset to train a student on: sequence-level distillation (Kim & Rush, 2016).

  python scripts/teacher_sequences.py --config=configs/shakespeare.py --workdir=runs/shakespeare \
      [--num_prompts=2048] [--prompt_tokens=16] [--max_new_tokens=...] [--temperature=1.0] \
      [--top_k=0] [--top_p=1.0] [--batch_size=64] [--out=<workdir>/teacher_text]

Needs kdjax installed: `pip install -e .` in the repo root.

The teacher is loaded exactly as the distilled phase loads it (config.teacher_checkpoint,
config.teacher_hf or `<workdir>/teacher`, with config.frozen_teacher's dtypes and rules) and
samples on the config's mesh. Prompts are BOS + the first --prompt_tokens ids of documents of
config.data.train_split, drawn with config.seed; each stored text is a prompt and its
continuation, cut at EOS. By default a prompt and its continuation fill config.data.seq_len
tokens, one training row. Temperature 0 is greedy; top_k 0 and top_p 1.0 are off.

The dataset goes to --out (split 'train'; see kdjax/data/teacher_text.py for the format, and
teacher_text.load_source to read it); an existing --out is never overwritten. Prints one JSON
line: the path, the examples, the tokens (prompt and new) and the seconds taken.

One process only (every process would write the same files).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

# kdjax before JAX: its __init__ sets XLA flags that must precede the backend's start.
from kdjax import (cli, config_check, continuations, experiment, inputs, preflight, sharding,
                   teacher_cache)
from kdjax.data import teacher_text

from absl import app, flags
from absl import logging as absl_logging
import grain
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The experiment's workdir (its teacher).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 2048, "Prompts, hence stored texts.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 16, "Document tokens per prompt (BOS "
                                      "comes on top).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Sampled tokens per prompt; "
                                       "default: config.data.seq_len minus the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the nucleus of this mass; 1.0 = off.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Prompts per generation batch.")
_OUT = flags.DEFINE_string("out", None, "New directory for the dataset; default "
                           "<workdir>/teacher_text.")


def _check_settings(num_prompts: int, prompt_tokens: int, max_new_tokens: int | None,
                    temperature: float, top_k: int, top_p: float, batch_size: int) -> None:
  problems = [f"--{name} {why}" for name, bad, why in (
      ("num_prompts", num_prompts < 1, "must be >= 1"),
      ("prompt_tokens", prompt_tokens < 1, "must be >= 1"),
      ("max_new_tokens", max_new_tokens is not None and max_new_tokens < 1, "must be >= 1"),
      ("temperature", temperature < 0, "must be >= 0 (0 is greedy)"),
      ("top_k", top_k < 0, "must be >= 0 (0 is off)"),
      ("top_p", not 0 < top_p <= 1, "must be in (0, 1] (1 is off)"),
      ("batch_size", batch_size < 1, "must be >= 1")) if bad]
  if problems:
    raise app.UsageError("; ".join(problems) + ".")


def generate(config, workdir: str, out: str, *, num_prompts: int, prompt_tokens: int,
             max_new_tokens: int | None, temperature: float, top_k: int, top_p: float,
             batch_size: int) -> dict:
  """Writes the dataset to `out`; returns its summary (path, examples, tokens)."""
  preflight.preflight(config, workdir, ("distilled",), teacher_only=True)
  if os.path.exists(out):  # before loading anything
    raise ValueError(f"{out} exists; teacher text is never overwritten: remove it or pass "
                     "another --out.")
  d = config.data
  src = inputs.load_sources(config)  # checks the data and the tokenizer's fit
  if src.encode.fmt != "text":
    raise ValueError(f"teacher sequences continue text documents; data.format is "
                     f"{src.encode.fmt!r}. Use text records (data.format='text').")
  # {'text': ...} examples, whatever field of the user's records holds the text.
  train_source = grain.MapDataset.source(src.train).map(
      lambda r: {"text": src.encode.canonical(r)["text"]})
  tokenizer = src.tokenizer
  prompt_width = prompt_tokens + (tokenizer.bos_id is not None)
  # Prompt and continuation fill one training row (the pipeline's BOS included).
  max_new_tokens = max_new_tokens or int(d.seq_len) - prompt_width
  if max_new_tokens < 1 or prompt_width + max_new_tokens > config.teacher.max_len:
    raise app.UsageError(
        f"--max_new_tokens={max_new_tokens} with --prompt_tokens={prompt_tokens}: a sequence "
        f"must have new tokens and fit teacher.max_len={config.teacher.max_len}; lower "
        "--prompt_tokens or set --max_new_tokens.")
  prompts = teacher_text.prompts_from_source(train_source, tokenizer, num_prompts=num_prompts,
                                             prompt_tokens=prompt_tokens, seed=config.seed)

  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  teacher = experiment.load_teacher(config, workdir, mesh, rules)
  start = time.time()
  ids = continuations.continuation_ids(
      teacher.cfg, teacher.params, prompts, max_new_tokens=max_new_tokens,
      pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k,
      top_p=top_p, batch_size=batch_size, rng=jax.random.key(config.seed), mesh=mesh)
  seconds = time.time() - start
  texts = [continuations.decode(tokenizer, row) for row in ids]
  new_tokens = sum(len(row) - len(p) for row, p in zip(ids, prompts))
  counts = {"examples": len(texts), "prompt_tokens": sum(map(len, prompts)),
            "new_tokens": new_tokens,
            "stopped_at_eos": sum(len(row) - len(p) < max_new_tokens
                                  for row, p in zip(ids, prompts)),
            "generation_seconds": round(seconds, 1)}
  metadata = {
      "teacher": teacher_cache.teacher_fingerprint(config, workdir),
      "data": {k: config.data[k] for k in ("name", "train_split", "text_key",
                                           "tokenizer_path", "vocab_size")},
      "prompts": {"num_prompts": num_prompts, "prompt_tokens": prompt_tokens,
                  "seed": int(config.seed)},
      "generation": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                     "top_k": top_k, "top_p": top_p, "batch_size": batch_size,
                     "rng_seed": int(config.seed)},
      "counts": counts,
  }
  path = teacher_text.write_dataset(out, {"train": texts}, metadata=metadata)
  return {"path": path, "examples": len(texts), "tokens": counts["prompt_tokens"] + new_tokens,
          "new_tokens": new_tokens, "new_tokens_per_second": round(new_tokens / seconds, 1)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required.")
  # JAX, Orbax and TFDS log routine progress at INFO/WARNING; the user sees this script's line.
  absl_logging.set_verbosity(absl_logging.ERROR)
  if jax.process_count() > 1:
    raise app.UsageError("teacher_sequences.py runs on one process (it writes every text).")
  settings = dict(num_prompts=_NUM_PROMPTS.value, prompt_tokens=_PROMPT_TOKENS.value,
                  max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                  top_k=_TOP_K.value, top_p=_TOP_P.value, batch_size=_BATCH_SIZE.value)
  _check_settings(**settings)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  workdir = os.path.abspath(workdir)
  out = os.path.abspath(_OUT.value or os.path.join(workdir, "teacher_text"))
  start = time.time()
  try:
    # TFDS prints dataset preparation to stdout, which is this script's one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
      summary = generate(config, workdir, out, **settings)
  except (config_check.ConfigError, ValueError, FileNotFoundError) as e:
    cli.fail(cli.one_line(e), prog="teacher_sequences")
  print(json.dumps(dict(summary, seconds=round(time.time() - start, 1))))


if __name__ == "__main__":
  app.run(main)
