"""Multi-host start-up (medvqa_jax/train/distributed.py): which clusters are joined, and that
one process per node keeps all of its GPUs (JAX's cluster detection assumes one per GPU)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import jax
import pytest
from jax._src import distributed as jax_distributed
from jax._src import xla_bridge
from jax._src.clusters import cluster as jax_cluster

from medvqa_jax.train import distributed

CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NUM_NODES", "SLURM_NTASKS", "SLURM_NPROCS",
                "SLURM_NNODES", "SLURM_NTASKS_PER_NODE",
                "SLURM_GPUS_ON_NODE", "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_MCA_orte_hnp_uri",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "MEDVQA_DISTRIBUTED",
                "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "PMI_SIZE", "PMI_RANK", "WORLD_SIZE",
                "RANK", "SLURM_GPUS_PER_TASK", "LOCAL_WORLD_SIZE", "LOCAL_RANK",
                "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "SLURM_NODEID", "SLURM_TASKS_PER_NODE",
                "SLURM_STEP_TASKS_PER_NODE", "PMI_LOCAL_SIZE", "PMI_LOCAL_RANK",
                "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "SLURM_STEP_ID",
                "JAX_COORDINATOR_PORT")


@pytest.fixture
def calls(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: made.append((a, k)))
  return made


def slurm(monkeypatch, tasks, nodes, gpus="0,1,2,3"):
  for name, value in dict(SLURM_JOB_ID=77, SLURM_NTASKS=tasks, SLURM_NNODES=nodes,
                          SLURM_STEP_NUM_NODES=nodes, SLURM_PROCID=1,
                          SLURM_LOCALID=0, SLURM_JOB_NODELIST="gpu[001-004]",
                          SLURM_STEP_NODELIST="gpu[001-004]").items():
    monkeypatch.setenv(name, str(value))
  if gpus:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)


def test_single_process_joins_nothing(calls):
  distributed.initialize()
  assert calls == []


@pytest.mark.parametrize("count", ["SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE"])
def test_a_join_asked_of_one_process_joins_nothing(calls, monkeypatch, count):
  """MEDVQA_DISTRIBUTED=1 under a launcher of one process (srun with one task, mpirun -np 1):
  JAX's detection kept the process to the GPU of its local rank, one of the node's."""
  monkeypatch.setenv("MEDVQA_DISTRIBUTED", "1")
  monkeypatch.setenv(count, "1")
  for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "n1"),
                      ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")):
    monkeypatch.setenv(name, value)
  distributed.initialize()
  assert calls == []


def test_slurm_one_task_per_node_keeps_every_gpu(calls, monkeypatch):
  slurm(monkeypatch, tasks=4, nodes=4)
  distributed.initialize()
  assert calls == [((), {"local_device_ids": []})]
  # What JAX then does with them: no ids (an empty list) restrict nothing; without them it
  # would keep only the GPU of the task's local rank (one process per GPU), leaving three of
  # four idle.
  detect = jax_cluster.ClusterEnv.auto_detect_unset_distributed_params
  assert detect(None, None, None, [], None, None)[1:] == (4, 1, [])
  assert detect(None, None, None, None, None, None)[3] == [0]
  # And past detection: JAX restricts the visible GPUs only for a non-empty list. (A State
  # that already has a client stops right after that step, before connecting anywhere.)
  def visible_after(ids):
    state = jax_distributed.State()
    state.client = object()
    with pytest.raises(RuntimeError, match="only be called once"):
      state.initialize("h0:1234", 4, 1, ids)
    return xla_bridge.CUDA_VISIBLE_DEVICES.value
  try:
    assert visible_after([]) == "all"
    assert visible_after([0, 1]) == "0,1"
  finally:
    jax.config.update("jax_cuda_visible_devices", "all")
    jax.config.update("jax_rocm_visible_devices", "all")


def test_one_task_per_node_with_no_gpu_count_keeps_every_gpu(calls, monkeypatch):
  # Neither CUDA_VISIBLE_DEVICES nor SLURM's gres says how many GPUs the node has (a cluster
  # that does not schedule GPUs): the task still gets all of them, not JAX's GPU 0.
  slurm(monkeypatch, tasks=2, nodes=2, gpus=None)
  distributed.initialize()
  assert calls == [((), {"local_device_ids": []})]
  # Ids set by hand are left to JAX, which reads them.
  monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
  distributed.initialize()
  assert calls[1] == ((), {"local_device_ids": None})


def test_slurm_allocation_outside_an_srun_step_is_refused_clearly(calls, monkeypatch):
  # python run straight from an sbatch script or a salloc shell: the allocation has several
  # tasks, but this process is none of them (JAX's own message: "coordinator_address should
  # be defined").
  slurm(monkeypatch, tasks=2, nodes=2)
  for name in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
    monkeypatch.delenv(name)
  with pytest.raises(ValueError, match=r"SLURM_NTASKS=2, but this process is not a task of "
                     r"an srun step \(SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID unset\): "
                     r"launch the run with srun"):
    distributed.initialize()
  assert calls == []
  # A coordinator, count and index given there (a launcher of one's own inside the
  # allocation) are taken as they are.
  distributed.initialize("h0:1234", 2, 1)
  assert calls == [(("h0:1234", 2, 1), {"local_device_ids": None})]


def test_slurm_one_task_per_gpu_gets_the_gpu_of_its_local_rank(calls, monkeypatch):
  slurm(monkeypatch, tasks=16, nodes=4)
  monkeypatch.setenv("SLURM_LOCALID", "2")
  distributed.initialize()
  assert calls == [((), {"local_device_ids": [2]})]  # As JAX's own detection would.
  assert jax_cluster.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, None)[3] == [2]
  monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
  distributed.initialize()
  assert calls[1] == ((), {"local_device_ids": [2]})
  # A task bound to its GPUs (srun --gpus-per-task=1 or 2) sees those only, numbered from 0;
  # JAX would have asked for the GPU of its local rank (here 3), which it does not have.
  monkeypatch.setenv("SLURM_LOCALID", "3")
  for bound in ("3", "6,7"):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", bound)
    distributed.initialize()
    assert calls[-1] == ((), {"local_device_ids": []})


def test_slurm_uneven_layouts_are_read_per_node(calls, monkeypatch):
  # 3 tasks on 2 nodes (srun -n 3 -N 2): 2 on the first, 1 on the second. No per-node count
  # divides evenly; the layout says which this node has.
  slurm(monkeypatch, tasks=3, nodes=2)
  monkeypatch.setenv("SLURM_LOCALID", "1")
  monkeypatch.setenv("SLURM_NODEID", "0")
  monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2,1")
  distributed.initialize()
  assert calls[-1] == ((), {"local_device_ids": [1]})  # One of two sharing the node.
  # The second node's one task keeps all its GPUs; JAX's default would be its GPU 0 only.
  monkeypatch.setenv("SLURM_NODEID", "1")
  monkeypatch.setenv("SLURM_LOCALID", "0")
  distributed.initialize()
  assert calls[-1] == ((), {"local_device_ids": []})
  # Repeats ("N(xK)"), and the step's layout before the job's and before the requested
  # --ntasks-per-node (an srun step may use fewer tasks than the job).
  monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
  monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x1),1")
  distributed.initialize()
  assert calls[-1] == ((), {"local_device_ids": []})
  # Repeats that reach the node: 2 on each of the first two nodes, here the second.
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2),1")
  monkeypatch.setenv("SLURM_LOCALID", "1")
  distributed.initialize()
  assert calls[-1] == ((), {"local_device_ids": [1]})
  monkeypatch.setenv("SLURM_LOCALID", "0")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "garbled")  # Unread: the job's layout.
  distributed.initialize()
  assert calls[-1] == ((), {"local_device_ids": [0]})
  # Nothing per node, and 6 tasks on 4 nodes do not divide: nothing says how many share
  # this node, so the GPUs are JAX's choice (not all of them, as for one task per node).
  for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"):
    monkeypatch.delenv(name)
  monkeypatch.setenv("SLURM_NTASKS", "6")
  monkeypatch.setenv("SLURM_NNODES", "4")
  distributed.initialize()
  assert calls[-1] == ((), {"local_device_ids": None})
  assert len(calls) == 6


def test_slurm_gpus_per_task_binds_a_task_to_several_gpus(calls, monkeypatch):
  # 2 tasks per node with 4 GPUs each: the task sees 4 (more than the tasks on its node),
  # all its own; the GPU of its local rank would be 1 of its 4.
  slurm(monkeypatch, tasks=4, nodes=2, gpus="4,5,6,7")
  monkeypatch.setenv("SLURM_LOCALID", "1")
  distributed.initialize()
  assert calls == [((), {"local_device_ids": [1]})]  # Nothing says it is bound: shared.
  monkeypatch.setenv("SLURM_GPUS_PER_TASK", "4")
  distributed.initialize()
  assert calls[1] == ((), {"local_device_ids": []})


def test_a_launcher_inside_a_slurm_job_is_the_one_that_counts(calls, monkeypatch):
  # torchrun started by srun (one per node, 8 workers each): its workers inherit the srun
  # step's variables (2 tasks), which counted before: the count and index were not read
  # from torchrun ("needs the process count"), and with them given every worker took every
  # GPU. srun's own PMI variables (the step's count) are not such a launcher.
  slurm(monkeypatch, tasks=2, nodes=2, gpus="0,1,2,3,4,5,6,7")
  for name, value in dict(PMI_SIZE=2, PMI_RANK=1, WORLD_SIZE=16, RANK=11, LOCAL_WORLD_SIZE=8,
                          LOCAL_RANK=3).items():
    monkeypatch.setenv(name, str(value))
  distributed.initialize("h0:1234")
  assert calls == [(("h0:1234", 16, 11), {"local_device_ids": [3]})]
  # Without a coordinator it is refused (JAX would have joined the 2 srun tasks only).
  with pytest.raises(ValueError, match=r"^torchrun or a launcher like it \(WORLD_SIZE=16\)"):
    distributed.initialize()
  # Open MPI 4's mpirun in a Slurm job: its ranks inherit the srun step of the daemons it
  # starts (one per node); JAX detects Open MPI, and the ranks' layout is Open MPI's.
  for name in ("PMI_SIZE", "PMI_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
    monkeypatch.delenv(name)
  for name, value in dict(OMPI_COMM_WORLD_SIZE=16, OMPI_COMM_WORLD_RANK=11,
                          OMPI_COMM_WORLD_LOCAL_SIZE=8, OMPI_COMM_WORLD_LOCAL_RANK=3,
                          OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1:34911").items():
    monkeypatch.setenv(name, str(value))
  distributed.initialize()
  assert calls[-1] == ((), {"local_device_ids": [3]})


def test_one_process_per_gpu_under_launchers_jax_does_not_detect(calls, monkeypatch):
  # Given no ids, every process would take every GPU of its host.
  for size, rank, local_size, local_rank in (
      ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
       "OMPI_COMM_WORLD_LOCAL_RANK"),
      ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"),
      ("PMI_SIZE", "PMI_RANK", "PMI_LOCAL_SIZE", "PMI_LOCAL_RANK"),  # Cray PALS' mpiexec.
      ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK")):
    for name, value in ((size, 16), (rank, 7), (local_size, 8), (local_rank, 7)):
      monkeypatch.setenv(name, str(value))
    distributed.initialize("h0:1234")
    assert calls[-1] == (("h0:1234", 16, 7), {"local_device_ids": [7]}), size
    # Bound by a wrapper script to the one GPU it sees (NVIDIA's or AMD's variable): that one.
    for visible in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
      monkeypatch.setenv(visible, "7")
      distributed.initialize("h0:1234")
      assert calls[-1] == (("h0:1234", 16, 7), {"local_device_ids": []}), (size, visible)
      monkeypatch.delenv(visible)
    monkeypatch.setenv(local_size, "1")  # One process per host: all its GPUs.
    distributed.initialize("h0:1234")
    assert calls[-1] == (("h0:1234", 16, 7), {"local_device_ids": []}), size
    for name in (size, rank, local_size, local_rank):
      monkeypatch.delenv(name)


def test_slurm_passes_an_explicit_count_and_index_on(calls, monkeypatch):
  slurm(monkeypatch, tasks=2, nodes=2)
  distributed.initialize(None, 2, 1)
  assert calls == [((), {"num_processes": 2, "process_id": 1, "local_device_ids": []})]


def test_slurm_count_and_index_given_otherwise_are_refused(calls, monkeypatch):
  """A task given --num_processes=3 in a 2-task srun step joined as one of 2 without a word;
  a coordinator address given under srun was refused for want of a count and an index that
  srun's one command cannot give each task."""
  slurm(monkeypatch, tasks=2, nodes=2)
  with pytest.raises(ValueError, match=r"^--num_processes=3, but the srun step has 2 tasks "
                     r"\(SLURM_NTASKS\): leave it out under srun"):
    distributed.initialize(None, 3, None)
  with pytest.raises(ValueError, match=r"^--process_id=0, but this is srun task 1 "
                     r"\(SLURM_PROCID\)"):
    distributed.initialize(None, None, 0)
  assert calls == []
  distributed.initialize("h0:1234")
  assert calls == [(("h0:1234", 2, 1), {"local_device_ids": []})]


def test_two_steps_of_one_slurm_job_get_coordinator_ports_of_their_own(calls, monkeypatch):
  """JAX's port is 61440 + job id mod 4096: two steps of one job (a training and an evaluation
  at once) on one first node joined each other's processes, which trained as one run."""
  addresses = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *a, **k: addresses.append(os.environ.get("JAX_COORDINATOR_ADDRESS")))
  slurm(monkeypatch, tasks=2, nodes=2)
  for step in ("0", "1", "0"):
    monkeypatch.setenv("SLURM_STEP_ID", step)
    distributed.initialize()
  hosts, ports = zip(*(a.split(":") for a in addresses))
  assert hosts == ("gpu001",) * 3  # The step's first node.
  assert ports[0] == ports[2] != ports[1] and all(61440 <= int(p) < 65536 for p in ports)
  assert "JAX_COORDINATOR_ADDRESS" not in os.environ  # Set for JAX only.
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")  # A port set by hand is taken.
  distributed.initialize()
  assert addresses[-1] == "gpu001:1234"


# Slurm host lists and their first host, which JAX reads right (its coordinator address)
# or not: its reading stops at the first bracket's first "," or "-", or its end.
_READ_RIGHT = [("gpu001", "gpu001"), ("node001,host2", "node001"), ("gpu[001-004]", "gpu001"),
               ("node[007,001-005],host2", "node007"), ("gpu-a[1-2],gpu-b7", "gpu-a1")]
_READ_WRONG = [("gpu[01-04]-ib,cpu7", "gpu01-ib"), ("rack[1-2]-node[01-04]", "rack1-node01"),
               ("n[3]", "n3"), ("a-b[07],c1", "a-b07")]


@pytest.mark.parametrize("nodelist, first, jax_right",
                         [(*c, True) for c in _READ_RIGHT] + [(*c, False) for c in _READ_WRONG])
def test_the_coordinator_is_the_first_host_of_the_slurm_step(calls, monkeypatch, nodelist,
                                                              first, jax_right):
  from jax._src.clusters.slurm_cluster import SlurmCluster
  assert distributed.slurm_first_host(nodelist) == first
  slurm(monkeypatch, tasks=2, nodes=2)
  monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")
  assert (SlurmCluster.get_coordinator_address(None, "1234") == f"{first}:1234") == jax_right
  seen = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *a, **k: seen.append(os.environ.get("JAX_COORDINATOR_ADDRESS")))
  distributed.initialize()
  assert seen == [f"{first}:1234"]


@pytest.mark.parametrize("nodelist", ["", "gpu[01-04", "gpu[]", "gpu01]", ",gpu01"])
def test_a_node_list_that_is_not_a_slurm_host_list_is_refused(calls, monkeypatch, nodelist):
  slurm(monkeypatch, tasks=2, nodes=2)
  monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
  with pytest.raises(ValueError, match=re.escape(
      f"SLURM_STEP_NODELIST={nodelist!r}: not a Slurm host list")):
    distributed.initialize()
  assert calls == []


def _two_processes(tmp_path, source: str, args: list[list[str]]):
  """Runs the script `source` as processes 0 and 1 of one run (argv: a free port, the index,
  then `args[index]`), outside any cluster; returns them and their (stdout, stderr)."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "script.py"
  script.write_text(source)
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), *args[i]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  with helpers.reaped(procs):
    return procs, [p.communicate(timeout=300) for p in procs]


_ONE_RUN = """
import sys
import jax
port, index, identity = sys.argv[1:4]
jax.distributed.initialize(f"localhost:{port}", 2, int(index))
from medvqa_jax.train import distributed
try:
  distributed.check_one_run(identity, timeout_s=60)
except ValueError as e:
  print("REFUSED:", e)
  sys.exit(1)
print("DONE")
"""


@pytest.mark.parametrize("second", ["job 5000 step 0", "job 9096 step 0"])
def test_processes_of_two_runs_joined_as_one_are_refused(tmp_path, second):
  """Two runs whose coordinators shared a port joined each other's processes: they trained
  together, each with its own config, and hung at the first save."""
  procs, outs = _two_processes(tmp_path, _ONE_RUN, [["job 5000 step 0"], [second]])
  if second == "job 5000 step 0":
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:]
    return
  assert [p.returncode for p in procs] == [1, 1], outs[1][1][-3000:]
  assert outs[0][0].startswith("REFUSED: process 1 of this run is of another one (job 9096 "
                               "step 0; this process: job 5000 step 0): two runs joined "
                               "through one coordinator port. Give each its own with "
                               "JAX_COORDINATOR_PORT")


def test_open_mpi_one_process_per_node(calls, monkeypatch):
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
  monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
  monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
  # Open MPI 5 sets no OMPI_MCA_orte_hnp_uri, which JAX's detection reads: JAX's own error
  # ("coordinator_address should be defined") before. Refused, naming the flag to give.
  with pytest.raises(ValueError, match=r"Open MPI 5 or later .*\(OMPI_COMM_WORLD_SIZE=2\) asks "
                     r"for several processes.* Give --coordinator_address=HOST:PORT .*read "
                     r"from OMPI_COMM_WORLD_SIZE and OMPI_COMM_WORLD_RANK"):
    distributed.initialize()
  distributed.initialize("h0:1234")  # The count and index: Open MPI's.
  assert calls == [(("h0:1234", 2, 1), {"local_device_ids": []})]
  monkeypatch.setenv("MEDVQA_DISTRIBUTED", "1")  # The join asked for as well: the same.
  distributed.initialize("h0:1234")
  assert calls[1] == (("h0:1234", 2, 1), {"local_device_ids": []})
  monkeypatch.delenv("MEDVQA_DISTRIBUTED")
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
  distributed.initialize()  # Open MPI 4: JAX detects it.
  assert calls[2] == ((), {"local_device_ids": []})


def test_processes_that_nothing_joins_are_refused(calls, monkeypatch):
  """A count or index without a coordinator or a cluster JAX detects, or a launcher JAX does
  not detect: every process would train alone as process 0 of 1, all writing the same work
  folder (they did, silently)."""
  for args in ((None, 2, 1), (None, None, 1)):
    with pytest.raises(ValueError, match=r"process_id=1 asks for several processes, but "
                       r"nothing says how to join them .* Give --coordinator_address"):
      distributed.initialize(*args)
  distributed.initialize(None, 1, 0)  # One process, said explicitly: nothing to join.
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  with pytest.raises(ValueError, match=r"^num_processes=4 asks for several processes"):
    distributed.initialize()
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  for size, rank, name in (("PMI_SIZE", "PMI_RANK", "MPICH, Intel MPI or Cray PALS"),
                           ("WORLD_SIZE", "RANK", "torchrun")):
    monkeypatch.setenv(size, "4")
    monkeypatch.setenv(rank, "3")
    with pytest.raises(ValueError, match=rf"^{name}.*\({size}=4\) asks for several"):
      distributed.initialize()
    distributed.initialize("h0:1234")
    assert calls[-1] == (("h0:1234", 4, 3), {"local_device_ids": None})
    monkeypatch.delenv(size)
    monkeypatch.delenv(rank)
  assert len(calls) == 2


def test_a_join_asked_for_where_jax_finds_no_cluster_names_the_flags(calls, monkeypatch):
  def no_cluster(*args, **kwargs):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  monkeypatch.setenv("MEDVQA_DISTRIBUTED", "1")
  with pytest.raises(ValueError, match=r"MEDVQA_DISTRIBUTED: JAX could not join this process "
                     r"to the others \(coordinator_address should be defined.\): give "
                     r"--coordinator_address=HOST:PORT"):
    distributed.initialize()


def test_tpu_pod_launcher_asks_for_the_join(calls, monkeypatch):
  # A TPU VM worker's environment may not show the slice (JAX reads it from the metadata
  # server), so launch/tpu_pod.sh sets MEDVQA_DISTRIBUTED=1.
  distributed.initialize()
  assert calls == []
  monkeypatch.setenv("MEDVQA_DISTRIBUTED", "1")
  distributed.initialize()
  assert calls == [((), {"local_device_ids": None})]


def _launcher(script, tmp_path, tool, *args, **env):
  """Runs a launcher with a stand-in for its cluster tool that records its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / tool).write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path}/args\n'
                             f'echo "$SRUN_CPUS_PER_TASK" > {tmp_path}/cpus\n')
  (bin_dir / tool).chmod(0o755)
  root = Path(__file__).resolve().parents[2]
  out = subprocess.run(["bash", str(root / "launch" / script), *args], capture_output=True,
                       text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})
  recorded = (tmp_path / "args").read_text().splitlines() if (tmp_path / "args").exists() else None
  return out, recorded


def test_cluster_launchers_pass_the_command_through(tmp_path):
  # tpu_pod.sh: every worker, in the repository, with the join asked for; arguments quoted.
  out, args = _launcher("tpu_pod.sh", tmp_path, "gcloud", "python", "launch/train.py",
                        "--config=configs/pathvqa.py", "--config.name=a b", TPU="pod",
                        ZONE="z1", REPO="/r a")
  assert out.returncode == 0, out.stderr
  assert args[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z1", "--worker=all"]
  # The folder quoted (a space in it was "cd: too many arguments" on every worker).
  assert args[-1].startswith('--command=cd "/r a" || exit 1; export MEDVQA_DISTRIBUTED=1; ')
  assert ("(exec python launch/train.py --config=configs/pathvqa.py --config.name=a\\ b ) "
          ">> ${TMPDIR:-/tmp}/medvqa-jax-tpu-pod.log") in args[-1]
  (tmp_path / "args").unlink()
  out, args = _launcher("slurm.sbatch", tmp_path, "srun", "python", "launch/train.py",
                        SLURM_CPUS_PER_TASK="16")
  assert out.returncode == 0 and args == ["--kill-on-bad-exit=1", "python", "launch/train.py"]
  # The job's CPUs per task reach the task: srun (Slurm 22.05 and later) reads this variable,
  # not the job's, and would give the task one core.
  assert (tmp_path / "cpus").read_text() == "16\n"
  # --help prints the header (exit 0); no command is a usage error (exit 2); neither runs.
  (tmp_path / "args").unlink()
  for script in ("tpu_pod.sh", "slurm.sbatch"):
    helped, args = _launcher(script, tmp_path, "gcloud", "--help")
    assert helped.returncode == 0 and args is None
    assert "Data and work folders" in helped.stdout or "data and work folders" in helped.stdout
    assert "#" not in helped.stdout.splitlines()[0]
    bare, args = _launcher(script, tmp_path, "gcloud")
    assert bare.returncode == 2 and args is None


def test_tpu_pod_stops_the_workers_on_ctrl_c_sigterm_and_stop(tmp_path):
  """Ctrl-C ended only the ssh sessions: the workers went on training (holding the TPU), or
  died at their next line of output to the closed session, with no checkpoint. tpu_pod.sh
  now sends the command on every worker SIGTERM (save and stop) on Ctrl-C, on SIGTERM to
  itself and on --stop, and the command writes its output to a log of its own.
  Here a stand-in gcloud runs each worker's command on this machine, in a session of its own
  (a remote process does not see the local Ctrl-C), and relays its output as ssh does: when
  it ends (Ctrl-C), so does the pipe the command's output went through."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(
      f"#!{sys.executable}\n"
      "import os, signal, subprocess, sys, time\n"
      "time.sleep(0.5)  # As gcloud, which takes a while to reach the workers.\n"
      "cmd = sys.argv[-1].removeprefix('--command=')\n"
      "worker = subprocess.Popen(['bash', '-c', cmd], stdout=subprocess.PIPE,\n"
      "                          stderr=subprocess.STDOUT, start_new_session=True)\n"
      "signal.signal(signal.SIGINT, lambda *a: os._exit(130))  # As gcloud: Ctrl-C ends it.\n"
      "for line in worker.stdout:\n"
      "  sys.stdout.buffer.write(line)\n"
      "  sys.stdout.flush()\n"
      "sys.exit(worker.wait())\n")
  (bin_dir / "gcloud").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TPU": "pod", "ZONE": "z",
         "REPO": str(tmp_path), "TMPDIR": str(tmp_path)}
  script = str(Path(__file__).resolve().parents[2] / "launch" / "tpu_pod.sh")

  def launch(worker):
    # SIGINT as a terminal's shell leaves it: this test process may ignore it (something run
    # before in it set that), and bash cannot trap a signal ignored when it started.
    # (coreutils' env resets it: a preexec_fn would fork this multithreaded process.)
    return subprocess.Popen(["env", "--default-signal=INT", "bash", script, sys.executable,
                             "-c", worker], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def wait_for(path):
    deadline = time.time() + 30
    while not path.exists() and time.time() < deadline:
      time.sleep(0.05)
    return path.exists()

  # A run that ends by itself: its output comes through, and its exit status.
  done = launch("print('hello from the worker'); raise SystemExit(3)")
  out, _ = done.communicate(timeout=60)
  assert done.returncode == 3 and "hello from the worker" in out
  # A run that prints all the time, stopped by Ctrl-C, then one stopped by SIGTERM to the
  # launcher alone (bash had run its trap only after gcloud ended, i.e. never).
  worker = ("import pathlib, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path('got').write_text('TERM'), "
            "sys.exit(0)))\npathlib.Path('ready').touch()\n"
            "for i in range(1200):\n  print(i, flush=True)\n  time.sleep(0.05)\n")
  for how in ("Ctrl-C", "SIGTERM"):
    for name in ("ready", "got"):
      (tmp_path / name).unlink(missing_ok=True)
    launched = launch(worker)
    assert wait_for(tmp_path / "ready")
    if how == "Ctrl-C":
      os.killpg(launched.pid, signal.SIGINT)  # The launcher's whole process group.
    else:
      launched.send_signal(signal.SIGTERM)
    _, err = launched.communicate(timeout=30)
    assert launched.returncode == 130, (how, err)
    assert wait_for(tmp_path / "got"), (how, err)
    assert (tmp_path / "got").read_text() == "TERM"
    assert "sending SIGTERM to the command on every worker of pod" in err
  # --stop signals only a process the launcher started: here the id in the file is a
  # process of another command (a finished run's id since reused), which is left running.
  other = subprocess.Popen(["sleep", "30"])
  try:
    (tmp_path / "medvqa-jax-tpu-pod.pid").write_text(f"{other.pid}\n")
    stopped = subprocess.run(["bash", script, "--stop"], env=env, timeout=30)
    assert stopped.returncode == 0 and other.poll() is None
  finally:
    other.kill()
    other.wait()


def test_explicit_coordinator(calls, monkeypatch):
  with pytest.raises(ValueError, match="process count"):
    distributed.initialize("host:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  distributed.initialize("host:1234")
  assert calls == [(("host:1234", 2, 1), {"local_device_ids": None})]


_FIRST_PROCESS = """
import sys, time
import jax
port, index, delay, outcome = sys.argv[1:5]
jax.distributed.initialize(f"localhost:{port}", 2, int(index))
jax.devices()  # The backend is up, as the training loop's mesh has it by then.
from jax.experimental import multihost_utils
from medvqa_jax.train import distributed

def build():
  time.sleep(float(delay))
  if outcome == "fail":
    raise ValueError("dataset vqa_rad is not built in /nowhere")

try:
  distributed.on_first_process("prepare the dataset", build)
except ValueError as e:
  print("REFUSED:", e)
  sys.exit(1)
multihost_utils.sync_global_devices("after")  # The run's collectives go on together.
print("DONE")
"""


@pytest.mark.parametrize("delay, outcome", [(35, "ok"), (0, "fail")])
def test_the_others_wait_for_process_0_however_long_and_share_its_error(tmp_path, delay,
                                                                        outcome):
  """Process 0 builds the dataset alone. The others waited in a device collective, whose CPU
  (Gloo) set-up gives up after 30 s: a first build any longer crashed them, then both hung;
  and process 0's refusal reached them as Gloo's timeout, not its reason."""
  procs, outs = _two_processes(tmp_path, _FIRST_PROCESS, [[str(delay), outcome]] * 2)
  if outcome == "ok":
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:]
    assert all(out.strip().endswith("DONE") for out, _ in outs)
  else:
    assert [p.returncode for p in procs] == [1, 1], outs[1][1][-3000:]
    assert outs[0][0].strip() == "REFUSED: dataset vqa_rad is not built in /nowhere"
    assert outs[1][0].strip() == ("REFUSED: process 0 could not prepare the dataset: dataset "
                                  "vqa_rad is not built in /nowhere")


def test_medvqa_distributed_0_asks_for_no_join(calls, monkeypatch):
  """MEDVQA_DISTRIBUTED=0 turns the join off, as unset does."""
  monkeypatch.setenv("MEDVQA_DISTRIBUTED", "0")
  distributed.initialize()
  assert calls == []


def test_slurm_coordinator_ports_span_61440_to_65535(calls, monkeypatch):
  """61440 + (a hash of the job and step mod 4096): over many jobs, every port of that range
  and none past it (65536 is no TCP port)."""
  ports = set()
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: ports.add(
      int(os.environ["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[1])))
  slurm(monkeypatch, tasks=2, nodes=2)
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  for job in range(40000):
    monkeypatch.setenv("SLURM_JOB_ID", str(job))
    distributed.initialize()
  assert min(ports) == 61440 and max(ports) == 65535
