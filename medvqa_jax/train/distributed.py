"""Multi-host start-up: `jax.distributed.initialize()` when the run spans several processes.

Explicit values (the launchers' --coordinator_address/--num_processes/--process_id flags, or
JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID) win, but for a count or an
index other than srun's under srun, which is refused. Otherwise JAX detects the
cluster itself under SLURM (`srun`; the coordinator's address, on the step's first node, is
set here), under Open MPI up to version 4 (`mpirun`) and on a TPU
VM pod slice (every worker runs the same command; `launch/tpu_pod.sh` sets
MEDVQA_DISTRIBUTED=1, since a TPU VM's environment need not show that it is part of a slice).
MEDVQA_DISTRIBUTED=1 asks for the same detection anywhere else (under a launcher that counts
one process it joins nothing). Other launchers (Open MPI 5, MPICH, Intel MPI, Cray PALS,
torchrun) need --coordinator_address; the process count and index are then read from their
variables. A single process on one machine needs nothing; a
process count or index with no way to join is refused.

One process per host drives all of that host's GPUs. JAX's cluster detection assumes one
process per GPU (it restricts each process to the GPU of its local rank), so when there is one
process per host it is told to keep all the GPUs it sees. With one process per GPU, each is
given the GPU of its local rank under the launchers JAX does not detect too (every process
would take every GPU otherwise), or all it sees where it was given GPUs of its own.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import zlib
from typing import NamedTuple

import jax

log = logging.getLogger(__name__)


def _int(*names: str) -> int | None:
  """The first of the variables `names` that holds a count or index."""
  for name in names:
    value = os.environ.get(name, "").strip()
    if value.isdigit():
      return int(value)
  return None


# What JAX's SLURM detection reads: set for the tasks of an `srun` step.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
# Open MPI up to version 4: what JAX's Open MPI detection reads (5 and later do not set it).
_ORTE_URI = "OMPI_MCA_orte_hnp_uri"


class _Launcher(NamedTuple):
  """A launcher's variables: the process count, this process's index, the processes on this
  host and this process's index among them (the first set of those named)."""
  size: str
  rank: str
  local_size: tuple[str, ...]
  local_rank: tuple[str, ...]
  name: str


# Launchers whose processes JAX does not join by itself. With a coordinator address given,
# the count and index are read from their variables.
_OTHER_LAUNCHERS = (
    _Launcher("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_LOCAL_SIZE",),
              ("OMPI_COMM_WORLD_LOCAL_RANK",),
              "Open MPI 5 or later (JAX detects Open MPI up to 4)"),
    # MPICH's and Intel MPI's Hydra name the local ones MPI_LOCAL*, Cray PALS PMI_LOCAL_*.
    _Launcher("PMI_SIZE", "PMI_RANK", ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"),
              ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), "MPICH, Intel MPI or Cray PALS"),
    _Launcher("WORLD_SIZE", "RANK", ("LOCAL_WORLD_SIZE",), ("LOCAL_RANK",),
              "torchrun or a launcher like it"))


def _slurm_tasks() -> int:
  return _int("SLURM_NTASKS", "SLURM_NPROCS") or 1


def _launchers() -> list[_Launcher]:
  """The launchers whose variables count several processes, innermost first: one run inside
  a Slurm job (torchrun under srun; mpirun, whose ranks inherit the srun step of the daemons
  it starts) has a count of its own, where srun's own PMI count is Slurm's task count."""
  found = [other for other in _OTHER_LAUNCHERS if (_int(other.size) or 1) > 1]
  return sorted(found, key=lambda other: _int(other.size) == _slurm_tasks())


def _auto_cluster(launchers: list[_Launcher], explicit: bool = False) -> str | None:
  """The cluster JAX detects, if any. launchers: `_launchers()`. explicit: a coordinator
  address was given (the cluster then only tells how many processes share a host)."""
  env = os.environ
  tasks = _slurm_tasks()
  # A launcher run inside a Slurm job has processes of its own, not Slurm's tasks: it, not
  # Slurm, says who joins.
  inside = bool(launchers) and _int(launchers[0].size) != tasks
  if tasks > 1 and not inside:
    unset = [v for v in _SLURM_STEP if v not in env]
    if not unset:
      return "SLURM"
    if not explicit:
      raise ValueError(
          f"SLURM_NTASKS={tasks}, but this process is not a task of an srun step "
          f"({', '.join(unset)} unset): launch the run with srun (launch/slurm.sbatch), or "
          "run one process with SLURM_NTASKS unset (e.g. `env -u SLURM_NTASKS -u "
          "SLURM_NPROCS python ...`)")
  if (_int("OMPI_COMM_WORLD_SIZE") or 1) > 1 and (_ORTE_URI in env or explicit):
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU pod slice"
  if env.get("MEDVQA_DISTRIBUTED", "") not in ("", "0"):
    # A launcher that counts one process (srun with one task, mpirun -np 1): nothing to join.
    # Asked to join, JAX would detect the launcher and keep the process to one GPU.
    single = [name for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                                "WORLD_SIZE") if _int(name) == 1]
    if single:
      log.info("MEDVQA_DISTRIBUTED is set, but %s=1: one process, nothing to join", single[0])
      return None
    return "MEDVQA_DISTRIBUTED"
  return None


def _slurm_tasks_here() -> int | None:
  """The srun step's tasks on this node: its entry (SLURM_NODEID) in SLURM_STEP_TASKS_PER_NODE
  or SLURM_TASKS_PER_NODE ("2(x3),1": 2 on each of the first three nodes, 1 on the fourth),
  which also covers uneven layouts; else SLURM_NTASKS_PER_NODE, or the tasks over the nodes
  where they divide evenly."""
  node = _int("SLURM_NODEID")
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    counts = []
    for entry in os.environ.get(name, "").split(","):
      match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", entry)
      if match is None:
        counts = []
        break
      counts += [int(match[1])] * int(match[2] or 1)
    if node is not None and node < len(counts):
      return counts[node]
  per_node = _int("SLURM_NTASKS_PER_NODE")
  if per_node is None:
    tasks, nodes = _slurm_tasks(), _int("SLURM_NNODES")
    per_node = tasks // nodes if nodes and tasks % nodes == 0 else None
  return per_node


def _host_layout(cluster: str | None,
                 launcher: _Launcher | None) -> tuple[int | None, int | None, bool]:
  """(processes on this host, this process's index among them, whether the launcher gave it
  GPUs of its own), where the launcher says."""
  if cluster == "SLURM":
    # --gpus-per-task binds each task to its GPUs (e.g. 4 of a node's 8 for 2 tasks).
    return (_slurm_tasks_here(), _int("SLURM_LOCALID"),
            bool(os.environ.get("SLURM_GPUS_PER_TASK")))
  if launcher is not None:
    return _int(*launcher.local_size), _int(*launcher.local_rank), False
  return None, None, False


_VISIBLE = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def local_gpus(per_host: int | None, local_rank: int | None,
               bound: bool = False) -> list[int] | None:
  """The local device ids for jax.distributed.initialize, given the processes on this host
  (`_host_layout`): `[]` (every GPU the process sees; JAX restricts nothing when given no
  ids) for the one process of its host, or for one of several that was given GPUs of its own
  (`bound`, e.g. `srun --gpus-per-task=4`, or fewer GPUs visible than processes on the
  host); `[local rank]` for one of several sharing the host's GPUs (one process per GPU);
  None where nothing says (JAX's choice). JAX_LOCAL_DEVICE_IDS, when set, is left to JAX."""
  if os.environ.get("JAX_LOCAL_DEVICE_IDS") or per_host is None:
    return None
  # The GPUs the launcher left this process (AMD's ROCm: HIP_ or ROCR_VISIBLE_DEVICES).
  visible = next(filter(None, (os.environ.get(name, "").strip() for name in _VISIBLE)), "")
  if per_host == 1 or bound or (visible and len(visible.split(",")) < per_host):
    # Not None for one per host: JAX's cluster detection would restrict the process to the
    # GPU of its local rank, GPU 0, even where nothing says how many the node has. Not the
    # local rank for a bound process: it sees its own GPUs only, numbered from 0.
    return []
  # One process per GPU: JAX's detection does the same under SLURM and Open MPI 4, but
  # under the other launchers every process would take every GPU.
  return [local_rank] if local_rank is not None else None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the processes of a multi-host run (a no-op for a single process). Refuses a
  command that asks for several processes (a count or an index, or a launcher JAX does not
  detect) without saying how to join them: each process would run alone, all writing the
  same work folder."""
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  launchers = _launchers()
  cluster = _auto_cluster(launchers, explicit=bool(coordinator_address))
  # The launcher that started this process, where JAX's detection does not read it.
  launcher = launchers[0] if launchers and cluster in (None, "Open MPI") else None
  local = local_gpus(*_host_layout(cluster, launcher))
  if cluster == "SLURM":  # srun's count and index, which a flag may not contradict.
    slurm = {"num_processes": _slurm_tasks(), "process_id": _int("SLURM_PROCID")}
    said = {"num_processes": f"the srun step has {slurm['num_processes']} tasks (SLURM_NTASKS)",
            "process_id": f"this is srun task {slurm['process_id']} (SLURM_PROCID)"}
    for name, value in (("num_processes", num_processes), ("process_id", process_id)):
      if value is not None and value != slurm[name]:
        raise ValueError(f"--{name}={value}, but {said[name]}: leave it out under srun")
    if coordinator_address:  # The same command in every task: srun's count and index.
      num_processes, process_id = slurm["num_processes"], slurm["process_id"]
  if coordinator_address:
    if launcher is not None:  # Count and index from the launcher.
      num_processes = _int(launcher.size) if num_processes is None else num_processes
      process_id = _int(launcher.rank) if process_id is None else process_id
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs the process count and this process's id "
                       "(--num_processes/--process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    _joining(f"as process {process_id} of {num_processes}, via {coordinator_address}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local)
  elif cluster is not None:
    log.info("multi-host run detected (%s)%s", cluster,
             "" if local is None else
             f", local GPUs: {local or 'every one this process sees'}")
    given = {k: v for k, v in (("num_processes", num_processes), ("process_id", process_id))
             if v is not None}
    coordinator = {}
    if cluster == "SLURM":
      # The step's first node, port 61440 + a hash of the job and step ids mod 4096 (or
      # JAX_COORDINATOR_PORT). JAX's own port, 61440 + job id mod 4096, joined two steps of
      # one job (a training and an evaluation at once), or two jobs 4096 ids apart, into one
      # run; its own reading of the node list stops at the first bracket
      # ("gpu[01-04]-ib" read as "gpu01").
      port = env.get("JAX_COORDINATOR_PORT") or str(
          61440 + zlib.crc32(_slurm_step().encode()) % 4096)
      coordinator = {"JAX_COORDINATOR_ADDRESS":
                     f"{slurm_first_host(env['SLURM_STEP_NODELIST'])}:{port}"}
    _joining(f"as srun task {env.get('SLURM_PROCID')} of {_slurm_tasks()}, via "
             f"{coordinator['JAX_COORDINATOR_ADDRESS']}"
             if cluster == "SLURM" else f"({cluster})")
    try:
      # Read by JAX only, which detects the rest: not left for the rest of the process.
      env.update(coordinator)
      jax.distributed.initialize(**given, local_device_ids=local)
    except ValueError as e:  # MEDVQA_DISTRIBUTED=1 where JAX detects no cluster.
      raise ValueError(
          f"{cluster}: JAX could not join this process to the others ({e}): give "
          "--coordinator_address=HOST:PORT (process 0's host), --num_processes and "
          "--process_id") from e
    finally:
      for name in coordinator:
        del env[name]
  else:
    asked = ([f"num_processes={num_processes}"] if (num_processes or 1) > 1 else []) + (
        [f"process_id={process_id}"] if (process_id or 0) > 0 else [])
    if asked or launchers:
      what = ", ".join(asked) if asked else ", ".join(
          f"{other.name} ({other.size}={env[other.size]})" for other in launchers)
      raise ValueError(
          f"{what} asks for several processes, but nothing says how to join them (no "
          "--coordinator_address or JAX_COORDINATOR_ADDRESS, and no cluster JAX detects: "
          "srun, Open MPI 4's mpirun, a TPU pod slice): each process would train alone, "
          "all of them writing the same work folder. Give --coordinator_address=HOST:PORT "
          "(process 0's host)" + (", --num_processes and --process_id" if not launchers
                                  else " (the process count and index are read from "
                                  f"{launchers[0].size} and {launchers[0].rank})"))
    return
  if cluster == "SLURM" and jax.process_count() > 1:  # srun's tasks: of one job step.
    check_one_run(_slurm_step())
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def slurm_first_host(nodelist: str) -> str:
  """The first host of a Slurm host list: "gpu[001-004,010]-ib,cpu7" -> "gpu001-ib",
  "rack[1-2]-node[01-04]" -> "rack1-node01", "n[3]" -> "n3" (each bracket's first number,
  as written, with what follows it)."""
  # Up to the first comma outside brackets.
  first = re.match(r"((?:[^,\[\]]|\[[^\[\]]+\])+)(?:,|$)", nodelist.strip())
  if first is None:
    raise ValueError(f"SLURM_STEP_NODELIST={nodelist!r}: not a Slurm host list")
  return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", first[1])


def _slurm_step() -> str:
  env = os.environ
  return f"job {env.get('SLURM_JOB_ID')} step {env.get('SLURM_STEP_ID', '?')}"


def _joining(how: str) -> None:
  """Says on every process that it waits for the others (JAX gives up after 5 minutes,
  saying that "another task died"): nothing was printed while a run waited."""
  print(f"joining the run's other processes {how}: waiting up to 5 minutes for all of them",
        file=sys.stderr, flush=True)


def check_one_run(identity: str, timeout_s: float = 300) -> None:
  """Refuses processes of different runs joined as one (`identity`: what their run is, e.g.
  its SLURM job and step): two runs whose coordinators share a port on one node joined each
  other's processes, which trained together, each with its own config, and hung at the
  first save."""
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  me = jax.process_index()
  client.key_value_set(f"medvqa/run_identity/{me}", identity)
  for other in range(jax.process_count()):
    theirs = client.blocking_key_value_get(f"medvqa/run_identity/{other}",
                                           int(timeout_s * 1000))
    if theirs != identity:
      raise ValueError(
          f"process {other} of this run is of another one ({theirs}; this process: "
          f"{identity}): two runs joined through one coordinator port. Give each its own "
          "with JAX_COORDINATOR_PORT (or --coordinator_address=HOST:PORT)")


_firsts = 0  # `on_first_process` calls so far: each shares its outcome under a key of its own.


def on_first_process(what: str, fn, timeout_s: float = 24 * 3600) -> None:
  """Runs `fn` on process 0 alone while the others wait, however long it takes (a dataset's
  first build), then shares how it ended: an error is raised on process 0 as it is, and on
  the others as a ValueError quoting it (none is left waiting, or left with a runtime's
  timeout instead of the reason). `what`: what fn does, for the others' message ("prepare the
  dataset"). The others wait on the coordination service, not in a device collective: the
  first collective of a CPU run (Gloo) gave up after 30 s, and both processes then hung."""
  global _firsts
  if jax.process_count() == 1:
    fn()
    return
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  _firsts += 1
  key = f"medvqa/on_first_process/{_firsts}"
  if jax.process_index() == 0:
    try:
      fn()
    except BaseException as e:
      client.key_value_set(key, f"error: {e}")
      raise
    client.key_value_set(key, "ok")
    return
  outcome = client.blocking_key_value_get(key, int(timeout_s * 1000))
  if outcome != "ok":
    raise ValueError(f"process 0 could not {what}: {outcome.removeprefix('error: ')}")
