"""FLOPs of kdjax's steps from the model shapes, and accelerators' data-sheet peaks: what MFU is
measured against (scripts/benchmark.py on real hardware, scripts/compile_for.py for a target).

A formula, not the compiler's count: XLA's cost_analysis counts a scanned layer's body once and
returns nothing on GPU. Forward = 2 FLOPs per multiply-add, backward = 2x forward:

  model forward, per token   2 N + 4 S d L
  training step, per token   6 N_s + 12 S_s d_s L  (+ 2 N_t + 4 S_t d_t L with a live teacher)

N = weights that enter a matmul (every kernel and the unembedding; not norm scales, and not the
input embedding when it is untied, since a lookup does no multiply), S = layers, d = query heads x
head dim, L = sequence length. The attention term counts QK^T and AV over the full L x L (no
causal discount). Rematerialized forwards are not counted, as MFU conventionally does not.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.model import ModelConfig, Transformer

# Dense peak FLOP/s from vendor data sheets, by device_kind substring and compute dtype.
DATASHEET = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12, ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v6", "bfloat16"): 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that enter a matmul: every kernel, and the (tied or untied) unembedding."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"])
  # By name, not by rank: under nn.scan the norm scales are stacked into 2-D arrays too.
  n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(shapes)
          if getattr(path[-1], "key", None) in ("kernel", "embedding"))
  # The untied input embedding is only looked up; a tied one is also the unembedding.
  return n - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """One forward pass of `cfg`, per token of rows of `seq_len` tokens."""
  return float(2 * matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_size
               * seq_len)


def flops_per_token(s_cfg: ModelConfig, t_cfg: ModelConfig | None, seq_len: int) -> float:
  """A training step of `s_cfg` (forward + backward), plus the forward of a live teacher."""
  flops = 3 * forward_flops_per_token(s_cfg, seq_len)
  if t_cfg is not None:
    flops += forward_flops_per_token(t_cfg, seq_len)
  return flops
