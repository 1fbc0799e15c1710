"""The experimental Pallas kernels for SAM's attention blocks (benchmarks/experimental/pallas_attention.py), run by Pallas's
interpreter on CPU, against segment-anything's own attention with decomposed rel-pos. Their speed is a GPU
question (benchmarks/experimental/gpu_encoder.py); these tests hold their arithmetic and their wiring into the encoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.experimental import pallas_attention as pa
from convert.rules import convert
from convert.sam import sam_rules
from evf_jax.sam import image_encoder as ie
from evf_testing import cudnn_stand_in
from evf_testing import torch_reference as tr

pytestmark = pytest.mark.experimental


def test_split_pow2():
  assert pa.split_pow2(80) == [(0, 64), (64, 16)]  # SAM-H
  assert pa.split_pow2(64) == [(0, 64)]            # SAM-B, SAM-L
  assert pa.split_pow2(48) == [(0, 32), (32, 16)]
  for d in (72, 8, 40):  # a piece under 16, which Triton's dot does not take
    with pytest.raises(NotImplementedError):
      pa.split_pow2(d)


def _torch_attention(qkv, rel_h, rel_w, n, hw):
  """segment-anything's global attention (its `add_decomposed_rel_pos`) on a fused (B, T, 3 N D) qkv."""
  import torch
  m = tr.segment_anything_modeling()
  b, t, c = qkv.shape
  d = c // (3 * n)
  x = torch.from_numpy(qkv).reshape(b, t, 3, n, d).permute(2, 0, 3, 1, 4).reshape(3, b * n, t, d)
  q, k, v = x.unbind(0)
  with torch.no_grad():
    attn = (q * d ** -0.5) @ k.transpose(-2, -1)
    attn = m.image_encoder.add_decomposed_rel_pos(attn, q, torch.from_numpy(rel_h), torch.from_numpy(rel_w), hw, hw)
    out = (attn.softmax(dim=-1) @ v).reshape(b, n, t, d).permute(0, 2, 1, 3)
  return out.numpy()


@pytest.mark.parametrize("h,w,heads,d,block_q", [(4, 16, 2, 80, 16), (4, 16, 2, 80, 32), (16, 16, 1, 16, 128)])
def test_kernel_matches_segment_anything(h, w, heads, d, block_q):
  """Head dims that split (80 = 64 + 16) and do not; query blocks of one grid row, two rows, eight rows;
  a non-square grid (rel_h and rel_w tables of different lengths)."""
  rng = np.random.default_rng(3)
  qkv = rng.normal(size=(2, h * w, 3 * heads * d)).astype(np.float32)
  rel_h, rel_w = (0.3 * rng.normal(size=(2 * s - 1, d)).astype(np.float32) for s in (h, w))
  ours = pa.global_rel_pos_attention(jnp.asarray(qkv), jnp.asarray(rel_h), jnp.asarray(rel_w), num_heads=heads,
                                      hw=(h, w), block_q=block_q, interpret=True)
  ref = _torch_attention(qkv, rel_h, rel_w, heads, (h, w))
  err = float(np.abs(np.asarray(ours) - ref).max())
  assert err < 1e-5, err


def test_kernel_refuses_grids_it_does_not_tile():
  qkv = jnp.zeros((1, 36, 3 * 2 * 16))
  with pytest.raises(NotImplementedError):  # rows of 6 keys: not a power of two
    pa.global_rel_pos_attention(qkv, jnp.zeros((11, 16)), jnp.zeros((11, 16)), num_heads=2, hw=(6, 6),
                                 block_q=12, interpret=True)


@pytest.mark.parametrize("window,grid,kinds,block_q", [
    (0, (16, 16), ("global",), 128),     # key rows of 16: the global kernel, query blocks of 8 rows
    (4, (6, 10), ("windowed",), 16),     # windows padded on both sides (6 -> 8, 10 -> 12)
    (3, (6, 10), ("windowed",), 16),     # 9-token windows in blocks of 16: lanes past the window
    (4, (8, 8), ("windowed",), 64),      # a query block larger than the window
])
def test_blocks_through_the_kernels(window, grid, kinds, block_q, monkeypatch):
  """segment-anything's Block against ours with attention="cudnn" and `with_pallas` in place, as
  `gpu_encoder.py --impls cudnn+pallas` runs the encoder; no cuDNN call is left (the stand-in counts them)."""
  import torch
  calls = cudnn_stand_in.install(monkeypatch, half_only=False)
  tile = "global_block_q" if window == 0 else "window_block_q"
  monkeypatch.setattr(ie, "block_attention", pa.with_pallas(ie.block_attention, kinds=kinds, interpret=True,
                                                            **{tile: block_q}))
  m = tr.segment_anything_modeling()
  input_size = grid if window == 0 else (8, 8)
  blk = m.image_encoder.Block(dim=32, num_heads=2, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
                              use_rel_pos=True, window_size=window, input_size=input_size)
  tr.randomize_(blk, seed=5)
  ours = ie.Block(32, 2, 4.0, window, input_size, attention="cudnn")
  x = np.random.default_rng(6).normal(size=(2, *grid, 32)).astype(np.float32)
  target = {"image_encoder": {"blocks_0": nn.unbox(jax.eval_shape(ours.init, jax.random.key(0), x))["params"]}}
  sd = {f"image_encoder.blocks.0.{k}": v for k, v in tr.state_dict_numpy(blk).items()}
  params = convert(sd, sam_rules(), target).params["image_encoder"]["blocks_0"]
  with torch.no_grad():
    ref = blk(torch.from_numpy(x)).numpy()
  out = jax.jit(lambda p, x: ours.apply({"params": p}, x))(params, jnp.asarray(x))
  err = float(np.abs(np.asarray(out) - ref).max())
  assert err < 2e-5, err
  assert calls["cudnn"] == 0


def test_windowed_kernel_refuses_what_it_does_not_tile():
  qkv = jnp.zeros((1, 3, 3, 3 * 2 * 16))
  with pytest.raises(NotImplementedError):  # a grid smaller than one window
    pa.windowed_rel_pos_attention(qkv, jnp.zeros(96), jnp.zeros((7, 16)), jnp.zeros((7, 16)), num_heads=2,
                                  window=4, interpret=True)
  with pytest.raises(NotImplementedError):  # a block size that is no power of two
    pa.windowed_rel_pos_attention(jnp.zeros((1, 8, 8, 96)), jnp.zeros(96), jnp.zeros((7, 16)),
                                  jnp.zeros((7, 16)), num_heads=2, window=4, block_q=24, interpret=True)
