"""The CLI on the user's own data: the whole experiment on JSONL, Parquet, .txt and a saved Hugging
Face dataset; and every kind of bad input refused in one line naming the file and line (or
record) and the fix, before any compile, with the workdir never created."""

import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from support import own_data
from support.scripts_loader import ROOT, subprocess_env

SMOKE = "--config=configs/shakespeare.py:smoke"


def _run(workdir, *args, timeout=600):
  cmd = [sys.executable, "-m", "kdjax.main", SMOKE, f"--workdir={workdir}",
         "--config.progress_bar=False", *args]
  return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


# ------------------------------------------------------------------------------- the experiment


def _sources(tmp, kind):
  if kind == "hf":
    return {"hf_dataset": own_data.save_hf_dataset(str(tmp / "hf"))}
  return own_data.text_splits(str(tmp / kind), kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "hf"])
def test_the_experiment_runs_on_each_kind_of_source(tmp_path, kind):
  data = _sources(tmp_path, kind)
  args = [f"--config.data.{k}={v}" for k, v in data.items()]
  out = _run(tmp_path / "w", *args, f"--config.data.data_dir={tmp_path / 'dd'}")
  assert out.returncode == 0, out.stderr[-3000:]
  for phase in ("teacher", "distilled", "scratch"):
    assert f"\n{phase} " in out.stdout, out.stdout
  with open(tmp_path / "w" / "summary.json") as f:
    summary = json.load(f)
  # The distilled student learned from the teacher: closer to it than the scratch student.
  assert summary["distilled"]["kl_to_teacher"] < summary["scratch"]["kl_to_teacher"]


# ------------------------------------------------------------------------------------ bad input

_GOOD = [{"messages": m["messages"]} for m in own_data.conversations(own_data.TRAIN_WORKS)]
_BAD_AT = 57  # the line of the bad record among good ones (enough text to train a tokenizer)


def _with_bad(record_line: str) -> str:
  lines = [json.dumps(r) for r in _GOOD]
  lines.insert(_BAD_AT - 1, record_line)
  return "\n".join(lines) + "\n"


def _chat_with(**message):
  return json.dumps({"messages": [{"role": "user", "content": "hi"}, message]})


# name -> (files to write {name: text}, config overrides, what the one line must say)
_CASES = {
    "glob_matches_nothing": ({}, {"train_files": "{d}/nothing-*.jsonl"},
                             ["data.train_files", "matches no file"]),
    "empty_file": ({"train.jsonl": ""}, {}, ["{d}/train.jsonl: empty file"]),
    "malformed_json_line": ({"train.jsonl": _with_bad('{"messages": [')}, {},
                            [f"{{d}}/train.jsonl:{_BAD_AT}: not valid JSON", "fix or remove"]),
    "missing_field": ({"train.jsonl": _with_bad('{"text": "no messages"}')}, {"format": "chat"},
                      [f"train.jsonl:{_BAD_AT}: missing field 'messages'", "data.messages_key"]),
    "content_not_a_string": ({"train.jsonl": _with_bad(_chat_with(role="assistant",
                                                                  content=["a", "b"]))}, {},
                             [f"train.jsonl:{_BAD_AT}: messages[1].content must be a string"]),
    "unknown_role": ({"train.jsonl": _with_bad(_chat_with(role="narrator", content="x"))}, {},
                     [f"train.jsonl:{_BAD_AT}: messages[1] has unknown role 'narrator'",
                      "use one of"]),
    "no_answer_tokens": ({"train.jsonl": _with_bad(_chat_with(role="user", content="x"))}, {},
                         [f"train.jsonl:{_BAD_AT}: the conversation has no assistant message",
                          "data.train_on='all'"]),
    "unread_file_format": ({"train.csv": "text\nhello\n"}, {"train_files": "{d}/train.csv"},
                           ["train.csv is not a file kdjax reads", ".jsonl"]),
    "template_needs_a_variable": (
        {"train.jsonl": _with_bad(_chat_with(role="assistant", content="x")),
         "t.jinja": "{{ date_string }}{% for m in messages %}{{ m.content }}{% endfor %}"},
        {"chat_template": "{d}/t.jinja"},
        ["t.jinja: the chat template needs a variable kdjax does not give it",
         "date_string"]),
}


def _bad_run(tmp_path, name):
  files, overrides, expected = _CASES[name]
  d = tmp_path / name
  d.mkdir()
  for file, text in files.items():
    (d / file).write_text(text)
  overrides = {"train_files": "{d}/train.jsonl", "data_dir": "{d}/dd", **overrides}
  args = [f"--config.data.{k}={v.format(d=d)}" for k, v in overrides.items()]
  out = _run(d / "workdir", *args, timeout=300)
  return out, [e.format(d=d) for e in expected], d / "workdir"


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    runs = dict(zip(_CASES, pool.map(lambda n: _bad_run(tmp_path, n), _CASES)))
  for name, (out, expected, workdir) in runs.items():
    errors = [line for line in out.stderr.splitlines() if line.startswith("kdjax: error:")]
    assert out.returncode == 2 and len(errors) == 1, (name, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, (name, out.stderr[-2000:])
    for part in expected:
      assert part in errors[0], (name, part, errors[0])
    assert not os.path.exists(workdir), name  # refused before the workdir was made


# ----------------------------------------------------------------- a Hugging Face chat template


def test_chat_files_with_a_model_template_count_exactly_transformers_assistant_tokens(tmp_path):
  """config -> inputs.prepare_data with a tokenizer directory whose template marks its answers
  for transformers ({% generation %}): the eval batches count exactly the tokens transformers'
  assistant mask marks, record after record across packed rows."""
  import transformers
  from configs import shakespeare
  from kdjax import inputs
  from support import chat_tokenizers
  from test_chat_template import QWEN25_MARKED

  chats = own_data.conversations(own_data.TRAIN_WORKS + own_data.EVAL_WORKS, chars=1500)
  texts = [m["content"] for c in chats for m in c["messages"]]
  tok_dir = chat_tokenizers.build(str(tmp_path / "tok"), "qwen", QWEN25_MARKED,
                                  in_jinja_file=True, extra_text=texts)
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  train = own_data.write_jsonl(str(tmp_path / "train.jsonl"), chats[10:])
  evals = own_data.write_jsonl(str(tmp_path / "eval.jsonl"), chats[:10])
  config = shakespeare.get_config("smoke")
  config.data.update(dict(train_files=train, eval_files=evals, val_files=evals,
                          tokenizer_path=tok_dir, data_dir=str(tmp_path / "dd"),
                          eval_batches=100))
  config.data.vocab_size = len(theirs)  # the models' vocabularies follow
  data = inputs.prepare_data(config)
  counted = np.concatenate([b["targets"][b["mask"] != 0] for b in data.eval_batches])
  expected = []
  for chat in chats[:10]:
    out = theirs.apply_chat_template(chat["messages"], return_dict=True,
                                     return_assistant_tokens_mask=True)
    ids, marks = np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"])
    expected.append(ids[1:][marks[1:] == 1])
  np.testing.assert_array_equal(counted, np.concatenate(expected))
