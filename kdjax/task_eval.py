"""Task accuracy of generated answers: extract the answer a model gave, compare by exact match.

A generated text is reduced to one normalized answer string by an extractor, and so is the
reference; an item is right when both are equal and the prediction gave an answer at all.

  last_number   the last number in the text ("... = 590. The answer is 590." -> "590")
  after_marker  what follows the last `marker` on its line ("The answer is 1,200." -> "1200")
  whole         the whole text, whitespace collapsed ("Paris." -> "Paris")

Numbers are normalized so that formatting does not decide correctness: thousands separators and
leading zeros are dropped, and so are a decimal's trailing zeros ("590.0" -> "590",
"3.50" -> "3.5").

Against a teacher's generated answers, `score` also says how often the model agrees with the
teacher and how often it copies the teacher's mistakes (the distillation question: does the
student learn the teacher's errors along with its knowledge?).

Pure Python: nothing here runs a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

EXTRACTORS = ("last_number", "after_marker", "whole")
DEFAULT_MARKER = "The answer is"

# A number: grouped thousands ("1,200", only groups of exactly three digits) or plain digits, with
# an optional fraction. The fraction needs a digit after the point, so a sentence-final period is
# not one ("is 590." -> "590"). A minus counts only where it cannot be a binary minus ("7-2").
_NUMBER = re.compile(
    r"(?:(?<![\w.-])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_WHOLE_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_PREVIEW_CHARS = 60


def normalize_number(token: str) -> str:
  """A number token in one canonical spelling: no separators, leading or trailing zeros, or '-0'."""
  sign = "-" if token.startswith("-") else ""
  whole, _, fraction = token.lstrip("-").replace(",", "").partition(".")
  whole = whole.lstrip("0") or "0"
  fraction = fraction.rstrip("0")
  digits = f"{whole}.{fraction}" if fraction else whole
  return digits if digits == "0" else sign + digits


def _strip_sentence(text: str) -> str:
  return text.strip().rstrip(".").strip()


def _last_number(text: str) -> str | None:
  matches = _NUMBER.findall(text)
  return normalize_number(matches[-1]) if matches else None


def _after_marker(text: str, marker: str) -> str | None:
  at = text.rfind(marker)
  if not marker or at < 0:
    return None
  line = text[at + len(marker):].split("\n", 1)[0]
  # "The answer is: 590" is the same answer as "The answer is 590".
  answer = _strip_sentence(line.lstrip().removeprefix(":"))
  if _WHOLE_NUMBER.fullmatch(answer):
    return normalize_number(answer)
  return answer or None


def _whole(text: str) -> str | None:
  return _strip_sentence(" ".join(text.split())) or None


def _check_name(extractor: str) -> None:
  if extractor not in EXTRACTORS:
    raise ValueError(f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}.")


def extract(text: str, extractor: str, marker: str = DEFAULT_MARKER) -> str | None:
  """The answer a text gives, normalized for exact match, or None when the extractor finds none.

  Args:
    text: a generated (or reference) answer.
    extractor: one of EXTRACTORS.
    marker: the phrase that introduces the answer; only `after_marker` reads it.

  Raises:
    ValueError: for an extractor not in EXTRACTORS.
  """
  _check_name(extractor)
  if extractor == "last_number":
    return _last_number(text)
  if extractor == "after_marker":
    return _after_marker(text, marker)
  return _whole(text)


def _fraction(flags: Sequence[bool]) -> float:
  return sum(flags) / len(flags) if flags else math.nan


def _teacher_scores(preds: list[str | None], refs: list[str | None],
                    teachers: list[str | None]) -> dict[str, float | int]:
  agree = [p is not None and p == t for p, t in zip(preds, teachers)]
  wrong = [i for i, (t, r) in enumerate(zip(teachers, refs)) if t is None or t != r]
  # Copying needs an answer to copy: where the teacher gave none, the student cannot copy it.
  copied = [teachers[i] is not None and preds[i] == teachers[i] for i in wrong]
  return {"teacher_agreement": _fraction(agree), "teacher_wrong": len(wrong),
          "error_copying": _fraction(copied)}


def score(predictions: Sequence[str], references: Sequence[str], *, extractor: str,
          marker: str = DEFAULT_MARKER,
          teacher_predictions: Sequence[str] | None = None) -> dict[str, float | int]:
  """Exact-match scores of generated answers against references (and against a teacher's).

  Args:
    predictions: the model's generated answers, one per item.
    references: the reference answers, one per item, read with the same extractor.
    extractor: one of EXTRACTORS.
    marker: the phrase `after_marker` looks for.
    teacher_predictions: the teacher's generated answers to the same items, if any.

  Returns:
    exact_match: fraction of items whose answer equals the reference's (no answer is wrong).
    answered: fraction of predictions the extractor finds an answer in.
    n: number of items.
    With teacher_predictions, also:
    teacher_agreement: fraction of items where the model and the teacher give the same answer.
    teacher_wrong: how many items the teacher gets wrong (no answer counts as wrong).
    error_copying: among the items the teacher gets wrong, the fraction where the model gives
      exactly the teacher's wrong answer; NaN (float('nan')) when the teacher is never wrong, as
      there is then no mistake to copy.

  Raises:
    ValueError: when the sequences differ in length, are empty, or the extractor is unknown.
  """
  _check_name(extractor)
  lengths = {len(predictions), len(references)}
  if teacher_predictions is not None:
    lengths.add(len(teacher_predictions))
  if len(lengths) != 1:
    raise ValueError(f"predictions ({len(predictions)}), references ({len(references)})"
                     + ("" if teacher_predictions is None
                        else f" and teacher_predictions ({len(teacher_predictions)})")
                     + " must have one entry per item.")
  if not predictions:
    raise ValueError("no items to score: predictions and references are empty.")
  preds = [extract(p, extractor, marker) for p in predictions]
  refs = [extract(r, extractor, marker) for r in references]
  scores: dict[str, float | int] = {
      "exact_match": _fraction([p is not None and p == r for p, r in zip(preds, refs)]),
      "answered": _fraction([p is not None for p in preds]),
      "n": len(preds),
  }
  if teacher_predictions is not None:
    teachers = [extract(t, extractor, marker) for t in teacher_predictions]
    scores.update(_teacher_scores(preds, refs, teachers))
  return scores


def check_extractor(references: Sequence[str], extractor: str, marker: str = DEFAULT_MARKER,
                    where: str = "the references", *, prefix: str = "task") -> int:
  """Refuses an extractor that finds no answer in any reference; returns how many it misses.

  Scoring with such an extractor would report an accuracy of zero for every model, so the run
  stops before generating anything. Missing only some references is allowed.

  Args:
    references: the reference answers of the eval set.
    extractor: one of EXTRACTORS.
    marker: the phrase `after_marker` looks for.
    where: names the references in the message (a file, a split).
    prefix: the config group of the `extractor` and `marker` fields, named in the message.

  Raises:
    ValueError: in one line naming the config field and the fix.
  """
  if extractor not in EXTRACTORS:
    raise ValueError(f"{prefix}.extractor={extractor!r} is not an extractor; choose one of "
                     f"{', '.join(EXTRACTORS)}.")
  if not references:
    raise ValueError(f"{where} has no reference answers to check {prefix}.extractor against.")
  missed = sum(extract(r, extractor, marker) is None for r in references)
  if missed < len(references):
    return missed
  setting = f"{prefix}.extractor={extractor!r}"
  fix = "choose another extractor"
  if extractor == "after_marker":
    setting += f" with {prefix}.marker={marker!r}"
    fix += " or marker"
  first = references[0][:_PREVIEW_CHARS] + ("..." if len(references[0]) > _PREVIEW_CHARS else "")
  # repr() escapes newlines, so the message stays on one line.
  raise ValueError(f"{setting} finds no answer in any of the {len(references)} reference answers "
                   f"of {where} (first: {first!r}); {fix}.")
