"""Writes a student initialised from a teacher: kept layers, and the heads and MLP neurons that
are most active on calibration text (kdjax.prune).

  python scripts/prune.py --teacher=runs/shakespeare/teacher/checkpoints --output=runs/pruned \
      --keep_layers=0,2 --num_heads=3 --num_kv_heads=3 --mlp_dim=256 \
      --calibration_text=data/calibration.txt \
      --calibration_tokenizer=~/tensorflow_datasets/tokenizers/shakespeare_bpe4096.model

Needs kdjax installed: `pip install -e .` in the repo root.

--teacher is a Hugging Face model directory, a directory `kdjax.prune.save_model` wrote
(model_config.json + params), or a kdjax
phase's checkpoints folder (`<workdir>/teacher/checkpoints`), whose model is the field
--model_field of the run config saved with it. The teacher's files are only read.

Width pruning ranks units on calibration tokens: --calibration (a .npy int array, rows x length,
no padding) or --calibration_text, a UTF-8 file that --calibration_tokenizer (SentencePiece
.model, or a Hugging Face model directory) encodes, cut into --calibration_rows rows of
--calibration_length tokens, each starting with BOS. Scores are averaged over batches of
--batch_size rows. Depth selection alone needs no calibration. Layers are selected after width
pruning; both use the teacher's scores of each kept layer, so the order does not matter.

Prints one JSON line: the student's config and the parameter counts. Seconds on CPU for the
Shakespeare teacher.
"""

from __future__ import annotations

import dataclasses
import json
import os

import kdjax  # noqa: F401  (XLA flags before JAX starts)

import jax
import numpy as np
from absl import app, flags

from kdjax import checkpoint, hf, prune
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.model import ModelConfig

_TEACHER = flags.DEFINE_string("teacher", None, "Teacher: a save_model directory, or a kdjax "
                               "phase's checkpoints folder.")
_MODEL_FIELD = flags.DEFINE_string("model_field", "teacher", "For a checkpoints folder: the run "
                                   "config's field holding its ModelConfig.")
_OUTPUT = flags.DEFINE_string("output", None, "New directory for the student.")
_KEEP_LAYERS = flags.DEFINE_list("keep_layers", [], "Teacher layers to keep, ascending, e.g. "
                                 "0,2,4; empty keeps all.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Query heads per layer; unset keeps all.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", None, "Key/value heads (whole groups) per "
                                     "layer; unset keeps all.")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", None, "MLP neurons per layer; unset keeps all.")
_CALIBRATION = flags.DEFINE_string("calibration", None, "A .npy int array of token ids, rows x "
                                   "length, no padding.")
_CALIBRATION_TEXT = flags.DEFINE_string("calibration_text", None, "A UTF-8 text file to encode "
                                        "with --calibration_tokenizer.")
_TOKENIZER = flags.DEFINE_string("calibration_tokenizer", None, "For --calibration_text: a "
                                 "SentencePiece .model, or a Hugging Face model dir.")
_ROWS = flags.DEFINE_integer("calibration_rows", 64, "Rows cut from --calibration_text.")
_LENGTH = flags.DEFINE_integer("calibration_length", 256, "Tokens per row of --calibration_text.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Calibration rows per forward pass.")


# The model's file format, in and out: the only two functions that change for other formats.


def load_model(path: str) -> tuple[ModelConfig, object]:
  if os.path.isfile(os.path.join(path, "config.json")):
    return hf.load_pretrained(path)
  if os.path.isfile(os.path.join(path, prune.CONFIG_FILE)):
    return prune.load_model(path)
  return load_phase_checkpoint(path, _MODEL_FIELD.value)


def save_model(path: str, cfg: ModelConfig, params, teacher_path: str) -> None:
  """A Hugging Face directory (config.json beside the safetensors, plus the teacher's tokenizer
  files): config.student_init and transformers both read it."""
  hf.save_pretrained(path, cfg, params, tokenizer_dir=teacher_path)


def load_phase_checkpoint(directory: str, field: str) -> tuple[ModelConfig, object]:
  """The latest params of a kdjax phase's checkpoints, read-only, on the default device."""
  config = checkpoint.saved_config(directory)
  if config is None or field not in config:
    raise FileNotFoundError(f"{directory} holds neither {prune.CONFIG_FILE} nor kdjax "
                            f"checkpoints whose run config has a {field!r} model.")
  cfg = ModelConfig.from_dict(config[field])
  like = prune.abstract_params(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, _ = checkpoint.load_params(directory, like, jax.tree.map(lambda _: device, like))
  return cfg, params


def text_calibration(text_path: str, tokenizer_path: str, rows: int, length: int) -> np.ndarray:
  """rows x length token ids from the start of the file: each row is BOS (where the tokenizer
  has one, as every training document starts) and the text's next tokens, in order."""
  tok = tokenizer_lib.load(os.path.expanduser(tokenizer_path))
  bos = [] if tok.bos_id is None else [tok.bos_id]
  per_row = length - len(bos)
  with open(text_path, encoding="utf-8") as f:
    ids = tok.encode(f.read(rows * length * 16))  # characters: far more than the tokens needed
  full_rows = min(rows, len(ids) // per_row)
  if full_rows == 0:
    raise ValueError(f"{text_path} has {len(ids)} tokens: fewer than one row of {length}.")
  body = np.asarray(ids[:full_rows * per_row], np.int32).reshape(full_rows, per_row)
  return np.concatenate([np.full((full_rows, len(bos)), bos, np.int32), body], axis=1)


def mean_scores(cfg: ModelConfig, params, tokens_RxL: np.ndarray, batch_size: int) -> dict:
  """activation_scores averaged over equal batches of `batch_size` rows (the remainder is left
  out, so every token weighs the same and the scores compile once)."""
  batch_size = min(batch_size, len(tokens_RxL))
  batches = [tokens_RxL[i:i + batch_size]
             for i in range(0, len(tokens_RxL) - batch_size + 1, batch_size)]
  scores = [prune.activation_scores(cfg, params, b) for b in batches]
  return {k: np.mean([s[k] for s in scores], axis=0) for k in scores[0]}


def prune_teacher(t_cfg: ModelConfig, t_params, *, keep_layers=(), num_heads=None,
                  num_kv_heads=None, mlp_dim=None, calibration_RxL=None, batch_size=16):
  """(s_cfg, s_params): width pruned by calibration scores, then the kept layers."""
  cfg, params = t_cfg, t_params
  if (num_heads, num_kv_heads, mlp_dim) != (None, None, None):
    if calibration_RxL is None:
      raise ValueError("width pruning ranks units on calibration tokens: pass --calibration or "
                       "--calibration_text with --calibration_tokenizer.")
    scores = mean_scores(cfg, params, calibration_RxL, batch_size)
    cfg, params = prune.prune_width(cfg, params, scores, num_heads=num_heads,
                                    num_kv_heads=num_kv_heads, mlp_dim=mlp_dim)
  if keep_layers:
    cfg, params = prune.select_layers(cfg, params, keep_layers)
  return cfg, params


def main(argv):
  del argv
  if os.path.exists(_OUTPUT.value) and os.listdir(_OUTPUT.value):  # before any work is done
    raise app.UsageError(f"--output: {_OUTPUT.value} is not empty; choose a new directory.")
  t_cfg, t_params = load_model(_TEACHER.value)
  calibration = None
  if _CALIBRATION.value:
    calibration = np.load(_CALIBRATION.value, allow_pickle=False).astype(np.int32)
  elif _CALIBRATION_TEXT.value:
    if not _TOKENIZER.value:
      raise app.UsageError("--calibration_text needs --calibration_tokenizer.")
    calibration = text_calibration(_CALIBRATION_TEXT.value, _TOKENIZER.value, _ROWS.value,
                                   _LENGTH.value)
  s_cfg, s_params = prune_teacher(
      t_cfg, t_params, keep_layers=[int(i) for i in _KEEP_LAYERS.value],
      num_heads=_NUM_HEADS.value, num_kv_heads=_NUM_KV_HEADS.value, mlp_dim=_MLP_DIM.value,
      calibration_RxL=calibration, batch_size=_BATCH_SIZE.value)
  save_model(_OUTPUT.value, s_cfg, s_params, _TEACHER.value)
  print(json.dumps({"output": os.path.abspath(_OUTPUT.value),
                    "teacher_params": t_cfg.num_params(), "student_params": s_cfg.num_params(),
                    "student": dataclasses.asdict(s_cfg)}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["teacher", "output"])
  app.run(main)
