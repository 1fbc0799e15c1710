"""Run-time choices shared by inference, evaluation and training, spelled the same everywhere (CLI flags,
Python arguments, config fields):

  precision  "fp32" | "bf16" | "fp16": the compute dtype (parameters keep their stored dtype; LayerNorm
             statistics and softmax always run in float32);
  attention  "xla" | "cudnn": the attention kernels ("cudnn" is flash attention on NVIDIA GPUs, bf16/fp16).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from evf_jax.errors import UserError, first_line

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
ATTENTIONS = ("xla", "cudnn")


def compute_dtype(precision: str, attention: str = "xla") -> Any:
  """The compute dtype of `precision`. UserError for an unknown precision or attention, and for cuDNN
  attention in fp32: its flash kernels take fp16/bf16 only, and jax would fail deep inside the first call."""
  if precision not in PRECISIONS:
    raise UserError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
  if attention not in ATTENTIONS:
    raise UserError(f"attention {attention!r}: expected one of {', '.join(ATTENTIONS)}")
  if attention == "cudnn" and precision == "fp32":
    raise UserError("cuDNN attention needs precision bf16 or fp16 (its flash kernels have no float32 form)")
  return PRECISIONS[precision]


def backend() -> str:
  """`jax.default_backend()`, started here if it was not: a platform jax cannot start (JAX_PLATFORMS naming one
  not installed, a TPU VM's 'tpu,cpu' with the chips held elsewhere) is one UserError line, not jax's traceback
  (an AssertionError without a message where no plugin of that name exists)."""
  try:
    return jax.default_backend()
  except (RuntimeError, AssertionError) as e:
    raise UserError(f"jax cannot start the platforms {jax.config.jax_platforms!r}: "
                    f"{first_line(e, empty='no such platform is installed')}") from None


def check_attention_platform(attention: str) -> None:
  """UserError when cuDNN attention is asked for where jax has no GPU (before any checkpoint is read)."""
  if attention == "cudnn" and backend() != "gpu":
    raise UserError(f"attention cudnn needs an NVIDIA GPU; jax is running on {backend()}")


INSTALL_DOC = "docs/training.md#installing-on-tpu-vms-and-gpu-machines"


def check_accelerator_in_use() -> None:
  """UserError when this machine has TPU chips but jax runs on the CPU. Without libtpu, or with the chips held by
  another process, jax falls back to the CPU with at most a warning, and a training run or an evaluation would run
  there: on a pod slice every host alone, all into one workdir. A platform the user named (JAX_PLATFORMS,
  JAX_PLATFORM_NAME) is their choice; one that does not start is one line too, not jax's traceback.

  The chips are found as jax finds them for its own warning (their PCI ids, in its private `hardware_utils`;
  tests/test_cluster.py fails if an upgrade drops it, and the check then passes rather than break a run).
  NVIDIA GPUs are left to jax's own warning: their device files also exist where a job may not use them (a CPU
  job on a GPU node, WSL2's /dev/dxg), and GPU processes join a cluster without CUDA."""
  if backend() != "cpu" or jax.config.jax_platforms or jax.config.read("jax_platform_name"):
    return
  try:
    from jax._src import hardware_utils  # lazy: private jax module, read only by train and eval
    tpu_chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except (ImportError, AttributeError):
    return
  if tpu_chips:
    raise UserError(f"this machine has {tpu_chips} TPU chip(s) but jax runs on the CPU: libtpu is not installed "
                    f"(pip install -e '.[tpu]', {INSTALL_DOC}) or the chips are held by another process; set "
                    "JAX_PLATFORMS=cpu to run on the CPU")


def check_precision_platform(precision: str) -> None:
  """UserError for fp16 where jax runs on the CPU (before any checkpoint is read): XLA:CPU rejects float16 matrix
  products, and jax would fail inside the first call's compile."""
  if precision == "fp16" and backend() == "cpu":
    raise UserError("fp16 needs a GPU (XLA:CPU has no float16 products); use bf16 or fp32 on CPU")


def jit_init(fn: Callable) -> Callable:
  """`jax.jit` for a function that runs once, such as a parameter initialiser (its forward pass and one random
  draw per parameter): on CPU, XLA's backend optimisations are switched off for it, which cuts the compile time of
  the tiny training model's initialiser ~3x (84 s -> 30 s on a loaded 2-core machine). Its results differ from an
  optimised compile by float rounding (<= 5e-7 on that model), and run time does not matter for a single call."""
  if jax.default_backend() != "cpu":
    return jax.jit(fn)
  once = jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})

  def call(*args):
    # Inside another jit (compiler options are only allowed at the top level) it is traced into the caller.
    traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args))
    return fn(*args) if traced else once(*args)
  return call


# XLA:CPU compiles single matrix products to YNNPACK by default (jax 0.10); on the project's 2-core AVX2 machine
# that ran Hiera-L's float32 Linear layers 1.3-1.9x slower than PyTorch, and Eigen matched it (docs/evf_sam2.md,
# Speed on this CPU). Not a global switch: Eigen ran SAM-2's memory attention ~1.7x slower, and the small training
# step no faster, so it is chosen per program.
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jit_eigen_dots(fn: Callable, **kw) -> Callable:
  """`jax.jit` whose matrix products run through Eigen when jax's default backend is the CPU (`EIGEN_DOTS`);
  elsewhere a plain `jax.jit`."""
  if jax.default_backend() == "cpu":
    kw.setdefault("compiler_options", EIGEN_DOTS)
  return jax.jit(fn, **kw)


_cache_hits = 0  # compiles answered by the persistent compilation cache in this process


def _count_cache_hits(event: str, **kwargs) -> None:
  global _cache_hits
  if event == "/jax/compilation_cache/cache_hits":
    _cache_hits += 1


jax.monitoring.register_event_listener(_count_cache_hits)


def enable_compilation_cache(path: str) -> None:
  """Persist compiled programs across processes (jax's persistent compilation cache). With several processes
  only process 0 writes entries (jax's rule); the others read them when `path` is a directory they share."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"compilation cache {path} is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f"compilation cache {path}: {e.strerror or e}") from None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compilation_cache_hits() -> int:
  """How many compiles the persistent compilation cache (`enable_compilation_cache`, or jax's own
  JAX_COMPILATION_CACHE_DIR) has answered in this process."""
  return _cache_hits
