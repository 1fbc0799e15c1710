"""How the processes of a multi-process run find each other: jax's own runtime (`jax.distributed`), given the
coordinator on the command line or detected from the launcher.

jax detects a cluster only in some environments, and a call to `jax.distributed.initialize()` without
arguments anywhere else fails. So a run joins others without flags exactly where jax would detect them:

- a Slurm job step (`srun`): the five variables jax reads, and more than one task;
- Open MPI's `mpirun` (jax reads `OMPI_MCA_orte_hnp_uri`), more than one process (other MPI launchers, which
  jax cannot join, are refused: their processes would each train alone into one workdir);
- a Cloud TPU VM (one host or a pod slice, also several slices): always, as jax's preemption service needs it;
  where jax finds no slice there (no metadata server), a single process, said in the log.

`salloc` shells and batch scripts outside `srun` carry `SLURM_JOB_ID` without the step's variables: a single
process there, as anywhere else. On GPUs jax gives a Slurm or Open MPI process one GPU, its local rank's: right
for one process per GPU, but one per node would drive GPU 0 alone and leave the others idle. `local_device_ids`
hands each process its share of the GPUs it sees instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, Optional

import jax
from jax._src import cloud_tpu_init  # private: see on_cloud_tpu_vm

from evf_jax.errors import UserError

# What jax's Slurm detection requires (jax/_src/clusters/slurm_cluster.py): srun sets all five.
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OPEN_MPI_VAR = "OMPI_MCA_orte_hnp_uri"  # what jax's Open MPI detection requires


def on_cloud_tpu_vm() -> bool:
  """Whether jax found TPU chips and libtpu on this machine (set when jax is imported). jax keeps this flag
  private; tests/test_cluster.py checks it still exists, so that an upgrade that drops it fails there."""
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _int(env: Mapping[str, str], key: str, default: int = 0) -> int:
  try:
    return int(env.get(key, default))
  except ValueError:
    return default


def detected_launcher(env: Mapping[str, str], tpu_vm: bool, sep: str = "_") -> Optional[str]:
  """The launcher whose processes jax would join without arguments (in jax's order: Open MPI, Slurm, TPU), or
  None for a single process."""
  mpi_size = max(_int(env, "OMPI_COMM_WORLD_SIZE", 1), _int(env, "PMI_SIZE", 1))  # Open MPI; MPICH, Intel MPI
  if OPEN_MPI_VAR in env:
    return "open-mpi" if mpi_size > 1 else None
  if all(k in env for k in SLURM_STEP_VARS):
    return "slurm" if _int(env, "SLURM_NTASKS", 1) > 1 else None
  if mpi_size > 1:  # each would train alone, all into one workdir
    raise UserError(f"this is one of {mpi_size} MPI processes, which jax cannot join by itself (it reads only "
                    f"Open MPI 4's {OPEN_MPI_VAR}); name the coordinator with --coordinator{sep}address "
                    f"HOST:PORT --num{sep}processes {mpi_size} --process{sep}id RANK")
  return "cloud-tpu" if tpu_vm else None


def _tasks_on_node(launcher: str, env: Mapping[str, str]) -> tuple[int, int]:
  """(this process's index among those of its node, how many there are); (0, 0) when unknown."""
  if launcher == "open-mpi":
    return _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
  tasks, nodes = _int(env, "SLURM_NTASKS", 1), _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES")
  return (_int(env, "SLURM_LOCALID"), tasks // nodes) if nodes > 0 and tasks % nodes == 0 else (0, 0)


def local_device_ids(launcher: str, env: Mapping[str, str]) -> Optional[list[int]]:
  """The GPUs (CUDA ordinals) a Slurm or Open MPI process drives: its share of those it sees, the processes of
  a node taking consecutive blocks by local rank. None leaves jax's choice (one GPU per process, the local
  rank's): no GPUs, processes spread unevenly over the nodes, GPUs that do not divide among them, or
  `JAX_LOCAL_DEVICE_IDS` set."""
  if "JAX_LOCAL_DEVICE_IDS" in env:
    return None
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    gpus = 0 if visible.strip() in ("", "NoDevFiles") else len([d for d in visible.split(",") if d.strip()])
  else:  # every GPU of the node is visible: count those Slurm gave the step on this node
    gpus = _int(env, "SLURM_GPUS_ON_NODE")
  if gpus == 0:
    return None
  if gpus == 1:
    return [0]  # the process sees only its own GPU (e.g. --gpus-per-task=1), whatever its local rank
  local_rank, on_node = _tasks_on_node(launcher, env)
  per_task, rest = divmod(gpus, on_node) if on_node > 0 else (0, 0)
  if per_task == 0 or rest:
    return None
  return list(range(local_rank * per_task, (local_rank + 1) * per_task))


def initialise(coordinator_address: Optional[str], num_processes: Optional[int], process_id: Optional[int],
               coordinator_bind_address: Optional[str] = None, heartbeat_timeout: int = 100,
               env: Optional[Mapping[str, str]] = None, tpu_vm: Optional[bool] = None,
               sep: str = "_") -> bool:
  """Joins the other processes before anything touches jax's backends; True when jax.distributed is running.
  Explicit flags win; without them, whatever `detected_launcher` finds. `sep`: how the command spells its
  flags in messages (absl's `--process_id`, argparse's `--process-id`)."""
  address_flag, count_flag, id_flag = (f"--{n.replace('_', sep)}"
                                       for n in ("coordinator_address", "num_processes", "process_id"))
  env = os.environ if env is None else env
  given = [coordinator_address, num_processes, process_id]
  kwargs: dict = {"heartbeat_timeout_seconds": heartbeat_timeout}
  if coordinator_bind_address is not None:
    kwargs["coordinator_bind_address"] = coordinator_bind_address
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise UserError(f"{address_flag}, {count_flag} and {id_flag} go together")
    if not 0 <= process_id < num_processes:
      raise UserError(f"{id_flag} {process_id} is not in [0, {num_processes})")
    how = f"{address_flag} {coordinator_address}"
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  else:
    how = detected_launcher(env, on_cloud_tpu_vm() if tpu_vm is None else tpu_vm, sep)
    if how is None:
      return False
    if how in ("slurm", "open-mpi") and (ids := local_device_ids(how, env)) is not None:
      kwargs["local_device_ids"] = ids
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError, OSError, ImportError) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    if how == "cloud-tpu" and not isinstance(e, RuntimeError):
      # jax found no slice: a TPU VM without its metadata server (e.g. in a notebook service's container), or
      # without `requests`, which jax reads it with. Alone is right on one host; on a slice the log says so.
      print(f"not joining other processes: jax found no TPU slice ({reason}); running as one process",
            file=sys.stderr)
      return False
    raise UserError(f"joining the other processes ({how}) failed: {reason}; name the coordinator with "
                    f"{address_flag} HOST:PORT {count_flag} N {id_flag} I") from None
  return True


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The coordinator flags of an argparse command, as `run.py train`'s absl ones (spelled with underscores)."""
  g = p.add_argument_group("several processes (a pod slice, a GPU cluster); without these flags, those jax "
                           "detects: Cloud TPU VMs, srun, mpirun")
  g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT", help="process 0's address")
  g.add_argument("--num-processes", type=int, default=None, metavar="N")
  g.add_argument("--process-id", type=int, default=None, metavar="I")
  g.add_argument("--coordinator-bind-address", default=None, metavar="HOST:PORT",
                 help="where process 0 listens (default: every interface)")


def initialise_from_args(args: argparse.Namespace) -> bool:
  return initialise(args.coordinator_address, args.num_processes, args.process_id,
                    coordinator_bind_address=args.coordinator_bind_address, sep="-")


def run_joined(distributed: bool, body: Callable[[], int]) -> int:
  """`body()`'s exit code. In a process that joined jax.distributed (`distributed`), leaves it afterwards, also
  on an error, and exits at once: a finished process may hang in interpreter teardown after it."""
  try:
    code = body()
  finally:
    if distributed:
      jax.distributed.shutdown()
  if distributed:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code
