"""The training state: TrainState, its init (created already sharded) and its abstract twin.

Params are built as flax lm1b does: `eval_shape` of the init gives boxed abstract params whose
logical axis names become `NamedSharding`s (kdjax.sharding), and `jit(init, out_shardings=...)`
creates every array directly in its place. `abstract_train_state` gives the same tree without
allocating anything, which is what a checkpoint restores into and what ahead-of-time compilation
lowers against.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from kdjax import features, lora, qwix_model, sharding
from kdjax.model import ModelConfig, Transformer


@flax.struct.dataclass
class TrainState:
  # int32 scalar: training steps taken (batches consumed), skipped non-finite steps included.
  # The learning rate, alpha, temperature and feature-weight schedules all read this one counter.
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key data, advanced every step and checkpointed for sampling
  skipped_steps: jax.Array  # int32: steps whose update was skipped for a non-finite loss/grad
  nonfinite_streak: jax.Array  # int32: consecutive such steps up to now (0 after a good one)
  # Trained state that is not the model: {'projection': ...} of feature distillation when widths
  # differ (kdjax.features), else None. Optimized with the params; never exported or evaluated.
  aux_params: Any = None
  # A LoRA student's frozen base (kdjax.lora): read by the model, never differentiated, updated
  # or checkpointed (params then holds the adapters alone). None for every other model.
  frozen_params: Any = None

  @property
  def trainable(self) -> Any:
    """What the optimizer updates: the params alone (so an optimizer state without feature
    distillation is what it always was), or (params, aux_params)."""
    return trainable(self.params, self.aux_params)


def trainable(params: Any, aux_params: Any) -> Any:
  return params if aux_params is None else (params, aux_params)


def _dummy_tokens(model_cfg: ModelConfig) -> jax.Array:
  return jnp.zeros((1, min(8, model_cfg.max_len)), jnp.int32)


def init_params(model_cfg: ModelConfig, rng: jax.Array, mesh, rules) -> Any:
  """Params created already sharded: eval_shape -> logical specs -> jit(out_shardings)."""
  model = Transformer(model_cfg)
  init = lambda r: model.init(r, _dummy_tokens(model_cfg))["params"]
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng), mesh, rules)
  return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def lora_seed_base(model_cfg: ModelConfig, seed: int, mesh, rules) -> Any:
  """A LoRA student's frozen base when it has no init of its own: the plain model's params from
  `seed`, the base that create_train_state's init made."""
  return init_params(model_cfg.plain, jax.random.key(seed), mesh, rules)


def trained_params_like(model_cfg: ModelConfig, mesh, rules) -> tuple[Any, Any]:
  """(abstract params, shardings) of what TrainState.params holds and a phase's checkpoints
  save: the model's params, or a LoRA student's adapters alone (kdjax.lora)."""
  model = qwix_model.build(model_cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_tokens(model_cfg)))
  boxed = boxed["params"]
  if model_cfg.lora.rank:
    boxed = lora.split(boxed)[1]
  return nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)


def abstract_params(model_cfg: ModelConfig) -> Any:
  """The params' ShapeDtypeStructs (unboxed), with nothing allocated."""
  model = Transformer(model_cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_tokens(model_cfg)))
  return nn.meta.unbox(boxed["params"])


def param_shardings(model_cfg: ModelConfig, mesh, rules) -> Any:
  model = Transformer(model_cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_tokens(model_cfg)))
  return sharding.logical_shardings(abstract["params"], mesh, rules)


def _boxed_init(model_cfg: ModelConfig, tx, seed: int, plan: features.FeaturePlan | None):
  model = qwix_model.build(model_cfg)

  def init(rng_data):
    rng = jax.random.wrap_key_data(rng_data)
    params = model.init(rng, _dummy_tokens(model_cfg))["params"]
    frozen = None
    if model_cfg.lora.rank:  # the optimizer and checkpoints see the adapters alone
      params = lora.split(params)[1]
      # The base is the plain model's init (Qwix's LoRA init draws other keys), which
      # lora_seed_base rebuilds on resume.
      frozen = Transformer(model_cfg.plain).init(rng, _dummy_tokens(model_cfg))["params"]
    aux_params = None
    if plan is not None and plan.projection:
      # Its own stream of the seed: the student's params are the same with or without it.
      aux_params = {"projection": features.init_projection(
          plan, jax.random.fold_in(jax.random.key(seed), 2))}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(trainable(params, aux_params)),
                      rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
                      skipped_steps=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32), aux_params=aux_params,
                      frozen_params=frozen)

  return init


def create_train_state(model_cfg: ModelConfig, tx, seed: int, mesh, rules, *,
                       t_cfg: ModelConfig | None = None, distill=None):
  """Returns (state, state_shardings): a fresh, sharded TrainState built from `seed`.

  With `t_cfg` and `distill` (settings.DistillSettings) asking for hidden-state distillation
  between different widths, the state also holds the learned projection (`aux_params`) and its
  optimizer state.
  """
  init = _boxed_init(model_cfg, tx, seed, features.make_plan(distill, model_cfg, t_cfg))
  rng_data = jax.random.key_data(jax.random.key(seed))
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng_data), mesh, rules)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng_data)
  return state, shardings


def abstract_train_state(model_cfg: ModelConfig, tx, seed: int, mesh, rules, *,
                         t_cfg: ModelConfig | None = None, distill=None):
  """(abstract state, state_shardings) of `create_train_state`, with nothing allocated or
  compiled: enough to restore a checkpoint into (checkpoint.PhaseCheckpoints.restore)."""
  init = _boxed_init(model_cfg, tx, seed, features.make_plan(distill, model_cfg, t_cfg))
  boxed = jax.eval_shape(init, jax.random.key_data(jax.random.key(seed)))
  return nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)
