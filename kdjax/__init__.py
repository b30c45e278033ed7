"""kdjax: knowledge distillation of language models in JAX/Flax.

Tensor names carry their shapes: `q_BxLxHxK` is batch x length x query heads x head size, and
`t_logits_BxLxV` the teacher's logits (prefix `t_` the teacher, `s_` the student). Each capital
letter has one meaning throughout the package; module docstrings name the ones they use.

  B  batch: rows of a batch
  L  length: positions per row (the queries, in attention)
  D  model width, d_model (D_s, D_t: the student's, the teacher's)
  H  query heads
  N  key/value heads
  G  query heads per key/value head, H / N
  K  head size, ModelConfig.head_size (head_dim if set, else d_model // num_heads)
  F  MLP width, mlp_dim
  V  vocabulary
  S  layers
  C  key/value cache slots: the keys a query attends over when decoding with a KVCache
  T  tokens flattened to one axis: B * L (B * W within a chunk of the chunked loss)
  M  mapped layer pairs of feature distillation (student layer, teacher layer)
  P  prompt tokens per row
  A  new tokens sampled after each prompt (max_new_tokens)
  R  a sampled row: its prompt, then its new tokens, R = P + A
  J  top-k entries per token (a teacher cache's top-k ids and log-probs; J = top_k)
  E  sample slots per token (a teacher cache's draws for the 'sampled' estimator)
  Q  chunks of the chunked loss
  W  positions of a row in one chunk of the chunked loss
  I  calibration bins (evaluate.ECE_BINS)
  U  units (heads, MLP neurons) a pruned layer keeps
  Y  positions of a query block, Z of a key block (blockwise attention)
  X  the keys up to a query block's end (blockwise attention)

A digit after a letter changes it: K2 = K / 2 (RoPE's rotated pairs), L1 = L + 1, J1 = J + 1.
Formulas in prose keep their usual symbols: T the temperature (p_T, T^2), k the top-k count.
"""

import os as _os

# jaxlib 0.10.2's CPU backend miscompiles YNNPACK's element-wise and reduce fusions (either kind
# alone): in `x + w * sum(w * x, -1)`, w broadcast along x's leading axes, every row past the
# first 2**15 elements comes out wrong (seen as gradients leaking across batch rows under vmap).
# Its dot fusion is correct and carries the speed: on the benchmark step, turning the other two
# kinds back on gave the same loss to the bit and no measurable gain (BENCHMARKS.md), so kdjax
# keeps only dot. It takes effect if set before JAX starts its backend; a user's own setting of
# the flag wins. tests/test_xla_guard.py pins the correct results.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_YNN_FLAG}=dot").strip()
  import sys as _sys

  if "jax" in _sys.modules:
    from jax._src import xla_bridge as _xb

    if _xb.backends_are_initialized():
      import warnings as _warnings

      _warnings.warn(
          "kdjax was imported after JAX started its backend, so its guard against jaxlib "
          "0.10.2's CPU miscompile is not active: import kdjax before running any JAX "
          f"computation, or set XLA_FLAGS={_YNN_FLAG}=dot yourself.", stacklevel=2)
