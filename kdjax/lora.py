"""LoRA students: the adapters Qwix adds, apart from the frozen base, merged, and exported.

Qwix's LoRA (kdjax.qwix_model.build with `cfg.lora.rank`) puts `kernel_lora_a` [*, in, r] and
`kernel_lora_b` [*, r, out] beside each matched kernel (in and out are the kernel's contracted
and remaining axes, flattened; * is the scan axis when layers are stacked) and computes
kernel's output + (x A) B * alpha / rank. B starts at zero, so a new LoRA student is its base.

Training keeps the two apart: TrainState.params holds the adapters alone (all the optimizer
sees and all a checkpoint holds) and TrainState.frozen_params the base, which is never
differentiated, updated or saved (it is config.student_init, or the seed's init, reloaded on
resume). `merged` folds the adapters into the kernels: the plain model's params, which
evaluation, decoding and the Hugging Face export run; kdjax.hf.peft writes the adapters alone in
PEFT's layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from kdjax.model import ModelConfig

SUFFIXES = ("_lora_a", "_lora_b")


def _is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(SUFFIXES)


def split(params: Any) -> tuple[Any, Any]:
  """(base, adapters) of a LoRA model's params tree: two nested dicts."""
  flat = traverse_util.flatten_dict(params)
  base = {k: v for k, v in flat.items() if not _is_adapter(k)}
  adapters = {k: v for k, v in flat.items() if _is_adapter(k)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def combine(base: Any, adapters: Any) -> Any:
  """The LoRA model's params tree from its two parts (inverse of `split`)."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base),
                                       **traverse_util.flatten_dict(adapters)})


def delta(cfg: ModelConfig, a: jax.Array, b: jax.Array, kernel_shape) -> jax.Array:
  """A B * alpha / rank in the kernel's shape (the stacked scan axis, if any, kept)."""
  d = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
  return (d * (cfg.lora.alpha / cfg.lora.rank)).reshape(kernel_shape)


def merged(cfg: ModelConfig, params: Any) -> Any:
  """The plain model's params: each kernel + its adapters' delta (params without adapters pass
  through)."""
  flat = traverse_util.flatten_dict(params)
  out = {k: v for k, v in flat.items() if not _is_adapter(k)}
  for k, a in flat.items():
    if k[-1].endswith("_lora_a"):
      name = k[-1][:-len("_lora_a")]
      w = flat[k[:-1] + (name,)]
      b = flat[k[:-1] + (name + "_lora_b",)]
      out[k[:-1] + (name,)] = (w.astype(jnp.float32) + delta(cfg, a, b, w.shape)).astype(w.dtype)
  return traverse_util.unflatten_dict(out)
