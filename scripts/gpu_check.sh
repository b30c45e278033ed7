#!/usr/bin/env bash
# The checks only a GPU can make, in one go (under 10 minutes on one H100), every figure written
# to one file:
#
#   pip install -r requirements.txt "jax[cuda12]==0.10.2" && pip install -e .
#   bash scripts/gpu_check.sh gpu_check.txt
#
# 1. the machine: nvidia-smi's card, memory and driver; JAX's devices;
# 2. attention: whether the bf16 model's compiled forward calls cuDNN's fused attention with
#    attention_impl 'xla' (XLA may pick it) and 'cudnn' (asked for), and its compiled memory;
# 3. the benchmark step (configs/bench_cpu.py's shapes) in bf16 with each attention_impl
#    (blockwise, xla, cudnn): tokens/s, MFU against the card's data-sheet peak, peak memory
#    (scripts/benchmark.py's JSON line);
# 4. the smoke experiment end to end (teacher, distilled, scratch, the table), timed;
# 5. the compile report (scripts/compile_for.py) of configs/lm1b.py for 8x H100, on this
#    machine's own CUDA libraries (cuDNN present, unlike a CPU machine's report).
# Record the figures in BENCHMARKS.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-gpu_check.txt}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
section() { printf '\n## %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$out"; }
run() {  # run CMD... with a time limit, its output appended to the file and shown
  local limit=$1 start=$SECONDS; shift
  timeout "$limit" "$@" 2>&1 | tee -a "$out"
  echo "($((SECONDS - start)) s wall, exit ${PIPESTATUS[0]})" | tee -a "$out"
}

: > "$out"
section "machine"
run 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run 60 python -c "import jax; print(jax.__version__, jax.devices())"

section "attention: cuDNN in the bf16 forward"
run 120 python - <<'EOF'
import kdjax  # noqa: F401
import jax, jax.numpy as jnp
from kdjax.model import ModelConfig, Transformer
for impl in ("xla", "cudnn"):
  cfg = ModelConfig(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8,
                    mlp_dim=1408, max_len=1024, dtype="bfloat16", attention_impl=impl)
  tokens = jnp.zeros((8, 1024), jnp.int32)
  params = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens[:1])["params"]
  compiled = jax.jit(Transformer(cfg).apply).lower({"params": params}, tokens).compile()
  print(impl, "cudnn fused attention:", "__cudnn$fmha" in compiled.as_text(),
        "temp bytes:", compiled.memory_analysis().temp_size_in_bytes)
EOF

for impl in blockwise xla cudnn; do
  section "benchmark step, bf16, attention_impl=$impl"
  run 150 python scripts/benchmark.py --config=configs/bench_cpu.py --steps=20 \
      --config.teacher.dtype=bfloat16 --config.student.dtype=bfloat16 \
      --config.teacher.attention_impl=$impl --config.student.attention_impl=$impl
done

section "smoke experiment"
run 300 python -m kdjax.main --config=configs/shakespeare.py:smoke --workdir="$work/smoke"

section "compile report: configs/lm1b.py for 8x H100"
run 300 python scripts/compile_for.py --config=configs/lm1b.py

echo "figures in $out"
