"""Times kdjax's compiled distillation step and prints its figures as JSON lines.

  python scripts/benchmark.py --config=configs/bench_cpu.py
  python scripts/benchmark.py --config=configs/bench_cpu.py --config.distill.loss_chunk_size=0
  python scripts/benchmark.py --loss_table --vocab=32768,131072,262144 --loss_chunk_sizes=0,256
  python scripts/benchmark.py --generate --hf_peer --gen_batches=1,32 --steps=7
  python scripts/benchmark.py --config=configs/bench_cpu.py --steps=15 --warmup=3 \
      --peers=pytorch-eager,pytorch-compile,tunix --tunix_python=/path/to/tunix-venv/bin/python
  python scripts/benchmark.py --config=configs/bench_cpu.py --profile=15

Needs kdjax installed: `pip install -e .` in the repo root.

`--peers` then times the same step written elsewhere, each in a subprocess of its own after
kdjax's (scripts/peers/): Hugging Face Llama models in PyTorch, eager and under torch.compile
(torch_step.py), and Google Tunix's DistillationTrainer with LogitStrategy (tunix_step.py, in the
venv of requirements-tunix-peer.txt). One JSON line each, with the peer's tokens/s, its MFU by
kdjax's FLOP count and measured peak, its peak memory (VmHWM) and kdjax_speedup (kdjax's tokens/s
over the peer's). `--profile=N` also prints the step's N costliest XLA instructions and the
per-kind total (scripts/xla_profile.py), after kdjax's line.

`--generate` times greedy KV-cache generation instead (kdjax.decode_speed): a Llama-family model
of the --gen_* sizes with random weights (seed 0), or --config's `config.<--gen_model>` (teacher
or student), or the Hugging Face checkpoint in --gen_hf_dir; --prompt_tokens random prompt
tokens per row, --max_new_tokens new ones, one JSON line per batch size of --gen_batches with
new_tokens_per_s and ms_per_token (medians of --steps runs after a compiling, warming call; see
kdjax/decode_speed.py). `--hf_peer` also times transformers' `generate` on the same weights and
prompts (scripts/hf_generate_peer.py), its runs interleaved with kdjax's so that both see the
same machine, and adds hf_new_tokens_per_s, hf_ms_per_token, ratio (kdjax / transformers new
tokens per second) and tokens_equal (both produced the same tokens). loadavg_1m is the machine's
load after a batch's runs: with other work running, both sides slow down, torch's threads most.

`--loss_table` times the distillation loss alone (no model): from final hidden states of a
student (width --student_width) and a teacher (--teacher_width) over --loss_length tokens, value and
gradient w.r.t. the student's hidden states and unembedding, one JSON line per (vocab, chunk size)
with XLA's scratch memory for the compiled loss (`temp_bytes`, from memory_analysis: what the
loss itself allocates beyond its inputs and outputs) and the median time of --steps runs.

The step is exactly the training step (teacher forward under stop_gradient, student forward and
backward, AdamW update, donated state) on random tokens of the config's batch shape, with random
teacher params. Compilation and `--warmup` steps are excluded; `step_ms` is the median of
`--steps` timed steps, each waited for before the next starts.

FLOPs per token (kdjax.flops; forward = 2 per multiply-add; backward = 2x forward):

  flops_per_token = 6 N_s + 2 N_t + 12 S_s d_s L + 4 S_t d_t L

N = weights that enter a matmul (every kernel and the unembedding; not norm scales, and not the
input embedding when it is untied, since a lookup does no multiply), S = layers, d = query heads x
head dim, L = sequence length. The attention terms count QK^T and AV over the full L x L (no
causal discount), forward + backward for the student, forward only for the teacher.

achieved_flops = flops_per_token x tokens_per_sec; mfu = achieved_flops / peak_flops, where
peak_flops is measured on CPU (the fastest of 20 2048^3 matmuls in the compute dtype) and the data
sheet's dense figure on GPU/TPU. peak memory: the device's peak_bytes_in_use where JAX reports
it, else the process's max RSS.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import time

import kdjax  # noqa: F401  (XLA flags before JAX starts)

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from kdjax import decode_speed, experiment, flops, hf, losses, optim, sharding, train
from kdjax.model import ModelConfig, Transformer
from kdjax.settings import DistillSettings
from kdjax.state import create_train_state, init_params, param_shardings


def _sibling(path: str):
  """A module of scripts/ loaded by path (this script is also loaded by path, by the tests)."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], os.path.join(os.path.dirname(__file__), path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


xla_profile = _sibling("xla_profile.py")
peers_run = _sibling("peers/run.py")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config to benchmark.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_LOSS_TABLE = flags.DEFINE_bool("loss_table", False, "Time the loss alone (see the docstring).")
_VOCAB = flags.DEFINE_list("vocab", ["32768", "131072", "262144"], "Loss table: vocab sizes.")
_CHUNKS = flags.DEFINE_list("loss_chunk_sizes", ["0", "256"], "Loss table: 0 = unchunked.")
_LENGTH = flags.DEFINE_integer("loss_length", 2048, "Loss table: tokens (one sequence).")
_S_WIDTH = flags.DEFINE_integer("student_width", 512, "Loss table: student hidden width.")
_T_WIDTH = flags.DEFINE_integer("teacher_width", 1024, "Loss table: teacher hidden width.")
_GENERATE = flags.DEFINE_bool("generate", False, "Time greedy KV-cache generation instead.")
_HF_PEER = flags.DEFINE_bool("hf_peer", False, "Generate: time transformers' generate too.")
_GEN_BATCHES = flags.DEFINE_list("gen_batches", ["1", "32"], "Generate: batch sizes.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 32, "Generate: prompt tokens per row.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Generate: new tokens per row.")
_GEN_MODEL = flags.DEFINE_enum("gen_model", "", ["", "teacher", "student"],
                               "Generate: take the model from --config's teacher or student.")
_GEN_HF_DIR = flags.DEFINE_string("gen_hf_dir", None, "Generate: a Hugging Face checkpoint.")
_GEN_VOCAB = flags.DEFINE_integer("gen_vocab", 8192, "Generate: vocabulary.")
_GEN_D_MODEL = flags.DEFINE_integer("gen_d_model", 512, "Generate: model width.")
_GEN_LAYERS = flags.DEFINE_integer("gen_layers", 8, "Generate: layers.")
_GEN_HEADS = flags.DEFINE_integer("gen_heads", 8, "Generate: query heads.")
_GEN_KV_HEADS = flags.DEFINE_integer("gen_kv_heads", 8, "Generate: key/value heads.")
_GEN_MLP = flags.DEFINE_integer("gen_mlp", 1408, "Generate: SwiGLU MLP width.")
_GEN_TIE = flags.DEFINE_bool("gen_tie", False, "Generate: tie the embeddings.")
_PEERS = flags.DEFINE_list("peers", [], "After kdjax's step, time the same step in these "
                           "(scripts/peers/run.py): pytorch-eager, pytorch-compile, tunix.")
_TUNIX_PYTHON = flags.DEFINE_string("tunix_python", os.environ.get("TUNIX_PYTHON"),
                                    "--peers=tunix: the Python of Tunix's own venv.")
_PROFILE = flags.DEFINE_integer("profile", 0, "Also print the step's N costliest instructions "
                                "(scripts/xla_profile.py), one JSON line each, after the result.")

def peak_flops(dtype: str) -> tuple[float, str]:
  device = jax.devices()[0]
  for (kind, dt), value in flops.DATASHEET.items():
    if kind in device.device_kind and dt == dtype:
      return value, f"data sheet ({device.device_kind}, {dtype})"
  # The best of several runs: the peak is what the machine can do, and a shared machine's noise
  # only ever slows a run down.
  n = 2048
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(20):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times), f"measured: best of 20 {n}^3 {dtype} matmuls"


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def benchmark(config) -> tuple[dict, list[dict]]:
  """(the figures, the --profile rows: none without --profile)."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  s_cfg = ModelConfig.from_dict(config.student)
  t_cfg, t_rules = experiment.frozen_teacher_settings(config, rules)
  tc = config.student_train
  tx = optim.make_optimizer(tc)
  state, state_sh = create_train_state(s_cfg, tx, config.seed, mesh, rules)
  t_params = init_params(t_cfg, jax.random.key(1), mesh, t_rules)
  t_sh = param_shardings(t_cfg, mesh, t_rules)
  step = train.jit_train_step(
      train.make_train_step(s_cfg, tx, optim.make_schedule(tc), t_cfg=t_cfg,
                            distill=DistillSettings.from_config(config.distill),
                            grad_accum_steps=tc.grad_accum_steps, rules=rules, t_rules=t_rules),
      state_sh, t_sh, mesh)
  b, l = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, s_cfg.vocab_size, size=(b, l + 1)).astype(np.int32)
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
          "mask": np.ones((b, l), np.float32)}
  batch = {k: sharding.global_array(v, sharding.batch_sharding(mesh)) for k, v in host.items()}

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.jitted.lower(state, t_params, batch).compile()
  compile_s = time.perf_counter() - start
  xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
  for _ in range(_WARMUP.value):
    state, _ = step(state, t_params, batch)
  jax.block_until_ready(state)  # --warmup=0 too
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = step(state, t_params, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  profile_rows = []
  if _PROFILE.value:
    def run_one_step():
      nonlocal state
      state, step_metrics = step(state, t_params, batch)
      jax.block_until_ready(step_metrics)
    profile_rows = xla_profile.profile(compiled.as_text(), run_one_step, top=_PROFILE.value)[0]

  step_s = statistics.median(times)
  tokens_per_sec = b * l / step_s
  fpt = flops.flops_per_token(s_cfg, t_cfg, l)
  peak, peak_source = peak_flops(s_cfg.dtype)
  memory, memory_source = peak_memory_bytes()
  return {
      "config": config.target.name,
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "batch": b, "seq_len": l, "loss_chunk_size": int(config.distill.loss_chunk_size),
      "tokens_per_sec": round(tokens_per_sec, 1), "step_ms": round(1e3 * step_s, 2),
      "step_ms_min": round(1e3 * min(times), 2), "step_ms_max": round(1e3 * max(times), 2),
      "flops_per_token": fpt, "xla_flops_per_token": xla_flops / (b * l),
      "achieved_flops": fpt * tokens_per_sec, "peak_flops": peak, "peak_flops_source": peak_source,
      "mfu": round(fpt * tokens_per_sec / peak, 4),
      "peak_memory_bytes": memory, "peak_memory_source": memory_source,
      "compile_s": round(compile_s, 2), "loss": float(metrics["loss"]),
  }, profile_rows


def loss_row(vocab: int, chunk_size: int) -> dict:

  length, d_s, d_t = _LENGTH.value, _S_WIDTH.value, _T_WIDTH.value
  rng = np.random.default_rng(0)
  arrays = [rng.standard_normal((1, length, d_s)), rng.standard_normal((d_s, vocab)) / d_s**0.5,
            rng.standard_normal((1, length, d_t)), rng.standard_normal((d_t, vocab)) / d_t**0.5]
  args = [jnp.asarray(a, jnp.float32) for a in arrays] + [
      jnp.asarray(rng.integers(0, vocab, (1, length)), jnp.int32), jnp.ones((1, length))]

  def loss(s_h, s_w, t_h, t_w, labels, mask):
    return losses.chunked_distillation_loss(s_h, s_w, t_h, t_w, labels, mask, temperature=2.0,
                                            alpha=0.5, chunk_size=chunk_size)[0]

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  memory = compiled.memory_analysis()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {"vocab": vocab, "length": length, "student_width": d_s, "teacher_width": d_t,
          "chunk_size": chunk_size, "temp_bytes": int(memory.temp_size_in_bytes),
          "logits_bytes": length * vocab * 4, "ms": round(1e3 * statistics.median(times), 1)}


def generation_model() -> tuple[ModelConfig, object, str | None]:
  """(cfg, params, hf_dir) of the model --generate times (see the module doc)."""
  if _GEN_HF_DIR.value:
    cfg, params = hf.load_pretrained(_GEN_HF_DIR.value)
    return cfg, params, _GEN_HF_DIR.value
  if _GEN_MODEL.value:
    if _CONFIG.value is None:
      raise app.UsageError("--gen_model needs --config.")
    cfg = ModelConfig.from_dict(_CONFIG.value[_GEN_MODEL.value])
  else:
    d, heads = _GEN_D_MODEL.value, _GEN_HEADS.value
    cfg = ModelConfig(vocab_size=_GEN_VOCAB.value, d_model=d, num_layers=_GEN_LAYERS.value,
                      num_heads=heads, num_kv_heads=_GEN_KV_HEADS.value, head_dim=d // heads,
                      mlp_dim=_GEN_MLP.value, tie_embeddings=_GEN_TIE.value,
                      max_len=_PROMPT_TOKENS.value + _MAX_NEW_TOKENS.value)
  tokens_1x1 = jnp.zeros((1, 1), jnp.int32)
  params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens_1x1)["params"])
  return cfg, params, None


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return jax.devices()[0].device_kind


def generation_rows():
  """Yields one dict per batch size: kdjax's greedy decode speed, and the peer's with --hf_peer."""
  cfg, params, hf_dir = generation_model()
  p, a = _PROMPT_TOKENS.value, _MAX_NEW_TOKENS.value
  peer = model = None
  if _HF_PEER.value:  # loaded only when asked for: it imports torch and transformers
    peer = _sibling("hf_generate_peer.py")
    model = peer.load(cfg, params, hf_dir)
  for batch in map(int, _GEN_BATCHES.value):
    prompt_BxP = decode_speed.random_prompts(cfg, batch, p)
    runs = [decode_speed.greedy_generator(cfg, params, prompt_BxP, a)]
    if peer is not None:
      runs.append(peer.greedy_generator(model, prompt_BxP, a))
    first_call_s = [decode_speed.timed(run) for run in runs]  # compiles kdjax's
    tokens = [run() for run in runs]
    times = [[] for _ in runs]
    for _ in range(_STEPS.value):  # interleaved: both see the same machine
      for run, run_s in zip(runs, times):
        run_s.append(decode_speed.timed(run))
    row = {"batch": batch, "prompt_tokens": p, "max_new_tokens": a, "params": cfg.num_params(),
           "model": f"{cfg.family or 'llama'} V{cfg.vocab_size} D{cfg.d_model} S{cfg.num_layers} "
                    f"H{cfg.num_heads}/{cfg.num_kv_heads} F{cfg.mlp_dim}",
           "cpu": cpu_name(), **decode_speed.speed_row(times[0], batch, a),
           "first_call_s": round(first_call_s[0], 2),
           "loadavg_1m": round(os.getloadavg()[0], 2)}
    if peer is not None:
      hf_row = decode_speed.speed_row(times[1], batch, a)
      row.update({f"hf_{k}": v for k, v in hf_row.items()},
                 ratio=round(row["new_tokens_per_s"] / hf_row["new_tokens_per_s"], 2),
                 tokens_equal=bool(np.array_equal(tokens[0], tokens[1])))
    yield row


def main(argv):
  del argv
  if _GENERATE.value:
    for row in generation_rows():
      print(json.dumps(row), flush=True)
    return
  if _LOSS_TABLE.value:
    for vocab in map(int, _VOCAB.value):
      for chunk_size in map(int, _CHUNKS.value):
        print(json.dumps(loss_row(vocab, chunk_size)), flush=True)
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (or --loss_table, --generate).")
  config = _CONFIG.value
  s_cfg, t_cfg = ModelConfig.from_dict(config.student), ModelConfig.from_dict(config.teacher)
  spec = peers_run.spec_from_config(config, s_cfg, t_cfg) if _PEERS.value else None
  for peer in _PEERS.value:  # refused before anything runs
    peers_run.command(peer, spec, 1, 0, s_cfg.dtype, _TUNIX_PYTHON.value)
  row, profile_rows = benchmark(config)
  print(json.dumps({"impl": "kdjax", **row}), flush=True)
  for profile_row in profile_rows:
    print(json.dumps(profile_row), flush=True)
  for peer in _PEERS.value:
    peer_row = peers_run.run(peer, spec, _STEPS.value, _WARMUP.value, s_cfg.dtype,
                             _TUNIX_PYTHON.value)
    if "tokens_per_sec" in peer_row:
      peer_row["kdjax_speedup"] = round(row["tokens_per_sec"] / peer_row["tokens_per_sec"], 3)
      peer_row["mfu"] = round(row["flops_per_token"] * peer_row["tokens_per_sec"]
                              / row["peak_flops"], 4)
    print(json.dumps({"impl": peer_row.pop("peer"), **peer_row}), flush=True)


if __name__ == "__main__":
  app.run(main)
