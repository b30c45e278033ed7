"""Starting JAX's multi-controller runtime for a multi-host run.

Every host runs the same command; `jax.distributed.initialize` connects the processes through a
coordinator (process 0's address), after which `jax.devices()` lists every device of every host
and one jitted program spans them all. On Cloud TPU VMs, SLURM and Open MPI, JAX reads the
coordinator, process count and process id from the environment; elsewhere they come from the
`--coordinator_address`, `--num_processes` and `--process_id` flags.
"""

from __future__ import annotations

import os

import jax


def cluster_detected(environ=os.environ) -> bool:
  """Whether the environment describes a multi-process job that JAX can configure itself."""
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  # A multi-host TPU slice lists its workers; one TPU VM lists only itself.
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Connects this process to the others if the launch asks for it; returns whether it did.

  Must run before any JAX computation (the device list is fixed when the backend starts).
  """
  given = dict(coordinator_address=coordinator_address or None, num_processes=num_processes,
               process_id=process_id)
  if all(v is None for v in given.values()) and not cluster_detected():
    return False  # one process: nothing to connect
  # CPU processes exchange collectives over TCP with gloo (GPU and TPU have their own
  # interconnects; the option only affects the CPU client, so it is harmless there).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  return True
