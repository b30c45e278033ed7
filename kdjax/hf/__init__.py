"""Hugging Face checkpoints in and out: config.json + *.safetensors <-> (ModelConfig, params).

    cfg, params = hf.load_pretrained("/models/Qwen2.5-1.5B")          # bf16 stays bf16
    logits_BxLxV = Transformer(cfg).apply({"params": params}, tokens_BxL)
    hf.save_pretrained("/out/student", cfg, params, tokenizer_dir="/models/Qwen2.5-1.5B")

Families: llama (Llama 2/3.x, with Llama 3 RoPE scaling), mistral, qwen2, qwen3, gemma, gemma2 and
gpt2. Loading reads one tensor at a time from memory-mapped safetensors straight into this host's
shards of the target sharding; nothing is unpickled. The weight layout is the only translation, so
conversion is exact in both directions.

One concern per module:
  config.py      config.json <-> ModelConfig: read_config, model_config, hf_config, FAMILIES,
                 ARCHITECTURES, HFError (every module's error)
  params_map.py  per-family tensor names and layouts of each kdjax param (Entry, entry_for)
  load.py        safetensors -> sharded params: check_checkpoint, load_params, load_pretrained
  save.py        params -> a directory transformers loads: save_pretrained

Layering: this package needs the params' shardings (kdjax.state), never the training step.
"""

from kdjax.hf.config import (ARCHITECTURES, FAMILIES, HFError, hf_config, model_config,
                             read_config)
from kdjax.hf.load import check_checkpoint, load_params, load_pretrained
from kdjax.hf.params_map import abstract_params
from kdjax.hf.save import save_pretrained

__all__ = ["ARCHITECTURES", "FAMILIES", "HFError", "abstract_params", "check_checkpoint",
           "hf_config", "load_params", "load_pretrained", "model_config", "read_config",
           "save_pretrained"]
