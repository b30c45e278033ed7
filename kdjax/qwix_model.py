"""The Linen module a student's ModelConfig describes: kdjax's Transformer, intercepted by Qwix
when the student is quantized or LoRA (`cfg.quant`, `cfg.lora`; kdjax.model).

  build(cfg)      what training runs: with `cfg.quant.weight` Qwix's quantized training (QAT:
                  every matched weight fake-quantized in the forward pass, the gradient passed
                  straight through to the float weight); with `cfg.lora.rank` Qwix's LoRA
                  (kernel_lora_a / kernel_lora_b beside each matched kernel); else the plain
                  Transformer itself, so a student without either compiles exactly as before.
  build_ptq(cfg)  the really quantized model: it runs the int8/int4 params of kdjax.quantize.

Params stay float in training and in checkpoints; only kdjax.quantize's params are integers.
Every rule is anchored on the dense layers (`cfg.quant.modules`, default model.DENSE_LAYERS) and
intercepts `dot_general` alone, which is what Flax's Dense and DenseGeneral call:
  * attention's einsums stay as they are (Qwix's einsum path drops preferred_element_type, which
    would change bf16 numerics even with nothing quantized);
  * a `jnp.dot` (the tied unembedding, decoding's side-by-side projections) must never be in a
    matched module: JAX caches a jitted jnp.dot's trace per shape, so a trace made under
    interception would be reused by later float calls of the same shapes.
Decoding never runs these modules: kdjax.sample decodes `float_view`'s plain params.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax.numpy as jnp
import qwix

from kdjax.model import ModelConfig, QuantConfig, Transformer

QTYPES = ("int8", "int4")
_OPS = ("dot_general",)


def _rule(q: QuantConfig, cls=qwix.QuantizationRule):
  return cls(module_path=q.modules, op_names=_OPS, weight_qtype=q.weight,
             act_qtype=q.act or None, tile_size=q.tile_size or None)


def module_paths(cfg: ModelConfig) -> tuple[list[str], list[str]]:
  """(dense layer paths, every other module path) of `cfg`'s model, as Qwix's rules see them."""
  layers = ["layers"] if cfg.scan_layers else [f"layer_{i}" for i in range(cfg.num_layers)]
  dense = [f"{l}/{m}" for l in layers for m in ("attn/query", "attn/key", "attn/value",
                                                 "attn/out", "mlp/gate", "mlp/up", "mlp/down")]
  other = ["", "embed", "pos_embed", "unembed", "final_norm"] + [
      f"{l}/{m}" for l in layers for m in ("", "attn", "mlp", "attn_norm", "mlp_norm",
                                           "attn/q_norm", "attn/k_norm")]
  return dense, [p.rstrip("/") for p in other]


def _check_modules(cfg: ModelConfig, field: str, regex: str) -> None:
  try:
    compiled = re.compile(regex)
  except re.error as e:
    raise ValueError(f"config.{field}={regex!r} is not a regular expression ({e}).") from None
  dense, other = module_paths(cfg)
  if stray := [p for p in other if compiled.fullmatch(p)]:
    raise ValueError(f"config.{field}={regex!r} matches {stray[0]!r}: match only the dense "
                     f"layers, paths like {dense[0]!r} (the default, model.DENSE_LAYERS); Qwix "
                     "quantizes no embedding lookup, and attention's einsums and the tied "
                     "unembedding's jnp.dot must stay unintercepted.")
  if not any(compiled.fullmatch(p) for p in dense):
    raise ValueError(f"config.{field}={regex!r} matches none of the student's dense layers "
                     f"(e.g. {dense[0]!r}, {dense[-1]!r}).")


def _check_tile(cfg: ModelConfig) -> None:
  # Tiles cut the last contracted axis: d_model (q/k/v, gate/up), the head size (out), mlp_dim.
  widths = {"d_model": cfg.d_model, "head size": cfg.head_size, "mlp_dim": cfg.mlp_dim}
  if bad := [f"{k} ({v})" for k, v in widths.items() if v % cfg.quant.tile_size]:
    raise ValueError(f"config.student_quant.tile_size={cfg.quant.tile_size} must divide the "
                     f"contracted widths; it does not divide {', '.join(bad)}.")


@functools.lru_cache(maxsize=64)
def check(cfg: ModelConfig) -> None:
  """Refuses settings Qwix cannot run, in one line naming the config field."""
  q, lora = cfg.quant, cfg.lora
  if q.weight and q.weight not in QTYPES:
    raise ValueError(f"config.student_quant.weight={q.weight!r}: use one of {QTYPES} or ''.")
  if q.act not in ("", "int8"):
    raise ValueError(f"config.student_quant.act={q.act!r}: use 'int8' or '' (weights only).")
  if q.act and not q.weight:
    raise ValueError("config.student_quant.act needs config.student_quant.weight: Qwix "
                     "quantizes activations only next to quantized weights.")
  if q.tile_size < 0 or q.start_step < 0 or lora.rank < 0:
    raise ValueError("config.student_quant.tile_size, .start_step and config.student_lora.rank "
                     "must be >= 0.")
  if q.weight and lora.rank:
    raise ValueError("config.student_quant and config.student_lora are both on: train a LoRA "
                     "student, merge it, then quantize it (scripts/convert.py --quantize).")
  if lora.rank and lora.alpha <= 0:
    raise ValueError(f"config.student_lora.alpha={lora.alpha}: must be > 0.")
  if q.weight:
    _check_modules(cfg, "student_quant.modules", q.modules)
    if q.tile_size:
      _check_tile(cfg)
  if lora.rank:
    _check_modules(cfg, "student_lora.modules", lora.modules)


class _LoraProvider(qwix.LoraProvider):
  """Qwix's LoRA, its output in the layer's own dtype: the adapters (kept in the param dtype,
  float32) would otherwise promote a bfloat16 layer's output, and every activation after it."""

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None):
    out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                              out_sharding=out_sharding)
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def build(cfg: ModelConfig) -> nn.Module:
  """The module that trains `cfg` (see the module docstring)."""
  check(cfg)
  model = Transformer(cfg)
  if cfg.quant.weight:
    return qwix.quantize_model(model, qwix.QtProvider([_rule(cfg.quant, qwix.QtRule)]))
  if cfg.lora.rank:
    return qwix.apply_lora_to_model(model, _LoraProvider([qwix.LoraRule(
        module_path=cfg.lora.modules, op_names=_OPS, rank=cfg.lora.rank,
        alpha=float(cfg.lora.alpha))]))
  return model


def build_ptq(cfg: ModelConfig) -> nn.Module:
  """The really quantized model: its matched kernels are Qwix QArrays (kdjax.quantize)."""
  check(cfg)
  return qwix.quantize_model(Transformer(cfg), qwix.PtqProvider([_rule(cfg.quant)]))
