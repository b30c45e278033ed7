"""Hugging Face transformers' `generate` on a kdjax model: the peer that
`scripts/benchmark.py --generate --hf_peer` times beside kdjax's own greedy decode.

The kdjax params go through kdjax.hf.save_pretrained (config.json and safetensors of the model's
family; Llama by default) into a temporary directory, and come back with
AutoModelForCausalLM.from_pretrained in float32: the same weights, so greedy decoding must give
the same tokens. Generation is greedy with no EOS and min_new_tokens = max_new_tokens, so both
sides produce exactly the A new tokens asked for; torch runs under inference_mode with one
thread per core (torch.set_num_threads), its attention the model's default (SDPA).

torch and transformers are imported here only, so the rest of the benchmark runs without them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import transformers

from kdjax import hf
from kdjax.model import ModelConfig


def load(cfg: ModelConfig, params: Any, hf_dir: str | None = None) -> Any:
  """The transformers model (float32, eval mode) of kdjax's (cfg, params), through an export;
  or the one in `hf_dir` when the kdjax model was loaded from there."""
  torch.set_num_threads(os.cpu_count() or 1)
  if hf_dir is None:
    with tempfile.TemporaryDirectory(prefix="kdjax-hf-peer-") as tmp:
      hf.save_pretrained(tmp, cfg, params)
      return _from_pretrained(tmp)
  return _from_pretrained(hf_dir)


def _from_pretrained(path: str) -> Any:
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval()


def greedy_generator(model: Any, prompt_BxP: np.ndarray,
                     max_new_tokens: int) -> Callable[[], np.ndarray]:
  """A function that runs `model.generate` greedily on these (unpadded) prompts and returns
  tokens_BxR as numpy, prompts first, as kdjax.decode_speed.greedy_generator does."""
  input_ids = torch.as_tensor(np.asarray(prompt_BxP, np.int64))
  attention_mask = torch.ones_like(input_ids)

  def run() -> np.ndarray:
    with torch.inference_mode():
      out = model.generate(input_ids, attention_mask=attention_mask,
                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return out.numpy()

  return run
