"""Writing kdjax params as a Hugging Face model directory (export / save_pretrained).

The directory holds config.json, model.safetensors (or numbered shards with an index) and,
optionally, the teacher's tokenizer files: what transformers' AutoModelForCausalLM and
AutoTokenizer load. Params are gathered and written one at a time, so the host holds at most
one shard's worth of tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from kdjax.hf import params_map
from kdjax.hf.config import hf_config
from kdjax.model import ModelConfig


def save_pretrained(path: str, cfg: ModelConfig, params: Any, *, tokenizer_dir: str | None = None,
                    dtype: str | None = None, max_shard_bytes: int = 4 << 30,
                    extra_config: dict[str, Any] | None = None) -> None:
  """Writes config.json and model.safetensors (sharded with an index past `max_shard_bytes`)
  that transformers' AutoModelForCausalLM.from_pretrained loads, plus the tokenizer files of
  `tokenizer_dir`. Tensors are written in `dtype` (default cfg.param_dtype). Only process 0
  writes; every process must call it (gathering a sharded param is collective)."""
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  hf = hf_config(dataclasses.replace(cfg, param_dtype=dtype.name), **(extra_config or {}))
  writing = jax.process_index() == 0
  if writing:
    os.makedirs(path, exist_ok=True)
  names, current, size = [], {}, 0  # names: each written shard's tensor names

  def flush():
    nonlocal current, size
    if writing:
      save_file(current, os.path.join(path, f".shard-{len(names)}.safetensors"),
                metadata={"format": "pt"})
    names.append(list(current))
    current, size = {}, 0  # every process drops its host copies

  for name, tensor in _hf_tensors(cfg, params, dtype):
    current[name] = np.ascontiguousarray(tensor)
    size += tensor.nbytes
    if size >= max_shard_bytes:
      flush()
  if current or not names:
    flush()
  if not writing:
    return
  _rename_shards(path, len(names), names)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if tokenizer_dir:
    # Here, not at the top: hf_tokenizer imports sentencepiece, which reading and writing
    # checkpoints otherwise never needs.
    from kdjax.data import hf_tokenizer
    for name in (*hf_tokenizer.TOKENIZER_FILES, "generation_config.json"):
      if os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(path, name))


def _host_array(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _hf_tensors(cfg: ModelConfig, params: Any, dtype) -> Any:
  """Yields (name, tensor) pairs one kdjax param at a time."""
  family = cfg.family or "llama"
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = tuple(k.key for k in key_path)
    if p == ("unembed", "kernel") and cfg.tie_embeddings:
      continue
    layer, inner = params_map.layer_path(p, cfg)
    value = _host_array(leaf).astype(dtype)
    per_layer = ([(i, value[i]) for i in range(cfg.num_layers)] if layer == -1
                 else [(layer, value)])
    for i, v in per_layer:
      entry = params_map.entry_for(cfg, family, inner, i)
      if entry.to_hf is None:  # a third of GPT-2's fused c_attn: written with the other two
        continue
      yield from zip(entry.names, entry.to_hf(v))
  if family == "gpt2":
    yield from _gpt2_fused(cfg, params, dtype)


def _gpt2_fused(cfg, params, dtype):
  """GPT-2's c_attn of each layer: query, key and value kernels (and biases) concatenated."""
  _, layer_prefix = params_map.prefixes("gpt2", None)
  for i in range(cfg.num_layers):
    layer = (jax.tree.map(lambda x: x[i], params["layers"]) if cfg.scan_layers
             else params[f"layer_{i}"])
    attn = layer["attn"]
    q, k, v = (_host_array(attn[n]["kernel"]).astype(dtype) for n in ("query", "key", "value"))
    qb, kb, vb = (_host_array(attn[n]["bias"]).astype(dtype) for n in ("query", "key", "value"))
    d = cfg.d_model
    yield (layer_prefix.format(i) + "attn.c_attn.weight",
           np.concatenate([x.reshape(d, -1) for x in (q, k, v)], axis=-1))
    yield (layer_prefix.format(i) + "attn.c_attn.bias",
           np.concatenate([x.reshape(-1) for x in (qb, kb, vb)]))


def _rename_shards(path: str, count: int, names: list[list[str]]) -> None:
  """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
  if count == 1:
    files = ["model.safetensors"]
  else:
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
  for i, file in enumerate(files):
    os.replace(os.path.join(path, f".shard-{i}.safetensors"), os.path.join(path, file))
  if count > 1:
    index = {"metadata": {}, "weight_map": {n: files[i] for i, ns in enumerate(names) for n in ns}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
