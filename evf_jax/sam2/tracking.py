"""SAM-2's video tracking as fixed-shape JAX: the memory carried from frame to frame, the per-frame step as a
`lax.scan`, and the CPU hole filling of the predicted masks.

The original's video predictor keeps every frame's outputs in Python dicts and gathers the memory anew on each
frame. Here the carry is a fixed-shape buffer (`Memory`):

- cond_mem (B, h*w, mem_dim): the conditioning (prompted) frame's memory, always attended to;
- mems (B, num_maskmem - 1, h*w, mem_dim) with mem_valid (B, num_maskmem - 1): a shift register of the latest
  frames' memories, slot k = the frame k + 1 frames back (the slot picks the temporal encoding);
- ptrs (B, max_obj_ptrs_in_encoder, C) with ptr_valid: slot 0 the conditioning frame's object pointer, slot
  k >= 1 the pointer of the frame k frames back.

Before the buffers fill up the invalid slots are masked out of the memory attention. One compiled step serves
every frame of every video of the same size; `track` scans it over a chunk of frames whose image features were
encoded in one batch, and inactive (padding) frames leave the carry untouched.

Hole filling (`fill_holes`) only touches outputs and the conditioning frame's mask before its memory is encoded,
never a value inside the scan, so it runs on the host (scipy's labelling; the original needs a CUDA kernel).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from evf_jax import runtime
from evf_jax.sam2.config import Sam2Config
from evf_jax.sam2.sam2_base import Sam2


class Memory(NamedTuple):
  cond_mem: jax.Array
  mems: jax.Array
  mem_valid: jax.Array
  ptrs: jax.Array
  ptr_valid: jax.Array


def initial_memory(cfg: Sam2Config, cond_mem: jax.Array, cond_ptr: jax.Array) -> Memory:
  """The carry after the conditioning frame: its memory (B, h*w, mem_dim) and object pointer (B, C), nothing
  else yet."""
  b, hw, md = cond_mem.shape
  s, p = cfg.num_maskmem - 1, cfg.max_obj_ptrs_in_encoder
  ptrs = jnp.zeros((b, p, cfg.d_model), jnp.float32).at[:, 0].set(cond_ptr.astype(jnp.float32))
  return Memory(cond_mem.astype(jnp.float32), jnp.zeros((b, s, hw, md), jnp.float32), jnp.zeros((b, s), bool),
                ptrs, jnp.zeros((b, p), bool).at[:, 0].set(True))


def push(memory: Memory, mem: jax.Array, ptr: jax.Array) -> Memory:
  """The carry after one more tracked frame: its memory and pointer enter slot 0 (k = 1 frame back) and every
  other slot moves one frame further back; the oldest falls out. The conditioning frame's entries stay."""
  m = memory
  b = mem.shape[0]
  mems, mem_valid = m.mems, m.mem_valid
  if mems.shape[1]:
    mems = jnp.concatenate([mem[:, None], mems[:, :-1]], axis=1)
    mem_valid = jnp.concatenate([jnp.ones((b, 1), bool), mem_valid[:, :-1]], axis=1)
  ptrs, ptr_valid = m.ptrs, m.ptr_valid
  if ptrs.shape[1] > 1:
    ptrs = jnp.concatenate([ptrs[:, :1], ptr[:, None].astype(ptrs.dtype), ptrs[:, 1:-1]], axis=1)
    ptr_valid = jnp.concatenate([ptr_valid[:, :1], jnp.ones((b, 1), bool), ptr_valid[:, 1:-1]], axis=1)
  return Memory(m.cond_mem, mems, mem_valid, ptrs, ptr_valid)


def track(sam2_model, params: Any, memory: Memory, embeds: jax.Array, high_res: tuple[jax.Array, ...],
          active: jax.Array) -> tuple[Memory, dict[str, jax.Array]]:
  """Tracks B objects through a chunk of T frames after the conditioning frame (a `lax.scan`; call under jit).

  sam2_model: an `evf_jax.sam2.Sam2`; params: its params. embeds (T, h, w, C) and high_res ((T, 4h, 4w, C/8),
  (T, 2h, 2w, C/4)): the frames' image features (`Sam2.image_features`). active (T,) bool: frames to track, in
  order; inactive ones (padding, or the conditioning frame inside its chunk) are skipped and leave the carry as
  it was. Returns the carry and per frame "low_res" (T, B, 1, 4h, 4w) gated logits before hole filling and
  "object_score" (T, B, 1) (zeros on skipped frames).
  """
  b = memory.cond_mem.shape[0]
  lr = 4 * embeds.shape[1]

  def run(mem: Memory, embed, hr):
    embed_b = jnp.broadcast_to(embed[None], (b, *embed.shape))
    out = sam2_model.apply({"params": params}, embed_b, tuple(x[None] for x in hr), *mem,
                           method="track_frame")
    return push(mem, out["memory"], out["obj_ptr"]), (out["low_res"], out["object_score"])

  def skip(mem: Memory, embed, hr):
    return mem, (jnp.zeros((b, 1, lr, lr), jnp.float32), jnp.zeros((b, 1), jnp.float32))

  def step(mem, xs):
    embed, hr, on = xs
    mem, (low, obj) = jax.lax.cond(on, run, skip, mem, embed, hr)
    return mem, {"low_res": low, "object_score": obj}

  return jax.lax.scan(step, memory, (embeds, tuple(high_res), active))


def fill_holes(logits: np.ndarray, max_area: int, fill_value: float = 0.1) -> np.ndarray:
  """The original's `fill_holes_in_mask_scores` on the host: in each (H, W) map of (..., H, W) logits, the
  8-connected components of the background (logits <= 0) with at most `max_area` pixels, border-touching ones
  included, are set to `fill_value` (a small foreground score). max_area <= 0: unchanged."""
  logits = np.asarray(logits)
  if max_area <= 0:
    return logits
  out = np.array(logits, copy=True)
  flat = out.reshape(-1, *out.shape[-2:])
  eight = np.ones((3, 3), bool)
  for m in flat:
    labels, n = ndimage.label(m <= 0, structure=eight)
    if n:
      areas = np.bincount(labels.ravel(), minlength=n + 1)
      small = areas <= max_area
      small[0] = False
      m[small[labels]] = fill_value
  return out


class VideoTracker:
  """SAM-2's video flow for prompts given as sparse embeddings on frame 0 (EVF-SAM2's text prompt), compiled
  once per chunk size:

  1. image features of `chunk` frames in one batch (the encoder keeps no state);
  2. frame 0: `no_mem_embed` added, SAM heads on the prompts (multimask, best by IoU, object-score gating), the
     best low-res logits hole-filled, resized to image size and *binarized* (a prompted frame), then encoded as
     the conditioning memory;
  3. every later frame: `track` (memory attention over the conditioning memory, the latest num_maskmem - 1
     frames' memories and the object pointers; SAM heads without prompt; its own memory from the sigmoid of
     its gated, not hole-filled logits);
  4. outputs: the hole-filled low-res logits of every frame.

  The memories are rounded to bfloat16 as the original video predictor stores them.
  """

  def __init__(self, config: Sam2Config, params: Any, *, dtype: Any = None, attention: str | None = "xla",
               chunk: int = 4, fill_hole_area: int = 8):
    if chunk < 2:
      raise ValueError(f"chunk must be >= 2 frames, got {chunk}")
    self.config, self.params, self.chunk, self.fill_hole_area = config, params, chunk, fill_hole_area
    self.dtype = dtype or jnp.float32
    model = self.model = Sam2(config, dtype=dtype, attention=attention)

    @runtime.jit_eigen_dots  # the image encoder (not the tracking step): dots through Eigen on the CPU
    def features(params, x):
      return model.apply({"params": params}, x.astype(self.dtype), method="image_features")

    @jax.jit
    def cond_heads(params, embed, high_res, prompts):
      def f(m):
        return m.sam_heads(m.add_no_mem_embed(embed), high_res, extra_sparse=prompts[:, None, :].astype(self.dtype))
      return model.apply({"params": params}, method=f)

    @jax.jit
    def cond_memory(params, embed, filled_low):
      def f(m):
        b = filled_low.shape[0]
        return m.encode_memory(jnp.broadcast_to(embed, (b, *embed.shape[1:])), m.upsample_to_image(filled_low),
                               binarize=True)
      return model.apply({"params": params}, method=f)

    @jax.jit
    def track_chunk(params, memory, embeds, high_res, active):
      return track(model, params, memory, embeds, high_res, active)

    self._features, self._cond_heads, self._cond_memory, self._track = features, cond_heads, cond_memory, track_chunk

  def run(self, frames, prompts: jax.Array):
    """frames: an iterable of (S, S, 3) float32 normalised frames (`transforms.video_frame`); prompts (B, C): one
    sparse prompt per object, for frame 0. Yields per frame, in order, (hole-filled low-res logits (B, 4h, 4w)
    float32 numpy, object-score logits (B,) numpy)."""
    s = self.config.image_size
    memory, first = None, True
    it = iter(frames)
    while True:
      batch = [f for _, f in zip(range(self.chunk), it)]
      if not batch:
        return
      n = len(batch)
      x = np.zeros((self.chunk, s, s, 3), np.float32)
      x[:n] = np.stack(batch)
      embeds, high_res = self._features(self.params, x)
      active = np.arange(self.chunk) < n
      outs = []
      if first:
        cond = self._cond_heads(self.params, embeds[:1], tuple(h[:1] for h in high_res), prompts)
        low0 = fill_holes(np.asarray(cond["low_res"], np.float32), self.fill_hole_area)
        memory = initial_memory(self.config, self._cond_memory(self.params, embeds[:1], jnp.asarray(low0)),
                                cond["obj_ptr"])
        outs.append((low0[:, 0], np.asarray(cond["object_score"])[:, 0]))
        active[0] = False
      memory, tracked = self._track(self.params, memory, embeds, high_res, active)
      low = np.asarray(tracked["low_res"])
      score = np.asarray(tracked["object_score"])
      for i in range(1 if first else 0, n):
        outs.append((fill_holes(low[i, :, 0], self.fill_hole_area), score[i, :, 0]))
      first = False
      yield from outs
