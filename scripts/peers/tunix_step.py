"""Google Tunix's logit-distillation step, timed on kdjax's benchmark shapes: a JAX peer.

  python scripts/peers/tunix_step.py --spec '<json>' --steps 15 --warmup 3 [--dtype bfloat16]
  python scripts/peers/tunix_step.py --spec_file spec.json --steps 15 --warmup 3

It mirrors kdjax's step in scripts/benchmark.py on configs/bench_cpu.py (the --spec JSON gives
vocab, seq_len, batch, seed, the teacher's and student's sizes, temperature, alpha and AdamW), and
runs in its own venv, since Tunix pins its own stack and kdjax must not import it:

  python -m venv /path && /path/bin/pip install -r requirements-tunix-peer.txt

Teacher and student are Tunix's Llama3 NNX model (tunix.models.llama3) with random init, trained by
tunix.distillation.DistillationTrainer with LogitStrategy(temperature, alpha) and
optax.chain(clip_by_global_norm, adamw(constant lr)). One timed step is what the trainer's own
loop does for one batch: `_prepare_inputs` (the teacher forward, a separate nnx.jit in Tunix),
then the jitted train step from `jit_train_and_eval_step` (student forward + backward + update,
optimizer donated), on one fixed batch of random tokens. Compilation (the first call) and
--warmup steps are excluded; each timed step is waited for before the next. No checkpointing,
metrics logging or eval.

XLA_FLAGS gets --xla_cpu_experimental_ynn_fusion_type=dot (unless already set) before JAX is
imported: jaxlib 0.10.2's CPU backend miscompiles YNNPACK element-wise/reduce fusions, and kdjax
sets the same flag, so both peers run under the same XLA settings.

Prints one JSON line on stdout; everything else goes to stderr.
"""

import argparse
import importlib.metadata
import json
import logging
import os
import statistics
import sys
import time

# Same XLA settings as kdjax (kdjax/__init__.py), before JAX starts.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_YNN_FLAG}=dot").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Only the JSON line may reach stdout: point fd 1 at stderr (Tunix, absl and C++ libraries print)
# and keep the real stdout for the result.
_STDOUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

from absl import logging as absl_logging  # noqa: E402
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tunix.distillation import distillation_trainer, strategies  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.sft import sharding_utils, utils as sft_utils  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)
logging.getLogger().setLevel(logging.ERROR)


def peak_rss_bytes() -> int:
  """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that over
  fork and exec, so a peer started by the benchmark would report the benchmark's own peak."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def build_model(c: dict, vocab: int, dtype, seed: int) -> llama3.Llama3:
  """Tunix's Llama3 of the spec's sizes. Llama3 has no dtype knob (its params are created in
  float32), so bfloat16 casts every param, as Tunix's notebooks do when restoring bf16 weights."""
  cfg = llama3.ModelConfig(
      num_layers=c["num_layers"], vocab_size=vocab, embed_dim=c["d_model"],
      hidden_dim=c["mlp_dim"], num_heads=c["num_heads"], head_dim=c["head_dim"],
      num_kv_heads=c["num_kv_heads"], rope_theta=c["rope_theta"], norm_eps=c["norm_eps"],
      weight_tying=bool(c["tie_embeddings"]))
  model = llama3.Llama3(cfg, rngs=nnx.Rngs(params=seed))
  if dtype != jnp.float32:
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))
  return model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--spec", help="benchmark spec as JSON")
  parser.add_argument("--spec_file", help="file holding the spec JSON")
  parser.add_argument("--steps", type=int, default=15)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = parser.parse_args()
  if (args.spec is None) == (args.spec_file is None):
    parser.error("give exactly one of --spec and --spec_file")
  if args.spec_file:
    with open(args.spec_file) as f:
      spec = json.load(f)
  else:
    spec = json.loads(args.spec)
  dtype = jnp.dtype(args.dtype)
  vocab, b, l, seed = spec["vocab"], spec["batch"], spec["seq_len"], spec.get("seed", 0)
  opt = spec["optimizer"]

  student = build_model(spec["student"], vocab, dtype, seed)
  teacher = build_model(spec["teacher"], vocab, dtype, seed + 1)

  # The forward, labels and input functions of Tunix's logit-distillation example
  # (examples/logit_distillation.ipynb): logits of all but the last position, one-hot next tokens.
  def forward_fn(model, input_tokens, input_mask, positions, attention_mask):
    del input_mask  # already folded into attention_mask and positions
    logits, _ = model(input_tokens, positions, None, attention_mask)
    return logits[:, :-1, :]

  def labels_fn(input_tokens, input_mask, **_):
    labels = jax.nn.one_hot(input_tokens[:, 1:], vocab)
    return labels * input_mask[:, 1:, None].astype(labels.dtype)

  def gen_model_input_fn(x):
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(x.input_mask),
            "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}

  strategy = strategies.LogitStrategy(
      student_forward_fn=forward_fn, teacher_forward_fn=forward_fn, labels_fn=labels_fn,
      temperature=spec["temperature"], alpha=spec["alpha"])
  tx = optax.chain(
      optax.clip_by_global_norm(opt["grad_clip"]),
      optax.adamw(optax.constant_schedule(opt["learning_rate"]), b1=opt["b1"], b2=opt["b2"],
                  eps=opt["eps"], weight_decay=opt["weight_decay"]))
  # No checkpoint directory, no metrics logging options, eval never: nothing but the step runs.
  config = distillation_trainer.TrainingConfig(eval_every_n_steps=10**9)
  trainer = distillation_trainer.DistillationTrainer(
      student_model=student, teacher_model=teacher, strategy=strategy, optimizer=tx,
      training_config=config).with_gen_model_input_fn(gen_model_input_fn)
  # What trainer.train() calls each step (cache_nnx_graph=True is train()'s default): nnx.jit of
  # PeftTrainer._train_step with donate_argnames=("optimizer",), bound to (model, optimizer).
  train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)

  tokens = np.random.default_rng(0).integers(4, vocab, size=(b, l)).astype(np.int32)
  batch = distillation_trainer.TrainingInput(
      input_tokens=jnp.asarray(tokens), input_mask=jnp.ones((b, l), jnp.bool_))

  def step():
    # The body of PeftTrainer.train's loop for one batch, less metrics, hooks and checkpoints.
    example = trainer._prepare_inputs(batch)  # teacher forward under stop_gradient
    example = sharding_utils.shard_input(example, config.data_sharding_axis)  # no-op, no mesh
    loss, aux, grad_norm = train_step(example)
    jax.block_until_ready((loss, aux, grad_norm))
    return loss, aux

  start = time.perf_counter()
  first_loss, first_aux = step()  # compiles the teacher forward and the train step
  first_call_s = time.perf_counter() - start
  print(f"first step loss {float(first_loss):.4f} "
        f"{ {k: round(float(v), 4) for k, v in first_aux.items()} }", file=sys.stderr)
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss, _ = step()
    times.append(time.perf_counter() - start)

  # The teacher forward alone (Tunix runs it outside the train step): its share of a step.
  teacher_times = []
  for _ in range(max(1, min(5, args.steps))):
    start = time.perf_counter()
    jax.block_until_ready(trainer._prepare_inputs(batch).teacher_output)
    teacher_times.append(time.perf_counter() - start)

  step_s = statistics.median(times)
  teacher_ms = 1e3 * statistics.median(teacher_times)
  version = importlib.metadata.version("google-tunix")
  notes = (
      f"Tunix {version} Llama3 NNX (tunix.models.llama3) teacher and student, random init "
      "(Tunix's own: normal(0.01) embeddings/attention/lm_head, zero MLP kernels), "
      f"weight_tying teacher={bool(spec['teacher']['tie_embeddings'])} student="
      f"{bool(spec['student']['tie_embeddings'])} (Llama3 can untie: a separate lm_head); "
      "plain einsum attention with a [B, L, L] "
      "boolean causal mask (no flash/blockwise), softmax in float32; RoPE theta fixed at 1e6 "
      "(Tunix's Attention ignores ModelConfig.rope_theta). "
      "Loss (LogitStrategy): alpha * T^2 * mean over B x (L-1) positions of "
      "KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * mean CE(s, next token), logits cast to "
      "float32; it also computes the teacher's CE as a metric. L-1 = "
      f"{l - 1} scored positions per row (the model sees L = {l} tokens). "
      "One step = trainer._prepare_inputs (teacher forward, its own nnx.jit outside the train "
      "step) + the trainer's jitted train step (student forward/backward, grad norm, "
      "optimizer.update; optimizer donated, model params not), as PeftTrainer.train runs them; "
      f"teacher forward alone {teacher_ms:.1f} ms median. compile_s = first call's wall time "
      "(lazy jit of both functions + one step) less the median step. "
      + ("bfloat16: params, AdamW moments and compute all bfloat16 (Llama3 has no separate "
         "compute dtype). " if dtype != jnp.float32 else "") +
      f"First step loss {float(first_loss):.4f}.")
  result = {
      "peer": "tunix", "dtype": args.dtype, "batch": b, "seq_len": l,
      "tokens_per_sec": round(b * l / step_s, 1), "step_ms": round(1e3 * step_s, 2),
      "step_ms_min": round(1e3 * min(times), 2), "step_ms_max": round(1e3 * max(times), 2),
      "peak_memory_bytes": peak_rss_bytes(), "peak_memory_source": "process peak RSS (VmHWM)",
      "compile_s": round(max(0.0, first_call_s - step_s), 2), "loss": float(loss),
      "tunix": version, "jax": jax.__version__,
      "notes": notes,
  }
  _STDOUT.write(json.dumps(result) + "\n")
  _STDOUT.flush()


if __name__ == "__main__":
  main()
