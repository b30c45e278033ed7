"""The distillation loss fused with both unembeddings, chunked over tokens (a custom VJP).

Shape letters (the glossary is in kdjax/__init__.py): B batch, L length, D width, V vocab; Q
chunks, W a chunk's positions per row, T = B * W a chunk's tokens. Prefix `t_` is the teacher, `s_`
the student.

The divergence comes from the same registry as the unchunked loss (divergences.DIVERGENCES), and
per chunk the same float32 per-token functions run, so values and gradients equal
`distillation_loss` on full logits.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses.divergences import (blend, cross_entropy, cross_entropy_BxL, distillation_loss,
                                      divergence, is_static)

Array = jax.Array


def logits_from_hidden(hidden_BxLxD: Array, unembed_DxV: Array, softcap: float = 0.0) -> Array:
  """hidden @ unembed in float32 (accumulated in f32 whatever the inputs), then the soft-cap.

  Any leading axes: BxLxD gives BxLxV, a chunk's BxWxD gives BxWxV.
  """
  logits_BxLxV = jnp.einsum("...d,dv->...v", hidden_BxLxD, unembed_DxV,
                            preferred_element_type=jnp.float32)
  return softcap * jnp.tanh(logits_BxLxV / softcap) if softcap > 0 else logits_BxLxV


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
  divergence(loss)  # Fail on a typo in the config even when alpha == 0.
  if is_static(alpha) and not 0.0 <= alpha <= 1.0:
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
  static = lambda x: float(x) if is_static(x) else None
  settings = _ChunkSettings(loss, static(temperature), static(alpha), float(beta), float(skew),
                            float(s_logit_softcap), float(t_logit_softcap), int(chunk_size))
  knobs = tuple(jnp.zeros((), jnp.float32) if is_static(x) else jnp.asarray(x, jnp.float32)
                for x in (alpha, temperature))
  total, soft, hard = _fused_loss(settings, s_hidden_BxLxD, s_unembed_DxV, t_hidden_BxLxD,
                                  t_unembed_DxV, labels_BxL, mask_BxL, knobs)
  # Only the total is differentiable: the metrics are for logging.
  metrics = {"loss": total, "soft_loss": jax.lax.stop_gradient(soft),
             "hard_loss": jax.lax.stop_gradient(hard),
             "num_tokens": jnp.sum(mask_BxL.astype(jnp.float32))}
  return total, metrics


def chunked_cross_entropy(hidden_BxLxD: Array, unembed_DxV: Array, labels_BxL: Array,
                          mask_BxL: Array, *, chunk_size: int,
                          logit_softcap: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Next-token cross-entropy (the masked mean) from final hidden states, never holding [B, L, V]
  logits: the fused loss above with alpha = 0 and no teacher, so per chunk one pass computes the
  logits, the loss and its gradients. For training a model without a teacher (the teacher and
  scratch phases) at large vocabularies. `chunk_size=0` is the plain computation.

  Returns (loss, metrics) with 'loss', 'hard_loss' and 'num_tokens'.
  """
  if chunk_size < 0:
    raise ValueError(f"chunk_size must be >= 0 (0 = unchunked), got {chunk_size}")
  num_tokens = jnp.sum(mask_BxL.astype(jnp.float32))
  if chunk_size == 0:
    ce = cross_entropy(logits_from_hidden(hidden_BxLxD, unembed_DxV, logit_softcap), labels_BxL,
                       mask_BxL)
    return ce, {"loss": ce, "hard_loss": ce, "num_tokens": num_tokens}
  if hidden_BxLxD.shape[:-1] != labels_BxL.shape or labels_BxL.shape != mask_BxL.shape:
    raise ValueError(f"hidden {hidden_BxLxD.shape}, labels {labels_BxL.shape} and mask "
                     f"{mask_BxL.shape} must share their leading [B, L] shape")
  settings = _ChunkSettings(loss="forward_kl", temperature=1.0, alpha=0.0, beta=0.5, skew=0.1,
                            s_softcap=float(logit_softcap), t_softcap=0.0,
                            chunk_size=int(chunk_size))
  knobs = (jnp.zeros((), jnp.float32),) * 2
  total, _, hard = _fused_loss(settings, hidden_BxLxD, unembed_DxV, None, None, labels_BxL,
                               mask_BxL, knobs)
  return total, {"loss": total, "hard_loss": jax.lax.stop_gradient(hard),
                 "num_tokens": num_tokens}


class _ChunkSettings(NamedTuple):
  """The loss's static settings: hashable, so a custom_vjp can take them as nondiff_argnums."""
  loss: str  # a DIVERGENCES name
  temperature: float | None  # None: traced, read from `knobs`
  alpha: float | None  # None: traced, read from `knobs`
  beta: float
  skew: float
  s_softcap: float
  t_softcap: float
  chunk_size: int


def length_chunks(xs, chunk_size: int):
  """[B, L, ...] arrays (a pytree of them, sharing B and L) -> [Q, B, W, ...] chunks of about
  `chunk_size` tokens: W = chunk_size / B positions of every row, zero-padded past L."""
  b, length = jax.tree.leaves(xs)[0].shape[:2]
  per_row, padded_len = _chunk_geometry(b, length, chunk_size)
  return jax.tree.map(lambda x: _chunks(x, per_row, padded_len), xs)


def _chunk_geometry(b: int, length: int, chunk_size: int) -> tuple[int, int]:
  """(positions per row in a chunk, L padded to a multiple of it)."""
  per_row = min(max(1, chunk_size // b), length)
  return per_row, -(-length // per_row) * per_row


def _chunks(x: Array, per_row: int, padded_len: int) -> Array:
  """[B, L, ...] -> [L' / per_row, B, per_row, ...], zero-padded along L to L'."""
  x = jnp.pad(x, [(0, 0), (0, padded_len - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((x.shape[0], padded_len // per_row, per_row) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _fused_forward(cfg: _ChunkSettings, s_hidden_BxLxD, s_unembed_DxV, t_hidden_BxLxD,
                   t_unembed_DxV, labels_BxL, mask_BxL, knobs):
  """(total, soft mean, hard mean) and the gradients of total w.r.t. s_hidden and s_unembed.

  No teacher (t_hidden and t_unembed None) needs alpha = 0: the cross-entropy alone.
  `knobs` = (alpha, temperature) float32 scalars, read only where `cfg` holds None for them.

  Chunks cut the length axis and keep the batch axis whole: a chunk is [B, chunk_size / B]
  tokens, so with the batch sharded over devices each device works on its own rows.
  """
  b, length = labels_BxL.shape
  _, padded_len = _chunk_geometry(b, length, cfg.chunk_size)
  mask_f32_BxL = mask_BxL.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(mask_f32_BxL), 1.0)
  # No teacher (None) stays None: an empty pytree.
  xs = length_chunks((s_hidden_BxLxD, t_hidden_BxLxD, labels_BxL, mask_f32_BxL), cfg.chunk_size)
  alpha = cfg.alpha if cfg.alpha is not None else knobs[0]
  temperature = cfg.temperature if cfg.temperature is not None else knobs[1]
  if t_unembed_DxV is not None:
    t_unembed_DxV = jax.lax.stop_gradient(t_unembed_DxV)
  step = functools.partial(_chunk_step, cfg, s_unembed_DxV, t_unembed_DxV, alpha, temperature,
                           denom)
  init = (jnp.zeros(s_unembed_DxV.shape, jnp.float32), jnp.zeros((), jnp.float32),
          jnp.zeros((), jnp.float32))
  (d_unembed_DxV, soft_sum, hard_sum), d_hidden_QxBxWxD = jax.lax.scan(step, init, xs)
  d_hidden_BxLxD = jnp.swapaxes(d_hidden_QxBxWxD, 0, 1).reshape(b, padded_len, -1)[:, :length]
  d_hidden_BxLxD = d_hidden_BxLxD.astype(s_hidden_BxLxD.dtype)
  soft, hard = soft_sum / denom, hard_sum / denom
  grads = (d_hidden_BxLxD, d_unembed_DxV.astype(s_unembed_DxV.dtype))
  return (blend(alpha, soft, hard), soft, hard), grads


def _chunk_step(cfg: _ChunkSettings, s_unembed_DxV, t_unembed_DxV, alpha, temperature, denom,
                carry, chunk_xs):
  """One scan step: a chunk's loss sums and its gradients w.r.t. s_hidden and s_unembed."""
  d_unembed_DxV, soft_sum, hard_sum = carry
  s_h_BxWxD, t_h_BxWxD, labels_BxW, mask_BxW = chunk_xs
  t_logits_BxWxV = (None if t_h_BxWxD is None else
                    logits_from_hidden(jax.lax.stop_gradient(t_h_BxWxD), t_unembed_DxV,
                                       cfg.t_softcap))
  chunk_loss = functools.partial(_chunk_loss, cfg, alpha, temperature, denom, t_logits_BxWxV,
                                 labels_BxW, mask_BxW)
  # The matmuls run on the chunk's tokens flattened to 2-D (T = B * W): XLA:CPU contracts two
  # axes at once (the d_unembed matmul) much more slowly.
  b_rows, w, d = s_h_BxWxD.shape
  s_h_TxD = s_h_BxWxD.reshape(b_rows * w, d)
  s_raw_TxV = jnp.dot(s_h_TxD, s_unembed_DxV, preferred_element_type=jnp.float32)
  _, vjp, (soft, hard) = jax.vjp(chunk_loss, s_raw_TxV.reshape(b_rows, w, -1), has_aux=True)
  (g_raw_BxWxV,) = vjp(jnp.ones((), jnp.float32))
  g_raw_TxV = g_raw_BxWxV.reshape(b_rows * w, -1)
  d_hidden_TxD = jnp.dot(g_raw_TxV, s_unembed_DxV.T, preferred_element_type=jnp.float32)
  d_unembed_DxV = d_unembed_DxV + jnp.dot(s_h_TxD.T, g_raw_TxV,
                                          preferred_element_type=jnp.float32)
  return (d_unembed_DxV, soft_sum + soft, hard_sum + hard), d_hidden_TxD.reshape(b_rows, w, d)


def _chunk_loss(cfg: _ChunkSettings, alpha, temperature, denom, t_logits_BxWxV, labels_BxW,
                mask_BxW, s_raw_BxWxV):
  """The chunk's share of the total loss, and its (soft, hard) token sums for the metrics."""
  s_logits_BxWxV = (cfg.s_softcap * jnp.tanh(s_raw_BxWxV / cfg.s_softcap)
                    if cfg.s_softcap > 0 else s_raw_BxWxV)
  keep_BxW = mask_BxW != 0  # a where, as in masked_mean: masked inf/NaN cannot leak
  ce_BxW = cross_entropy_BxL(s_logits_BxWxV, labels_BxW)
  hard = jnp.sum(jnp.where(keep_BxW, ce_BxW * mask_BxW, 0.0))
  soft = jnp.zeros((), jnp.float32)
  if cfg.alpha is None or cfg.alpha > 0.0:
    per_token_BxW = divergence(cfg.loss).per_token(s_logits_BxWxV, t_logits_BxWxV,
                                                   temperature=temperature, beta=cfg.beta,
                                                   skew=cfg.skew)
    soft = temperature**2 * jnp.sum(jnp.where(keep_BxW, per_token_BxW * mask_BxW, 0.0))
  return blend(alpha, soft, hard) / denom, (soft, hard)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_loss(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs):
  return _fused_forward(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs)[0]


def _fused_loss_fwd(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs):
  out, grads = _fused_forward(cfg, s_hidden, s_unembed, t_hidden, t_unembed, labels, mask, knobs)
  # alpha and temperature are settings, not trained: their cotangent is zero too.
  zeros = tuple(_zero_cotangent(x) for x in (t_hidden, t_unembed, labels, mask))
  return out, (grads, zeros + (tuple(_zero_cotangent(k) for k in knobs),))


def _zero_cotangent(x: Array | None):
  if x is None:  # no teacher: an empty pytree, whose cotangent is None too
    return None
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)  # integer labels, bool masks


def _fused_loss_bwd(cfg, residuals, cotangents):
  del cfg  # baked into the residuals
  (d_hidden, d_unembed), zeros = residuals
  ct_total = cotangents[0]  # soft and hard leave through stop_gradient: their cotangents are 0
  return ((ct_total * d_hidden).astype(d_hidden.dtype),
          (ct_total * d_unembed).astype(d_unembed.dtype)) + zeros


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
