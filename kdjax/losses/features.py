"""Feature losses: the student's hidden states and attention maps against the teacher's.

Shape letters (the glossary is in kdjax/__init__.py): M mapped layer pairs (see kdjax.features),
B batch, L length, D the teacher's width (the student's hidden states are projected to it first
when widths differ). Prefix `t_` is the teacher, `s_` the student. Both losses run in at least
float32 and are means over the M pairs and the real tokens, as in kdjax.losses.divergences.
"""

import jax
import jax.numpy as jnp

from kdjax.losses.divergences import masked_mean, upcast

Array = jax.Array

HIDDEN_LOSSES = ("mse", "cosine")
# Squared norms are floored here before normalising, so a zero vector stays zero (no NaN).
_SQUARED_NORM_FLOOR = 1e-16


def _unit(x_MxBxLxD: Array) -> Array:
  sq_MxBxLx1 = jnp.sum(jnp.square(x_MxBxLxD), axis=-1, keepdims=True)
  return x_MxBxLxD * jax.lax.rsqrt(jnp.maximum(sq_MxBxLx1, _SQUARED_NORM_FLOOR))


def hidden_state_loss(s_hidden_MxBxLxD: Array, t_hidden_MxBxLxD: Array, mask_BxL: Array, *,
                      kind: str = "mse") -> Array:
  """Mean over the M layer pairs and the real tokens of a per-token hidden-state distance.

  mse: the mean over D of (s - t)^2 (a mean, not a sum, so widths compare across model sizes).
  cosine: 1 - cos(s, t), blind to scale: the student need not match the teacher's norms. It is
  computed as |s/|s| - t/|t||^2 / 2 (the same number), which is exactly 0 when s == t whatever
  the compiler does to the normalisation, and free of the cancellation in 1 - cos near 0.
  A zero vector counts as the zero unit vector: its distance to anything is 1/2.
  """
  if s_hidden_MxBxLxD.shape != t_hidden_MxBxLxD.shape:
    raise ValueError(f"student hidden states {s_hidden_MxBxLxD.shape} and teacher's "
                     f"{t_hidden_MxBxLxD.shape} differ in shape (project the student's first)")
  s, t = upcast(s_hidden_MxBxLxD), upcast(t_hidden_MxBxLxD)
  if kind == "mse":
    per_token_MxBxL = jnp.mean(jnp.square(s - t), axis=-1)
  elif kind == "cosine":
    per_token_MxBxL = 0.5 * jnp.sum(jnp.square(_unit(s) - _unit(t)), axis=-1)
  else:
    raise ValueError(f"unknown hidden-state loss {kind!r}; use one of {HIDDEN_LOSSES}")
  return masked_mean(jnp.mean(per_token_MxBxL, axis=0), mask_BxL)


def attention_kl(s_attn_MxBxLxL: Array, t_attn_MxBxLxL: Array, mask_BxL: Array) -> Array:
  """KL(teacher || student) between attention distributions, per query token (a row over the
  keys), mean over the M layer pairs and the real query tokens. No temperature, no T^2.

  Keys a query may not see have probability exactly 0 in both maps (0 log 0 = 0). A student
  probability that underflows to 0 where the teacher's is not is floored at the smallest normal
  float, so the loss stays finite (and large) instead of inf.
  """
  if s_attn_MxBxLxL.shape != t_attn_MxBxLxL.shape:
    raise ValueError(f"student attention maps {s_attn_MxBxLxL.shape} and teacher's "
                     f"{t_attn_MxBxLxL.shape} differ in shape")
  p_MxBxLxL, q_MxBxLxL = upcast(t_attn_MxBxLxL), upcast(s_attn_MxBxLxL)
  seen_MxBxLxL = p_MxBxLxL > 0
  # The inner where keeps log(0) out of the graph: in the unselected branch of the outer one it
  # would still poison the gradient (as in divergences.kl_BxL).
  log_ratio_MxBxLxL = jnp.where(
      seen_MxBxLxL, jnp.log(jnp.where(seen_MxBxLxL, p_MxBxLxL, 1.0))
      - jnp.log(jnp.maximum(q_MxBxLxL, jnp.finfo(q_MxBxLxL.dtype).tiny)), 0.0)
  per_query_MxBxL = jnp.sum(p_MxBxLxL * log_ratio_MxBxLxL, axis=-1)
  return masked_mean(jnp.mean(per_query_MxBxL, axis=0), mask_BxL)
