"""Data for task distillation: prompts read from records, ground truth mixed into a teacher's
answers, and a teacher's recorded top-k riding with its answers through packing to the loss."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import answer_files
from kdjax.data import answer_logits, encoding, pipeline, records, sources
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.teacher_cache import estimators


def test_mixed_holds_every_main_record_once_and_the_weight_of_extra_ones():
  main, extra = [f"m{i}" for i in range(97)], ["a", "b", "c"]
  for weight in (0.1, 0.25, 0.5, 0.9):
    mixed = sources.Mixed(main, extra, weight)
    got = [mixed[i] for i in range(len(mixed))]
    assert [r for r in got if r.startswith("m")] == main  # all, once, in order
    n_extra = len(got) - len(main)
    assert abs(n_extra - weight * len(got)) <= 1
    # Any stretch of the mix holds the weight to within one record.
    window = got[:40]
    assert abs(sum(r in extra for r in window) - weight * 40) <= 1
    assert set(r for r in got if r in extra) <= set(extra)
    assert got[-1] == main[-1]  # the shortest mix that holds them all
  with pytest.raises(ValueError):
    sources.Mixed(main, extra, 1.0)


def test_prompt_of_reads_prompts_chats_and_their_references():
  assert records.prompt_of({"prompt": "2 + 2 =", "completion": " 4"}, "messages") == {
      "prompt": "2 + 2 =", "reference": " 4"}
  assert records.prompt_of({"prompt": "hi"}, "messages") == {"prompt": "hi", "reference": None}
  chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
  assert records.prompt_of(chat, "messages") == {
      "prompt": [{"role": "user", "content": "Q"}], "reference": "A"}
  share = {"conversations": [{"from": "human", "value": "Q"}]}
  assert records.prompt_of(share, "messages")["prompt"] == [{"role": "user", "content": "Q"}]
  for bad in ({"text": "no prompt"}, {"messages": [{"role": "assistant", "content": "A"}]}):
    with pytest.raises(records.DataError) as e:
      records.prompt_of({**bad, records.WHERE: "p.jsonl:3"}, "messages")
    assert "p.jsonl:3" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "t.model"
  texts = [f"What is {a} plus {b}? {a} + {b} = {a + b}. The answer is {a + b}."
           for a in range(30) for b in range(0, 30, 7)]
  return tokenizer_lib.train_or_load(texts, path, 320, split_digits=True)


def _answers_dir(tmp_path, tok, completions, top_k=3, vocab=320):
  """An answers directory as scripts/teacher_answers.py writes it, with crafted top-k."""
  out = str(tmp_path / "answers")
  os.makedirs(out)
  manifest = answer_logits.new_manifest(top_k=top_k, vocab_size=vocab, max_new_tokens=24)
  lines, recs, expected = [], [], []
  rng = np.random.default_rng(0)
  for k, (prompt, completion) in enumerate(completions):
    ids = tok.encode(completion) + [tok.eos_id]
    topk = {estimators.TOPK_IDS: rng.integers(0, vocab, (len(ids), top_k)),
            estimators.TOPK_LOGPROBS: -rng.random((len(ids), top_k)).astype(np.float32),
            estimators.RESIDUAL: -rng.random(len(ids)).astype(np.float32)}
    recs.append(answer_logits.encode(k, len(ids), answer_logits.ids_digest(ids), topk,
                                     manifest))
    lines.append(json.dumps({"prompt": prompt, "completion": completion,
                             answer_logits.ANSWER_ID: k}))
    expected.append(topk)
  answer_files._write_records(os.path.join(out, answer_logits.RECORDS), recs)
  answer_files._write_text(os.path.join(out, answer_logits.MANIFEST), json.dumps(manifest))
  answer_files._write_text(os.path.join(out, "answers.jsonl"), "\n".join(lines) + "\n")
  return out, expected


def test_recorded_topk_sit_on_the_answer_targets_and_survive_packing(tmp_path, tok):
  pairs = [("What is 3 plus 4?", "3 + 4 = 7. The answer is 7."),
           ("What is 12 plus 9?", "12 + 9 = 21. The answer is 21."),
           ("What is 5 plus 0?", "5 + 0 = 5. The answer is 5.")]
  out, expected = _answers_dir(tmp_path, tok, pairs)
  store = answer_logits.AnswerLogits(out)
  enc = encoding.Encoder("prompt_completion", tok, answer_logits=store)
  answers = sources.read_files(os.path.join(out, "answers.jsonl"), "x")
  labelled = {"prompt": "What is 1 plus 1?", "completion": "1 + 1 = 2. The answer is 2."}
  for k in range(3):
    doc = enc(answers[k])
    head = len(tok.encode(pairs[k][0])) + 1  # BOS + prompt
    n = len(tok.encode(pairs[k][1])) + 1
    w = doc[estimators.TEACHER_WEIGHT]
    # Target i predicts id i + 1: the answer's ids head .. head + n - 1 are targets head - 1 ...
    np.testing.assert_array_equal(np.flatnonzero(w), np.arange(head - 1, head - 1 + n))
    np.testing.assert_array_equal(np.flatnonzero(w), np.flatnonzero(doc["weights"]))
    np.testing.assert_array_equal(doc[estimators.TOPK_IDS][head - 1:],
                                  expected[k][estimators.TOPK_IDS])
    np.testing.assert_allclose(doc[estimators.TOPK_LOGPROBS][head - 1:],
                               expected[k][estimators.TOPK_LOGPROBS], rtol=2e-3)
  # Ground truth has no answer_id: the hard loss counts it, the soft loss does not.
  doc = enc(labelled)
  assert doc["weights"].sum() > 0 and doc[estimators.TEACHER_WEIGHT].sum() == 0
  # A record whose answer re-tokenizes differently from what was recorded is not attached.
  changed = {**answers[0], "completion": "3 + 4 = 7. The answer is 8."}
  assert enc(changed)[estimators.TEACHER_WEIGHT].sum() == 0
  # Packed: every row's teacher weight marks exactly the tokens whose top-k came along.
  mixed = sources.Mixed(answers, [labelled], 0.25)
  batch = pipeline.eval_batches(mixed, tok, seq_len=32, batch_size=2, encode=enc)[0]
  assert batch[estimators.TOPK_IDS].shape == (2, 32, 3)
  w = batch[estimators.TEACHER_WEIGHT]
  assert np.all(batch["mask"][w > 0] == 1)
  assert np.all(batch[estimators.TOPK_LOGPROBS][w == 0] == 0)
  assert w.sum() > 0


def test_the_soft_loss_counts_only_tokens_with_a_recorded_teacher():
  rng = np.random.default_rng(1)
  s_logits = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float32)
  labels = jnp.asarray([[1, 2, 3, 4]])
  mask = jnp.ones((1, 4))
  logp = np.log(np.full((1, 4, 8), 1 / 8, np.float32))
  cached = {estimators.TOPK_IDS: jnp.asarray(np.tile(np.arange(8), (1, 4, 1))),
            estimators.TOPK_LOGPROBS: jnp.asarray(logp),
            estimators.RESIDUAL: jnp.full((1, 4), -jnp.inf)}
  weight = jnp.asarray([[1.0, 0.0, 1.0, 0.0]])
  _, with_weight = estimators.distillation_loss(
      s_logits, {**cached, estimators.TEACHER_WEIGHT: weight}, labels, mask,
      estimator="topk_renorm", alpha=0.5)
  # The oracle: the soft loss over the two weighted tokens alone, the hard loss over all four.
  _, on_two = estimators.distillation_loss(s_logits, cached, labels, weight,
                                           estimator="topk_renorm", alpha=0.5)
  _, on_all = estimators.distillation_loss(s_logits, cached, labels, mask,
                                           estimator="topk_renorm", alpha=0.5)
  np.testing.assert_allclose(with_weight["soft_loss"], on_two["soft_loss"], rtol=1e-6)
  np.testing.assert_allclose(with_weight["hard_loss"], on_all["hard_loss"], rtol=1e-6)
