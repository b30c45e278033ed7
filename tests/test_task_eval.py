"""Tests for kdjax.task_eval: answer extraction, exact-match scores and the extractor check.

Expected values are written by hand from how a reader would read each crafted answer, or follow
from the construction of the case (how many items the teacher gets wrong, how many the student
copies), never from running the code under test.
"""

import math

import pytest

from kdjax import task_eval
from kdjax.task_eval import extract, score

WORKED = "320 + 270 = 590. The answer is 590."


@pytest.mark.parametrize("text, expected", [
    ("320 + 270 = 590", "590"),
    (WORKED, "590"),
    ("so the total is 590.", "590"),         # a sentence-final period is not a decimal point
    ("they sold 1,200 cookies", "1200"),       # thousands separators
    ("1,234,567 grains", "1234567"),
    ("it costs 590.0", "590"),                 # trailing zeros of a decimal
    ("it costs 3.50 dollars", "3.5"),
    ("the change is -4", "-4"),
    ("7 - 2 = 5, not 7-2", "2"),               # a minus between numbers is not a sign
    ("answer: 007", "7"),
    ("3 apples then 4 pears, so 12 in all?", "12"),
    ("no digits here", None),
    ("", None),
])
def test_last_number(text, expected):
  assert extract(text, "last_number") == expected


@pytest.mark.parametrize("text, expected", [
    (WORKED, "590"),
    ("The answer is 1,200.", "1200"),
    ("The answer is 590.0", "590"),
    ("The answer is Paris.", "Paris"),
    ("The answer is: 42", "42"),
    # The last marker, up to the end of its line.
    ("The answer is 3. Wait. The answer is 4.\nThe end", "4"),
    ("The answer is 12 apples.", "12 apples"),                  # not a number: kept as written
    ("320 + 270 = 590.", None),                                 # no marker
    ("The answer is", None),                                    # nothing after it
    ("The answer is .\nthen 5", None),
])
def test_after_marker(text, expected):
  assert extract(text, "after_marker") == expected


def test_after_marker_reads_the_given_marker():
  assert extract("#### 72", "after_marker", marker="####") == "72"
  assert extract("#### 72", "after_marker") is None


@pytest.mark.parametrize("text, expected", [
    ("  Paris. ", "Paris"),
    ("New\n  York   City.", "New York City"),
    ("   ", None),
    (".", None),
])
def test_whole(text, expected):
  assert extract(text, "whole") == expected


def test_unknown_extractor_names_the_valid_ones():
  with pytest.raises(ValueError) as error:
    extract("5", "first_number")
  assert all(name in str(error.value) for name in task_eval.EXTRACTORS)


def test_score_counts_right_wrong_and_unanswered():
  references = ["The answer is 1.", "The answer is 2.", "The answer is 3.", "The answer is 4."]
  predictions = ["1 + 0 = 1. The answer is 1.", "The answer is 5.", "I do not know", "4"]
  # Items 0 and 3 right (the last number of "4" is 4), 1 wrong, 2 without a number.
  scores = score(predictions, references, extractor="last_number")
  assert scores == {"exact_match": 0.5, "answered": 0.75, "n": 4}
  # after_marker finds no answer in "I do not know" nor in "4": only item 0 is right.
  scores = score(predictions, references, extractor="after_marker")
  assert scores == {"exact_match": 0.25, "answered": 0.5, "n": 4}


def test_no_answer_is_wrong_even_when_the_reference_has_none():
  scores = score(["no idea"], ["no number either"], extractor="last_number")
  assert scores["exact_match"] == 0.0


def test_teacher_scores_by_construction():
  references = ["The answer is 10.", "The answer is 20.", "The answer is 30.", "The answer is 40."]
  # The teacher is right on items 0 and 1, wrong on 2 (says 31) and 3 (says 41).
  teacher = ["The answer is 10.", "The answer is 20.", "The answer is 31.", "The answer is 41."]
  # The student is right on 0, wrong on 1, copies the teacher's mistake on 2, is right on 3.
  student = ["The answer is 10.", "The answer is 21.", "The answer is 31.", "The answer is 40."]
  scores = score(student, references, extractor="after_marker", teacher_predictions=teacher)
  assert scores["exact_match"] == 0.5
  assert scores["teacher_agreement"] == 0.5   # items 0 and 2
  assert scores["teacher_wrong"] == 2
  assert scores["error_copying"] == 0.5       # copies 1 of the teacher's 2 mistakes


def test_a_teacher_without_answer_is_wrong_and_cannot_be_copied():
  references = ["The answer is 1.", "The answer is 2."]
  teacher = ["The answer is 1.", "no idea"]
  student = ["The answer is 1.", "still no idea"]
  scores = score(student, references, extractor="after_marker", teacher_predictions=teacher)
  assert scores["teacher_wrong"] == 1
  assert scores["error_copying"] == 0.0
  assert scores["teacher_agreement"] == 0.5  # two missing answers do not agree


@pytest.mark.parametrize("extractor", task_eval.EXTRACTORS)
def test_references_score_perfectly_against_themselves(extractor):
  references = [WORKED, "The answer is 1,200.", "12 - 5 = 7. The answer is 7."]
  scores = score(references, references, extractor=extractor, teacher_predictions=references)
  assert scores["exact_match"] == 1.0
  assert scores["answered"] == 1.0
  assert scores["teacher_agreement"] == 1.0
  assert scores["teacher_wrong"] == 0
  assert math.isnan(scores["error_copying"])  # a teacher that is never wrong has no mistake to copy


def test_formatting_does_not_decide_correctness():
  references = ["The answer is 1200.", "The answer is 3.5."]
  predictions = ["The answer is 1,200", "The answer is 3.50."]
  for extractor in ("last_number", "after_marker"):
    assert score(predictions, references, extractor=extractor)["exact_match"] == 1.0


def test_score_refuses_mismatched_or_empty_inputs():
  with pytest.raises(ValueError, match="one entry per item"):
    score(["1", "2"], ["1"], extractor="last_number")
  with pytest.raises(ValueError, match="teacher_predictions"):
    score(["1"], ["1"], extractor="last_number", teacher_predictions=["1", "2"])
  with pytest.raises(ValueError, match="empty"):
    score([], [], extractor="last_number")


def test_check_extractor_refuses_a_marker_that_matches_nothing():
  references = ["320 + 270 = 590. The answer is 590.\n", "1 + 1 = 2. The answer is 2."]
  with pytest.raises(ValueError) as error:
    task_eval.check_extractor(references, "after_marker", "####", where="data/test.jsonl")
  message = str(error.value)
  assert "\n" not in message
  for part in ("task.extractor='after_marker'", "task.marker='####'", "data/test.jsonl",
               "2 reference answers", "320 + 270"):
    assert part in message


def test_check_extractor_names_the_config_group_given():
  with pytest.raises(ValueError, match=r"eval\.extractor='last_number'"):
    task_eval.check_extractor(["no numbers"], "last_number", where="val", prefix="eval")


def test_check_extractor_counts_partial_misses():
  references = ["The answer is 5.", "5", "The answer is 6."]
  assert task_eval.check_extractor(references, "after_marker", where="val") == 1
  assert task_eval.check_extractor(references, "last_number", where="val") == 0


def test_check_extractor_refuses_an_unknown_extractor_by_field():
  with pytest.raises(ValueError, match=r"task\.extractor='regex'"):
    task_eval.check_extractor(["5"], "regex", where="val")
