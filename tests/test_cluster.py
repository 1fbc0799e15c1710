"""When `run.py train` joins other processes without flags, which GPUs a Slurm or Open MPI process drives, and the
refusal to train or evaluate on the CPU beside an accelerator jax cannot use. jax's `initialize` is replaced by a
recorder here; tests/test_train_multiprocess.py runs real Slurm-launched processes."""

from __future__ import annotations

import pathlib

import jax
import pytest

from evf_jax import cli, runtime
from evf_jax.cli import cluster
from evf_jax.errors import UserError


def _srun(ntasks=2, nodes=2, localid=0, **extra):
  """The environment srun gives a task of a job step."""
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": str(ntasks),
         "SLURM_PROCID": str(localid), "SLURM_LOCALID": str(localid), "SLURM_STEP_NUM_NODES": str(nodes)}
  env.update(extra)
  return env


@pytest.fixture
def calls(monkeypatch):
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
  return made


def test_jax_still_has_the_tpu_vm_flag():
  from jax._src import cloud_tpu_init
  assert isinstance(cloud_tpu_init.running_in_cloud_tpu_vm, bool)
  assert cluster.on_cloud_tpu_vm() is False  # this machine has no TPU


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    # salloc shells and batch scripts outside srun: SLURM_JOB_ID but not the step's variables
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NODELIST": "n[1-4]"}, None),
    (_srun(ntasks=1, nodes=1), None),
    (_srun(), "slurm"),
    ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "4"}, "open-mpi"),
    ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    # mpirun inside a Slurm allocation: jax takes Open MPI's variables first
    ({**_srun(), "OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "8"}, "open-mpi"),
    ({**_srun(), "PMI_SIZE": "2"}, "slurm"),  # srun --mpi=pmi2 sets PMI_SIZE too
    # jax's TPU detection reads TPU_WORKER_HOSTNAMES only on a TPU VM, where it needs no variable at all
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, None),
])
def test_detected_launcher(env, expected):
  assert cluster.detected_launcher(env, tpu_vm=False) == expected


@pytest.mark.parametrize("env", [{"OMPI_COMM_WORLD_SIZE": "4"}, {"PMI_SIZE": "4", "PMI_RANK": "1"}])
def test_mpi_processes_jax_cannot_join_are_refused(env):
  """Open MPI 5 (no OMPI_MCA_orte_hnp_uri), MPICH, Intel MPI: four processes would each train alone."""
  with pytest.raises(UserError, match="one of 4 MPI processes.*--num_processes 4 --process_id RANK"):
    cluster.detected_launcher(env, tpu_vm=False)


def test_a_cloud_tpu_vm_always_joins(calls):
  assert cluster.detected_launcher({}, tpu_vm=True) == "cloud-tpu"
  assert cluster.initialise(None, None, None, env={}, tpu_vm=True)
  assert calls == [{"heartbeat_timeout_seconds": 100}]  # jax finds the slice's hosts itself


@pytest.mark.parametrize("env,expected", [
    ({}, None),                                                        # no GPUs
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
    # one task per node of 8 GPUs: all 8 (jax alone would give it GPU 0)
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, list(range(8))),
    ({"SLURM_GPUS_ON_NODE": "8"}, list(range(8))),                     # every GPU visible, Slurm's count
    ({"CUDA_VISIBLE_DEVICES": "4"}, [0]),                              # --gpus-per-task=1: its only GPU
])
def test_slurm_gpus_one_task_per_node(env, expected):
  assert cluster.local_device_ids("slurm", _srun(ntasks=4, nodes=4, localid=0, **env)) == expected


def test_slurm_gpus_several_tasks_per_node():
  gpus = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  # one task per GPU, jax's own layout: task i drives GPU i
  assert [cluster.local_device_ids("slurm", _srun(32, 4, i, **gpus)) for i in (0, 5)] == [[0], [5]]
  # two tasks per node: halves
  assert [cluster.local_device_ids("slurm", _srun(8, 4, i, **gpus)) for i in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert cluster.local_device_ids("slurm", _srun(12, 4, 0, **gpus)) is None      # 3 tasks do not share 8 GPUs
  assert cluster.local_device_ids("slurm", _srun(5, 4, 0, **gpus)) is None       # uneven over the nodes
  assert cluster.local_device_ids("slurm", _srun(4, 4, 0, JAX_LOCAL_DEVICE_IDS="0", **gpus)) is None  # the user's


def test_open_mpi_gpus():
  def rank(local, size, gpus="0,1,2,3,4,5,6,7"):
    return {"OMPI_COMM_WORLD_LOCAL_RANK": str(local), "OMPI_COMM_WORLD_LOCAL_SIZE": str(size),
            "CUDA_VISIBLE_DEVICES": gpus}
  assert cluster.local_device_ids("open-mpi", rank(0, 1)) == list(range(8))   # mpirun --npernode 1
  assert cluster.local_device_ids("open-mpi", rank(1, 2)) == [4, 5, 6, 7]
  assert cluster.local_device_ids("open-mpi", rank(3, 8)) == [3]
  assert cluster.local_device_ids("open-mpi", rank(0, 3)) is None


def test_initialise_passes_the_slurm_gpus(calls):
  env = _srun(ntasks=4, nodes=4, localid=0, CUDA_VISIBLE_DEVICES="0,1,2,3")
  assert cluster.initialise(None, None, None, heartbeat_timeout=30, env=env, tpu_vm=False)
  assert calls == [{"heartbeat_timeout_seconds": 30, "local_device_ids": [0, 1, 2, 3]}]


def test_single_process_calls_nothing(calls):
  assert not cluster.initialise(None, None, None, env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, tpu_vm=False)
  assert calls == []


def test_explicit_flags(calls):
  assert cluster.initialise("h:1", 2, 1, coordinator_bind_address="127.0.0.1:1", env=_srun(), tpu_vm=True)
  assert calls == [{"heartbeat_timeout_seconds": 100, "coordinator_bind_address": "127.0.0.1:1",
                    "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}]
  with pytest.raises(UserError, match="go together"):
    cluster.initialise("h:1", 2, None)
  with pytest.raises(UserError, match=r"--process_id 2 is not in \[0, 2\)"):
    cluster.initialise("h:1", 2, 2)


def test_a_failed_join_is_one_line(monkeypatch):
  def fail(**kw):
    raise RuntimeError("Barrier timed out.\nSome tasks did not join.")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(UserError) as e:
    cluster.initialise(None, None, None, env=_srun(), tpu_vm=False)
  assert str(e.value) == ("joining the other processes (slurm) failed: Barrier timed out. Some tasks did not join.; "
                          "name the coordinator with --coordinator_address HOST:PORT --num_processes N --process_id I")


@pytest.mark.parametrize("error", [ValueError("coordinator_address should be defined."),
                                   OSError("metadata.google.internal unreachable"), ImportError("requests")])
def test_a_tpu_vm_where_jax_finds_no_slice_runs_alone(monkeypatch, capsys, error):
  def fail(**kw):
    raise error
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  assert not cluster.initialise(None, None, None, env={}, tpu_vm=True)
  assert "running as one process" in capsys.readouterr().err
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: (_ for _ in ()).throw(RuntimeError("timeout")))
  with pytest.raises(UserError, match="cloud-tpu.*timeout"):  # a slice found but not joined is an error
    cluster.initialise(None, None, None, env={}, tpu_vm=True)


@pytest.fixture
def no_platform_named():
  """jax as on a machine where the user set no JAX_PLATFORMS (the tests run with JAX_PLATFORMS=cpu)."""
  before = jax.config.jax_platforms
  jax.config.update("jax_platforms", None)
  yield
  jax.config.update("jax_platforms", before)


def _chips(monkeypatch, tpu_chips: int) -> None:
  from jax._src import hardware_utils
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (tpu_chips, None))


def test_tpu_chips_jax_does_not_use_stop_train_and_eval(monkeypatch, no_platform_named, capsys, tmp_path):
  """libtpu missing (or the chips held elsewhere): jax runs on the CPU, on a pod slice each host alone."""
  _chips(monkeypatch, 4)
  config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "train" / "synthetic.py")
  # Without the check, both commands fail fast on something else: no synthetic data, and none generated.
  for argv in (["train", "--config", config, "--workdir", str(tmp_path / "w"),
                "--config.data.root", str(tmp_path / "d"), "--config.data.synthetic.num_train=0"],
               ["eval", "--checkpoint", str(tmp_path / "c"), "--data", str(tmp_path / "d"), "--split", "x"]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 4 TPU chip(s)" in err[0] and "JAX_PLATFORMS=cpu" in err[0], err
  assert not (tmp_path / "w").exists()


def test_no_tpu_or_a_platform_the_user_named_passes(monkeypatch, no_platform_named):
  from jax._src import hardware_utils
  assert hardware_utils.num_available_tpu_chips_and_device_id()[0] >= 0  # jax still has what the check reads
  _chips(monkeypatch, 0)
  runtime.check_accelerator_in_use()
  _chips(monkeypatch, 8)
  with pytest.raises(UserError, match="8 TPU chip"):
    runtime.check_accelerator_in_use()
  jax.config.update("jax_platform_name", "cpu")  # JAX_PLATFORM_NAME=cpu: the CPU on purpose
  try:
    runtime.check_accelerator_in_use()
  finally:
    jax.config.update("jax_platform_name", "")
  jax.config.update("jax_platforms", "cpu")  # JAX_PLATFORMS=cpu
  runtime.check_accelerator_in_use()


def test_a_named_platform_that_does_not_start_is_one_line(monkeypatch, capsys, tmp_path):
  """JAX_PLATFORMS=tpu without libtpu is jax's RuntimeError; =cuda without the plugin an AssertionError."""
  def refuse():
    raise RuntimeError("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so\nmore")
  monkeypatch.setattr(jax, "default_backend", refuse)
  with pytest.raises(UserError, match=r"^jax cannot start the platforms 'cpu': Unable to initialize backend 'tpu'"):
    runtime.check_accelerator_in_use()

  def no_plugin():
    raise AssertionError()
  monkeypatch.setattr(jax, "default_backend", no_plugin)
  assert cli.main(["predict", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "x.jpg"), "--prompt", "cat",
                   "--out-dir", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: jax cannot start the platforms 'cpu': no such platform is installed"], err
