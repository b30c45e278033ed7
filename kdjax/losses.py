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

import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _upcast(x: Array) -> Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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


def cross_entropy(logits_BxLxV: Array, labels_BxL: Array, mask_BxL: Array) -> Array:
  """Mean next-token cross-entropy -log p(label) over unmasked tokens (no temperature)."""
  logp_BxLxV = _log_probs(logits_BxLxV, 1.0)
  # mode="fill" turns an out-of-range label (e.g. -100 padding) into NaN: harmless where the mask
  # is 0 (_masked_mean drops it), loud where it is not.
  label_logp_BxL = jnp.take_along_axis(
      logp_BxLxV, labels_BxL[..., None], axis=-1, mode="fill")[..., 0]
  return _masked_mean(-label_logp_BxL, mask_BxL)


def forward_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
               temperature: float = 1.0) -> Array:
  """T^2 KL(p_t || p_s): mean-seeking, the student must cover every teacher mode."""
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  s_logp_BxLxV = _log_probs(s_logits_BxLxV, temperature)
  t_logp_BxLxV = _log_probs(t_logits_BxLxV, temperature)
  return temperature**2 * _masked_mean(_kl_BxL(t_logp_BxLxV, s_logp_BxLxV), mask_BxL)


def reverse_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
               temperature: float = 1.0) -> Array:
  """T^2 KL(p_s || p_t): mode-seeking, the student may drop low-mass teacher modes."""
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  s_logp_BxLxV = _log_probs(s_logits_BxLxV, temperature)
  t_logp_BxLxV = _log_probs(t_logits_BxLxV, temperature)
  return temperature**2 * _masked_mean(_kl_BxL(s_logp_BxLxV, t_logp_BxLxV), mask_BxL)


def generalized_jsd(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
                    temperature: float = 1.0, beta: float = 0.5) -> Array:
  """T^2 [beta KL(p_t || M) + (1 - beta) KL(p_s || M)], M = beta p_t + (1 - beta) p_s (GKD).

  The formula tends to 0 at both ends (like beta KL(p_t || p_s) as beta -> 0), so, as in TRL's GKD
  trainer, beta == 0 is defined as forward KL and beta == 1 as reverse KL.
  """
  if beta == 0.0:
    return forward_kl(s_logits_BxLxV, t_logits_BxLxV, mask_BxL, temperature=temperature)
  if beta == 1.0:
    return reverse_kl(s_logits_BxLxV, t_logits_BxLxV, mask_BxL, temperature=temperature)
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  s_logp_BxLxV = _log_probs(s_logits_BxLxV, temperature)
  t_logp_BxLxV = _log_probs(t_logits_BxLxV, temperature)
  m_logp_BxLxV = _log_mixture(t_logp_BxLxV, s_logp_BxLxV, beta)
  jsd_BxL = (beta * _kl_BxL(t_logp_BxLxV, m_logp_BxLxV)
             + (1.0 - beta) * _kl_BxL(s_logp_BxLxV, m_logp_BxLxV))
  return temperature**2 * _masked_mean(jsd_BxL, mask_BxL)


def skew_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
            temperature: float = 1.0, skew: float = 0.1) -> Array:
  """T^2 KL(p_t || skew p_t + (1 - skew) p_s) (DistiLLM); bounded by T^2 log(1 / skew)."""
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  s_logp_BxLxV = _log_probs(s_logits_BxLxV, temperature)
  t_logp_BxLxV = _log_probs(t_logits_BxLxV, temperature)
  m_logp_BxLxV = _log_mixture(t_logp_BxLxV, s_logp_BxLxV, skew)
  return temperature**2 * _masked_mean(_kl_BxL(t_logp_BxLxV, m_logp_BxLxV), mask_BxL)


def skew_reverse_kl(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
                    temperature: float = 1.0, skew: float = 0.1) -> Array:
  """T^2 KL(p_s || skew p_s + (1 - skew) p_t) (DistiLLM)."""
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  s_logp_BxLxV = _log_probs(s_logits_BxLxV, temperature)
  t_logp_BxLxV = _log_probs(t_logits_BxLxV, temperature)
  m_logp_BxLxV = _log_mixture(s_logp_BxLxV, t_logp_BxLxV, skew)
  return temperature**2 * _masked_mean(_kl_BxL(s_logp_BxLxV, m_logp_BxLxV), mask_BxL)


def tvd(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
        temperature: float = 1.0) -> Array:
  """T^2 * total variation distance 0.5 sum_v |p_t - p_s|; lies in [0, T^2]."""
  _check_pair(s_logits_BxLxV, t_logits_BxLxV)
  s_p_BxLxV = jnp.exp(_log_probs(s_logits_BxLxV, temperature))
  t_p_BxLxV = jnp.exp(_log_probs(t_logits_BxLxV, temperature))
  tvd_BxL = 0.5 * jnp.sum(jnp.abs(t_p_BxLxV - s_p_BxLxV), axis=-1)
  return temperature**2 * _masked_mean(tvd_BxL, mask_BxL)


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

  alpha is a static Python float: alpha == 0 skips the soft loss (reported as 0); alpha == 1 still
  reports the cross-entropy, which is cheap and worth watching, but keeps it out of the loss.
  Returns (loss, metrics) with float32 scalar metrics loss, soft_loss, hard_loss, num_tokens.
  """
  _divergence(loss)  # Fail on a typo in the config even when alpha == 0.
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  hard = cross_entropy(s_logits_BxLxV, labels_BxL, mask_BxL)
  if alpha == 0.0:
    soft = jnp.zeros_like(hard)
    total = hard
  else:
    soft = soft_loss(loss, s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                     temperature=temperature, beta=beta, skew=skew)
    # A Python branch, not 0 * hard: with alpha == 1 a NaN or inf CE must not reach the loss.
    total = soft if alpha == 1.0 else alpha * soft + (1.0 - alpha) * hard
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
