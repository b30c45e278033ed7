"""Per-family mapping between kdjax params and Hugging Face tensor names and layouts.

The weight layout is the only translation: Hugging Face linear weights are [out, in] (GPT-2's
Conv1D is [in, out]); kdjax kernels are [in, ...out] with heads split out ([D, H, K] for queries,
[H, K, D] for the output projection; D model width, H query heads, N key/value heads, K head
dim). Norm weights are stored as they are (Gemma's (1 + w) is `ModelConfig.norm_plus_one`), so
conversion is exact in both directions.

A param path is the tuple of keys in kdjax's params tree, e.g. ("layers", "attn", "query",
"kernel") for the scanned stack or ("layer_3", ...) for an unscanned layer; `entry_for` gives the
`Entry` for one layer's slice of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.hf.config import HFError
from kdjax.model import ModelConfig, Transformer

# Non-weight buffers some checkpoints carry (GPT-2's causal-mask tables, rotary caches).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Entry:
  """How one kdjax param (one layer's slice of it) maps onto Hugging Face tensors."""

  names: Sequence[str]
  to_kdjax: Callable[..., np.ndarray]  # HF tensors -> kdjax layout
  # kdjax layout -> HF tensors; None where save.py writes the tensor from several params.
  to_hf: Callable[[np.ndarray], Sequence[np.ndarray]] | None


def abstract_params(cfg: ModelConfig) -> Any:
  """The unboxed ShapeDtypeStructs of `cfg`'s params: the tree every mapping walks."""
  return nn.meta.unbox(jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])


def layer_path(path: tuple[str, ...], cfg: ModelConfig) -> tuple[int | None, tuple[str, ...]]:
  """(layer, path inside the layer): layer is None for global params, -1 for scanned ones."""
  if path[0] == "layers":
    return -1, path[1:]
  if path[0].startswith("layer_"):
    return int(path[0][len("layer_"):]), path[1:]
  return None, path


def prefixes(family: str, names: set[str] | None) -> tuple[str, str]:
  """(global prefix, layer prefix template). GPT-2 files saved from the bare model have no
  'transformer.' prefix (the original hub files); written ones always do."""
  if family == "gpt2":
    root = "" if names is not None and "wte.weight" in names else "transformer."
    return root, root + "h.{}."
  return "model.", "model.layers.{}."


def entry_for(cfg: ModelConfig, family: str, path: tuple[str, ...], layer: int | None,
              names: set[str] | None = None) -> Entry:
  """The Entry of param `path` (inside its layer) for `layer` (None: a global param); `names`,
  the checkpoint's tensor names when reading, picks GPT-2's prefix."""
  root, layer_prefix = prefixes(family, names)
  table = (_layer_entries(cfg, family, layer_prefix.format(layer)) if layer is not None
           else _global_entries(family, root))
  if path not in table:
    raise HFError(f"kdjax param {'/'.join(path)} has no {family} counterpart; choose the "
                  f"family of this architecture.")
  return table[path]


# ----------------------------------------------------------------------------- entries


def _same(name):
  return Entry([name], lambda w: w, lambda a: [a])


def _linear(name, out_shape):
  """HF Linear [out, in] <-> kdjax [in, *out_shape]."""
  return Entry([name], lambda w: w.T.reshape(w.shape[1], *(out_shape or (w.shape[0],))),
               lambda a: [a.reshape(a.shape[0], -1).T])


def _linear_in(name, in_shape):
  """HF Linear [out, in] <-> kdjax [*in_shape, out] (the attention output projection)."""
  return Entry([name], lambda w: w.T.reshape(*in_shape, w.shape[0]),
               lambda a: [a.reshape(-1, a.shape[-1]).T])


def _reshaped(name, shape):
  return Entry([name], lambda w: w.reshape(shape), lambda a: [a.reshape(-1)])


def _layer_entries(cfg: ModelConfig, family: str, p: str) -> dict[tuple[str, ...], Entry]:
  """Per-layer params; `p` is the layer's name prefix in the checkpoint."""
  if family == "gpt2":
    return _gpt2_layer_entries(cfg, p)
  h, n, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
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


def _gpt2_layer_entries(cfg: ModelConfig, p: str) -> dict[tuple[str, ...], Entry]:
  """GPT-2's per-layer params: Conv1D weights are already [in, out]."""
  h, k, d = cfg.num_heads, cfg.head_size, cfg.d_model

  def part(i, shape):  # one third of the fused c_attn (Conv1D: [in, out])
    return lambda w: w[..., i * d:(i + 1) * d].reshape(shape)

  e = {("attn_norm", "scale"): _same(p + "ln_1.weight"),
       ("attn_norm", "bias"): _same(p + "ln_1.bias"),
       ("mlp_norm", "scale"): _same(p + "ln_2.weight"),
       ("mlp_norm", "bias"): _same(p + "ln_2.bias"),
       ("attn", "out", "kernel"): Entry([p + "attn.c_proj.weight"],
                                        lambda w: w.reshape(h, k, d),
                                        lambda a: [a.reshape(h * k, d)]),
       ("attn", "out", "bias"): _same(p + "attn.c_proj.bias"),
       ("mlp", "up", "kernel"): _same(p + "mlp.c_fc.weight"),
       ("mlp", "up", "bias"): _same(p + "mlp.c_fc.bias"),
       ("mlp", "down", "kernel"): _same(p + "mlp.c_proj.weight"),
       ("mlp", "down", "bias"): _same(p + "mlp.c_proj.bias")}
  for i, proj in enumerate(("query", "key", "value")):
    # Written back by save.py's _gpt2_fused, which concatenates the three parts.
    e[("attn", proj, "kernel")] = Entry([p + "attn.c_attn.weight"], part(i, (d, h, k)), None)
    e[("attn", proj, "bias")] = Entry([p + "attn.c_attn.bias"], part(i, (h, k)), None)
  return e


def _global_entries(family: str, p: str) -> dict[tuple[str, ...], Entry]:
  if family == "gpt2":
    return {("embed", "embedding"): _same(p + "wte.weight"),
            ("pos_embed", "embedding"): _same(p + "wpe.weight"),
            ("final_norm", "scale"): _same(p + "ln_f.weight"),
            ("final_norm", "bias"): _same(p + "ln_f.bias"),
            ("unembed", "kernel"): _linear("lm_head.weight", ())}
  return {("embed", "embedding"): _same(p + "embed_tokens.weight"),
          ("final_norm", "scale"): _same(p + "norm.weight"),
          ("unembed", "kernel"): _linear("lm_head.weight", ())}
