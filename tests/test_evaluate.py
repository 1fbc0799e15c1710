"""RES evaluation: the metric against a direct numpy implementation of the protocol, the sharded/bucketed
evaluator against the same on a refer-format fixture (batch sizes, device counts), the oracle, the EVF-SAM
model path against `Predictor`, and `run.py eval` end to end with one-line errors for bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import eval_splits, pipeline, prepare, records
from data_pipelines.transforms import SampleConfig
from evf_jax import cli, evaluate, metrics
from evf_jax.cli import run_eval
from evf_jax.errors import UserError
from evf_jax.evf import EvfConfig, cast_kernels, init_params
from evf_testing import data_fixtures as df
from evf_testing.cli_errors import error_line

pytestmark = pytest.mark.usefixtures("fast_compile_unless_slow")  # tiny models: compiling is most of the time


# ---------------------------------------------------------------- direct numpy implementation of the protocol


def numpy_protocol(pairs) -> dict:
  """[(pred bool (H, W), gt (H, W))] -> gIoU / cIoU exactly as EVF-SAM's eval.py computes them."""
  inter = np.array([np.logical_and(p, g > 0).sum() for p, g in pairs], np.float64)
  union = np.array([np.logical_or(p, g > 0).sum() for p, g in pairs], np.float64)
  acc = inter / (union + 1e-10)
  acc[union == 0] += 1.0  # no-object target
  return {"giou": acc.mean(), "ciou": inter.sum() / (union.sum() + 1e-10), "sentences": len(pairs),
          "total_intersection": int(inter.sum()), "total_union": int(union.sum())}


def test_metric_matches_numpy_on_random_masks():
  rng = np.random.default_rng(0)
  h, w = 23, 31
  gt = (rng.random((40, h, w)) < rng.random((40, 1, 1))).astype(np.uint8)
  logits = rng.normal(size=(40, h, w)).astype(np.float32) + rng.normal(size=(40, 1, 1)).astype(np.float32)
  gt[:6] = 0                      # empty ground truth ...
  logits[3:9] = -1.0              # ... with empty predictions (3..5: empty union), and non-empty GT (6..8)
  logits[10] = 0.0                # logit exactly 0 is background (> 0, not >= 0)
  inter, union = jax.jit(metrics.intersection_union)(jnp.asarray(logits), jnp.asarray(gt))
  acc = metrics.IoUAccumulator()
  acc.add(np.asarray(inter), np.asarray(union))
  want = numpy_protocol(list(zip(logits > 0, gt)))
  got = acc.result()
  assert got["empty_union_sentences"] == 3
  assert got["total_intersection"] == want["total_intersection"] and got["total_union"] == want["total_union"]
  assert got["giou"] == pytest.approx(want["giou"], abs=1e-12)
  assert got["ciou"] == pytest.approx(want["ciou"], abs=1e-12)
  with pytest.raises(ValueError):
    acc.add(np.array([5]), np.array([4]))


def test_metric_region_ignores_padding():
  logits = jnp.ones((1, 4, 4))
  gt = jnp.zeros((1, 4, 4), jnp.uint8).at[0, 0, 0].set(1).at[0, 3, 3].set(1)  # (3, 3): ground truth in the padding
  region = jnp.zeros((4, 4), bool).at[:2, :3].set(True)
  inter, union = metrics.intersection_union(logits, gt, region)
  assert (int(inter[0]), int(union[0])) == (1, 6)
  inter, union = metrics.intersection_union(-logits, gt, region)  # nothing predicted: the union is the region's GT
  assert (int(inter[0]), int(union[0])) == (0, 1)


def test_split_names():
  s = eval_splits.parse_split("refcoco+|unc|testA")
  assert (s.dataset, s.split, s.tag) == ("refcoco+", "testA", "refcoco+_unc_testA")
  assert eval_splits.parse_split("synthetic|val").split == "val"
  assert ([x.name for x in eval_splits.expand_splits(["standard", "refcoco|unc|val"])]
          == list(eval_splits.STANDARD_SPLITS))
  for bad, expect in [("coco|unc|val", "unknown dataset"), ("refcocog|unc|val", "'umd' partition"),
                      ("refcoco|val", "DATASET|SPLITBY|SPLIT"), ("refcoco|unc|train", "not an evaluation"),
                      ("synthetic|x|val", "synthetic|SPLIT")]:
    with pytest.raises(UserError) as e:
      eval_splits.parse_split(bad)
    assert expect in str(e.value), (bad, str(e.value))


def test_sharded_step_communicates_nothing():
  """The evaluation step over all 8 devices, compiled: pure data parallelism, no collective anywhere. The
  model's SAM runs at 256 px (a 16 x 16 grid, head dim 16), so its global block takes the chunked
  attention path (`image_encoder.rel_pos_attention`), whose `lax.map` once sliced the batch and made XLA
  gather every image's q, k and v onto every device (then compute all images' attention on each)."""
  import dataclasses
  import re
  from jax.sharding import NamedSharding, PartitionSpec as P
  from evf_jax.evf import abstract_params
  tiny = EvfConfig.preset("tiny")
  cfg = dataclasses.replace(tiny, sam=dataclasses.replace(tiny.sam, img_size=256))
  grid, head_dim = 256 // cfg.sam.patch_size, cfg.sam.embed_dim // cfg.sam.num_heads
  assert 2 * grid > head_dim  # the chunked path, not the folded one
  mesh = evaluate.make_mesh()
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        abstract_params(cfg))
  batch = evaluate.batch_spec(jax.device_count(), 2, 16, 64, sam_size=256, beit_size=cfg.beit3.img_size,
                              low_res=cfg.sam.low_res_size, sharding=data)
  step = evaluate.sharded_step(evaluate.evf_predict_fn(cfg), mesh, with_predictions=True)
  hlo = step.trace(params, batch).lower().compile().as_text()
  found = re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)
  assert not found, sorted(set(found))


# ---------------------------------------------------------------- a refer-format fixture with several images

IMAGES = {1: (40, 56), 2: (64, 48), 3: (30, 70), 4: (50, 50), 5: (72, 36), 6: (45, 45), 7: (33, 60)}


def _write_refer_val(src: str) -> None:
  """refer_seg/{images, refcoco/refs(unc).p + instances.json}: 7 val images with 1-4 sentences, one empty GT,
  two refs on one image, mixed-case padded sentences; one testA image."""
  image_dir = os.path.join(src, "images/mscoco/images/train2014")
  images, anns, refs = [], [], []
  rng = np.random.default_rng(1)
  for image_id, (h, w) in IMAGES.items():
    name = f"COCO_train2014_{image_id:012d}.jpg"
    df.save_jpeg(os.path.join(image_dir, name), h, w, image_id)
    images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    n_refs = 2 if image_id == 4 else 1
    for r in range(n_refs):
      ann_id = 10 * image_id + r
      x0, y0 = (int(v) for v in rng.integers(0, 10, 2))
      seg = [] if image_id == 3 else [df.rect_poly(x0, y0, x0 + w // 2, y0 + h // 2)]
      anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "segmentation": seg})
      n_sent = 1 + (image_id + r) % 4 if image_id != 3 else 3
      sents = [{"sent_id": 100 * ann_id + k, "sent": f"  Thing {k} On IMAGE {image_id} ", "raw": "", "tokens": []}
               for k in range(n_sent)]
      refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
                   "split": "testA" if image_id == 7 else "val", "sentences": sents})
  ann_dir = os.path.join(src, "refcoco")
  os.makedirs(ann_dir, exist_ok=True)
  with open(os.path.join(ann_dir, "instances.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)
  with open(os.path.join(ann_dir, "refs(unc).p"), "wb") as f:
    pickle.dump(refs, f, protocol=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("evaldata")
  _write_refer_val(str(d / "raw"))
  prepare.build("refcoco", str(d / "root"), str(d / "raw"), progress=False)  # TFDS: root/refcoco/1.0.0
  from evf_jax.tokenizer import TextTokenizer
  from evf_testing.spm_model import train as train_spm
  tok = TextTokenizer(train_spm(str(d / "spm"), "bpe"))  # a tiny spm; XLM-R ids as the checkpoints' tokenizer
  return str(d / "root"), tok


def _perturbed_oracle(params, batch):
  """A batch-invariant stand-in for a model: GT with a fixed pixel pattern flipped, per prompt slot j;
  slot 2 predicts nothing. Integer arithmetic only, so any batching must give bit-identical logits."""
  s = batch["masks"].shape[-1]
  rows = jnp.arange(s)[:, None]
  cols = jnp.arange(s)[None, :]
  j = jnp.arange(batch["masks"].shape[1])[:, None, None]
  flip = (rows * 7 + cols * 3 + j) % 5 == 0
  pred = (batch["masks"] > 0) ^ flip
  pred = pred & (j != 2)
  return jnp.where(pred, 1.0, -1.0)


def _perturbed_numpy(gt: np.ndarray, j: int) -> np.ndarray:
  h, w = gt.shape
  rows, cols = np.mgrid[0:h, 0:w]
  pred = (gt > 0) ^ ((rows * 7 + cols * 3 + j) % 5 == 0)
  return pred & (j != 2)


class _Run:
  """An Evaluator on `devices` and a way to run it on a prepared split, as `run.py eval` reads it."""

  def __init__(self, fn, tok, batch_size, devices, params=None, config=EvfConfig.preset("tiny"), **kw):
    self.evaluator = evaluate.Evaluator(fn, devices=devices, options=evaluate.EvalOptions(
        batch_size=batch_size, progress=False, **kw))
    self.tok, self.params, self.config = tok, params if params is not None else {}, config

  def run(self, directory, split):
    sample = SampleConfig(max_text_len=1022, sam_size=self.config.sam.img_size,
                          beit_size=self.config.beit3.img_size)
    ds = pipeline.eval_dataset(directory, split, self.tok, low_res=self.config.sam.low_res_size, sample=sample)
    return self.evaluator.run(self.params, iter(ds), total=len(ds))


def _evaluator(fn, tok, batch_size, devices, params=None, config=EvfConfig.preset("tiny"), **kw):
  return _Run(fn, tok, batch_size, devices, params, config, **kw)


KEYS = ("giou", "ciou", "images", "sentences", "total_intersection", "total_union", "empty_union_sentences")


def test_evaluator_equals_numpy_protocol_for_any_batch_and_device_count(data):
  root, tok = data
  directory = os.path.join(root, "refcoco")
  recs = records.read_records(directory, "val")
  pairs = []
  for rec in recs:
    for j, e in enumerate(rec.entries):
      gt = rec.mask(e.mask_index)
      pairs.append((_perturbed_numpy(gt, j), gt))
  want = numpy_protocol(pairs)
  assert want["sentences"] == sum(len(r.entries) for r in recs) and len(recs) == 6
  results = []
  for batch_size, n_dev, lookahead in [(1, 1, 16), (4, 1, 16), (1, 8, 16), (4, 8, 1), (3, 2, 1)]:
    r = _evaluator(_perturbed_oracle, tok, batch_size, jax.devices()[:n_dev], lookahead=lookahead).run(
        directory, "val")
    assert r["batch_size"] == -(-batch_size // n_dev) * n_dev and r["devices"] == n_dev
    results.append({k: r[k] for k in KEYS})
  for r in results[1:]:
    assert r == results[0]  # bit-identical, not approximately equal
  got = results[0]
  assert got["images"] == 6 and got["sentences"] == want["sentences"]
  assert got["empty_union_sentences"] == 1  # empty GT image, third sentence predicts nothing
  assert (got["total_intersection"], got["total_union"]) == (want["total_intersection"], want["total_union"])
  assert got["giou"] == pytest.approx(want["giou"], abs=1e-12)
  assert got["ciou"] == pytest.approx(want["ciou"], abs=1e-12)
  assert 0.2 < got["giou"] < 0.95  # non-trivial


def test_oracle_scores_one(data):
  root, tok = data
  r = _evaluator(evaluate.oracle_predict_fn, tok, 2, jax.devices()).run(os.path.join(root, "refcoco"), "val")
  assert r["giou"] == pytest.approx(1.0, abs=1e-9) and r["ciou"] == pytest.approx(1.0, abs=1e-9)
  assert r["empty_union_sentences"] == 3  # the empty-GT image's three sentences


def test_every_process_s_totals_are_summed(monkeypatch):
  """With several processes, the split's result sums every process's totals (the all-gather is replaced by the
  stack of two accumulators' values: this process's first, as process_allgather orders them)."""
  mine, other = metrics.IoUAccumulator(), metrics.IoUAccumulator()
  mine.add([3, 0], [4, 0])
  other.add([1, 5, 2], [2, 5, 8])
  theirs = {np.dtype(np.int64): np.asarray([other.sentences, other.total_inter, other.total_union,
                                            other.empty_union, 2], np.int64),
            np.dtype(np.float64): np.asarray([other.iou_sum], np.float64)}
  monkeypatch.setattr(evaluate, "gather_64bit", lambda v: np.stack([v, theirs[v.dtype]]))
  r = evaluate._combine_processes(mine, 1)
  assert (r["sentences"], r["total_intersection"], r["total_union"], r["empty_union_sentences"], r["images"]) == (
      5, 11, 19, 1, 3)
  assert r["giou"] == pytest.approx((0.75 + 1.0 + 0.5 + 1.0 + 0.25) / 5, abs=1e-9)  # IoU = I / (U + eps)
  assert r["ciou"] == pytest.approx(11 / 19)


def test_evaluate_split_cuts_prompts_at_the_evaluators_length(data, monkeypatch):
  """run.py eval's split reader takes the evaluator's max_text_len (1022 by default: nothing is cut), not the
  pipeline's training default of 64 tokens."""
  root, tok = data
  seen = []
  real = pipeline.eval_dataset
  monkeypatch.setattr(pipeline, "eval_dataset", lambda *a, **k: seen.append(k["sample"]) or real(*a, **k))
  config = EvfConfig.preset("tiny")
  for length in (100, None):
    kw = {} if length is None else {"max_text_len": length}
    run = _evaluator(evaluate.oracle_predict_fn, tok, 2, jax.devices()[:1], config=config, **kw)
    r = run_eval.evaluate_split(run.evaluator, {}, tok, config, os.path.join(root, "refcoco"), "val", name="v")
    assert r["giou"] == pytest.approx(1.0, abs=1e-9)
    assert seen and {s.max_text_len for s in seen} == {length or 1022}, seen
    seen.clear()


def test_batcher_pads_and_masks():
  ex = []
  for i, (n, h, w) in enumerate([(3, 40, 50), (1, 130, 20)]):
    ex.append({"index": i, "image_id": str(i), "texts": [f"t{k}" for k in range(n)],
               "sam_image": np.full((8, 8, 3), i + 1, np.uint8), "resize_hw": np.array([8, 8], np.int32),
               "beit_image": np.zeros((4, 4, 3), np.float32), "input_ids": np.array([[0, 5, 6, 2]] * n, np.int32),
               "attention_mask": np.ones((n, 4), bool), "masks": np.ones((n, h, w), np.uint8),
               "orig_hw": np.array([h, w], np.int32), "a_y": np.ones((h, 6), np.float32),
               "a_x": np.ones((w, 6), np.float32)})
  batch, slots = evaluate.Batcher(4, size_multiple=64).assemble(ex)
  assert batch["input_ids"].shape == (4, 4, 16) and batch["masks"].shape == (4, 4, 192, 192)
  # 17 tokens, one of them equal to <pad> mid-sentence: the text bucket follows the last token, not the count
  ex[1]["attention_mask"] = np.zeros((1, 20), bool)
  ex[1]["attention_mask"][0, :17] = True
  ex[1]["attention_mask"][0, 5] = False
  ex[1]["input_ids"] = np.where(ex[1]["attention_mask"], 7, 1).astype(np.int32)
  long_batch, _ = evaluate.Batcher(4, size_multiple=64).assemble(ex)
  assert long_batch["input_ids"].shape[-1] == 32 and long_batch["attention_mask"][1, 0].sum() == 16
  assert batch["prompt_valid"].sum(1).tolist() == [3, 1, 0, 0]
  assert batch["masks"][0].sum() == 3 * 40 * 50 and batch["a_y"][1, 130:].sum() == 0
  assert batch["attention_mask"][2].sum(-1).tolist() == [2] * 4  # filler "<s></s>" rows
  assert [s.index if s else None for s in slots] == [0, 1, None, None]
  spec = evaluate.batch_spec(4, 4, 16, 192, sam_size=8, beit_size=4, low_res=6)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}


# ---------------------------------------------------------------- the EVF-SAM model path


def test_evf_model_matches_predictor_and_batching(data):
  """Tiny random EVF-SAM: the evaluator's numbers vs `Predictor` one image at a time + the numpy protocol,
  and across batch sizes / device counts. Different compiled shapes (prompt and text buckets, images per
  device) may round a logit within ~1e-6 of 0 differently, so totals may differ by a pixel in general
  (seen once in 4.5M union pixels on the synthetic set); on this fixture they agree exactly today, and a
  few pixels of slack keep the test about the pipeline, not XLA's rounding. The metric path itself is
  exact for any batching (test above)."""
  from evf_jax.images import decode_image
  from evf_jax.predictor import Predictor
  root, tok = data
  directory = os.path.join(root, "refcoco")
  config = EvfConfig.preset("tiny")
  params = init_params(config, jax.random.key(3))

  predictor = Predictor(config, params, tok, size_multiple=128)  # one size bucket: fewer compiles
  pairs = []
  for rec in records.read_records(directory, "val"):
    predictor.set_image(decode_image(rec.image))
    pred = predictor.predict([e.text for e in rec.entries])
    pairs += [(pred.masks[j], rec.mask(e.mask_index)) for j, e in enumerate(rec.entries)]
  want = numpy_protocol(pairs)
  fn = evaluate.evf_predict_fn(config)
  # batch 1 on 1 device (K, L buckets per image) vs batch 4 on 8 devices (rounded up to 8, one bucket)
  runs = [_evaluator(fn, tok, bs, jax.devices()[:nd], params=params).run(directory, "val")
          for bs, nd in [(1, 1), (4, 8)]]
  for r in runs:
    assert (r["images"], r["sentences"]) == (6, want["sentences"])
    assert abs(r["total_union"] - want["total_union"]) <= 3
    assert abs(r["total_intersection"] - want["total_intersection"]) <= 3
    assert r["giou"] == pytest.approx(want["giou"], abs=1e-4)
    assert r["ciou"] == pytest.approx(want["ciou"], abs=1e-4)
  assert 0.0 < want["total_intersection"] < want["total_union"]  # neither all-empty nor perfect


@pytest.mark.slow
def test_evf_model_with_cudnn_attention(data, monkeypatch):
  """The evaluation program with attention="cudnn" (vmapped over images, sharded over 8 devices), its
  kernel played by XLA after cuDNN's input checks: it must build and score as the XLA path does in bf16.
  `run.py eval --attention cudnn` has not run on a GPU yet; this is what CPU can check of it."""
  from evf_testing import cudnn_stand_in
  calls = cudnn_stand_in.install(monkeypatch)
  root, tok = data
  directory = os.path.join(root, "refcoco")
  config = EvfConfig.preset("tiny")
  params = cast_kernels(init_params(config, jax.random.key(3)), jnp.bfloat16)
  runs = {impl: _evaluator(evaluate.evf_predict_fn(config, "bf16", impl), tok, 8, jax.devices(),
                           params=params).run(directory, "val") for impl in ("xla", "cudnn")}
  xla, cudnn = runs["xla"], runs["cudnn"]
  assert calls["cudnn"] > 0
  assert (cudnn["images"], cudnn["sentences"]) == (xla["images"], xla["sentences"]) == (6, xla["sentences"])
  # Same math in another order: bf16 rounding may move a few pixels across 0.
  assert abs(cudnn["total_union"] - xla["total_union"]) <= 0.01 * xla["total_union"]
  assert cudnn["giou"] == pytest.approx(xla["giou"], abs=0.02)


# ---------------------------------------------------------------- run.py eval


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  from evf_testing import evf_reference as ref
  from evf_testing.spm_model import train as train_spm
  d = tmp_path_factory.mktemp("evalckpt")
  spm = train_spm(str(d / "spm"), "bpe")
  config = EvfConfig.preset("tiny")
  hf = ref.write_hf_directory(ref.build_torch_evf(config, 5), config,
                              os.path.join(spm, "sentencepiece.bpe.model"), str(d / "hf"))
  out = str(d / "evf_tiny")
  assert cli.main(["convert", "--src", hf, "--out", out]) == 0
  return out


def test_cli_eval_writes_json_table_and_overlays(ckpt, data, tmp_path, capsys):
  root, _ = data
  if not os.path.isdir(os.path.join(root, "synthetic")):
    prepare.build("synthetic", root, num_train=1, num_eval=1, seed=0, progress=False)
  out = tmp_path / "res"
  code = cli.main(["eval", "--checkpoint", ckpt, "--data", root, "--split", "refcoco|unc|val",
                   "--split", "synthetic|val", "--out-dir", str(out), "--batch-size", "2",
                   "--save-overlays", "1", "--no-progress"])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert "refcoco|unc|val" in captured.out and "gIoU" in captured.out
  r = json.load(open(out / "refcoco_unc_val.json"))
  val = records.read_records(os.path.join(root, "refcoco"), "val")
  assert r["split"] == "refcoco|unc|val" and r["images"] == 6 and r["sentences"] == sum(len(v.entries) for v in val)
  assert 0.0 <= r["giou"] <= 1.0 and 0.0 <= r["ciou"] <= 1.0
  assert r["devices"] == jax.device_count() and r["batch_size"] == 8 and r["wall_time_s"] > 0
  assert len(r["checkpoint"]["provenance"]["source_files"]["model.safetensors"]) == 64
  assert r["checkpoint"]["sam_scale"] == "tiny" and r["precision"] == "fp32"
  assert r["checkpoint"]["param_dtype"] == "float32"  # as convert wrote it
  syn = json.load(open(out / "synthetic_val.json"))
  assert syn["images"] == 1 and syn["sentences"] == len(records.read_records(os.path.join(root, "synthetic"), "val")[0].entries)
  index = json.load(open(out / "overlays" / "refcoco_unc_val" / "index.json"))
  assert len(index) == len(val[0].entries)
  assert all(os.path.isfile(out / "overlays" / "refcoco_unc_val" / e["file"]) for e in index)
  # Another evaluation into the same --out-dir would replace these results: refused before the checkpoint loads.
  code = cli.main(["eval", "--checkpoint", ckpt, "--data", root, "--split", "synthetic|val", "--out-dir", str(out),
                   "--no-progress"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "synthetic_val.json exists" in err[0] and "--overwrite" in err[0], err
  assert json.load(open(out / "synthetic_val.json")) == syn
  assert "--skip-existing" in err[0]
  # --overwrite without overlays: the earlier overlays of the split evaluated again go (they would pass for the
  # new result's), a file of the user's among them stays, and those of the split not evaluated again stay.
  (out / "overlays" / "synthetic_val" / "notes.txt").write_text("mine")
  assert cli.main(["eval", "--checkpoint", ckpt, "--data", root, "--split", "synthetic|val", "--out-dir", str(out),
                   "--batch-size", "2", "--overwrite", "--no-progress"]) == 0
  assert os.listdir(out / "overlays" / "synthetic_val") == ["notes.txt"]
  assert json.load(open(out / "overlays" / "refcoco_unc_val" / "index.json")) == index


def test_cli_eval_skip_existing_continues_an_interrupted_run(ckpt, data, tmp_path, capsys, monkeypatch):
  """`--skip-existing` keeps the splits an earlier run of the same evaluation finished and evaluates the others;
  another evaluation's result (a different precision) is refused, not replaced or kept."""
  root, _ = data
  if not os.path.isdir(os.path.join(root, "synthetic")):
    prepare.build("synthetic", root, num_train=1, num_eval=1, seed=0, progress=False)
  out = tmp_path / "res"
  base = ["eval", "--checkpoint", ckpt, "--data", root, "--split", "refcoco|unc|val", "--split", "synthetic|val",
          "--out-dir", str(out), "--batch-size", "2", "--no-progress"]  # the programs of the test above
  assert cli.main(base) == 0
  capsys.readouterr()
  first = {name: json.load(open(out / name)) for name in ("refcoco_unc_val.json", "synthetic_val.json")}
  # Killed during the second split: the first one's JSON is there, the second's is not (or not whole).
  (out / "synthetic_val.json").write_text('{"split": "synth')
  kept_mtime = os.stat(out / "refcoco_unc_val.json").st_mtime_ns
  assert cli.main(base + ["--skip-existing"]) == 0
  printed = capsys.readouterr().out
  assert "kept what an earlier run wrote for refcoco|unc|val" in printed
  assert "refcoco|unc|val" in printed.splitlines()[-3] and "synthetic|val" in printed.splitlines()[-2]
  assert os.stat(out / "refcoco_unc_val.json").st_mtime_ns == kept_mtime
  again = json.load(open(out / "synthetic_val.json"))
  for key in ("images", "sentences", "total_intersection", "total_union", "giou", "ciou"):
    assert again[key] == first["synthetic_val.json"][key], key
  # Everything done: nothing is loaded.
  monkeypatch.setattr(run_eval.checkpoints, "load_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
  assert cli.main(base + ["--skip-existing"]) == 0
  assert "synthetic|val" in capsys.readouterr().out
  # Another evaluation's results stay as they are.
  line = error_line(capsys, base + ["--skip-existing", "--precision", "bf16"])
  assert "refcoco_unc_val.json is another evaluation's (precision \"fp32\" there, \"bf16\" now)" in line, line
  assert "--overwrite" in line
  # ... as are those of another checkpoint (a copy: the same provenance, another path) or other data.
  shutil.copytree(ckpt, tmp_path / "copy")
  line = error_line(capsys, ["eval", "--checkpoint", str(tmp_path / "copy"), *base[3:], "--skip-existing"])
  assert "refcoco_unc_val.json is another evaluation's (checkpoint.path " in line, line
  shutil.copytree(root, tmp_path / "data_copy")
  line = error_line(capsys, base[:4] + [str(tmp_path / "data_copy")] + base[5:] + ["--skip-existing"])
  assert "refcoco_unc_val.json is another evaluation's (data_dir " in line, line
  assert {name: json.load(open(out / name)) for name in first} == {**first, "synthetic_val.json": again}
  assert "choose one" in error_line(capsys, base + ["--skip-existing", "--overwrite"])
  os.remove(out / "synthetic_val.json")
  os.mkdir(out / "synthetic_val.json")  # no result, and nothing could be written there after the evaluation
  assert "synthetic_val.json is a directory" in error_line(capsys, base + ["--skip-existing"])


def test_cli_eval_damaged_weights_are_one_line(ckpt, data, tmp_path):
  """Weights cut short (a copy that stopped half-way): the line names what TensorStore could not read, and the
  reads still in flight add no "Event loop is closed" tracebacks (hundreds of lines before)."""
  root, _ = data
  bad = tmp_path / "ckpt"
  shutil.copytree(ckpt, bad)
  for f in (bad / "params" / "d").iterdir():  # the arrays' metadata: every read fails, many in flight
    os.truncate(f, 50)
  r = subprocess.run([sys.executable, "run.py", "eval", "--checkpoint", str(bad), "--data", root, "--split",
                      "refcoco|unc|val", "--out-dir", str(tmp_path / "o"), "--no-progress"],
                     capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
  errors = [line for line in r.stderr.splitlines() if not line.startswith("WARNING:absl:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert errors[0].startswith(f"error: {bad}: cannot restore the weights (") and "OCDBT" in errors[0], errors


def test_cli_eval_bad_input(ckpt, data, tmp_path, capsys):
  root, _ = data
  base = ["eval", "--checkpoint", ckpt, "--out-dir", str(tmp_path / "o"), "--no-progress"]
  assert "no such directory" in error_line(capsys, base + ["--data", str(tmp_path / "nope"),
                                                            "--split", "refcoco|unc|val"])
  assert "a file; expected the directory" in error_line(capsys, base + ["--data", __file__, "--split", "synthetic|val"])
  assert "--read-threads must be >= 1, got 0" in error_line(capsys, base + ["--data", root, "--split",
                                                                            "refcoco|unc|val", "--read-threads", "0"])
  assert "split 'val[2:2]': selects no examples" in error_line(capsys, base + ["--data", root, "--split",
                                                                               "refcoco|unc|val[2:2]"])
  assert "unknown dataset 'coco'" in error_line(capsys, base + ["--data", root, "--split", "coco|unc|val"])
  line = error_line(capsys, base + ["--data", root, "--split", "a|b_c", "--split", "a_b|c"])
  assert "is inside the evf-jax checkpoint" in error_line(capsys, ["eval", "--checkpoint", ckpt, "--data", root,
                                                                    "--split", "refcoco|unc|val", "--out-dir",
                                                                    os.path.join(ckpt, "results"), "--no-progress"])
  assert "--split a|b_c and --split a_b|c would both write a_b_c.json" in line, line
  assert "has no split 'testB'" in error_line(capsys, base + ["--data", root, "--split", "refcoco|unc|testB"])
  line = error_line(capsys, base + ["--data", root, "--split", "refcocog|umd|val"])
  assert "no prepared dataset" in line
  assert f"`run.py prepare --dataset refcocog --src RAW_ROOT --data_dir {root}`" in line
  line = error_line(capsys, base + ["--data", os.path.join(root, "refcoco"), "--split", "refcoco+|unc|val"])
  assert "holds dataset 'refcoco'" in line
  other = tmp_path / "sam_ckpt"
  other.mkdir()
  (other / "model_config.json").write_text(json.dumps({"model_type": "sam"}))
  line = error_line(capsys, ["eval", "--checkpoint", str(other), "--data", root, "--split", "refcoco|unc|val",
                              "--out-dir", str(tmp_path / "o"), "--no-progress"])
  assert "model_type 'sam'" in line
  (other / "model_config.json").write_text("[1]")  # JSON, but not the object every reader expects
  line = error_line(capsys, ["eval", "--checkpoint", str(other), "--data", root, "--split", "refcoco|unc|val",
                              "--out-dir", str(tmp_path / "o"), "--no-progress"])
  assert "model_config.json: expected a JSON object, found list" in line, line
  line = error_line(capsys, base + ["--data", root, "--split", "refcoco|unc|val", "--attention", "cudnn"])
  assert "cuDNN attention needs precision bf16 or fp16" in line
  line = error_line(capsys, base + ["--data", root, "--split", "refcoco|unc|val", "--attention", "cudnn",
                                     "--precision", "fp16"])
  assert "needs an NVIDIA GPU" in line
  if jax.default_backend() == "cpu":  # XLA:CPU has no float16 products
    line = error_line(capsys, base + ["--data", root, "--split", "refcoco|unc|val", "--precision", "fp16"])
    assert "fp16 needs a GPU" in line
  # A bad slice of a later split: refused before the checkpoint is loaded and any split evaluated.
  for bad, expect in (("val[:abc]", "Error parsing split"), ("val[10:20]", "incompatible with 6 examples")):
    line = error_line(capsys, base + ["--data", root, "--split", "refcoco|unc|val", "--split", f"refcoco|unc|{bad}"])
    assert f"split '{bad}'" in line and expect in line, line
  assert not os.path.exists(tmp_path / "o")
  # A prepared split whose files are cut short: one line, before the checkpoint loads.
  shutil.copytree(root, tmp_path / "cut")
  (shard,) = (tmp_path / "cut" / "refcoco" / "1.0.0").glob("refcoco-val.array_record-*")
  os.truncate(shard, 3000)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(run_eval.checkpoints, "load_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    line = error_line(capsys, base + ["--data", str(tmp_path / "cut"), "--split", "refcoco|unc|val"])
  assert "split 'val': cannot read example 0" in line and "prepare it again" in line, line
  # --out-dir that cannot be made: refused before any split is evaluated (it was made after the first one).
  afile = tmp_path / "afile"
  afile.write_text("x")
  for out_dir, expect in ((str(afile / "x"), f"{afile} is a file"), ("", "--out-dir is empty")):
    line = error_line(capsys, ["eval", "--checkpoint", ckpt, "--data", root, "--split", "refcoco|unc|val",
                               "--out-dir", out_dir, "--no-progress"])
    assert expect in line, line
