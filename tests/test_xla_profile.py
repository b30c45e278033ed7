"""scripts/xla_profile.py: per-instruction times of a compiled program, named by their HLO."""

import jax
import jax.numpy as jnp

from support import scripts_loader

xla_profile = scripts_loader.load("xla_profile")


def test_the_matmul_of_a_matmul_heavy_program_comes_first_with_its_shape_and_origin():
  def program(a, b):
    with jax.named_scope("big_matmul"):
      product = a @ b
    return jnp.tanh(product[:8, :8]).sum()

  a = jnp.ones((512, 512))
  compiled = jax.jit(program).lower(a, a).compile()
  rows, wall_ms = xla_profile.profile(compiled.as_text(),
                                      lambda: jax.block_until_ready(compiled(a, a)), steps=3)
  top, total = rows[0], rows[-1]
  assert "dot" in top["what"] and "f32[512,512]" in top["shape"]
  assert "big_matmul" in top["where"]
  assert total["instruction"] == "(all instructions)"
  assert 0 < top["ms"] <= total["ms"] and wall_ms > 0
  assert max(xla_profile.by_kind(rows[:-1]), key=xla_profile.by_kind(rows[:-1]).get) == "matmul"


HLO = """\
%fused_computation.3 (param_0: f32[8,16]) -> (f32[8], f32[8]) {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %exp.1 = f32[8,16]{1,0} exponential(%param_0), metadata={op_name="jit(f)/softmax/exp"}
  %reduce.2 = f32[8]{0} reduce(%exp.1, %c), dimensions={1}, to_apply=%add
  ROOT %tuple.4 = (f32[8]{0}, f32[8]{0}) tuple(%reduce.2, %reduce.2)
}

ENTRY %main.9 (Arg_0.1: f32[8,16]) -> f32[8] {
  %Arg_0.1 = f32[8,16]{1,0} parameter(0)
  %fusion.3 = (f32[8]{0}, /*index=1*/f32[8]{0}) fusion(%Arg_0.1), kind=kLoop, calls=%fused_computation.3, metadata={op_name="jit(f)/softmax/reduce_sum"}
  %while.5 = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body
  ROOT %dot.7 = f32[8]{0} dot(%Arg_0.1, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/layers/dot_general"}
}
"""


def test_hlo_index_reads_tuple_shaped_fusions_and_the_entry_computation():
  instructions, computations = xla_profile._hlo_index(HLO)
  assert instructions["fusion.3"][:2] == ("fusion", "(f32[8]{0}, /*index=1*/f32[8]{0})")
  assert instructions["fusion.3"][3] == "fused_computation.3"
  assert instructions["while.5"][0] == "while" and instructions["dot.7"][0] == "dot"
  # The entry's instructions are its own, not the fusion's before it.
  assert [op for op, _ in computations["fused_computation.3"]] == [
      "parameter", "exponential", "reduce", "tuple"]
  assert "dot" in [op for op, _ in computations["main.9"]]
  what, shape, where = xla_profile._describe("fusion.3", instructions, computations)
  assert what == "fusion: exponential,reduce" and where == "softmax/reduce_sum"
