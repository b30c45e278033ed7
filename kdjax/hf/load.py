"""Reading a Hugging Face model directory's safetensors into sharded kdjax params.

Loading reads one tensor at a time from the memory-mapped safetensors files, once each, straight
into this host's shards of the target sharding: the host holds at most one param (all layers of,
say, the MLP up-projection) besides the mapped files, and no device more than its shard. Nothing
is unpickled: a directory with only PyTorch .bin files is refused. Every check (each tensor there,
of a shape that fits, none left over) runs on the files' headers before any data is read.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from kdjax import state
from kdjax.hf import params_map
from kdjax.hf.config import HFError, model_config, read_config
from kdjax.model import ModelConfig


class _Tensors:
  """Memory-mapped tensors of a model directory's safetensors, read one at a time.

  The files are those model.safetensors.index.json names, else model.safetensors, else every
  *.safetensors: some repositories keep other formats' files beside them (Mistral's
  consolidated.safetensors)."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted({os.path.join(path, n) for n in json.load(f)["weight_map"].values()})
      missing = [f for f in files if not os.path.isfile(f)]
      if missing:
        raise HFError(f"{path}: {os.path.basename(missing[0])}, named in "
                      "model.safetensors.index.json, is missing; download the whole model.")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
      files = [os.path.join(path, "model.safetensors")]
    else:
      files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
      hint = (" It has PyTorch pickles (.bin), which kdjax never loads: convert them to "
              "safetensors first (transformers' save_pretrained(..., safe_serialization=True))."
              if bins else "")
      raise HFError(f"{path}: no *.safetensors files.{hint}")
    self._handles = [safe_open(f, framework="numpy") for f in files]
    self._where = {name: h for h in self._handles for name in h.keys()}

  def names(self) -> set[str]:
    return set(self._where)

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get_tensor(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name].get_slice(name).get_shape())

  def dtype(self) -> str:
    """The dtype of the first tensor (read from the header; no data is read)."""
    name = sorted(self._where)[0]
    kind = self._where[name].get_slice(name).get_dtype()
    return {"BF16": "bfloat16", "F32": "float32", "F16": "float32"}.get(kind, "float32")


def check_checkpoint(path: str, cfg: ModelConfig) -> None:
  """Raises HFError unless `path`'s safetensors hold exactly `cfg`'s params (reads headers only)."""
  _plan(path, cfg)


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh=None, rules=None, scan_layers: bool = True) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of a Hugging Face model directory."""
  hf = read_config(path)
  if not (param_dtype or hf.get("dtype") or hf.get("torch_dtype")):
    param_dtype = _Tensors(path).dtype()  # config.json does not say: the tensors do
  cfg = model_config(hf, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  return cfg, load_params(path, cfg, mesh, rules)


def load_params(path: str, cfg: ModelConfig, mesh=None, rules=None) -> Any:
  """Params for `cfg` from the safetensors in `path`, placed as kdjax.state.param_shardings
  would (on one device when `mesh` is None), in `cfg.param_dtype`."""
  tensors, leaves, entries = _plan(path, cfg)
  abstract = jax.tree_util.tree_unflatten(
      jax.tree.structure(params_map.abstract_params(cfg)), [like for _, like in leaves])
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = state.param_shardings(cfg, mesh, rules)
  param_dtype = jnp.dtype(cfg.param_dtype)

  def one_layer(p, i):
    entry = entries[p, i]
    return np.asarray(entry.to_kdjax(*[tensors.get(n) for n in entry.names])).astype(param_dtype)

  arrays = []
  for p, like in leaves:
    layer, _ = params_map.layer_path(p, cfg)
    reads = ([(i, functools.partial(one_layer, p, i)) for i in range(cfg.num_layers)]
             if layer == -1 else [(None, functools.partial(one_layer, p, layer))])
    arrays.append(_place(like.shape, _leaf(shardings, p), param_dtype, reads))
  return jax.tree_util.tree_unflatten(jax.tree.structure(abstract), arrays)


def _plan(path: str, cfg: ModelConfig) -> tuple[_Tensors, list, dict]:
  """(tensors, kdjax leaves, {(leaf path, layer): Entry}) after checking, from the files'
  headers alone, that every tensor is there, fits its kdjax param's shape, and has a place."""
  family = cfg.family or "llama"
  tensors = _Tensors(path)
  names = tensors.names()
  leaves = [(tuple(k.key for k in kp), like) for kp, like in
            jax.tree_util.tree_flatten_with_path(params_map.abstract_params(cfg))[0]]
  entries = {}
  for p, like in leaves:
    layer, inner = params_map.layer_path(p, cfg)
    want = like.shape[1:] if layer == -1 else like.shape
    for i in (range(cfg.num_layers) if layer == -1 else [layer]):
      entries[p, i] = entry = params_map.entry_for(cfg, family, inner, i, names)
      _check_entry(path, tensors, names, entry, p, want)
  used = {n for e in entries.values() for n in e.names}
  ignored = params_map.IGNORED_SUFFIXES + (("lm_head.weight",) if cfg.tie_embeddings else ())
  unused = sorted(n for n in names - used if not n.endswith(ignored))
  if unused:
    raise HFError(f"{path}: tensors {unused[:3]}{'...' if len(unused) > 3 else ''} have no "
                  f"place in a {family} model with this config.json; they disagree.")
  return tensors, leaves, entries


def _check_entry(path: str, tensors: _Tensors, names: set[str], entry: params_map.Entry,
                 p: tuple[str, ...], want: tuple[int, ...]) -> None:
  """Raises HFError unless `entry`'s tensors are among `names` (those of `tensors`) and convert
  to kdjax's shape `want` for param `p`."""
  missing = [n for n in entry.names if n not in names]
  if missing:
    raise HFError(f"{path}: tensor {missing[0]} (for kdjax's {'/'.join(p)}) is missing; the "
                  "safetensors do not fit config.json.")
  shapes = [jax.ShapeDtypeStruct(tensors.shape(n), jnp.float32) for n in entry.names]
  try:
    got = jax.eval_shape(entry.to_kdjax, *shapes).shape
  except (TypeError, ValueError):  # a reshape that cannot fit
    got = None
  if got != want:
    raise HFError(f"{path}: {entry.names[0]} has shape {shapes[0].shape}, which does not "
                  f"give kdjax's {'/'.join(p)} {want}; the safetensors do not fit "
                  "config.json.")


def _place(shape, sharding, dtype, layers) -> jax.Array:
  """One param as a global array in `sharding`, from `layers`: (layer index, or None for an
  unstacked param; a function reading that layer's value in kdjax's layout).

  Each layer is read and converted once, then copied into this process's distinct shards, which
  go to their devices: host memory peaks at this param's local shards (at most the param once),
  and layers that only other hosts hold are not read here."""
  index_map = sharding.addressable_devices_indices_map(shape)
  key = lambda index: tuple((s.start, s.stop) for s in index)  # equal shards share a buffer
  buffers = {}
  for index in index_map.values():
    if key(index) not in buffers:
      buffers[key(index)] = (index, np.empty(_sliced_shape(shape, index), dtype))
  for layer, read in layers:
    needed = [(index, buf) for index, buf in buffers.values()
              if layer is None or layer in range(shape[0])[index[0]]]
    if not needed:
      continue
    value = read()
    for index, buf in needed:
      if layer is None:
        buf[...] = value[index]
      else:
        buf[layer - range(shape[0])[index[0]].start] = value[index[1:]]
  shards = [jax.device_put(buffers[key(index)][1], device) for device, index in index_map.items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _sliced_shape(shape, index) -> tuple[int, ...]:
  return tuple(len(range(n)[s]) for n, s in zip(shape, index))


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree
