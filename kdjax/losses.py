"""Distillation losses: next-token cross-entropy and teacher/student divergences.

Shape letters: B batch, L length, V vocab. Prefix `t_` is the teacher, `s_` the student.

Conventions shared by every function here:

- Logits are upcast to at least float32 before any softmax, whatever the compute dtype (bf16 logits
  lose too much in exp/log). float64 is kept as is, so tests can check gradients under x64.
- A loss is the mean over real target tokens: `mask_BxL` (float or bool) is 1 where a token counts,
  and the sum is divided by max(sum(mask), 1) so that a batch of pure padding gives 0, not NaN.
  Masked positions get an exactly zero gradient and cannot change the value, even through inf or
  NaN per-token values (an out-of-range padding label); a NaN logit still poisons its own
  position's gradient, which no loss can prevent.
- A divergence compares p = softmax(logits / T) of teacher and student and is multiplied by T^2,
  which keeps the soft-loss gradient scale roughly independent of T (Hinton et al., 2015).
- Zero probabilities (logits at -inf or -1e30 from a masked or padded vocabulary) follow
  0 log 0 = 0, in values and in gradients.
"""

import functools
import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _upcast(x: Array) -> Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_static(x) -> bool:
  """A Python (or NumPy) number, fixed at trace time, as opposed to a (traced) jax array."""
  return not isinstance(x, jax.Array)


def _log_probs(logits_BxLxV: Array, temperature: float) -> Array:
  """log softmax(logits / T), in at least float32."""
  return jax.nn.log_softmax(_upcast(logits_BxLxV) / temperature, axis=-1)


def _masked_mean(per_token_BxL: Array, mask_BxL: Array) -> Array:
  """Mean of per-token values over the tokens where mask != 0 (weighted by the mask)."""
  if per_token_BxL.shape != mask_BxL.shape:
    # Broadcasting here would silently average the wrong thing (e.g. labels not shifted).
    raise ValueError(f"per-token shape {per_token_BxL.shape} != mask shape {mask_BxL.shape}")
  mask_BxL = mask_BxL.astype(per_token_BxL.dtype)
  # A where, not only a product: a masked position may hold inf or NaN (an out-of-range padding
  # label) and 0 * inf = NaN. The where also sends a zero cotangent to those positions.
  total = jnp.sum(jnp.where(mask_BxL != 0, per_token_BxL * mask_BxL, 0.0))
  return total / jnp.maximum(jnp.sum(mask_BxL), 1.0)


def _kl_BxL(logp_BxLxV: Array, logq_BxLxV: Array) -> Array:
  """Per-token KL(p || q) = sum_v p (log p - log q), with 0 log 0 = 0."""
  p_BxLxV = jnp.exp(logp_BxLxV)
  # Where p == 0, log p - log q may be -inf - (-inf) = NaN. The where sits inside the product
  # because a NaN in the unselected branch of an outer where would still poison the gradient.
  log_ratio_BxLxV = jnp.where(p_BxLxV > 0, logp_BxLxV - logq_BxLxV, 0.0)
  return jnp.sum(p_BxLxV * log_ratio_BxLxV, axis=-1)


def _log_mixture(logp_BxLxV: Array, logq_BxLxV: Array, weight: float) -> Array:
  """log(w p + (1 - w) q), computed in log space; `weight` is a static Python float."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"mixture weight must be in [0, 1], got {weight}")
  if weight == 0.0:  # log(0) is not a number we want in the graph.
    return logq_BxLxV
  if weight == 1.0:
    return logp_BxLxV
  a_BxLxV = math.log(weight) + logp_BxLxV
  b_BxLxV = math.log1p(-weight) + logq_BxLxV
  # Where both terms are -inf (an entry neither distribution can emit) logaddexp's gradient is
  # NaN even under a zero cotangent: feed it zeros there and put the -inf back afterwards.
  dead_BxLxV = jnp.isneginf(a_BxLxV) & jnp.isneginf(b_BxLxV)
  out_BxLxV = jnp.logaddexp(jnp.where(dead_BxLxV, 0.0, a_BxLxV),
                            jnp.where(dead_BxLxV, 0.0, b_BxLxV))
  return jnp.where(dead_BxLxV, -jnp.inf, out_BxLxV)


def _check_pair(s_logits_BxLxV: Array, t_logits_BxLxV: Array) -> None:
  if s_logits_BxLxV.shape != t_logits_BxLxV.shape:
    raise ValueError(f"student logits {s_logits_BxLxV.shape} and teacher logits "
                     f"{t_logits_BxLxV.shape} differ in shape (same vocabulary needed)")


def _ce_per_token(logits_BxLxV: Array, labels_BxL: Array) -> Array:
  logp_BxLxV = _log_probs(logits_BxLxV, 1.0)
  # mode="fill" turns an out-of-range label (e.g. -100 padding) into NaN: harmless where the mask
  # is 0 (_masked_mean drops it), loud where it is not.
  return -jnp.take_along_axis(logp_BxLxV, labels_BxL[..., None], axis=-1, mode="fill")[..., 0]


def _soft_per_token(name: str, s_logits_BxLxV: Array, t_logits_BxLxV: Array, *,
                    temperature: float, beta: float = 0.5, skew: float = 0.1) -> Array:
  """Per-token divergence `name` between softmax(logits / T) of teacher and student (no T^2)."""
  s_logp_BxLxV = _log_probs(s_logits_BxLxV, temperature)
  t_logp_BxLxV = _log_probs(t_logits_BxLxV, temperature)
  if name == "forward_kl" or (name in ("generalized_jsd", "jsd") and beta == 0.0):
    return _kl_BxL(t_logp_BxLxV, s_logp_BxLxV)
  if name == "reverse_kl" or (name in ("generalized_jsd", "jsd") and beta == 1.0):
    return _kl_BxL(s_logp_BxLxV, t_logp_BxLxV)
  if name in ("generalized_jsd", "jsd"):
    m_logp_BxLxV = _log_mixture(t_logp_BxLxV, s_logp_BxLxV, beta)
    return (beta * _kl_BxL(t_logp_BxLxV, m_logp_BxLxV)
            + (1.0 - beta) * _kl_BxL(s_logp_BxLxV, m_logp_BxLxV))
  if name == "skew_kl":
    return _kl_BxL(t_logp_BxLxV, _log_mixture(t_logp_BxLxV, s_logp_BxLxV, skew))
  if name == "skew_reverse_kl":
    return _kl_BxL(s_logp_BxLxV, _log_mixture(s_logp_BxLxV, t_logp_BxLxV, skew))
  if name == "tvd":
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(t_logp_BxLxV) - jnp.exp(s_logp_BxLxV)), axis=-1)
  raise ValueError(f"unknown divergence {name!r}")


def shared_vocab(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Each array cut to the smallest last axis among them (a no-op when they agree).

  Teacher and student share one tokenizer, but their vocabularies may be padded to different
  sizes (Qwen2.5: 152064 vs 151936 rows): rows past the tokenizer never hold a target, so
  divergences compare the shared rows only. config_check refuses a tokenizer larger than that.
  """
  v = min(a.shape[-1] for a in arrays)
  return tuple(a[..., :v] for a in arrays)


def cross_entropy(logits_BxLxV: Array, labels_BxL: Array, mask_BxL: Array) -> Array:
  """Mean next-token cross-entropy -log p(label) over unmasked tokens (no temperature)."""
  return _masked_mean(_ce_per_token(logits_BxLxV, labels_BxL), mask_BxL)


def _soft_mean(name, s_logits_BxLxV, t_logits_BxLxV, mask_BxL, **options) -> Array:
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  per_token_BxL = _soft_per_token(name, s_logits_BxLxV, t_logits_BxLxV, **options)
  return options["temperature"]**2 * _masked_mean(per_token_BxL, mask_BxL)


def forward_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
               temperature: float = 1.0) -> Array:
  """T^2 KL(p_t || p_s): mean-seeking, the student must cover every teacher mode."""
  return _soft_mean("forward_kl", s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                    temperature=temperature)


def reverse_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
               temperature: float = 1.0) -> Array:
  """T^2 KL(p_s || p_t): mode-seeking, the student may drop low-mass teacher modes."""
  return _soft_mean("reverse_kl", s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                    temperature=temperature)


def generalized_jsd(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
                    temperature: float = 1.0, beta: float = 0.5) -> Array:
  """T^2 [beta KL(p_t || M) + (1 - beta) KL(p_s || M)], M = beta p_t + (1 - beta) p_s (GKD).

  The formula tends to 0 at both ends (like beta KL(p_t || p_s) as beta -> 0), so, as in TRL's GKD
  trainer, beta == 0 is defined as forward KL and beta == 1 as reverse KL.
  """
  return _soft_mean("generalized_jsd", s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                    temperature=temperature, beta=beta)


def skew_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
            temperature: float = 1.0, skew: float = 0.1) -> Array:
  """T^2 KL(p_t || skew p_t + (1 - skew) p_s) (DistiLLM); bounded by T^2 log(1 / skew)."""
  return _soft_mean("skew_kl", s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                    temperature=temperature, skew=skew)


def skew_reverse_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
                    temperature: float = 1.0, skew: float = 0.1) -> Array:
  """T^2 KL(p_s || skew p_s + (1 - skew) p_t) (DistiLLM)."""
  return _soft_mean("skew_reverse_kl", s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                    temperature=temperature, skew=skew)


def tvd(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
        temperature: float = 1.0) -> Array:
  """T^2 * total variation distance 0.5 sum_v |p_t - p_s|; lies in [0, T^2]."""
  return _soft_mean("tvd", s_logits_BxLxV, t_logits_BxLxV, mask_BxL, temperature=temperature)


DIVERGENCES: dict[str, Callable[..., Array]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def _divergence(name: str) -> Callable[..., Array]:
  if name not in DIVERGENCES:
    choices = ", ".join(DIVERGENCES)
    raise ValueError(f"unknown divergence {name!r}; choose one of: {choices}")
  return DIVERGENCES[name]


def soft_loss(name: str, s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
              temperature: float, beta: float = 0.5, skew: float = 0.1) -> Array:
  """The divergence called `name`, given only the options it takes (beta, skew)."""
  fn = _divergence(name)
  accepted = inspect.signature(fn).parameters
  options = {k: v for k, v in {"beta": beta, "skew": skew}.items() if k in accepted}
  return fn(s_logits_BxLxV, t_logits_BxLxV, mask_BxL, temperature=temperature, **options)


def distillation_loss(s_logits_BxLxV: Array, t_logits_BxLxV: Array, labels_BxL: Array,
                      mask_BxL: Array, *, loss: str = "forward_kl", temperature: float = 1.0,
                      alpha: float = 0.5, beta: float = 0.5,
                      skew: float = 0.1) -> tuple[Array, dict[str, Array]]:
  """alpha * soft + (1 - alpha) * hard, with soft the divergence `loss` and hard the CE.

  alpha is normally a static Python float: alpha == 0 skips the soft loss (reported as 0); alpha ==
  1 still reports the cross-entropy, which is cheap and worth watching, but keeps it out of the
  loss. A scheduled alpha or temperature (kdjax.schedules) comes in as a traced float32 scalar
  instead: then both terms are always computed and blended arithmetically.
  Returns (loss, metrics) with float32 scalar metrics loss, soft_loss, hard_loss, num_tokens.
  """
  _divergence(loss)  # Fail on a typo in the config even when alpha == 0.
  static_alpha = _is_static(alpha)
  if static_alpha and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  hard = cross_entropy(s_logits_BxLxV, labels_BxL, mask_BxL)
  if static_alpha and alpha == 0.0:
    soft = jnp.zeros_like(hard)
    total = hard
  else:
    soft = soft_loss(loss, s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                     temperature=temperature, beta=beta, skew=skew)
    # A Python branch, not 0 * hard: with alpha == 1 a NaN or inf CE must not reach the loss.
    total = (soft if static_alpha and alpha == 1.0
             else alpha * soft + (1.0 - alpha) * hard)
  metrics = {
      "loss": total,
      "soft_loss": soft,
      "hard_loss": hard,
      "num_tokens": jnp.sum(mask_BxL.astype(jnp.float32)),
  }
  return total, {k: v.astype(jnp.float32) for k, v in metrics.items()}


def token_accuracy(logits_BxLxV: Array, labels_BxL: Array, mask_BxL: Array) -> Array:
  """Mean over unmasked tokens of argmax(logits) == label."""
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == labels_BxL
  return _masked_mean(correct_BxL.astype(jnp.float32), mask_BxL)


def top1_agreement(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array) -> Array:
  """Mean over unmasked tokens of argmax(student) == argmax(teacher)."""
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  agree_BxL = jnp.argmax(s_logits_BxLxV, axis=-1) == jnp.argmax(t_logits_BxLxV, axis=-1)
  return _masked_mean(agree_BxL.astype(jnp.float32), mask_BxL)


# --------------------------------------------------------- features: hidden states, attention
#
# M mapped layer pairs (see kdjax.features); D is the teacher's width (the student's hidden states
# are projected to it first when widths differ).

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
  s, t = _upcast(s_hidden_MxBxLxD), _upcast(t_hidden_MxBxLxD)
  if kind == "mse":
    per_token_MxBxL = jnp.mean(jnp.square(s - t), axis=-1)
  elif kind == "cosine":
    per_token_MxBxL = 0.5 * jnp.sum(jnp.square(_unit(s) - _unit(t)), axis=-1)
  else:
    raise ValueError(f"unknown hidden-state loss {kind!r}; use one of {HIDDEN_LOSSES}")
  return _masked_mean(jnp.mean(per_token_MxBxL, axis=0), mask_BxL)


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
  p_MxBxLxL, q_MxBxLxL = _upcast(t_attn_MxBxLxL), _upcast(s_attn_MxBxLxL)
  seen_MxBxLxL = p_MxBxLxL > 0
  # The inner where keeps log(0) out of the graph: in the unselected branch of the outer one it
  # would still poison the gradient (as in _kl_BxL).
  log_ratio_MxBxLxL = jnp.where(
      seen_MxBxLxL, jnp.log(jnp.where(seen_MxBxLxL, p_MxBxLxL, 1.0))
      - jnp.log(jnp.maximum(q_MxBxLxL, jnp.finfo(q_MxBxLxL.dtype).tiny)), 0.0)
  per_query_MxBxL = jnp.sum(p_MxBxLxL * log_ratio_MxBxLxL, axis=-1)
  return _masked_mean(jnp.mean(per_query_MxBxL, axis=0), mask_BxL)


# ------------------------------------------------------------------ chunked, fused from hidden states


def logits_from_hidden(hidden_NxD: Array, unembed_DxV: Array, softcap: float = 0.0) -> Array:
  """hidden @ unembed in float32 (accumulated in f32 whatever the inputs), then the soft-cap."""
  logits_NxV = jnp.einsum("...d,dv->...v", hidden_NxD, unembed_DxV,
                          preferred_element_type=jnp.float32)
  return softcap * jnp.tanh(logits_NxV / softcap) if softcap > 0 else logits_NxV


def chunked_distillation_loss(s_hidden_BxLxD: Array, s_unembed_DxV: Array, t_hidden_BxLxD: Array,
                              t_unembed_DxV: Array, labels_BxL: Array, mask_BxL: Array, *,
                              temperature: float = 1.0, alpha: float = 0.5, chunk_size: int = 0,
                              loss: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
                              s_logit_softcap: float = 0.0,
                              t_logit_softcap: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """`distillation_loss` from final hidden states, never holding [B, L, V] logits of either model.

  The sequence is cut into chunks of about `chunk_size` tokens (chunk_size / B positions of
  every row, so a sharded batch stays sharded); per chunk, one pass computes both models'
  logits (hidden @ unembed, soft-capped), the divergence and the cross-entropy, and at once the
  gradient of the total loss with respect to the student's logits, which it contracts right away
  into the gradients of the student's hidden states and unembedding (a custom VJP, as Liger's
  fused losses do). So the backward pass only scales stored gradients: the matmul count equals
  the unchunked loss's, and peak memory holds a few [chunk, V] buffers instead of [B, L, V] ones.

  `chunk_size=0` is the plain unchunked computation. Values and gradients equal it. The teacher is
  a constant: its hidden states and unembedding get zero gradient, as in the training step.
  Returns (loss, metrics) exactly like `distillation_loss`.
  """
  _divergence(loss)
  if _is_static(alpha) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if chunk_size < 0:
    raise ValueError(f"chunk_size must be >= 0 (0 = unchunked), got {chunk_size}")
  if chunk_size == 0:
    return distillation_loss(
        logits_from_hidden(s_hidden_BxLxD, s_unembed_DxV, s_logit_softcap),
        logits_from_hidden(t_hidden_BxLxD, t_unembed_DxV, t_logit_softcap), labels_BxL, mask_BxL,
        loss=loss, temperature=temperature, alpha=alpha, beta=beta, skew=skew)
  if labels_BxL.shape != mask_BxL.shape or s_hidden_BxLxD.shape[:-1] != labels_BxL.shape:
    raise ValueError(f"hidden {s_hidden_BxLxD.shape}, labels {labels_BxL.shape} and mask "
                     f"{mask_BxL.shape} must share their leading [B, L] shape")
  # Static settings are baked into the compiled loss; a traced (scheduled) alpha or temperature
  # is None here and rides in `knobs`, an ordinary argument whose cotangent is zero.
  static = lambda x: float(x) if _is_static(x) else None
  settings = _ChunkSettings(loss, static(temperature), static(alpha), float(beta), float(skew),
                            float(s_logit_softcap), float(t_logit_softcap), int(chunk_size))
  knobs = tuple(jnp.zeros((), jnp.float32) if _is_static(x) else jnp.asarray(x, jnp.float32)
                for x in (alpha, temperature))
  total, soft, hard = _fused_loss(settings, s_hidden_BxLxD, s_unembed_DxV, t_hidden_BxLxD,
                                  t_unembed_DxV, labels_BxL, mask_BxL, knobs)
  # Only the total is differentiable: the metrics are for logging.
  metrics = {"loss": total, "soft_loss": jax.lax.stop_gradient(soft),
             "hard_loss": jax.lax.stop_gradient(hard),
             "num_tokens": jnp.sum(mask_BxL.astype(jnp.float32))}
  return total, metrics


class _ChunkSettings(NamedTuple):
  loss: str
  temperature: float | None  # None: traced, read from `knobs`
  alpha: float | None  # None: traced, read from `knobs`
  beta: float
  skew: float
  s_softcap: float
  t_softcap: float
  chunk_size: int


def _chunks(x: Array, per_row: int, padded_len: int) -> Array:
  """[B, L, ...] -> [L' / per_row, B, per_row, ...], zero-padded along L to L'."""
  x = jnp.pad(x, [(0, 0), (0, padded_len - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((x.shape[0], padded_len // per_row, per_row) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _fused_forward(cfg: _ChunkSettings, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask,
                   knobs):
  """(total, soft mean, hard mean) and the gradients of total w.r.t. s_hidden and s_unembed.

  `knobs` = (alpha, temperature) float32 scalars, read only where `cfg` holds None for them.

  Chunks cut the length axis and keep the batch axis whole: a chunk is [B, chunk_size / B]
  tokens, so with the batch sharded over devices each device works on its own rows.
  """
  b, length = labels.shape
  per_row = min(max(1, cfg.chunk_size // b), length)
  padded_len = -(-length // per_row) * per_row
  mask_f32 = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(mask_f32), 1.0)
  xs = (_chunks(s_hidden, per_row, padded_len), _chunks(t_hidden, per_row, padded_len),
        _chunks(labels, per_row, padded_len), _chunks(mask_f32, per_row, padded_len))
  t_unembed = jax.lax.stop_gradient(t_unembed)
  alpha = cfg.alpha if cfg.alpha is not None else knobs[0]
  temperature = cfg.temperature if cfg.temperature is not None else knobs[1]

  def body(carry, chunk_xs):
    # C: the chunk's positions in each row; a chunk holds B x C tokens.
    d_unembed_DxV, soft_sum, hard_sum = carry
    s_h_BxCxD, t_h_BxCxD, labels_BxC, mask_BxC = chunk_xs
    t_logits_BxCxV = logits_from_hidden(jax.lax.stop_gradient(t_h_BxCxD), t_unembed,
                                        cfg.t_softcap)

    def chunk_loss(s_raw_BxCxV):
      s_logits_BxCxV = (cfg.s_softcap * jnp.tanh(s_raw_BxCxV / cfg.s_softcap)
                        if cfg.s_softcap > 0 else s_raw_BxCxV)
      keep = mask_BxC != 0  # a where, as in _masked_mean: masked inf/NaN cannot leak
      ce_BxC = _ce_per_token(s_logits_BxCxV, labels_BxC)
      hard = jnp.sum(jnp.where(keep, ce_BxC * mask_BxC, 0.0))
      soft = jnp.zeros((), jnp.float32)
      if cfg.alpha is None or cfg.alpha > 0.0:
        per_token_BxC = _soft_per_token(cfg.loss, s_logits_BxCxV, t_logits_BxCxV,
                                        temperature=temperature, beta=cfg.beta,
                                        skew=cfg.skew)
        soft = temperature**2 * jnp.sum(jnp.where(keep, per_token_BxC * mask_BxC, 0.0))
      return _blend(alpha, soft, hard) / denom, (soft, hard)

    # The matmuls run on the chunk's tokens flattened to 2-D (T = B * C): XLA:CPU contracts two
    # axes at once (the d_unembed matmul) much more slowly.
    b_rows, c, d = s_h_BxCxD.shape
    s_h_TxD = s_h_BxCxD.reshape(b_rows * c, d)
    s_raw_TxV = jnp.dot(s_h_TxD, s_unembed, preferred_element_type=jnp.float32)
    _, vjp, (soft, hard) = jax.vjp(chunk_loss, s_raw_TxV.reshape(b_rows, c, -1), has_aux=True)
    (g_raw_BxCxV,) = vjp(jnp.ones((), jnp.float32))
    g_raw_TxV = g_raw_BxCxV.reshape(b_rows * c, -1)
    d_hidden_TxD = jnp.dot(g_raw_TxV, s_unembed.T, preferred_element_type=jnp.float32)
    d_unembed_DxV = d_unembed_DxV + jnp.dot(s_h_TxD.T, g_raw_TxV,
                                            preferred_element_type=jnp.float32)
    return (d_unembed_DxV, soft_sum + soft, hard_sum + hard), d_hidden_TxD.reshape(b_rows, c, d)

  init = (jnp.zeros(s_unembed.shape, jnp.float32), jnp.zeros((), jnp.float32),
          jnp.zeros((), jnp.float32))
  (d_unembed, soft_sum, hard_sum), d_hidden = jax.lax.scan(body, init, xs)
  d_hidden = jnp.swapaxes(d_hidden, 0, 1).reshape(b, padded_len, -1)[:, :length]
  d_hidden = d_hidden.astype(s_hidden.dtype)
  soft, hard = soft_sum / denom, hard_sum / denom
  return (_blend(alpha, soft, hard), soft, hard), (d_hidden, d_unembed.astype(s_unembed.dtype))


def _blend(alpha: float | Array, soft: Array, hard: Array) -> Array:
  # Python branches, as in distillation_loss: at alpha 0 or 1 the other term must not reach the
  # loss (0 * inf = NaN). A traced (scheduled) alpha can only blend.
  if not _is_static(alpha):
    return alpha * soft + (1.0 - alpha) * hard
  if alpha == 0.0:
    return hard
  if alpha == 1.0:
    return soft
  return alpha * soft + (1.0 - alpha) * hard


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_loss(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs):
  return _fused_forward(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs)[0]


def _fused_loss_fwd(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs):
  out, grads = _fused_forward(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs)
  # alpha and temperature are settings, not trained: their cotangent is zero too.
  zeros = tuple(_zero_cotangent(x) for x in (t_hidden, t_unembed, labels, mask))
  return out, (grads, zeros + (tuple(_zero_cotangent(k) for k in knobs),))


def _zero_cotangent(x: Array):
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)  # integer labels, bool masks


def _fused_loss_bwd(cfg, residuals, cotangents):
  (d_hidden, d_unembed), zeros = residuals
  ct_total = cotangents[0]  # soft and hard leave through stop_gradient: their cotangents are 0
  return ((ct_total * d_hidden).astype(d_hidden.dtype),
          (ct_total * d_unembed).astype(d_unembed.dtype)) + zeros


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
