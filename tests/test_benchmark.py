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


matmul_shapes = scripts_loader.load("matmul_shapes")


def test_matmul_shapes_lists_every_matmul_of_the_bench_cpu_step_by_hand():
  shapes = {(m, k, n): (roles, per_step)
            for roles, m, k, n, per_step in matmul_shapes.step_shapes(bench_cpu.get_config())}
  t = 8 * 256  # tokens of a step; the loss works on 8 chunks of 256 of them
  # Per layer: q, k, v and out; gate and up; down. Teacher: 8 layers, forward only (frozen).
  teacher = {(t, 512, 512): 4 * 8, (t, 512, 1408): 2 * 8, (t, 1408, 512): 8}
  # Student: 4 layers, each weight's forward, dX = dY W^T and dW = X^T dY.
  student = {(t, 256, 256): 2 * 4 * 4, (256, t, 256): 4 * 4,
             (t, 256, 704): (2 + 1) * 4, (t, 704, 256): (1 + 2) * 4,
             (256, t, 704): 2 * 4, (704, t, 256): 4}
  loss = {(256, 512, 8192): 8, (256, 256, 8192): 8 + 8, (256, 8192, 256): 8}  # and dW, dX
  expected = {(2048, 2048, 2048): 0, **teacher, **student, **loss}
  assert {mkn: per_step for mkn, (_, per_step) in shapes.items()} == expected
  assert shapes[(t, 512, 512)][0] == "teacher qkv, teacher out"
  assert shapes[(256, 256, 8192)][0] == "student logits, student logits dW"  # D = chunk = 256
  # Their FLOPs: the model matmuls of kdjax.flops' count (attention's own matmuls aside).
  gflop = sum(2 * m * k * n * c for (m, k, n), c in expected.items()) / 1e9
  s_body = 4 * (4 * 256 * 256 + 3 * 256 * 704)
  t_body = 8 * (4 * 512 * 512 + 3 * 512 * 1408)
  assert gflop == pytest.approx((6 * s_body * t + 2 * t_body * t + 6 * 256 * 8192 * t
                                 + 2 * 512 * 8192 * t) / 1e9)


def test_matmul_shapes_times_both_libraries_on_the_same_shape():
  rows = matmul_shapes.time_shapes([("tiny", 64, 32, 48, 3), ("tiny too", 16, 8, 4, 1)], reps=3)
  row = rows[0]
  assert (row["shape"], row["roles"], row["per_step"]) == ("[64, 32] x [32, 48]", "tiny", 3)
  assert row["jax_gflops"] > 0 and row["torch_gflops"] > 0
  assert row["jax_over_torch"] == pytest.approx(row["jax_gflops"] / row["torch_gflops"], rel=0.01)
  total = matmul_shapes.step_total(rows)
  assert total["gflop"] == pytest.approx((3 * 2 * 64 * 32 * 48 + 2 * 16 * 8 * 4) / 1e9)
  # At each library's rates: three calls of the first shape and one of the second.
  for lib in ("jax", "torch"):
    assert total[f"{lib}_ms"] == pytest.approx(
        1e3 * 2 * (3 * 64 * 32 * 48 / rows[0][f"{lib}_gflops"] + 16 * 8 * 4 / rows[1][f"{lib}_gflops"])
        / 1e9)
