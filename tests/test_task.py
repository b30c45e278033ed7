"""Task distillation end to end (kdjax.task, configs/word_problems.py): every model's answers
scored, the summary and speed written, the table printed; bad task input refused in one line
before any compile work."""

import json
import os

import pytest

from configs import word_problems
from kdjax import preflight, task
from kdjax.config_check import ConfigError
from kdjax.data.records import DataError


def _config(tmp_path, **task_overrides):
  config = word_problems.get_config("smoke")
  config.data.data_dir = str(tmp_path / "data")
  config.task.update(task_overrides)
  return config


def test_an_extractor_that_matches_no_reference_is_refused_before_any_work(tmp_path):
  config = _config(tmp_path, marker="Final:")
  with pytest.raises(ValueError) as e:
    task.prepare(config)
  message = str(e.value)
  assert "task.extractor" in message and "Final:" in message and "\n" not in message


def test_a_prompt_longer_than_the_models_is_refused_with_its_place(tmp_path):
  config = _config(tmp_path, max_new_tokens=250)  # prompts + 250 new tokens > max_len 256
  with pytest.raises(DataError) as e:
    task.prepare(config)
  assert "max_len=256" in str(e.value) and ".jsonl:" in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_task_settings_are_refused_in_one_line(tmp_path):
  config = _config(tmp_path, mix_weight=1.0)
  with pytest.raises(ConfigError, match=r"config\.task\.mix_weight"):
    task.preflight(config, str(tmp_path / "w"))
  config = _config(tmp_path)
  config.distill.cache_estimator = "sampled"
  with pytest.raises(ConfigError, match="cache_estimator"):
    task.preflight(config, str(tmp_path / "w"))


def test_a_changed_setting_refuses_to_resume_exactly_the_phases_it_alters(tmp_path):
  """A task run resumed with other settings: each phase whose math the change alters is refused
  in one line naming the field; the others resume; scoring settings alter no phase."""
  saved = json.loads(_config(tmp_path).to_json())
  changes = {  # field -> the phases it alters
      ("student_train", "learning_rate"): set(task.STUDENTS),
      ("teacher_train", "steps"): {"teacher", "seq", "logits", "mixed"},
      ("task", "record_topk"): {"logits", "mixed"},
      ("task", "mix_weight"): {"mixed"},
      ("distill", "alpha"): {"logits", "mixed"},
      ("task_data", "seed"): {"teacher", *task.STUDENTS},
      ("task", "speed_runs"): set(),
      ("task", "extractor"): set(),
  }
  for (section, field), altered in changes.items():
    current = json.loads(json.dumps(saved))
    value = current[section][field]
    current[section][field] = value + 1 if isinstance(value, (int, float)) else value + "x"
    refused = set()
    for phase in ("teacher",) + task.STUDENTS:
      try:
        preflight.check_resume(saved, current, phase, f"w/{phase}")
      except ConfigError as e:
        assert f"{section}.{field}" in str(e) and "\n" not in str(e)
        refused.add(phase)
    assert refused == altered, (section, field)


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_smoke_run_writes_the_summary_speed_and_predictions_and_eval_repeats_it(tmp_path,
                                                                              capsys):
  config = _config(tmp_path)
  workdir = str(tmp_path / "run")
  task.preflight(config, workdir)
  summary = task.run(config, workdir)
  models = ["teacher", *task.STUDENTS]
  assert list(summary) == models
  for name in models:
    m = summary[name]
    assert {"exact_match", "params", "answered", "accuracy_kept"} <= set(m)
    assert 0 <= m["exact_match"] <= 1
    if name != "teacher":
      assert 0 <= m["teacher_agreement"] <= 1
  assert summary["labelled"]["params"] * 3 < summary["teacher"]["params"]
  speed = json.load(open(os.path.join(workdir, "speed.json")))
  for arch in ("teacher", "student"):
    for b in ("1", "8"):
      assert speed[arch][b]["new_tokens_per_s"] > 0 and speed[arch][b]["ms_per_token"] > 0
  out = capsys.readouterr().out
  assert "answers + logits + labelled" in out and "faster" in out
  with open(os.path.join(workdir, "answers", "answers.jsonl")) as f:
    assert sum(1 for _ in f) == config.task_data.sizes["prompts"]
  first = open(os.path.join(workdir, "summary.json")).read()
  config.mode = "eval"  # the checkpoints scored again: the same bytes
  task.run(config, workdir)
  assert open(os.path.join(workdir, "summary.json")).read() == first
  for name in models:
    lines = open(os.path.join(workdir, "predictions", f"{name}.jsonl")).read().splitlines()
    assert len(lines) == config.task_data.sizes["test"]
