"""Referring segmentation (RES) on RefCOCO, RefCOCO+ and RefCOCOg, as the released `evf-sam` checkpoint was
trained, from the public SAM and BEiT-3 checkpoints.

    python run.py prepare --dataset refcoco --src dataset/refer_seg --data_dir data      # and refcoco+, refcocog
    python run.py train --config configs/train/refcoco.py:size=huge --workdir W \\
        --config.init.sam_checkpoint=sam_vit_h_4b8939.pth \\
        --config.init.beit3_checkpoint=beit3_large_patch16_224.pth --config.tokenizer=beit3.spm

size: huge (SAM ViT-H + BEiT-3-large, the released model) or base (SAM ViT-B + BEiT-3-base).
sam2: EVF-SAM2 (SAM-2 Hiera-L + BEiT-3-large, the released `evf-sam2`) instead: init.sam_checkpoint is then
  SAM-2's sam2_hiera_large.pt, and only BEiT-3 and the projector are trained (all of SAM-2 frozen, as the
  original keeps it for video). The loss sees the best of masks 1-3 by predicted IoU, the mask inference keeps,
  as the original's training forward since its commit 9d00853; the released evf-sam2 predates that commit,
  whose forward trained mask 0 (--config.model.multimask_output=False trains and decodes mask 0).
refclef: also train on RefCLEF (whether the released model saw it is unknown; the original's code default, as
  LISA's, lists it with the other three, so this follows that default; off by default here, so that the run
  needs only the COCO-based sets).
EVF-SAM's recipe was not published: the optimizer, schedule, batch and loss weights are LISA's, whose training
script EVF-SAM's authors say they adapted (docs/data.md#7-training-recipe). The refer datasets are drawn
uniformly, as the original's `refer_seg` group.
"""

from evf_jax.train import config as train_config


def get_config(arg=None):
  arg = train_config.parse_arg(arg, size="huge", refclef=False, sam2=False)
  c = train_config.base_config()
  train_config.use_model(c, train_config.released_preset(arg.size, arg.sam2))
  c.data.mixture = {"refer_seg": (1.0, ("refcoco", "refcoco+", "refcocog") + (("refclef",) if arg.refclef else ()))}
  c.evals = ("refcoco|unc|val", "refcoco+|unc|val", "refcocog|umd|val")
  # LISA: 2 images per GPU x 10 accumulation steps x 8 GPUs = 160 images per optimizer step, 5000 steps.
  c.batch_size = 160
  c.total_steps = 5000
  c.remat = arg.size == "huge"  # BEiT-3-large
  c.export_best = True  # LISA keeps the checkpoint with the best validation gIoU
  return c
