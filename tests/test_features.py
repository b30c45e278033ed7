"""Feature distillation: hidden-state and attention-map losses, the layer map, the projection."""

import dataclasses
import fractions
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import shakespeare
from kdjax import (checkpoint, config_check, features, loop, losses, objectives, optim,
                   preflight, sharding, train)
from kdjax.model import ModelConfig, Transformer
from kdjax.settings import DistillSettings
from kdjax.state import abstract_train_state, create_train_state, init_params, param_shardings

T_CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2,
                    mlp_dim=32, max_len=16)
S_CFG = dataclasses.replace(T_CFG, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1,
                            mlp_dim=16)
TC = ml_collections.ConfigDict(dict(steps=6, learning_rate=1e-2, warmup_steps=0,
                                    end_lr_fraction=1.0, weight_decay=0.1, grad_clip=1.0,
                                    b1=0.9, b2=0.95, grad_accum_steps=1))
RULES = sharding.DEFAULT_RULES


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(4, 32, size=(4, 9)).astype(np.int32)
  segment_ids = np.ones((4, 8), np.int32)
  segment_ids[1, 5:] = 2  # a second packed document in row 1
  segment_ids[2, 6:] = 0  # padding at the end of row 2
  positions = np.where(segment_ids == 2, np.arange(8) - 5, np.arange(8)).astype(np.int32)
  positions[segment_ids == 0] = 0
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": segment_ids,
          "positions": positions, "mask": (segment_ids != 0).astype(np.float32)}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


@pytest.fixture(scope="module")
def teacher_params(mesh):
  return init_params(T_CFG, jax.random.key(7), mesh, RULES)


# ------------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("s_layers, t_layers, expected", [
    (2, 4, ((0, 1), (1, 3))),
    (2, 5, ((0, 2), (1, 4))),  # 2.5 rounds up
    (3, 4, ((0, 0), (1, 2), (2, 3))),
    (4, 2, ((0, 0), (1, 0), (2, 1), (3, 1))),
    (3, 1, ((0, 0), (1, 0), (2, 0))),  # floored at layer 0
])
def test_uniform_layer_map(s_layers, t_layers, expected):
  assert features.uniform_layer_map(s_layers, t_layers) == expected


def test_uniform_layer_map_against_exact_rounding():
  # Independent oracle: exact rationals, halves rounded up, floored at 0.
  for s in range(1, 9):
    for t in range(1, 13):
      want = tuple((i, max(0, int(fractions.Fraction((i + 1) * t, s) + fractions.Fraction(1, 2))
                           - 1)) for i in range(s))
      got = features.uniform_layer_map(s, t)
      assert got == want, (s, t)
      assert got[-1][1] == t - 1  # the last student layer sees the teacher's last


def _np_hidden_loss(s, t, mask, kind):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  if kind == "mse":
    per = ((s - t) ** 2).mean(-1)
  else:
    per = 1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  per = per.mean(0)
  return (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_numpy(kind):
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 3, 5, 6)), rng.normal(size=(2, 3, 5, 6))
  mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
  got = losses.hidden_state_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                 jnp.asarray(mask), kind=kind)
  # float32 against a float64 oracle, over sums of 6 terms.
  np.testing.assert_allclose(float(got), _np_hidden_loss(s, t, mask, kind), rtol=2e-6)
  # Cosine ignores scale; MSE does not.
  scaled = losses.hidden_state_loss(jnp.asarray(3 * s, jnp.float32), jnp.asarray(t, jnp.float32),
                                    jnp.asarray(mask), kind=kind)
  assert (float(scaled) == pytest.approx(float(got), rel=1e-5)) == (kind == "cosine")


def test_attention_kl_matches_numpy():
  rng = np.random.default_rng(2)
  logits_t, logits_s = rng.normal(size=(2, 3, 4, 4)), 2 * rng.normal(size=(2, 3, 4, 4))
  causal = np.tril(np.ones((4, 4), bool))
  def softmax(x):
    x = np.where(causal, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p, q = softmax(logits_t), softmax(logits_s)
  mask = np.ones((3, 4), np.float32)
  mask[2, 3] = 0
  with np.errstate(divide="ignore", invalid="ignore"):
    per = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1).mean(0)
  want = (per * mask).sum() / mask.sum()
  got = losses.attention_kl(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32),
                            jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(losses.attention_kl(jnp.asarray(p, jnp.float32), jnp.asarray(p, jnp.float32),
                                   jnp.asarray(mask))) == 0.0
  # Masked-out keys (probability 0) give finite gradients.
  grads = jax.grad(losses.attention_kl)(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32),
                                        jnp.asarray(mask))
  assert np.all(np.isfinite(np.asarray(grads)))


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_attention_maps_are_head_averaged_probabilities(teacher_params):
  """The sown maps equal an explicit softmax(q k^T / sqrt(K)) per head, averaged over heads, and
  asking for them leaves the logits bit-identical."""
  batch = _batch()
  model = Transformer(T_CFG)
  plain = model.apply({"params": teacher_params}, batch["inputs"], batch["segment_ids"],
                      batch["positions"])
  plan = features.FeaturePlan(s_layers=(0,), t_layers=(0, 2), hidden=True, attention=True,
                              hidden_loss="mse", s_width=8, t_width=16)
  logits, feats = features.forward(model, T_CFG, teacher_params, batch, plan, (0, 2), False)
  np.testing.assert_array_equal(logits, plain)
  attn = np.asarray(feats["attention"])
  assert attn.shape == (2, 4, 8, 8) and feats["hidden"].shape == (2, 4, 8, 16)
  # Rows are distributions over the keys of the same document, at or before the query.
  np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-6)
  seg = batch["segment_ids"]
  allowed = np.tril(np.ones((8, 8), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  assert np.all(attn[:, ~allowed] == 0)
  # Oracle for layer 0: its input is the normed embedding; q, k from the layer's own params.
  p0 = jax.tree.map(lambda x: x[0], teacher_params["layers"])
  x = np.asarray(teacher_params["embed"]["embedding"])[batch["inputs"]]
  x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + T_CFG.norm_eps) * np.asarray(
      p0["attn_norm"]["scale"])
  q = np.einsum("bld,dhk->blhk", x, np.asarray(p0["attn"]["query"]["kernel"]))
  k = np.einsum("bld,dnk->blnk", x, np.asarray(p0["attn"]["key"]["kernel"]))
  def rope(v):
    half = v.shape[-1] // 2
    inv = 1.0 / (T_CFG.rope_theta ** (np.arange(0, 2 * half, 2) / (2 * half)))
    ang = batch["positions"][..., None, None] * inv
    v1, v2 = v[..., :half], v[..., half:]
    return np.concatenate([v1 * np.cos(ang) - v2 * np.sin(ang),
                           v2 * np.cos(ang) + v1 * np.sin(ang)], -1)
  q, k = rope(q), np.repeat(rope(k), 2, axis=2)  # query heads 2g, 2g+1 share kv head g
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(T_CFG.head_size)
  scores = np.where(allowed[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).mean(1)
  np.testing.assert_allclose(attn[0], probs, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------ through the train step


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_copy_of_the_teacher_has_exactly_zero_feature_losses(teacher_params):
  """A student with the teacher's config and params: both feature terms are exactly 0, through
  the same teacher forward and student loss the step uses, on every layer (uniform map)."""
  batch = jax.tree.map(jnp.asarray, _batch(1))
  t_out = None
  for kind in ("mse", "cosine"):
    distill = DistillSettings(feature_weight=1.0, attention_weight=1.0, feature_loss=kind)
    plan = features.make_plan(distill, T_CFG, T_CFG)
    assert plan.s_layers == plan.t_layers == (0, 1, 2) and not plan.projection
    objective = objectives.make(T_CFG, distill, T_CFG)
    if t_out is None:  # the loss kind does not change what the teacher gives
      t_out = objectives.make_teacher_forward(T_CFG, objective.teacher_needs)(teacher_params,
                                                                              batch)
    _, metrics = objective.loss(teacher_params, None, batch, t_out, 0)
    assert float(metrics["feature_loss"]) == 0.0, kind
    assert float(metrics["attention_loss"]) == 0.0, kind
    assert float(metrics["soft_loss"]) == 0.0  # the logits agree too: a true copy


def test_feature_weight_zero_is_the_plain_step(teacher_params, mesh):
  """Feature settings at weight 0 trace the very program of a step without them (and so give
  the same bits), with no projection in the state."""
  plain = DistillSettings(temperature=2.0)
  off = dataclasses.replace(plain, feature_weight=0.0, attention_weight=0.0,
                            feature_loss="cosine", feature_layers=((0, 1), (1, 2)))
  tx = optim.make_optimizer(TC)
  states = [jax.eval_shape(lambda: create_train_state(S_CFG, tx, 0, mesh, RULES,
                                                            t_cfg=T_CFG, distill=d)[0])
            for d in (plain, off)]
  assert states[1].aux_params is None and states[1] == states[0]
  batch = _batch(2)
  programs = [str(jax.make_jaxpr(train.make_train_step(
      S_CFG, tx, optim.make_schedule(TC), t_cfg=T_CFG, distill=d))(states[0], teacher_params,
                                                                    batch))
              for d in (plain, off)]
  assert programs[0] == programs[1]


def test_projection_only_for_the_hidden_term_between_widths(mesh):
  tx = optim.make_optimizer(TC)
  def aux(s_cfg, **kw):
    like = jax.eval_shape(lambda: create_train_state(
        s_cfg, tx, 0, mesh, RULES, t_cfg=T_CFG, distill=DistillSettings(**kw))[0])
    return like.aux_params
  same_width = dataclasses.replace(S_CFG, d_model=16)
  assert aux(S_CFG, feature_weight=0.5)["projection"]["kernel"].shape == (2, 8, 16)
  assert aux(S_CFG, feature_weight=0.5, feature_layers=((1, 2),))["projection"][
      "kernel"].shape == (1, 8, 16)
  assert aux(same_width, feature_weight=0.5) is None
  assert aux(S_CFG, attention_weight=0.5) is None  # attention maps need no projection
  assert aux(S_CFG) is None


class _FixedBatches:
  """The same batch every step (so the losses must fall), checkpointable."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return _batch(3)

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_training_with_features_through_the_loop(teacher_params, mesh, tmp_path):
  """A distilled phase with both terms between different widths: the feature losses fall, the
  projection is trained and checkpointed in the 'train' item, restores exactly, and the phase's
  params (what evaluation and export read) hold the student alone."""
  distill = DistillSettings(temperature=2.0, feature_weight=1.0, attention_weight=1.0,
                                  feature_loss="mse")
  t_shardings = param_shardings(T_CFG, mesh, RULES)
  result = loop.train_phase(loop.PhaseSpec(
      phase="distilled", phase_dir=str(tmp_path), model_cfg=S_CFG, train_cfg=TC, seed=0,
      mesh=mesh, rules=RULES, make_train_iter=_FixedBatches, tokens_per_step=32, config_dict={},
      log_every=1, checkpoint_every=TC.steps, keep_checkpoints=1, nonfinite_patience=3,
      teacher=loop.Teacher(T_CFG, teacher_params, t_shardings), distill=distill,
      show_progress=False))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for key in ("feature_loss", "attention_loss"):
    values = [r[key] for r in rows]
    assert len(values) == TC.steps and values[0] > 0
    assert values[-1] < 0.8 * values[0], (key, values)

  # Exported / evaluated params: exactly the student's tree, no projection.
  student_tree = jax.eval_shape(lambda: init_params(S_CFG, jax.random.key(0), mesh, RULES))
  assert jax.tree.structure(result.params) == jax.tree.structure(student_tree)

  like, shardings = abstract_train_state(S_CFG, optim.make_optimizer(TC), 0, mesh, RULES,
                                               t_cfg=T_CFG, distill=distill)
  ckpts = checkpoint.PhaseCheckpoints(str(tmp_path / "checkpoints"))
  restored, _ = ckpts.restore(TC.steps, like, shardings)
  ckpts.close()
  assert int(restored.step) == TC.steps
  jax.tree.map(np.testing.assert_array_equal, restored.params, result.params)
  kernel = restored.aux_params["projection"]["kernel"]
  plan = features.make_plan(distill, S_CFG, T_CFG)  # the seed's projection stream, fold_in 2
  initial = features.init_projection(plan, jax.random.fold_in(jax.random.key(0), 2))["kernel"]
  assert kernel.shape == (2, 8, 16) and not np.array_equal(kernel, initial.value)  # trained
  assert kernel.sharding == shardings.aux_params["projection"]["kernel"]
  # The optimizer state covers the projection: Adam moments of (params, aux_params), and the
  # projection's moments are not zero: gradients reached it.
  n = len(jax.tree.leaves(restored.params)) + 1
  assert len([x for x in jax.tree.leaves(restored.opt_state) if x.ndim > 0]) == 2 * n
  moments = [x for path, x in jax.tree_util.tree_flatten_with_path(restored.opt_state)[0]
             if "projection" in jax.tree_util.keystr(path)]
  assert len(moments) == 2 and all(np.any(np.asarray(m) != 0) for m in moments)
  # The params item alone (what a teacher load or an export reads) has no projection in it.
  params_only, _ = checkpoint.load_params(str(tmp_path / "checkpoints"), student_tree,
                                          param_shardings(S_CFG, mesh, RULES))
  jax.tree.map(np.testing.assert_array_equal, params_only, result.params)


# --------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("override, field", [
    (dict(feature_loss="l1"), "distill.feature_loss"),
    (dict(feature_weight=-1.0), "distill.feature_weight"),
    (dict(attention_weight=-0.1), "distill.attention_weight"),
    (dict(feature_layers=((0, 0), (1, 0))), "distill.feature_layers"),  # smoke student: 1 layer
    (dict(feature_layers=((0, 2),)), "distill.feature_layers"),  # smoke teacher: 2 layers
    (dict(alpha_schedule=dict(kind="step")), "distill.alpha_schedule.kind"),
    (dict(alpha_schedule=dict(kind="linear", end=1.5)), "distill.alpha_schedule.end"),
    (dict(temperature_schedule=dict(kind="cosine", end=0.0)), "distill.temperature_schedule.end"),
    (dict(feature_weight_schedule=dict(kind="linear", end=1.0, steps=-1)),
     "distill.feature_weight_schedule.steps"),
])
def test_config_check_names_the_bad_field(override, field):
  config = shakespeare.get_config("smoke")
  config_check.check_config(config, 1)  # the defaults pass
  # A constant schedule ignores its end; linear with a fine end passes.
  config.distill.alpha_schedule.update(dict(kind="linear", end=1.0))
  config_check.check_config(config, 1)
  config.distill.update(override)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check_config(config, 1)
  message = str(e.value)
  assert message.startswith(f"config.{field}:") and "\n" not in message


def test_runs_saved_before_these_fields_still_resume():
  current = json.loads(shakespeare.get_config("smoke").to_json())
  saved = json.loads(shakespeare.get_config("smoke").to_json())
  for key in ("feature_weight", "feature_loss", "feature_layers", "attention_weight",
              "alpha_schedule", "temperature_schedule", "feature_weight_schedule"):
    del saved["distill"][key]
  preflight.check_resume(saved, current, "distilled", "w/distilled")
  current["distill"]["feature_weight"] = 0.5
  with pytest.raises(config_check.ConfigError, match="distill.feature_weight: 0.0 -> 0.5"):
    preflight.check_resume(saved, current, "distilled", "w/distilled")
