"""The offline teacher cache (kdjax/teacher_cache/) and its estimators (estimators.py).

Oracles are independent: float64 numpy written from the formulas (per token, explicit sets and
sums), and the live loss itself (losses.forward_kl on the teacher's logits). Models are tiny
random Transformers; batches are random packed rows from a seeded stand-in for the data stream.
"""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import shakespeare as shakespeare_config
from kdjax import losses, optim, sharding, teacher_cache
from kdjax.model import ModelConfig, Transformer
from kdjax.settings import DistillSettings
from kdjax.state import create_train_state
from kdjax.teacher_cache import estimators
from support import scripts_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, V = 4, 8, 24
# f32 evaluation of O(1) log-ratios summed over at most V = 24 terms: relative error ~1e-6.
RTOL, ATOL = 1e-5, 1e-6
T_CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                    mlp_dim=32, max_len=16)
S_CFG = ModelConfig(vocab_size=V, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=16, max_len=16)
TOPK, SAMPLES = estimators.TOPK_IDS, estimators.SAMPLE_IDS

# Jitted once per shape: eager JAX would compile every primitive on its own, which costs more.
_targets = jax.jit(teacher_cache.compute_targets, static_argnames=("top_k", "samples"))
_live_and_grad = jax.jit(jax.value_and_grad(losses.forward_kl))


@functools.partial(jax.jit, static_argnames="names")
def _estimate(s_logits, cached, mask, temperature, names=tuple(estimators.ESTIMATORS)):
  """{estimator: (per-token values, soft loss, its gradient w.r.t. the student's logits)}."""
  out = {}
  for name in names:
    loss, grad = jax.value_and_grad(lambda s: estimators.soft_loss(
        name, s, cached, mask, temperature=temperature))(s_logits)
    out[name] = (estimators.ESTIMATORS[name](s_logits, cached, temperature), loss, grad)
  return out


# ---------------------------------------------------------------------------------- fixtures


def _batch(seed: int, index: int) -> dict[str, np.ndarray]:
  """A packed batch: each row two documents cut at a random point (as the pipeline lays out)."""
  rng = np.random.default_rng([seed, index])
  tokens = rng.integers(0, V, (B, L + 1)).astype(np.int32)
  cut = rng.integers(1, L, B)
  segment_ids = np.where(np.arange(L)[None] < cut[:, None], 1, 2).astype(np.int32)
  positions = np.where(segment_ids == 1, np.arange(L)[None],
                       np.arange(L)[None] - cut[:, None]).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
          "positions": positions, "mask": np.ones((B, L), np.float32)}


class _Stream:
  """Endless deterministic batches with get/set_state, like the training iterator."""

  def __init__(self, seed: int):
    self.seed, self.index = seed, 0

  def __next__(self):
    self.index += 1
    return _batch(self.seed, self.index)

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def _random_params(cfg: ModelConfig, seed: int):
  """Random params of the model's shapes, drawn in numpy: nothing to compile."""
  like = nn.meta.unbox(jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, L), jnp.int32)))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, np.float32) if path[-1].key == "scale"
                       else 0.3 * rng.standard_normal(x.shape).astype(np.float32)), like)


@pytest.fixture(scope="module")
def models():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  return mesh, sharding.DEFAULT_RULES, _random_params(T_CFG, 0), _random_params(S_CFG, 1)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, batch):
  return Transformer(cfg).apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                batch["positions"])


def _manifest(top_k, samples, steps, logprob_dtype="float32", shard_steps=2):
  return teacher_cache.new_manifest(top_k=top_k, samples=samples, vocab_size=V, seq_len=L,
                                    batch_size=B, steps=steps, data_seed=7, sample_seed=3,
                                    logprob_dtype=logprob_dtype, shard_steps=shard_steps)


_TARGET_FNS = {}  # (top_k, samples) -> targets_fn: one compile each for the whole file


def _targets_fn(models, top_k, samples):
  mesh, rules, t_params, _ = models
  if (top_k, samples) not in _TARGET_FNS:
    _TARGET_FNS[top_k, samples] = teacher_cache.make_targets_fn(
        T_CFG, t_params, mesh, rules, top_k=top_k, samples=samples, vocab_size=V, sample_seed=3)
  return _TARGET_FNS[top_k, samples]


def _build(path, models, *, top_k, samples=0, steps=5, logprob_dtype="float32", seed=7,
           shard_steps=2, targets_fn=None):
  targets_fn = targets_fn or _targets_fn(models, top_k, samples)
  return teacher_cache.build(str(path), _manifest(top_k, samples, steps, logprob_dtype,
                                                  shard_steps),
                             lambda: _Stream(seed), targets_fn)


# ---------------------------------------------------------------------------------- numpy oracles


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl(p, q):
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  keep = p > 0
  return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(q[keep]))))


def np_topk_renorm(s_logits, ids, t_logprobs, temperature):
  out = np.zeros(ids.shape[:2])
  for b, l in np.ndindex(out.shape):
    p = np.exp(np.asarray(t_logprobs[b, l], np.float64) / temperature)
    q = np.exp(np.asarray(s_logits[b, l], np.float64)[ids[b, l]] / temperature)
    out[b, l] = np_kl(p / p.sum(), q / q.sum())
  return out


def np_topk_residual(s_logits, ids, t_logprobs, t_residual, temperature):
  out = np.zeros(ids.shape[:2])
  for b, l in np.ndindex(out.shape):
    top = ids[b, l].tolist()
    tail = [v for v in range(s_logits.shape[-1]) if v not in set(top)]
    # The teacher's tail mass r spread like the student's own tail, then tempered.
    q1 = np.exp(np_log_softmax(s_logits[b, l]))
    spread = np.sum((q1[tail] / q1[tail].sum())**(1.0 / temperature))
    p = np.append(np.exp(np.asarray(t_logprobs[b, l], np.float64) / temperature),
                  np.exp(t_residual[b, l] / temperature) * spread)
    q = np.exp(np_log_softmax(np.asarray(s_logits[b, l]) / temperature))
    out[b, l] = np_kl(p / p.sum(), np.append(q[top], q[tail].sum()))
  return out


def np_sampled(s_logits, ids, counts, t_logprobs, temperature):
  out = np.zeros(ids.shape[:2])
  for b, l in np.ndindex(out.shape):
    used = counts[b, l] > 0
    pi = counts[b, l][used] / counts[b, l].sum()
    log_qt = np_log_softmax(np.asarray(s_logits[b, l]) / temperature)[ids[b, l][used]]
    out[b, l] = np.sum(pi * (np.asarray(t_logprobs[b, l][used], np.float64) - log_qt))
  return out


def _random_logits(seed, shape=(B, L, V), scale=3.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _mask(seed=5):
  mask = np.ones((B, L), np.float32)
  mask[np.random.default_rng(seed).random((B, L)) < 0.3] = 0.0
  return mask


# ---------------------------------------------------------------------------------- the targets


def _cached(t_logits, top_k, samples, rng=0, sample_temperature=1.0):
  # sample_temperature is traced, not static: one compile serves every temperature.
  return jax.device_get(_targets(jnp.asarray(t_logits), top_k=top_k, samples=samples,
                                 rng=jax.random.key(rng),
                                 sample_temperature=jnp.float32(sample_temperature)))


@pytest.mark.parametrize("top_k,samples", [(6, 10), (V, 8)])  # as below: compiled once
def test_targets_are_the_teachers_top_k_and_tail_mass(top_k, samples):
  t_logits = _random_logits(0)
  out = _cached(t_logits, top_k, samples)
  logp = np_log_softmax(t_logits)
  want_ids = np.argsort(-logp, axis=-1)[..., :top_k]
  np.testing.assert_array_equal(out[TOPK], want_ids)
  np.testing.assert_allclose(out[estimators.TOPK_LOGPROBS],
                             np.take_along_axis(logp, want_ids, -1), rtol=RTOL, atol=ATOL)
  tail = np.exp(logp).sum(-1) - np.take_along_axis(np.exp(logp), want_ids, -1).sum(-1)
  if top_k == V:
    assert np.all(np.isneginf(out[estimators.RESIDUAL]))
  else:
    np.testing.assert_allclose(out[estimators.RESIDUAL], np.log(tail), rtol=RTOL, atol=ATOL)


def test_samples_are_distinct_ids_with_counts_and_never_impossible_ids():
  t_logits = _random_logits(1)
  t_logits[..., ::3] = -1e30  # ids the teacher can never emit (a padded vocabulary does this)
  n = 4096
  out = _cached(t_logits, top_k=0, samples=n)
  ids, counts = out[SAMPLES], out[estimators.SAMPLE_COUNTS]
  np.testing.assert_array_equal(counts.sum(-1), n)
  logp = np_log_softmax(t_logits)
  for b, l in np.ndindex(B, L):
    used = counts[b, l] > 0
    assert len(set(ids[b, l][used].tolist())) == used.sum()  # distinct
    assert np.all(ids[b, l][used] % 3 != 0)
    np.testing.assert_allclose(out[estimators.SAMPLE_LOGPROBS][b, l][used],
                               logp[b, l][ids[b, l][used]], rtol=RTOL, atol=ATOL)
    assert np.all(ids[b, l][~used] == 0)
    assert np.all(out[estimators.SAMPLE_LOGPROBS][b, l][~used] == 0)


# ---------------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_estimators_match_numpy_oracles(temperature):
  s_logits, t_logits, mask = _random_logits(2), _random_logits(3), _mask()
  c = _cached(t_logits, top_k=6, samples=10, sample_temperature=temperature)
  want = {
      "topk_renorm": np_topk_renorm(s_logits, c[TOPK], c[estimators.TOPK_LOGPROBS],
                                    temperature),
      "topk_residual": np_topk_residual(s_logits, c[TOPK], c[estimators.TOPK_LOGPROBS],
                                        c[estimators.RESIDUAL], temperature),
      "sampled": np_sampled(s_logits, c[SAMPLES], c[estimators.SAMPLE_COUNTS],
                            c[estimators.SAMPLE_LOGPROBS], temperature),
  }
  got = _estimate(s_logits, c, mask, temperature)
  for name, per_token in want.items():
    np.testing.assert_allclose(got[name][0], per_token, rtol=RTOL, atol=ATOL, err_msg=name)
    mean = temperature**2 * np.sum(per_token * mask) / mask.sum()
    np.testing.assert_allclose(got[name][1], mean, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_residual_is_the_kl_to_the_teacher_completed_by_the_students_tail(temperature):
  # The teacher with its tail mass r spread like the student's tail, as full-vocabulary logits:
  # the live forward KL to it is what 'topk_residual' computes, in value and gradient.
  s_logits, t_logits, mask = _random_logits(17), _random_logits(18), _mask()
  c = _cached(t_logits, top_k=6, samples=10)
  in_top = np.zeros((B, L, V), bool)
  np.put_along_axis(in_top, c[TOPK], True, -1)
  logq = np_log_softmax(s_logits)
  tail_logq = np.where(in_top, -np.inf, logq)
  tail_logq -= np.log(np.exp(tail_logq).sum(-1, keepdims=True))  # the student's tail shape
  completed = np.where(in_top, np_log_softmax(t_logits),
                       c[estimators.RESIDUAL][..., None] + tail_logq).astype(np.float32)
  want, want_grad = _live_and_grad(s_logits, completed, mask, temperature=temperature)
  _, got, grad = _estimate(s_logits, c, mask, temperature)["topk_residual"]
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_of_the_whole_vocabulary_equals_the_live_loss_and_gradient(temperature):
  s_logits, t_logits, mask = _random_logits(4), _random_logits(5), _mask()
  # k = V leaves no id outside the top-k: the tail's log-sum-exp runs over nothing.
  c = _cached(t_logits, top_k=V, samples=8)
  want, want_grad = _live_and_grad(s_logits, t_logits, mask, temperature=temperature)
  got = _estimate(s_logits, c, mask, temperature)
  for name in ("topk_renorm", "topk_residual"):
    np.testing.assert_allclose(got[name][1], want, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(got[name][2], want_grad, rtol=RTOL, atol=ATOL, err_msg=name)
  for name, (_, _, grad) in got.items():  # every estimator: finite, and 0 on masked tokens
    grad = np.asarray(grad)
    assert np.all(grad[mask == 0] == 0) and np.all(np.isfinite(grad)), name


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_is_exact_when_counts_are_proportional_to_the_teacher(temperature):
  # A tempered teacher whose probabilities are c_v / N with integer c_v > 0 on all V ids: the
  # "draws" that hit every id exactly N p_T(v) times make the Monte Carlo estimate the exact KL.
  counts = np.random.default_rng(6).integers(1, 9, (B, L, V))
  t_logits = (temperature * np.log(counts)).astype(np.float32)  # softmax(t / T) = c / N
  s_logits, mask = _random_logits(7), _mask()
  cached = {SAMPLES: np.broadcast_to(np.arange(V, dtype=np.uint8), (B, L, V)),
            estimators.SAMPLE_COUNTS: counts.astype(np.uint8),
            estimators.SAMPLE_LOGPROBS: np_log_softmax(np.log(counts)).astype(np.float32)}
  want, want_grad = _live_and_grad(s_logits, t_logits, mask, temperature=temperature)
  _, got, grad = _estimate(s_logits, cached, mask, temperature, names=("sampled",))["sampled"]
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_is_unbiased_at_the_temperature_it_was_drawn_at(temperature):
  # Many draws from p_T: the token mean of the estimate lies within 5 standard errors of the
  # exact T^2 KL(p_T || q_T), the spread computed from the exact per-token variance.
  n = 4096
  s_logits, t_logits = _random_logits(8, scale=1.5), _random_logits(9, scale=1.5)
  c = _cached(t_logits, top_k=0, samples=n, rng=1, sample_temperature=temperature)
  got = float(_estimate(s_logits, c, np.ones((B, L), np.float32), temperature,
                        names=("sampled",))["sampled"][1])
  logp, logq = np_log_softmax(t_logits / temperature), np_log_softmax(s_logits / temperature)
  p = np.exp(logp)
  kl_tok = np.sum(p * (logp - logq), -1)
  var_tok = np.sum(p * (logp - logq)**2, -1) - kl_tok**2
  stderr = temperature**2 * np.sqrt(var_tok.sum() / n) / kl_tok.size
  assert abs(got - temperature**2 * kl_tok.mean()) < 5 * stderr, (got, kl_tok.mean(), stderr)


def test_distillation_loss_blends_like_the_live_one():
  s_logits, t_logits, mask = _random_logits(12), _random_logits(13), _mask()
  labels = jnp.asarray(np.random.default_rng(14).integers(0, V, (B, L)), jnp.int32)
  c = _cached(t_logits, top_k=V, samples=0)
  want, want_m = jax.jit(functools.partial(losses.distillation_loss, temperature=2.0,
                                            alpha=0.3))(s_logits, t_logits, labels, mask)
  got, got_m = jax.jit(functools.partial(estimators.distillation_loss,
                                         estimator="topk_residual", temperature=2.0,
                                         alpha=0.3))(s_logits, c, labels, mask)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert set(got_m) == set(want_m)
  with pytest.raises(ValueError, match="--estimator_samples"):
    estimators.soft_loss("sampled", s_logits, c, mask)


def test_gap_sums_vanish_when_the_cache_holds_every_id():
  s_logits, t_logits, mask = _random_logits(15), _random_logits(16), _mask()
  c = _cached(t_logits, top_k=V, samples=0)
  sums = jax.device_get(jax.jit(functools.partial(
      estimators.gap_sums, estimators=("topk_renorm", "topk_residual"),
      temperature=2.0))(s_logits, t_logits, c, mask))
  for name in ("topk_renorm", "topk_residual"):
    np.testing.assert_allclose(sums[name], sums["live"], rtol=RTOL)
    assert sums[name + "_abs"] / mask.sum() < ATOL
    np.testing.assert_allclose(sums[name + "_gl"] / np.sqrt(sums[name + "_gg"] * sums["live_gg"]),
                               1.0, rtol=RTOL)


# ---------------------------------------------------------------------------------- files


def test_cache_of_every_id_equals_the_live_teacher_loss(tmp_path, models):
  """Done when: a top-k cache with k = V, written and read back, gives the live loss."""
  mesh, rules, t_params, s_params = models
  _build(tmp_path / "kV", models, top_k=V, steps=5)
  cache = teacher_cache.TeacherCache(str(tmp_path / "kV"))

  @jax.jit
  def live_and_cached(batch, cached, temperature):
    s_logits, t_logits = _logits(S_CFG, s_params, batch), _logits(T_CFG, t_params, batch)
    args = (batch["targets"], batch["mask"])
    live, _ = losses.distillation_loss(s_logits, t_logits, *args, temperature=temperature,
                                       alpha=0.5)
    return live, [estimators.distillation_loss(s_logits, cached, *args, estimator=name,
                                               temperature=temperature, alpha=0.5)[0]
                  for name in ("topk_renorm", "topk_residual")]

  stream = _Stream(7)
  for step in range(1, 6):
    batch = next(stream)
    cached = cache.batch(step, tokens=batch)
    for temperature in (1.0, 2.0):
      want, got = live_and_cached(batch, cached, temperature)
      np.testing.assert_allclose(got, [want, want], rtol=RTOL, atol=ATOL, err_msg=step)


@pytest.mark.parametrize("logprob_dtype", ["float16", "float32"])
def test_records_read_back_exactly_through_grain(tmp_path, models, logprob_dtype):
  manifest = _build(tmp_path / "c", models, top_k=6, samples=10, steps=5,
                    logprob_dtype=logprob_dtype)
  assert manifest["num_shards"] == 3 and len(manifest["shards"]) == 3
  cache = teacher_cache.TeacherCache(str(tmp_path / "c"))
  # The per-token size is what the layout says: ids and counts uint8 (V = 24 and 10 samples fit
  # a byte), log-probs as asked, the tail mass float32, a 32-byte header per row.
  lp = {"float16": 2, "float32": 4}[logprob_dtype]
  header = (8 + 8 + 16) / L
  assert manifest["bytes_per_token"] == 6 * (1 + lp) + 4 + 10 * (1 + 1 + lp) + header
  assert teacher_cache.bytes_per_token(manifest, "topk_renorm") == 6 * (1 + lp) + header
  source = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(
      [str(tmp_path / "c" / s) for s in manifest["shards"]]))
  assert len(source) == 5 * B
  stream = _Stream(7)
  for step in range(1, 6):
    batch = next(stream)
    # What the teacher computed for this step (float32), against what was stored and read back.
    want = jax.device_get(_targets_fn(models, 6, 10)(batch, step))
    got = cache.batch(step, tokens=batch)
    assert set(got) == set(want)
    for key, value in want.items():
      stored = got[key].dtype
      assert stored == {"float16": np.float16, "float32": np.float32}[logprob_dtype] or (
          key in (TOPK, SAMPLES) and stored == np.uint8) or (
          key == estimators.SAMPLE_COUNTS and stored == np.uint8) or (
          key == estimators.RESIDUAL and stored == np.float32), (key, stored)
      np.testing.assert_array_equal(got[key], np.asarray(value, np.float32).astype(stored)
                                    if stored.kind == "f" else value.astype(stored), key)
    # Record (step - 1) * B + row in grain's order is row `row` of step `step`.
    for row in range(B):
      record = teacher_cache.decode_record(source[(step - 1) * B + row], manifest["layout"])
      assert (int(record["step"]), int(record["row"])) == (step, row)
    np.testing.assert_array_equal(cache.batch(step, tokens={k: v[1:3] for k, v in batch.items()},
                                              rows=range(1, 3))[TOPK], got[TOPK][1:3])


def test_a_misaligned_cache_is_refused(tmp_path, models):
  _build(tmp_path / "c", models, top_k=V, steps=4)
  cache = teacher_cache.TeacherCache(str(tmp_path / "c"))
  with pytest.raises(teacher_cache.CacheMismatch, match="step 3 row 0 was computed on other"):
    cache.batch(3, tokens=_batch(7, 2))  # the batch of step 2, read as step 3
  with pytest.raises(teacher_cache.CacheMismatch, match="seed"):
    cache.batch(1, tokens=_batch(8, 1))  # another data order
  with pytest.raises(teacher_cache.CacheMismatch, match="holds steps 1..4"):
    cache.batch(5)
  cache.batch(2, tokens=_batch(7, 2))  # the right one passes


def test_an_interrupted_build_resumes_to_the_same_files_and_nothing_is_overwritten(tmp_path,
                                                                                  models):
  full = _build(tmp_path / "full", models, top_k=6, samples=10, steps=5)
  real = _targets_fn(models, 6, 10)

  def dies_at_step_4(batch, step):
    if step == 4:
      raise KeyboardInterrupt
    return real(batch, step)

  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path / "resumed", models, top_k=6, samples=10, steps=5, targets_fn=dies_at_step_4)
  partial = tmp_path / "resumed.partial"
  assert not (tmp_path / "resumed").exists() and partial.exists()
  assert sorted(os.listdir(partial)) == ["cache-00000-of-00003.array_record",
                                         "cache-00000.state.json", "plan.json"]
  steps_seen = []
  resumed = _build(tmp_path / "resumed", models, top_k=6, samples=10, steps=5,
                   targets_fn=lambda b, s: steps_seen.append(s) or real(b, s))
  assert steps_seen == [3, 4, 5]
  assert resumed == full and not partial.exists()
  for shard in full["shards"]:
    assert (tmp_path / "full" / shard).read_bytes() == (tmp_path / "resumed" / shard).read_bytes()
  with pytest.raises(FileExistsError, match="never overwritten"):
    _build(tmp_path / "full", models, top_k=6, samples=10, steps=5)
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path / "other", models, top_k=6, samples=10, steps=5, targets_fn=dies_at_step_4)
  with pytest.raises(teacher_cache.CacheMismatch, match="other settings"):
    _build(tmp_path / "other", models, top_k=V, steps=5)


def test_check_config_names_what_does_not_fit(tmp_path):
  config = shakespeare_config.get_config("smoke")
  workdir = str(tmp_path / "run")
  manifest = teacher_cache.plan(config, workdir, top_k=2, steps=int(config.student_train.steps))
  assert manifest["data_seed"] == config.seed + 1 and manifest["vocab_size"] == 512
  b, l = config.data.batch_size, config.data.seq_len
  zeros = {k: np.zeros((b, l), np.int32) for k in ("inputs", "targets", "segment_ids")}
  targets = {TOPK: np.zeros((b, l, 2), np.int32),
             estimators.TOPK_LOGPROBS: np.zeros((b, l, 2), np.float32),
             estimators.RESIDUAL: np.zeros((b, l), np.float32)}
  writer = teacher_cache.CacheWriter(str(tmp_path / "c"), manifest)
  for step in range(1, manifest["steps"] + 1):
    writer.add(step, zeros, targets, data_state={})
  writer.finish()
  cache = teacher_cache.TeacherCache(str(tmp_path / "c"))
  cache.check_config(config, workdir)
  config.seed = 5
  config.student_train.steps += 1
  with pytest.raises(teacher_cache.CacheMismatch, match="data_seed: cache 1, config 6.*steps"):
    cache.check_config(config, workdir)
  config.seed = 0
  config.student_train.steps -= 1
  config.teacher_checkpoint = str(tmp_path / "another_teacher")
  with pytest.raises(teacher_cache.CacheMismatch, match="teacher"):
    cache.check_config(config, workdir)
  config.teacher_checkpoint = ""
  with pytest.raises(teacher_cache.CacheMismatch, match="'sampled' needs t_sample_ids"):
    cache.check_config(config, workdir, estimator="sampled")
  cache.check_config(config, workdir, estimator="topk_residual")


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_cli_refuses_a_workdir_without_a_teacher(tmp_path):
  out = subprocess.run(
      [sys.executable, "scripts/cache_teacher.py", "--config=configs/shakespeare.py:smoke",
       f"--workdir={tmp_path}", "--top_k=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=scripts_loader.subprocess_env(JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-2000:]
  assert "cache_teacher: error: config.mode: no readable teacher checkpoint" in out.stderr
  assert not (tmp_path / "teacher_cache").exists()


def test_cached_batches_resume_where_they_left_off(tmp_path, models):
  _build(tmp_path / "c", models, top_k=V, steps=5)
  cache = teacher_cache.TeacherCache(str(tmp_path / "c"))
  uninterrupted = teacher_cache.CachedBatches(_Stream(7), cache)
  first = [next(uninterrupted) for _ in range(5)]
  stopped = teacher_cache.CachedBatches(_Stream(7), cache)
  for _ in range(2):
    next(stopped)
  state = json.loads(json.dumps(stopped.get_state()))  # as a checkpoint stores it
  resumed = teacher_cache.CachedBatches(_Stream(7), cache)
  resumed.set_state(state)
  for want in first[2:]:
    got = next(resumed)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  assert set(first[0]) == {"inputs", "targets", "segment_ids", "positions", "mask", TOPK,
                           estimators.TOPK_LOGPROBS, estimators.RESIDUAL}
  with pytest.raises(teacher_cache.CacheMismatch, match="without a teacher cache"):
    resumed.set_state({"index": 2})


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_training_from_a_cache_of_every_id_equals_training_with_the_live_teacher(tmp_path,
                                                                                 models):
  """The distilled phase's step reading a k = V cache (no teacher in the step) takes the same
  updates as the step that runs the live teacher, at a temperature other than 1."""
  from kdjax import train  # the step and its optimizer; nothing else in this file needs them
  mesh, rules, t_params, _ = models
  _build(tmp_path / "kV", models, top_k=V, steps=3)
  cache = teacher_cache.TeacherCache(str(tmp_path / "kV"))
  tc = ml_collections.ConfigDict(dict(steps=3, learning_rate=1e-2, warmup_steps=0,
                                      end_lr_fraction=1.0, weight_decay=0.0, grad_clip=1.0,
                                      b1=0.9, b2=0.95, grad_accum_steps=1))
  tx, schedule = optim.make_optimizer(tc), optim.make_schedule(tc)
  live = DistillSettings(loss="forward_kl", temperature=2.0, alpha=0.5)
  cached = DistillSettings(loss="forward_kl", temperature=2.0, alpha=0.5,
                                 cache_estimator="topk_residual", cache_vocab_size=V)
  runs = {}
  for name, settings, t_cfg, stream in (
      ("live", live, T_CFG, _Stream(7)),
      ("cached", cached, None, teacher_cache.CachedBatches(_Stream(7), cache))):
    state, _ = create_train_state(S_CFG, tx, 0, mesh, rules)
    step = jax.jit(train.make_train_step(S_CFG, tx, schedule, t_cfg=t_cfg, distill=settings))
    losses_seen = []
    for _ in range(3):
      state, metrics = step(state, t_params if t_cfg else None, next(stream))
      losses_seen.append(float(metrics["loss"]))
    runs[name] = (state.params, losses_seen)
  np.testing.assert_allclose(runs["cached"][1], runs["live"][1], rtol=RTOL)
  for want, got in zip(jax.tree.leaves(runs["live"][0]), jax.tree.leaves(runs["cached"][0])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
