"""The real pairs' steps, evaluation, validation and sampling never hold [B, L, V] logits, at
the pairs' own vocabularies and chunk settings, by two measures of the compiled program (XLA:CPU,
compile only): no array in its optimized HLO has a vocabulary axis and B * L * V elements or
more, and its temporaries stay below half of one float32 [B, L, V] array. The same programs
with every chunk size at 0 fail both, so the measures can tell.

The models keep their vocabulary and family features but shrink to one narrow layer: the
[B, L, V] buffers are what is measured, and the layers' own activations are then small.
"""

import importlib
import math
import re

import jax
import pytest

from kdjax import aot_steps, config_check, sharding

PAIRS = ("gemma2_9b_to_2b", "llama31_8b_to_llama32_1b", "qwen25_7b_to_1b5")
ROWS, LENGTH = 32, 4096  # 131072 tokens: 16 of the pairs' 8192-token chunks
NARROW = dict(num_layers=1, d_model=64, num_heads=2, num_kv_heads=1, head_dim=32, mlp_dim=128)


def _narrow(name, chunked=True):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.teacher.update(NARROW)
  config.student.update(NARROW)
  config.data.update(dict(seq_len=LENGTH, batch_size=ROWS, eval_batch_size=ROWS, num_shards=1))
  config.student_train.grad_accum_steps = 1
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  if not chunked:
    config.distill.loss_chunk_size = 0
    config.student_train.loss_chunk_size = 0
    config.data.eval_chunk_size = 0
  config_check.check_config(config, 1, 1)
  return config


def _largest_vocab_array(hlo: str, vocabs: set[int]) -> int:
  """Elements of the largest array in `hlo` with a vocabulary-sized axis."""
  sizes = [math.prod(dims) for dims in
           ([int(d) for d in m.group(1).split(",")] for m in re.finditer(r"\[([\d,]+)\]", hlo))
           if vocabs & set(dims)]
  return max(sizes, default=0)


def _measures(config) -> dict[str, tuple[int, int]]:
  """{program: (compiled temporaries in bytes, elements of its largest vocabulary-wide array)}
  of every program the config runs, on one CPU."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  vocabs = {config.teacher.vocab_size, config.student.vocab_size, config.data.vocab_size}
  out = {}
  for program in aot_steps.programs(config, mesh):
    with jax.set_mesh(mesh):
      compiled = program.fn.lower(*program.args, **program.kwargs).compile()
    out[program.phase] = (compiled.memory_analysis().temp_size_in_bytes,
                          _largest_vocab_array(compiled.as_text(), vocabs))
  return out


@pytest.mark.slow  # compiles five programs per pair at 131k-token batches
@pytest.mark.parametrize("name", PAIRS)
def test_no_program_of_a_real_pair_holds_full_logits(name):
  config = _narrow(name)
  full_elements = ROWS * LENGTH * config.data.vocab_size  # one [B, L, V]
  measures = _measures(config)
  assert set(measures) == {"distilled", "scratch", "val (student)", "eval (student)",
                           "sample (student)", "eval (teacher)", "sample (teacher)"}
  for phase, (temp, largest) in measures.items():
    assert largest < full_elements, (name, phase, largest)
    assert temp < 2 * full_elements, (name, phase, f"{temp / 2**30:.1f} GiB")


@pytest.mark.slow
def test_unchunked_programs_do_hold_full_logits():
  config = _narrow("qwen25_7b_to_1b5", chunked=False)
  full_elements = ROWS * LENGTH * config.data.vocab_size
  measures = _measures(config)
  for phase in ("distilled", "scratch", "eval (student)", "val (student)"):
    temp, largest = measures[phase]
    assert largest >= full_elements and temp >= 4 * full_elements, (phase, largest, temp)
