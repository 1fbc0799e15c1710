"""The multi-task mixture of `evf-sam-multitask`: referring expressions (RefCOCO/+/g), semantic segmentation
(ADE20K), machine-annotated instances (Objects365), parts (PartImageNet, Pascal-Part) and human parsing.

    python run.py prepare --dataset ade20k --src dataset/ade20k --data_dir data     # ... every dataset below
    python run.py train --config configs/train/multitask.py:size=huge --workdir W \\
        --config.init.sam_checkpoint=sam_vit_h_4b8939.pth \\
        --config.init.beit3_checkpoint=beit3_large_patch16_224.pth --config.tokenizer=beit3.spm

The mixture weights of the released model were not published. The only weights in the original code are
obj365 : refer_seg = 1 : 3; the others here are our choice (each semantic or part source as likely as Objects365),
so `--config.data.mixture` is the first thing to tune. Inside a group the datasets are drawn uniformly.
Semantic-level prompts carry the "[semantic] " prefix (written by `run.py prepare`).
`:sam2` trains EVF-SAM2-multitask (SAM-2 Hiera-L + BEiT-3-large) instead, from sam2_hiera_large.pt, with all of
SAM-2 frozen (configs/train/refcoco.py says more).
"""

from evf_jax.train import config as train_config


def get_config(arg=None):
  arg = train_config.parse_arg(arg, size="huge", sam2=False)
  c = train_config.base_config()
  train_config.use_model(c, train_config.released_preset(arg.size, arg.sam2, multitask=True))
  c.data.mixture = {
      "refer_seg": (3.0, ("refcoco", "refcoco+", "refcocog")),
      "obj365": (1.0, ("obj365",)),
      "ade20k": (1.0, ("ade20k",)),
      "partimagenet": (1.0, ("partimagenet",)),
      "pascal_part": (1.0, ("pascal_part",)),
      "humanparsing": (1.0, ("humanparsing",)),
  }
  c.evals = ("refcoco|unc|val", "refcoco+|unc|val", "refcocog|umd|val")
  c.batch_size = 160  # and LISA's 5000 steps (base_config): the released model's run length is unknown
  c.remat = arg.size == "huge"  # BEiT-3-large
  c.export_best = True  # LISA keeps the checkpoint with the best validation gIoU
  return c
