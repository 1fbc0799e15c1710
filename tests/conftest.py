"""Test environment: CPU only, 8 simulated devices, float32 matmuls at full precision, and a persistent
compilation cache shared by this session and the processes its tests start (training tests compile the same
programs in several runs). Modules whose time is compiling, not running, use `fast_compile` (or
`fast_compile_unless_slow`, which leaves their slow full-size tests optimized).

These must be set before jax is imported anywhere, which is why they live here.
"""

import contextlib
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="evf_jax_test_jit_cache_")
else:
  _CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@contextlib.contextmanager
def _optimizations_off():
  """XLA with most optimizations off, here and in the processes started meanwhile."""
  before, env = jax.config.read("jax_disable_most_optimizations"), os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
  jax.config.update("jax_disable_most_optimizations", True)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
    if env is None:
      os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    else:
      os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = env


@pytest.fixture(scope="module")
def fast_compile():
  """Most XLA optimizations off for this module (its module fixtures included): compiling a training step for 8
  CPU devices takes ~40 s instead of ~110 s (tiny models run as fast either way; large ones slower)."""
  with _optimizations_off():
    yield


@pytest.fixture
def fast_compile_unless_slow(request):
  """Most XLA optimizations off for each test not marked slow (a module's tiny-model tests), on for the slow
  ones: full-size models run far slower unoptimized, and the slow tier keeps XLA's optimized programs tested."""
  if request.node.get_closest_marker("slow"):
    yield
    return
  with _optimizations_off():
    yield


@pytest.fixture(scope="session")
def gcs_bucket():
  """gs://<this name> on a local GCS emulator for the session (evf_testing/gcs.py)."""
  from evf_testing import gcs
  with gcs.emulator() as _:
    yield gcs.BUCKET


@pytest.fixture(autouse=True)
def _torch_threads():
  """Keeps torch from oversubscribing the 2 cores when a test imports it."""
  try:
    import torch
  except ImportError:
    yield
    return
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  yield


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest.ini): one worker per core, at most 4. Most of the tier's time is XLA compiling, mostly on
  one thread: on 2 cores two workers ran the tier in 10 min; one worker took 28 min for less of it on a busier
  machine (2026-11-28). More workers would each hold a copy of jax and torch."""
  return max(1, min(4, os.cpu_count() or 1))


def pytest_sessionfinish(session, exitstatus):
  if _CACHE:
    import shutil
    shutil.rmtree(_CACHE, ignore_errors=True)
