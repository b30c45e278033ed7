"""Really quantized students: Qwix PTQ of a student's float params, for evaluation, sampling and
export.

    q_cfg, q_params = quantize(cfg, params)      # cfg.quant says int8 or int4 (kdjax.model)
    logits = qwix_model.build_ptq(q_cfg).apply({"params": q_params}, tokens)
    weight_bytes(q_params)                       # at the stored bit widths, scales included
    save(directory, q_cfg, q_params); q_cfg, q_params = load(directory)

A quantized kernel is Qwix's `WithAux(QArray(qvalue, scale))`: `qvalue` int8 or int4 in the
kernel's shape, `scale` float with size 1 on the contracted axes (per output channel, or per
tile of `cfg.quant.tile_size` along the last contracted axis); the rest stays float. The layers
are unrolled first (model.unstack_layers): Qwix derives per-layer scale axes and would misread
nn.scan's [S, ...] stacks.

`float_view(cfg, params)` is what decoding runs (kdjax.sample): the plain model with each
quantized kernel dequantized, which is the weight the PTQ model multiplies by when activations
stay float; a LoRA student's adapters merged into its kernels (kdjax.lora).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix._src.providers.ptq import WithAux  # Qwix's quantized-param type; not re-exported

from kdjax import checkpoint, lora, qwix_model
from kdjax.model import ModelConfig, unstack_layers

CONFIG_FILE = "kdjax_quantized.json"


def _is_quantized_leaf(x: Any) -> bool:
  return isinstance(x, WithAux)


def is_quantized(params: Any) -> bool:
  return any(_is_quantized_leaf(x) for x in jax.tree.leaves(params, is_leaf=_is_quantized_leaf))


def _abstract(q_cfg: ModelConfig) -> Any:
  """The PTQ model's boxed abstract params: each matched kernel a WithAux that says how."""
  model = qwix_model.build_ptq(q_cfg)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def quantize(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """(q_cfg, q_params): `params` (float, the tree `cfg` trains) quantized as `cfg.quant` says,
  layers unrolled. Already quantized params pass through."""
  if not cfg.quant.weight:
    raise ValueError("quantize: cfg.quant.weight is '' (set config.student_quant.weight).")
  q_cfg, params = unstack_layers(cfg, params)
  if is_quantized(params):
    return q_cfg, params
  return q_cfg, qwix.quantize_params(jax.tree.map(jnp.asarray, params), _abstract(q_cfg))


def dequantized(params: Any) -> Any:
  """Float params: each quantized kernel as qvalue * scale, the rest as it is."""
  return jax.tree.map(lambda x: qwix.dequantize(x.array) if _is_quantized_leaf(x) else x,
                      params, is_leaf=_is_quantized_leaf)


def float_view(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """(plain cfg, float params) that compute what `cfg`'s evaluated model computes, for decoding:
  quantized weights dequantized (the float QAT params quantized first), LoRA adapters merged."""
  if cfg.lora.rank:
    return cfg.plain, lora.merged(cfg, params)
  if cfg.quant.weight:
    q_cfg, q_params = quantize(cfg, params)
    return q_cfg.plain, dequantized(q_params)
  return cfg, params


def weight_bytes(params: Any) -> int:
  """Bytes of the params at their stored bit widths (int4 counts half a byte), scales included."""
  bits = sum(x.size * jax.dtypes.itemsize_bits(x.dtype) for x in jax.tree.leaves(params))
  return int(bits // 8)


def save(directory: str, q_cfg: ModelConfig, q_params: Any) -> None:
  """Writes the quantized params (orbax, int4 stays int4) and the settings that load them."""
  checkpoint.save_params(directory, q_params, {"student": dataclasses.asdict(q_cfg),
                                               "quantized": True})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump({"student": dataclasses.asdict(q_cfg)}, f, indent=2, sort_keys=True)


def load(directory: str, sharding: jax.sharding.Sharding | None = None
         ) -> tuple[ModelConfig, Any]:
  """(q_cfg, q_params) that `save` wrote, each array placed with `sharding` (default: this
  process's first device)."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: point at a folder written by "
                            "scripts/convert.py --quantize.")
  with open(path) as f:
    q_cfg = ModelConfig.from_dict(json.load(f)["student"])
  like = nn.meta.unbox(_abstract(q_cfg))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params, _ = checkpoint.load_params(directory, like, jax.tree.map(lambda _: sharding, like))
  return q_cfg, params
