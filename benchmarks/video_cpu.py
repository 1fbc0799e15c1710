"""Video tracking speed: evf-jax's SAM-2 tracker vs sam2's (PyTorch) legacy video predictor, same random
weights, same JPEG frames, one process, the two sides alternating.

    python -m benchmarks.video_cpu [--size hiera_l] [--frames 8] [--hw 480 640] [--threads 2] [--chunk 4]
                                   [--rounds 1] [--parts]

Both sides run EVF-SAM2's video flow from the JPEG folder to logits at the original size: frame loading and
resizing, image features, frame 0 prompted by a sparse embedding (EVF-SAM2's text token; BEiT-3 is not part of
this measurement), memory attention / heads / memory encoder on the later frames, hole filling. Ours first runs
once untimed (it compiles; that time is reported separately), then the reference and ours alternate for --rounds
rounds (medians). The reference's hole filling needs sam2's CUDA kernel; here it gets a scipy labelling in its
place (`connected_components_scipy`), as fast as ours, so that the comparison is of the models. Prints seconds
per frame and the ratio ours / reference (lower is better).

`--parts` also times, alternating, one frame's parts alone in the steady state (all num_maskmem memories and
max_obj_ptrs_in_encoder pointers present): the image encoder, the memory attention, the SAM heads without a
prompt, the memory encoder.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def run_ours(tracker, paths, prompt, hw) -> list[np.ndarray]:
  """Our tracker on the JPEG frames `paths` (loaded and resized as SAM-2's loader does), prompted on frame 0 by
  `prompt` (1, C): the hole-filled logits of every frame at the original size `hw`."""
  import jax
  import jax.numpy as jnp
  from evf_jax import postprocess
  from evf_jax.images import load_image
  from evf_jax.sam2.transforms import video_frame
  cfg = tracker.config
  a_y, a_x = (jnp.asarray(postprocess.bilinear_matrix(cfg.low_res_size, n).astype(np.float32)) for n in hw)
  up = jax.jit(postprocess.apply_matrices)
  frames = (video_frame(load_image(q), cfg.image_size) for q in paths)
  return [np.asarray(up(jnp.asarray(low[0]), a_y, a_x), np.float32)
          for low, _ in tracker.run(frames, jnp.asarray(prompt))]


def run_reference(predictor, directory, prompt, components=None) -> list[np.ndarray]:
  """sam2's legacy video predictor on the JPEG folder (`evf_testing.sam2_reference.reference_video`), hole
  filling by `components` (default: scipy's labelling): the logits of every frame at the original size."""
  from evf_testing.sam2_reference import connected_components_scipy, reference_video
  logits, _ = reference_video(predictor, directory, prompt, components=components or connected_components_scipy)
  return logits


def part_pairs(cfg, params, model, seed: int = 0, image_encoder: bool = True) -> dict:
  """{name: (ours, reference)} for one frame's parts in the steady state, on random inputs of the right shapes."""
  import jax
  import jax.numpy as jnp
  import torch
  from evf_jax import runtime
  from evf_jax.sam2 import Sam2
  from evf_jax.sam2.position_encoding import sine_position_encoding
  rng = np.random.default_rng(seed)
  e, c, md, s = cfg.embedding_size, cfg.d_model, cfg.mem_dim, cfg.image_size
  hw, slots, ptrs = e * e, cfg.num_maskmem - 1, cfg.max_obj_ptrs_in_encoder
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  m = Sam2(cfg)
  x, embed = f32(1, s, s, 3), f32(1, e, e, c)
  high_res = (f32(1, 4 * e, 4 * e, c // 8), f32(1, 2 * e, 2 * e, c // 4))
  cond_mem, mems, ptr = f32(1, hw, md), f32(1, slots, hw, md), f32(1, ptrs, c)
  logits = f32(1, 1, s, s) * 4
  call = lambda method: jax.jit(lambda p, *a: m.apply({"params": p}, *a, method=method))  # as the tracker:
  image_features = runtime.jit_eigen_dots(lambda p, *a: m.apply({"params": p}, *a, method="image_features"))  # Eigen dots
  condition = call("condition_on_memory")
  heads = call("sam_heads")
  encode = jax.jit(lambda p, emb, lg: m.apply({"params": p}, emb, lg, False, method="encode_memory"))
  valid_m, valid_p = jnp.ones((1, slots), bool), jnp.ones((1, ptrs), bool)
  jx, jemb, jhr = jnp.asarray(x), jnp.asarray(embed), tuple(jnp.asarray(h) for h in high_res)
  pix = condition(params, jemb, jnp.asarray(cond_mem), jnp.asarray(mems), valid_m, jnp.asarray(ptr), valid_p)

  t = lambda a: torch.from_numpy(np.array(a))  # a writable copy
  tx = t(x.transpose(0, 3, 1, 2))
  tpix = t(embed.transpose(0, 3, 1, 2))
  thr = [t(h.transpose(0, 3, 1, 2)) for h in high_res]
  # The memory as `_prepare_memory_conditioned_features` builds it, (tokens, B, C): 7 frames of h*w tokens, then
  # the pointers split into C / mem_dim tokens each.
  split = c // md
  memory = t(np.concatenate([cond_mem[0], mems[0].reshape(-1, md), ptr[0].reshape(-1, md)])[:, None])
  pos = np.tile(sine_position_encoding(e, e, md).reshape(hw, md), (slots + 1, 1))
  memory_pos = t(np.concatenate([pos, np.zeros((ptrs * split, md), np.float32)])[:, None])
  curr = t(embed.reshape(hw, 1, c))
  curr_pos = t(sine_position_encoding(e, e, c).reshape(hw, 1, c))
  tlogits = t(logits)

  def ref_heads():
    return model._forward_sam_heads(backbone_features=tpix, point_inputs=None, mask_inputs=None,
                                    high_res_features=thr, multimask_output=True)

  block = jax.block_until_ready
  pairs = {
      "memory attention (7 memories + 16 pointers)": (
          lambda: block(condition(params, jemb, jnp.asarray(cond_mem), jnp.asarray(mems), valid_m, jnp.asarray(ptr),
                                  valid_p)),
          lambda: model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                         num_obj_ptr_tokens=ptrs * split)),
      "SAM heads (no prompt)": (lambda: block(heads(params, pix, jhr)), ref_heads),
      "memory encoder": (lambda: block(encode(params, jemb, jnp.asarray(logits))),
                         lambda: model.memory_encoder(tpix, tlogits, skip_mask_sigmoid=False)),
  }
  if jax.default_backend() == "cpu":  # the tracking step's parts with the image encoder's CPU compile options
    eigen = runtime.jit_eigen_dots(lambda p, *a: m.apply({"params": p}, *a, method="condition_on_memory"))
    eigen_encode = runtime.jit_eigen_dots(lambda p, emb, lg: m.apply({"params": p}, emb, lg, False, method="encode_memory"))
    pairs["memory attention, dots through Eigen"] = (
        lambda: block(eigen(params, jemb, jnp.asarray(cond_mem), jnp.asarray(mems), valid_m, jnp.asarray(ptr),
                            valid_p)), pairs["memory attention (7 memories + 16 pointers)"][1])
    pairs["memory encoder, dots through Eigen"] = (lambda: block(eigen_encode(params, jemb, jnp.asarray(logits))),
                                                   pairs["memory encoder"][1])
  if image_encoder:
    pairs = {"image encoder (1 frame)": (lambda: block(image_features(params, jx[:1])),
                                         lambda: model.forward_image(tx)), **pairs}
  return pairs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="hiera_l", help="a SAM-2 preset (toy, hiera_t, hiera_s, hiera_b+, hiera_l)")
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--hw", type=int, nargs=2, default=(480, 640))
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--chunk", type=int, default=4)
  p.add_argument("--rounds", type=int, default=1, help="alternating timed rounds of the whole video")
  p.add_argument("--parts", action="store_true", help="also time one frame's parts alone (3 rounds)")
  p.add_argument("--parts-only", action="store_true",
                 help="only the parts after the image encoder (memory attention, heads, memory encoder)")
  args = p.parse_args(argv)

  import jax
  import torch

  from convert.sam2 import convert_sam2
  from evf_jax.sam2 import SAM2_CONFIGS, tracking
  from evf_testing import benchmarking as common
  from evf_testing import torch_reference as tr
  from evf_testing.sam2_reference import build_torch_video_predictor, write_video_frames

  torch.set_num_threads(args.threads)
  cfg = SAM2_CONFIGS[args.size]
  model = build_torch_video_predictor(cfg, seed=0)
  params = jax.device_put(convert_sam2(tr.state_dict_numpy(model), cfg))
  h, w = args.hw
  n = args.frames
  prompt = np.random.default_rng(0).normal(size=(1, cfg.d_model)).astype(np.float32)
  if args.parts_only:
    with torch.inference_mode():
      times = common.alternate(part_pairs(cfg, params, model, image_encoder=False), 3)
    print(f"{args.size}: one frame's parts alone, steady state, 3 alternating rounds, {args.threads} torch threads:")
    common.print_ratios(times)
    return
  tracker = tracking.VideoTracker(cfg, params, chunk=args.chunk)
  with tempfile.TemporaryDirectory() as d:
    paths = write_video_frames(d, n, h, w)
    t0 = time.perf_counter()
    got = run_ours(tracker, paths, prompt, (h, w))
    t_first = time.perf_counter() - t0
    ref = []
    t_ref, t_ours = [], []
    for _ in range(args.rounds):
      t0 = time.perf_counter()
      ref = run_reference(model, d, prompt)
      t_ref.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      got = run_ours(tracker, paths, prompt, (h, w))
      t_ours.append(time.perf_counter() - t0)
  err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
  agree = min(float(np.mean((a > 0) == (b > 0))) for a, b in zip(got, ref))
  mo, mr = float(np.median(t_ours)), float(np.median(t_ref))
  print(f"{args.size}, {n} frames of {h}x{w}, {args.threads} torch threads, chunk {args.chunk}, "
        f"{args.rounds} alternating rounds")
  print(f"reference: {mr / n:.3f} s/frame ({n / mr:.3f} frames/s)")
  print(f"ours:      {mo / n:.3f} s/frame ({n / mo:.3f} frames/s); first run (compiling) {t_first:.1f} s")
  print(f"ratio ours/reference: {mo / mr:.3f}")
  print(f"raw [s per video]: ours {[round(v, 2) for v in t_ours]}, reference {[round(v, 2) for v in t_ref]}")
  print(f"parity: max abs logit difference {err:.3g}, worst mask agreement {agree:.5f}")
  if args.parts:
    with torch.inference_mode():
      times = common.alternate(part_pairs(cfg, params, model), 3)
    print("\none frame's parts alone, steady state, 3 alternating rounds:")
    common.print_ratios(times)


if __name__ == "__main__":
  main()
