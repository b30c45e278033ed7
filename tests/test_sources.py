"""Your own data: files and Hugging Face datasets read as the same records, held-out splits by
content, the three record formats, and which tokens each format's loss counts."""

import gzip
import json
import os

import numpy as np
import pytest

from kdjax.data import chat_template, encoding, records, sources
from kdjax.data import tokenizer as tokenizer_lib
from support import own_data

ROWS = [
    {"text": "To be, or not to be: that is the question."},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Wer ist da? 你好 🙂"},
                  {"role": "assistant", "content": "Nay, answer me."}]},
    {"prompt": "2 + 2 =", "completion": " 4"},
    {"text": 'Quotes "inside", a\ttab and\na newline.'},
]


def _strip(rows):
  return [{k: v for k, v in r.items() if k != records.WHERE} for r in rows]


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def test_every_file_format_reads_the_same_records(tmp_path):
  jsonl = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n"
                 + "\n".join(json.dumps(r) for r in ROWS[2:]) + "\n")
  with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in ROWS))
  as_json = _write(tmp_path / "a.json", json.dumps(ROWS))
  for path in (jsonl, str(tmp_path / "a.jsonl.gz"), as_json):
    got = sources.read_files(path, "train_files")
    assert _strip(got[i] for i in range(len(got))) == ROWS, path
  # Line numbers count blank lines, so an error names the line an editor shows.
  got = sources.read_files(jsonl, "train_files")
  assert [got[i][records.WHERE] for i in range(4)] == [f"{jsonl}:{n}" for n in (1, 2, 4, 5)]
  # Parquet needs one schema per file: one format per file, as users write them.
  texts = [r for r in ROWS if "text" in r]
  pq = own_data.write_parquet(str(tmp_path / "t.parquet"), texts)
  got = sources.read_files(pq, "train_files")
  assert _strip(got[i] for i in range(len(got))) == texts
  chats = [ROWS[1]] * 3
  got = sources.read_files(own_data.write_parquet(str(tmp_path / "c.parquet"), chats), "x")
  assert _strip(got[i] for i in range(len(got))) == chats


def test_txt_records_by_line_paragraph_or_file(tmp_path):
  text = "First line\nsecond line\n\n\nThird\n  fourth\n"
  path = _write(tmp_path / "a.txt", text)
  read = lambda unit: [r["text"] for r in sources.read_files(path, "x", unit)]
  assert read("line") == ["First line", "second line", "Third", "  fourth"]
  assert read("paragraph") == ["First line\nsecond line", "Third\n  fourth"]
  assert read("file") == [text]
  assert sources.read_files(path, "x", "paragraph")[1][records.WHERE] == f"{path}:5"


def test_globs_and_directories_list_files_once_in_a_stable_order(tmp_path):
  for name in ("b-1.jsonl", "b-0.jsonl", "a.txt"):
    _write(tmp_path / name, '{"text": "x"}\n')
  spec = f"{tmp_path}/b-*.jsonl, {tmp_path}/b-0.jsonl"
  assert sources.expand(spec, "x") == [f"{tmp_path}/b-0.jsonl", f"{tmp_path}/b-1.jsonl"]
  assert sources.expand(str(tmp_path), "x") == sorted(
      os.path.join(tmp_path, n) for n in ("a.txt", "b-0.jsonl", "b-1.jsonl"))


def _records(rows, tmp_path, name):
  return sources.read_files(own_data.write_jsonl(str(tmp_path / name), rows), "train_files")


def test_held_out_records_are_chosen_by_content(tmp_path):
  rows = [{"text": t} for t in own_data.paragraphs(own_data.TRAIN_WORKS)]
  fractions = {"eval": 0.1, "val": 0.2}
  split = sources.hold_out(_records(rows, tmp_path, "a.jsonl"), {}, fractions)
  texts = {k: [r["text"] for r in v] for k, v in split.items()}
  assert sorted(sum(texts.values(), [])) == sorted(r["text"] for r in rows)  # a partition
  assert abs(len(texts["val"]) / len(rows) - 0.2) < 0.08
  assert abs(len(texts["eval"]) / len(rows) - 0.1) < 0.06
  # Another order, other files, and duplicates: each record lands on the side its content says.
  shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))] + rows[:20]
  again = sources.hold_out(sources.Records(
      [sources._read_file(own_data.write_jsonl(str(tmp_path / f"s{i}.jsonl"), part), "x", "line")
       for i, part in enumerate((shuffled[:100], shuffled[100:]))]), {}, fractions)
  for side in ("train", "eval", "val"):
    assert {r["text"] for r in again[side]} == set(texts[side]), side
  # A given split is kept; only the missing one is held out.
  given = _records(rows[:5], tmp_path, "val.jsonl")
  split = sources.hold_out(_records(rows, tmp_path, "a.jsonl"), {"val": given}, fractions)
  assert split["val"] is given and len(split["train"]) + len(split["eval"]) == len(rows)


def test_a_saved_dataset_and_a_folder_of_files_read_alike(tmp_path):
  saved = own_data.save_hf_dataset(str(tmp_path / "saved"))
  folder = tmp_path / "folder"
  for split, works in (("train", own_data.TRAIN_WORKS), ("test", own_data.EVAL_WORKS),
                       ("validation", own_data.VAL_WORKS)):
    own_data.write_jsonl(str(folder / f"{split}.jsonl"),
                         [{"text": t} for t in own_data.paragraphs(works)])
  a = sources.read_hf_dataset(saved, str(tmp_path / "cache"))
  b = sources.read_hf_dataset(str(folder), str(tmp_path / "cache"))
  assert sorted(a) == sorted(b) == ["test", "train", "validation"]
  for split in a:
    assert _strip(a[split]) == _strip(b[split]) == [
        {"text": t} for t in own_data.paragraphs(dict(
            train=own_data.TRAIN_WORKS, test=own_data.EVAL_WORKS,
            validation=own_data.VAL_WORKS)[split])]
  assert a["train"][3][records.WHERE] == f"{saved}[train] row 3"


def test_formats_are_detected_and_sharegpt_is_a_chat():
  detect = lambda r: records.detect(r, "text", "messages")
  assert [detect(r) for r in ROWS] == ["text", "chat", "prompt_completion", "text"]
  share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
  assert detect(share) == "chat"
  assert records.canonical(share, "chat", "text", "messages") == {"messages": [
      {"role": "system", "content": "s"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a"}]}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer(tokenizer_lib.train(own_data.paragraphs(own_data.TRAIN_WORKS),
                                                     400))


def _answers(encoder, record):
  """The answer tokens' text, one string per contiguous run."""
  ids, answers = encoder.ids_and_answers(record)
  runs, run = [], []
  for i, a in zip(ids, answers):
    if a:
      run.append(i)
    elif run:
      runs, run = runs + [run], []
  runs += [run] if run else []
  return [encoder.tokenizer.decode(r) + ("<eos>" if r[-1] == encoder.tokenizer.eos_id else "")
          for r in runs]


def test_text_counts_every_token_and_a_completion_only_itself(tok):
  text = encoding.Encoder("text", tok)({"text": "Good night, sweet prince"})
  ids = [tok.bos_id] + tok.encode("Good night, sweet prince") + [tok.eos_id]
  np.testing.assert_array_equal(text["inputs"], ids[:-1])
  np.testing.assert_array_equal(text["targets"], ids[1:])
  assert text["weights"].all()
  pc = encoding.Encoder("prompt_completion", tok)
  assert _answers(pc, {"prompt": "Good night,", "completion": " sweet prince"}) == [
      " sweet prince<eos>"]


def test_chat_answers_by_train_on(tok):
  chat = {"messages": [{"role": "user", "content": "Who is there?"},
                       {"role": "assistant", "content": "Nay, answer me"},
                       {"role": "user", "content": "Long live the king"},
                       {"role": "assistant", "content": "Bernardo?"}]}
  make = lambda on: encoding.Encoder("chat", tok, chat_template.BuiltinChat(tok), train_on=on)
  assert _answers(make("assistant"), chat) == ["Nay, answer me<eos>", "Bernardo?<eos>"]
  assert _answers(make("last_assistant"), chat) == ["Bernardo?<eos>"]
  ids, answers = make("all").ids_and_answers(chat)
  assert answers.all() and ids[0] == tok.bos_id
  # Message-list prompt and completion: the completion's turns are the answer.
  pc = encoding.Encoder("prompt_completion", tok, chat_template.BuiltinChat(tok))
  record = {"prompt": chat["messages"][:3], "completion": chat["messages"][3:]}
  assert _answers(pc, record) == ["Bernardo?<eos>"]
  assert pc.ids_and_answers(record)[0] == make("all").ids_and_answers(chat)[0]
