"""Tests for kdjax.losses against an independent float64 numpy oracle, plus properties and limits.

Expected values never come from kdjax: they come from `np_*` functions written directly from the
formulas (softmax, then explicit sums of p log(p / q)). Shapes are tiny: B=2, L=5, V=11.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

B, L, V = 2, 5, 11

# f32 evaluation of O(1) log-ratios summed over V=11 terms: relative error ~1e-6 at worst.
RTOL, ATOL = 1e-5, 1e-6

# (name, options) for every divergence, including the JSD end points and both skews.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.1}),
    ("generalized_jsd", {"beta": 0.9}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0}),
    ("skew_kl", {"skew": 0.1}),
    ("skew_kl", {"skew": 0.5}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.5}),
    ("tvd", {}),
]
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in opts.items()) for name, opts in CASES]
parametrize_cases = pytest.mark.parametrize("name,opts", CASES, ids=CASE_IDS)
# One case per code path (the JSD end points are checked equal to the plain KLs): for the tests
# that differentiate, where compiling every variant would cost more than it tells.
CORE = ["forward_kl", "reverse_kl", "generalized_jsd-beta0.5", "skew_kl-skew0.1",
        "skew_reverse_kl-skew0.1", "tvd"]
CORE_CASES = [c for c, i in zip(CASES, CASE_IDS) if i in CORE]
parametrize_core = pytest.mark.parametrize("name,opts", CORE_CASES, ids=CORE)
parametrize_jit = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


# ----------------------------------------------------------------------------- numpy oracle


def np_softmax(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
  """Per-token sum_v p log(p / q), with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * np.log(p / q), 0.0)
  return terms.sum(axis=-1)


def np_divergence(name, p_s, p_t, beta=0.5, skew=0.1):
  """Per-token divergence between student probabilities p_s and teacher probabilities p_t."""
  if name == "forward_kl":
    return np_kl(p_t, p_s)
  if name == "reverse_kl":
    return np_kl(p_s, p_t)
  if name == "generalized_jsd":
    if beta == 0.0:
      return np_kl(p_t, p_s)
    if beta == 1.0:
      return np_kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m)
  if name == "skew_kl":
    return np_kl(p_t, skew * p_t + (1 - skew) * p_s)
  if name == "skew_reverse_kl":
    return np_kl(p_s, skew * p_s + (1 - skew) * p_t)
  if name == "tvd":
    return 0.5 * np.abs(p_t - p_s).sum(axis=-1)
  raise AssertionError(name)


def np_masked_mean(per_token, mask):
  m = np.asarray(mask, np.float64)
  return np.where(m != 0, per_token * m, 0.0).sum() / max(m.sum(), 1.0)


def np_loss(name, s_logits, t_logits, mask, temperature=1.0, **opts):
  """T^2 * masked mean of the divergence between softmax(s / T) and softmax(t / T)."""
  p_s, p_t = np_softmax(s_logits, temperature), np_softmax(t_logits, temperature)
  return temperature**2 * np_masked_mean(np_divergence(name, p_s, p_t, **opts), mask)


def np_cross_entropy(logits, labels, mask):
  p = np_softmax(logits)
  p_label = np.take_along_axis(p, np.asarray(labels)[..., None], axis=-1)[..., 0]
  return np_masked_mean(-np.log(p_label), mask)


# ----------------------------------------------------------------------------- helpers


def make_inputs(seed=0, scale=2.0):
  """Random f32 student/teacher logits, labels, and a float mask with zeros in both rows."""
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal((B, L, V))).astype(np.float32)
  t = (scale * rng.standard_normal((B, L, V))).astype(np.float32)
  labels = rng.integers(0, V, (B, L)).astype(np.int32)
  mask = (rng.random((B, L)) > 0.3).astype(np.float32)
  mask[0, 0] = mask[1, 3] = 0.0
  mask[0, 1] = mask[1, 0] = 1.0
  return s, t, labels, mask


@functools.cache
def _prepared(fn, jit, grad_argnums, frozen_kwargs):
  # Cached so that a (function, options) pair compiles once for the whole file, not per call.
  f = functools.partial(fn, **dict(frozen_kwargs))
  if grad_argnums is not None:
    f = jax.value_and_grad(f, argnums=grad_argnums)
  return jax.jit(f) if jit else f


def call(fn, *args, jit=False, **kwargs):
  """fn(*args, **kwargs), optionally under jax.jit; kwargs (temperature, beta...) stay static."""
  return _prepared(fn, jit, None, tuple(sorted(kwargs.items())))(*args)


def value_and_grad(fn, *args, argnums=0, jit=False, **kwargs):
  """(fn(*args, **kwargs), its gradient w.r.t. args[argnums]), optionally under jax.jit."""
  return _prepared(fn, jit, argnums, tuple(sorted(kwargs.items())))(*args)


def np_fd_grad(f, x, eps=1e-6):
  """Central finite differences of a float64 scalar function, entry by entry."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += eps
    down[i] -= eps
    grad[i] = (f(up) - f(down)) / (2 * eps)
  return grad


# ----------------------------------------------------------------------------- against the oracle


@parametrize_jit
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@parametrize_cases
def test_divergence_matches_numpy(name, opts, temperature, jit):
  # With T != 1 this is also the T^2 scaling check: the oracle is T^2 * div(softmax(x / T)).
  s, t, _, mask = make_inputs()
  got = call(getattr(losses, name), s, t, mask, jit=jit, temperature=temperature, **opts)
  assert got.dtype == jnp.float32 and got.shape == ()
  want = np_loss(name, s, t, mask, temperature, **opts)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@parametrize_jit
@pytest.mark.parametrize("mask_dtype", [np.float32, np.bool_])
def test_cross_entropy_matches_numpy(mask_dtype, jit):
  s, _, labels, mask = make_inputs()
  got = call(losses.cross_entropy, s, labels, mask.astype(mask_dtype), jit=jit)
  np.testing.assert_allclose(got, np_cross_entropy(s, labels, mask), rtol=RTOL, atol=ATOL)


@parametrize_cases
def test_bool_mask_equals_float_mask(name, opts):
  s, t, _, mask = make_inputs(seed=1)
  fn = getattr(losses, name)
  np.testing.assert_array_equal(fn(s, t, mask.astype(bool), **opts), fn(s, t, mask, **opts))


@parametrize_cases
def test_temperature_is_logit_division_times_t_squared(name, opts):
  s, t, _, mask = make_inputs(seed=2)
  fn, temperature = getattr(losses, name), 3.0
  scaled = fn(s, t, mask, temperature=temperature, **opts)
  unscaled = fn(s / temperature, t / temperature, mask, temperature=1.0, **opts)
  np.testing.assert_allclose(scaled, temperature**2 * unscaled, rtol=1e-6)


@parametrize_jit
def test_token_accuracy_and_top1_agreement(jit):
  s, t, labels, mask = make_inputs(seed=3)
  acc = call(losses.token_accuracy, s, labels, mask, jit=jit)
  agree = call(losses.top1_agreement, s, t, mask, jit=jit)
  np.testing.assert_allclose(acc, np_masked_mean(s.argmax(-1) == labels, mask), rtol=1e-7)
  np.testing.assert_allclose(agree, np_masked_mean(s.argmax(-1) == t.argmax(-1), mask),
                             rtol=1e-7)
  # Teacher agrees with itself everywhere; the oracle above would also pass a constant 0.
  np.testing.assert_allclose(losses.top1_agreement(t, t, mask), 1.0)


# ----------------------------------------------------------------------------- properties and limits


@parametrize_jit
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@parametrize_cases
def test_zero_for_identical_distributions(name, opts, temperature, jit):
  _, t, _, mask = make_inputs()
  got = call(getattr(losses, name), t, t, mask, jit=jit, temperature=temperature, **opts)
  assert abs(float(got)) <= 1e-6


@parametrize_cases
def test_nonnegative(name, opts):
  for seed in range(3):
    s, t, _, mask = make_inputs(seed, scale=4.0)
    assert float(getattr(losses, name)(s, t, mask, temperature=1.5, **opts)) >= 0.0


def test_jsd_end_points_are_forward_and_reverse_kl():
  s, t, _, mask = make_inputs()
  kw = dict(temperature=2.0)
  np.testing.assert_array_equal(losses.generalized_jsd(s, t, mask, beta=0.0, **kw),
                                losses.forward_kl(s, t, mask, **kw))
  np.testing.assert_array_equal(losses.generalized_jsd(s, t, mask, beta=1.0, **kw),
                                losses.reverse_kl(s, t, mask, **kw))


def test_skew_zero_is_plain_kl_and_skew_one_is_zero():
  s, t, _, mask = make_inputs()
  kw = dict(temperature=2.0)
  np.testing.assert_array_equal(losses.skew_kl(s, t, mask, skew=0.0, **kw),
                                losses.forward_kl(s, t, mask, **kw))
  np.testing.assert_array_equal(losses.skew_reverse_kl(s, t, mask, skew=0.0, **kw),
                                losses.reverse_kl(s, t, mask, **kw))
  assert float(losses.skew_kl(s, t, mask, skew=1.0, **kw)) == 0.0
  assert float(losses.skew_reverse_kl(s, t, mask, skew=1.0, **kw)) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_jsd_swap_symmetry(beta, temperature):
  # JSD_beta(s, t) = JSD_{1-beta}(t, s); at beta = 0.5 it is symmetric.
  s, t, _, mask = make_inputs()
  a = losses.generalized_jsd(s, t, mask, temperature=temperature, beta=beta)
  b = losses.generalized_jsd(t, s, mask, temperature=temperature, beta=1.0 - beta)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def _disjoint_logits(gap):
  """Student puts its mass on token 0, teacher on token 1, separated by `gap` nats of logit."""
  s = np.zeros((B, L, V), np.float32)
  t = np.zeros((B, L, V), np.float32)
  s[..., 0] = gap
  t[..., 1] = gap
  return s, t


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_bounded_by_log2(temperature):
  s, t, _, mask = make_inputs(scale=4.0)
  bound = temperature**2 * np.log(2.0)
  got = losses.generalized_jsd(s, t, mask, temperature=temperature, beta=0.5)
  assert 0.0 <= float(got) <= bound
  # Disjoint supports reach the bound (up to e^-(gap/T) of leftover overlap).
  s, t = _disjoint_logits(60.0)
  got = losses.generalized_jsd(s, t, mask, temperature=temperature, beta=0.5)
  np.testing.assert_allclose(got, bound, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tvd_in_zero_t_squared(temperature):
  s, t, _, mask = make_inputs(scale=4.0)
  got = losses.tvd(s, t, mask, temperature=temperature)
  assert 0.0 <= float(got) <= temperature**2
  s, t = _disjoint_logits(60.0)
  np.testing.assert_allclose(losses.tvd(s, t, mask, temperature=temperature),
                             temperature**2, rtol=1e-6)


# name: (family, the plain KL it tends to, options at eps, factor to divide the family by).
# JSD vanishes at its ends (JSD_beta ~ beta KL(p_t || p_s) as beta -> 0), so it is rescaled; the
# skews tend to the KL itself.
LIMITS = {
    "jsd_beta_to_0": (losses.generalized_jsd, losses.forward_kl, lambda e: dict(beta=e),
                      lambda o: o["beta"]),
    "jsd_beta_to_1": (losses.generalized_jsd, losses.reverse_kl, lambda e: dict(beta=1.0 - e),
                      lambda o: 1.0 - o["beta"]),  # 1 - beta as represented, not e
    "skew_kl_to_0": (losses.skew_kl, losses.forward_kl, lambda e: dict(skew=e), lambda o: 1.0),
    "skew_reverse_kl_to_0": (losses.skew_reverse_kl, losses.reverse_kl, lambda e: dict(skew=e),
                             lambda o: 1.0),
}


@pytest.mark.parametrize("limit", list(LIMITS))
def test_limits_in_float64(limit):
  # float64 (x64 scoped to this block) so that the O(eps) approach is not buried under rounding.
  family, kl, options, factor = LIMITS[limit]
  s, t, _, mask = make_inputs()
  with jax.enable_x64(True):
    s64, t64, mask64 = (jnp.asarray(x, jnp.float64) for x in (s, t, mask))
    target = kl(s64, t64, mask64, temperature=1.5)
    assert target.dtype == jnp.float64  # losses upcast to at least f32; f64 stays f64
    target = float(target)
    errors = []
    for eps in (1e-3, 1e-4, 1e-5):
      opts = options(eps)
      value = float(family(s64, t64, mask64, temperature=1.5, **opts)) / factor(opts)
      errors.append(abs(value - target))
  assert jnp.zeros(()).dtype == jnp.float32  # x64 did not leak out of the block.
  # First-order convergence: each 10x smaller eps gives a ~10x smaller error.
  for bigger, smaller in zip(errors, errors[1:]):
    assert 5.0 < bigger / smaller < 20.0, errors
  assert errors[-1] < 1e-3 * target, errors


# ----------------------------------------------------------------------------- masking


def _wild_at_masked(x, mask, rng, scale=1e4):
  x = x.copy()
  dead = mask == 0
  x[dead] = (scale * rng.standard_normal(x[dead].shape)).astype(x.dtype)
  return x


@parametrize_jit
@parametrize_core
def test_masked_tokens_do_not_matter(name, opts, jit):
  s, t, _, mask = make_inputs()
  rng = np.random.default_rng(7)
  s2, t2 = _wild_at_masked(s, mask, rng), _wild_at_masked(t, mask, rng)
  fn, kw = getattr(losses, name), dict(jit=jit, argnums=(0, 1), temperature=2.0, **opts)
  value, grads = value_and_grad(fn, s2, t2, mask, **kw)
  np.testing.assert_array_equal(value, value_and_grad(fn, s, t, mask, **kw)[0])
  for g in grads:
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g)[mask == 0] == 0.0)
    assert np.any(np.asarray(g)[mask != 0] != 0.0)


@parametrize_jit
def test_cross_entropy_masked_tokens_do_not_matter(jit):
  s, _, labels, mask = make_inputs()
  s2 = _wild_at_masked(s, mask, np.random.default_rng(7))
  labels2 = np.where(mask == 0, -100, labels)  # the usual padding label, out of range
  want = call(losses.cross_entropy, s, labels, mask, jit=jit)
  value, grad = value_and_grad(losses.cross_entropy, s2, labels2, mask, jit=jit)
  np.testing.assert_array_equal(value, want)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0.0)


@parametrize_jit
@parametrize_core
def test_all_zero_mask_gives_zero(name, opts, jit):
  s, t, labels, _ = make_inputs()
  zeros = np.zeros((B, L), np.float32)
  value, grads = value_and_grad(getattr(losses, name), s, t, zeros, jit=jit, argnums=(0, 1),
                                temperature=2.0, **opts)
  assert float(value) == 0.0 and all(np.all(np.asarray(g) == 0.0) for g in grads)
  assert float(call(losses.cross_entropy, s, labels, zeros, jit=jit)) == 0.0
  loss, metrics = losses.distillation_loss(s, t, labels, zeros, loss=name, **opts)
  assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0


def test_mask_shape_mismatch_raises():
  s, t, labels, mask = make_inputs()
  with pytest.raises(ValueError, match="mask shape"):
    losses.forward_kl(s, t, mask[:, :1].repeat(L, axis=1)[:, :-1])
  with pytest.raises(ValueError, match="differ in shape"):
    losses.forward_kl(s, t[..., :-1], mask)


# ----------------------------------------------------------------------------- gradients


@parametrize_jit
@parametrize_core
def test_divergence_grad_matches_numpy_finite_differences(name, opts, jit):
  s, t, _, mask = make_inputs(seed=4)
  temperature = 2.0
  _, (got, _) = value_and_grad(getattr(losses, name), s, t, mask, jit=jit, argnums=(0, 1),
                               temperature=temperature, **opts)
  t64 = t.astype(np.float64)
  want = np_fd_grad(lambda x: np_loss(name, x, t64, mask, temperature, **opts), s)
  # FD in float64 is good to ~1e-9; the f32 gradient to ~1e-7 of its O(0.1) entries.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@parametrize_jit
def test_cross_entropy_grad_matches_numpy_finite_differences(jit):
  s, _, labels, mask = make_inputs(seed=4)
  _, got = value_and_grad(losses.cross_entropy, s, labels, mask, jit=jit)
  want = np_fd_grad(lambda x: np_cross_entropy(x, labels, mask), s)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@parametrize_jit
def test_distillation_loss_grad_matches_numpy_finite_differences(jit):
  s, t, labels, mask = make_inputs(seed=5)
  kw = dict(loss="jsd", temperature=2.0, alpha=0.3, beta=0.7)

  def oracle(x):
    soft = np_loss("generalized_jsd", x, t, mask, 2.0, beta=0.7)
    return 0.3 * soft + 0.7 * np_cross_entropy(x, labels, mask)

  grad_fn = jax.grad(lambda x: losses.distillation_loss(x, t, labels, mask, **kw)[0])
  got = (jax.jit(grad_fn) if jit else grad_fn)(s)
  np.testing.assert_allclose(got, np_fd_grad(oracle, s), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- precision and -inf


@parametrize_cases
def test_bf16_logits_compute_in_float32(name, opts):
  s, t, labels, mask = make_inputs()
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  fn = functools.partial(getattr(losses, name), temperature=2.0, **opts)
  got = fn(s16, t16, mask)
  assert got.dtype == jnp.float32
  # Same (bf16-rounded) values given in f32: nothing is lost beyond the input rounding.
  want = fn(s16.astype(jnp.float32), t16.astype(jnp.float32), mask)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  ce = losses.cross_entropy(s16, labels, mask)
  assert ce.dtype == jnp.float32
  np.testing.assert_allclose(ce, losses.cross_entropy(s16.astype(jnp.float32), labels, mask),
                             rtol=1e-6)
  _, metrics = losses.distillation_loss(s16, t16, labels, mask, loss=name, **opts)
  assert all(v.dtype == jnp.float32 for v in metrics.values())


@parametrize_jit
@parametrize_core
def test_impossible_tokens_give_finite_values_and_grads(name, opts, jit):
  # Vocabulary entries at -inf (or -1e30) in the teacher only, or in both models (a padded or
  # masked-out vocabulary). Not reverse KL with the teacher alone: KL(p_s || p_t) is truly
  # infinite where p_t = 0 < p_s.
  places = ["both"] if name == "reverse_kl" else ["teacher", "both"]
  for fill, where in itertools.product([-np.inf, -1e30], places):
    s, t, _, mask = make_inputs(seed=6)
    t[..., -3:] = fill
    t[0, 2, 0] = fill
    if where == "both":
      s[..., -3:] = fill
      s[0, 2, 0] = fill
    value, grads = value_and_grad(getattr(losses, name), s, t, mask, jit=jit, argnums=(0, 1),
                                  temperature=2.0, **opts)
    want = np_loss(name, s, t, mask, 2.0, **opts)
    np.testing.assert_allclose(value, want, rtol=RTOL, atol=ATOL, err_msg=f"{fill} {where}")
    for g in grads:
      assert np.all(np.isfinite(g)), (fill, where, g)


@parametrize_jit
@pytest.mark.parametrize("fill", [-np.inf, -1e30], ids=["neg_inf", "neg_1e30"])
def test_cross_entropy_with_impossible_tokens(fill, jit):
  s, _, labels, mask = make_inputs()
  labels = labels % (V - 3)
  s[..., -3:] = fill
  got, grad = value_and_grad(losses.cross_entropy, s, labels, mask, jit=jit)
  np.testing.assert_allclose(got, np_cross_entropy(s, labels, mask), rtol=RTOL, atol=ATOL)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., -3:] == 0.0)


# ----------------------------------------------------------------------------- registry and total


def test_registry_names():
  assert set(losses.DIVERGENCES) == {"forward_kl", "reverse_kl", "generalized_jsd", "jsd",
                                     "skew_kl", "skew_reverse_kl", "tvd"}
  assert losses.DIVERGENCES["jsd"] is losses.generalized_jsd


def _hellinger_BxL(s_logp_BxLxV, t_logp_BxLxV, *, beta, skew):
  """Squared Hellinger distance 0.5 sum_v (sqrt p_t - sqrt p_s)^2: a divergence kdjax lacks."""
  del beta, skew
  root_gap_BxLxV = jnp.exp(0.5 * t_logp_BxLxV) - jnp.exp(0.5 * s_logp_BxLxV)
  return 0.5 * jnp.sum(jnp.square(root_gap_BxLxV), axis=-1)


def np_hellinger(s, t, mask, temperature):
  p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
  per_token = 0.5 * np.square(np.sqrt(p_t) - np.sqrt(p_s)).sum(axis=-1)
  return temperature**2 * np_masked_mean(per_token, mask)


def test_one_registry_line_adds_a_divergence_everywhere(monkeypatch):
  # The registry is the only dispatch: a new entry reaches every entry point by name.
  monkeypatch.setitem(losses.DIVERGENCES, "hellinger", losses.Divergence(_hellinger_BxL))
  s, t, labels, mask = make_inputs()
  want = np_hellinger(s, t, mask, 2.0)
  got = losses.soft_loss("hellinger", s, t, mask, temperature=2.0, beta=0.3, skew=0.2)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  total, metrics = losses.distillation_loss(s, t, labels, mask, loss="hellinger",
                                            temperature=2.0, alpha=0.3)
  np.testing.assert_allclose(metrics["soft_loss"], want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(total, 0.3 * want + 0.7 * np_cross_entropy(s, labels, mask),
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(losses.DIVERGENCES))
def test_every_divergence_is_float32_from_bf16_logits(name):
  s, t, _, _ = make_inputs()
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  per_token = losses.DIVERGENCES[name].per_token(s16, t16, temperature=2.0, beta=0.3, skew=0.2)
  assert per_token.dtype == jnp.float32 and per_token.shape == (B, L)


@pytest.mark.parametrize("name", sorted(losses.DIVERGENCES))
def test_soft_loss_dispatch_passes_options(name):
  s, t, _, mask = make_inputs()
  got = losses.soft_loss(name, s, t, mask, temperature=2.0, beta=0.3, skew=0.2)
  oracle_name = "generalized_jsd" if name == "jsd" else name
  want = np_loss(oracle_name, s, t, mask, 2.0, beta=0.3, skew=0.2)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@parametrize_jit
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss,opts", [("forward_kl", {}), ("jsd", {"beta": 0.2}),
                                       ("skew_reverse_kl", {"skew": 0.3}), ("tvd", {})])
def test_distillation_loss_matches_numpy(loss, opts, alpha, jit):
  s, t, labels, mask = make_inputs()
  total, metrics = call(losses.distillation_loss, s, t, labels, mask, jit=jit, loss=loss,
                        temperature=2.0, alpha=alpha, **opts)
  oracle_name = "generalized_jsd" if loss == "jsd" else loss
  soft = np_loss(oracle_name, s, t, mask, 2.0, **opts) if alpha > 0 else 0.0
  hard = np_cross_entropy(s, labels, mask)
  assert set(metrics) == {"loss", "soft_loss", "hard_loss", "num_tokens"}
  assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
  np.testing.assert_allclose(total, alpha * soft + (1 - alpha) * hard, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics["loss"], total, rtol=0)
  np.testing.assert_allclose(metrics["soft_loss"], soft, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics["hard_loss"], hard, rtol=RTOL, atol=ATOL)
  assert float(metrics["num_tokens"]) == mask.sum()


def test_distillation_loss_alpha_one_keeps_ce_out():
  # An out-of-range label on a real token makes the CE NaN; with alpha == 1 the loss stays clean.
  s, t, labels, mask = make_inputs()
  labels[0, 1] = V + 5
  total, metrics = losses.distillation_loss(s, t, labels, mask, alpha=1.0)
  assert np.isnan(float(metrics["hard_loss"]))
  np.testing.assert_array_equal(total, losses.forward_kl(s, t, mask))


def test_unknown_loss_name_raises():
  s, t, labels, mask = make_inputs()
  for alpha in (0.0, 0.5):
    with pytest.raises(ValueError, match="'bogus_kl'.*forward_kl"):
      losses.distillation_loss(s, t, labels, mask, loss="bogus_kl", alpha=alpha)
  with pytest.raises(ValueError, match="'bogus_kl'"):
    losses.soft_loss("bogus_kl", s, t, mask, temperature=1.0)
