"""BEiT-3 parity with torchscale 0.3.0 through the real converter.

Seeded random torch weights (every tensor re-drawn, LayerNorms included) -> state_dict -> safetensors ->
`convert.io.load_state_dict` -> `convert_beit3` -> our Flax model, compared on `encoder_out` in float32
for image-only, text-only and image+text inputs with a right-padded batch of prompts.

Padded positions: torchscale computes every padded text position as an ordinary query (the token is
zeroed after the embedding sum and masked only as a *key*), so its output there is well defined and
ours matches it too; we compare the whole sequence. The one place the reference output is meaningless
is a text-only row that is padding from end to end (e.g. a batch filled up with empty rows): every key is
masked with -inf and torch's softmax returns NaN for the whole row, while `jax.nn.dot_product_attention`
uses a large finite negative and returns finite numbers. `test_all_padding_row_text_only` pins this.
With an image in the sequence no row is fully masked (vision tokens are never padding).
"""

from __future__ import annotations


import numpy as np
import pytest

from evf_jax.beit3 import Beit3Config
from evf_testing.beit3_reference import PAD, Converted, make_inputs, run_torch

pytestmark = pytest.mark.usefixtures("fast_compile_unless_slow")  # tiny models: compiling is most of the time


def check_all_modes(conv: Converted, atol: float, batch: int = 3):
  images, ids = make_inputs(conv.cfg, batch)
  errors = {}
  for mode, kw in {"image": dict(images=images), "text": dict(ids=ids),
                   "image+text": dict(images=images, ids=ids)}.items():
    ref = run_torch(conv.torch_model, **kw)
    out = conv.ours(**kw)
    assert out.shape == ref.shape, mode
    assert np.isfinite(ref).all(), mode
    errors[mode] = float(np.abs(out - ref).max())
    np.testing.assert_allclose(out, ref, rtol=0, atol=atol, err_msg=mode)
  print(f"\nmax abs error {conv.cfg.embed_dim}x{conv.cfg.num_layers}: {errors}")
  return errors


@pytest.fixture(scope="module")
def tiny():
  return Converted(Beit3Config.tiny(), seed=1)


def test_tiny_parity(tiny):
  check_all_modes(tiny, atol=1e-5)


@pytest.mark.slow
def test_base_parity():
  # 12 layers in f32 at "highest" matmul precision: the measured max error is ~5e-6;
  # 1e-4 leaves room for BLAS differences.
  conv = Converted(Beit3Config.base(), seed=0)
  check_all_modes(conv, atol=1e-4, batch=2)


@pytest.mark.slow
def test_large_parity():
  conv = Converted(Beit3Config.large(), seed=0)
  check_all_modes(conv, atol=1e-4, batch=2)


def test_padded_batch_matches_single_prompts(tiny):
  """Each prompt of a right-padded batch gives the same (unpadded) output as when run alone."""
  images, ids = make_inputs(tiny.cfg)
  batched = tiny.ours(images, ids)
  nv = tiny.cfg.vision_len
  for i in range(ids.shape[0]):
    n = int((ids[i] != PAD).sum())
    alone = tiny.ours(images[i:i + 1], ids[i:i + 1, :n])
    np.testing.assert_allclose(batched[i:i + 1, :nv + n], alone, rtol=0, atol=2e-6)


def test_an_image_shared_by_several_texts(tiny):
  """Images fewer than texts: each image goes with r consecutive texts and its patches are embedded once. The
  reference gets every image repeated r times. An image count that does not divide the texts' is refused."""
  images, ids = make_inputs(tiny.cfg, 4)
  shared = images[[0, 2]]
  ref = run_torch(tiny.torch_model, images=np.repeat(shared, 2, axis=0), ids=ids)
  np.testing.assert_allclose(tiny.ours(shared, ids), ref, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="image batch 3 does not divide text batch 4"):
    tiny.ours(images[:3], ids)


def test_all_padding_row_text_only(tiny):
  """The one meaningless reference output: a text-only row made only of padding is NaN in torch."""
  _, ids = make_inputs(tiny.cfg)
  ids[1] = PAD
  ref = run_torch(tiny.torch_model, ids=ids)
  out = tiny.ours(ids=ids)
  assert np.isnan(ref[1]).all() and np.isfinite(ref[[0, 2]]).all()
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[[0, 2]], ref[[0, 2]], rtol=0, atol=1e-5)
