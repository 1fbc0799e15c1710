"""Test environment: CPU only, 8 simulated devices, float32 matmuls at full precision.

These must be set before jax is imported anywhere, which is why they live here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


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
