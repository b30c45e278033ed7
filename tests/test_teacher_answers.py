"""A teacher answers prompts (kdjax.answers, kdjax.answer_files, scripts/teacher_answers.py):
greedy answers are the argmax of full recomputation, recorded top-k log-probs are the teacher's,
a killed run resumes answering each prompt exactly once, and a Hugging Face teacher answers chat
prompts through its own chat template as transformers would."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import answer_files, answers
from kdjax.data import answer_logits, encoding, records, sources
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.model import ModelConfig, Transformer
from kdjax.teacher_cache import estimators

CFG = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  mlp_dim=64, max_len=64)
PROMPTS = [f"What is {a} plus {b}?" for a, b in ((3, 4), (12, 9), (5, 0), (40, 2), (7, 7),
                                                  (1, 18), (23, 30), (9, 11), (6, 6))]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [f"What is {a} plus {b}? {a} + {b} = {a + b}. The answer is {a + b}."
           for a in range(30) for b in range(0, 30, 7)]
  return tokenizer_lib.train_or_load(texts, tmp_path_factory.mktemp("tok") / "t.model", 320,
                                     split_digits=True)


@pytest.fixture(scope="module")
def model(tok):
  params = Transformer(CFG).init(jax.random.key(3), jnp.zeros((1, 1), jnp.int32))["params"]
  # A stop id the random model actually draws, so that some answers end early.
  enc = encoding.Encoder("prompt_completion", tok)
  return answers.Model(CFG, params, enc, answers.stop_ids(tok))


def _prompts(path, tok, model, texts=PROMPTS, max_new_tokens=12):
  with open(path, "w") as f:
    f.write("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))
  return answers.read_prompts(sources.read_files(str(path), "prompts"), model.encoder,
                              max_len=CFG.max_len, max_new_tokens=max_new_tokens, name="prompts")


@jax.jit
def _full_forward(params, ids_1xL):
  return Transformer(CFG).apply({"params": params}, ids_1xL)


def _argmax_by_recompute(params, ids, n, stops):
  """The oracle: the whole sequence through the model again for every new token (padded on the
  right to max_len, one compile: causal attention never reads the padding)."""
  ids = list(ids)
  out = []
  for _ in range(n):
    padded = jnp.asarray([ids + [0] * (CFG.max_len - len(ids))])
    logits = _full_forward(params, padded)[0, len(ids) - 1]
    nxt = int(jnp.argmax(logits))
    ids.append(nxt)
    out.append(nxt)
    if nxt in stops:
      break
  return out


def test_greedy_answers_are_full_recompute_argmax_in_prompt_order(tmp_path, tok, model):
  prompts = _prompts(tmp_path / "p.jsonl", tok, model)
  sampling = answers.Sampling(max_new_tokens=12)
  got = answers.answer_all(model, prompts, sampling, batch_size=4)  # batches of mixed lengths
  assert [a.prompt for a in got] == list(range(len(PROMPTS)))
  for a, p in zip(got, prompts):
    want = _argmax_by_recompute(model.params, p.ids, 12, model.stop_ids)
    assert list(a.ids) == want
    assert a.finished == (want[-1] in model.stop_ids)
    assert a.text == tok.decode(want[:-1] if a.finished else want)


def test_recorded_topk_are_the_teachers_log_probs_at_each_answer_token(tmp_path, tok, model):
  prompts = _prompts(tmp_path / "p.jsonl", tok, model)[:4]
  sampling = answers.Sampling(max_new_tokens=10, temperature=1.0, top_k=20, seed=4)
  got = answers.answer(model, prompts, sampling, key=jax.random.key(4), record_topk=5)
  for a in got:
    p = prompts[a.prompt]
    n = len(a.ids)
    full = jnp.asarray([list(p.ids) + list(a.ids)])
    logp = jax.nn.log_softmax(Transformer(CFG).apply({"params": model.params}, full)[0], -1)
    at = logp[len(p.ids) - 1:len(p.ids) - 1 + n]  # the distributions the answer was drawn from
    want_lp, want_ids = jax.lax.top_k(at, 5)
    np.testing.assert_array_equal(a.topk[estimators.TOPK_IDS], want_ids)
    np.testing.assert_allclose(a.topk[estimators.TOPK_LOGPROBS], want_lp, rtol=1e-5, atol=1e-5)
    rest = np.asarray(at).copy()
    np.put_along_axis(rest, np.asarray(want_ids), -np.inf, axis=-1)
    np.testing.assert_allclose(a.topk[estimators.RESIDUAL], jax.nn.logsumexp(rest, axis=-1),
                               rtol=1e-5, atol=1e-5)
  # On disk, line by line: the same ids (by digest) and log-probs, rounded to float16.
  out = str(tmp_path / "out")
  answer_files.write(model, prompts, sampling, out, batch_size=4, record_topk=5, progress=False)
  store = answer_logits.AnswerLogits(out)
  lines = [json.loads(l) for l in open(os.path.join(out, "answers.jsonl"))]
  # One batch drawn with fold_in(key(seed), 0): the same answers as above with that key.
  again = answers.answer(model, [prompts[i] for i in answers.plan_batches(prompts, 4)[0]],
                         sampling, key=jax.random.fold_in(jax.random.key(4), 0), record_topk=5)
  by_prompt = {a.prompt: a for a in again}
  for k, line in enumerate(lines):
    a, rec = by_prompt[line["prompt_index"]], store.record(k)
    n = int(rec["row"])
    assert n == len(a.ids) == line["new_tokens"]
    np.testing.assert_array_equal(rec["digest"], answer_logits.ids_digest(a.ids))
    np.testing.assert_array_equal(rec["topk_ids"][:n], a.topk[estimators.TOPK_IDS])
    np.testing.assert_allclose(rec["topk_logprobs"][:n].astype(np.float32),
                               a.topk[estimators.TOPK_LOGPROBS], rtol=1e-3, atol=1e-3)


class _Killed(Exception):
  pass


def test_a_killed_run_resumes_and_answers_each_prompt_exactly_once(tmp_path, tok, model,
                                                                  monkeypatch):
  prompts = _prompts(tmp_path / "p.jsonl", tok, model)
  sampling = answers.Sampling(max_new_tokens=8, temperature=1.0, num_samples=2, seed=1)
  whole = str(tmp_path / "whole")
  answer_files.write(model, prompts, sampling, whole, batch_size=2, record_topk=3,
                     progress=False)
  out = str(tmp_path / "killed")
  real, calls = answers.answer, []

  def dies_on_third_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise _Killed
    return real(*args, **kwargs)

  monkeypatch.setattr(answers, "answer", dies_on_third_batch)
  with pytest.raises(_Killed):
    answer_files.write(model, prompts, sampling, out, batch_size=2, record_topk=3,
                       progress=False)
  assert not os.path.exists(os.path.join(out, "answers.jsonl"))
  monkeypatch.setattr(answers, "answer", real)
  # Two processes share the rest: each does its own batches, the last one writes the dataset.
  first = answer_files.write(model, prompts, sampling, out, batch_size=2, record_topk=3,
                             process_index=0, process_count=2, progress=False)
  second = answer_files.write(model, prompts, sampling, out, batch_size=2, record_topk=3,
                              process_index=1, process_count=2, progress=False)
  assert first is None and second is not None  # process 0 finished first here
  lines = [json.loads(l) for l in open(os.path.join(out, "answers.jsonl"))]
  keys = [(l["prompt_index"], l["sample"]) for l in lines]
  assert sorted(keys) == [(i, s) for i in range(len(PROMPTS)) for s in range(2)]
  assert [l["answer_id"] for l in lines] == list(range(len(lines)))
  # Exactly what an uninterrupted run wrote, log-probs included.
  assert open(os.path.join(out, "answers.jsonl")).read() == open(
      os.path.join(whole, "answers.jsonl")).read()
  a, b = answer_logits.AnswerLogits(out), answer_logits.AnswerLogits(whole)
  for k in range(len(lines)):
    for field in ("row", "digest", "topk_ids", "topk_logprobs", "residual"):
      np.testing.assert_array_equal(a.record(k)[field], b.record(k)[field])
  # Other settings are refused, in one line, rather than mixed in.
  with pytest.raises(ValueError) as e:
    answer_files.write(model, prompts, answers.Sampling(max_new_tokens=9), out, batch_size=2,
                       progress=False)
  assert "sampling" in str(e.value) and "\n" not in str(e.value)


def test_bad_prompts_are_refused_in_one_line_before_any_work(tmp_path, tok, model):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(records.DataError) as e:
    answers.read_prompts(sources.read_files(str(empty), "--prompts"), model.encoder, max_len=64,
                         max_new_tokens=8, name="--prompts")
  assert "empty.jsonl" in str(e.value) and "--prompts" in str(e.value)
  with pytest.raises(records.DataError) as e:  # every file read, none holding a record
    answers.read_prompts([], model.encoder, max_len=64, max_new_tokens=8, name="--prompts")
  assert "--prompts: no prompts" in str(e.value)
  with pytest.raises(records.DataError) as e:
    _prompts(tmp_path / "long.jsonl", tok, model, texts=["What is 1 plus 2? " * 20])
  assert "long.jsonl:1" in str(e.value) and "max_len=64" in str(e.value)
  assert "\n" not in str(e.value)
  no_prompt = tmp_path / "np.jsonl"
  no_prompt.write_text(json.dumps({"text": "a document"}) + "\n")
  with pytest.raises(records.DataError) as e:
    answers.read_prompts(sources.read_files(str(no_prompt), "prompts"), model.encoder,
                         max_len=64, max_new_tokens=8, name="--prompts")
  assert "np.jsonl:1" in str(e.value) and "prompt" in str(e.value)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_a_hugging_face_teacher_answers_chat_prompts_as_transformers_generates(tmp_path):
  """A tiny Llama built by transformers, with a Llama 3 chat template: kdjax renders each chat
  through the template with its generation prompt, decodes greedily until <|eot_id|>, and gives
  exactly the tokens transformers' apply_chat_template + generate give."""
  import torch
  import transformers
  from support import chat_tokenizers

  directory = chat_tokenizers.build(str(tmp_path / "llama"), "llama3", chat_tokenizers.LLAMA3,
                                    in_jinja_file=False)
  hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
  eot = hf_tok.convert_tokens_to_ids("<|eot_id|>")
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      bos_token_id=hf_tok.bos_token_id, eos_token_id=eot, tie_word_embeddings=False))
  hf_model.save_pretrained(directory)
  chats = [[{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Hello there! How are you today?"}],
           [{"role": "user", "content": "Here is JSON: {\"key\": 1}"},
            {"role": "assistant", "content": "I see it."},
            {"role": "user", "content": "Say it again, in plain words."}]]
  prompts_file = tmp_path / "chats.jsonl"
  prompts_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))

  from kdjax import settings, sharding
  mesh = sharding.make_mesh(settings.config_section(settings.MeshSettings))
  model, teacher = answers.hf_model(directory, mesh)
  assert eot in model.stop_ids and teacher["teacher_hf"] == os.path.abspath(directory)
  prompts = answers.read_prompts(sources.read_files(str(prompts_file), "prompts"), model.encoder,
                                 max_len=128, max_new_tokens=10, name="prompts")
  out = str(tmp_path / "answers")
  answer_files.write(model, prompts, answers.Sampling(max_new_tokens=10), out, batch_size=2,
                     progress=False)
  lines = [json.loads(l) for l in open(os.path.join(out, "answers.jsonl"))]
  for chat, p, line in zip(chats, prompts, lines):
    want_prompt = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert list(p.ids) == list(want_prompt)
    with torch.inference_mode():
      got = hf_model.generate(torch.tensor([want_prompt]), max_new_tokens=10, do_sample=False,
                              eos_token_id=eot, pad_token_id=eot)[0, len(want_prompt):].tolist()
    assert line["new_tokens"] == len(got)
    assert line["messages"] == chat + [{"role": "assistant", "content": hf_tok.decode(
        [t for t in got if t != eot])}]
    assert line["finished"] == (got[-1] == eot)
