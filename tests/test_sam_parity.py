"""Numerical parity of the Flax SAM with PyPI segment-anything 1.0 (PyTorch), through the real converter.

Every test builds the torch reference with seeded random weights (LayerNorms included), saves its state
dict as .safetensors, loads it with `convert.io.load_state_dict` and converts it with `convert_sam`.
Float32 throughout, with `jax_default_matmul_precision="highest"` (tests/conftest.py).

Tolerances: absolute, on outputs of magnitude ~1-10. Summation order differs between XLA and torch, so
float32 rounding (~1e-7 relative per op) accumulates with depth: ~1e-6 at tiny size, ~1e-5 at ViT-B.
"""

from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.io import load_state_dict
from convert.rules import convert
from convert.sam import convert_sam, sam_rules
from evf_jax.sam import SAM_CONFIGS, Sam
from evf_jax.sam import image_encoder as ie
from evf_jax.sam import rel_pos_attention
from evf_jax.sam.transforms import postprocess_masks, preprocess
from evf_testing import cudnn_stand_in
from evf_testing import torch_reference as tr
from evf_testing.sam_reference import build_torch_sam, nchw_to_nhwc, to_np

pytestmark = pytest.mark.usefixtures("fast_compile_unless_slow")  # tiny models: compiling is most of the time


TINY = SAM_CONFIGS["tiny"]


def _max_abs(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max()) if a.size else 0.0


def _close(ours, ref, atol, what=""):
  err = _max_abs(ours, ref)
  print(f"[parity] {what}: max abs {err:.3g} (atol {atol:g})")  # shown with `pytest -s`
  assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"
  return err


@functools.partial(jax.jit, static_argnames=("cfg", "method", "multimask_output"))
def _run(params, *args, cfg, method, multimask_output=None):
  """Jitted `Sam(cfg).apply` (eager op-by-op dispatch is slower than compiling, even at tiny size)."""
  kw = {} if multimask_output is None else {"multimask_output": multimask_output}
  return Sam(cfg).apply({"params": params}, *args, method=method, **kw)


def _converted(torch_sam, cfg, directory):
  path = tr.save_safetensors(tr.state_dict_numpy(torch_sam), str(directory / "model.safetensors"))
  return convert_sam(load_state_dict(path), cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch_sam = build_torch_sam(TINY, seed=1)
  return torch_sam, _converted(torch_sam, TINY, tmp_path_factory.mktemp("tiny"))


def _t(a):
  import torch
  return None if a is None else torch.from_numpy(np.asarray(a))


def _prompts(cfg, b, seed):
  rng = np.random.default_rng(seed)
  s, lr = cfg.img_size, cfg.low_res_size
  coords = rng.uniform(0, s, size=(b, 3, 2)).astype(np.float32)
  labels = rng.choice([-1, 0, 1], size=(b, 3)).astype(np.int64)
  labels[:, 0] = 1
  xy0 = rng.uniform(0, s / 2, size=(b, 2))
  boxes = np.concatenate([xy0, xy0 + rng.uniform(1, s / 2, size=(b, 2))], 1).astype(np.float32)
  masks = (3 * rng.normal(size=(b, 1, lr, lr))).astype(np.float32)
  return (coords, labels), boxes, masks


COMBOS = {"points": ("points",), "boxes": ("boxes",), "masks": ("masks",), "points+boxes": ("points", "boxes"),
          "points+masks": ("points", "masks"), "boxes+masks": ("boxes", "masks"),
          "all": ("points", "boxes", "masks"), "none": ()}


def _select(combo, points, boxes, masks):
  return (points if "points" in combo else None, boxes if "boxes" in combo else None,
          masks if "masks" in combo else None)


def _torch_prompts(torch_sam, points, boxes, masks):
  import torch
  with torch.no_grad():
    return torch_sam.prompt_encoder(points=None if points is None else (_t(points[0]), _t(points[1])),
                                    boxes=_t(boxes), masks=_t(masks))


# ---------------------------------------------------------------------------------------------- tiny

def test_tiny_image_encoder(tiny):
  import torch
  torch_sam, params = tiny
  x = np.random.default_rng(0).normal(size=(2, 3, TINY.img_size, TINY.img_size)).astype(np.float32)
  with torch.no_grad():
    ref = to_np(torch_sam.image_encoder(_t(x)))
  out = _run(params, jnp.asarray(nchw_to_nhwc(x)), cfg=TINY, method=Sam.embed_image)
  _close(out, nchw_to_nhwc(ref), 2e-5, "tiny image embedding")


@pytest.mark.parametrize("combo", list(COMBOS))
def test_tiny_prompt_encoder(tiny, combo):
  torch_sam, params = tiny
  p, b, m = _select(COMBOS[combo], *_prompts(TINY, 3, seed=2))
  sp_ref, de_ref = _torch_prompts(torch_sam, p, b, m)
  sp, de = _run(params, p, b, m, cfg=TINY, method=Sam.encode_prompts)
  _close(sp, to_np(sp_ref), 1e-5, f"sparse ({combo})")
  _close(de, nchw_to_nhwc(to_np(de_ref)), 1e-5, f"dense ({combo})")


def test_tiny_dense_pe(tiny):
  torch_sam, params = tiny
  pe = _run(params, cfg=TINY, method=Sam.get_dense_pe)
  _close(pe, nchw_to_nhwc(to_np(torch_sam.prompt_encoder.get_dense_pe())), 1e-5, "dense pe")


def _torch_decode(torch_sam, emb_nchw, sparse, dense, multimask):
  import torch
  with torch.no_grad():
    lr, iou = torch_sam.mask_decoder(image_embeddings=_t(emb_nchw), image_pe=torch_sam.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=multimask)
  return to_np(lr), to_np(iou)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("combo", ["points", "boxes+masks", "all", "none"])
def test_tiny_mask_decoder(tiny, combo, multimask):
  torch_sam, params = tiny
  rng = np.random.default_rng(3)
  e = TINY.embedding_size
  emb = rng.normal(size=(1, TINY.prompt_embed_dim, e, e)).astype(np.float32)
  p, b, m = _select(COMBOS[combo], *_prompts(TINY, 3, seed=4))
  lr_ref, iou_ref = _torch_decode(torch_sam, emb, *_torch_prompts(torch_sam, p, b, m), multimask)
  lr, iou = _run(params, jnp.asarray(nchw_to_nhwc(emb)), p, b, m,
                 multimask_output=multimask, cfg=TINY, method=Sam.decode)
  assert lr.shape == (1 if combo == "none" else 3, 3 if multimask else 1, TINY.low_res_size, TINY.low_res_size)
  _close(lr, lr_ref, 1e-5, "low-res logits")
  _close(iou, iou_ref, 1e-5, "iou")


def test_tiny_one_image_per_prompt(tiny):
  """A batch of B image embeddings with B prompts pairs them (the reference runs one image at a time)."""
  torch_sam, params = tiny
  e = TINY.embedding_size
  emb = np.random.default_rng(5).normal(size=(2, TINY.prompt_embed_dim, e, e)).astype(np.float32)
  p, b, _ = _prompts(TINY, 2, seed=6)
  lr, iou = _run(params, jnp.asarray(nchw_to_nhwc(emb)), p, b,
                 multimask_output=True, cfg=TINY, method=Sam.decode)
  for i in range(2):
    pi = (p[0][i:i + 1], p[1][i:i + 1])
    lr_ref, iou_ref = _torch_decode(torch_sam, emb[i:i + 1], *_torch_prompts(torch_sam, pi, b[i:i + 1], None), True)
    _close(lr[i:i + 1], lr_ref, 1e-5, f"logits of pair {i}")
    _close(iou[i:i + 1], iou_ref, 1e-5, f"iou of pair {i}")


@pytest.mark.parametrize("others", ["none", "points", "boxes+masks"])
def test_tiny_extra_sparse(tiny, others):
  """EVF-SAM's text prompt: appended after point/box embeddings; alone, it sets the batch size."""
  import torch
  torch_sam, params = tiny
  rng = np.random.default_rng(7)
  n = 3
  text = rng.normal(size=(n, 1, TINY.prompt_embed_dim)).astype(np.float32)
  p, b, m = _select(COMBOS[others], *_prompts(TINY, n, seed=8))
  sp_ref, de_ref = _torch_prompts(torch_sam, p, b, m)
  if others == "none":  # EVF's prompt encoder: the empty sparse set and no_mask_embed expand to the text batch
    sp_ref, de_ref = sp_ref.expand(n, -1, -1), de_ref.expand(n, -1, -1, -1)
  sp_ref = torch.cat([sp_ref, _t(text)], dim=1)
  sp, de = _run(params, p, b, m, text, cfg=TINY, method=Sam.encode_prompts)
  _close(sp, to_np(sp_ref), 1e-5, "sparse with extra")
  _close(de, nchw_to_nhwc(to_np(de_ref)), 1e-5, "dense with extra")
  e = TINY.embedding_size
  emb = rng.normal(size=(1, TINY.prompt_embed_dim, e, e)).astype(np.float32)
  lr_ref, iou_ref = _torch_decode(torch_sam, emb, sp_ref, de_ref, False)
  lr, iou = _run(params, jnp.asarray(nchw_to_nhwc(emb)), p, b, m, text,
                 multimask_output=False, cfg=TINY, method=Sam.decode)
  _close(lr, lr_ref, 1e-5, "logits with extra")
  _close(iou, iou_ref, 1e-5, "iou with extra")


# ------------------------------------------------------------------- windows and relative positions

def test_window_partition_non_square():
  m = tr.segment_anything_modeling()
  x = np.random.default_rng(0).normal(size=(2, 6, 10, 3)).astype(np.float32)
  ref, ref_hw = m.image_encoder.window_partition(_t(x), 4)
  ours, hw = ie.window_partition(jnp.asarray(x), 4)
  assert hw == ref_hw == (8, 12)
  np.testing.assert_array_equal(np.asarray(ours), to_np(ref))
  np.testing.assert_array_equal(np.asarray(ie.window_unpartition(ours, 4, hw, (6, 10))), x)


@pytest.mark.parametrize("q,k,length", [(14, 14, 27), (6, 6, 15), (10, 10, 15), (4, 8, 15), (8, 4, 7), (64, 64, 127)])
def test_get_rel_pos(q, k, length):
  m = tr.segment_anything_modeling()
  table = np.random.default_rng(q * k).normal(size=(length, 8)).astype(np.float32)
  ref = to_np(m.image_encoder.get_rel_pos(q, k, _t(table)))
  # Resized tables differ by float rounding of the interpolation weights (~1e-6 on values ~2).
  _close(ie.get_rel_pos(q, k, jnp.asarray(table)), ref, 5e-6, "rel pos")


@pytest.mark.parametrize("window,heads,impl", [(4, 2, "xla"), (0, 2, "xla"), (0, 4, "xla"), (3, 2, "cudnn"),
                                               (0, 4, "cudnn"), (0, 4, "cudnn-narrow")])
def test_block_non_square(window, heads, impl, monkeypatch):
  """A block on a 6x10 grid: windows pad both sides differently (catches an H/W swap); the global block's
  tables are sized for 8x8, so rel-pos is interpolated (down for H, up for W). With 2 heads (D=16 >= 6+10)
  rel-pos rides in the QK product; with 4 heads (D=8) the global block takes the chunked path.
  impl="cudnn" is the flash-attention path (`fold_rel_pos`: rel-pos folded into q and k, features padded
  to a multiple of 8, 16 + 3 + 3 -> 24 for the 3x3 windows); without a GPU its kernel runs through XLA.
  "cudnn-narrow" plays a GPU whose cuDNN takes fewer features than the folded 8 + 6 + 10 = 24 (as pre-Hopper
  GPUs refuse SAM-H's 208): the block must fall back to the materialised bias."""
  import torch
  label = impl
  if impl.startswith("cudnn"):
    calls = cudnn_stand_in.install(monkeypatch, max_head_dim=16 if impl == "cudnn-narrow" else 256,
                                   half_only=False)
    impl = "cudnn"
  m = tr.segment_anything_modeling()
  blk = m.image_encoder.Block(dim=32, num_heads=heads, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
                              use_rel_pos=True, window_size=window, input_size=(8, 8))
  tr.randomize_(blk, seed=11)
  ours = ie.Block(32, heads, 4.0, window, (8, 8), attention=impl)
  x = np.random.default_rng(12).normal(size=(2, 6, 10, 32)).astype(np.float32)
  target = {"image_encoder": {"blocks_0": nn.unbox(jax.eval_shape(ours.init, jax.random.key(0), x))["params"]}}
  sd = {f"image_encoder.blocks.0.{k}": v for k, v in tr.state_dict_numpy(blk).items()}
  params = convert(sd, sam_rules(), target).params["image_encoder"]["blocks_0"]
  with torch.no_grad():
    ref = to_np(blk(_t(x)))
  _close(ours.apply({"params": params}, jnp.asarray(x)), ref, 2e-5, f"block window={window} attention={label}")
  if impl == "cudnn":
    assert calls["cudnn"] > 0


@pytest.mark.parametrize("heads_per_step,chunk_bytes",
                         [(None, None), (1, 1), (2, 2 * 2 * 2 * 10 * 60 * 4), (3, 1 << 20), (8, 1 << 30)])
def test_global_attention_chunking(heads_per_step, chunk_bytes):
  """The chunked global path (`lax.map` over groups of heads x grid rows, all images in each step) against
  segment-anything's own `add_decomposed_rel_pos` + softmax + matmul, for every way of cutting the work:
  one head and one row per step, 2 heads x 2 rows, 3 heads (not a divisor of 4: 2), everything at once,
  and the platform default."""
  import torch
  m = tr.segment_anything_modeling()
  b, h, w, n, d = 2, 6, 10, 4, 8  # h + w > d: the chunked path
  rng = np.random.default_rng(21)
  q, k, v = (rng.normal(size=(b, h * w, n, d)).astype(np.float32) for _ in range(3))
  rel_h, rel_w = (rng.normal(size=(2 * s - 1, d)).astype(np.float32) for s in (h, w))
  ours = rel_pos_attention.rel_pos_attention(*(jnp.asarray(x) for x in (q, k, v, rel_h, rel_w)), (h, w),
                              max_chunk_bytes=chunk_bytes, heads_per_step=heads_per_step)
  tq, tk, tv = (_t(x).permute(0, 2, 1, 3).reshape(b * n, h * w, d) for x in (q, k, v))
  with torch.no_grad():
    attn = (tq * d ** -0.5) @ tk.transpose(-2, -1)
    attn = m.image_encoder.add_decomposed_rel_pos(attn, tq, _t(rel_h), _t(rel_w), (h, w), (h, w))
    ref = (attn.softmax(dim=-1) @ tv).reshape(b, n, h * w, d).permute(0, 2, 1, 3)
  _close(ours, to_np(ref), 1e-5, f"global attention heads_per_step={heads_per_step} bytes={chunk_bytes}")


# ------------------------------------------------------------------------------------- ViT-B, 1024

VIT_B = SAM_CONFIGS["vit_b"]


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
  """Torch ViT-B with random weights, converted; one 480x640 image run through both encoders."""
  import torch
  torch_sam = build_torch_sam(VIT_B, seed=3)
  params = _converted(torch_sam, VIT_B, tmp_path_factory.mktemp("vit_b"))
  image = np.random.default_rng(13).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
  x, input_size, original_size = preprocess(image, VIT_B.img_size)
  from evf_jax.sam.transforms import resize_longest_side
  resized = resize_longest_side(image, VIT_B.img_size)
  with torch.no_grad():
    x_ref = torch_sam.preprocess(torch.from_numpy(resized.copy()).permute(2, 0, 1).float())[None]
    emb_ref = to_np(torch_sam.image_encoder(x_ref))
  emb = _run(params, jnp.asarray(x)[None], cfg=VIT_B, method=Sam.embed_image)
  return types.SimpleNamespace(torch_sam=torch_sam, params=params, x=x, x_ref=nchw_to_nhwc(to_np(x_ref))[0],
                               emb=np.asarray(emb), emb_ref=emb_ref, input_size=input_size,
                               original_size=original_size)


@pytest.mark.slow
def test_vit_b_preprocess_and_image_encoder(vit_b):
  assert vit_b.input_size == (768, 1024) and vit_b.original_size == (480, 640)
  _close(vit_b.x, vit_b.x_ref, 1e-5, "preprocessed input")
  _close(vit_b.emb, nchw_to_nhwc(vit_b.emb_ref), 1e-4, "ViT-B image embedding")


@pytest.mark.slow
@pytest.mark.parametrize("multimask", [True, False])
def test_vit_b_decoder_and_postprocess(vit_b, multimask):
  """Full-size decoder on the reference's own embedding (isolating the decoder), then full-resolution
  masks for the 480x640 original, against `Sam.postprocess_masks`."""
  import torch
  p, b, m = _prompts(VIT_B, 2, seed=14)
  torch_sam = vit_b.torch_sam
  lr_ref, iou_ref = _torch_decode(torch_sam, vit_b.emb_ref, *_torch_prompts(torch_sam, p, b, m), multimask)
  lr, iou = _run(vit_b.params, jnp.asarray(nchw_to_nhwc(vit_b.emb_ref)), p, b, m,
                 multimask_output=multimask, cfg=VIT_B, method=Sam.decode)
  assert lr.shape == (2, 3 if multimask else 1, 256, 256)
  _close(lr, lr_ref, 1e-4, "ViT-B low-res logits")
  _close(iou, iou_ref, 1e-5, "ViT-B iou")
  with torch.no_grad():
    full_ref = to_np(torch_sam.postprocess_masks(_t(lr_ref), vit_b.input_size, vit_b.original_size))
  full = postprocess_masks(lr, vit_b.input_size, vit_b.original_size, VIT_B.img_size)
  assert full.shape == (2, 3 if multimask else 1, 480, 640)
  _close(full, full_ref, 1e-4, "ViT-B full-resolution logits")


@pytest.mark.slow
def test_vit_b_end_to_end(vit_b):
  """Our embedding into our decoder vs the reference's chain: encoder error carried through."""
  p, b, _ = _prompts(VIT_B, 1, seed=15)
  lr_ref, iou_ref = _torch_decode(vit_b.torch_sam, vit_b.emb_ref, *_torch_prompts(vit_b.torch_sam, p, b, None), True)
  lr, iou = _run(vit_b.params, jnp.asarray(vit_b.emb), p, b,
                 multimask_output=True, cfg=VIT_B, method=Sam.decode)
  _close(lr, lr_ref, 1e-4, "ViT-B end-to-end logits")
  _close(iou, iou_ref, 1e-4, "ViT-B end-to-end iou")


@pytest.mark.parametrize("original_size", [(480, 640), (640, 427)])
def test_postprocess_masks_non_square(original_size):
  import torch
  from evf_jax.sam.transforms import get_preprocess_shape
  m = tr.segment_anything_modeling()
  input_size = get_preprocess_shape(*original_size, 1024)
  lr = (4 * np.random.default_rng(16).normal(size=(2, 3, 256, 256))).astype(np.float32)
  fake = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=1024))
  with torch.no_grad():
    ref = to_np(m.Sam.postprocess_masks(fake, _t(lr), input_size, original_size))
  out = postprocess_masks(jnp.asarray(lr), input_size, original_size)
  assert out.shape == (2, 3, *original_size)
  _close(out, ref, 1e-5, f"postprocess to {original_size}")
