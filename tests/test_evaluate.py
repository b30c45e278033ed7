"""Held-out metrics: exact token-weighted means, whatever the batch boundaries."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import evaluate
from kdjax.model import ModelConfig, Transformer

T_CFG = ModelConfig(vocab_size=24, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=32, max_len=16)
S_CFG = dataclasses.replace(T_CFG, d_model=8, num_heads=1)


def _batches(rng, n=3, b=2, l=8):
  out = []
  for i in range(n):
    toks = rng.integers(4, 24, size=(b, l + 1)).astype(np.int32)
    mask = np.ones((b, l), np.float32)
    mask[-1, rng.integers(1, l):] = 0.0  # uneven real-token counts across batches
    seg = mask.astype(np.int32)
    out.append({"inputs": toks[:, :-1] * seg, "targets": toks[:, 1:] * seg, "segment_ids": seg,
                "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)) * seg, "mask": mask})
  return out


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
# chunk_size 6 of a 2 x 8 batch: 3 positions per row, a ragged last chunk of padding.
@pytest.mark.parametrize("chunk_size", [0, 6])
def test_metrics_equal_a_direct_numpy_computation_over_all_tokens(chunk_size):
  rng = np.random.default_rng(0)
  # jit: one compile per model instead of one per operation of an eager forward.
  s_apply, t_apply = jax.jit(Transformer(S_CFG).apply), jax.jit(Transformer(T_CFG).apply)
  s_params = jax.jit(Transformer(S_CFG).init)(jax.random.key(0),
                                              jnp.zeros((1, 4), jnp.int32))["params"]
  t_params = jax.jit(Transformer(T_CFG).init)(jax.random.key(1),
                                              jnp.zeros((1, 4), jnp.int32))["params"]
  batches = _batches(rng)
  got = evaluate.evaluate(S_CFG, s_params, T_CFG, t_params, batches, chunk_size=chunk_size)

  nll, agree, agree5, kl, correct, conf, n = [], [], [], [], [], [], 0
  for batch in batches:
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    s = np.asarray(s_apply({"params": s_params}, *args), np.float64)
    t = np.asarray(t_apply({"params": t_params}, *args), np.float64)
    s_lp, t_lp = _log_softmax(s), _log_softmax(t)
    real = batch["mask"] > 0
    lab = batch["targets"]
    nll += list(-np.take_along_axis(s_lp, lab[..., None], -1)[..., 0][real])
    agree += list((s.argmax(-1) == t.argmax(-1))[real])
    top5 = np.argsort(-s, axis=-1, kind="stable")[..., :5]
    agree5 += list((top5 == t.argmax(-1)[..., None]).any(-1)[real])
    conf += list(np.exp(s_lp).max(-1)[real])
    correct += list((s.argmax(-1) == lab)[real])
    kl += list((np.exp(t_lp) * (t_lp - s_lp)).sum(-1)[real])
    n += int(real.sum())
  np.testing.assert_allclose(got["loss"], np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(got["ppl"], math.exp(np.mean(nll)), rtol=1e-5)
  np.testing.assert_allclose(evaluate.held_out_loss(S_CFG, s_params, batches,
                                                    chunk_size=chunk_size), np.mean(nll),
                             rtol=1e-5)
  np.testing.assert_allclose(got["top1_agreement"], np.mean(agree), rtol=1e-6)
  np.testing.assert_allclose(got["accuracy"], np.mean(correct), rtol=1e-6)
  np.testing.assert_allclose(got["kl_to_teacher"], np.mean(kl), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["top5_agreement"], np.mean(agree5), rtol=1e-6)
  assert got["top5_agreement"] >= got["top1_agreement"]
  # ECE from its definition: 15 equal-width confidence bins, |accuracy - confidence| per bin.
  conf, correct = np.asarray(conf), np.asarray(correct, np.float64)
  bins = np.minimum((conf * 15).astype(int), 14)
  ece = sum(np.sum(bins == e) / n * abs(correct[bins == e].mean() - conf[bins == e].mean())
            for e in range(15) if np.any(bins == e))
  np.testing.assert_allclose(got["ece"], ece, rtol=1e-5, atol=1e-7)
  assert got["tokens"] == n

  self_eval = evaluate.evaluate(T_CFG, t_params, T_CFG, t_params, batches, chunk_size=chunk_size)
  assert self_eval["top1_agreement"] == 1.0 and abs(self_eval["kl_to_teacher"]) < 1e-6
  assert self_eval["top5_agreement"] == 1.0
