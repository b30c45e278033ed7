"""kdjax sets XLA:CPU's library fusions (kdjax/__init__.py); these pin that what runs is correct.

jaxlib 0.10.2's YNNPACK element-wise and reduce fusions (each kind on its own, too) compute
`x + sum(w * x, -1)` wrongly when `w` is broadcast along x's leading axes and x has more than
2**15 elements: from the first row that crosses 2**15 elements on, every element is off. That is
the shape of a hand-written norm backward, so kdjax keeps only YNNPACK's dot fusion. The other
patterns here are what a training step is built of (JAX's own RMSNorm gradient, softmax and its
gradient, broadcasts, reductions over each axis), at sizes past 2**15 elements; all of them are
compared with numpy in float64 under the flags kdjax sets. With either fusion kind turned on,
the first two fail.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

RNG = np.random.default_rng(0)


def _normal(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def _rms_grad_jax(x, w, g):
  w_1xD = w.reshape((1,) * (x.ndim - 1) + w.shape)

  def rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w_1xD
  return jax.vjp(rms, x)[1](g)[0]


def _rms_grad_numpy(x, w, g):
  d = x.shape[-1]
  r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
  gw = g * w
  return gw * r - x * r**3 * (gw * x).sum(-1, keepdims=True) / d


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# (name, jax function, numpy reference, argument shapes): every argument is standard normal.
PATTERNS = [
    ("x + w * sum(w * x) (w broadcast)",
     lambda x, w: x + w[None] * jnp.sum(w[None] * x, -1, keepdims=True),
     lambda x, w: x + w * (w * x).sum(-1, keepdims=True), [(86, 24, 16), (24, 16)]),
    ("x + sum(w * x), rows of 11", lambda x, w: x + jnp.sum(w[None] * x, -1, keepdims=True),
     lambda x, w: x + (w * x).sum(-1, keepdims=True), [(3000, 11), (11,)]),
    ("RMSNorm backward [T, D]", _rms_grad_jax, _rms_grad_numpy, [(2048, 256), (256,), (2048, 256)]),
    ("RMSNorm backward [B, L, D]", _rms_grad_jax, _rms_grad_numpy,
     [(8, 256, 512), (512,), (8, 256, 512)]),
    ("softmax over the last axis", lambda a: jax.nn.softmax(a, -1), _softmax, [(8, 8, 64, 256)]),
    ("softmax backward", lambda a, g: jax.vjp(lambda a: jax.nn.softmax(a, -1), a)[1](g)[0],
     lambda a, g: _softmax(a) * (g - (g * _softmax(a)).sum(-1, keepdims=True)),
     [(16, 64, 256), (16, 64, 256)]),
    ("log-softmax of scaled logits", lambda a: jax.nn.log_softmax(a / 2.0, -1),
     lambda a: np.log(_softmax(a / 2.0)), [(1024, 8192)]),
    ("sum over the first axis (a bias or scale gradient)", lambda a, b: jnp.sum(a * b, 0),
     lambda a, b: (a * b).sum(0), [(4096, 64), (4096, 64)]),
    ("sum over a middle axis", lambda a: jnp.sum(a, 1), lambda a: a.sum(1), [(64, 128, 48)]),
    ("broadcast multiply and add", lambda a, b, c: a * b[None] + c[:, None],
     lambda a, b, c: a * b[None] + c[:, None], [(200, 300), (300,), (200,)]),
]


@pytest.mark.parametrize("name, fn, reference, shapes", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_pattern_is_computed_correctly_past_2_to_the_15(name, fn, reference, shapes):
  args = [_normal(*shape) for shape in shapes]
  assert max(np.prod(s) for s in shapes) > 2**15, name
  got = np.asarray(jax.jit(fn)(*args))
  want = reference(*[a.astype(np.float64) for a in args])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)


def test_the_guard_sees_the_miscompile_it_guards_against():
  """With YNNPACK's reduce fusion on, jaxlib 0.10.2 gets the first two patterns wrong: the
  patterns reach the fused code they are meant to check. (A jaxlib that fixes it fails this
  test: then the fusion can come back on, in kdjax/__init__.py.)"""
  flags = os.environ.get("XLA_FLAGS", "").replace(
      "--xla_cpu_experimental_ynn_fusion_type=dot", "")
  out = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", __file__,
       "-k", "past_2_to_the_15"], capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS=f"{flags} --xla_cpu_experimental_ynn_fusion_type=dot,reduce"),
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert "2 failed" in out.stdout, out.stdout[-2000:]
  assert "w broadcast" in out.stdout and "rows of 11" in out.stdout
