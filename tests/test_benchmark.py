"""scripts/benchmark.py: its FLOP count and its output (speed itself is measured, not tested)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import bench_cpu
from kdjax import flops
from kdjax.model import ModelConfig
from support import scripts_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
benchmark = scripts_loader.load("benchmark")


def test_flops_per_token_of_bench_cpu_by_hand():
  config = bench_cpu.get_config()
  s, t = ModelConfig.from_dict(config.student), ModelConfig.from_dict(config.teacher)
  # Per layer: q, k, v, out (4 d^2, no GQA) + gate, up, down (3 d f); plus the untied unembedding.
  n_s = 4 * (4 * 256**2 + 3 * 256 * 704) + 256 * 8192
  n_t = 8 * (4 * 512**2 + 3 * 512 * 1408) + 512 * 8192
  attention = 12 * 4 * 256 * 256 + 4 * 8 * 512 * 256  # student fwd+bwd, teacher fwd; L = 256
  assert flops.matmul_params(s) == n_s and flops.matmul_params(t) == n_t
  assert flops.flops_per_token(s, t, 256) == 6 * n_s + 2 * n_t + attention
  # A tied embedding is the unembedding too: counted once.
  tied = ModelConfig.from_dict({**config.student, "tie_embeddings": True})
  assert flops.matmul_params(tied) == n_s


@pytest.mark.slow
def test_benchmark_prints_its_figures_then_the_profile_then_the_peers():
  out = subprocess.run(
      [sys.executable, "scripts/benchmark.py", "--config=configs/shakespeare.py:smoke",
       "--steps=2", "--warmup=1", "--config.distill.loss_chunk_size=128", "--profile=4",
       "--peers=pytorch-eager"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=scripts_loader.subprocess_env(JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert len(lines) == 1 + 5 + 1  # kdjax, 4 instructions and their total, the peer
  row, profile, peer = lines[0], lines[1:6], lines[6]
  assert row["impl"] == "kdjax"
  # The profile: costliest first, each a real instruction of the step, the total row last.
  assert [p["ms"] for p in profile[:4]] == sorted((p["ms"] for p in profile[:4]), reverse=True)
  assert profile[4]["instruction"] == "(all instructions)" and profile[4]["ms"] >= profile[0]["ms"]
  assert any("dot" in p["what"] for p in profile[:4])  # matmuls lead even at smoke shapes
  # The peer ran the same shapes and its speed is compared with kdjax's.
  assert peer["impl"] == "pytorch-eager" and (peer["batch"], peer["seq_len"]) == (8, 64)
  assert peer["kdjax_speedup"] == pytest.approx(
      row["tokens_per_sec"] / peer["tokens_per_sec"], rel=1e-2)
  assert np.isfinite(peer["loss"])
  for key in ("tokens_per_sec", "step_ms", "flops_per_token", "achieved_flops", "peak_flops",
              "mfu", "peak_memory_bytes"):
    assert row[key] > 0, key
  assert row["tokens_per_sec"] == pytest.approx(8 * 64 / (row["step_ms"] / 1e3), rel=1e-2)
  assert row["mfu"] == pytest.approx(row["achieved_flops"] / row["peak_flops"], rel=1e-3)
  assert row["loss_chunk_size"] == 128


@pytest.mark.slow
def test_generate_prints_one_line_per_batch_with_the_peers_figures():
  """--generate --hf_peer on a tiny model: kdjax's and transformers' greedy tokens agree."""
  out = subprocess.run(
      [sys.executable, "scripts/benchmark.py", "--generate", "--hf_peer", "--gen_batches=1,3",
       "--steps=2", "--gen_vocab=256", "--gen_d_model=64", "--gen_layers=2", "--gen_heads=4",
       "--gen_kv_heads=2", "--gen_mlp=128", "--prompt_tokens=6", "--max_new_tokens=9"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=scripts_loader.subprocess_env(JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [row["batch"] for row in rows] == [1, 3]
  for row in rows:
    assert row["tokens_equal"] and row["max_new_tokens"] == 9
    for key in ("new_tokens_per_s", "ms_per_token", "hf_new_tokens_per_s", "hf_ms_per_token"):
      assert row[key] > 0, key
    assert row["ratio"] == pytest.approx(
        row["new_tokens_per_s"] / row["hf_new_tokens_per_s"], rel=0.02)


def test_peers_get_the_configs_shapes_and_settings():
  config = bench_cpu.get_config()
  s, t = ModelConfig.from_dict(config.student), ModelConfig.from_dict(config.teacher)
  spec = benchmark.peers_run.spec_from_config(config, s, t)
  assert (spec["vocab"], spec["seq_len"], spec["batch"]) == (8192, 256, 8)
  assert spec["teacher"]["d_model"] == 512 and spec["student"]["num_layers"] == 4
  assert spec["teacher"]["head_dim"] == 64 and not spec["student"]["tie_embeddings"]
  assert (spec["temperature"], spec["alpha"]) == (2.0, 0.5)
  assert spec["optimizer"]["learning_rate"] == config.student_train.learning_rate


def test_a_missing_tunix_venv_is_named_with_the_fix():
  config = bench_cpu.get_config()
  spec = benchmark.peers_run.spec_from_config(
      config, ModelConfig.from_dict(config.student), ModelConfig.from_dict(config.teacher))
  with pytest.raises(ValueError, match="--tunix_python: .*requirements-tunix-peer.txt"):
    benchmark.peers_run.command("tunix", spec, 1, 0, "float32", "/nonexistent/python")
  with pytest.raises(ValueError, match="--peers: unknown 'jax'"):
    benchmark.peers_run.command("jax", spec, 1, 0, "float32", None)


def test_peers_refuse_a_model_they_do_not_build():
  config = bench_cpu.get_config()
  s = ModelConfig.from_dict({**config.student, "qk_norm": True})
  with pytest.raises(ValueError, match="--peers: config.student.qk_norm=True"):
    benchmark.peers_run.spec_from_config(config, s, ModelConfig.from_dict(config.teacher))
