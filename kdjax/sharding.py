"""Device mesh and shardings derived from logical axis names.

Params are annotated with logical names in model.py; `config.sharding_rules` maps those names to
mesh axes; `jax.eval_shape` gives the abstract state, and `logical_shardings` turns its specs into
NamedShardings. Nothing is written per parameter. Activations carry logical constraints too; they
bind only inside `activation_rules(rules)` and a mesh context (`jax.set_mesh`), which the compiled
steps enter while they trace.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Rules apply in order and a mesh axis is used once per array, so 'batch' claims data+fsdp first
# and an activation's 'embed' stays unsharded while a param's 'embed' is FSDP-sharded.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with at most one -1 filled by the remaining devices."""
  sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
        f"config.mesh: sizes {dict(zip(MESH_AXES, sizes))} are invalid; use positive sizes and "
        "at most one -1 (the remaining devices).")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices cannot be split into "
                       f"{dict(zip(MESH_AXES, sizes))}; make the fixed sizes divide {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices but {num_devices} are present; set sizes whose product is "
                     f"{num_devices} (or use -1 for one axis).")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
  auto = (AxisType.Auto,) * len(MESH_AXES)  # the compiler propagates from our constraints
  if devices is None:
    # jax.make_mesh orders devices by the physical topology (ICI/NVLink neighbours share the
    # inner axes) and keeps each process's devices together, as multi-host data loading needs.
    shape = mesh_shape(mesh_cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  devices = list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def abstract_mesh(mesh_cfg: Any, num_devices: int) -> AbstractMesh:
  """A device-free mesh of `num_devices`, to size shardings for hardware that is not here."""
  return AbstractMesh(mesh_shape(mesh_cfg, num_devices), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_rules(rules: Sequence[Sequence[Any]] | None) -> Rules | None:
  """Config lists ([['batch', ['data', 'fsdp']], ...]) as flax's rule tuples; empty -> None."""
  if not rules:
    return None
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in rules)


def rules_from_config(config: Any) -> Rules:
  return parse_rules(config.sharding_rules) or DEFAULT_RULES


def _axis_size(mesh, axes) -> int:
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes if a is not None)


_NOTES_SAID: set[str] = set()


def _note_once(message: str) -> None:
  """Prints `message` on stderr the first time this process meets it (process 0 only)."""
  if message not in _NOTES_SAID and jax.process_index() == 0:
    print(message, file=sys.stderr)
  _NOTES_SAID.add(message)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
  """Drops the mesh axes of dims they do not divide (e.g. 2 KV heads on a tensor axis of 8).

  Such a dim is replicated instead: correct, and what a user of grouped-query attention with
  few KV heads wants, where jit would otherwise refuse the whole sharding.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is not None and dim % _axis_size(mesh, axes):
      _note_once(f"note: a parameter dimension of size {dim} is not divisible by mesh axes "
                 f"{axes} (size {_axis_size(mesh, axes)}); it is replicated over them instead. "
                 "Choose mesh sizes that divide it to shard it.")
      axes = None
    fitted.append(axes)
  return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh | AbstractMesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values; unboxed leaves replicate."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
  shapes = nn.meta.unbox(abstract_tree)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
                      specs, shapes, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh | AbstractMesh) -> NamedSharding:
  """Batches split over data and fsdp, replicated over tensor."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh | AbstractMesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value that every process holds in full (eval batches, prompts).

  Each process places only the slices its own devices hold, so this works on one host or many.
  """
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


@contextlib.contextmanager
def activation_rules(rules: Rules | None):
  """Binds the model's activation constraints to `rules` while a function traces (None: off)."""
  if rules is None:
    yield
    return
  with nn.logical_axis_rules(rules):
    yield


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes the largest shard of every leaf takes on one device (uneven splits round up)."""
  def leaf_bytes(x, s: NamedSharding) -> int:
    shard = [math.ceil(d / _axis_size(s.mesh, axes)) if axes is not None else d
             for d, axes in zip(x.shape, tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec)))]
    return math.prod(shard) * np.dtype(x.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(leaf_bytes, abstract_tree, shardings)))
