"""Token-level divergences between teacher and student, cross-entropy, and their blend.

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, V vocab. Prefix `t_` is the
teacher, `s_` the student.

Conventions shared by every loss in kdjax.losses:

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

One registry: `DIVERGENCES` maps a config name (distill.loss) to a `Divergence`, which wraps one
per-token function `fn(s_logp_BxLxV, t_logp_BxLxV, *, beta, skew) -> BxL`. soft_loss,
distillation_loss, the chunked loss (kdjax.losses.chunked) and config_check all read it, so adding
a divergence is one per-token function and one registry line.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


# ------------------------------------------------------------------------------------ primitives


def upcast(x: Array) -> Array:
  """x in at least float32 (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def is_static(x) -> bool:
  """A Python (or NumPy) number, fixed at trace time, as opposed to a (traced) jax array."""
  return not isinstance(x, jax.Array)


def log_probs(logits_BxLxV: Array, temperature: float) -> Array:
  """log softmax(logits / T), in at least float32."""
  return jax.nn.log_softmax(upcast(logits_BxLxV) / temperature, axis=-1)


def masked_mean(per_token_BxL: Array, mask_BxL: Array) -> Array:
  """Mean of per-token values over the tokens where mask != 0 (weighted by the mask)."""
  if per_token_BxL.shape != mask_BxL.shape:
    # Broadcasting here would silently average the wrong thing (e.g. labels not shifted).
    raise ValueError(f"per-token shape {per_token_BxL.shape} != mask shape {mask_BxL.shape}")
  mask_BxL = mask_BxL.astype(per_token_BxL.dtype)
  # A where, not only a product: a masked position may hold inf or NaN (an out-of-range padding
  # label) and 0 * inf = NaN. The where also sends a zero cotangent to those positions.
  total = jnp.sum(jnp.where(mask_BxL != 0, per_token_BxL * mask_BxL, 0.0))
  return total / jnp.maximum(jnp.sum(mask_BxL), 1.0)


def kl_BxL(logp_BxLxV: Array, logq_BxLxV: Array) -> Array:
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


def check_pair(s_logits_BxLxV: Array, t_logits_BxLxV: Array) -> None:
  """Refuses teacher and student logits of different shapes (they must share one vocabulary)."""
  if s_logits_BxLxV.shape != t_logits_BxLxV.shape:
    raise ValueError(f"student logits {s_logits_BxLxV.shape} and teacher logits "
                     f"{t_logits_BxLxV.shape} differ in shape (same vocabulary needed)")


def blend(alpha: float | Array, soft: Array, hard: Array) -> Array:
  """alpha * soft + (1 - alpha) * hard; at a static alpha of 0 or 1, only the term that counts."""
  # Python branches, not 0 * term: at alpha 0 or 1 the other term must not reach the loss
  # (0 * inf = NaN). A traced (scheduled) alpha can only blend.
  if not is_static(alpha):
    return alpha * soft + (1.0 - alpha) * hard
  if alpha == 0.0:
    return hard
  if alpha == 1.0:
    return soft
  return alpha * soft + (1.0 - alpha) * hard


# ------------------------------------------------------------- per-token divergences, registry
#
# Each takes float32 log-probabilities at temperature T (the caller tempers and upcasts, once, for
# every divergence) and every option, ignoring those it does not use: one signature for all, so
# no caller asks which options a divergence takes.


def _forward_kl_BxL(s_logp_BxLxV: Array, t_logp_BxLxV: Array, *, beta: float,
                    skew: float) -> Array:
  """KL(p_t || p_s): mean-seeking, the student must cover every teacher mode."""
  del beta, skew  # not options of this divergence
  return kl_BxL(t_logp_BxLxV, s_logp_BxLxV)


def _reverse_kl_BxL(s_logp_BxLxV: Array, t_logp_BxLxV: Array, *, beta: float,
                    skew: float) -> Array:
  """KL(p_s || p_t): mode-seeking, the student may drop low-mass teacher modes."""
  del beta, skew  # not options of this divergence
  return kl_BxL(s_logp_BxLxV, t_logp_BxLxV)


def _generalized_jsd_BxL(s_logp_BxLxV: Array, t_logp_BxLxV: Array, *, beta: float,
                         skew: float) -> Array:
  """beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s (GKD).

  The formula tends to 0 at both ends (like beta KL(p_t || p_s) as beta -> 0), so, as in TRL's GKD
  trainer, beta == 0 is defined as forward KL and beta == 1 as reverse KL.
  """
  del skew  # not an option of this divergence
  if beta == 0.0:
    return kl_BxL(t_logp_BxLxV, s_logp_BxLxV)
  if beta == 1.0:
    return kl_BxL(s_logp_BxLxV, t_logp_BxLxV)
  m_logp_BxLxV = _log_mixture(t_logp_BxLxV, s_logp_BxLxV, beta)
  return (beta * kl_BxL(t_logp_BxLxV, m_logp_BxLxV)
          + (1.0 - beta) * kl_BxL(s_logp_BxLxV, m_logp_BxLxV))


def _skew_kl_BxL(s_logp_BxLxV: Array, t_logp_BxLxV: Array, *, beta: float,
                 skew: float) -> Array:
  """KL(p_t || skew p_t + (1 - skew) p_s) (DistiLLM); bounded by log(1 / skew)."""
  del beta  # not an option of this divergence
  return kl_BxL(t_logp_BxLxV, _log_mixture(t_logp_BxLxV, s_logp_BxLxV, skew))


def _skew_reverse_kl_BxL(s_logp_BxLxV: Array, t_logp_BxLxV: Array, *, beta: float,
                         skew: float) -> Array:
  """KL(p_s || skew p_s + (1 - skew) p_t) (DistiLLM)."""
  del beta  # not an option of this divergence
  return kl_BxL(s_logp_BxLxV, _log_mixture(s_logp_BxLxV, t_logp_BxLxV, skew))


def _tvd_BxL(s_logp_BxLxV: Array, t_logp_BxLxV: Array, *, beta: float, skew: float) -> Array:
  """Total variation distance 0.5 sum_v |p_t - p_s|; lies in [0, 1]."""
  del beta, skew  # not options of this divergence
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(t_logp_BxLxV) - jnp.exp(s_logp_BxLxV)), axis=-1)


class Divergence:
  """A registered divergence: its per-token function `fn`; calling it gives the soft loss.

  `divergence(s_logits_BxLxV, t_logits_BxLxV, mask_BxL, temperature=T, beta=..., skew=...)` is
  T^2 times the masked mean of `fn` between softmax(logits / T) of both models.
  """

  def __init__(self, fn: Callable[..., Array]):
    self.fn = fn
    # `losses.forward_kl.__doc__` says what forward KL is, not what a Divergence is.
    self.__doc__, self.__name__ = fn.__doc__, fn.__name__.strip("_").removesuffix("_BxL")

  def __repr__(self) -> str:
    return f"Divergence({self.__name__})"

  def per_token(self, s_logits_BxLxV: Array, t_logits_BxLxV: Array, *, temperature: float,
                beta: float = 0.5, skew: float = 0.1) -> Array:
    """Per-token divergence between softmax(logits / T), in at least float32 (no T^2, no mask)."""
    return self.fn(log_probs(s_logits_BxLxV, temperature), log_probs(t_logits_BxLxV, temperature),
                   beta=beta, skew=skew)

  def __call__(self, s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
               temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> Array:
    """T^2 times the mean over unmasked tokens of `per_token`."""
    check_pair(s_logits_BxLxV, t_logits_BxLxV)
    per_token_BxL = self.per_token(s_logits_BxLxV, t_logits_BxLxV, temperature=temperature,
                                   beta=beta, skew=skew)
    return temperature**2 * masked_mean(per_token_BxL, mask_BxL)


forward_kl = Divergence(_forward_kl_BxL)
reverse_kl = Divergence(_reverse_kl_BxL)
generalized_jsd = Divergence(_generalized_jsd_BxL)
skew_kl = Divergence(_skew_kl_BxL)
skew_reverse_kl = Divergence(_skew_reverse_kl_BxL)
tvd = Divergence(_tvd_BxL)

# The one place a divergence name (config field distill.loss) is resolved.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "jsd": generalized_jsd,  # TRL's name for the same loss
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def divergence(name: str) -> Divergence:
  """The registered divergence `name`; a ValueError that lists the choices if there is none."""
  if name not in DIVERGENCES:
    choices = ", ".join(DIVERGENCES)
    raise ValueError(f"unknown divergence {name!r}; choose one of: {choices}")
  return DIVERGENCES[name]


# ------------------------------------------------------------------- losses and metrics on logits


def shared_vocab(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Each array cut to the smallest last axis among them (a no-op when they agree).

  Teacher and student share one tokenizer, but their vocabularies may be padded to different
  sizes (Qwen2.5: 152064 vs 151936 rows): rows past the tokenizer never hold a target, so
  divergences compare the shared rows only. config_check refuses a tokenizer larger than that.
  """
  v = min(a.shape[-1] for a in arrays)
  return tuple(a[..., :v] for a in arrays)


def cross_entropy_BxL(logits_BxLxV: Array, labels_BxL: Array) -> Array:
  """Per-token next-token cross-entropy -log p(label), in at least float32 (no mask)."""
  logp_BxLxV = log_probs(logits_BxLxV, 1.0)
  # mode="fill" turns an out-of-range label (e.g. -100 padding) into NaN: harmless where the mask
  # is 0 (masked_mean drops it), loud where it is not.
  return -jnp.take_along_axis(logp_BxLxV, labels_BxL[..., None], axis=-1, mode="fill")[..., 0]


def cross_entropy(logits_BxLxV: Array, labels_BxL: Array, mask_BxL: Array) -> Array:
  """Mean next-token cross-entropy -log p(label) over unmasked tokens (no temperature)."""
  return masked_mean(cross_entropy_BxL(logits_BxLxV, labels_BxL), mask_BxL)


def soft_loss(name: str, s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array, *,
              temperature: float, beta: float = 0.5, skew: float = 0.1) -> Array:
  """The divergence called `name`; each divergence ignores the options (beta, skew) it lacks."""
  return divergence(name)(s_logits_BxLxV, t_logits_BxLxV, mask_BxL, temperature=temperature,
                          beta=beta, skew=skew)


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
  divergence(loss)  # Fail on a typo in the config even when alpha == 0.
  if is_static(alpha) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  hard = cross_entropy(s_logits_BxLxV, labels_BxL, mask_BxL)
  if is_static(alpha) and alpha == 0.0:
    soft = jnp.zeros_like(hard)
  else:
    soft = soft_loss(loss, s_logits_BxLxV, t_logits_BxLxV, mask_BxL,
                     temperature=temperature, beta=beta, skew=skew)
  metrics = {
      "loss": blend(alpha, soft, hard),
      "soft_loss": soft,
      "hard_loss": hard,
      "num_tokens": jnp.sum(mask_BxL.astype(jnp.float32)),
  }
  return metrics["loss"], {k: v.astype(jnp.float32) for k, v in metrics.items()}


def token_accuracy(logits_BxLxV: Array, labels_BxL: Array, mask_BxL: Array) -> Array:
  """Mean over unmasked tokens of argmax(logits) == label."""
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == labels_BxL
  return masked_mean(correct_BxL.astype(jnp.float32), mask_BxL)


def top1_agreement(s_logits_BxLxV: Array, t_logits_BxLxV: Array, mask_BxL: Array) -> Array:
  """Mean over unmasked tokens of argmax(student) == argmax(teacher)."""
  check_pair(s_logits_BxLxV, t_logits_BxLxV)
  agree_BxL = jnp.argmax(s_logits_BxLxV, axis=-1) == jnp.argmax(t_logits_BxLxV, axis=-1)
  return masked_mean(agree_BxL.astype(jnp.float32), mask_BxL)
