"""Device mesh and shardings derived from logical axis names.

Params are annotated with logical names in model.py; `config.sharding_rules` maps those names to
mesh axes; `jax.eval_shape` gives the abstract state, and `nn.logical_to_mesh_sharding` turns its
specs into NamedShardings. Nothing is written per parameter.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Rules apply in order and a mesh axis is used once per array, so 'batch' claims data+fsdp first
# and an activation's 'embed' stays unsharded while a param's 'embed' is FSDP-sharded.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
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
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the compiler propagates shardings from the constraints we give (GSPMD style).
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(config: Any) -> tuple[tuple[str, Any], ...]:
  rules = config.get("sharding_rules", None)
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax)
               for name, ax in rules) if rules else DEFAULT_RULES


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values; unboxed leaves replicate."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split over data and fsdp, replicated over tensor."""
  return NamedSharding(mesh, P(("data", "fsdp")))

