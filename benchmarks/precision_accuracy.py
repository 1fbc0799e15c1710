"""What bf16 (or fp16) inference costs in accuracy, for a trained checkpoint on a prepared held-out split.

    python -m benchmarks.precision_accuracy --checkpoint workdir/synthetic/export \\
        --data workdir/synthetic/data/synthetic [--split val] [--images 200] [--precision bf16] [--out r.json]

Every prompt of every image is predicted twice with `Predictor` (one image encode per precision), in float32
and in the lower precision, masks at the original size. Reported: gIoU / cIoU of both against the true masks,
and how far the two precisions agree with each other: the share of mask pixels that agree, the IoU between the
two masks (per prompt: mean and minimum), the share of prompts whose mask changed at all, and the largest
logit difference. A trained model is needed: with random weights the logits sit near the threshold and the
agreement means little.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from data_pipelines import records
from evf_jax import metrics
from evf_jax.images import decode_image
from evf_jax.predictor import Predictor


def compare(checkpoint: str, data: str, split: str = "val", images: int = 0, precision: str = "bf16") -> dict:
  ref = Predictor.from_checkpoint(checkpoint, precision="fp32")
  low = Predictor.from_checkpoint(checkpoint, precision=precision)
  recs = records.read_records(data, split)
  recs = recs[:images] if images else recs
  truth_acc = {"fp32": metrics.IoUAccumulator(), precision: metrics.IoUAccumulator()}
  agree_px = total_px = changed = 0
  pair_ious, max_logit_diff = [], 0.0
  for rec in recs:
    image = decode_image(rec.image)
    texts = [e.text for e in rec.entries]
    out = {}
    for name, p in (("fp32", ref), (precision, low)):
      p.set_image(image)
      out[name] = p.predict(texts)
    for j, e in enumerate(rec.entries):
      gt = rec.mask(e.mask_index).astype(bool)
      for name in truth_acc:
        m = out[name].masks[j]
        truth_acc[name].add(np.array([np.sum(m & gt)]), np.array([np.sum(m | gt)]))
      a, b = out["fp32"].masks[j], out[precision].masks[j]
      agree_px += int(np.sum(a == b))
      total_px += a.size
      union = int(np.sum(a | b))
      pair_ious.append(1.0 if union == 0 else float(np.sum(a & b)) / union)
      changed += int(np.any(a != b))
    diff = np.abs(out["fp32"].logits.astype(np.float32) - out[precision].logits.astype(np.float32))
    max_logit_diff = max(max_logit_diff, float(diff.max()))
  result = {name: {"giou": acc.giou, "ciou": acc.ciou, "sentences": acc.sentences} for name, acc in truth_acc.items()}
  result["agreement"] = {"pixels": agree_px / total_px, "mask_iou_mean": float(np.mean(pair_ious)),
                         "mask_iou_min": float(np.min(pair_ious)), "prompts_changed": changed / len(pair_ious),
                         "max_logit_diff": max_logit_diff}
  result.update(images=len(recs), precision=precision, checkpoint=checkpoint, split=split)
  return result


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="a converted or exported checkpoint directory")
  ap.add_argument("--data", required=True,
                  help="a prepared dataset folder (TFDS, as run.py prepare writes; or the older format with meta.json)")
  ap.add_argument("--split", default="val")
  ap.add_argument("--images", type=int, default=0, help="first N images (0: all)")
  ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
  ap.add_argument("--out", default=None, help="JSON results")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  r = compare(args.checkpoint, args.data, args.split, args.images, args.precision)
  r["seconds"] = time.perf_counter() - t0
  r["date"] = time.strftime("%Y-%m-%d")
  low = args.precision
  print(f"{r['images']} images, {r['fp32']['sentences']} prompts")
  for name in ("fp32", low):
    print(f"  {name:5s} gIoU {100 * r[name]['giou']:6.2f}  cIoU {100 * r[name]['ciou']:6.2f}")
  a = r["agreement"]
  print(f"  {low} vs fp32: {100 * a['pixels']:.3f}% of mask pixels agree; mask IoU mean {a['mask_iou_mean']:.4f}, "
        f"min {a['mask_iou_min']:.4f}; {100 * a['prompts_changed']:.1f}% of masks changed at all; "
        f"max |logit difference| {a['max_logit_diff']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(r, f, indent=2)


if __name__ == "__main__":
  main()
