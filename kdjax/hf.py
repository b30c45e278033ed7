"""Hugging Face checkpoints in and out: config.json + *.safetensors <-> (ModelConfig, params).

    cfg, params = hf.load_pretrained("/models/Qwen2.5-1.5B")          # bf16 stays bf16
    logits_BxLxV = Transformer(cfg).apply({"params": params}, tokens_BxL)
    hf.save_pretrained("/out/student", cfg, params, tokenizer_dir="/models/Qwen2.5-1.5B")

Families: llama (Llama 2/3.x, with Llama 3 RoPE scaling), mistral, qwen2, qwen3, gemma, gemma2 and
gpt2. Loading reads one tensor at a time from the memory-mapped safetensors files, once each,
straight into this host's shards of the target sharding: the host holds at most one param (all
layers of, say, the MLP up-projection) besides the mapped files, and no device more than its
shard. Nothing is unpickled: a directory with only PyTorch .bin files is refused.

The weight layout is the only translation: Hugging Face linear weights are [out, in] (GPT-2's
Conv1D is [in, out]); kdjax kernels are [in, ...out] with heads split out ([D, H, K] for queries,
[H, K, D] for the output projection). Norm weights are stored as they are (Gemma's (1 + w) is
`ModelConfig.norm_plus_one`), so conversion is exact in both directions.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import shutil
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kdjax.data import hf_tokenizer
from kdjax.model import ModelConfig, Transformer

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gpt2": "GPT2LMHeadModel"}
# Non-weight buffers some checkpoints carry (GPT-2's causal-mask tables, rotary caches).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class HFError(ValueError):
  """A checkpoint kdjax cannot read or write; the message names the file or field and the fix."""


# ----------------------------------------------------------------------------- config.json


def read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise HFError(f"{path}: no config.json; point at a Hugging Face model directory.")
  with open(file) as f:
    return json.load(f)


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
    _refuse(hf, "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
    if not hf.get("scale_attn_weights", True):
      raise HFError("config.json: scale_attn_weights=false is not supported.")
    d = hf["n_embd"]
    return ModelConfig(
        **common, d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
        num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d,
        max_len=hf["n_positions"],
        activation=_activation(family, hf.get("activation_function", "gelu_new")),
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), position_embedding="learned",
        qkv_bias=True, out_bias=True, mlp_bias=True)

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


def hf_config(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
  """config.json for `cfg` in its family (`cfg.family`, '' = llama); refuses a cfg the family
  cannot express, since transformers would then compute something else."""
  family = cfg.family or "llama"
  dtype = jnp.dtype(cfg.param_dtype).name
  base = dict(architectures=[_ARCHITECTURES.get(family, "")], model_type=family,
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
              head_dim=cfg.k, intermediate_size=cfg.mlp_dim,
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
      hf.update(query_pre_attn_scalar=round((cfg.query_scale or cfg.k ** -0.5) ** -2),
                attn_logit_softcapping=cfg.attn_softcap or None,
                final_logit_softcapping=cfg.logit_softcap or None,
                layer_types=["sliding_attention" if cfg.is_local(i) else "full_attention"
                             for i in range(cfg.num_layers)])
  hf.update(extra)
  # The family must express cfg exactly: what reads back must be what was written.
  back = model_config(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scan_layers=cfg.scan_layers)
  differ = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name != "family" and getattr(back, f.name) != getattr(cfg, f.name)]
  if family == "gemma2":  # the scalar is an integer in config.json
    differ = [f for f in differ if not (f == "query_scale" and
                                        np.isclose(back.query_scale, cfg.query_scale))]
  if differ:
    raise HFError(f"ModelConfig.family={family!r} cannot express "
                  f"{', '.join(f'{n}={getattr(cfg, n)!r}' for n in differ)}; choose the family "
                  f"whose architecture this is (one of {FAMILIES}).")
  return hf


# ----------------------------------------------------------------------------- weight layout


@dataclasses.dataclass(frozen=True)
class _Entry:
  """How one kdjax param (one layer's slice of it) maps onto Hugging Face tensors."""

  names: Sequence[str]
  to_kdjax: Callable[..., np.ndarray]  # HF tensors -> kdjax layout
  to_hf: Callable[[np.ndarray], Sequence[np.ndarray]]  # kdjax layout -> HF tensors


def _same(name):
  return _Entry([name], lambda w: w, lambda a: [a])


def _linear(name, out_shape):
  """HF Linear [out, in] <-> kdjax [in, *out_shape]."""
  return _Entry([name], lambda w: w.T.reshape(w.shape[1], *(out_shape or (w.shape[0],))),
                lambda a: [a.reshape(a.shape[0], -1).T])


def _linear_in(name, in_shape):
  """HF Linear [out, in] <-> kdjax [*in_shape, out] (the attention output projection)."""
  return _Entry([name], lambda w: w.T.reshape(*in_shape, w.shape[0]),
                lambda a: [a.reshape(-1, a.shape[-1]).T])


def _reshaped(name, shape):
  return _Entry([name], lambda w: w.reshape(shape), lambda a: [a.reshape(-1)])


def _layer_entries(cfg: ModelConfig, family: str, p: str) -> dict[tuple[str, ...], _Entry]:
  """Per-layer params; `p` is the layer's name prefix in the checkpoint."""
  h, n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.k, cfg.d_model
  if family == "gpt2":
    def part(i, shape):  # one third of the fused c_attn (Conv1D: [in, out])
      return lambda w: w[..., i * d:(i + 1) * d].reshape(shape)
    e = {("attn_norm", "scale"): _same(p + "ln_1.weight"),
         ("attn_norm", "bias"): _same(p + "ln_1.bias"),
         ("mlp_norm", "scale"): _same(p + "ln_2.weight"),
         ("mlp_norm", "bias"): _same(p + "ln_2.bias"),
         ("attn", "out", "kernel"): _Entry([p + "attn.c_proj.weight"],
                                           lambda w: w.reshape(h, k, d),
                                           lambda a: [a.reshape(h * k, d)]),
         ("attn", "out", "bias"): _same(p + "attn.c_proj.bias"),
         ("mlp", "up", "kernel"): _same(p + "mlp.c_fc.weight"),
         ("mlp", "up", "bias"): _same(p + "mlp.c_fc.bias"),
         ("mlp", "down", "kernel"): _same(p + "mlp.c_proj.weight"),
         ("mlp", "down", "bias"): _same(p + "mlp.c_proj.bias")}
    for i, proj in enumerate(("query", "key", "value")):
      # Written back by _save_layer, which concatenates the three parts.
      e[("attn", proj, "kernel")] = _Entry([p + "attn.c_attn.weight"], part(i, (d, h, k)), None)
      e[("attn", proj, "bias")] = _Entry([p + "attn.c_attn.bias"], part(i, (h, k)), None)
    return e

  a = p + "self_attn."
  e = {("attn", "query", "kernel"): _linear(a + "q_proj.weight", (h, k)),
       ("attn", "key", "kernel"): _linear(a + "k_proj.weight", (n, k)),
       ("attn", "value", "kernel"): _linear(a + "v_proj.weight", (n, k)),
       ("attn", "out", "kernel"): _linear_in(a + "o_proj.weight", (h, k)),
       ("attn", "query", "bias"): _reshaped(a + "q_proj.bias", (h, k)),
       ("attn", "key", "bias"): _reshaped(a + "k_proj.bias", (n, k)),
       ("attn", "value", "bias"): _reshaped(a + "v_proj.bias", (n, k)),
       ("attn", "out", "bias"): _same(a + "o_proj.bias"),
       ("attn", "q_norm", "scale"): _same(a + "q_norm.weight"),
       ("attn", "k_norm", "scale"): _same(a + "k_norm.weight"),
       ("attn_norm", "scale"): _same(p + "input_layernorm.weight")}
  for proj in ("gate", "up", "down"):
    e[("mlp", proj, "kernel")] = _linear(p + f"mlp.{proj}_proj.weight", ())
    e[("mlp", proj, "bias")] = _same(p + f"mlp.{proj}_proj.bias")
  if family == "gemma2":
    e[("post_attn_norm", "scale")] = _same(p + "post_attention_layernorm.weight")
    e[("mlp_norm", "scale")] = _same(p + "pre_feedforward_layernorm.weight")
    e[("post_mlp_norm", "scale")] = _same(p + "post_feedforward_layernorm.weight")
  else:
    e[("mlp_norm", "scale")] = _same(p + "post_attention_layernorm.weight")
  return e


def _global_entries(family: str, p: str) -> dict[tuple[str, ...], _Entry]:
  if family == "gpt2":
    return {("embed", "embedding"): _same(p + "wte.weight"),
            ("pos_embed", "embedding"): _same(p + "wpe.weight"),
            ("final_norm", "scale"): _same(p + "ln_f.weight"),
            ("final_norm", "bias"): _same(p + "ln_f.bias"),
            ("unembed", "kernel"): _linear("lm_head.weight", ())}
  return {("embed", "embedding"): _same(p + "embed_tokens.weight"),
          ("final_norm", "scale"): _same(p + "norm.weight"),
          ("unembed", "kernel"): _linear("lm_head.weight", ())}


def _prefixes(family: str, names: set[str] | None) -> tuple[str, str]:
  """(global prefix, layer prefix template). GPT-2 files saved from the bare model have no
  'transformer.' prefix (the original hub files); written ones always do."""
  if family == "gpt2":
    root = "" if names is not None and "wte.weight" in names else "transformer."
    return root, root + "h.{}."
  return "model.", "model.layers.{}."


def _abstract_params(cfg: ModelConfig) -> Any:
  return nn.meta.unbox(jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])


def _layer_path(path: tuple[str, ...], cfg: ModelConfig) -> tuple[int | None, tuple[str, ...]]:
  """(layer, path inside the layer): layer is None for global params, -1 for scanned ones."""
  if path[0] == "layers":
    return -1, path[1:]
  if path[0].startswith("layer_"):
    return int(path[0][len("layer_"):]), path[1:]
  return None, path


def _entry(cfg, family, path, layer, names=None) -> _Entry:
  root, layer_prefix = _prefixes(family, names)
  table = (_layer_entries(cfg, family, layer_prefix.format(layer)) if layer is not None
           else _global_entries(family, root))
  if path not in table:
    raise HFError(f"kdjax param {'/'.join(path)} has no {family} counterpart; choose the "
                  f"family of this architecture.")
  return table[path]


# ----------------------------------------------------------------------------- loading


class _Tensors:
  """Memory-mapped tensors of a model directory's safetensors, read one at a time.

  The files are those model.safetensors.index.json names, else model.safetensors, else every
  *.safetensors: some repositories keep other formats' files beside them (Mistral's
  consolidated.safetensors)."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted({os.path.join(path, n) for n in json.load(f)["weight_map"].values()})
      missing = [f for f in files if not os.path.isfile(f)]
      if missing:
        raise HFError(f"{path}: {os.path.basename(missing[0])}, named in "
                      "model.safetensors.index.json, is missing; download the whole model.")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
      files = [os.path.join(path, "model.safetensors")]
    else:
      files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
      hint = (" It has PyTorch pickles (.bin), which kdjax never loads: convert them to "
              "safetensors first (transformers' save_pretrained(..., safe_serialization=True))."
              if bins else "")
      raise HFError(f"{path}: no *.safetensors files.{hint}")
    self._handles = [safe_open(f, framework="numpy") for f in files]
    self._where = {name: h for h in self._handles for name in h.keys()}

  def names(self) -> set[str]:
    return set(self._where)

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get_tensor(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name].get_slice(name).get_shape())

  def dtype(self) -> str:
    """The dtype of the first tensor (read from the header; no data is read)."""
    name = sorted(self._where)[0]
    kind = self._where[name].get_slice(name).get_dtype()
    return {"BF16": "bfloat16", "F32": "float32", "F16": "float32"}.get(kind, "float32")


def _plan(path: str, cfg: ModelConfig) -> tuple[_Tensors, list, dict]:
  """(tensors, kdjax leaves, {(leaf path, layer): _Entry}) after checking, from the files'
  headers alone, that every tensor is there, fits its kdjax param's shape, and has a place."""
  family = cfg.family or "llama"
  tensors = _Tensors(path)
  names = tensors.names()
  abstract = _abstract_params(cfg)
  leaves = [(tuple(k.key for k in kp), like)
            for kp, like in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  entries = {}
  for p, like in leaves:
    layer, inner = _layer_path(p, cfg)
    want = like.shape[1:] if layer == -1 else like.shape
    for i in (range(cfg.num_layers) if layer == -1 else [layer]):
      entries[p, i] = entry = _entry(cfg, family, inner, i, names)
      missing = [n for n in entry.names if n not in names]
      if missing:
        raise HFError(f"{path}: tensor {missing[0]} (for kdjax's {'/'.join(p)}) is missing; the "
                      "safetensors do not fit config.json.")
      shapes = [jax.ShapeDtypeStruct(tensors.shape(n), jnp.float32) for n in entry.names]
      try:
        got = jax.eval_shape(entry.to_kdjax, *shapes).shape
      except (TypeError, ValueError):  # a reshape that cannot fit
        got = None
      if got != want:
        raise HFError(f"{path}: {entry.names[0]} has shape {shapes[0].shape}, which does not "
                      f"give kdjax's {'/'.join(p)} {want}; the safetensors do not fit "
                      "config.json.")
  used = {n for e in entries.values() for n in e.names}
  ignored = _IGNORED_SUFFIXES + (("lm_head.weight",) if cfg.tie_embeddings else ())
  unused = sorted(n for n in names - used if not n.endswith(ignored))
  if unused:
    raise HFError(f"{path}: tensors {unused[:3]}{'...' if len(unused) > 3 else ''} have no "
                  f"place in a {family} model with this config.json; they disagree.")
  return tensors, leaves, entries


def check_checkpoint(path: str, cfg: ModelConfig) -> None:
  """Raises HFError unless `path`'s safetensors hold exactly `cfg`'s params (reads headers only)."""
  _plan(path, cfg)


def load_params(path: str, cfg: ModelConfig, mesh=None, rules=None) -> Any:
  """Params for `cfg` from the safetensors in `path`, placed as kdjax.train.param_shardings
  would (on one device when `mesh` is None), in `cfg.param_dtype`."""
  from kdjax import train  # train imports model; keep hf importable on its own

  tensors, leaves, entries = _plan(path, cfg)
  abstract = jax.tree_util.tree_unflatten(jax.tree.structure(_abstract_params(cfg)),
                                          [like for _, like in leaves])
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = train.param_shardings(cfg, mesh, rules)
  param_dtype = jnp.dtype(cfg.param_dtype)

  def one_layer(p, i):
    entry = entries[p, i]
    return np.asarray(entry.to_kdjax(*[tensors.get(n) for n in entry.names])).astype(param_dtype)

  arrays = []
  for p, like in leaves:
    layer, _ = _layer_path(p, cfg)
    reads = ([(i, functools.partial(one_layer, p, i)) for i in range(cfg.num_layers)]
             if layer == -1 else [(None, functools.partial(one_layer, p, layer))])
    arrays.append(_place(like.shape, _leaf(shardings, p), param_dtype, reads))
  return jax.tree_util.tree_unflatten(jax.tree.structure(abstract), arrays)


def _place(shape, sharding, dtype, layers) -> jax.Array:
  """One param as a global array in `sharding`, from `layers`: (layer index, or None for an
  unstacked param; a function reading that layer's value in kdjax's layout).

  Each layer is read and converted once, then copied into this process's distinct shards, which
  go to their devices: host memory peaks at this param's local shards (at most the param once),
  and layers that only other hosts hold are not read here."""
  index_map = sharding.addressable_devices_indices_map(shape)
  key = lambda index: tuple((s.start, s.stop) for s in index)  # equal shards share a buffer
  buffers = {}
  for index in index_map.values():
    if key(index) not in buffers:
      buffers[key(index)] = (index, np.empty(_sliced_shape(shape, index), dtype))
  for layer, read in layers:
    needed = [(index, buf) for index, buf in buffers.values()
              if layer is None or layer in range(shape[0])[index[0]]]
    if not needed:
      continue
    value = read()
    for index, buf in needed:
      if layer is None:
        buf[...] = value[index]
      else:
        buf[layer - range(shape[0])[index[0]].start] = value[index[1:]]
  shards = [jax.device_put(buffers[key(index)][1], device) for device, index in index_map.items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _sliced_shape(shape, index) -> tuple[int, ...]:
  return tuple(len(range(n)[s]) for n, s in zip(shape, index))


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh=None, rules=None, scan_layers: bool = True) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of a Hugging Face model directory."""
  hf = read_config(path)
  if not (param_dtype or hf.get("dtype") or hf.get("torch_dtype")):
    param_dtype = _Tensors(path).dtype()  # config.json does not say: the tensors do
  cfg = model_config(hf, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  return cfg, load_params(path, cfg, mesh, rules)


# ----------------------------------------------------------------------------- saving


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
    layer, inner = _layer_path(p, cfg)
    value = _host_array(leaf).astype(dtype)
    per_layer = ([(i, value[i]) for i in range(cfg.num_layers)] if layer == -1
                 else [(layer, value)])
    for i, v in per_layer:
      entry = _entry(cfg, family, inner, i)
      if entry.to_hf is None:  # a third of GPT-2's fused c_attn: written with the other two
        continue
      yield from zip(entry.names, entry.to_hf(v))
  if family == "gpt2":
    yield from _gpt2_fused(cfg, params, dtype)


def _gpt2_fused(cfg, params, dtype):
  _, layer_prefix = _prefixes("gpt2", None)
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
    for name in (*hf_tokenizer.TOKENIZER_FILES, "generation_config.json"):
      if os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(path, name))


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
