"""LoRA adapters in PEFT's layout: adapter_model.safetensors + adapter_config.json, which
`peft.PeftModel.from_pretrained(<the base model in transformers>, path)` loads."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from kdjax.hf import params_map
from kdjax.model import ModelConfig


def save_peft(path: str, cfg: ModelConfig, adapters: Any, *, base_model: str = "") -> None:
  """Writes `adapters` (kdjax.lora.split's second part) for `cfg`'s family.

  PEFT's lora_A is [r, in] and lora_B [out, r] of each Linear (in and out as Hugging Face's
  [out, in] weight flattens them, which is kdjax's row-major flattening), so they are A and B
  transposed; layer i of a scanned stack is its slice i. GPT-2's fused Conv1D has no per-matrix
  counterpart and is refused. PEFT puts an adapter on every module of a targeted name; those
  that `adapters` lacks keep PEFT's zero B, so they change nothing.
  """
  family = cfg.family or "llama"
  if family == "gpt2":
    raise ValueError("PEFT export of a gpt2 LoRA student: GPT-2 fuses q/k/v in one Conv1D; "
                     "export the merged model instead (scripts/convert.py --lora_export=merged).")
  tensors, targets = {}, set()
  flat = traverse_util.flatten_dict(adapters)
  for k, a in flat.items():
    if not k[-1].endswith("_lora_a"):
      continue
    b = flat[k[:-1] + (k[-1].replace("_lora_a", "_lora_b"),)]
    layer, inner = params_map.layer_path(k[:-1] + ("kernel",), cfg)
    for i in range(cfg.num_layers) if layer == -1 else [layer]:
      a_i, b_i = (a[i], b[i]) if layer == -1 else (a, b)
      hf_weight = params_map.entry_for(cfg, family, inner, i).names[0]
      module = hf_weight[:-len(".weight")]
      targets.add(module.rsplit(".", 1)[-1])
      tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
          np.asarray(jax.device_get(a_i), np.float32).T)
      tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
          np.asarray(jax.device_get(b_i), np.float32).T)
  os.makedirs(path, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
                              metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank,
            "lora_alpha": cfg.lora.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(targets), "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "inference_mode": True,
            "base_model_name_or_path": base_model}
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
