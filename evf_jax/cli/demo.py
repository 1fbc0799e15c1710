"""The embedded default job, `run.py demo`: every stage of evf-jax on data made here, no downloads.

1. prepare the synthetic referring dataset (ArrayRecord shards);
2. write a tiny EVF-SAM checkpoint with RANDOM weights and a sentencepiece model trained on the
   dataset's prompts (training is not built yet; a trained checkpoint replaces this step later);
3. predict masks for the prompts of one validation image (PNG masks and overlays);
4. evaluate the validation split (gIoU / cIoU JSON).
The masks of a random model are meaningless: the job shows that the stages run end to end.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import sentencepiece as spm

from data_pipelines import prepare, records
from evf_jax import checkpoints, evaluate
from evf_jax.cli import run_eval
from evf_jax.evf import EvfConfig, init_params
from evf_jax.images import decode_image, save_prediction
from evf_jax.predictor import Predictor

HELP = ("the embedded default job: synthetic data, a random-weight tiny model, predict and evaluate "
        "(no downloads; training is not built yet)")

DEMO_CHECKPOINT = "checkpoint_random_tiny"


def write_random_checkpoint(out: str, texts: list[str], preset: str = "tiny", seed: int = 0) -> str:
  """A converted-checkpoint directory with randomly initialised params and a tokenizer for `texts`."""

  config = EvfConfig.preset(preset)
  params = init_params(config, jax.random.key(seed))
  staging = out + ".partial"
  checkpoints.save_model(staging, params, dict(config.to_dict(), param_dtype="float32"),
                         {"source": f"random initialisation (seed {seed}); not a trained model"})
  tok_dir = os.path.join(staging, "tokenizer")
  os.makedirs(tok_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      f.write("\n".join(texts))
    # XLM-R's id layout: sentencepiece's defaults (<unk>=0, <s>=1, </s>=2) plus the fairseq offset.
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(tok_dir, "sentencepiece.bpe"),
                                   vocab_size=64, model_type="bpe", hard_vocab_limit=False,
                                   num_threads=1, minloglevel=2)
  os.replace(staging, out)
  return out


def run_demo(workdir: str, num_train: int = 64, num_eval: int = 8, seed: int = 0, log=print) -> dict:
  os.makedirs(workdir, exist_ok=True)
  data = os.path.join(workdir, "data", "synthetic")
  if not os.path.isfile(os.path.join(data, "meta.json")):
    log(f"[1/4] preparing the synthetic dataset in {data}")
    prepare.prepare("synthetic", data, num_train=num_train, num_eval=num_eval, seed=seed, progress=False)
  else:
    log(f"[1/4] using the synthetic dataset in {data}")
  val = records.read_records(data, "val")

  ckpt = os.path.join(workdir, DEMO_CHECKPOINT)
  if not os.path.isfile(os.path.join(ckpt, "model_config.json")):
    log(f"[2/4] writing a random-weight tiny checkpoint to {ckpt} (no trained weights yet)")
    texts = [e.text for r in records.read_records(data, "train") for e in r.entries]
    write_random_checkpoint(ckpt, texts, seed=seed)
  else:
    log(f"[2/4] using the checkpoint {ckpt}")

  rec = val[0]
  image = decode_image(rec.image)
  prompts = [e.text for e in rec.entries][:4]
  log(f"[3/4] predicting {len(prompts)} prompts on a {image.shape[1]}x{image.shape[0]} validation image")
  predictor = Predictor.from_checkpoint(ckpt)
  predictor.set_image(image)
  result = predictor.predict(prompts)
  out = os.path.join(workdir, "predict")
  os.makedirs(out, exist_ok=True)
  for i, (prompt, mask) in enumerate(zip(prompts, result.masks)):
    save_prediction(os.path.join(out, f"val0_{i}"), image, mask)
    log(f"      [{i}] {prompt!r}: mask area {int(mask.sum())} px, score {float(result.scores[i]):.3f}")

  log("[4/4] evaluating synthetic|val")
  results = run_eval.evaluate_checkpoint(ckpt, os.path.dirname(data), ["synthetic|val"],
                                         out_dir=os.path.join(workdir, "eval"),
                                         options=evaluate.EvalOptions(batch_size=4, progress=False))
  log(run_eval.format_table(results))
  log(f"done: outputs under {workdir} (random weights: the masks and scores are not meaningful)")
  return {"checkpoint": ckpt, "data": data, "eval": results}


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", default="workdir/demo", help="where the data, checkpoint and outputs go")
  p.add_argument("--num-train", type=int, default=64, help="synthetic training images to generate")
  p.add_argument("--num-eval", type=int, default=8, help="synthetic validation images to generate")
  p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
  run_demo(args.workdir, num_train=args.num_train, num_eval=args.num_eval, seed=args.seed)
  return 0
