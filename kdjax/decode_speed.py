"""Decode speed: how fast kdjax's compiled greedy KV-cache generation (kdjax.sample) runs.

    speed = decode_speed(cfg, params, batch_sizes=(1, 32), prompt_tokens=32,
                         max_new_tokens=128, runs=5)

For each batch size B: B prompts of P tokens drawn with a fixed seed (no padding), one call that
compiles and warms up (`first_call_s`), then `runs` timed generations, each waited for before the
next. A generation is the whole `sample.generate` call: the prefill, then A new tokens per row.
Reported as medians over the runs:

  new_tokens_per_s = B * A / run time
  ms_per_token     = run time / A   (the time between two new tokens of a row, prefill included)

scripts/benchmark.py --generate prints these, side by side with transformers' `generate` on the
same model and prompts when asked (--hf_peer).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from kdjax import sample
from kdjax.model import ModelConfig

PROMPT_SEED = 0


def random_prompts(cfg: ModelConfig, batch: int, prompt_tokens: int) -> np.ndarray:
  """prompt_BxP: token ids drawn uniformly from the vocabulary, the same for the same shapes."""
  rng = np.random.default_rng(PROMPT_SEED)
  return rng.integers(0, cfg.vocab_size, size=(batch, prompt_tokens)).astype(np.int32)


def greedy_generator(cfg: ModelConfig, params: Any, prompt_BxP: np.ndarray,
                     max_new_tokens: int) -> Callable[[], np.ndarray]:
  """A function that runs greedy generation for these (unpadded) prompts and returns tokens_BxR
  on the host, so that its run time includes all the work."""
  prompt_BxP = np.asarray(prompt_BxP, np.int32)
  lengths_B = np.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], np.int32)
  placed_BxP = jax.device_put(prompt_BxP)

  def run() -> np.ndarray:
    return np.asarray(sample.generate(cfg, params, placed_BxP, max_new_tokens=max_new_tokens,
                                      prompt_lengths_B=lengths_B))

  return run


def timed(run: Callable[[], Any]) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def speed_row(run_s: Sequence[float], batch: int, max_new_tokens: int) -> dict[str, Any]:
  """The figures of one batch size from its timed runs (seconds each); see the module doc."""
  median = statistics.median(run_s)
  return {"new_tokens_per_s": round(batch * max_new_tokens / median, 1),
          "ms_per_token": round(1e3 * median / max_new_tokens, 3),
          "run_s": [round(t, 4) for t in run_s]}


def decode_speed(cfg: ModelConfig, params: Any, batch_sizes: Sequence[int] = (1, 32),
                 prompt_tokens: int = 32, max_new_tokens: int = 128,
                 runs: int = 5) -> dict[str, dict[str, Any]]:
  """Greedy decode speed of (cfg, params) at each batch size (see the module doc).

  Returns {str(batch): {'new_tokens_per_s', 'ms_per_token', 'run_s', 'first_call_s', 'batch',
  'prompt_tokens', 'max_new_tokens', 'params'}}: JSON-ready, keyed by batch size alone.
  """
  if runs < 1 or max_new_tokens < 1 or prompt_tokens < 1:
    raise ValueError("runs, max_new_tokens and prompt_tokens must be positive")
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  rows = {}
  for batch in batch_sizes:
    run = greedy_generator(cfg, params, random_prompts(cfg, batch, prompt_tokens), max_new_tokens)
    first_call_s = timed(run)
    rows[str(batch)] = {
        **speed_row([timed(run) for _ in range(runs)], batch, max_new_tokens),
        "first_call_s": round(first_call_s, 2), "batch": batch, "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens, "params": num_params}
  return rows
