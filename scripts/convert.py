"""Converts between Hugging Face model directories and kdjax (orbax) checkpoints.

  # HF -> orbax: a teacher checkpoint for config.teacher_checkpoint (restores sharded, fast)
  python scripts/convert.py --hf_to_orbax --src=/models/Qwen2.5-7B --dst=ckpt/qwen7b \
      --param_dtype=bfloat16
  # orbax -> HF: a distilled student for transformers, vLLM, llama.cpp's converter, ...
  python scripts/convert.py --orbax_to_hf --src=runs/qwen/distilled/checkpoints \
      --dst=export/student --model=student --tokenizer=/models/Qwen2.5-7B
  # a LoRA student (config.student_lora): merged into full weights (the default), or its
  # adapters alone for PEFT (`PeftModel.from_pretrained(<config.student_init model>, dst)`)
  python scripts/convert.py --orbax_to_hf --lora_export=peft --src=runs/x/distilled/checkpoints \
      --dst=export/adapters
  # orbax -> quantized: the student's params really quantized (Qwix's int8/int4 arrays and
  # scales) with the settings that load them (kdjax.quantize.load) for evaluation and sampling;
  # the run's config.student_quant, or --weight / --tile_size for a float student (PTQ).
  python scripts/convert.py --quantize --src=runs/x/distilled/checkpoints --dst=export/int4

Needs kdjax installed: `pip install -e .` in the repo root.

--src is only read. --dst must be new or empty. For orbax -> HF, --src is a kdjax phase's
checkpoints folder (or one --hf_to_orbax wrote); the model is the run config's --model field
(student or teacher), exported as its ModelConfig.family ('' = llama) unless --family is given,
from the kept checkpoint with the lowest held-out loss (or --step).
Params are placed FSDP-sharded over every device, then written one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import os

import kdjax  # noqa: F401  (XLA flags before JAX starts)

import jax
import ml_collections
from absl import app, flags

from kdjax import checkpoint, experiment, hf, lora, quantize, settings, sharding
from kdjax.hf import peft as hf_peft
from kdjax.model import ModelConfig
from kdjax.state import init_params, param_shardings

_HF_TO_ORBAX = flags.DEFINE_bool("hf_to_orbax", False, "Hugging Face dir -> kdjax checkpoint.")
_ORBAX_TO_HF = flags.DEFINE_bool("orbax_to_hf", False, "kdjax checkpoint -> Hugging Face dir.")
_SRC = flags.DEFINE_string("src", None, "What to convert (only read).")
_DST = flags.DEFINE_string("dst", None, "Where to write (new or empty).")
_MODEL = flags.DEFINE_string("model", "student", "orbax -> HF: the run config's model field.")
_FAMILY = flags.DEFINE_string("family", "", f"orbax -> HF: one of {hf.FAMILIES}; '' = the "
                              "model's own ModelConfig.family (or llama).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "orbax -> HF: copy this dir's tokenizer files.")
_STEP = flags.DEFINE_integer("step", None, "orbax -> HF: the checkpoint step; unset = the one "
                             "with the lowest held-out loss (the latest if none was measured).")
_QUANTIZE = flags.DEFINE_bool("quantize", False, "kdjax checkpoint -> quantized params.")
_WEIGHT = flags.DEFINE_string("weight", "", "--quantize: 'int8' or 'int4'; '' = the run's "
                              "config.student_quant.weight.")
_TILE = flags.DEFINE_integer("tile_size", None, "--quantize: unset = the run's "
                             "config.student_quant.tile_size.")
_LORA_EXPORT = flags.DEFINE_enum("lora_export", "merged", ["merged", "peft"],
                                 "orbax -> HF of a LoRA student: merged weights or adapters.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "", "Store params in this dtype ('' keeps "
                                   "the source's).")


def _mesh():
  # FSDP over every local device: each holds a slice, so models larger than one device convert.
  return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def hf_to_orbax(src: str, dst: str, param_dtype: str) -> ModelConfig:
  mesh = _mesh()
  cfg, params = hf.load_pretrained(src, param_dtype=param_dtype or None, mesh=mesh,
                                   rules=sharding.DEFAULT_RULES)
  checkpoint.save_params(dst, params, {"teacher": dataclasses.asdict(cfg),
                                       "student": dataclasses.asdict(cfg), "source": src})
  return cfg


def _saved(src: str, model: str) -> dict:
  saved = checkpoint.saved_config(src)
  if saved is None or model not in saved:
    raise SystemExit(f"--src: {src} holds no kdjax checkpoint with a {model!r} model; point it "
                     "at a phase's checkpoints folder.")
  return saved


def _student(src: str, step: int | None, family: str):
  """(cfg, params) of a run's student: a LoRA student's adapters with their base."""
  run = ml_collections.ConfigDict(_saved(src, "student"))
  cfg = settings.student_model(run)
  if family:
    cfg = dataclasses.replace(cfg, family=family)
  step = checkpoint.best_step(src) if step is None else step
  print(f"reading step {step} of {src}")
  return cfg, experiment.load_student(run, src, _mesh(), sharding.DEFAULT_RULES, step)


def quantize_export(src: str, dst: str, weight: str, tile_size: int | None,
                    step: int | None = None) -> ModelConfig:
  cfg, params = _student(src, step, "")
  quant = dataclasses.replace(cfg.quant, **{k: v for k, v in (("weight", weight),
                                                              ("tile_size", tile_size)) if v})
  if not quant.weight:
    raise SystemExit("--weight: the run has no config.student_quant.weight; give int8 or int4.")
  cfg, params = quantize.float_view(cfg, params) if cfg.lora.rank else (cfg, params)
  q_cfg, q_params = quantize.quantize(dataclasses.replace(cfg, quant=quant), params)
  quantize.save(dst, q_cfg, q_params)
  print(f"{quantize.weight_bytes(q_params):,d} weight bytes ({quant.weight})")
  return q_cfg


def orbax_to_hf(src: str, dst: str, model: str, family: str, tokenizer: str,
                param_dtype: str, step: int | None = None, lora_export: str = "merged"
                ) -> ModelConfig:
  saved = _saved(src, model)
  if model == "student" and saved.get("student_lora", {}).get("rank", 0):
    cfg, params = _student(src, step, family)
    if lora_export == "peft":
      hf_peft.save_peft(dst, cfg, lora.split(params)[1], base_model=saved.get("student_init", ""))
      return cfg
    cfg, params = quantize.float_view(cfg, params)
    hf.save_pretrained(dst, cfg, params, tokenizer_dir=tokenizer or None,
                       dtype=param_dtype or None)
    return cfg
  cfg = ModelConfig.from_dict(saved[model])
  if family:
    cfg = dataclasses.replace(cfg, family=family)
  mesh = _mesh()
  shardings = param_shardings(cfg, mesh, sharding.DEFAULT_RULES)
  like = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), mesh,
                                                  sharding.DEFAULT_RULES))
  step = checkpoint.best_step(src) if step is None else step
  params, step = checkpoint.load_params(src, like, shardings, step)
  print(f"exporting step {step} of {src}")
  hf.save_pretrained(dst, cfg, params, tokenizer_dir=tokenizer or None,
                     dtype=param_dtype or None)
  return cfg


def main(argv):
  del argv
  if (_HF_TO_ORBAX.value + _ORBAX_TO_HF.value + _QUANTIZE.value != 1
      or not (_SRC.value and _DST.value)):
    raise app.UsageError("give exactly one of --hf_to_orbax / --orbax_to_hf / --quantize, and "
                         "--src, --dst.")
  if os.path.exists(_DST.value) and os.listdir(_DST.value):
    raise SystemExit(f"--dst: {_DST.value} is not empty; choose a new directory.")
  try:
    if _HF_TO_ORBAX.value:
      cfg = hf_to_orbax(_SRC.value, _DST.value, _PARAM_DTYPE.value)
    elif _QUANTIZE.value:
      cfg = quantize_export(_SRC.value, _DST.value, _WEIGHT.value, _TILE.value, _STEP.value)
    else:
      cfg = orbax_to_hf(_SRC.value, _DST.value, _MODEL.value, _FAMILY.value, _TOKENIZER.value,
                        _PARAM_DTYPE.value, _STEP.value, _LORA_EXPORT.value)
  except (hf.HFError, FileExistsError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {_DST.value}: {cfg.family or 'llama'}, {cfg.plain.num_params():,d} params, "
        f"{cfg.param_dtype}")


if __name__ == "__main__":
  app.run(main)
