"""The optimizer: AdamW with global-norm clipping, weight decay by what a parameter is, and a
learning rate read from the training state's own step counter.

Two choices here are correctness, not taste:
  * Weight decay applies to weight matrices (Dense `kernel`s, the feature projection's `kernel`)
    and embedding tables (`embedding`), never to norm scales or biases, whatever their rank: under
    `nn.scan` a norm scale is stacked to [layers, D] and a QKV bias is [H, K], so a rank test
    would decay them, and `scan_layers` (which must not change the math) would change it.
  * The learning rate is `schedule(state.step)`, passed to `update(..., step=state.step)`. optax's
    own schedule counter only advances on applied updates, so after a skipped non-finite step
    (train.guarded_update keeps the old optimizer state) it would fall behind the step that the
    logged learning rate, alpha and temperature follow. Adam's bias correction keeps its own
    count, which is right: it counts the moments' updates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# Leaf names of the parameters that weight decay applies to (see the module docstring).
DECAYED_LEAVES = ("kernel", "embedding", "kernel_lora_a", "kernel_lora_b")


def decay_mask(params: Any) -> Any:
  """True for weight matrices and embedding tables, False for norm scales, biases and the rest."""
  def decayed(path, _):
    # The innermost dict key names the parameter (a boxed leaf adds an attribute key after it).
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in DECAYED_LEAVES
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_schedule(tc: Any) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine decay to `end_lr_fraction` of it at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.steps, tc.warmup_steps + 1),
      end_value=tc.learning_rate * tc.end_lr_fraction)


def scale_by_schedule_at_step(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by -schedule(step), `step` given to each update (no counter of its own)."""
  def update(updates, state, params=None, *, step, **extra_args):
    del params, extra_args
    lr = schedule(step)
    return jax.tree.map(lambda u: jnp.array(-lr, dtype=u.dtype) * u, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(tc: Any) -> optax.GradientTransformationExtraArgs:
  """AdamW (optax.adamw's chain) with clipping; `update` needs `step=` (the state's step)."""
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.scale_by_adam(b1=tc.b1, b2=tc.b2, eps=1e-8),
      optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
      scale_by_schedule_at_step(make_schedule(tc)))
