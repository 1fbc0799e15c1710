"""The analytic FLOP counts of `evf_jax.flops` against XLA's own count of the Flax models.

XLA's `cost_analysis` of the lowered (unoptimised) program counts every op, elementwise ones included, so it
should lie a little above the analytic count (matmuls, convs and attention products only): the elementwise
share shrinks with width (O(d) per token against O(d^2)), and is the tolerance. A second, tighter check sums
only the program's dot and convolution ops, which the analytic count should match term for term.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from evf_jax import flops, layers
from evf_jax.beit3.config import Beit3Config
from evf_jax.evf import EvfConfig, EvfSam
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.sam import image_encoder
from evf_jax.sam.config import SamConfig
from evf_jax.sam2.config import Sam2Config
from evf_jax.sam2.sam2_base import Sam2

S = jax.ShapeDtypeStruct
# Hiera-T's trunk at 256 px with the real decoder (d_model 256): small enough to lower in seconds, wide enough
# for matmuls to dominate; its 14-windows on a 16 grid pad to 28, and its q-pooling block pools padded windows.
SMALL = dataclasses.replace(Sam2Config.preset("hiera_t"), name="hiera_t_256", image_size=256)
CONFIGS = {"toy": Sam2Config.preset("toy"), "small": SMALL, "hiera_l": Sam2Config.preset("hiera_l")}
# XLA's total over the analytic count, lower and upper bound. At toy widths (trunk 16-128, decoder 32, the
# decoder's fixed 256-wide IoU head, which SAM's convention counts as depth x C x hidden) the elementwise ops
# and the head are a few % (measured: encoder +3.9%, decoder +7.7%); from Hiera-T's widths and d_model 256 on,
# under 2% (small: +0.6%, +1.4%; Hiera-L: +0.5%, +1.8%).
TOTAL_BOUNDS = {"toy": (0.0, 0.10), "small": (0.0, 0.025), "hiera_l": (0.0, 0.025)}
# Dots and convolutions against the analytic count. Encoder: the only product not counted is the background
# position embedding's bicubic resize (small: 3e-4, Hiera-L: 7e-5). Decoder: SAM's counting of the hypernetwork
# MLPs and IoU head as about C x C per layer (small: -2e-3, Hiera-L: -2e-4).
MATMUL_RTOL = {"encoder": 1e-3, "decoder": 5e-3}


@pytest.fixture(autouse=True)
def _single_pass_attention(monkeypatch):
  """On the CPU, long attention is a loop over key blocks, whose body XLA's cost analysis counts once."""
  monkeypatch.setattr(layers, "ATTENTION_BLOCK", 1 << 30)


def _embed_and_decode(model, images, prompt):
  embed, high_res = model.embed_image(images)
  return model.decode(embed, high_res, extra_sparse=prompt, multimask_output=True)


@functools.lru_cache(maxsize=None)
def _abstract_params(name):
  """The image path's and decoder's parameters as ShapeDtypeStructs (`sam2_base.abstract_params` also traces the
  video modules: twice as long at Hiera-L)."""
  cfg = CONFIGS[name]
  model, s = Sam2(cfg), cfg.image_size
  init = lambda x, p: model.init(jax.random.key(0), x, p, method=_embed_and_decode)["params"]  # noqa: E731
  return nn.unbox(jax.eval_shape(init, S((1, s, s, 3), jnp.float32), S((1, 1, cfg.d_model), jnp.float32)))


def _decoder_inputs(cfg):
  e, c = cfg.embedding_size, cfg.d_model
  high_res = (S((1, 4 * e, 4 * e, c // 8), jnp.float32), S((1, 2 * e, 2 * e, c // 4), jnp.float32))
  return S((1, e, e, c), jnp.float32), high_res, S((1, 1, c), jnp.float32)


def _lower(name, part):
  """`Sam2.embed_image` of one image, or `Sam2.decode` of one EVF-style prompt (one sparse token), lowered with
  abstract parameters (nothing is compiled or run)."""
  cfg = CONFIGS[name]
  model, params = Sam2(cfg), _abstract_params(name)
  if part == "encoder":
    fn = lambda p, x: model.apply({"params": p}, x, method=Sam2.embed_image)  # noqa: E731
    return jax.jit(fn).lower(params, S((1, cfg.image_size, cfg.image_size, 3), jnp.float32))

  def fn(p, embed, high_res, prompt):
    return model.apply({"params": p}, embed, high_res, extra_sparse=prompt, multimask_output=True,
                       method=Sam2.decode)
  return jax.jit(fn).lower(params, *_decoder_inputs(cfg))


def _matmul_flops(stablehlo: str) -> float:
  """2 x multiply-adds of the `dot_general` and `convolution` ops in a StableHLO module's text."""
  def shapes(line):  # the operand and result types after the last " : "
    types = re.findall(r"tensor<([0-9x]*x)[a-z0-9]+>", line.split(" : ")[-1])
    return [[int(d) for d in t.split("x")[:-1]] for t in types]

  total = 0
  for line in stablehlo.splitlines():
    if "stablehlo.dot_general" in line:
      lhs, _, out = shapes(line)
      contracted = re.search(r"contracting_dims = \[([0-9, ]*)\]", line).group(1)
      total += 2 * math.prod(out) * math.prod(lhs[int(i)] for i in contracted.split(","))
    elif "stablehlo.convolution" in line:
      _, kernel, out = shapes(line)  # HWIO kernels, undilated, as the models' convs are
      assert set(re.findall(r"_dilate = \[([0-9, ]*)\]", line)) <= {"1, 1"}, line
      total += 2 * math.prod(out) * math.prod(kernel[:-1])
  return float(total)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_sam2_counts_match_xla(name, part):
  analytic = (flops.sam2_encoder if part == "encoder" else flops.sam2_decoder)(CONFIGS[name])
  lowered = _lower(name, part)
  total = lowered.cost_analysis()["flops"]
  lo, hi = TOTAL_BOUNDS[name]
  excess = total / analytic - 1
  print(f"[flops] {name} {part}: analytic {analytic:.4g}, XLA {total:.4g} ({excess:+.2%})")
  assert lo <= excess <= hi, f"XLA counts {excess:+.2%} over the analytic {part}, outside [{lo:.1%}, {hi:.1%}]"
  if name != "toy":  # at toy widths the decoder's head approximations are 2% of it
    matmuls = _matmul_flops(lowered.as_text())
    assert matmuls == pytest.approx(analytic, rel=MATMUL_RTOL[part])


# EVF-SAM's parts at small widths, shaped so that each term of the count shows: SAM ViT-B's layout at 256 px (a
# 16 grid in 7-windows, padded to 21: 9 windows) with one global block and a 128-wide decoder; BEiT-3 256 wide
# over a 64-px image (17 vision tokens); the projector 256 -> 128 (not square).
EVF_SMALL = EvfConfig(
    sam=dataclasses.replace(SamConfig.preset("vit_b"), img_size=256, embed_dim=256, depth=2, num_heads=4,
                            window_size=7, global_attn_indexes=(1,), prompt_embed_dim=128, decoder_mlp_dim=512,
                            iou_head_hidden_dim=128),
    beit3=dataclasses.replace(Beit3Config.preset("tiny"), embed_dim=256, num_layers=2, num_heads=4, ffn_dim=1024,
                              img_size=64),
    sam_scale="base", mm_extractor_scale="tiny")


def test_evf_sam_counts_match_xla(monkeypatch):
  """SAM's image encoder and decoder, BEiT-3 and the projector (what EVF-SAM's MFU is made of) against the dots
  and convolutions of the lowered Flax model: 3 prompts on one image, whose BEiT-3 patches are embedded once.
  SAM's decomposed rel-pos terms are not in the count (a q x table product folded into QK^T here, an
  elementwise add in the reference), so the encoder runs plain attention in their place."""
  monkeypatch.setattr(image_encoder, "rel_pos_attention", lambda q, k, v, *_: jax.nn.dot_product_attention(q, k, v))
  cfg, n, text_len = EVF_SMALL, 3, 16
  model, s, b, g, c = EvfSam(cfg), cfg.sam.img_size, cfg.beit3.img_size, cfg.sam.embedding_size, cfg.out_dim
  assert flops.windows_per_image(cfg.sam) == (9, 49)
  ids = S((n, text_len), jnp.int32), S((n, text_len), jnp.bool_)
  init = lambda *x: model.init(jax.random.key(0), *x)["params"]  # noqa: E731
  params = nn.unbox(jax.eval_shape(init, S((1, s, s, 3), jnp.float32), S((1, b, b, 3), jnp.float32), *ids))

  def count(method, *args):
    fn = lambda p, *x: model.apply({"params": p}, *x, method=method)  # noqa: E731
    return _matmul_flops(jax.jit(fn).lower(params, *args).as_text())

  assert count("embed_image", S((1, s, s, 3), jnp.float32)) == pytest.approx(flops.sam_encoder(cfg.sam), rel=1e-9)
  text = count("text_prompts", S((1, b, b, 3), jnp.float32), *ids)
  per_prompt = flops.beit3(cfg.beit3, text_len) + flops.projector(cfg)
  assert text == pytest.approx(flops.beit3_patch_embedding(cfg.beit3) + n * per_prompt, rel=1e-9)
  assert count(lambda m, x: m.projector(x), S((1, cfg.hidden_size), jnp.float32)) == flops.projector(cfg)
  decoder = count("decode", S((1, g, g, c), jnp.float32), S((n, c), jnp.float32))
  assert decoder == pytest.approx(n * flops.sam_decoder(cfg.sam), rel=MATMUL_RTOL["decoder"])


def test_frozen_decoder_costs_forward_plus_input_gradient():
  """`train_step`'s conventions for the decoder: trained 3x, frozen 2x (the gradient to the prompt). XLA's count
  of the gradients agrees: 3x; and 2x as an upper bound, as the first layer's image-side projections (a tenth of
  the decoder) do not see the prompt and need no input gradient (measured 1.83x here, 1.80x at Hiera-L)."""
  cfg = SMALL
  model, params = Sam2(cfg), _abstract_params("small")

  def loss(p, embed, high_res, prompt):
    masks = model.apply({"params": p}, embed, high_res, extra_sparse=prompt, multimask_output=True,
                        method=Sam2.decode)[0]
    return masks.sum()

  count = lambda fn: jax.jit(fn).lower(params, *_decoder_inputs(cfg)).cost_analysis()["flops"]  # noqa: E731
  forward = count(loss)
  frozen, trained = count(jax.grad(loss, argnums=3)) / forward, count(jax.grad(loss, argnums=(0, 3))) / forward
  print(f"[flops] decoder gradients over its forward: prompt only {frozen:.3f}, parameters too {trained:.3f}")
  assert 1.75 <= frozen <= 2.0 and 2.95 <= trained <= 3.05


def test_hiera_l_per_image_and_prompt():
  """What `train_step` is made of at EVF-SAM2's size, to the TFLOP: Hiera-L's image side ~1.8 TFLOP per 1024-px
  image, its decoder ~3.6 GFLOP per prompt."""
  cfg = Sam2Config.preset("hiera_l")
  assert flops.sam2_encoder(cfg) == pytest.approx(1.823e12, rel=1e-3)
  assert flops.sam2_decoder(cfg) == pytest.approx(3.623e9, rel=1e-3)


def test_neck_counts_the_scalped_level_its_top_down_path_uses():
  """With scalp 1 the coarsest level is dropped, but level 2 adds it in: its lateral conv still runs."""
  cfg = Sam2Config.preset("toy")
  no_top_down = dataclasses.replace(cfg, fpn_top_down_levels=())
  coarsest = 2 * cfg.trunk_grid_sizes[-1] ** 2 * cfg.channel_list[0] * cfg.d_model
  assert flops.sam2_encoder(cfg) - flops.sam2_encoder(no_top_down) == coarsest


def test_train_step_evf_sam_unchanged():
  """EVF-SAM's count is the one benchmarks and the progress bar have reported: frozen encoder 1x, trained 3x,
  everything per prompt 3x."""
  for preset in ("evf-sam", "tiny"):
    c = EvfConfig.preset(preset)
    for frozen in (True, False):
      per_prompt = flops.beit3(c.beit3, 64) + flops.projector(c) + flops.sam_decoder(c.sam)
      encoder = flops.sam_encoder(c.sam) * (1 if frozen else 3)
      expected = 8 * (encoder + 3 * flops.beit3_patch_embedding(c.beit3)) + 3 * 8 * 3 * per_prompt
      assert flops.train_step(c, images=8, prompts_per_image=3, text_len=64, encoder_frozen=frozen) == expected


def test_train_step_evf_sam2():
  c = EvfSam2Config.preset("evf-sam2")
  sam2, images, prompts = c.sam2, 8, 24
  text = flops.beit3(c.beit3, 64) + flops.projector(c)
  patch = flops.beit3_patch_embedding(c.beit3)
  step = functools.partial(flops.train_step, c, images=images, prompts_per_image=3, text_len=64)
  frozen = step(encoder_frozen=True, decoder_trained=False)
  expected = images * (flops.sam2_encoder(sam2) + 3 * patch) + prompts * (3 * text + 2 * flops.sam2_decoder(sam2))
  assert frozen == pytest.approx(expected, rel=1e-12)
  # A trained decoder: 3x per prompt, and its conv_s0 / conv_s1, which run on the image side, 3x per image.
  g0, g1 = sam2.trunk_grid_sizes[:2]
  d = sam2.d_model
  high_res = 2 * g0 * g0 * d * (d // 8) + 2 * g1 * g1 * d * (d // 4)
  trained = step(encoder_frozen=True, decoder_trained=True)
  assert trained - frozen == pytest.approx(prompts * flops.sam2_decoder(sam2) + images * 2 * high_res, rel=1e-9)
  # A trained encoder includes them.
  assert step(encoder_frozen=False) == pytest.approx(trained + images * 2 * (flops.sam2_encoder(sam2) - high_res),
                                                     rel=1e-9)


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("cpu", None), ("TPU v99", None)])
def test_peak_by_device_kind(kind, peak):
  """jax's device_kind strings; the longest prefix wins ("TPU v5 lite", a v5e, is not a v5p's "TPU v5")."""
  assert flops.peak_flops(kind) == peak
