"""config.json <-> ModelConfig, for every family kdjax reads and writes.

A field the file leaves out takes transformers' default for its family, so both compute the same
thing; a config.json kdjax cannot reproduce exactly (an unsupported RoPE scaling, activation or
attention flag) is refused with an HFError naming the field, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from kdjax.blockwise_attention import ATTENTION_KERNEL_FIELDS
from kdjax.model import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}

# transformers' defaults where a family's config.json may leave a field out.
_DEFAULTS = {
    "gemma": dict(head_dim=256, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", sliding_window=4096,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "mistral": dict(sliding_window=4096, hidden_act="silu"),
    "qwen3": dict(head_dim=128, hidden_act="silu"),
    "llama": dict(hidden_act="silu"),
    "qwen2": dict(hidden_act="silu"),
}


class HFError(ValueError):
  """A checkpoint kdjax cannot read or write; the message names the file or field and the fix."""


# ----------------------------------------------------------------------------- reading


def read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise HFError(f"{path}: no config.json; point at a Hugging Face model directory.")
  with open(file) as f:
    return json.load(f)


def model_config(path_or_hf: str | dict[str, Any], *, dtype: str | None = None,
                 param_dtype: str | None = None, scan_layers: bool = True) -> ModelConfig:
  """The ModelConfig of a Hugging Face config (a model directory or its parsed config.json).

  Params keep the checkpoint's dtype (bf16 stays bf16) unless `param_dtype` says otherwise;
  compute runs in `dtype`, by default the params' dtype. A field the file leaves out takes
  transformers' default for the family, so both compute the same thing.
  """
  hf = read_config(path_or_hf) if isinstance(path_or_hf, str) else dict(path_or_hf)
  try:
    return _model_config(hf, dtype, param_dtype, scan_layers)
  except KeyError as e:
    raise HFError(f"config.json: missing field {e.args[0]!r}, which kdjax needs for a "
                  f"{hf.get('model_type')} model.") from None


def _model_config(hf, dtype, param_dtype, scan_layers) -> ModelConfig:
  hf = {**_DEFAULTS.get(hf.get("model_type"), {}), **hf}
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise HFError(f"config.json: model_type {family!r} is not supported; kdjax reads {FAMILIES}.")
  param_dtype = param_dtype or _checkpoint_dtype(hf)
  common = dict(family=family, dtype=dtype or param_dtype, param_dtype=param_dtype,
                scan_layers=scan_layers, vocab_size=hf["vocab_size"])
  if family == "gpt2":
    return _gpt2_config(hf, common)

  heads = hf["num_attention_heads"]
  cfg = dict(
      **common, **_rope(hf), d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
      norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
      activation=_activation(family, hf.get("hidden_activation" if family == "gemma2"
                                            else "hidden_act")),
      tie_embeddings=hf.get("tie_word_embeddings", family.startswith("gemma")),
      qkv_bias=hf.get("attention_bias", family == "qwen2"),
      out_bias=hf.get("attention_bias", False) and family != "qwen2",
      mlp_bias=hf.get("mlp_bias", False))
  if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    raise HFError("config.json: use_sliding_window=true is not supported for Qwen; set it false.")
  if family == "mistral":
    cfg.update(sliding_window=hf.get("sliding_window") or 0)
  elif family == "qwen3":
    cfg.update(qk_norm=True)
  elif family.startswith("gemma"):
    cfg.update(norm_plus_one=True, embed_scale=True)
  if family == "gemma2":
    cfg.update(post_norms=True, query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
               attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
               logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
               sliding_window=hf.get("sliding_window") or 0,
               global_every=_global_every(hf.get("layer_types"), default=2))
  out = ModelConfig(**cfg)
  types = hf.get("layer_types")
  if types and [t == "sliding_attention" for t in types] != [
      out.is_local(i) for i in range(out.num_layers)]:
    raise HFError(f"config.json: layer_types {types} is not the {family} pattern kdjax "
                  "implements (sliding_window with every global_every-th layer global).")
  return out


def _gpt2_config(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
  _refuse(hf, "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
  if not hf.get("scale_attn_weights", True):
    raise HFError("config.json: scale_attn_weights=false is not supported.")
  d = hf["n_embd"]
  return ModelConfig(
      **common, d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
      num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d,
      max_len=hf["n_positions"],
      activation=_activation("gpt2", hf.get("activation_function", "gelu_new")),
      norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      tie_embeddings=hf.get("tie_word_embeddings", True), position_embedding="learned",
      qkv_bias=True, out_bias=True, mlp_bias=True)


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
  """RoPE fields from either config style: top-level rope_theta/rope_scaling (the hub's files)
  or transformers 5's rope_parameters."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {}) or params
  theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  out = dict(rope_theta=float(theta))
  if kind == "llama3":
    out.update(rope_scaling=float(scaling["factor"]),
               rope_low_freq_factor=float(scaling["low_freq_factor"]),
               rope_high_freq_factor=float(scaling["high_freq_factor"]),
               rope_original_max_len=int(scaling.get("original_max_position_embeddings")
                                         or hf["max_position_embeddings"]))
  elif kind != "default":
    raise HFError(f"config.json: rope scaling type {kind!r} is not supported; kdjax implements "
                  "'default' and 'llama3'.")
  return out


def _checkpoint_dtype(hf: dict[str, Any]) -> str:
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return {"float16": "float32"}.get(dtype, dtype)  # fp16 overflows in training: use f32


def _global_every(layer_types: list[str] | None, default: int) -> int:
  """The period of global layers in `layer_types` (0: none), e.g. 2 for Gemma 2's alternation;
  a student keeping some of its teacher's layers may have another (checked by the caller)."""
  if not layer_types:
    return default
  if "full_attention" not in layer_types:
    return 0
  return layer_types.index("full_attention") + 1


def _refuse(hf, *flags):
  for flag in flags:
    if hf.get(flag):
      raise HFError(f"config.json: {flag}=true is not supported; kdjax implements the default.")


def _activation(family: str, name: str | None) -> str:
  if family == "gemma" and name == "gelu":  # what transformers makes of Gemma's legacy value
    name = "gelu_pytorch_tanh"
  acts = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu",
          "gelu_new": "gelu", "gelu_fast": "gelu"}
  if name not in acts:
    raise HFError(f"config.json: activation {name!r} is not supported; kdjax implements "
                  f"{sorted(acts)} (GELU in its tanh form).")
  return acts[name]


# ----------------------------------------------------------------------------- writing


def hf_config(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
  """config.json for `cfg` in its family (`cfg.family`, '' = llama); refuses a cfg the family
  cannot express, since transformers would then compute something else."""
  family = cfg.family or "llama"
  dtype = jnp.dtype(cfg.param_dtype).name
  base = dict(architectures=[ARCHITECTURES.get(family, "")], model_type=family,
              vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype=dtype,
              torch_dtype=dtype)
  if family == "gpt2":
    hf = dict(base, n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
              n_inner=cfg.mlp_dim, n_positions=cfg.max_len, n_ctx=cfg.max_len,
              layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
              scale_attn_weights=True)
  else:
    hf = dict(base, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.head_size, intermediate_size=cfg.mlp_dim,
              max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    act = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation)
    hf.update(hidden_act=act, hidden_activation=act)
    if cfg.rope_scaling > 0:
      hf["rope_scaling"] = dict(
          rope_type="llama3", factor=cfg.rope_scaling, low_freq_factor=cfg.rope_low_freq_factor,
          high_freq_factor=cfg.rope_high_freq_factor,
          original_max_position_embeddings=cfg.rope_original_max_len)
    if family in ("mistral", "gemma2"):
      hf["sliding_window"] = cfg.sliding_window or None
    if family in ("qwen2", "qwen3"):
      hf["use_sliding_window"] = False
    if family == "gemma2":
      hf.update(query_pre_attn_scalar=round((cfg.query_scale or cfg.head_size ** -0.5) ** -2),
                attn_logit_softcapping=cfg.attn_softcap or None,
                final_logit_softcapping=cfg.logit_softcap or None,
                layer_types=["sliding_attention" if cfg.is_local(i) else "full_attention"
                             for i in range(cfg.num_layers)])
  hf.update(extra)
  _check_expressible(cfg, hf, family)
  return hf


def _check_expressible(cfg: ModelConfig, hf: dict[str, Any], family: str) -> None:
  """The family must express cfg exactly: what reads back must be what was written."""
  back = model_config(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scan_layers=cfg.scan_layers)
  differ = [f.name for f in dataclasses.fields(ModelConfig)
            # Qwix settings and how the compute runs: not in config.json
            if f.name not in ("family", "quant", "lora", "remat_policy", *ATTENTION_KERNEL_FIELDS)
            and getattr(back, f.name) != getattr(cfg, f.name)]
  if family == "gemma2":  # the scalar is an integer in config.json
    differ = [f for f in differ if not (f == "query_scale" and
                                        np.isclose(back.query_scale, cfg.query_scale))]
  if differ:
    raise HFError(f"ModelConfig.family={family!r} cannot express "
                  f"{', '.join(f'{n}={getattr(cfg, n)!r}' for n in differ)}; choose the family "
                  f"whose architecture this is (one of {FAMILIES}).")
