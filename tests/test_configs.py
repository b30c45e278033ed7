"""Every config in configs/ builds for its declared target hardware and fits its memory.

Each preset's `config.target` names the hardware (devices, processes, memory per device). The
whole training step of every phase its mode runs (and of distillation wherever there is a teacher)
is traced under jax.eval_shape on an abstract mesh of that many devices, with the config's own
rules, so shapes, shardings and the activation constraints are all checked without allocating
anything; then the per-device bytes of params + optimizer state (+ the frozen teacher, in its
frozen_teacher dtype and sharding) are summed from the derived shardings. Nothing reads the
config's paths (teacher_hf, student_init, data): they may be placeholders.

To print those bytes for every config and preset (or the named configs), from the repository
root (what the target's own compiler adds: scripts/compile_for.py):

  python -m tests.test_configs [NAME ...]
"""

import glob
import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kdjax import aot_steps, config_check, experiment, hf, optim, preflight, sharding
from kdjax.model import ModelConfig, Transformer
from kdjax.state import abstract_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))
CASES = [(name, preset) for name in CONFIGS
         for preset in importlib.import_module(f"configs.{name}").PRESETS]
# Params, optimizer state and teacher may take at most this share of a device: the rest is for
# activations, gradients and XLA's buffers.
STATE_SHARE = 0.5


def _abstract_state(model_cfg, tc, mesh, rules):
  tx = optim.make_optimizer(tc)
  like, shardings = abstract_train_state(model_cfg, tx, 0, mesh, rules)
  return tx, like, shardings


def _phase_bytes(config, mesh, rules, phase) -> dict[str, int]:
  """Per-device bytes of one phase's state {'state': the trained model's params + optimizer
  state, 'teacher': the frozen teacher's params (0 without one)}, after tracing its whole step
  (kdjax.aot_steps builds it as a run would)."""
  program = aot_steps.train_program(config, mesh, rules, phase)
  with jax.sharding.use_abstract_mesh(mesh):
    new_state, metrics = jax.eval_shape(program.fn, *program.args)
  assert jax.tree.structure(new_state) == jax.tree.structure(program.args[0])
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
  return {"state": program.state, "teacher": program.teacher}


def _load(name, preset):
  """The config, checked for its target hardware."""
  config = importlib.import_module(f"configs.{name}").get_config(preset)
  config_check.check_config(config, config.target.devices, config.target.processes)
  return config


def _config_bytes(name, preset) -> tuple[object, dict[str, dict[str, int]]]:
  """(config, {phase: per-device bytes}) on an abstract mesh of the config's target."""
  config = _load(name, preset)
  mesh = sharding.abstract_mesh(config.mesh, config.target.devices)
  rules = sharding.rules_from_config(config)
  return config, {phase: _phase_bytes(config, mesh, rules, phase)
                  for phase in aot_steps.phases(config)}


@pytest.mark.parametrize("name, preset", CASES)
def test_config_builds_and_fits_its_target(name, preset):
  config, used = _config_bytes(name, preset)
  target = config.target
  assert used, f"{name}:{preset} (mode {config.mode!r}) traces no phase"
  budget = STATE_SHARE * target.memory_gib * 2**30
  for phase, parts in used.items():
    total = sum(parts.values())
    assert total <= budget, (f"{name}:{preset} {phase} needs {total / 2**30:.2f} GiB of state "
                             f"per device on {target.name}; the budget is "
                             f"{budget / 2**30:.2f} GiB")


@pytest.mark.slow  # traces three real pairs' whole distillation steps twice: full suite only
@pytest.mark.parametrize("name", ["gemma2_9b_to_2b", "llama31_8b_to_llama32_1b",
                                  "qwen25_7b_to_1b5"])
def test_real_pairs_build_int4_and_lora_students(name):
  """Each real pair's distillation step traces with an int4 QAT student and a rank-8 LoRA
  student on its target: QAT keeps float params (the same state), LoRA trains adapters alone
  (far less optimizer state than the full student's)."""
  sizes = {}
  for kind, section, field, value in (("float", None, None, None),
                                      ("int4", "student_quant", "weight", "int4"),
                                      ("lora", "student_lora", "rank", 8)):
    config = importlib.import_module(f"configs.{name}").get_config(None)
    if section:
      config[section][field] = value
    config_check.check_config(config, config.target.devices, config.target.processes)
    mesh = sharding.abstract_mesh(config.mesh, config.target.devices)
    sizes[kind] = _phase_bytes(config, mesh, sharding.rules_from_config(config),
                               "distilled")["state"]
  assert sizes["int4"] == sizes["float"]
  assert sizes["lora"] < 0.6 * sizes["float"]


# The published models of the configs/ that distill one into another: the architecture keys of
# each config.json on the Hugging Face hub (base models), which kdjax.hf.model_config reads, and
# the parameter count of each checkpoint (its safetensors hold exactly these).
_GEMMA2 = dict(model_type="gemma2", vocab_size=256_000, head_dim=256, max_position_embeddings=8192,
               rms_norm_eps=1e-6, rope_theta=10_000.0, hidden_activation="gelu_pytorch_tanh",
               query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
               final_logit_softcapping=30.0, sliding_window=4096)
_LLAMA3 = dict(model_type="llama", vocab_size=128_256, max_position_embeddings=131_072,
               rms_norm_eps=1e-5, rope_theta=500_000.0, hidden_act="silu", attention_bias=False,
               mlp_bias=False)
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_QWEN25 = dict(model_type="qwen2", max_position_embeddings=131_072, rms_norm_eps=1e-6,
               rope_theta=1_000_000.0, hidden_act="silu", use_sliding_window=False)
PUBLISHED = {
    "gemma2_9b_to_2b": (
        (dict(_GEMMA2, hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
              num_key_value_heads=8, intermediate_size=14_336), 9_241_705_984),  # gemma-2-9b
        (dict(_GEMMA2, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
              num_key_value_heads=4, intermediate_size=9216), 2_614_341_888)),  # gemma-2-2b
    "llama31_8b_to_llama32_1b": (
        (dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, intermediate_size=14_336,
              tie_word_embeddings=False, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
         8_030_261_248),  # Llama-3.1-8B
        (dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, head_dim=64, intermediate_size=8192,
              tie_word_embeddings=True, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
         1_235_814_400)),  # Llama-3.2-1B
    "qwen25_7b_to_1b5": (
        (dict(_QWEN25, vocab_size=152_064, hidden_size=3584, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, intermediate_size=18_944,
              tie_word_embeddings=False), 7_615_616_512),  # Qwen2.5-7B
        (dict(_QWEN25, vocab_size=151_936, hidden_size=1536, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
              tie_word_embeddings=True), 1_543_714_304)),  # Qwen2.5-1.5B
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_pairs_are_the_published_models(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  for section, (hub_config, num_params) in zip(("teacher", "student"), PUBLISHED[name]):
    cfg = ModelConfig.from_dict(config[section])
    # What a run checks before loading config.teacher_hf / config.student_init: every field
    # that decides the math equals the one read from the checkpoint's config.json.
    assert preflight._misfit(cfg, hf.model_config(hub_config)) == [], section
    assert cfg.num_params() == num_params, section
  # They distill from a published teacher into a published start, and never train a teacher.
  assert config.teacher_hf and config.student_init and config.mode == "distill"
  assert config.data.tokenizer_path == config.teacher_hf
  assert preflight.phases_to_run(config) == ("distilled",)
  t_vocab, s_vocab = config.teacher.vocab_size, config.student.vocab_size
  assert config.data.vocab_size <= min(t_vocab, s_vocab)


def test_lm1b_is_sharded_not_replicated():
  # The 1.0B teacher's training state (12 bytes/param in f32 + Adam) would take 11.3 GiB on one
  # device; FSDP over 8 devices must bring each share to 1/8 of it (norm scales aside).
  config = importlib.import_module("configs.lm1b").get_config()
  mesh = sharding.abstract_mesh(config.mesh, config.target.devices)
  t_cfg = ModelConfig.from_dict(config.teacher)
  _, state, state_sh = _abstract_state(t_cfg, config.teacher_train, mesh,
                                       sharding.rules_from_config(config))
  full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_device = sharding.per_device_bytes(state, state_sh)
  assert t_cfg.num_params() > 1e9 and full > 11 * 2**30
  assert per_device <= full / 8 * 1.001
  # The frozen teacher in bf16, over data x fsdp: 2 bytes/param / 8 devices.
  t_cfg, t_rules = experiment.frozen_teacher_settings(config, sharding.rules_from_config(config))
  like = jax.eval_shape(lambda: Transformer(t_cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  frozen = sharding.per_device_bytes(nn.meta.unbox(like), sharding.logical_shardings(like, mesh,
                                                                                     t_rules))
  assert frozen <= 2 * t_cfg.num_params() / 8 * 1.001


if __name__ == "__main__":
  # The per-device bytes of params, optimizer state and teacher of every config and preset (or
  # the named configs); scripts/compile_for.py gives what the target's compiler adds.
  import sys
  names = sys.argv[1:]
  jax.config.update("jax_platforms", "cpu")  # as tests/conftest.py
  print(f"{'config:preset':<36} {'phase':<10} {'state':>6} {'teacher':>7} {'total':>6} {'of':>4}"
        "  GiB per device")
  for name, preset in [(n, p) for n, p in CASES if not names or n in names]:
    config, used = _config_bytes(name, preset)
    for phase, parts in used.items():
      print(f"{name + ':' + preset:<36} {phase:<10} {parts['state'] / 2**30:>6.2f} "
            f"{parts['teacher'] / 2**30:>7.2f} {sum(parts.values()) / 2**30:>6.2f} "
            f"{config.target.memory_gib:>4.0f}", flush=True)


@pytest.mark.parametrize("backend, capability, run, dtype, rows", [
    ("tpu", None, "colab_tpu", "bfloat16", 64),
    ("gpu", "8.9", "colab_gpu", "bfloat16", 32),  # an L4
    ("gpu", "7.5", "colab_gpu_float32", "float32", 16),  # a T4: no bf16
    ("gpu", "gfx90a", "colab_gpu", "bfloat16", 32),  # ROCm names its GPUs, not a number
    ("cpu", None, "colab_smoke", "bfloat16", 8),
])
def test_colab_config_follows_the_runtime(backend, capability, run, dtype, rows):
  colab = importlib.import_module("configs.colab")
  name, config = colab.for_runtime(backend, capability)
  assert name == run and config.data.batch_size == rows
  assert {config.teacher.dtype, config.student.dtype, config.frozen_teacher.dtype} == {dtype}
  assert config.distill.loss_chunk_size > 0 and config.mesh.data == -1  # every device, chunked
  assert (config.target.topology == "v5e-1") == (backend == "tpu")
