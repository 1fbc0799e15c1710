"""cuDNN flash attention played by XLA, for CPU tests of the code paths that call it.

`install(monkeypatch)` routes `layers.attention(..., implementation="cudnn")` to XLA after the checks jax's
cuDNN wrapper makes at trace time (fp16/bf16 inputs, head dim a multiple of 8 and at most `max_head_dim`),
raising what it raises, so a caller that would fail on a GPU fails here too. The direct call to jax's
private cuDNN function in `flash_attention_wide_qk` finds no cuDNN on CPU and takes its padded-V fallback,
which comes through here.
"""

from __future__ import annotations

import jax.numpy as jnp

from evf_jax import layers


def install(monkeypatch, max_head_dim: int = 256, half_only: bool = True) -> dict:
  """max_head_dim: 256 plays Hopper, 128 earlier GPUs. half_only=False lets float32 parity tests through.
  Returns a dict counting the cuDNN calls traced ("cudnn"), so a test can tell the path was taken."""
  xla = layers.attention
  calls = {"cudnn": 0}

  def kernel(q, k, v, *, implementation=None, **kw):
    if implementation == "cudnn":
      calls["cudnn"] += 1
      if half_only and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"Q must be fp16/bf16, got {q.dtype}")
      if q.shape[-1] > max_head_dim or q.shape[-1] % 8:
        raise NotImplementedError(f"The head dim must be <= {max_head_dim} and a multiple of 8, but got {q.shape[-1]}")
      implementation = "xla"
    return xla(q, k, v, implementation=implementation, **kw)

  monkeypatch.setattr(layers, "attention", kernel)
  return calls
