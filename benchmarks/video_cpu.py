"""Video tracking speed: evf-jax's SAM-2 tracker vs sam2's (PyTorch) legacy video predictor, same random
weights, same JPEG frames, one process, one after the other.

    python -m benchmarks.video_cpu [--size hiera_l] [--frames 8] [--hw 480 640] [--threads 2] [--chunk 4]

Both sides run EVF-SAM2's video flow from the JPEG folder to logits at the original size: frame loading and
resizing, image features, frame 0 prompted by a sparse embedding (EVF-SAM2's text token; BEiT-3 is not part of
this measurement), memory attention / heads / memory encoder on the later frames, hole filling. Ours is timed
on its second run (the first compiles; its time is reported separately). The reference's hole filling needs
sam2's CUDA kernel; here it gets a scipy labelling in its place (`_components`), as fast as ours, so that the
comparison is of the models. Prints seconds per frame and the ratio ours / reference (lower is better).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def _components(mask):
  """sam2's `get_connected_components` (labels, areas; 8-connectivity) with scipy, for the reference's timing."""
  import torch
  from scipy import ndimage
  m = mask.to(torch.bool).numpy()
  labels, counts = np.zeros(m.shape, np.int32), np.zeros(m.shape, np.int32)
  for i in range(m.shape[0]):
    lab, n = ndimage.label(m[i, 0], structure=np.ones((3, 3), bool))
    labels[i, 0] = lab
    counts[i, 0] = np.where(lab > 0, np.bincount(lab.ravel(), minlength=n + 1)[lab], 0)
  return torch.from_numpy(labels), torch.from_numpy(counts)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="hiera_l", help="a SAM-2 preset (toy, hiera_t, hiera_s, hiera_b+, hiera_l)")
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--hw", type=int, nargs=2, default=(480, 640))
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--chunk", type=int, default=4)
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  from PIL import Image

  from convert.sam2 import convert_sam2
  from evf_jax import postprocess
  from evf_jax.images import load_image
  from evf_jax.sam2 import SAM2_CONFIGS, tracking
  from evf_jax.sam2.transforms import video_frame
  from evf_testing import torch_reference as tr
  from evf_testing.images import smooth_image
  from evf_testing.sam2_reference import build_torch_video_predictor, reference_video

  torch.set_num_threads(args.threads)
  cfg = SAM2_CONFIGS[args.size]
  model = build_torch_video_predictor(cfg, seed=0)
  params = jax.device_put(convert_sam2(tr.state_dict_numpy(model), cfg))
  h, w = args.hw
  prompt = np.random.default_rng(0).normal(size=(1, cfg.d_model)).astype(np.float32)
  with tempfile.TemporaryDirectory() as d:
    base = smooth_image(h + 4 * args.frames, w + 4 * args.frames, seed=1)
    paths = []
    for t in range(args.frames):
      paths.append(os.path.join(d, f"{t:05d}.jpg"))
      Image.fromarray(base[4 * t:4 * t + h, 4 * t:4 * t + w]).save(paths[-1], quality=95)

    t0 = time.perf_counter()
    ref, _ = reference_video(model, d, prompt, components=_components)
    t_ref = time.perf_counter() - t0

    tracker = tracking.VideoTracker(cfg, params, chunk=args.chunk)
    a_y, a_x = (jnp.asarray(postprocess.bilinear_matrix(cfg.low_res_size, n).astype(np.float32)) for n in (h, w))
    up = jax.jit(postprocess.apply_matrices)

    def ours():
      frames = (video_frame(load_image(q), cfg.image_size) for q in paths)
      return [np.asarray(up(jnp.asarray(low[0]), a_y, a_x)) for low, _ in tracker.run(frames, jnp.asarray(prompt))]

    t0 = time.perf_counter()
    ours()
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = ours()
    t_ours = time.perf_counter() - t0
  n = args.frames
  err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
  agree = min(float(np.mean((a > 0) == (b > 0))) for a, b in zip(got, ref))
  print(f"{args.size}, {n} frames of {h}x{w}, {args.threads} torch threads, chunk {args.chunk}")
  print(f"reference: {t_ref / n:.3f} s/frame ({n / t_ref:.3f} frames/s)")
  print(f"ours:      {t_ours / n:.3f} s/frame ({n / t_ours:.3f} frames/s); first run (compiling) {t_first:.1f} s")
  print(f"ratio ours/reference: {t_ours / t_ref:.3f}")
  print(f"parity: max abs logit difference {err:.3g}, worst mask agreement {agree:.5f}")


if __name__ == "__main__":
  main()
