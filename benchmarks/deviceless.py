"""Compiling for chips this machine does not have: jax's CUDA plugin and libtpu both compile for a described
topology without its devices (how large jobs are compiled ahead of time). Shared by the compile-only tools
(`benchmarks/eval_compile.py`, `benchmarks/train_compile.py`, `benchmarks/experimental/gpu_static.py`).

Call `use_compile_only_cuda` / `use_compile_only_tpu` before anything starts jax's backends, then get the
devices with `cuda_devices` / `tpu_devices`. Their environments: `scripts/setup_static_env.sh gpu|tpu`.
"""

from __future__ import annotations

import functools
import os
import re

# H100 SXM (and H200: the same chip with 4.8 TB/s HBM3e) as XLA's GPU target description.
_TARGET = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _TARGET.format(bandwidth=3352320000000, memory=84929347584, name="NVIDIA H100 80GB HBM3"),
    "h200": _TARGET.format(bandwidth=4800000000000, memory=150754820096, name="NVIDIA H200"),
}

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

def use_compile_only_cuda(xla_flags: str, tool: str) -> str | None:
  """Sets this process up to compile for a GPU it does not have; call it before anything starts jax's
  backends (they read the environment once). Returns an error line where jax's CUDA plugin is missing."""
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError:
    return (f"{tool} needs jax's CUDA plugin and CUDA libraries: run "
            "scripts/setup_static_env.sh gpu and use .venv-gpu-static/bin/python")
  # The plugin must not look for a driver or a GPU; XLA takes its flags once.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  return None


def cuda_devices(target: str, topology: str = "1x1x1") -> list:
  """Compile-only devices of `topology` (e.g. 1x1x4: four GPUs) of the chip TARGETS[target]; what jax
  and our code would ask the attached GPU is answered as that chip would."""
  import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
  from jax.experimental.topologies import get_topology_desc

  from evf_jax.sam import rel_pos_attention
  # jax asks the local GPU for its compute capability before choosing cuDNN's head-dim limit.
  cudnn_attention.check_compute_capability = lambda c: tuple(map(int, c.split("."))) <= (9, 0)
  cudnn_attention.is_cuda_compute_capability_equal = lambda c: tuple(map(int, c.split("."))) == (9, 0)
  # The XLA attention path chunks its global blocks by the backend jax runs on (the CPU here).
  rel_pos_attention.default_chunking = functools.partial(rel_pos_attention.default_chunking, platform="gpu")
  return get_topology_desc("static", "cuda", target_config=TARGETS[target], topology=topology).devices


def collectives(hlo_text: str) -> dict[str, int]:
  """How many of each cross-device operation a compiled program holds (async pairs count once)."""
  found = re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text)
  return {op: found.count(op) for op in COLLECTIVES if op in found}


def use_compile_only_tpu(tool: str) -> str | None:
  """As `use_compile_only_cuda`, for libtpu."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return (f"{tool} --platform tpu needs libtpu: run scripts/setup_static_env.sh tpu and use "
            ".venv-tpu-static/bin/python")
  os.environ["JAX_PLATFORMS"] = "cpu"  # jax runs on the CPU; libtpu only compiles
  # libtpu describes the local host from these at start-up and warns at length when they are missing; with
  # no chips here they change nothing else (the target is --topology).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  return None


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` slices of `topology` (each device knows its `slice_index`)."""
  from jax.experimental.topologies import get_topology_desc
  if num_slices == 1:
    return get_topology_desc(platform="tpu", topology_name=topology).devices
  return get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices).devices


