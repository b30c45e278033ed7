"""A teacher answers a file of prompts; its answers (and, optionally, its top-k log-probs at every
answer token) become a dataset that `data.train_files` reads (kdjax.answer_files).

  python scripts/teacher_answers.py --prompts=prompts.jsonl --out=runs/answers \
      --config=configs/X.py --workdir=runs/X            # the teacher of a kdjax run
  python scripts/teacher_answers.py --prompts=prompts.jsonl --out=runs/answers \
      --teacher_hf=path/to/hf_model                     # a Hugging Face model and its template
      [--max_new_tokens=256] [--temperature=0] [--top_k=0] [--top_p=1] [--num_samples=1]
      [--batch_size=64] [--record_topk=0] [--seed=0] [--process_index=I --process_count=N]
  python scripts/teacher_answers.py --from_documents=8192 [--prompt_tokens=16] --temperature=1 \
      --config=configs/X.py --workdir=runs/X [--out=runs/X/teacher_text]   # sequence-level data

Needs kdjax installed: `pip install -e .` in the repo root.

Prompts are prompt or chat records (kdjax.data.records.prompt_of): {'prompt': str or messages},
or a chat ending with a user turn (a final assistant turn is taken as the reference and
dropped). A string prompt is continued after [BOS] prompt; messages through the chat template
with its generation prompt (the teacher's own, for --teacher_hf). Each answer ends at the
tokenizer's EOS (and a Hugging Face model's generation_config eos ids) or --max_new_tokens.

The output is resumable: rerun the same command after a kill and only the missing batches are
answered; every prompt is answered exactly once. With --process_count=N, run the command once per
process (index 0..N-1, on any hosts sharing --out): each answers its share of the batches on its
own devices, and the one that finishes last writes answers.jsonl. Prints one JSON line, the
manifest, when the dataset is complete. To train on it:

  --config.data.train_files=runs/answers/answers.jsonl
  --config.distill.teacher_cache=runs/answers --config.distill.cache_estimator=topk_residual
                                                        # with --record_topk: answers and logits

With --from_documents=N instead of --prompts, the prompts are the first --prompt_tokens ids
(after BOS) of N training documents of --config's data, drawn with config.seed, and each prompt
with its continuation is stored as one text (sequence-level distillation, Kim & Rush 2016) in a
teacher_text dataset that `--config.distill.sequence_data=OUT` trains on
(kdjax.continuations.write_sequence_data). By default a prompt and its continuation fill
config.data.seq_len tokens; OUT (default <workdir>/teacher_text) is never overwritten; one
process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

# kdjax before JAX: its __init__ sets XLA flags that must precede the backend's start.
from kdjax import answer_files, answers, cli, config_check, experiment, settings, sharding
from kdjax.data import records, sources

from absl import app, flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags

_PROMPTS = flags.DEFINE_string("prompts", None, "Globs of prompt or chat records (.jsonl, ...).")
_OUT = flags.DEFINE_string("out", None, "Directory for the answers (resumed if it holds some).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A kdjax config: its teacher answers.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "With --config: the run's workdir (its teacher).")
_TEACHER_HF = flags.DEFINE_string("teacher_hf", None, "A Hugging Face model directory to answer "
                                  "with (instead of --config).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "New tokens per answer at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the nucleus of this mass; 1 = off.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Answers per prompt (temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Prompts per batch (times num_samples).")
_RECORD_TOPK = flags.DEFINE_integer("record_topk", 0, "Also record the teacher's top-k log-probs "
                                    "at every answer token; 0 = off.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "This process, 0..N-1; default JAX's.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None, "Processes sharing --out; default "
                                      "JAX's.")
_FROM_DOCUMENTS = flags.DEFINE_integer("from_documents", 0, "Instead of --prompts: continue the "
                                      "starts of this many training documents of --config.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 16, "With --from_documents: document ids "
                                      "per prompt (BOS comes on top).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar with tokens/s.")


def _from_config(config, workdir: str, mesh) -> tuple[answers.Model, dict]:
  from kdjax import inputs, preflight, teacher_cache
  preflight.preflight(config, workdir, ("distilled",), teacher_only=True)
  if "task" in config:
    from kdjax import task
    encoder = task.prepare(config).encoder
  else:
    encoder = inputs.load_sources(config).encode
  teacher = experiment.load_teacher(config, workdir, mesh, sharding.rules_from_config(config))
  hf_dir = config.teacher_hf
  stops = answers.stop_ids(encoder.tokenizer, answers.hf_stop_ids(hf_dir) if hf_dir else ())
  return (answers.Model(teacher.cfg, teacher.params, encoder, stops, mesh),
          teacher_cache.teacher_fingerprint(config, workdir))


def run(out: str, sampling: answers.Sampling, *, batch_size: int, record_topk: int,
        process_index: int, process_count: int, progress: bool) -> dict | None:
  config, teacher_hf = _CONFIG.value, _TEACHER_HF.value
  if bool(config) == bool(teacher_hf):
    raise app.UsageError("give --config (with --workdir) or --teacher_hf, one of them.")
  if config is not None:
    if not _WORKDIR.value:
      raise app.UsageError("--config needs --workdir (the run whose teacher answers).")
    mesh = sharding.make_mesh(config.mesh)
    model, teacher = _from_config(config, os.path.abspath(_WORKDIR.value), mesh)
  else:
    mesh = sharding.make_mesh(settings.config_section(settings.MeshSettings))
    model, teacher = answers.hf_model(teacher_hf, mesh)
  if record_topk > model.cfg.vocab_size:
    raise app.UsageError(f"--record_topk={record_topk} is above the teacher's vocabulary "
                         f"({model.cfg.vocab_size}).")
  source = sources.read_files(_PROMPTS.value, "--prompts")
  prompts = answers.read_prompts(source, model.encoder, max_len=model.cfg.max_len,
                                 max_new_tokens=sampling.max_new_tokens,
                                 name=f"--prompts={_PROMPTS.value}")
  return answer_files.write(model, prompts, sampling, out, batch_size=batch_size,
                            record_topk=record_topk, teacher=teacher,
                            process_index=process_index, process_count=process_count,
                            progress=progress)


def from_documents(sampling: answers.Sampling) -> dict:
  """--from_documents: sequence-level data from the starts of the config's training documents."""
  from kdjax import continuations
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir or _TEACHER_HF.value or _PROMPTS.value:
    raise app.UsageError("--from_documents needs --config and --workdir (the run whose teacher "
                         "continues its documents), and takes no --prompts or --teacher_hf.")
  if jax.process_count() > 1 or (_PROCESS_COUNT.value or 1) > 1:
    raise app.UsageError("--from_documents runs on one process (it writes every text).")
  if _RECORD_TOPK.value or sampling.num_samples != 1 or _PROMPT_TOKENS.value < 1:
    raise app.UsageError("--from_documents takes --prompt_tokens >= 1, and no --record_topk or "
                         "--num_samples.")
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  workdir = os.path.abspath(workdir)
  # Unset, a prompt and its continuation fill one training row (config.data.seq_len).
  max_new = sampling.max_new_tokens if flags.FLAGS["max_new_tokens"].present else None
  return continuations.write_sequence_data(
      config, workdir, os.path.abspath(_OUT.value or os.path.join(workdir, "teacher_text")),
      num_prompts=_FROM_DOCUMENTS.value, prompt_tokens=_PROMPT_TOKENS.value,
      max_new_tokens=max_new, temperature=sampling.temperature, top_k=sampling.top_k,
      top_p=sampling.top_p, batch_size=_BATCH_SIZE.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  documents = _FROM_DOCUMENTS.value
  if documents < 0:
    raise app.UsageError("--from_documents must be >= 1 (or 0: answer --prompts).")
  if not documents and (not _PROMPTS.value or not _OUT.value):
    raise app.UsageError("--prompts and --out are required (or --from_documents=N).")
  absl_logging.set_verbosity(absl_logging.ERROR)
  sampling = answers.Sampling(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                              top_k=_TOP_K.value, top_p=_TOP_P.value,
                              num_samples=_NUM_SAMPLES.value, seed=_SEED.value)
  problems = [f"--{p}" for p in sampling.problems()]
  problems += [f"--{name} must be >= {low}" for name, value, low in (
      ("batch_size", _BATCH_SIZE.value, 1), ("record_topk", _RECORD_TOPK.value, 0)) if value < low]
  if problems:
    raise app.UsageError("; ".join(problems) + ".")
  count = jax.process_count() if _PROCESS_COUNT.value is None else _PROCESS_COUNT.value
  index = jax.process_index() if _PROCESS_INDEX.value is None else _PROCESS_INDEX.value
  if not 0 <= index < count:
    raise app.UsageError(f"--process_index={index} is not in [0, --process_count={count}).")
  try:
    with contextlib.redirect_stdout(sys.stderr):  # stdout is this script's one JSON line
      if documents:
        summary = from_documents(sampling)
      else:
        manifest = run(os.path.abspath(_OUT.value), sampling, batch_size=_BATCH_SIZE.value,
                       record_topk=_RECORD_TOPK.value, process_index=index, process_count=count,
                       progress=_PROGRESS.value)
  except (config_check.ConfigError, records.DataError, ValueError, FileNotFoundError) as e:
    cli.fail(cli.one_line(e), prog="teacher_answers")
  if documents:
    print(json.dumps(summary))
  elif manifest is None:
    print(f"teacher_answers: process {index} of {count} done; answers.jsonl is written when "
          "every process has finished.", file=sys.stderr)
  else:
    print(json.dumps(manifest))


if __name__ == "__main__":
  app.run(main)
