"""The chunked, fused distillation loss equals the unchunked one in value and gradient.

The oracle is the plain path (`chunk_size=0`): full logits, `distillation_loss`, and JAX's
autodiff through both. The chunked path computes its gradients itself (a custom VJP), so the two
share no gradient code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.quick import first_quick

from kdjax import losses

B, L, D, V = 2, 13, 16, 96  # 26 tokens: chunk sizes 8 and 5 leave a ragged last chunk
LOSSES = [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5}),
          ("generalized_jsd", {"beta": 0.0}), ("skew_kl", {"skew": 0.1}),
          ("skew_reverse_kl", {"skew": 0.3}), ("tvd", {})]


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  s_h = rng.standard_normal((B, L, D)).astype(np.float32)
  s_w = (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32)
  t_h = rng.standard_normal((B, L, D)).astype(np.float32)
  t_w = (2 * rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32)
  labels = rng.integers(0, V, size=(B, L)).astype(np.int32)
  mask = np.ones((B, L), np.float32)
  mask[1, 9:] = 0.0  # padding
  labels[1, 11] = -100  # an out-of-range label under the mask: must not leak a NaN
  return [jnp.asarray(x, dtype) for x in (s_h, s_w, t_h, t_w)] + [labels, mask]


_RESULTS = {}  # results on the default inputs, computed once: several tests compare with them


def _loss_and_grads(chunk_size, name, options, alpha=0.5, softcaps=(0.0, 0.0), inputs=None):
  if inputs is None:
    key = (chunk_size, name, tuple(sorted(options.items())), alpha, softcaps)
    if key not in _RESULTS:
      _RESULTS[key] = _compute_loss_and_grads(chunk_size, name, options, alpha, softcaps,
                                              _inputs())
    return _RESULTS[key]
  return _compute_loss_and_grads(chunk_size, name, options, alpha, softcaps, inputs)


def _compute_loss_and_grads(chunk_size, name, options, alpha, softcaps, inputs):
  s_h, s_w, t_h, t_w, labels, mask = inputs

  def f(s_h, s_w, t_h, t_w):
    return losses.chunked_distillation_loss(
        s_h, s_w, t_h, t_w, labels, mask, temperature=2.0, alpha=alpha, chunk_size=chunk_size,
        loss=name, s_logit_softcap=softcaps[0], t_logit_softcap=softcaps[1], **options)

  (value, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
      s_h, s_w, t_h, t_w)
  return value, metrics, grads


@pytest.mark.parametrize("name, options", LOSSES)
@pytest.mark.parametrize("chunk_size", first_quick([5, 8, 64]))  # 5 divides nothing
def test_chunked_equals_unchunked_for_every_divergence(name, options, chunk_size):
  want, want_m, want_g = _loss_and_grads(0, name, options)
  got, got_m, got_g = _loss_and_grads(chunk_size, name, options)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in ("soft_loss", "hard_loss", "num_tokens"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, err_msg=k)
  for g, w, what in zip(got_g[:2], want_g[:2], ("d s_hidden", "d s_unembed")):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=what)
  assert np.abs(want_g[0][1, 9:]).max() == 0.0  # masked tokens: no gradient (oracle)
  assert np.abs(got_g[0][1, 9:]).max() == 0.0


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("softcaps", [(0.0, 0.0), (5.0, 3.0)])
def test_alpha_limits_and_soft_capping(alpha, softcaps):
  want, want_m, want_g = _loss_and_grads(0, "forward_kl", {}, alpha=alpha, softcaps=softcaps)
  got, got_m, got_g = _loss_and_grads(7, "forward_kl", {}, alpha=alpha, softcaps=softcaps)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_m["soft_loss"], want_m["soft_loss"], rtol=1e-5, atol=1e-7)
  for g, w in zip(got_g[:2], want_g[:2]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  if softcaps[0]:  # the cap changes the loss: it is really applied
    plain, _, _ = _loss_and_grads(7, "forward_kl", {}, alpha=alpha)
    assert abs(float(plain) - float(got)) > 1e-4


def test_teacher_is_a_constant_and_gradients_match_finite_differences():
  _, _, grads = _loss_and_grads(6, "generalized_jsd", {"beta": 0.5})
  assert not np.any(grads[2]) and not np.any(grads[3])  # teacher hidden and unembedding
  s_h, s_w, t_h, t_w, labels, mask = _inputs()
  f = jax.jit(lambda w: losses.chunked_distillation_loss(
      s_h, w, t_h, t_w, labels, mask, temperature=2.0, alpha=0.5, chunk_size=6,
      loss="generalized_jsd")[0])  # compiled once for both evaluations
  # Central differences in float32 along a random direction of the student's unembedding.
  direction = jnp.asarray(np.random.default_rng(1).standard_normal(s_w.shape), jnp.float32)
  eps = 1e-2
  fd = (f(s_w + eps * direction) - f(s_w - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(grads[1], direction)), float(fd), rtol=2e-3)


def test_bf16_hidden_states_give_bf16_gradients_close_to_f32():
  f32 = _inputs()
  bf16 = _inputs(dtype=jnp.bfloat16)
  bf16 = bf16[:4] + f32[4:]
  _, _, g = _loss_and_grads(5, "forward_kl", {}, inputs=bf16)
  _, _, want = _loss_and_grads(0, "forward_kl", {},
                               inputs=[x.astype(jnp.float32) for x in bf16[:4]] + f32[4:])
  assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
  # bf16 keeps 8 mantissa bits: gradients agree with the f32 computation to bf16 rounding.
  np.testing.assert_allclose(np.asarray(g[1], np.float32), want[1], rtol=2e-2, atol=2e-3)


def _temp_bytes(l, chunk_size, d=32, v=8192):
  """XLA's scratch memory for the loss's gradient (inputs and outputs excluded)."""
  args = (jax.ShapeDtypeStruct((1, l, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((1, l, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((1, l), jnp.int32), jax.ShapeDtypeStruct((1, l), jnp.float32))

  def f(s_h, s_w, t_h, t_w, labels, mask):
    return losses.chunked_distillation_loss(s_h, s_w, t_h, t_w, labels, mask, temperature=2.0,
                                            alpha=0.5, chunk_size=chunk_size)[0]

  grad = jax.jit(jax.grad(f, argnums=(0, 1)))
  return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_never_holds_full_logits():
  v, chunk = 8192, 64
  full_logits = 2048 * v * 4  # one model's [L, V] logits in f32: 64 MiB
  assert _temp_bytes(2048, 0) >= 2 * full_logits  # the plain path holds both models' logits
  chunked = _temp_bytes(2048, chunk)
  # A handful of [chunk, V] buffers whatever the length: 4x the tokens add only copies of the
  # [L, D] hidden states (D = 32), nothing of size L x V.
  assert chunked - _temp_bytes(512, chunk) <= 4 * (2048 - 512) * 32 * 4
  assert chunked <= 8 * chunk * v * 4 and chunked < full_logits / 4


@pytest.mark.parametrize("chunk_size", [5, 8, 64])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_chunked_cross_entropy_equals_autodiff_of_the_plain_loss(chunk_size, softcap):
  s_h, s_w, _, _, labels, mask = _inputs()

  def plain(h, w):  # full logits, and JAX's autodiff: no code shared with the chunked path
    logits = jnp.einsum("bld,dv->blv", h, w)
    if softcap:
      logits = softcap * jnp.tanh(logits / softcap)
    return losses.cross_entropy(logits, labels, mask)

  def chunked(h, w):
    return losses.chunked_cross_entropy(h, w, labels, mask, chunk_size=chunk_size,
                                        logit_softcap=softcap)

  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(s_h, s_w)
  (got, metrics), got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1),
                                                         has_aux=True))(s_h, s_w)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert metrics["hard_loss"] == got and metrics["num_tokens"] == mask.sum()
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_never_holds_full_logits():
  v, length, d, chunk = 8192, 2048, 32, 64
  args = (jnp.zeros((1, length, d)), jnp.zeros((d, v)), jnp.zeros((1, length), jnp.int32),
          jnp.ones((1, length)))

  def temp(chunk_size):
    grad = jax.jit(jax.grad(lambda h, w, y, m: losses.chunked_cross_entropy(
        h, w, y, m, chunk_size=chunk_size)[0], argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  full_logits = length * v * 4
  assert temp(0) >= full_logits
  assert temp(chunk) <= 8 * chunk * v * 4 and temp(chunk) < full_logits / 4


def _hellinger_BxL(s_logp_BxLxV, t_logp_BxLxV, *, beta, skew):
  """Squared Hellinger distance: a divergence kdjax lacks, registered only by this test."""
  del beta, skew
  root_gap_BxLxV = jnp.exp(0.5 * t_logp_BxLxV) - jnp.exp(0.5 * s_logp_BxLxV)
  return 0.5 * jnp.sum(jnp.square(root_gap_BxLxV), axis=-1)


def test_a_registered_divergence_reaches_the_chunked_loss(monkeypatch):
  # The chunked loss reads the same registry as the unchunked one: one line adds it to both.
  monkeypatch.setitem(losses.DIVERGENCES, "hellinger", losses.Divergence(_hellinger_BxL))
  want, want_m, want_g = _loss_and_grads(0, "hellinger", {}, inputs=_inputs())
  got, got_m, got_g = _loss_and_grads(5, "hellinger", {}, inputs=_inputs())
  assert float(want_m["soft_loss"]) > 0.0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_m["soft_loss"], want_m["soft_loss"], rtol=1e-5)
  for g, w in zip(got_g[:2], want_g[:2]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
