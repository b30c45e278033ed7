"""On-policy distillation (kdjax/gkd.py) inside the compiled step.

Oracles: the ordinary distillation step (what an off-policy batch must be, bit for bit), and a
hand-built GKD step: the student's samples from sample.generate with the step's own key, the
batch laid out in numpy, the generalized JSD from losses.generalized_jsd and its gradient from
jax.grad.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdjax import gkd, losses, optim, preflight, sample, sharding, train
from kdjax.model import ModelConfig, Transformer
from kdjax.settings import DistillSettings
from kdjax.state import create_train_state, init_params

V, B, L = 32, 4, 12
T_CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    mlp_dim=32, max_len=16)
S_CFG = dataclasses.replace(T_CFG, d_model=8, num_layers=1)
BETA, TEMPERATURE, P, N = 0.3, 2.0, 4, 6
TC = ml_collections.ConfigDict(dict(steps=10, learning_rate=1e-2, warmup_steps=0,
                                    end_lr_fraction=1.0, weight_decay=0.0, grad_clip=1.0,
                                    b1=0.9, b2=0.95, grad_accum_steps=1))
# The off-policy loss differs from the on-policy one on purpose: a branch mix-up shows.
DISTILL = DistillSettings(loss="forward_kl", temperature=TEMPERATURE, alpha=0.5, beta=BETA)


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, V, (B, L + 1)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[1, 6:] = 2
  pos = np.where(seg == 2, np.arange(L) - 6, np.arange(L)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
          "positions": pos, "mask": np.ones((B, L), np.float32)}


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  t_params = init_params(T_CFG, jax.random.key(7), mesh, sharding.DEFAULT_RULES)
  tx, schedule = optim.make_optimizer(TC), optim.make_schedule(TC)
  return mesh, t_params, tx, schedule


_STEPS = {}  # (distill, accum) -> the jitted step: each compiled once for the whole file


def _step(setup, distill, accum=1):
  if (distill, accum) not in _STEPS:
    _, _, tx, schedule = setup
    _STEPS[distill, accum] = jax.jit(train.make_train_step(
        S_CFG, tx, schedule, t_cfg=T_CFG, distill=distill, grad_accum_steps=accum))
  return _STEPS[distill, accum]


def _run(setup, distill, steps, accum=1):
  """(states after each step, metrics of each step) from the same initial state."""
  mesh, t_params, tx, _ = setup
  state, _ = create_train_state(S_CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  step = _step(setup, distill, accum)
  states, metrics = [], []
  for i in range(steps):
    states.append(state)
    state, m = step(state, t_params, _batch(i))
    metrics.append(jax.device_get(m))
  return states + [state], metrics


def _on_policy(fraction, new_tokens=N):
  return dataclasses.replace(DISTILL, on_policy=gkd.OnPolicy(fraction, prompt_tokens=P,
                                                             new_tokens=new_tokens))


def _close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_lambda_zero_equals_ordinary_distillation(setup):
  """Done when: GKD with lambda = 0 is ordinary distillation. The mixed step is compiled with
  its lax.cond and both branches; a coin that never lands on-policy must leave exactly the
  ordinary step."""
  plain_states, plain_metrics = _run(setup, DISTILL, 3)
  mixed_states, mixed_metrics = _run(setup, _on_policy(0.0), 3)
  for want, got in zip(plain_states, mixed_states):
    _close(want.params, got.params, rtol=1e-6, atol=1e-7)
    _close(want.opt_state, got.opt_state, rtol=1e-6, atol=1e-7)
  for want, got in zip(plain_metrics, mixed_metrics):
    assert got["on_policy"] == 0.0
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  # And the config's lambda = 0 compiles no on-policy branch at all.
  settings = DistillSettings.from_config(ml_collections.ConfigDict(dict(
      loss="forward_kl", temperature=1.0, alpha=0.5, on_policy_fraction=0.0)))
  assert settings.on_policy is None


def _oracle_batch(state, batch, sample_key, new_tokens):
  """The on-policy batch by hand: the student's samples (sample.generate with the step's key)
  laid out in numpy as the module doc says (these prompts lie within one document)."""
  b = batch["inputs"].shape[0]
  assert np.all(batch["segment_ids"][:, :P] == batch["segment_ids"][:, :1])
  prompt = np.asarray(batch["inputs"][:, :P])
  tokens = np.asarray(sample.generate(S_CFG, state.params, prompt, max_new_tokens=new_tokens,
                                      temperature=1.0, rng=sample_key,
                                      prompt_lengths_B=np.full(b, P)))
  assert tokens.shape == (b, P + new_tokens)
  np.testing.assert_array_equal(tokens[:, :P], prompt)
  t = P + new_tokens
  seq = np.zeros((b, L + 1), np.int32)
  seq[:, :t] = tokens
  real = np.arange(L) < t - 1
  mask = np.tile(real & (np.arange(L) >= P - 1), (b, 1)).astype(np.float32)
  assert mask.sum() == b * new_tokens
  return (seq[:, :-1], np.tile(real, (b, 1)).astype(np.int32),
          np.tile(np.arange(L), (b, 1)).astype(np.int32), mask)


@jax.jit
def _jsd_and_grad(params, t_params, inputs, seg, pos, mask):
  logits = lambda cfg, p: Transformer(cfg).apply({"params": p}, inputs, seg, pos)
  t_logits = logits(T_CFG, t_params)
  return jax.value_and_grad(lambda p: losses.generalized_jsd(
      logits(S_CFG, p), t_logits, mask, temperature=TEMPERATURE, beta=BETA))(params)


def _oracle_step(setup, state, batch, new_tokens, accum=1):
  """One GKD update by hand: (loss, grad norm, params after) when every micro-batch (rows
  j, j + A, ...) is on-policy; each has as many scored tokens, so their mean is the update."""
  _, t_params, tx, _ = setup
  # One coin per step, samples per micro-batch: (coin, samples) = split(sibling of next key).
  _, sample_key = jax.random.split(jax.random.split(jax.random.wrap_key_data(state.rng))[1])
  parts = []
  for j in range(accum):
    micro = {k: v[j::accum] for k, v in batch.items()}
    micro_key = sample_key if accum == 1 else jax.random.fold_in(sample_key, j)
    parts.append(_jsd_and_grad(state.params, t_params,
                               *_oracle_batch(state, micro, micro_key, new_tokens)))
  loss = np.mean([l for l, _ in parts])
  grads = jax.tree.map(lambda *g: sum(g) / accum, *[g for _, g in parts])
  return (loss, *_apply_update(tx, grads, state.opt_state, state.params, state.step))


@functools.partial(jax.jit, static_argnums=0)  # one compile, not one per eager operation
def _apply_update(tx, grads, opt_state, params, step):
  updates, _ = tx.update(grads, opt_state, params, step=step)
  return optax.global_norm(grads), optax.apply_updates(params, updates)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_lambda_one_is_the_generalized_jsd_on_the_students_own_samples(setup):
  new_tokens = 0  # the samples fill the row: N = L + 1 - P (the test below has N < that)
  states, metrics = _run(setup, _on_policy(1.0, new_tokens), 2)
  n = new_tokens or L + 1 - P
  for i, m in enumerate(metrics):
    assert m["on_policy"] == 1.0 and m["num_tokens"] == B * n
    loss, grad_norm, params = _oracle_step(setup, states[i], _batch(i), n)
    np.testing.assert_allclose(m["loss"], loss, rtol=2e-5)
    np.testing.assert_allclose(m["soft_loss"], loss, rtol=2e-5)
    np.testing.assert_allclose(m["grad_norm"], grad_norm, rtol=2e-4)
    _close(states[i + 1].params, params, rtol=2e-4, atol=2e-6)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_gradient_accumulation_keeps_lambda_one_coin_per_step(setup):
  """Each step is exactly the ordinary step or exactly the on-policy one, as its coin says. With
  A micro-batches a step is on-policy as a whole (one coin), so accumulation cannot change
  lambda; each micro-batch draws its own samples (key folded with its index), and the
  update is the micro-batches' token-weighted mean: the hand-built GKD step on on-policy steps,
  the ordinary accumulated step on the others."""
  states, metrics = _run(setup, _on_policy(0.5), 4, accum=2)
  kinds = [float(m["on_policy"]) for m in metrics]
  assert set(kinds) == {0.0, 1.0}, kinds
  plain = _step(setup, DISTILL, accum=2)
  for i, m in enumerate(metrics):
    if kinds[i]:
      assert m["num_tokens"] == B * N
      loss, grad_norm, params = _oracle_step(setup, states[i], _batch(i), N, accum=2)
      np.testing.assert_allclose(m["grad_norm"], grad_norm, rtol=2e-4)
      _close(states[i + 1].params, params, rtol=2e-4, atol=2e-6)
    else:
      loss = plain(states[i], setup[1], _batch(i))[1]["loss"]
    np.testing.assert_allclose(m["loss"], loss, rtol=2e-5, err_msg=f"step {i}")
  # And the coin lands on-policy with probability lambda.
  keys = jax.random.split(jax.random.key(0), 20_000)
  for fraction in (0.1, 0.5):
    share = float(jnp.mean(jax.vmap(lambda k: gkd.coin(k, fraction))(keys)))
    assert abs(share - fraction) < 0.015  # > 4 binomial standard deviations


_layout = jax.jit(gkd.student_batch, static_argnums=(0, 4))


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_student_batch_layout():
  """Prompts are cut to the document of their last token; samples are real tokenizer ids; the
  loss stops after the first sampled EOS."""
  batch = {k: jnp.asarray(v) for k, v in _batch(3).items()}  # row 1: a document starts at 6
  big = dataclasses.replace(S_CFG, vocab_size=V + 16)  # padding rows past the shared V ids
  params = jax.jit(Transformer(big).init)(jax.random.key(0), batch["inputs"])["params"]
  p, n, key = 8, 3, jax.random.key(1)
  out = _layout(big, params, batch, key, gkd.OnPolicy(1.0, prompt_tokens=p, new_tokens=n,
                                                      vocab_size=V))
  assert {k: v.shape for k, v in out.items()} == {k: (B, L) for k in batch}
  out = {k: np.asarray(v) for k, v in out.items()}
  t = p + n
  np.testing.assert_array_equal(out["inputs"][:, :p], np.asarray(batch["inputs"])[:, :p])
  np.testing.assert_array_equal(out["inputs"][:, 1:t], out["targets"][:, :t - 1])
  assert out["inputs"].max() < V  # never a padding row of the student's vocabulary
  lengths = np.array([p, 2, p, p])  # row 1's prompt keeps only the document starting at 6
  for r in range(B):
    start = p - lengths[r]
    np.testing.assert_array_equal(out["segment_ids"][r], (np.arange(L) >= start)
                                  & (np.arange(L) < t - 1))
    assert out["positions"][r, start] == 0 and out["positions"][r, t - 2] == t - 2 - start
    np.testing.assert_array_equal(out["mask"][r], (np.arange(L) >= p - 1) & (np.arange(L) < t - 1))
  # An EOS sampled at row 0's second new token: row 0 scores up to it, nothing after.
  eos = int(out["targets"][0, p])
  with_eos = {k: np.asarray(v) for k, v in _layout(
      big, params, batch, key, gkd.OnPolicy(1.0, prompt_tokens=p, new_tokens=n, vocab_size=V,
                                            eos_id=eos)).items()}
  np.testing.assert_array_equal(with_eos["inputs"], out["inputs"])  # EOS does not change samples
  first = p - 1 + int(np.argmax(out["targets"][0, p - 1:t - 1] == eos))
  np.testing.assert_array_equal(with_eos["mask"][0], (np.arange(L) >= p - 1)
                                & (np.arange(L) <= first))
  with pytest.raises(ValueError, match="do not fit"):
    gkd.OnPolicy(1.0, prompt_tokens=P, new_tokens=L).lengths(L)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_a_student_with_padding_rows_samples_only_ids_the_teacher_scores(setup):
  """Student vocab V + 16, teacher V: the on-policy step stays finite (an id past the teacher's
  vocabulary would make its logits NaN and the step would be skipped)."""
  mesh, t_params, tx, schedule = setup
  big = dataclasses.replace(S_CFG, vocab_size=V + 16)
  state, _ = create_train_state(big, tx, 0, mesh, sharding.DEFAULT_RULES)
  step = jax.jit(train.make_train_step(big, tx, schedule, t_cfg=T_CFG, distill=_on_policy(1.0)))
  for i in range(2):
    state, m = step(state, t_params, _batch(i))
    assert m["on_policy"] == 1.0 and np.isfinite(m["loss"]) and m["skipped_steps"] == 0


# ------------------------------------------ config checks of on-policy, cache and sequence fields


@pytest.mark.parametrize("override, field", [
    (dict(on_policy_fraction=1.5), "distill.on_policy_fraction"),
    (dict(on_policy_fraction=0.5, on_policy_prompt_tokens=0), "distill.on_policy_prompt_tokens"),
    (dict(on_policy_fraction=0.5, on_policy_prompt_tokens=60, on_policy_new_tokens=6),
     "distill.on_policy_new_tokens"),  # smoke rows: 64 tokens
    (dict(on_policy_fraction=0.5, on_policy_temperature=0.0), "distill.on_policy_temperature"),
    (dict(teacher_cache="c", cache_estimator="topk"), "distill.cache_estimator"),
    (dict(teacher_cache="c", loss="reverse_kl"), "distill.teacher_cache"),
    (dict(teacher_cache="c", loss_chunk_size=16), "distill.teacher_cache"),
    (dict(teacher_cache="c", feature_weight=1.0), "distill.teacher_cache"),
    (dict(teacher_cache="c", on_policy_fraction=0.5), "distill.teacher_cache"),
    (dict(teacher_cache="c", sequence_data="s"), "distill.teacher_cache"),
    (dict(teacher_cache="c", cache_estimator="sampled",
          temperature_schedule=dict(kind="linear", end=1.0)), "distill.temperature_schedule"),
])
def test_config_check_names_the_bad_field(override, field):
  from configs import shakespeare
  from kdjax import config_check
  config = shakespeare.get_config("smoke")
  config.distill.update(dict(on_policy_fraction=0.5, on_policy_prompt_tokens=60,
                             on_policy_new_tokens=5))  # P + N = L + 1 fits
  config_check.check_config(config, 1)
  config.distill.update(dict(on_policy_fraction=0.0, teacher_cache="c"))
  config_check.check_config(config, 1)  # a cache with the default estimator and loss
  config.distill.update(dict(teacher_cache=""))
  config.distill.update({k: v for k, v in override.items() if k != "temperature_schedule"})
  if "temperature_schedule" in override:
    config.distill.temperature_schedule.update(override["temperature_schedule"])
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check_config(config, 1)
  message = str(e.value)
  assert message.startswith(f"config.{field}:") and "\n" not in message


def test_missing_cache_or_sequence_data_is_refused_before_any_work(tmp_path):
  from configs import shakespeare
  from kdjax import config_check, preflight
  for field in ("teacher_cache", "sequence_data"):
    config = shakespeare.get_config("smoke")
    config.teacher_checkpoint = str(tmp_path / "nowhere")
    config.distill[field] = str(tmp_path / "missing")
    with pytest.raises(config_check.ConfigError) as e:
      preflight.check_teacher_sources(config, str(tmp_path / "w"), ("distilled",))
    assert str(e.value).startswith(f"config.distill.{field}:") and "\n" not in str(e.value)
    preflight.check_teacher_sources(config, str(tmp_path / "w"), ("scratch",))  # not read
  assert not os.path.exists(tmp_path / "w")


def test_teacher_text_of_another_teacher_is_refused(tmp_path):
  from configs import shakespeare
  from kdjax import config_check, preflight, teacher_cache
  from kdjax.data import teacher_text
  config = shakespeare.get_config("smoke")
  config.teacher_checkpoint = str(tmp_path / "teacher")
  mine = teacher_cache.teacher_fingerprint(config, str(tmp_path / "w"))
  for name, fingerprint in (("ours", mine), ("theirs", dict(mine, hash="another teacher"))):
    teacher_text.write_dataset(str(tmp_path / name), {"train": ["a b", "c"]},
                               metadata={"teacher": fingerprint})
  config.distill.sequence_data = str(tmp_path / "ours")
  preflight.check_teacher_sources(config, str(tmp_path / "w"), ("distilled",))
  config.distill.sequence_data = str(tmp_path / "theirs")
  with pytest.raises(config_check.ConfigError, match="^config.distill.sequence_data: .*another "
                     "teacher"):
    preflight.check_teacher_sources(config, str(tmp_path / "w"), ("distilled",))


def test_runs_saved_before_these_fields_still_resume():
  from configs import shakespeare
  from kdjax import config_check
  current = json.loads(shakespeare.get_config("smoke").to_json())
  saved = json.loads(shakespeare.get_config("smoke").to_json())
  for key in ("teacher_cache", "cache_estimator", "on_policy_fraction", "on_policy_prompt_tokens",
              "on_policy_new_tokens", "on_policy_temperature", "sequence_data"):
    del saved["distill"][key]
  preflight.check_resume(saved, current, "distilled", "w/distilled")
  current["distill"]["on_policy_fraction"] = 0.5
  with pytest.raises(config_check.ConfigError, match="distill.on_policy_fraction: 0.0 -> 0.5"):
    preflight.check_resume(saved, current, "distilled", "w/distilled")
