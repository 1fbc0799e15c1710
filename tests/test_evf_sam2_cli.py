"""EVF-SAM2 as a user runs it: a random-weight toy EVF-SAM2 (PyPI sam2 + torchscale + EVF's glue) saved in the
released Hugging Face layout (config.json says model_type "evf", as for EVF-SAM), converted with `run.py convert`
(which must tell the family from the weights' keys), then `Predictor`, `run.py predict` and `run.py eval` on it,
against the original's image inference and eval protocol (`evf_testing.sam2_reference.reference_evf_sam2`) from
the uint8 image on.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from evf_jax import cli
from evf_jax.checkpoints import load_checkpoint
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.predictor import Predictor
from evf_jax.tokenizer import TextTokenizer
from evf_testing import evf_reference as ref
from evf_testing.images import smooth_image
from evf_testing.sam2_reference import build_torch_evf_sam2, reference_evf_sam2, sam2_eval_input, sam2_input
from evf_testing.spm_model import train as train_spm

TOY = EvfSam2Config.preset("toy")
PROMPTS = ["zebra top left", "[semantic] sky", "the second man from the right holding a red umbrella"]
pytestmark = pytest.mark.usefixtures("fast_compile")  # toy sizes: compiling is the cost


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  return train_spm(str(tmp_path_factory.mktemp("spm")), "bpe")


@pytest.fixture(scope="module")
def torch_model():
  return build_torch_evf_sam2(TOY, seed=4)


@pytest.fixture(scope="module")
def converted(torch_model, spm_dir, tmp_path_factory):
  """(the toy EVF-SAM2 in the released layout, what `run.py convert` made of it)."""
  d = tmp_path_factory.mktemp("evf2")
  hf = ref.write_hf_directory(torch_model, TOY, os.path.join(spm_dir, "sentencepiece.bpe.model"), str(d / "hf"))
  assert cli.main(["convert", "--src", hf, "--out", str(d / "evf_sam2_toy")]) == 0
  return hf, str(d / "evf_sam2_toy")


@pytest.fixture(scope="module")
def ckpt(converted):
  return converted[1]


@pytest.fixture(scope="module")
def predictor(ckpt):
  return Predictor.from_checkpoint(ckpt)  # one per module: loading and compiling take ~15 s here


def test_convert_tells_the_family_by_the_keys(converted):
  hf_dir, ckpt = converted
  assert json.load(open(os.path.join(hf_dir, "config.json")))["model_type"] == "evf"  # as released
  stored = json.load(open(os.path.join(ckpt, "model_config.json")))
  assert stored["model_type"] == "evf_sam2" and stored["sam2"]["name"] == "toy"
  assert json.load(open(os.path.join(ckpt, "provenance.json")))["family"] == "EVF-SAM2"
  config, params, _ = load_checkpoint(ckpt)
  assert config == TOY
  assert set(params) == {"sam", "beit3", "projector"} and "no_mem_embed" in params["sam"]


def test_predictor_equals_the_original_inference(predictor, torch_model, spm_dir):
  """Three prompts in one batched call (padded to 4 prompts and 16 tokens, BEiT-3 masking the padding) against
  the original's inference() per prompt (unpadded, no padding mask), on two non-square images: logits at the
  original size, predicted IoU of the chosen mask, masks."""
  p = predictor
  tokenizer = TextTokenizer(spm_dir)
  s = TOY.sam2
  for hw in [(70, 100), (97, 61)]:
    image = smooth_image(*hw, seed=hw[0])
    want, want_iou = [], []
    for prompt in PROMPTS:
      full, _, iou = reference_evf_sam2(
          torch_model, sam2_input(image, s.image_size, s.pixel_mean, s.pixel_std),
          ref.beit_input(image, TOY.beit3.img_size), np.asarray([tokenizer.encode(prompt)]), hw)
      want.append(full[0])
      want_iou.append(iou[0].max())
    want = np.stack(want)
    p.set_image(image)
    embed, high_res = p.image_embedding
    assert embed.shape == (1, s.embedding_size, s.embedding_size, s.d_model) and len(high_res) == 2
    got = p.predict(PROMPTS)
    assert got.logits.shape == (len(PROMPTS), *hw) and got.logits.dtype == np.float32
    err = float(np.abs(got.logits - want).max())
    scale = float(np.abs(want).max())
    print(f"[parity] Predictor vs reference at {hw}: max abs {err:.3g} (logit scale {scale:.3g})")
    # The model alone is within 2e-5 of the reference (tests/test_evf_sam2.py); the bucketed, masked text
    # padding and the padded postprocess matrices add float32 rounding only.
    assert err <= 2e-5 * max(1.0, scale), (err, scale)
    np.testing.assert_allclose(got.scores, np.asarray(want_iou), atol=1e-5)
    np.testing.assert_array_equal(got.masks, got.logits > 0)
    assert 0 < got.masks.mean() < 1  # random weights, but not a constant mask


def test_bf16_predictor_follows_fp32(ckpt, predictor):
  """The image path in bfloat16 (parameters cast once, float32 postprocess) against float32: the same masks up to
  pixels near the decision boundary. Measured on this toy: masks agree on 99.4-99.8% of pixels, IoU scores
  within 0.003."""
  bf16 = Predictor.from_checkpoint(ckpt, precision="bf16")
  for hw in [(70, 100), (97, 61)]:
    image = smooth_image(*hw, seed=hw[0])
    predictor.set_image(image)
    bf16.set_image(image)
    want, got = predictor.predict(PROMPTS), bf16.predict(PROMPTS)
    agree = float(np.mean(got.masks == want.masks))
    print(f"[bf16] EVF-SAM2 image {hw}: mask agreement {agree:.4f}, IoU scores within "
          f"{np.abs(got.scores - want.scores).max():.3g}")
    assert got.logits.dtype == np.float32 and agree >= 0.98
    assert not np.array_equal(got.logits, want.logits)  # bf16 did run
    np.testing.assert_allclose(got.scores, want.scores, atol=0.02)


def test_predict_cli_writes_masks_and_logits(ckpt, predictor, tmp_path, capsys):
  image = smooth_image(66, 90, seed=7)
  path = str(tmp_path / "scene.png")
  Image.fromarray(image).save(path)
  out = tmp_path / "pred"
  argv = ["predict", "--checkpoint", ckpt, "--image", path, "--out-dir", str(out), "--save-logits"]
  for prompt in PROMPTS:
    argv += ["--prompt", prompt]
  assert cli.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == len(PROMPTS) and all("mask area" in line and "score" in line for line in lines)
  predictor.set_image(image)
  want = predictor.predict(PROMPTS)
  for i in range(len(PROMPTS)):
    mask = np.asarray(Image.open(out / f"scene_{i}_mask.png"))
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, want.masks[i])
    np.testing.assert_allclose(np.load(out / f"scene_{i}_logits.npy"), want.logits[i], atol=1e-6)
    assert (out / f"scene_{i}_vis.png").is_file()


def test_convert_reads_sam_scale_as_the_weights_family(converted, tmp_path, capsys):
  """`sam_scale: "huge"` is an EVF-SAM (SAM-1) name; with SAM-2 weights it is an error naming the family."""
  src = str(tmp_path / "src")
  shutil.copytree(converted[0], src)
  cfg = json.load(open(os.path.join(src, "config.json")))
  json.dump(dict(cfg, sam_scale="huge"), open(os.path.join(src, "config.json"), "w"))
  assert cli.main(["convert", "--src", src, "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "sam_scale 'huge' is not one of EVF-SAM2's" in err[0], err
  assert not os.path.exists(tmp_path / "out")


def test_eval_equals_the_original_protocol(ckpt, torch_model, spm_dir, tmp_path, capsys):
  """`run.py eval` on a prepared synthetic split against the reference per sentence as EVF-SAM2's eval.py frames
  the image (PIL bilinear to a square, no padding) and runs `forward()` (BEiT-3 masking the padded tokens), logits
  > 0 at the original size, gIoU / cIoU in numpy.
  As in tests/test_evaluate.py, a logit within float32 rounding of 0 may flip a pixel: a few pixels of slack."""
  from data_pipelines import prepare, sources
  from evf_jax.images import decode_image
  root = tmp_path / "data"
  prepare.build("synthetic", str(root), num_train=1, num_eval=1, seed=0, progress=False)
  out = tmp_path / "res"
  assert cli.main(["eval", "--checkpoint", ckpt, "--data", str(root), "--split", "synthetic|val",
                   "--out-dir", str(out), "--batch-size", "1", "--no-progress"]) == 0, capsys.readouterr().err
  got = json.load(open(out / "synthetic_val.json"))
  tokenizer = TextTokenizer(spm_dir)
  s = TOY.sam2
  inter, union = [], []
  for rec in sources.read_records(str(root / "synthetic"), "val"):
    image = decode_image(rec.image)
    ids, mask = tokenizer.encode_batch([e.text for e in rec.entries])
    full, _, _ = reference_evf_sam2(torch_model, sam2_eval_input(image, s.image_size, s.pixel_mean, s.pixel_std),
                                    ref.beit_input(image, TOY.beit3.img_size), ids, image.shape[:2], mask)
    for logits, e in zip(full, rec.entries):
      pred, gt = logits > 0, rec.mask(e.mask_index) > 0
      inter.append(int((pred & gt).sum()))
      union.append(int((pred | gt).sum()))
  inter, union = np.asarray(inter), np.asarray(union)
  giou = np.mean(np.where(union == 0, 1.0, inter / np.maximum(union, 1)))
  print(f"[eval] ours: gIoU {got['giou']:.6f} cIoU {got['ciou']:.6f} I {got['total_intersection']} "
        f"U {got['total_union']}; reference: gIoU {giou:.6f} I {inter.sum()} U {union.sum()}")
  assert (got["images"], got["sentences"]) == (1, len(inter))
  assert abs(got["total_intersection"] - inter.sum()) <= 3 and abs(got["total_union"] - union.sum()) <= 3
  assert got["giou"] == pytest.approx(giou, abs=1e-4)
  assert got["ciou"] == pytest.approx(inter.sum() / union.sum(), abs=1e-4)
  assert 0 < inter.sum() < union.sum()  # neither all-empty nor perfect
