"""PyTorch peer of kdjax's benchmark step: one distillation training step with Hugging Face models.

  python scripts/peers/torch_step.py --spec '<json>' --steps 15 --warmup 3 \
      [--compile] [--dtype float32|bfloat16] [--threads 2]      # or --spec_file path.json

It mirrors the step `scripts/benchmark.py` times on `configs/bench_cpu.py`: a frozen teacher and a
trained student, both transformers `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, SDPA attention,
random init) built from the spec's shapes; on random tokens in [4, vocab) from
numpy default_rng(0), one step is

  teacher forward (no_grad, eval) -> logits t;  student forward -> logits s;
  loss = alpha * T^2 * mean_tokens KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)
         (both in float32);
  backward; clip_grad_norm_(grad_clip); AdamW (decay on 2-D weights and embeddings, not on
  RMSNorm scales; constant lr); zero_grad(set_to_none=True).

--compile wraps the forwards and the loss in torch.compile; compilation (the first step) and
--warmup steps are not timed; --steps steps are, each with time.perf_counter. One JSON line goes to
stdout (medians); everything else goes to stderr.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--spec", help="the benchmark's shapes and settings, as JSON")
  p.add_argument("--spec_file", help="a file holding the same JSON")
  p.add_argument("--steps", type=int, default=15)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--compile", action="store_true")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args()
  if (args.spec is None) == (args.spec_file is None):
    p.error("give exactly one of --spec and --spec_file")
  if args.spec_file:
    with open(args.spec_file) as f:
      args.spec = f.read()
  args.spec = json.loads(args.spec)
  return args


def peak_rss_bytes() -> int:
  """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that over
  fork and exec, so a peer started by the benchmark would report the benchmark's own peak."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def build_model(m: dict, vocab: int, seq_len: int, dtype) -> transformers.LlamaForCausalLM:
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=m["d_model"], intermediate_size=m["mlp_dim"],
      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
      num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"], rms_norm_eps=m["norm_eps"],
      # transformers 5 keeps rope_theta inside rope_parameters.
      rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
      tie_word_embeddings=m["tie_embeddings"], max_position_embeddings=seq_len,
      attention_bias=False, mlp_bias=False, hidden_act="silu", use_cache=False)
  config._attn_implementation = "sdpa"
  return transformers.LlamaForCausalLM(config).to(dtype)


def main():
  args = parse_args()
  spec = args.spec
  torch.set_num_threads(args.threads)
  dtype = getattr(torch, args.dtype)
  vocab, l, b = spec["vocab"], spec["seq_len"], spec["batch"]
  temp, alpha = float(spec["temperature"]), float(spec["alpha"])
  o = spec["optimizer"]

  torch.manual_seed(spec["seed"])
  teacher = build_model(spec["teacher"], vocab, l, dtype).eval().requires_grad_(False)
  student = build_model(spec["student"], vocab, l, dtype).train()
  # Weight decay by what a parameter is, as kdjax's optim.decay_mask: matrices and embeddings
  # decay, RMSNorm scales (1-D) do not.
  params = [p for p in student.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  # foreach=True: the multi-tensor path, PyTorch's fastest eager AdamW on CPU.
  opt = torch.optim.AdamW(groups, lr=o["learning_rate"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                          foreach=True)

  tokens = np.random.default_rng(0).integers(4, vocab, size=(b, l + 1)).astype(np.int64)
  inputs = torch.from_numpy(tokens[:, :-1].copy())
  targets = torch.from_numpy(tokens[:, 1:].copy())
  positions = torch.arange(l).expand(b, l)

  def forward_loss(inputs, targets, positions):
    with torch.no_grad():
      t = teacher(input_ids=inputs, position_ids=positions).logits.float()
    s = student(input_ids=inputs, position_ids=positions).logits.float()
    # Forward KL on tempered distributions, per token summed over the vocabulary, then the mean
    # over all B*L tokens (no padding: the mask is all ones), times T^2 as kdjax does.
    log_pt = F.log_softmax(t / temp, dim=-1)
    log_ps = F.log_softmax(s / temp, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    ce = F.cross_entropy(s.reshape(-1, vocab), targets.reshape(-1))
    return alpha * temp**2 * kl + (1.0 - alpha) * ce

  def update():
    torch.nn.utils.clip_grad_norm_(params, o["grad_clip"], foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)

  if args.compile:
    # The forwards and the loss are one graph; AOTAutograd compiles its backward too. The update
    # (clip + AdamW + zero_grad) is compiled as well: ~15% faster per step than eager here.
    forward_loss = torch.compile(forward_loss)
    update = torch.compile(update)

  def step():
    loss = forward_loss(inputs, targets, positions)
    loss.backward()
    update()
    return loss.detach()

  start = time.perf_counter()
  loss = step()  # compiles with --compile; in eager mode only the optimizer state is created.
  first_s = time.perf_counter() - start
  first_loss = float(loss)
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  loss = float(loss)  # .detach() is synchronous on CPU, so the timings are complete.

  step_s = statistics.median(times)
  notes = (f"first-step loss {first_loss:.4f}; one untimed first step, then {args.warmup} warmup "
           "steps; " + ("torch.compile (default mode) on teacher+student forward and loss, its "
                        "backward compiled by AOTAutograd; clip + AdamW + zero_grad compiled too"
                        if args.compile else "eager; AdamW foreach") +
           f"; params and compute in {args.dtype}, loss in float32; constant lr")
  return {
      "peer": "pytorch-compile" if args.compile else "pytorch-eager",
      "dtype": args.dtype, "batch": b, "seq_len": l,
      "tokens_per_sec": round(b * l / step_s, 1), "step_ms": round(1e3 * step_s, 2),
      "step_ms_min": round(1e3 * min(times), 2), "step_ms_max": round(1e3 * max(times), 2),
      "peak_memory_bytes": peak_rss_bytes(), "peak_memory_source": "process peak RSS (VmHWM)",
      "compile_s": round(first_s, 2) if args.compile else 0.0,
      "loss": loss, "torch": torch.__version__, "transformers": transformers.__version__,
      "threads": args.threads, "notes": notes,
  }


if __name__ == "__main__":
  # Only the JSON line goes to stdout: stray prints from libraries are sent to stderr.
  with contextlib.redirect_stdout(sys.stderr):
    row = main()
  print(json.dumps(row), flush=True)
