"""Runs the peer implementations of kdjax's benchmark step (scripts/benchmark.py --peers).

Each peer is a script of this folder that times the same distillation step as kdjax's on the
shapes of the config (the --spec JSON built here from it) and prints one JSON line:

  pytorch-eager     torch_step.py: Hugging Face Llama models in PyTorch, eager
  pytorch-compile   torch_step.py --compile: the same under torch.compile
  tunix             tunix_step.py: Google Tunix's DistillationTrainer + LogitStrategy, run by the
                    Python of its own venv (requirements-tunix-peer.txt; --tunix_python)

Each runs in a subprocess of its own, after kdjax's step in the same benchmark process, so that
every figure of a run comes from the same machine at about the same time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kdjax.model import ModelConfig

PEERS = ("pytorch-eager", "pytorch-compile", "tunix")
# ModelConfig fields a peer's decoder has only at their defaults (SwiGLU, RMSNorm, RoPE, no
# biases, soft-caps, windows or family extras).
_LLAMA_FIELDS = ("activation", "norm", "position_embedding", "family", "qkv_bias", "out_bias",
                 "mlp_bias", "qk_norm", "norm_plus_one", "post_norms", "embed_scale",
                 "query_scale", "attn_softcap", "logit_softcap", "sliding_window", "rope_scaling")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _model_spec(cfg: ModelConfig) -> dict:
  return {"d_model": cfg.d_model, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
          "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_size, "mlp_dim": cfg.mlp_dim,
          "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "tie_embeddings": cfg.tie_embeddings}


def spec_from_config(config, s_cfg: ModelConfig, t_cfg: ModelConfig) -> dict:
  """The shapes and settings a peer reproduces, from the benchmarked config."""
  tc = config.student_train
  for name, cfg in (("student", s_cfg), ("teacher", t_cfg)):
    differ = [f for f in _LLAMA_FIELDS if getattr(cfg, f) != getattr(ModelConfig, f)]
    if differ:  # the peers build plain Llama decoders: they would time another model
      raise ValueError(f"--peers: config.{name}.{differ[0]}={getattr(cfg, differ[0])!r}, which "
                       "the peers' Llama decoders do not have; benchmark configs/bench_cpu.py "
                       "or a config of that family.")
  return {"vocab": s_cfg.vocab_size, "seq_len": int(config.data.seq_len),
          "batch": int(config.data.batch_size), "seed": int(config.seed),
          "teacher": _model_spec(t_cfg), "student": _model_spec(s_cfg),
          "temperature": float(config.distill.temperature), "alpha": float(config.distill.alpha),
          "optimizer": {"learning_rate": float(tc.learning_rate), "b1": float(tc.b1),
                        "b2": float(tc.b2), "eps": 1e-8, "weight_decay": float(tc.weight_decay),
                        "grad_clip": float(tc.grad_clip)}}


def command(peer: str, spec: dict, steps: int, warmup: int, dtype: str,
            tunix_python: str | None) -> list[str]:
  if peer == "tunix":
    if not tunix_python or not os.path.exists(tunix_python):
      raise ValueError(f"--tunix_python: {tunix_python!r} is not a Python; make Tunix's venv "
                       "(python -m venv DIR && DIR/bin/pip install -r requirements-tunix-peer.txt) "
                       "and pass --tunix_python=DIR/bin/python.")
    argv = [tunix_python, os.path.join(_HERE, "tunix_step.py")]
  elif peer in ("pytorch-eager", "pytorch-compile"):
    argv = [sys.executable, os.path.join(_HERE, "torch_step.py")]
    argv += ["--compile"] if peer == "pytorch-compile" else []
  else:
    raise ValueError(f"--peers: unknown {peer!r}; use any of {PEERS}.")
  return argv + ["--spec", json.dumps(spec), f"--steps={steps}", f"--warmup={warmup}",
                 f"--dtype={dtype}"]


def run(peer: str, spec: dict, steps: int, warmup: int, dtype: str,
        tunix_python: str | None = None) -> dict:
  """One peer's JSON row (its figures), or {"peer", "error"} with its stderr's last line."""
  out = subprocess.run(command(peer, spec, steps, warmup, dtype, tunix_python),
                       capture_output=True, text=True, check=False)
  lines = out.stdout.strip().splitlines()
  if out.returncode != 0 or not lines:
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"peer": peer, "error": f"exit {out.returncode}: {tail}"}
  return json.loads(lines[-1])
