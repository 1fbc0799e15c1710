"""Small training set-ups for tests: a tiny EVF-SAM, a random batch in the pipeline's layout, a micro config."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from evf_jax import families
from evf_jax.evf import EvfConfig
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.train import config as train_config
from evf_testing import torch_reference as tr

# What EVF-SAM and EVF-SAM2 train, as prefixes of the references' state-dict keys
# (evf_jax.train.config.EVF_SAM_TRAINABLE, EVF_SAM2_TRAINABLE).
TORCH_TRAINABLE = ("mm_extractor.", "text_hidden_fcs.", "visual_model.mask_decoder.",
                   "visual_model.prompt_encoder.no_mask_embed")
TORCH_TRAINABLE_SAM2 = ("mm_extractor.", "text_hidden_fcs.")


def tiny_config(vocab_size: int = 320) -> EvfConfig:
  """The tiny preset with a small text vocabulary and position table (the test tokenizer has ~300 ids)."""
  cfg = EvfConfig.preset("tiny")
  return dataclasses.replace(cfg, beit3=dataclasses.replace(cfg.beit3, vocab_size=vocab_size,
                                                            max_source_positions=32))


def random_batch(config: EvfConfig | EvfSam2Config, images: int = 2, prompts: int = 3, text_len: int = 8,
                 mask_size: int = 0, seed: int = 0, invalid: int = 1) -> dict[str, np.ndarray]:
  """A batch as `data_pipelines.pipeline` builds it: varied resized sizes (EVF-SAM2: every image fills the
  square frame), right-padded prompts of different lengths, blob-like masks, and the last `invalid` prompt slots
  of the last image left empty (padding)."""
  rng = np.random.default_rng(seed)
  image_input = families.image_input(config)
  s, b = image_input.size, config.beit3.img_size
  m = mask_size or s
  short = rng.integers(s // 2, s + 1, images) if not image_input.square else np.full(images, s)
  resize = np.asarray([(s, short[i]) if i % 2 else (short[i], s) for i in range(images)], np.int32)
  sam = rng.integers(0, 256, (images, s, s, 3), dtype=np.uint8)
  region = np.zeros((images, m, m), bool)
  masks = np.zeros((images, prompts, m, m), np.uint8)
  yy, xx = np.mgrid[0:m, 0:m]
  for i in range(images):
    h, w = (int(round(v * m / s)) for v in resize[i])
    sam[i, resize[i, 0]:] = 0
    sam[i, :, resize[i, 1]:] = 0
    region[i, :h, :w] = True
    for j in range(prompts):
      cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(m / 8, m / 3)
      masks[i, j] = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & region[i]
  ids = np.full((images, prompts, text_len), 1, np.int32)
  for i in range(images):
    for j in range(prompts):
      n = int(rng.integers(3, text_len + 1))
      ids[i, j, :n] = np.concatenate([[0], rng.integers(4, 300, n - 2), [2]])
  valid = np.ones((images, prompts), bool)
  if invalid:
    valid[-1, -invalid:] = False
    ids[-1, -invalid:] = 1
    masks[-1, -invalid:] = 0
  return {"sam_image": sam, "resize_hw": resize, "beit_image": rng.normal(size=(images, b, b, 3)).astype(np.float32),
          "input_ids": ids, "attention_mask": ids != 1, "prompt_valid": valid, "masks": masks, "valid_region": region}


def random_params(shapes, seed: int = 0) -> dict:
  """Host float32 arrays in the shapes of a parameter tree (e.g. `abstract_params(config)`), drawn in numpy:
  seconds at the released sizes, where `init_params` compiles the model's init for minutes on a CPU. Kernels
  ~ N(0, 1 / fan_in), norm scales 1, biases 0, other tables ~ N(0, 0.02^2): activations stay finite."""
  from flax import traverse_util
  rng = np.random.default_rng(seed)
  out = {}
  for key, leaf in traverse_util.flatten_dict(shapes).items():
    shape, name = tuple(leaf.shape), key[-1]
    if name == "scale":
      out[key] = np.ones(shape, np.float32)
    elif name == "bias":
      out[key] = np.zeros(shape, np.float32)
    else:
      std = 1.0 / np.sqrt(max(1, int(np.prod(shape[:-1])))) if name == "kernel" else 0.02
      out[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
  return traverse_util.unflatten_dict(out)


def micro_train_config(steps: int = 6, sam2: bool = False) -> ml_collections.ConfigDict:
  """configs/train/synthetic.py at test size: the tiny model (`sam2`: the toy EVF-SAM2) on a few synthetic
  images, evaluated at the end."""
  c = train_config.base_config()
  c.total_steps = steps
  c.batch_size = 8
  c.checkpoint_every = 3
  c.eval_every = 1000
  c.log_every = 1
  c.keep_checkpoints = 10
  c.progress = False
  c.precision = "fp32"
  c.model = train_config.model_fields("tiny", beit3={"vocab_size": 160, "max_source_positions": 32})
  c.init.from_scratch = True
  c.train_tokenizer_vocab = 128
  c.trainable = (".*",)
  if sam2:
    c.model = train_config.model_fields("toy", beit3=dict(c.model.beit3))
    c.model.multimask_output = False
    c.trainable = train_config.EVF_SAM2_TRAINABLE  # the original's frozen set: no backward pass through SAM-2
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 1
  c.data.root = ""
  c.data.mixture = {"synthetic": (1.0, ("synthetic",))}
  c.data.num_prompts = 2
  c.data.max_text_len = 16
  c.data.mask_size = 48
  c.data.read_threads = 1
  c.data.synthetic = {"num_train": 24, "num_eval": 3, "seed": 0}
  c.evals = ("synthetic|val",)
  c.eval.batch_size = 8
  return c


def sam_input(config, batch) -> np.ndarray:
  """(B, S, S, 3) float32: the SAM input the step builds from the batch (normalised; SAM-1's zero outside the
  image). A module attribute so that benchmarks/train_cpu.py can swap in a torch version."""
  return np.array(families.image_input(config).normalize(batch["sam_image"], batch["resize_hw"]))


def torch_training_loss(model, config, batch, trainable=None):
  """The originals' training forward on the PyPI modules, EVF-SAM's (model/evf_sam.py `model_forward`: SAM's
  image encoder without gradients, the single-mask decoder) or EVF-SAM2's (model/evf_sam2.py `forward`: SAM-2's
  `forward_image` with `no_mem_embed` added, the decoder in train mode, keeping the best of masks 1-3 by predicted
  IoU, or with `config.multimask_output` False mask 0 of the single-mask output); for both BEiT-3
  on every (image, prompt) pair with the padding masked, the projector, the projected feature as the only sparse
  prompt and `no_mask_embed` as the dense one, bilinear upsampling to the loss resolution; our loss (its formula
  at that resolution, over `valid_region`) over the valid prompts. `trainable`: state-dict key prefixes that get
  gradients (default: what the family's original trains)."""
  torch = tr.import_torch()
  F = torch.nn.functional
  sam = model.visual_model
  sam2 = isinstance(config, EvfSam2Config)
  trainable = trainable or (TORCH_TRAINABLE_SAM2 if sam2 else TORCH_TRAINABLE)
  for name, p in model.named_parameters():
    p.requires_grad_(any(name.startswith(k) for k in trainable))
  x = torch.from_numpy(sam_input(config, batch)).permute(0, 3, 1, 2)
  if sam2:
    from evf_testing.sam2_reference import reference_sam2_maps
    maps = reference_sam2_maps(sam, x)  # frozen parameters build no graph; the decoder's conv_s0/s1 may
    pe, decoder = sam.sam_prompt_encoder, sam.sam_mask_decoder
  else:
    with torch.no_grad():
      emb = sam.image_encoder(x)
    pe, decoder = sam.prompt_encoder, sam.mask_decoder
  b, k, length = batch["input_ids"].shape
  m = batch["masks"].shape[-1]
  bces, dices = [], []
  for i in range(b):
    sel = np.flatnonzero(batch["prompt_valid"][i])
    ids = torch.from_numpy(batch["input_ids"][i, sel].astype(np.int64))
    beit = torch.from_numpy(batch["beit_image"][i]).permute(2, 0, 1)[None].expand(len(sel), -1, -1, -1)
    out = model.mm_extractor.beit3(visual_tokens=beit, textual_tokens=ids, text_padding_position=ids == 1)
    feat = model.text_hidden_fcs[0](out["encoder_out"][:, :1])
    e = pe.image_embedding_size
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(sel), -1, e[0], e[1])
    if sam2:
      decoder.train()  # train mode: single-mask output is mask 0, without the stability fallback
      low, iou = decoder(image_embeddings=maps[-1][i:i + 1], image_pe=pe.get_dense_pe(),
                         sparse_prompt_embeddings=feat, dense_prompt_embeddings=dense,
                         multimask_output=config.multimask_output, repeat_image=True,
                         high_res_features=[f[i:i + 1] for f in maps[:-1]])[:2]
      decoder.eval()
      if config.multimask_output:  # as the original's forward: the mask with the highest predicted IoU
        best = torch.argsort(iou, dim=-1, descending=True)[:, :1]
        low = torch.take_along_dim(low, best[..., None, None], dim=1)
    else:
      low, _ = decoder(image_embeddings=emb[i:i + 1], image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=feat,
                       dense_prompt_embeddings=dense, multimask_output=False)
    logits = F.interpolate(low, (m, m), mode="bilinear", align_corners=False)[:, 0]
    region = torch.from_numpy(batch["valid_region"][i])
    target = torch.from_numpy(batch["masks"][i, sel].astype(np.float32))
    for j in range(len(sel)):
      xj, tj = logits[j][region], target[j][region]
      bces.append(F.binary_cross_entropy_with_logits(xj, tj))
      pj = xj.sigmoid()
      dices.append(1 - (2 * (pj / 1000 * tj).sum() + 1e-6) / ((pj / 1000).sum() + (tj / 1000).sum() + 1e-6))
  n = len(bces) + 1e-8
  loss = 2.0 * torch.stack(bces).sum() / n + 0.5 * torch.stack(dices).sum() / n
  return loss


def torch_loss_and_grads(model, config, batch, trainable=None):
  """(loss, {state-dict key: gradient}) of `torch_training_loss`; zeros for frozen parameters and buffers."""
  for p in model.parameters():
    p.grad = None
  loss = torch_training_loss(model, config, batch, trainable)
  loss.backward()
  params = dict(model.named_parameters())
  grads = {name: (params[name].grad.numpy() if name in params and params[name].grad is not None
                  else np.zeros(tuple(t.shape), np.float32)) for name, t in model.state_dict().items()}
  return float(loss.detach()), grads


def assert_gradients_match(ours: dict, want: dict) -> tuple[str, float]:
  """Every gradient of `ours` against the reference's (flat {path: array} dicts with the same keys), in float32:
  float32 sums in another order differ by ~1e-5 of each gradient's own scale; gradients that are zero in exact
  arithmetic (unused heads, a key bias under softmax) are float noise on both sides, judged against the overall
  scale. Returns the worst (path, error relative to its gradient's scale)."""
  assert set(ours) == set(want)
  overall = max(float(np.abs(v).max()) for v in want.values())
  assert overall > 0
  worst = {}
  for key in sorted(ours):
    g, r = np.asarray(ours[key]), np.asarray(want[key])
    scale = float(np.abs(r).max())
    tol = 2e-4 * scale + 1e-6 * overall
    worst[key] = float(np.abs(g - r).max()) / max(scale, 1e-6 * overall)
    np.testing.assert_allclose(g, r, rtol=0, atol=tol, err_msg=key)
  key = max(worst, key=worst.get)
  return key, worst[key]


def assert_same_tree(a, b) -> None:
  """The same tree structure and every leaf bit-identical (device or host arrays)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved_params(workdir: str, step: int) -> dict:
  """The trained parameters a run saved at `step`, as host arrays, whatever mesh or processes saved them (the
  saved shardings name the writer's devices, so they are restored onto this process's first device)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        checkpointer.metadata(path).item_metadata)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target)["params"])
