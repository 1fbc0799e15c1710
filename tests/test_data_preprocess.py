"""BEiT-3 bicubic vs PyTorch, SAM frame geometry and normalisation."""

import numpy as np
import pytest

from data_pipelines import transforms
from evf_jax.beit3 import preprocess
from evf_jax.sam import transforms as sam_transforms


def _torch_beit(img: np.ndarray) -> np.ndarray:
  torch = pytest.importorskip("torch")
  t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
  out = torch.nn.functional.interpolate(t, size=(224, 224), mode="bicubic", align_corners=False)
  return ((out - 0.5) / 0.5)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("hw", [(480, 640), (1000, 333), (100, 37), (5, 300), (224, 224), (50, 60)])
def test_beit_image_matches_torch_bicubic(hw):
  img = np.random.default_rng(hw[0] * 7 + hw[1]).integers(0, 256, hw + (3,), dtype=np.uint8)
  ref = _torch_beit(img)
  out = preprocess.beit_image(img)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_beit_image_jnp_matches_numpy():
  img = np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(preprocess.beit_image_jnp(img)), preprocess.beit_image(img), atol=1e-5)


def test_bicubic_matrix_rows_sum_to_one_and_identity():
  m = preprocess.bicubic_matrix(37, 224)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  np.testing.assert_allclose(preprocess.bicubic_matrix(16, 16), np.eye(16), atol=1e-7)


def test_sam_frame_geometry_and_normalisation():
  assert sam_transforms.frame_hw(480, 640, 1024, "longest_side") == (768, 1024)
  assert sam_transforms.frame_hw(333, 500, 1024, "longest_side") == (682, 1024)  # int(333*2.048+0.5)
  assert sam_transforms.frame_hw(333, 500, 1024, "square") == (1024, 1024)
  img = np.full((30, 40, 3), 200, np.uint8)
  framed, hw = sam_transforms.to_frame(img, 64, "longest_side")
  assert hw == (48, 64) and framed.shape == (64, 64, 3)
  assert (framed[:48] == 200).all() and (framed[48:] == 0).all()
  norm = np.asarray(sam_transforms.normalize_and_pad(framed[None], np.array([hw]), 64))[0]
  np.testing.assert_allclose(norm, sam_transforms.normalize_and_pad_np(framed[:48], 64), atol=1e-6)
  np.testing.assert_allclose(norm[0, 0], (200 - np.array(sam_transforms.PIXEL_MEAN)) / np.array(sam_transforms.PIXEL_STD),
                             rtol=1e-6)
  assert (norm[48:] == 0).all()  # padding is 0 *after* normalisation


def test_mask_to_frame_keeps_geometry():
  m = np.zeros((40, 80), np.uint8)
  m[:, :40] = 1  # left half
  f = transforms.mask_to_frame(m, 64, "longest_side")
  assert f.shape == (64, 64) and f[:32, :32].all() and not f[:32, 32:].any() and not f[32:].any()


def test_encode_text_pads_and_truncates_keeping_eos():
  class Tok:
    def encode(self, text):
      return [0] + [5] * len(text) + [2]
  ids = transforms.encode_text(Tok(), "abc", 8)
  assert ids.tolist() == [0, 5, 5, 5, 2, 1, 1, 1]
  ids = transforms.encode_text(Tok(), "a" * 20, 6)
  assert ids.tolist() == [0, 5, 5, 5, 5, 2]


@pytest.mark.parametrize("mode,rows", [("longest_side", 12), ("square", 16)])
def test_train_example_at_a_mask_size_below_the_sam_size(mode, rows):
  """A 30 x 40 image, mask = its left half, at mask_size 16 (SAM frame 64): longest_side scales by 16/40 to
  12 x 16 (region rows 0-11, all 16 columns; the mask its 8 left columns); square stretches to 16 x 16."""
  from data_pipelines import records
  from evf_testing import data_fixtures as F
  half = np.zeros((30, 40), np.uint8)
  half[:, :20] = 1
  rec = records.Record(source="t", image_id="a", image=F.encode_png(np.full((30, 40, 3), 99, np.uint8)), h=30, w=40,
                       masks=[records.encode_mask(half)], entries=[records.Entry("x", 0, {})])
  tok = type("Tok", (), {"encode": lambda self, text: [0, 7, 2]})()
  cfg = transforms.SampleConfig(num_prompts=2, max_text_len=4, sam_size=64, sam_mode=mode, mask_size=16,
                                beit_size=16)
  ex = transforms.train_example(rec, [0], tok, cfg)
  want_region = np.zeros((16, 16), bool)
  want_region[:rows] = True
  np.testing.assert_array_equal(ex["valid_region"], want_region)
  want_mask = np.zeros((16, 16), np.uint8)
  want_mask[:rows, :8] = 1
  np.testing.assert_array_equal(ex["masks"][0], want_mask)
  assert not ex["masks"][1].any() and ex["prompt_valid"].tolist() == [True, False]
  assert ex["resize_hw"].tolist() == ([48, 64] if mode == "longest_side" else [64, 64])


def test_record_whose_size_is_not_its_images_is_refused():
  """Masks are decoded at the record's h x w: a record that misstates its image's size (30 x 40 stored as
  40 x 30) would put every mask on the wrong geometry, so the sample is refused rather than made."""
  from data_pipelines import records
  from evf_testing import data_fixtures as F
  rec = records.Record(source="t", image_id="a", image=F.encode_png(np.zeros((30, 40, 3), np.uint8)), h=40, w=30,
                       masks=[records.encode_mask(np.ones((40, 30)))], entries=[records.Entry("x", 0, {})])
  with pytest.raises(ValueError, match="image is 30x40, record says 40x30"):
    transforms.image_inputs(rec, transforms.SampleConfig(sam_size=64, beit_size=16))
