"""The distillation step: teacher is a constant, the step compiles once, accumulation is exact."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdjax import losses, objectives, optim, sharding, train
from kdjax.model import ModelConfig, Transformer
from kdjax.settings import DistillSettings
from kdjax.state import create_train_state, init_params, param_shardings

T_CFG = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=16)
S_CFG = dataclasses.replace(T_CFG, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            mlp_dim=32)
DISTILL = DistillSettings(loss="forward_kl", temperature=2.0, alpha=0.5)


def _train_cfg(**kw):
  d = dict(steps=50, learning_rate=1e-2, warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.0,
           grad_clip=1.0, b1=0.9, b2=0.95, grad_accum_steps=1)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def _batch(seed=0, b=4, l=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, T_CFG.vocab_size, size=(b, l + 1))
  segment_ids = np.ones((b, l), np.int32)
  segment_ids[1, 7:] = 2  # a second packed document in row 1
  segment_ids[2, 9:] = 0  # padding at the end of row 2
  positions = np.where(segment_ids == 2, np.arange(l) - 7, np.arange(l)).astype(np.int32)
  positions[segment_ids == 0] = 0
  mask = (segment_ids != 0).astype(np.float32)
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "segment_ids": segment_ids.astype(np.int32), "positions": positions, "mask": mask}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


@pytest.fixture(scope="module")
def teacher_params(mesh):
  return init_params(T_CFG, jax.random.key(7), mesh, sharding.DEFAULT_RULES)


def _setup(mesh, tc, teacher=True, accum=1, distill=DISTILL):
  tx, schedule = optim.make_optimizer(tc), optim.make_schedule(tc)
  state, shardings = create_train_state(S_CFG, tx, 0, mesh, sharding.DEFAULT_RULES)
  step = train.make_train_step(S_CFG, tx, schedule, t_cfg=T_CFG if teacher else None,
                               distill=distill if teacher else None, grad_accum_steps=accum)
  return state, shardings, step


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_teacher_gradient_is_exactly_zero(teacher_params, mesh):
  state, _, step = _setup(mesh, _train_cfg())
  batch = _batch()
  # Through the whole step (teacher forward, loss, optimizer update): nothing reaches the teacher.
  t_grads = jax.jit(jax.grad(lambda tp: step(state, tp, batch)[1]["loss"]))(teacher_params)
  leaves = jax.tree.leaves(t_grads)
  assert leaves and all(np.all(np.asarray(g) == 0) for g in leaves)
  # ...while the same loss does depend on the student's params.
  objective = objectives.make(S_CFG, DISTILL, T_CFG)
  t_logits = objectives.make_teacher_forward(T_CFG, objective.teacher_needs)(teacher_params, batch)
  s_grads = jax.jit(jax.grad(lambda p: objective.loss(p, None, batch, t_logits, 0)[0]))(
      state.params)
  assert float(jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.abs(g)), s_grads, 0.0)) > 0


def test_teacher_params_unchanged_and_step_compiles_once(teacher_params, mesh):
  state, shardings, step = _setup(mesh, _train_cfg())
  t_shardings = param_shardings(T_CFG, mesh, sharding.DEFAULT_RULES)
  step_fn = train.jit_train_step(step, shardings, t_shardings, mesh)
  before = jax.tree.map(lambda x: np.array(x, copy=True), teacher_params)
  for i in range(3):
    state, metrics = step_fn(state, teacher_params, _batch(i))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               teacher_params, before)  # still alive (not donated) and bit-identical
  assert step_fn.jitted._cache_size() == 1
  assert int(state.step) == 3
  # The optimizer holds the student's params only (Adam: mu and nu, one of each per param).
  n_student = len(jax.tree.leaves(state.params))
  assert len([x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]) == 2 * n_student


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_loss_falls_on_a_fixed_batch(teacher_params, mesh):
  state, shardings, step = _setup(mesh, _train_cfg())
  step_fn = jax.jit(step)
  batch = _batch()
  first = None
  for _ in range(40):
    state, metrics = step_fn(state, teacher_params, batch)
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < 0.5 * first


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_metrics_match_the_losses_module(teacher_params, mesh):
  state, _, step = _setup(mesh, _train_cfg())
  batch = _batch(3)
  _, metrics = step(state, teacher_params, batch)
  s_logits = Transformer(S_CFG).apply({"params": state.params}, batch["inputs"],
                                      batch["segment_ids"], batch["positions"])
  t_logits = Transformer(T_CFG).apply({"params": teacher_params}, batch["inputs"],
                                      batch["segment_ids"], batch["positions"])
  soft = losses.forward_kl(s_logits, t_logits, batch["mask"], temperature=2.0)
  ce = losses.cross_entropy(s_logits, batch["targets"], batch["mask"])
  np.testing.assert_allclose(metrics["loss"], 0.5 * soft + 0.5 * ce, rtol=1e-5)
  assert float(metrics["num_tokens"]) == batch["mask"].sum()


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
@pytest.mark.parametrize("teacher", [True, False])
def test_gradient_accumulation_equals_full_batch(teacher_params, mesh, teacher):
  # Rows hold different numbers of real tokens, so a plain mean of micro-batch means would differ.
  batch = _batch(5)
  s1, _, step1 = _setup(mesh, _train_cfg(), teacher=teacher, accum=1)
  s2, _, step2 = _setup(mesh, _train_cfg(), teacher=teacher, accum=2)
  n1, m1 = jax.jit(step1)(s1, teacher_params, batch)
  n2, m2 = jax.jit(step2)(s2, teacher_params, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               n1.params, n2.params)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_jit_equals_eager(teacher_params, mesh):
  state, _, step = _setup(mesh, _train_cfg())
  batch = _batch(2)
  a, ma = step(state, teacher_params, batch)
  b, mb = jax.jit(step)(state, teacher_params, batch)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               a.params, b.params)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_alpha_zero_equals_plain_cross_entropy(teacher_params, mesh):
  batch = _batch(4)
  ce_only = dataclasses.replace(DISTILL, alpha=0.0)
  s1, _, step1 = _setup(mesh, _train_cfg(), teacher=True, distill=ce_only)
  s2, _, step2 = _setup(mesh, _train_cfg(), teacher=False)
  n1, m1 = step1(s1, teacher_params, batch)
  n2, m2 = step2(s2, None, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8),
               n1.params, n2.params)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
@pytest.mark.parametrize("tied, softcap", [(True, 0.0), (False, 0.0), (False, 20.0)])
def test_chunked_loss_step_equals_plain_step(mesh, tied, softcap):
  """config.distill.loss_chunk_size > 0: the step's loss, metrics and update are unchanged."""
  s_cfg = dataclasses.replace(S_CFG, tie_embeddings=tied, logit_softcap=softcap)
  t_cfg = dataclasses.replace(T_CFG, tie_embeddings=tied, logit_softcap=softcap)
  t_params = init_params(t_cfg, jax.random.key(8), mesh, sharding.DEFAULT_RULES)
  tc = _train_cfg()
  tx, schedule = optim.make_optimizer(tc), optim.make_schedule(tc)
  batch = _batch(6)
  out = {}
  for chunk in (0, 7):
    state, _ = create_train_state(s_cfg, tx, 0, mesh, sharding.DEFAULT_RULES)
    distill = dataclasses.replace(DISTILL, loss="generalized_jsd", loss_chunk_size=chunk)
    step = train.make_train_step(s_cfg, tx, schedule, t_cfg=t_cfg, distill=distill)
    out[chunk] = jax.jit(step)(state, t_params, batch)
  (plain, m0), (chunked, m1) = out[0], out[7]
  for key in ("loss", "soft_loss", "hard_loss", "grad_norm", "num_tokens"):
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               chunked.params, plain.params)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
@pytest.mark.parametrize("tied, softcap", [(True, 0.0), (False, 20.0)])
def test_chunked_cross_entropy_step_equals_plain_step(mesh, tied, softcap):
  """TrainSettings.loss_chunk_size > 0 (a teacher or scratch phase): the same loss and update."""
  s_cfg = dataclasses.replace(S_CFG, tie_embeddings=tied, logit_softcap=softcap)
  # Plain SGD: the update is the gradient, scaled. Adam's first step divides each gradient
  # element by its own magnitude, which turns the rounding of a near-zero one into a whole step.
  tx, schedule = optax.sgd(0.5), optim.make_schedule(_train_cfg())
  batch = _batch(6)
  out = {}
  for chunk in (0, 7):
    state, _ = create_train_state(s_cfg, tx, 0, mesh, sharding.DEFAULT_RULES)
    step = train.make_train_step(s_cfg, tx, schedule, loss_chunk_size=chunk)
    out[chunk] = jax.jit(step)(state, None, batch)
  (plain, m0), (chunked, m1) = out[0], out[7]
  for key in ("loss", "hard_loss", "grad_norm", "num_tokens"):
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               chunked.params, plain.params)


def test_schedule_warmup_then_cosine():
  sched = optim.make_schedule(_train_cfg(steps=100, warmup_steps=10, learning_rate=1.0,
                                         end_lr_fraction=0.1))
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(sched(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1.0, rtol=1e-6)
  # Cosine half-way between warmup end and the last step: (1 + 0.1) / 2.
  np.testing.assert_allclose(sched(55), 0.55, rtol=1e-5)
  np.testing.assert_allclose(sched(100), 0.1, rtol=1e-6)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
@pytest.mark.parametrize("chunk", [0, 4])
def test_teacher_vocab_padding_rows_change_nothing(teacher_params, mesh, chunk):
  # A teacher whose vocabulary has 8 extra (padding) rows, with arbitrary values, distils exactly
  # as the same teacher without them: the loss compares the shared rows only.
  padded_cfg = dataclasses.replace(T_CFG, vocab_size=T_CFG.vocab_size + 8)
  padded = jax.tree.map(lambda x: x, teacher_params)
  extra = 5.0 * jax.random.normal(jax.random.key(3), (8, T_CFG.d_model))
  padded["embed"]["embedding"] = jnp.concatenate([teacher_params["embed"]["embedding"], extra])
  distill = dataclasses.replace(DISTILL, loss_chunk_size=chunk)
  s_params = init_params(S_CFG, jax.random.key(0), mesh, sharding.DEFAULT_RULES)
  batch = jax.tree.map(jnp.asarray, _batch())

  @functools.partial(jax.jit, static_argnums=0)
  def loss_and_grad(t_cfg, t_params):
    objective = objectives.make(S_CFG, distill, t_cfg)
    t_out = objectives.make_teacher_forward(t_cfg, objective.teacher_needs)(t_params, batch)
    loss_fn = lambda p: objective.loss(p, None, batch, t_out, 0)
    return jax.value_and_grad(loss_fn, has_aux=True)(s_params)

  (loss, metrics), grads = loss_and_grad(T_CFG, teacher_params)
  (loss_p, metrics_p), grads_p = loss_and_grad(padded_cfg, padded)
  assert padded_cfg.vocab_size > S_CFG.vocab_size
  # Equal to float32 rounding, not bitwise: XLA:CPU tiles the teacher's unembedding matmul by its
  # output width, and on some CPUs (the 2-core AMD EPYC of December 7) V + 8 columns round the
  # shared ones differently in the last bit. Padding rows that leaked (values ~5) would move the
  # loss and gradients by orders of magnitude more than these bounds.
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  jax.tree.map(lambda p, g: np.testing.assert_allclose(
      p, g, rtol=1e-5, atol=1e-6 * np.abs(g).max()), grads_p, grads)


def test_a_teacher_cache_with_feature_terms_is_refused():
  """A cache holds no hidden states or attention maps: asking for feature terms with it (even
  only through a schedule that leaves 0) is refused, never silently trained without them."""
  from kdjax import schedules
  for distill in (DistillSettings(cache_estimator="topk_residual", feature_weight=1.0),
                  DistillSettings(cache_estimator="topk_residual", feature_weight=0.0,
                                  feature_weight_schedule=schedules.Schedule(
                                      kind="linear", end=1.0, steps=10))):
    with pytest.raises(ValueError, match="feature distillation needs the teacher"):
      objectives.make(S_CFG, distill)
