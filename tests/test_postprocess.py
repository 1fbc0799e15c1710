"""The matrix form of SAM's postprocess against torch's F.interpolate chain (what Sam.postprocess_masks does)."""

import numpy as np
import pytest

from evf_jax import postprocess


def _torch_chain(low, input_hw, original_hw):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = torch.from_numpy(low)[None]
  x = F.interpolate(x, (1024, 1024), mode="bilinear", align_corners=False)
  x = x[..., : input_hw[0], : input_hw[1]]
  x = F.interpolate(x, original_hw, mode="bilinear", align_corners=False)
  return x[0].numpy()


@pytest.mark.parametrize("original_hw", [(480, 640), (640, 427), (1500, 333), (64, 64)])
def test_matrices_match_torch_postprocess(original_hw):
  h, w = original_hw
  scale = 1024 / max(h, w)
  input_hw = (int(h * scale + 0.5), int(w * scale + 0.5))
  low = np.random.default_rng(0).normal(size=(3, 256, 256)).astype(np.float32) * 8
  want = _torch_chain(low, input_hw, original_hw)
  a_y, a_x = postprocess.mask_postprocess_matrices(input_hw, original_hw)
  got = np.asarray(postprocess.apply_matrices(low, a_y, a_x))
  assert got.shape == want.shape
  # float32 chain in torch vs one fused product here: differences are rounding only.
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert ((got > 0) != (want > 0)).mean() < 1e-5


def test_bilinear_matrix_rows_sum_to_one_and_padding_is_zero():
  m = postprocess.bilinear_matrix(256, 1024)
  np.testing.assert_allclose(m.sum(1), 1.0)
  a_y, a_x = postprocess.mask_postprocess_matrices((768, 1024), (480, 640), pad_to=(512, 640))
  assert a_y.shape == (512, 256) and a_x.shape == (640, 256)
  assert not a_y[480:].any()


def test_matrices_are_cached_and_read_only():
  """One computation per image size, shared by every caller (Predictor, evaluation), so nobody may write."""
  first = postprocess.mask_postprocess_matrices((700, 1024), (350, 512), pad_to=(384, 512))
  again = postprocess.mask_postprocess_matrices((700, 1024), (350, 512), pad_to=(384, 512))
  assert first[0] is again[0] and first[1] is again[1]
  with pytest.raises(ValueError):
    first[0][0, 0] = 1.0
