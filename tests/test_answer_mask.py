"""Loss on the answer only: tokens outside assistant turns carry zero weight in every loss and
metric, and the answer mask survives concat-then-split packing.

The batches are real chat records packed by the pipeline (kdjax's built-in template, a tokenizer
trained on them). The property: change what sits at positions the mask leaves out (their targets,
the teacher's outputs there, and the input tokens that only such positions can see) and the loss,
its gradients and the eval metrics stay exactly the same.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import evaluate, features, losses, objectives, sharding
from kdjax.data import chat_template, encoding, pipeline, sources
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.model import ModelConfig
from kdjax.settings import DistillSettings
from kdjax.state import init_params
from kdjax.teacher_cache import estimators
from support import own_data

VOCAB, SEQ, BATCH = 512, 48, 4
T_CFG = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=SEQ)
S_CFG = dataclasses.replace(T_CFG, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            mlp_dim=32)


def _chats():
  """Conversations; every third ends with an unanswered user turn (prompt tokens after the last
  answer of a document: only masked positions can see them)."""
  chats = own_data.conversations(own_data.TRAIN_WORKS, chars=2500)
  for i, chat in enumerate(chats):
    if i % 3 == 0:
      chat["messages"].append({"role": "user", "content": "And then?"})
  return chats


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  path = own_data.write_jsonl(str(tmp_path_factory.mktemp("chat") / "chat.jsonl"), _chats())
  recs = sources.read_files(path, "train_files")
  texts = ("\n".join(m["content"] for m in r["messages"]) for r in recs)
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.train(texts, VOCAB))
  return recs, encoding.Encoder("chat", tok, chat_template.BuiltinChat(tok))


@pytest.fixture(scope="module")
def batch(encoder):
  recs, encode = encoder
  (b,) = pipeline.eval_batches(recs, encode.tokenizer, seq_len=SEQ, batch_size=BATCH,
                               max_batches=1, encode=encode)
  return b


def test_packed_mask_is_the_documents_answer_weights_end_to_end(encoder):
  recs, encode = encoder
  batches = pipeline.eval_batches(recs, encode.tokenizer, seq_len=SEQ, batch_size=BATCH,
                                  encode=encode)
  docs = [encode(recs[i]) for i in range(len(recs))]
  real = np.concatenate([b["segment_ids"].reshape(-1) != 0 for b in batches])
  for key, packed in (("targets", "targets"), ("weights", "mask")):
    laid_out = np.concatenate([b[packed].reshape(-1) for b in batches])[real]
    np.testing.assert_array_equal(laid_out, np.concatenate([d[key] for d in docs]))
  # Packing cut documents across rows: the mask crossed those boundaries intact.
  assert sum(len(d["targets"]) for d in docs) > SEQ * BATCH
  assert 0 < np.mean(np.concatenate([d["weights"] for d in docs])) < 0.6


def _dead_positions(batch):
  """Positions whose input only masked positions see: at or after the last counted target of
  their segment (attention is causal and within a segment), or padding."""
  mask, seg = batch["mask"] != 0, batch["segment_ids"]
  dead = np.zeros_like(mask)
  for b in range(mask.shape[0]):
    for j in range(mask.shape[1]):
      same_after = seg[b, j:] == seg[b, j]
      dead[b, j] = seg[b, j] == 0 or not mask[b, j:][same_after].any()
  return dead


def _changed(batch, teacher_out, seed=1):
  """The batch and teacher outputs with everything at masked positions replaced."""
  rng = np.random.default_rng(seed)
  keep = batch["mask"] != 0
  dead = _dead_positions(batch)
  assert (~keep).sum() > 0 and (dead & (batch["segment_ids"] != 0)).sum() > 0
  out = dict(batch)
  out["targets"] = np.where(keep, batch["targets"], rng.integers(4, VOCAB, keep.shape))
  out["inputs"] = np.where(dead, rng.integers(4, VOCAB, keep.shape), batch["inputs"])
  for key in (estimators.TOPK_IDS, estimators.TOPK_LOGPROBS, estimators.RESIDUAL):
    if key in batch:
      out[key] = _replace_masked(batch[key], keep)
  return out, jax.tree.map(lambda x: _replace_masked(x, keep), teacher_out)


def _replace_masked(x, keep_BxL):
  """x with its entries at masked (b, l) replaced, for any leaf laid out [..., B, ..., L, ...]
  (logits [B, L, V], hidden states [M, B, L, D], attention maps [M, B, L(query), L]); leaves
  without a (B, L) layout (the unembedding) are left alone."""
  x = np.asarray(x)
  b, l = keep_BxL.shape
  axes = [i for i, n in enumerate(x.shape) if n == b]
  for ab in axes:
    lq = next((i for i in range(ab + 1, x.ndim) if x.shape[i] == l), None)
    if lq is None:
      continue
    shape = [1] * x.ndim
    shape[ab], shape[lq] = b, l
    keep = keep_BxL.reshape(shape)
    other = (x + 1) % VOCAB if np.issubdtype(x.dtype, np.integer) else x * 0.5 + 0.25
    return np.where(keep, x, other.astype(x.dtype))
  return x


def _cached(t_logits_BxLxV, k=8):
  logprobs = jax.nn.log_softmax(t_logits_BxLxV.astype(jnp.float32), axis=-1)
  top, ids = jax.lax.top_k(logprobs, k)
  residual = jnp.log1p(-jnp.minimum(jnp.sum(jnp.exp(top), -1), 1 - 1e-6))
  return {estimators.TOPK_IDS: np.asarray(ids), estimators.TOPK_LOGPROBS: np.asarray(top),
          estimators.RESIDUAL: np.asarray(residual)}


_DIVERGENCES = [DistillSettings(loss=name, temperature=2.0, alpha=0.7)
                for name in losses.DIVERGENCES]
# Every case runs in the full suite; cross-entropy also in the quick one.
_CASES = (
    [("cross_entropy", None)]
    + [pytest.param(f"logits-{d.loss}", d,
                    marks=pytest.mark.slow)
       for d in _DIVERGENCES]
    + [pytest.param(name, d, marks=pytest.mark.slow) for name, d in (
        ("chunked", DistillSettings(loss="forward_kl", temperature=2.0, alpha=0.5,
                                    loss_chunk_size=16)),
        ("features", DistillSettings(alpha=0.5, feature_weight=1.0, attention_weight=1.0)),
        ("cache-topk_renorm", DistillSettings(alpha=0.5, cache_estimator="topk_renorm")),
        ("cache-topk_residual", DistillSettings(alpha=0.5, cache_estimator="topk_residual")))])


@pytest.fixture(scope="module")
def params():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  t_params = init_params(T_CFG, jax.random.key(0), mesh, None)
  s_params = init_params(S_CFG, jax.random.key(1), mesh, None)
  return t_params, s_params


@pytest.mark.parametrize("name,distill", _CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in _CASES])
def test_masked_positions_change_no_loss_and_no_gradient(batch, params, name, distill):
  t_params, s_params = params
  live = distill is not None and not distill.cache_estimator
  objective = objectives.make(S_CFG, distill, T_CFG if live else None)
  aux = None
  if objective.needs_aux:
    plan = features.make_plan(distill, S_CFG, T_CFG)
    aux = nn.meta.unbox({"projection": features.init_projection(plan, jax.random.key(2))})
  t_out = (objectives.make_teacher_forward(T_CFG, objective.teacher_needs)(t_params, batch)
           if live else None)
  if distill is not None and distill.cache_estimator:
    batch = {**batch, **_cached(objectives.make_teacher_forward(
        T_CFG, objectives.TeacherNeeds("logits"))(t_params, batch))}
  step = jnp.zeros((), jnp.int32)

  @jax.jit
  def loss_and_grad(b, out):
    return jax.value_and_grad(lambda p: objective.loss(p, aux, b, out, step)[0])(s_params)

  other_batch, other_out = _changed(batch, t_out)
  (loss, grads), (loss2, grads2) = loss_and_grad(batch, t_out), loss_and_grad(other_batch,
                                                                             other_out)
  assert np.isfinite(loss) and loss > 0
  np.testing.assert_array_equal(loss2, loss)
  jax.tree.map(np.testing.assert_array_equal, grads2, grads)


def test_masked_positions_change_no_eval_metric(batch, params):
  t_params, s_params = params
  step = evaluate.make_eval_step(S_CFG, T_CFG)
  sums, n = step(s_params, t_params, batch)
  other, _ = _changed(batch, None)
  sums2, n2 = step(s_params, t_params, other)
  assert float(n) == batch["mask"].sum() < (batch["segment_ids"] != 0).sum()
  jax.tree.map(np.testing.assert_array_equal, sums2, sums)
