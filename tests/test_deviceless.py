"""benchmarks/deviceless.py: the environment it sets for the compile-only compiler plugins and what it asks jax
for. Neither plugin is installed here on purpose (scripts/setup_static_env.sh), so empty modules stand in for
them, and jax's topology description is recorded rather than called."""

from __future__ import annotations

import os
import sys
import types

from benchmarks import deviceless


def _installed(monkeypatch, *names: str) -> None:
  for name in names:
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))


def test_compile_only_cuda_environment(monkeypatch):
  """jax stays on the CPU (the plugin must not look for a driver) and the tool's XLA flags join the user's."""
  _installed(monkeypatch, "jax_plugins", "jax_plugins.xla_cuda12")
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/hlo")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", raising=False)
  assert deviceless.use_compile_only_cuda("--xla_gpu_enable_triton_gemm=false", "tool") is None
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/hlo --xla_gpu_enable_triton_gemm=false"
  assert os.environ["JAX_PLATFORMS"] == "cpu" and os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"


def test_compile_only_tpu_environment(monkeypatch):
  """jax stays on the CPU; libtpu's description of the local host is filled in where missing, the user's kept."""
  _installed(monkeypatch, "libtpu")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v4-8")
  assert deviceless.use_compile_only_tpu("tool") is None
  assert os.environ["JAX_PLATFORMS"] == "cpu" and os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"
  assert os.environ["TPU_ACCELERATOR_TYPE"] == "v4-8"


def test_devices_asked_of_jax(monkeypatch):
  """The topology (and the slices) go to jax's description; for a GPU, its chip's target, and what jax and the
  attention code would ask the absent GPU is answered as a compute capability 9.0 chip would (cuDNN's limits,
  the global attention's steps sized for a GPU)."""
  import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
  from jax.experimental import topologies

  from evf_jax.sam import rel_pos_attention
  asked = []

  def describe(*args, **kwargs):
    asked.append((args, kwargs))
    return types.SimpleNamespace(devices=[len(asked)])

  monkeypatch.setattr(topologies, "get_topology_desc", describe)
  chunking = rel_pos_attention.default_chunking
  for module, name in ((cudnn_attention, "check_compute_capability"),
                       (cudnn_attention, "is_cuda_compute_capability_equal"), (rel_pos_attention, "default_chunking")):
    monkeypatch.setattr(module, name, getattr(module, name))  # cuda_devices rebinds them: undone after the test
  assert deviceless.tpu_devices("v5e:2x2") == [1] and deviceless.tpu_devices("v5e:16x16", 2) == [2]
  assert [(kw["platform"], kw["topology_name"], kw.get("num_slices", 1)) for _, kw in asked] == [
      ("tpu", "v5e:2x2", 1), ("tpu", "v5e:16x16", 2)]
  assert deviceless.cuda_devices("h200", "4x1x8") == [3]
  args, kw = asked[-1]
  assert args == ("static", "cuda") and kw == {"target_config": deviceless.TARGETS["h200"], "topology": "4x1x8"}
  assert cudnn_attention.check_compute_capability("9.0") and cudnn_attention.check_compute_capability("8.0")
  assert not cudnn_attention.check_compute_capability("10.0")
  assert cudnn_attention.is_cuda_compute_capability_equal("9.0")
  assert not cudnn_attention.is_cuda_compute_capability_equal("8.9")
  assert rel_pos_attention.default_chunking.func is chunking
  assert rel_pos_attention.default_chunking.keywords == {"platform": "gpu"}
