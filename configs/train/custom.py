"""Fine-tuning on your own images, prompts and masks (docs/data.md#27-your-own-data), from a converted EVF-SAM
or EVF-SAM2 checkpoint.

    python run.py prepare --dataset custom --name shoes --src my_data --data_dir data   # my_data/{train,val}.jsonl
    python run.py train --config configs/train/custom.py:name=shoes --workdir W \\
        --config.init.evf_checkpoint=checkpoints/evf-sam-multitask

name: the prepared dataset(s) to train on; several are joined with "+" (name=shoes+boots) and drawn uniformly.
size: huge (SAM ViT-H + BEiT-3-large: evf-sam, evf-sam-multitask) or base; sam2: EVF-SAM2 (evf-sam2,
  evf-sam2-multitask). The init checkpoint must be that model (a one-line error names what differs).
val: the split evaluated every eval_every steps, in each dataset ("NAME|val"); the first dataset's gIoU picks the
  step exported; val= (empty) evaluates nothing and exports the last step.
The optimizer, loss and frozen set are the original's (configs/train/refcoco.py); the run's length, batch and
learning rate are starting points for a small dataset, not tuned: set them with --config.total_steps,
--config.batch_size, --config.optimizer.lr. From the public SAM and BEiT-3 files instead (init.sam_checkpoint,
init.beit3_checkpoint, --config.tokenizer) trains the whole EVF part from BEiT-3's pretraining, which wants
RefCOCO-sized data (configs/train/refcoco.py).
"""

from evf_jax.train import config as train_config


def get_config(arg=None):
  arg = train_config.parse_arg(arg, name="", size="huge", sam2=False, val="val")
  if not arg.name:
    raise ValueError("name=NAME is required: the dataset built by run.py prepare --dataset custom --name NAME")
  names = tuple(arg.name.split("+"))
  c = train_config.base_config()
  train_config.use_model(c, train_config.released_preset(arg.size, arg.sam2))
  c.data.mixture = {"custom": (1.0, names)}
  c.evals = tuple(f"{name}|{arg.val}" for name in names) if arg.val else ()
  c.batch_size = 16
  c.total_steps = 1000
  c.optimizer.warmup_steps = 50
  c.checkpoint_every = 250
  c.eval_every = 250
  c.log_every = 25
  c.remat = arg.size == "huge"  # BEiT-3-large
  c.export_best = bool(arg.val)
  return c
