"""When kdjax starts JAX's multi-controller runtime (the two-process run: test_multihost.py)."""

from kdjax import distributed


def test_cluster_detection_reads_the_launcher_environment():
  assert not distributed.cluster_detected({})
  assert not distributed.cluster_detected({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "host0"})
  assert distributed.cluster_detected({"SLURM_NTASKS": "4"})
  assert distributed.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
  # One process and no cluster: nothing to connect, JAX stays single-process.
  assert distributed.initialize() is False
