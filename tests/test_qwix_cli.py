"""Quantized and LoRA students from the command line, on the smoke config: train, evaluate,
resume, export (scripts/convert.py's functions) and load the export back for sampling."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import checkpoint, experiment, lora, quantize, sample, settings, sharding
from support import scripts_loader
from support.scripts_loader import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # whole runs in subprocesses: full suite only


def _run(*args, timeout=900):
  out = subprocess.run([sys.executable, "-m", "kdjax.main", *args], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _main(workdir, *args):
  return _run("--config=configs/shakespeare.py:smoke", f"--workdir={workdir}",
              "--config.progress_bar=False", *args)


def _convert():
  return scripts_loader.load("convert")  # in this process: no second JAX start-up


def test_int4_and_lora_students_train_evaluate_and_export(tmp_path):
  q_dir, l_dir = tmp_path / "int4", tmp_path / "lora"
  _main(q_dir, "--config.student_quant.weight=int4")
  teacher = f"--config.teacher_checkpoint={q_dir}/teacher/checkpoints"
  _main(l_dir, "--config.student_lora.rank=8", teacher)
  q_summary = json.loads((q_dir / "summary.json").read_text())
  l_summary = json.loads((l_dir / "summary.json").read_text())
  # int4 kernels: the students' weights take fewer bytes than the same model in float32.
  for name in ("distilled", "scratch"):
    assert q_summary[name]["weight_bytes"] < 4 * q_summary[name]["params"]
    assert l_summary[name]["weight_bytes"] == 4 * l_summary[name]["params"]
    assert np.isfinite(q_summary[name]["ppl"]) and np.isfinite(l_summary[name]["ppl"])

  # A LoRA phase's checkpoints hold the adapters alone.
  ckpts = l_dir / "distilled" / "checkpoints"
  step_dir = ckpts / str(checkpoint.best_step(str(ckpts)))
  meta = ocp.StandardCheckpointer().metadata(str(step_dir / "params"))
  names = [p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(
      meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta)[0]]
  assert names and all(n.endswith(lora.SUFFIXES) for n in names), names

  # Quantized export: int4 arrays on disk, loaded back, sampling the same tokens as the
  # checkpoint's float params under the same quantization.
  src = q_dir / "distilled" / "checkpoints"
  _convert().quantize_export(str(src), str(tmp_path / "q"), "", None)
  q_cfg, q_params = quantize.load(str(tmp_path / "q"))
  assert q_params["layer_0"]["mlp"]["up"]["kernel"].array.qvalue.dtype == jnp.int4
  run = ml_collections.ConfigDict(checkpoint.saved_config(str(src)))
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  float_params = experiment.load_student(run, str(src), mesh, sharding.DEFAULT_RULES,
                                         checkpoint.best_step(str(src)))
  prompt = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
  a = sample.generate(q_cfg, q_params, prompt, max_new_tokens=8)
  b = sample.generate(settings.student_model(run), float_params, prompt, max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A LoRA run resumed from an earlier checkpoint (its base rebuilt, not read) ends with the
  # adapters of the uninterrupted run, bit for bit.
  resumed = tmp_path / "resumed"
  shutil.copytree(l_dir, resumed)
  kept = sorted(int(p) for p in os.listdir(resumed / "scratch" / "checkpoints") if p.isdigit())
  shutil.rmtree(resumed / "scratch" / "checkpoints" / str(kept[-1]))
  out = _main(resumed, "--config.student_lora.rank=8", teacher, "--config.mode=scratch")
  assert f"resuming from step {kept[-2]}" in out.stderr
  restore = lambda d: ocp.StandardCheckpointer().restore(
      str(d / "scratch" / "checkpoints" / str(kept[-1]) / "params"))
  jax.tree.map(np.testing.assert_array_equal, restore(l_dir), restore(resumed))

  # The LoRA student's adapters alone, for PEFT.
  _convert().orbax_to_hf(str(ckpts), str(tmp_path / "peft"), "student", "", "", "",
                         lora_export="peft")
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["r"] == 8 and config["peft_type"] == "LORA"
  assert os.path.getsize(tmp_path / "peft" / "adapter_model.safetensors") > 0
