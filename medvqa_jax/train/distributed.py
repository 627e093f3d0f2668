"""Multi-host start-up: `jax.distributed.initialize()` when the run spans several processes.

Explicit values (the launchers' --coordinator_address/--num_processes/--process_id flags, or
JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID) win. Otherwise JAX detects the
cluster itself on a TPU VM pod slice (every worker runs the same command), under SLURM
(`srun`, one task per node) and under Open MPI (`mpirun`). A single process on one machine
needs nothing.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _auto_cluster() -> str | None:
  env = os.environ
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU pod slice"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the processes of a multi-host run (a no-op for a single process)."""
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs the process count and this process's id "
                       "(--num_processes/--process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (cluster := _auto_cluster()) is not None:
    log.info("multi-host run detected (%s)", cluster)
    jax.distributed.initialize()
  else:
    return
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
