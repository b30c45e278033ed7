"""Soft losses against a cached teacher: three estimators of T^2 KL(p_t || p_s).

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, V vocab, J top-k entries
per token (J1 = J + 1 buckets), E sample slots per token.

The cache (kdjax/teacher_cache/format.py) holds, per token, the teacher's top-k log-probs at
temperature 1, ell_v = log softmax(t_logits)_v, and the log-mass of the rest. Training at
temperature T needs p_T(v) = softmax(ell / T)_v; each estimator recovers what it can of it:

  'topk_renorm'    (MaxText, Tunix) both distributions restricted to the teacher's top-k ids S and
                   renormalised there: KL(p_T|S || q_T|S). Exact for that definition at any T,
                   since the ratios p(u) / p(v) within S are known; it ignores the tail entirely.
  'topk_residual'  (DistillKit, EasyDeL) k + 1 buckets: the k ids, and one bucket for the rest.
                   The student's buckets come from its full distribution q_T (its tail bucket
                   1 - sum_S q_T computed as a log-sum-exp over the ids outside S, not by a
                   cancelling subtraction). The cache knows the teacher's tail mass
                   r = 1 - sum_S p but not how it is spread; the estimator assumes it is spread
                   like the student's own tail, p_j = r q_j / r_q for j outside S (r_q the
                   student's tail mass at T = 1), which is what the T = 1 bucket KL assumes
                   implicitly. Tempering that completed teacher gives the tail bucket
                   r^(1/T) sum_j (q_j / r_q)^(1/T) (the student's part held constant: the target
                   gets no gradient), and the loss is exactly KL(p~_T || q_T) over the whole
                   vocabulary, which equals the KL over the k + 1 buckets since both tails have
                   the same shape. At T = 1 the tail bucket is r itself. Merging ids into buckets
                   never increases a KL: this is a lower bound on the full KL at T = 1.
  'sampled'        (Gemma 3) E ids drawn i.i.d. from the tempered teacher p_Ts at cache time
                   (Ts, the cache's sample_temperature, is the training temperature the cache
                   is built for); the cache keeps the distinct ids v, their counts c_v
                   (sum c_v = E) and log p_Ts(v). The target is the empirical distribution
                   c_v / E, an unbiased estimate of p_Ts, and the value
                   T^2 sum_v (c_v / E) (log p_Ts(v) - log q_T(v)) is the Monte Carlo estimate of
                   T^2 KL(p_T || q_T), unbiased in value and gradient when T = Ts (the reader
                   checks that they agree). (The Gemma 3 report describes keeping the teacher's
                   own probabilities on the sampled ids, renormalised; that target is biased
                   towards the head: the mass of the ids no draw hit, mostly in the tail, goes to
                   those drawn, which nearly always include the top ids. Counts are unbiased.)

With S = all V ids (k = V), 'topk_renorm' and 'topk_residual' equal losses.forward_kl on the live
teacher logits at every temperature (log_softmax(ell / T) = log_softmax(t_logits / T)); so does
'sampled' when the counts are exactly proportional to p_T over the whole support.

Conventions are losses.forward_kl's: float32 inside whatever the inputs' dtypes (float16 cached
log-probs, uint16 ids), mean over unmasked tokens, times T^2, 0 log 0 = 0, and masked positions
can neither change the value nor get a gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from kdjax import losses

Array = jax.Array

# The keys a cached batch carries (reader.TeacherCache.batch returns them).
TOPK_IDS, TOPK_LOGPROBS, RESIDUAL = "t_topk_ids", "t_topk_logprobs", "t_residual"
SAMPLE_IDS, SAMPLE_COUNTS, SAMPLE_LOGPROBS = "t_sample_ids", "t_sample_counts", "t_sample_logprobs"
# 1 where a token has a recorded teacher distribution (answers with their top-k, packed with
# records that have none); a cache built per batch has one everywhere and omits it.
TEACHER_WEIGHT = "t_weight"


def _f32(x: Array) -> Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# The same masked mean and 0 log 0 = 0 KL as the live losses.
_masked_mean = losses.masked_mean
_kl_BxL = losses.kl_BxL


def _gather(x_BxLxV: Array, ids_BxLxJ: Array) -> Array:
  return jnp.take_along_axis(x_BxLxV, ids_BxLxJ.astype(jnp.int32), axis=-1)


def _in_ids(ids_BxLxJ: Array, vocab_size: int) -> Array:
  """B x L x V bool: True at the ids listed for each token."""
  b, l, _ = ids_BxLxJ.shape
  return jnp.zeros((b, l, vocab_size), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(l)[None, :, None],
      ids_BxLxJ.astype(jnp.int32)].set(True)


def _outside_logsumexp(x_BxLxV: Array, in_ids_BxLxV: Array) -> Array:
  """log sum over the ids not in `in_ids` of exp(x); -inf where that set is empty."""
  outside_BxLxV = jnp.where(in_ids_BxLxV, -jnp.inf, x_BxLxV)
  # logsumexp of an all -inf row has a NaN gradient even under a zero cotangent: feed it zeros
  # there and put the -inf back afterwards (as losses.divergences._log_mixture does).
  empty_BxLx1 = jnp.all(in_ids_BxLxV, axis=-1, keepdims=True)
  lse_BxL = jax.nn.logsumexp(jnp.where(empty_BxLx1, 0.0, outside_BxLxV), axis=-1)
  return jnp.where(empty_BxLx1[..., 0], -jnp.inf, lse_BxL)


def complement_logsumexp(logp_BxLxV: Array, ids_BxLxJ: Array) -> Array:
  """log sum_{v not in ids} exp(logp_v): the log-mass outside `ids`, -inf if they cover V.

  A sum over the complement, not log(1 - sum over ids), which cancels to noise when the ids
  hold nearly all the mass. Gradients are finite even when the complement is empty.
  """
  return _outside_logsumexp(logp_BxLxV, _in_ids(ids_BxLxJ, logp_BxLxV.shape[-1]))


def topk_renorm_per_token(s_logits_BxLxV: Array, ids_BxLxJ: Array, t_logprobs_BxLxJ: Array, *,
                          temperature: float) -> Array:
  """KL over the teacher's top-k ids, both sides renormalised there (no T^2)."""
  t_logp_BxLxJ = jax.nn.log_softmax(_f32(t_logprobs_BxLxJ) / temperature, axis=-1)
  s_logp_BxLxJ = jax.nn.log_softmax(_gather(_f32(s_logits_BxLxV), ids_BxLxJ) / temperature,
                                    axis=-1)
  return _kl_BxL(t_logp_BxLxJ, s_logp_BxLxJ)


def topk_residual_per_token(s_logits_BxLxV: Array, ids_BxLxJ: Array, t_logprobs_BxLxJ: Array,
                            t_residual_BxL: Array, *, temperature: float) -> Array:
  """KL over k + 1 buckets: the top-k ids and the rest (no T^2); see the module docstring."""
  in_ids_BxLxV = _in_ids(ids_BxLxJ, s_logits_BxLxV.shape[-1])
  s_logp_BxLxV = jax.nn.log_softmax(_f32(s_logits_BxLxV) / temperature, axis=-1)
  s_logp_BxLxJ1 = jnp.concatenate(
      [_gather(s_logp_BxLxV, ids_BxLxJ),
       _outside_logsumexp(s_logp_BxLxV, in_ids_BxLxV)[..., None]], axis=-1)
  # log sum_j (q_j / r_q)^(1/T) over the tail: how tempering spreads a tail shaped like the
  # student's (0 at T = 1). A constant: the teacher's target gets no gradient.
  s_logp1_BxLxV = jax.lax.stop_gradient(jax.nn.log_softmax(_f32(s_logits_BxLxV), axis=-1))
  s_tail1_BxL = _outside_logsumexp(s_logp1_BxLxV, in_ids_BxLxV)
  spread_BxL = jnp.where(jnp.isneginf(s_tail1_BxL), 0.0,  # no tail: the bucket is empty anyway
                         _outside_logsumexp(s_logp1_BxLxV / temperature, in_ids_BxLxV)
                         - s_tail1_BxL / temperature)
  # The teacher's k + 1 tempered buckets, renormalised (which also absorbs the rounding of
  # float16 log-probs, so they always sum to one).
  t_buckets_BxLxJ1 = jnp.concatenate(
      [_f32(t_logprobs_BxLxJ) / temperature,
       (_f32(t_residual_BxL) / temperature + spread_BxL)[..., None]], axis=-1)
  return _kl_BxL(jax.nn.log_softmax(t_buckets_BxLxJ1, axis=-1), s_logp_BxLxJ1)


def sampled_per_token(s_logits_BxLxV: Array, ids_BxLxE: Array, counts_BxLxE: Array,
                      t_logprobs_BxLxE: Array, *, temperature: float) -> Array:
  """Monte Carlo KL(p_T || q_T) from ids drawn from p_T (no T^2); see the module docstring.

  `t_logprobs_BxLxE` are log p_T of the drawn ids, T the temperature they were drawn at. Slots
  with count 0 are padding: they carry no weight, whatever their id and log-prob.
  """
  counts_BxLxE = _f32(counts_BxLxE)
  used_BxLxE = counts_BxLxE > 0
  pi_BxLxE = counts_BxLxE / jnp.maximum(jnp.sum(counts_BxLxE, axis=-1, keepdims=True), 1.0)
  s_logp_BxLxE = _gather(jax.nn.log_softmax(_f32(s_logits_BxLxV) / temperature, axis=-1),
                         ids_BxLxE)
  log_ratio_BxLxE = jnp.where(used_BxLxE, _f32(t_logprobs_BxLxE) - s_logp_BxLxE, 0.0)
  return jnp.sum(pi_BxLxE * log_ratio_BxLxE, axis=-1)


def _topk_renorm(s_logits_BxLxV, cached, temperature):
  return topk_renorm_per_token(s_logits_BxLxV, cached[TOPK_IDS], cached[TOPK_LOGPROBS],
                               temperature=temperature)


def _topk_residual(s_logits_BxLxV, cached, temperature):
  return topk_residual_per_token(s_logits_BxLxV, cached[TOPK_IDS], cached[TOPK_LOGPROBS],
                                 cached[RESIDUAL], temperature=temperature)


def _sampled(s_logits_BxLxV, cached, temperature):
  return sampled_per_token(s_logits_BxLxV, cached[SAMPLE_IDS], cached[SAMPLE_COUNTS],
                           cached[SAMPLE_LOGPROBS], temperature=temperature)


ESTIMATORS: dict[str, Callable[..., Array]] = {
    "topk_renorm": _topk_renorm,
    "topk_residual": _topk_residual,
    "sampled": _sampled,
}
# Which cached arrays each estimator reads (a cache built without samples cannot serve 'sampled').
NEEDS = {"topk_renorm": (TOPK_IDS, TOPK_LOGPROBS),
         "topk_residual": (TOPK_IDS, TOPK_LOGPROBS, RESIDUAL),
         "sampled": (SAMPLE_IDS, SAMPLE_COUNTS, SAMPLE_LOGPROBS)}


def soft_loss(estimator: str, s_logits_BxLxV: Array, cached: Mapping[str, Array],
              mask_BxL: Array, *, temperature: float = 1.0) -> Array:
  """T^2 x the token mean of `estimator`'s KL(p_t || p_s) against the cached teacher.

  `cached` holds the arrays TeacherCache.batch returns (a training batch may carry them next to
  its tokens). Student logits wider than the cache's vocabulary (padding rows) are cut to it by
  the caller, as losses.shared_vocab does for live logits; every cached id must index them.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown cache estimator {estimator!r}; choose one of: "
                     f"{', '.join(ESTIMATORS)}")
  missing = [k for k in NEEDS[estimator] if k not in cached]
  if missing:
    raise ValueError(f"cache estimator {estimator!r} needs {', '.join(missing)}; build the "
                     "cache with them (scripts/cache_teacher.py --estimator_samples for "
                     "'sampled').")
  per_token_BxL = ESTIMATORS[estimator](s_logits_BxLxV, cached, temperature)
  return temperature**2 * _masked_mean(per_token_BxL, mask_BxL)


def distillation_loss(s_logits_BxLxV: Array, cached: Mapping[str, Array], labels_BxL: Array,
                      mask_BxL: Array, *, estimator: str, temperature: float = 1.0,
                      alpha: float = 0.5) -> tuple[Array, dict[str, Array]]:
  """losses.distillation_loss with the soft term from the cache: (loss, metrics), same metrics.

  alpha and temperature may be traced scalars (a schedule, kdjax.schedules); then both terms are
  always computed and blended arithmetically, as losses.distillation_loss does. Where `cached`
  has a per-token TEACHER_WEIGHT (recorded answers, kdjax.data.answer_logits), the soft term is
  the mean over the masked tokens that have a recorded teacher, and the hard term counts every
  masked token (ground truth mixed in has no teacher distribution).
  """
  static_alpha = losses.is_static(alpha)
  if static_alpha and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  hard = losses.cross_entropy(s_logits_BxLxV, labels_BxL, mask_BxL)
  if static_alpha and alpha == 0.0:
    soft = jnp.zeros_like(hard)
  else:
    soft_mask_BxL = mask_BxL
    if TEACHER_WEIGHT in cached:
      soft_mask_BxL = mask_BxL * cached[TEACHER_WEIGHT].astype(mask_BxL.dtype)
    soft = soft_loss(estimator, s_logits_BxLxV, cached, soft_mask_BxL, temperature=temperature)
  total = losses.blend(alpha, soft, hard)
  metrics = {"loss": total, "soft_loss": soft, "hard_loss": hard,
             "num_tokens": jnp.sum(mask_BxL.astype(jnp.float32))}
  return total, {k: v.astype(jnp.float32) for k, v in metrics.items()}


def gap_sums(s_logits_BxLxV: Array, t_logits_BxLxV: Array, cached: Mapping[str, Array],
             mask_BxL: Array, *, estimators: tuple[str, ...],
             temperature: float = 1.0) -> dict[str, Array]:
  """How far each estimator is from the live loss on one batch, as sums that add over batches.

  With n = sum(mask): 'live' and every estimator's value times n (token sums of the soft loss);
  '<name>_abs', the token sum of |estimator - live| per token (T^2 included); and the dot
  products of gradients w.r.t. the student's logits, scaled to token sums, for the cosine
  between each estimator's gradient and the live one: '<name>_gl' (estimator . live),
  '<name>_gg' and 'live_gg' (squared norms). The live loss is losses.forward_kl.
  """
  n = jnp.sum(mask_BxL.astype(jnp.float32))
  live_fn = lambda s: losses.forward_kl(s, t_logits_BxLxV, mask_BxL, temperature=temperature)
  live, g_live = jax.value_and_grad(live_fn)(s_logits_BxLxV)
  t_logp_BxLxV = jax.nn.log_softmax(_f32(t_logits_BxLxV) / temperature, axis=-1)
  s_logp_BxLxV = jax.nn.log_softmax(_f32(s_logits_BxLxV) / temperature, axis=-1)
  live_BxL = temperature**2 * _kl_BxL(t_logp_BxLxV, s_logp_BxLxV)
  keep_BxL = mask_BxL != 0
  sums = {"live": live * n, "live_gg": n * n * jnp.vdot(g_live, g_live)}
  for name in estimators:
    value, g = jax.value_and_grad(lambda s: soft_loss(name, s, cached, mask_BxL,
                                                      temperature=temperature))(s_logits_BxLxV)
    est_BxL = temperature**2 * ESTIMATORS[name](s_logits_BxLxV, cached, temperature)
    sums[name] = value * n
    sums[name + "_abs"] = jnp.sum(jnp.where(keep_BxL, jnp.abs(est_BxL - live_BxL), 0.0))
    sums[name + "_gl"] = n * n * jnp.vdot(g, g_live)
    sums[name + "_gg"] = n * n * jnp.vdot(g, g)
  return sums
