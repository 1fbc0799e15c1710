"""`run.py synthetic`, the default job: the whole system on the embedded synthetic referring dataset, no download.

1. generate the dataset (train and held-out "val" splits) and a tokenizer for its prompts;
2. train a small EVF-SAM from scratch (`configs/train/synthetic.py`, `run.py train`'s code);
3. evaluate the exported model on the held-out split (gIoU / cIoU) beside two text-blind baselines computed the
   same way: the same model given an empty prompt, and "every object" (all non-background pixels, the best a
   model that ignores the text but segments perfectly could do for prompts about one object);
4. predict a few prompts on a held-out image with `run.py predict`'s code (overlays);
5. draw held-out images with their prompts, predicted and true masks, and the loss / cIoU curves (one PNG).
Interrupted (Ctrl-C, SIGKILL) and run again, it resumes training where it stopped and redoes the rest.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import jax.numpy as jnp
import matplotlib
import numpy as np

from data_pipelines import records
from evf_jax import checkpoints, evaluate, metrics, storage
from evf_jax.cli import run_eval, run_train
from evf_jax.errors import UserError
from evf_jax.images import decode_image, save_prediction
from evf_jax.predictor import Predictor
from evf_jax.tokenizer import BOS_ID, EOS_ID, PAD_ID
from evf_jax.train import config as train_config

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "train", "synthetic.py")
SPLIT = "synthetic|val"
DEFAULT_WORKDIR = "workdir/synthetic"  # relative to where it runs; scripts/run_default.sh runs at the repo root


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where data, checkpoints and results go")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's); more steps, "
                 "better masks (docs/default_job.md has the curve)")
  p.add_argument("--config", default=CONFIG, help="the training config file[:arg] (default: "
                 "configs/train/synthetic.py)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_config(spec: str, steps: Optional[int], progress: bool):
  """The config file (`FILE[:arg]`, read as `run.py train --config` reads it) with --steps and --no-progress."""
  cfg = train_config.load_file(spec)
  if steps is not None:
    if steps < 1:
      raise UserError(f"--steps must be >= 1, got {steps}")
    cfg.total_steps = steps
  cfg.progress = progress
  cfg.lock()
  return cfg


def run(args: argparse.Namespace) -> int:
  cfg = load_config(args.config, args.steps, not args.no_progress)
  workdir = storage.resolve(args.workdir, "--workdir")
  if storage.is_url(workdir):  # its data, results and pictures are local files; run.py train takes gs://
    raise UserError(f"--workdir {workdir}: the default job writes a local directory")
  print(f"[1-2/5] data and training in {workdir}")
  summary = run_train.train(cfg, workdir)
  if summary.stopped_early:
    return 130 if "SIGINT" in summary.stopped_early else 0
  export = summary.export
  data_root = run_train.data_root(cfg, workdir)
  data_dir = os.path.join(data_root, "synthetic")

  print("[3/5] evaluating the held-out split")
  options = run_train.eval_options(cfg, train_config.model_config(cfg.model))
  model = summary.evals.get(summary.step, {}).get(SPLIT)  # training evaluated its last step already
  if model is None:  # a rerun of a finished job: nothing was trained, so evaluate the export
    model = run_eval.evaluate_checkpoint(export, data_root, [SPLIT], out_dir=None, options=options,
                                         precision=cfg.precision)[0]
  blind = empty_prompt_baseline(export, data_dir, options, cfg.precision)
  every = every_object_baseline(data_dir)
  rows = [("EVF-SAM (trained here)", model), ("text-blind: same model, empty prompt", blind),
          ("text-blind: every object", every)]
  table = "\n".join(f"  {name:<40} gIoU {100 * r['giou']:6.2f}   cIoU {100 * r['ciou']:6.2f}" for name, r in rows)
  print(f"held-out split ({model['images']} images, {model['sentences']} prompts):\n{table}")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({name: {k: r[k] for k in ("giou", "ciou", "images", "sentences")} for name, r in rows}, f, indent=2)

  print("[4/5] predicting on a held-out image")
  record = records.read_records(data_dir, "val")[0]
  image = decode_image(record.image)
  prompts = [e.text for e in record.entries][:4]
  predictor = Predictor.from_checkpoint(export, precision=cfg.precision)
  predictor.set_image(image)
  result = predictor.predict(prompts)
  out = os.path.join(workdir, "predict")
  os.makedirs(out, exist_ok=True)
  for i, (prompt, mask) in enumerate(zip(prompts, result.masks)):
    save_prediction(os.path.join(out, f"val0_{i}"), image, mask)
    # No IoU score: EVF-SAM's loss does not train the IoU head, so from scratch its output means nothing.
    print(f"  [{i}] {prompt!r}: mask area {int(mask.sum())} px")

  print("[5/5] drawing")
  picture = draw(workdir, data_dir, predictor, rows)
  print(f"done: {picture}, {os.path.join(workdir, 'results.json')}, overlays in {out}")
  return 0


def empty_prompt_baseline(checkpoint: str, data_dir: str, options: evaluate.EvalOptions, precision: str) -> dict:
  """The trained model with every prompt replaced by the empty text "<s></s>": what it predicts without reading."""
  config, params, tokenizer = checkpoints.load_checkpoint(checkpoint)
  model_fn = evaluate.evf_predict_fn(config, precision)

  def empty(params, batch):
    # The answer does not depend on the prompt: computed once per image and given to each of its prompts.
    ids = jnp.full_like(batch["input_ids"][:, :1], PAD_ID).at[..., 0].set(BOS_ID).at[..., 1].set(EOS_ID)
    mask = jnp.zeros_like(batch["attention_mask"][:, :1]).at[..., :2].set(True)
    logits = model_fn(params, dict(batch, input_ids=ids, attention_mask=mask))  # (B, 1, H, W)
    return jnp.broadcast_to(logits, (logits.shape[0], batch["input_ids"].shape[1]) + logits.shape[2:])

  evaluator = evaluate.Evaluator(empty, options=options)
  return run_eval.evaluate_split(evaluator, params, tokenizer, config, data_dir, "val", name="empty prompt")


def every_object_baseline(data_dir: str) -> dict:
  """Every non-background pixel as the answer to every prompt (the background is the image's most common
  colour): perfect segmentation that ignores the text."""
  acc = metrics.IoUAccumulator()
  for rec in records.read_records(data_dir, "val"):
    image = decode_image(rec.image)
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    objects = np.any(image != colours[np.argmax(counts)], axis=-1)
    for e in rec.entries:
      gt = rec.mask(e.mask_index).astype(bool)
      acc.add(np.array([np.sum(objects & gt)]), np.array([np.sum(objects | gt)]))
  return dict(acc.result(), images=len(records.read_records(data_dir, "val")))


def highlight(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The image with everything outside `mask` dimmed and the mask's border drawn in red: readable whatever the
  objects' colours (the reference's blue blend vanishes on blue shapes)."""
  out = image.astype(np.float32)
  out[~mask] = out[~mask] * 0.3 + 255 * 0.15
  edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
  out[edge] = (230, 30, 30)
  return out.astype(np.uint8)


def _curves(workdir: str):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  evals = [(r["step"], r[f"eval/{SPLIT}/ciou"]) for r in rows if f"eval/{SPLIT}/ciou" in r]
  return train, evals


def draw(workdir: str, data_dir: str, predictor: Predictor, rows, images: int = 4, prompts: int = 3) -> str:
  """One PNG: held-out images (one per row) with, per prompt, the prediction and the truth; and the curves."""
  val = records.read_records(data_dir, "val")
  fig = plt.figure(figsize=(3 * (2 * prompts), 3 * (images + 1.2)), dpi=90)
  grid = fig.add_gridspec(images + 1, 2 * prompts, height_ratios=[1] * images + [1.2])
  for i, rec in enumerate(val[1:images + 1]):
    image = decode_image(rec.image)
    chosen = [rec.entries[j] for j in np.linspace(0, len(rec.entries) - 1, prompts).round().astype(int)]
    predictor.set_image(image)
    pred = predictor.predict([e.text for e in chosen])
    for j, e in enumerate(chosen):
      truth = rec.mask(e.mask_index).astype(bool)
      iou = (pred.masks[j] & truth).sum() / max(1, (pred.masks[j] | truth).sum())
      for k, (mask, label) in enumerate(((pred.masks[j], f"predicted (IoU {iou:.2f})"), (truth, "true"))):
        ax = fig.add_subplot(grid[i, 2 * j + k])
        ax.imshow(highlight(image, mask))
        ax.set_title(f"\"{e.text}\"\n{label}" if k == 0 else label, fontsize=9)
        ax.axis("off")
  train, evals = _curves(workdir)
  ax = fig.add_subplot(grid[images, :prompts])
  ax.plot(*zip(*train), lw=1)
  ax.set(xlabel="step", ylabel="training loss (2 BCE + 0.5 Dice)", yscale="log")
  ax = fig.add_subplot(grid[images, prompts:])
  if evals:
    ax.plot(*zip(*evals), "o-", label="EVF-SAM (held-out cIoU)")
  for name, r in rows[1:]:
    ax.axhline(r["ciou"], ls="--", color="grey" if "empty" in name else "black", lw=1, label=name)
  ax.set(xlabel="step", ylabel="held-out cIoU", ylim=(0, 1))
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  path = os.path.join(workdir, "results.png")
  fig.savefig(path)
  plt.close(fig)
  return path
