"""End to end: a PyTorch EVF-SAM (segment-anything + torchscale + EVF's glue) with random weights, saved
as a Hugging Face-style directory, converted with `run.py convert`, run through `Predictor`.

Logits are compared at the original image size on a non-square image, for prompts of different
lengths, in one batched call and one by one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from evf_jax import cli
from evf_jax.evf import EvfConfig
from evf_jax.predictor import Predictor
from evf_jax.tokenizer import TextTokenizer
from evf_testing import evf_reference as ref
from evf_testing.images import smooth_image
from evf_testing.spm_model import train as train_spm

PROMPTS = ["zebra top left", "[semantic] sky", "the second man from the right holding a red umbrella", "cat"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  return train_spm(str(tmp_path_factory.mktemp("spm")), "bpe")


def _convert(tmp_path, config, spm_dir, seed=0):
  model = ref.build_torch_evf(config, seed)
  src = ref.write_hf_directory(model, config, os.path.join(spm_dir, "sentencepiece.bpe.model"),
                               str(tmp_path / "hf"))
  out = str(tmp_path / "converted")
  assert cli.main(["convert", "--src", src, "--out", out]) == 0
  return model, out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spm_dir):
  config = EvfConfig.preset("tiny")
  model, out = _convert(tmp_path_factory.mktemp("tiny"), config, spm_dir)
  return config, model, out


def _reference_one_by_one(model, config, image, tokenizer):
  logits, scores, emb = [], [], None
  for p in PROMPTS:
    ids = np.asarray([tokenizer.encode(p)])
    lg, sc, emb = ref.reference_predict(model, config, image, ids, image_embeddings=emb)
    logits.append(lg[0])
    scores.append(sc[0])
  return np.stack(logits), np.stack(scores)


@pytest.mark.parametrize("hw", [(60, 90), (91, 47), (40, 150)])  # the last: sides in two size buckets (128, 256)
def test_tiny_end_to_end_parity(tiny, spm_dir, hw):
  config, model, out = tiny
  image = smooth_image(*hw)
  tokenizer = TextTokenizer(spm_dir)
  want, want_scores = _reference_one_by_one(model, config, image, tokenizer)
  p = Predictor.from_checkpoint(out)
  p.set_image(image)
  batched = p.predict(PROMPTS)
  assert batched.logits.shape == (len(PROMPTS), *hw) and batched.logits.dtype == np.float32
  assert batched.masks.dtype == bool
  scale = float(np.abs(want).max())
  # float32 end to end through ~20 layers with random weights; relative to the logit scale.
  np.testing.assert_allclose(batched.logits, want, atol=2e-5 * max(1.0, scale), rtol=0)
  np.testing.assert_allclose(batched.scores, want_scores, atol=1e-4)
  np.testing.assert_array_equal(batched.masks, batched.logits > 0)
  for i, prompt in enumerate(PROMPTS):
    single = p.predict([prompt])
    np.testing.assert_allclose(single.logits[0], batched.logits[i], atol=2e-5 * max(1.0, scale), rtol=0)


def test_no_recompile_within_a_bucket(tiny):
  """Calls that land in one shape bucket reuse the compiled programs: other image sizes that pad to the
  same multiple of 64, other prompt counts with the same power of two, other texts of the same length
  bucket. A new bucket compiles exactly once more."""
  _, _, out = tiny
  p = Predictor.from_checkpoint(out)
  programs = {"embed": p._embed, "decode": p._decode, "upsample": p._upsample}

  def sizes():
    return {name: fn._cache_size() for name, fn in programs.items()}

  p.set_image(smooth_image(100, 120, seed=3))
  p.predict(["zebra", "sky on the left", "cat"])  # 3 prompts -> bucket of 4
  first = sizes()
  assert all(v >= 1 for v in first.values()), first
  for hw, prompts in [((70, 100), ["a", "b", "c", "d"]), ((128, 128), ["the tall man", "x", "dog"])]:
    p.set_image(smooth_image(*hw, seed=4))
    p.predict(prompts)
  assert sizes() == first, (first, sizes())
  p.predict(["one prompt"])  # a new prompt bucket: decode and upsample compile once more, embed does not
  after = sizes()
  assert after == {"embed": first["embed"], "decode": first["decode"] + 1, "upsample": first["upsample"] + 1}
  p.predict(["another one"])
  assert sizes() == after


def test_prompt_counts_between_buckets_and_prompts_as_long_as_the_text_positions(tiny):
  """3 prompts run as a bucket of 4: three masks and three scores come back, each what the prompt alone gives. A
  prompt padded to all of BEiT-3's text positions is accepted, and the padding does not change its answer."""
  config, _, out = tiny
  p = Predictor.from_checkpoint(out)
  p.set_image(smooth_image(50, 70, seed=5))
  three = p.predict(PROMPTS[:3])
  assert three.logits.shape == three.masks.shape == (3, 50, 70) and three.scores.shape == (3,)
  atol = 2e-5 * max(1.0, float(np.abs(three.logits).max()))
  for i, prompt in enumerate(PROMPTS[:3]):
    one = p.predict([prompt])
    np.testing.assert_allclose(three.logits[i], one.logits[0], atol=atol, rtol=0)
    np.testing.assert_allclose(three.scores[i], one.scores[0], atol=1e-5)
  ids, mask = p.tokenizer.encode_batch(["cat"], buckets=None, max_text_len=config.beit3.max_text_len)
  assert ids.shape == (1, config.beit3.max_text_len)
  np.testing.assert_allclose(p.predict_tokens(ids, mask).logits, p.predict(["cat"]).logits, atol=atol, rtol=0)


def test_a_bf16_predictor_stores_kernels_and_computes_in_bf16(tiny):
  """precision="bf16": Dense/Conv kernels held in bf16 and the image embedding computed in it; the logits come
  back as float32 (the slow test_bf16_kernels_cast_once_bit_identical checks them bit for bit)."""
  import jax
  import jax.numpy as jnp
  p = Predictor.from_checkpoint(tiny[2], precision="bf16")
  kernels = [x.dtype for path, x in jax.tree_util.tree_leaves_with_path(p.params) if path[-1].key == "kernel"]
  assert kernels and all(d == jnp.bfloat16 for d in kernels)
  p.set_image(smooth_image(40, 60, seed=6))
  assert p.image_embedding.dtype == jnp.bfloat16
  assert p.predict(["cat"]).logits.dtype == np.float32


def test_reference_batch_equals_one_by_one(tiny, spm_dir):
  """The padded-batch reference itself matches per-prompt runs (so our batched call is a fair check)."""
  config, model, _ = tiny
  image = smooth_image(50, 70, 1)
  tokenizer = TextTokenizer(spm_dir)
  ids, _ = tokenizer.encode_batch(PROMPTS, buckets=None, max_text_len=32)
  batched, _, _ = ref.reference_predict(model, config, image, ids)
  single, _ = _reference_one_by_one(model, config, image, tokenizer)
  np.testing.assert_allclose(batched, single, atol=1e-4 * max(1.0, float(np.abs(single).max())))


def _check_size(tmp_path, spm_dir, preset, hw, prompts, atol_rel):
  config = EvfConfig.preset(preset)
  model, out = _convert(tmp_path, config, spm_dir, seed=1)
  image = smooth_image(*hw, seed=2)
  tokenizer = TextTokenizer(spm_dir)
  logits, scores, emb = [], [], None
  for p in prompts:
    lg, sc, emb = ref.reference_predict(model, config, image, np.asarray([tokenizer.encode(p)]),
                                        image_embeddings=emb)
    logits.append(lg[0])
    scores.append(sc[0])
  del model
  want = np.stack(logits)
  pred = Predictor.from_checkpoint(out)
  pred.set_image(image)
  got = pred.predict(prompts)
  err = float(np.abs(got.logits - want).max())
  scale = float(np.abs(want).max())
  assert err <= atol_rel * max(1.0, scale), (err, scale)
  np.testing.assert_allclose(got.scores, np.stack(scores), atol=1e-4)
  assert ((got.logits > 0) != (want > 0)).mean() < 1e-4
  return err, scale


@pytest.mark.slow
def test_base_end_to_end_parity(tmp_path, spm_dir):
  """SAM ViT-B + BEiT-3-base, 1024 input, a 480x640 image, three prompts in one call."""
  _check_size(tmp_path, spm_dir, "base", (480, 640), PROMPTS[:3], atol_rel=1e-4)


@pytest.mark.slow
def test_full_size_end_to_end_parity(tmp_path, spm_dir):
  """The released architecture (SAM ViT-H + BEiT-3-large), random weights, 5 GB of float32."""
  _check_size(tmp_path, spm_dir, "evf-sam", (427, 640), PROMPTS[:2], atol_rel=2e-4)


@pytest.mark.slow
def test_bf16_kernels_cast_once_bit_identical(tiny, monkeypatch):
  """A bf16 Predictor stores Dense/Conv kernels in bf16 once (half the weight memory, no per-call casts),
  with bit-identical logits to keeping every weight in float32 and casting on use. Casting any other
  leaf (biases, LayerNorms, the Fourier matrix) would change them."""
  import jax
  import jax.numpy as jnp
  from evf_jax import predictor as pred_mod
  _, _, out = tiny
  image = smooth_image(90, 130, seed=5)
  p = Predictor.from_checkpoint(out, precision="bf16")
  kernels = [x.dtype for path, x in jax.tree_util.tree_leaves_with_path(p.params) if path[-1].key == "kernel"]
  assert kernels and all(d == jnp.bfloat16 for d in kernels)
  assert any(x.dtype == jnp.float32 for x in jax.tree.leaves(p.params))
  p.set_image(image)
  cast_once = p.predict(PROMPTS[:3]).logits
  monkeypatch.setattr(pred_mod, "cast_kernels", lambda params, dtype: params)
  q = Predictor.from_checkpoint(out, precision="bf16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(q.params))
  q.set_image(image)
  np.testing.assert_array_equal(cast_once, q.predict(PROMPTS[:3]).logits)
