"""Tests for kdjax.data.word_problems: right answers, disjoint splits, determinism, cached files.

Answers are checked by re-reading the completion's equations with a regex and computing them in
Python, and by tying the equations' operands back to the numbers in the prompt.
"""

import collections
import json
import operator
import os
import re

import pytest

from kdjax.data import word_problems as wp

SIZES = {"teacher": 3000, "labelled": 100, "prompts": 600, "val": 150, "test": 300}
HELD_OUT = ("val", "test")
_EQUATION = re.compile(r"(\d+) ([+x-]) (\d+) = (\d+)\.")
_APPLY = {"+": operator.add, "-": operator.sub, "x": operator.mul}


@pytest.fixture(scope="module")
def splits():
  return wp.make_splits(SIZES, seed=0)


def _records(splits):
  return [record for records in splits.values() for record in records]


def _check_worked_answer(record):
  """The completion's equations hold, chain, use the prompt's numbers and end in the answer."""
  equations = [tuple(m) for m in _EQUATION.findall(record["completion"])]
  assert equations, record
  operands, previous = [], None
  for a, op, b, result in equations:
    assert _APPLY[op](int(a), int(b)) == int(result), record
    if previous is None:
      operands += [a, b]
    else:  # a later step starts from the previous result
      assert a == previous, record
      operands.append(b)
    previous = result
  assert int(previous) >= 0
  assert sorted(re.findall(r"\d+", record["prompt"])) == sorted(operands), record
  stated = re.search(r"The answer is (\d+)\.$", record["completion"])
  assert stated and stated.group(1) == previous == record["answer"], record


def test_every_answer_matches_its_worked_equations(splits):
  for record in _records(splits):
    _check_worked_answer(record)


def test_records_have_one_shape(splits):
  for record in _records(splits):
    assert set(record) == {"prompt", "completion", "answer", "id"}
    assert all(isinstance(value, str) and value for value in record.values())
    assert "," not in record["completion"]  # no thousands separators


def test_id_names_template_and_prompt_numbers(splits):
  for record in _records(splits):
    template, *numbers = record["id"].split(":")
    assert template in {f"t{i}" for i in range(len(wp.TEMPLATES))}
    assert sorted(numbers) == sorted(re.findall(r"\d+", record["prompt"]))


def test_sizes_are_honoured(splits):
  assert {name: len(records) for name, records in splits.items()} == SIZES


def test_held_out_problems_are_distinct_and_in_no_other_split(splits):
  for name in HELD_OUT:
    ids = [record["id"] for record in splits[name]]
    assert len(ids) == len(set(ids))
    elsewhere = {r["id"] for other, records in splits.items() if other != name for r in records}
    assert not elsewhere & set(ids)
  for records in splits.values():  # a training split repeats a problem only in other words
    prompts = [record["prompt"] for record in records]
    assert len(prompts) == len(set(prompts))


def test_held_out_prompts_never_appear_in_training_splits(splits):
  training = {record["prompt"] for name, records in splits.items() if name not in HELD_OUT
              for record in records}
  for name in HELD_OUT:
    assert not training & {record["prompt"] for record in splits[name]}


def test_a_problem_keeps_its_split_under_another_seed(splits):
  """Held out under one seed is never trained on under another: the split follows the identity."""
  other = wp.make_splits(SIZES, seed=1)
  split_of = {record["id"]: name for name, records in splits.items() for record in records}
  shared = [(split_of[r["id"]], name) for name, records in other.items() for r in records
            if r["id"] in split_of]
  assert shared  # the check below would pass vacuously otherwise
  # A held-out identity stays in its split; training identities may move between training splits.
  kind = lambda name: name if name in HELD_OUT else "training"
  assert all(kind(first) == kind(second) for first, second in shared)
  assert any(kind(first) != "training" for first, _ in shared)


def test_test_split_covers_every_template_and_operation(splits):
  used = {int(record["id"].split(":")[0][1:]) for record in splits["test"]}
  assert used == set(range(len(wp.TEMPLATES)))
  assert {t.op for t in wp.TEMPLATES} == set(wp.OPERATIONS)
  assert len(wp.TEMPLATES) >= 8


def test_same_seed_same_records_other_seed_other_records(splits):
  assert wp.make_splits(SIZES, seed=0) == splits
  assert wp.make_splits(SIZES, seed=1)["test"] != splits["test"]


def test_ranges_bound_the_numbers():
  records = _records(wp.make_splits({"train": 400, "test": 100}, seed=3, max_operand=20,
                                    max_multiplier=3, max_multiplicand=5))
  for record in records:
    _check_worked_answer(record)
    op = wp.TEMPLATES[int(record["id"].split(":")[0][1:])].op
    numbers = [int(n) for n in record["id"].split(":")[1:]]
    if op == "x":
      assert 2 <= numbers[0] <= 3 and 2 <= numbers[1] <= 5
    else:
      assert all(1 <= n <= 20 for n in numbers)


def test_ranges_too_small_for_the_sizes_are_refused():
  # Two x templates of 1 x 1 problems each (multiplier 2, multiplicand 2) and tiny +/- ranges:
  # far fewer distinct problems than a held-out split asks for.
  with pytest.raises(ValueError, match="too few distinct problems"):
    wp.make_splits({"test": 500}, seed=0, max_operand=2, max_multiplier=2, max_multiplicand=2)


def test_bad_sizes_and_ranges_are_refused():
  with pytest.raises(ValueError, match="non-negative"):
    wp.make_splits({"train": -1}, seed=0)
  with pytest.raises(ValueError, match="max_operand"):
    wp.make_splits({"train": 1}, seed=0, max_operand=1)
  with pytest.raises(TypeError):
    wp.make_splits({"train": 1}, seed=0, max_number=5)


def test_write_jsonl_writes_one_object_per_line(tmp_path, splits):
  path = str(tmp_path / "val.jsonl")
  wp.write_jsonl(splits["val"], path)
  with open(path, encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == splits["val"]
  assert os.listdir(tmp_path) == ["val.jsonl"]  # no temporary file left behind


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_write_splits_reuses_matching_files_and_rewrites_others(tmp_path):
  sizes = {"train": 50, "test": 20}
  directory = str(tmp_path / "problems")
  paths = wp.write_splits(directory, sizes, seed=0)
  assert paths == {name: os.path.join(directory, f"{name}.jsonl") for name in sizes}
  assert {name: _read(path) for name, path in paths.items()} == wp.make_splits(sizes, seed=0)

  # Same settings: the files are reused, not rewritten (a marker written into one survives).
  with open(paths["test"], "a", encoding="utf-8") as f:
    f.write('{"marker": true}\n')
  wp.write_splits(directory, sizes, seed=0)
  assert _read(paths["test"])[-1] == {"marker": True}

  # Another seed, or other ranges: rewritten.
  wp.write_splits(directory, sizes, seed=1)
  assert _read(paths["test"]) == wp.make_splits(sizes, seed=1)["test"]
  wp.write_splits(directory, sizes, seed=1, max_operand=50)
  assert _read(paths["test"]) == wp.make_splits(sizes, seed=1, max_operand=50)["test"]


def test_write_splits_rewrites_when_a_split_file_is_missing(tmp_path):
  sizes = {"train": 30, "test": 10}
  paths = wp.write_splits(str(tmp_path), sizes, seed=0)
  os.remove(paths["train"])
  wp.write_splits(str(tmp_path), sizes, seed=0)
  assert _read(paths["train"]) == wp.make_splits(sizes, seed=0)["train"]


def test_templates_fill_their_slots():
  """Every template uses both numbers it is given, and the + then - ones all three."""
  needed = {"+": 2, "-": 2, "x": 2, "+-": 3}
  for template in wp.TEMPLATES:
    slots = re.findall(r"\{(\w+)\}", template.prompt)
    assert collections.Counter(s for s in slots if s in "abc") == collections.Counter(
        "abc"[:needed[template.op]])
