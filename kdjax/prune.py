"""Students initialised from the teacher: depth selection and activation-ranked width pruning.

    scores = activation_scores(t_cfg, t_params, calib_tokens_BxL)     # on a calibration batch
    s_cfg, s_params = prune_width(t_cfg, t_params, scores, num_heads=4, mlp_dim=256)  # Minitron
    s_cfg, s_params = select_layers(s_cfg, s_params, keep=[0, 2, 4])                   # DistilBERT
    save_model(directory, s_cfg, s_params)    # params + model_config.json beside them

Shape letters as in the glossary of kdjax/__init__.py: S layers, H query heads, N key/value heads,
G = H / N query heads per key/value head, F mlp width, U units kept.

Width pruning ranks units by their activation on real text (Minitron, Muralidharan et al. 2024):
a query head by the mean square of its attention output, an MLP neuron by the mean square of its
hidden activation, both sown by the model ('head_sq_H', 'neuron_sq_F'). Every layer keeps the same
number of units (one ModelConfig describes all layers), chosen per layer.

Grouped-query attention stays grouped: each kept key/value head serves the same number G' of query
heads. `num_kv_heads` (default: keep all) first keeps whole groups, ranked by the summed scores of
their query heads; then the top G' = num_heads / num_kv_heads query heads inside each kept group.
Multi-head attention (N = H) prunes heads by passing num_kv_heads = num_heads.

Invariants: kept units and layers keep their original order (indices ascending), so pruning that
keeps everything returns the teacher's config and param values unchanged (and its logits bitwise).
Which axis to cut is read from the params' logical axis names ('heads', 'kv_heads', 'mlp'), the
names sharding uses, so every optional param (biases, q/k norms, post-norms) is covered without a
list here; the result is checked against the new config's parameter shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kdjax.model import ModelConfig, Transformer

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
_LAYER = re.compile(r"layer_(\d+)")


# ----------------------------------------------------------------------------- param structure


@functools.lru_cache(maxsize=16)
def _boxed_shapes(cfg: ModelConfig) -> Any:
  """The param tree `init` builds, as boxed ShapeDtypeStructs: traced, nothing allocated."""
  return jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def _axis_names(cfg: ModelConfig) -> Any:
  """Each param's logical axis names, e.g. ('layers', 'embed', 'heads', 'head_dim')."""
  return jax.tree.map(lambda b: b.names, _boxed_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(cfg: ModelConfig) -> Any:
  """Unboxed ShapeDtypeStructs of `cfg`'s params."""
  return nn.meta.unbox(_boxed_shapes(cfg))


def _check_shapes(cfg: ModelConfig, params: Any) -> None:
  """A pruned tree must be exactly what `cfg` builds: catches a param that was not cut."""
  want = jax.tree.map(lambda s: s.shape, abstract_params(cfg))
  got = jax.tree.map(jnp.shape, params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise AssertionError(f"kdjax.prune: pruned params do not fit the pruned config "
                         f"(want {want}, got {got}); this is a bug in kdjax.prune.")


# ----------------------------------------------------------------------------- depth


def _window_fields(cfg: ModelConfig, keep: Sequence[int]) -> dict[str, int]:
  """`global_every` under which layer j of the student has the local/global kind of teacher layer
  keep[j]: the teacher's own value if it still fits, else 0 (all local), else the smallest period.
  All-global students keep `sliding_window` and get global_every = 1."""
  if cfg.sliding_window <= 0:
    return {}
  kinds = [cfg.is_local(i) for i in keep]
  for every in (cfg.global_every, 0, *range(1, len(keep) + 1)):
    trial = dataclasses.replace(cfg, global_every=every)
    if [trial.is_local(j) for j in range(len(keep))] == kinds:
      return {"global_every": every}
  pattern = "".join("L" if k else "G" for k in kinds)
  raise ValueError(
      f"select_layers: kept layers {list(keep)} have the local (L) / global (G) pattern "
      f"{pattern}, which no (sliding_window, global_every) expresses (a global layer every n-th, "
      "counting from 1); keep another set of layers.")


def select_layers(cfg: ModelConfig, params: Any,
                  keep: Sequence[int]) -> tuple[ModelConfig, Any]:
  """The student made of teacher layers `keep` (ascending, e.g. range(0, S, 2) as DistilBERT),
  each with its params and its local/global attention kind; everything else is shared."""
  params, keep = nn.meta.unbox(params), [int(i) for i in keep]
  if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= cfg.num_layers:
    raise ValueError(f"select_layers: keep={keep} must be distinct, ascending layer indices in "
                     f"[0, {cfg.num_layers}).")
  new_cfg = dataclasses.replace(cfg, num_layers=len(keep), **_window_fields(cfg, keep))
  if cfg.scan_layers:
    keep_S = np.asarray(keep)
    new = dict(params, layers=jax.tree.map(lambda x: jnp.take(x, keep_S, axis=0),
                                           params["layers"]))
  else:
    new = {k: v for k, v in params.items() if not _LAYER.fullmatch(k)}
    new.update({f"layer_{j}": params[f"layer_{i}"] for j, i in enumerate(keep)})
  _check_shapes(new_cfg, new)
  return new_cfg, new


# ----------------------------------------------------------------------------- scores


def _one(sown: tuple) -> jax.Array:
  (value,) = sown  # `sow` appends to a tuple, one entry per call; each layer runs once
  return value


@functools.lru_cache(maxsize=8)
def _sown_squares(cfg: ModelConfig):
  """Jitted (params, tokens, segment_ids, positions) -> (heads_SxH, neurons_SxF)."""
  model = Transformer(cfg)

  def sown(params, tokens_BxL, segment_ids_BxL, positions_BxL):
    # Final hidden states, not logits: nothing needs the unembedding (jit would drop it anyway).
    _, state = model.apply({"params": params}, tokens_BxL, segment_ids_BxL, positions_BxL,
                           return_final_hidden=True, mutable=["intermediates"])
    inter = state["intermediates"]
    # Under scan, the one sown entry is already stacked over layers.
    if cfg.scan_layers:
      layers = inter["layers"]
      return _one(layers["attn"]["head_sq_H"]), _one(layers["mlp"]["neuron_sq_F"])
    layers = [inter[f"layer_{i}"] for i in range(cfg.num_layers)]
    return (jnp.stack([_one(l["attn"]["head_sq_H"]) for l in layers]),
            jnp.stack([_one(l["mlp"]["neuron_sq_F"]) for l in layers]))

  return jax.jit(sown)


def activation_scores(cfg: ModelConfig, params: Any, tokens_BxL, segment_ids_BxL=None,
                      positions_BxL=None) -> dict[str, np.ndarray]:
  """{'heads': S x H, 'neurons': S x F} float32: mean squares over the batch's tokens of each query
  head's attention output (also over head_dim) and each MLP neuron's hidden activation.

  Every position counts, because the model sows means over all of them: the batch must hold no
  padding (segment id 0). Packed documents are fine (pass their segment ids and positions). For
  several calibration batches of one shape, average the results.
  """
  tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
  b, l = tokens_BxL.shape
  if segment_ids_BxL is None:
    segment_ids_BxL = np.ones((b, l), np.int32)
  if np.any(np.asarray(segment_ids_BxL) == 0):
    raise ValueError("activation_scores: the calibration batch has padding (segment id 0); the "
                     "sown means would count it. Use full rows of real tokens.")
  if positions_BxL is None:
    positions_BxL = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l))
  heads_SxH, neurons_SxF = _sown_squares(cfg)(
      params, tokens_BxL, jnp.asarray(segment_ids_BxL, jnp.int32),
      jnp.asarray(positions_BxL, jnp.int32))
  return {"heads": np.asarray(heads_SxH), "neurons": np.asarray(neurons_SxF)}


# ----------------------------------------------------------------------------- width


def _top(scores_U: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores, ascending; ties keep the lower index."""
  return np.sort(np.argsort(-scores_U, kind="stable")[:k])


def _select_heads(heads_SxH: np.ndarray, num_kv: int, new_kv: int,
                  new_heads: int) -> tuple[np.ndarray, np.ndarray]:
  """(query heads S x H', key/value heads S x N') to keep, groups intact (see the docstring)."""
  g, new_g = heads_SxH.shape[1] // num_kv, new_heads // new_kv
  q_SxH, kv_SxN = [], []
  for heads_H in heads_SxH:
    heads_NxG = heads_H.reshape(num_kv, g)  # query heads n*G .. n*G+G-1 share key/value head n
    groups = _top(heads_NxG.sum(axis=1), new_kv)
    q_SxH.append(np.concatenate([n * g + _top(heads_NxG[n], new_g) for n in groups]))
    kv_SxN.append(groups)
  return np.stack(q_SxH), np.stack(kv_SxN)


def _check_width(cfg: ModelConfig, h: int, n: int, f: int) -> None:
  g = cfg.num_heads // cfg.num_kv_heads
  if not 1 <= n <= cfg.num_kv_heads:
    raise ValueError(f"prune_width: num_kv_heads={n} must be in [1, {cfg.num_kv_heads}].")
  if h % n or not 1 <= h // n <= g:
    raise ValueError(
        f"prune_width: num_heads={h} must be num_kv_heads={n} times a query-group size in "
        f"[1, {g}] (the teacher has {cfg.num_kv_heads} key/value heads of {g} query heads); to "
        "prune whole groups, lower num_kv_heads too (multi-head attention: num_kv_heads = "
        "num_heads).")
  if not 1 <= f <= cfg.mlp_dim:
    raise ValueError(f"prune_width: mlp_dim={f} must be in [1, {cfg.mlp_dim}].")


def _take_units(cfg: ModelConfig, params: Any, index: Mapping[str, np.ndarray]) -> Any:
  """Cuts every param axis named in `index` (logical name -> S x U kept indices) per layer."""

  def take(path, x, names):
    top = path[0].key  # 'layers' (scanned: axis 0 is the layer), 'layer_<i>', or not a layer
    for axis, name in enumerate(names):
      if name not in index:
        continue
      idx_SxU = jnp.asarray(index[name])
      if top == "layers":  # one row of indices per layer
        x = jax.vmap(functools.partial(jnp.take, axis=axis - 1))(x, idx_SxU)
      else:
        x = jnp.take(x, idx_SxU[int(_LAYER.fullmatch(top).group(1))], axis=axis)
    return x

  return jax.tree_util.tree_map_with_path(take, params, _axis_names(cfg))


def prune_width(cfg: ModelConfig, params: Any, scores: Mapping[str, np.ndarray], *,
                num_heads: int | None = None, num_kv_heads: int | None = None,
                mlp_dim: int | None = None) -> tuple[ModelConfig, Any]:
  """Keeps the top-scoring query heads (groups intact) and MLP neurons of every layer.

  `scores` is `activation_scores`' dict (S x H heads, S x F neurons); None keeps a width as it is.
  The head dim is unchanged (made explicit in the config when the head count changes).
  """
  h = cfg.num_heads if num_heads is None else int(num_heads)
  n = cfg.num_kv_heads if num_kv_heads is None else int(num_kv_heads)
  f = cfg.mlp_dim if mlp_dim is None else int(mlp_dim)
  _check_width(cfg, h, n, f)
  heads_SxH = np.asarray(scores["heads"], np.float64)
  neurons_SxF = np.asarray(scores["neurons"], np.float64)
  if (heads_SxH.shape != (cfg.num_layers, cfg.num_heads)
      or neurons_SxF.shape != (cfg.num_layers, cfg.mlp_dim)):
    raise ValueError(f"prune_width: scores of shapes {heads_SxH.shape}, {neurons_SxF.shape} do "
                     f"not fit the config (S={cfg.num_layers}, H={cfg.num_heads}, "
                     f"F={cfg.mlp_dim}).")
  if not (np.all(np.isfinite(heads_SxH)) and np.all(np.isfinite(neurons_SxF))):
    raise ValueError("prune_width: scores must be finite.")
  q_SxU, kv_SxU = _select_heads(heads_SxH, cfg.num_kv_heads, n, h)
  index = {"heads": q_SxU, "kv_heads": kv_SxU,
           "mlp": np.stack([_top(s_F, f) for s_F in neurons_SxF])}
  new_cfg = dataclasses.replace(cfg, num_heads=h, num_kv_heads=n, mlp_dim=f,
                                head_dim=cfg.head_size if h != cfg.num_heads else cfg.head_dim)
  new = _take_units(cfg, nn.meta.unbox(params), index)
  _check_shapes(new_cfg, new)
  return new_cfg, new


# ----------------------------------------------------------------------------- files


def save_model(directory: str, cfg: ModelConfig, params: Any) -> None:
  """Writes `directory/params` (Orbax) and `directory/model_config.json` (the ModelConfig's
  fields) beside them; the config is written last, so its presence means a complete model.
  Refuses an existing model there: a teacher's files are never overwritten."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  params_path = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(config_path) or os.path.exists(params_path):
    raise FileExistsError(f"save_model: {directory} already holds a model; choose a new "
                          "directory.")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_path, nn.meta.unbox(params))
  with open(config_path + ".tmp", "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)
  os.replace(config_path + ".tmp", config_path)


def load_model(directory: str) -> tuple[ModelConfig, Any]:
  """(cfg, params) as `save_model` wrote them, params on the default device."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                      abstract_params(cfg))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), like)
  return cfg, params
