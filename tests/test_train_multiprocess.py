"""Several processes, as on a pod slice or a GPU cluster: two processes on localhost (jax.distributed, 4 CPU
devices each) train the same steps as one process with 8 devices and end with the same parameters; a checkpoint
written by the 2-process run resumes in a 1-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jax
from evf_jax import cli
from evf_testing.training import saved_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = '''from evf_testing.training import micro_train_config


def get_config(arg=None):
  c = micro_train_config()
  c.optimizer.schedule = "constant"
  # Some gradients are zero up to rounding (e.g. a bias feeding a LayerNorm); Adam with eps 1e-8 turns that
  # rounding noise into +-lr steps whose sign depends on the summation order. A larger eps keeps such
  # parameters still, so the comparison below tests the training, not the noise.
  c.optimizer.eps = 1e-3
  return c
'''


@pytest.fixture(scope="module", autouse=True)
def _compile_fast(fast_compile):
  yield


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _train(args, devices, extra=(), launcher_env=None):
  return subprocess.Popen(["timeout", "-k", "10", "600", sys.executable, "run.py", "train", *args, *extra], cwd=ROOT,
                          env={**_env(devices), **(launcher_env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
  config = tmp_path / "micro.py"
  config.write_text(CONFIG)
  from data_pipelines import prepare
  prepare.build("synthetic", str(tmp_path / "data"), num_train=24, num_eval=3, seed=0, progress=False)
  common = ["--config", str(config), f"--config.data.root={tmp_path / 'data'}"]
  one = _train(common + ["--workdir", str(tmp_path / "one")], 8)
  out, _ = one.communicate()
  assert one.returncode == 0, out[-3000:]
  port = _port()
  procs = [_train(common + ["--workdir", str(tmp_path / "two")], 4,
                  ("--coordinator_address", f"127.0.0.1:{port}", "--coordinator_bind_address", f"127.0.0.1:{port}",
                   "--num_processes", "2", "--process_id", str(i), "--heartbeat_timeout", "20")) for i in range(2)]
  outs = [p.communicate()[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  assert "on 8 cpu device(s), 2 process(es)" in outs[0]
  # Same data (every process feeds its rows of the same global batches), same steps: float32 sums in another
  # order across processes (gloo all-reduces), so equal to rounding.
  one, two = (saved_params(str(tmp_path / name), 6) for name in ("one", "two"))
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  two_eval = [line for line in outs[0].splitlines() if "gIoU" in line and line.startswith("step 6")]
  one_eval = [line for line in out.splitlines() if "gIoU" in line and line.startswith("step 6")]
  assert two_eval and two_eval == one_eval  # the multi-process evaluator agrees with the single-process one
  # The 2-process checkpoint resumes in one process (8 devices here), data position included.
  assert cli.main(["train", *common, "--workdir", str(tmp_path / "two"), "--config.total_steps=8"]) == 0
  assert sorted(int(s) for s in os.listdir(tmp_path / "two" / "checkpoints") if s.isdigit())[-1] == 8
  # A workdir another run holds: process 0 finds it locked and both processes stop, in one line each.
  from evf_jax.train import checkpointing
  with checkpointing.workdir_lock(str(tmp_path / "two")):
    port = _port()
    procs = [_train(common + ["--workdir", str(tmp_path / "two"), "--config.total_steps=10"], 4,
                    ("--coordinator_address", f"127.0.0.1:{port}", "--coordinator_bind_address", f"127.0.0.1:{port}",
                     "--num_processes", "2", "--process_id", str(i), "--heartbeat_timeout", "20")) for i in range(2)]
    outs = [p.communicate()[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outs
  assert "is in use by another run (pid" in outs[0] and "process 0 found --workdir" in outs[1], outs


@pytest.mark.slow
def test_two_processes_train_into_a_bucket(tmp_path, gcs_bucket):
  """The same two processes with a gs:// workdir (a local GCS emulator): each writes its shards and data
  position into the bucket, process 0 the rest; one process exports step 6 from the bucket, then resumes the
  run there."""
  from evf_jax import storage
  config = tmp_path / "micro.py"
  config.write_text(CONFIG)
  from data_pipelines import prepare
  prepare.build("synthetic", str(tmp_path / "data"), num_train=24, num_eval=3, seed=0, progress=False)
  workdir = f"gs://{gcs_bucket}/two_processes"
  common = ["--config", str(config), f"--config.data.root={tmp_path / 'data'}", "--workdir", workdir]
  port = _port()
  procs = [_train(common, 4, ("--coordinator_address", f"127.0.0.1:{port}", "--coordinator_bind_address",
                              f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
                              "--heartbeat_timeout", "20")) for i in range(2)]
  outs = [p.communicate()[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  assert "on 8 cpu device(s), 2 process(es)" in outs[0] and f"model in {workdir}/export" in outs[0]
  files = set(storage._files_under(workdir))
  assert {"checkpoints/6/commit_success.txt", "checkpoints/6/data/process_0-of-2.json",
          "checkpoints/6/data/process_1-of-2.json", "export/model_config.json", "config.json"} <= files, files
  # `run.py export` of the bucket's step 6 (written by two processes) in one: the run's own export, bit for bit.
  from evf_jax.checkpoints import load_checkpoint
  from evf_testing.training import assert_same_tree
  assert cli.main(["export", "--workdir", workdir, "--step", "6", "--out", str(tmp_path / "six")]) == 0
  (config_a, params_a, _), (config_b, params_b, _) = (load_checkpoint(d) for d in (str(tmp_path / "six"),
                                                                                  f"{workdir}/export"))
  assert config_a == config_b
  assert_same_tree(params_a, params_b)
  assert cli.main(["train", *common, "--config.total_steps=8"]) == 0
  assert storage.path(f"{workdir}/checkpoints/8/commit_success.txt").exists()


@pytest.mark.slow
def test_two_processes_launched_by_slurm(tmp_path):
  """Two tasks as `srun --ntasks=2` starts them: no flags, the step's variables only (jax's Slurm detection;
  the coordinator is the node list's first host, its port from JAX_COORDINATOR_PORT instead of the job id).
  Then `run.py eval` of the export by two processes gives one process's result, and two processes fine-tune
  from that export."""
  config = tmp_path / "micro.py"
  config.write_text(CONFIG)
  from data_pipelines import prepare
  prepare.build("synthetic", str(tmp_path / "data"), num_train=24, num_eval=3, seed=0, progress=False)
  port = _port()
  common = ["--config", str(config), f"--config.data.root={tmp_path / 'data'}", "--workdir", str(tmp_path / "w"),
            "--coordinator_bind_address", f"127.0.0.1:{port}", "--heartbeat_timeout", "20"]
  procs = [_train(common, 4, launcher_env={
      "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
      "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(port)}) for i in range(2)]
  outs = [p.communicate()[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  assert "on 8 cpu device(s), 2 process(es)" in outs[0]
  assert (tmp_path / "w" / "checkpoints" / "6" / "data" / "process_1-of-2.json").is_file()

  # `run.py eval` of the export by two processes (coordinator flags) equals one process's on 8 devices.
  def evaluate(out, devices, extra=()):
    return subprocess.Popen(
        ["timeout", "-k", "10", "600", sys.executable, "run.py", "eval", "--checkpoint", str(tmp_path / "w" / "export"),
         "--data", str(tmp_path / "data"), "--split", "synthetic|val", "--out-dir", str(tmp_path / out),
         "--batch-size", "2", "--no-progress", *extra], cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
  def two_processes(*extra):
    port = _port()
    return [evaluate("two", 4, ("--coordinator-address", f"127.0.0.1:{port}", "--coordinator-bind-address",
                                f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *extra))
            for i in range(2)]
  runs = two_processes("--save-overlays", "3") + [evaluate("one", 8, ("--save-overlays", "3"))]
  outs = [p.communicate()[0] for p in runs]
  for p, o in zip(runs, outs):
    assert p.returncode == 0, o[-3000:]
  assert "gIoU" in outs[0] and "gIoU" not in outs[1]  # the table once, from process 0
  # Each process draws its own images' overlays; together they are one process's.
  two_drawn, one_drawn = (sorted(os.listdir(tmp_path / d / "overlays" / "synthetic_val")) for d in ("two", "one"))
  assert [f for f in two_drawn if f.endswith(".png")] == [f for f in one_drawn if f.endswith(".png")] != []
  assert {"index-0.json", "index-1.json"} <= set(two_drawn) and "index.json" in one_drawn
  two, one = (json.load(open(tmp_path / d / "synthetic_val.json")) for d in ("two", "one"))
  assert two["devices"] == one["devices"] == 8 and two["images"] == one["images"] == 3
  for key in ("sentences", "total_intersection", "total_union", "ciou"):
    assert two[key] == one[key], (key, two[key], one[key])
  assert two["giou"] == pytest.approx(one["giou"], rel=1e-12), (two["giou"], one["giou"])
  # Evaluated again with --overwrite and no overlays: process 0 removes the earlier ones, behind a barrier.
  again = two_processes("--overwrite")
  outs = [p.communicate()[0] for p in again]
  for p, o in zip(again, outs):
    assert p.returncode == 0, o[-3000:]
  assert not (tmp_path / "two" / "overlays" / "synthetic_val").exists()

  # Fine-tuning from that export in two processes (each loads the checkpoint, then its shards go to the mesh).
  port = _port()
  tune = [_train(["--config", str(config), f"--config.data.root={tmp_path / 'data'}", "--workdir",
                  str(tmp_path / "tune"), f"--config.init.evf_checkpoint={tmp_path / 'w' / 'export'}",
                  "--config.total_steps=2"], 4,
                 ("--coordinator_address", f"127.0.0.1:{port}", "--coordinator_bind_address", f"127.0.0.1:{port}",
                  "--num_processes", "2", "--process_id", str(i), "--heartbeat_timeout", "20")) for i in range(2)]
  outs = [p.communicate()[0] for p in tune]
  for p, o in zip(tune, outs):
    assert p.returncode == 0, o[-3000:]
  assert json.load(open(tmp_path / "tune" / "initialisation.json"))["init"] == "evf_checkpoint"


GATHER = """
import os, sys
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", coordinator_bind_address=f"127.0.0.1:{port}",
                           num_processes=2, process_id=pid, heartbeat_timeout_seconds=10)
import numpy as np
from evf_jax.evaluate import gather_64bit
counts = gather_64bit(np.asarray([3_000_000_000 + pid, -pid], np.int64))
sums = gather_64bit(np.asarray([0.1234567890123 + pid], np.float64))
print("RESULT", repr(counts.tolist()), repr(sums.tolist()), flush=True)
jax.distributed.shutdown()
os._exit(0)
"""


@pytest.mark.slow
def test_evaluation_totals_cross_processes_bit_for_bit(tmp_path):
  """Pixel counts past 2**31 and float64 IoU sums reach every process unchanged (jax's allgather alone would
  wrap the int64s and round the float64s to float32)."""
  script = tmp_path / "gather.py"
  script.write_text(GATHER)
  port = _port()
  procs = [subprocess.Popen(["timeout", "-k", "10", "120", sys.executable, str(script), str(i), str(port)], cwd=ROOT,
                            env=dict(_env(1), PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate()[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
    line = next(x for x in o.splitlines() if x.startswith("RESULT"))
    assert line == ("RESULT [[3000000000, 0], [3000000001, -1]] [[0.1234567890123], [1.1234567890123]]"), line


AGREE = """
import json, os, sys
import jax
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", coordinator_bind_address=f"127.0.0.1:{port}",
                           num_processes=2, process_id=pid, heartbeat_timeout_seconds=10)
from evf_jax.cli import run_eval
from evf_jax.errors import UserError
same = [{"split": "a|val", "precision": "fp32"}, {"split": "b|val", "precision": "fp32"}]
paths = [os.path.join(out, "a_val.json"), os.path.join(out, "b_val.json")]
kept = run_eval._earlier_results(out, paths, same, overwrite=False, skip_existing=True)
print("KEPT", json.dumps([None if k is None else k.get("giou", "placeholder") for k in kept]), flush=True)
try:
  run_eval._earlier_results(out, paths, same, overwrite=False, skip_existing=False)
except UserError as e:
  print("REFUSED", e, flush=True)
jax.distributed.shutdown()
os._exit(0)
"""


@pytest.mark.slow
def test_processes_agree_on_the_splits_an_earlier_eval_finished(tmp_path):
  """`run.py eval --skip-existing` on several hosts: process 0 writes the JSONs, so what it finds decides for all
  (here process 1's --out-dir is empty, as a directory on process 0's own disk is elsewhere): every process
  skips the same splits, and an existing result refused without the flag stops every process."""
  script = tmp_path / "agree.py"
  script.write_text(AGREE)
  outs = [tmp_path / "out0", tmp_path / "out1"]
  for o in outs:
    o.mkdir()
  (outs[0] / "a_val.json").write_text(json.dumps({"split": "a|val", "precision": "fp32", "giou": 0.5}))
  port = _port()
  procs = [subprocess.Popen(["timeout", "-k", "10", "120", sys.executable, str(script), str(i), str(port),
                             str(outs[i])], cwd=ROOT, env=dict(_env(1), PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  printed = [p.communicate()[0] for p in procs]
  for p, o in zip(procs, printed):
    assert p.returncode == 0, o[-3000:]
  kept = [json.loads(next(x for x in o.splitlines() if x.startswith("KEPT "))[5:]) for o in printed]
  assert kept == [[0.5, None], ["placeholder", None]], kept
  refused = [next(x for x in o.splitlines() if x.startswith("REFUSED")) for o in printed]
  assert "a_val.json exists" in refused[0] and "process 0 refused --out-dir" in refused[1], refused
