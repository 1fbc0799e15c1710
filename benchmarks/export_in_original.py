"""`run.py export-hf` checked with the original repository's own code, at the released sizes.

    git clone https://github.com/hustvl/EVF-SAM /path/EVF-SAM
    pip install --no-deps --target /path/tf4 transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5 \
        accelerate==1.1.1
    python -m benchmarks.export_in_original --original /path/EVF-SAM --original-pythonpath /path/tf4 \
        --family evf-sam --workdir W [--out r.json]

1. ours: random parameters (`evf_testing.training.random_params`) at the family's released size (SAM ViT-H +
   BEiT-3-L, or SAM-2 Hiera-L + BEiT-3-L), every tensor moved by noise (biases and norms off their init values),
   saved as an evf-jax checkpoint with a small unigram tokenizer, written with `run.py export-hf`, then
   `Predictor`'s logits for two prompts (EVF-SAM2: and `VideoPredictor`'s on a 4-frame JPEG video prompted on
   frame 0, with the object-score head's bias raised by 20 so that no frame is gated to "no object");
2. the original: `EvfSamModel` / `EvfSam2Model` of the checkout (`model/evf_sam.py`, `model/evf_sam2.py`)
   loaded from that directory with transformers' `from_pretrained(..., torch_dtype=torch.float32,
   low_cpu_mem_usage=True)` and its tokenizer with `AutoTokenizer(use_fast=False)`, as its `inference.py`
   loads them; its `inference()` on the same image, preprocessed as `inference.py` does (without torchvision
   and cv2: the same operations, see `evf_testing.evf_reference`). For EVF-SAM2 also the video model of
   `inference_video.py` (`model/evf_sam2_video.py`) and its `inference()` on the video, run on the CPU
   (`_original_video` says how);
3. the keys transformers did not fill or did not use, the token ids of both tokenizers, and the logits.

The original's models do not load with transformers 5 (they never call `post_init()`, which transformers 5
needs; any checkpoint, the released ones too): `--original-pythonpath` puts a transformers 4 (and the
accelerate its `low_cpu_mem_usage` needs) first on the path of step 2 only.

Each step runs in a child process (the full-size models take ~5 GB each). The original imports torchvision
(segment-anything's mask generator and transforms, unused by the model) and timm (an init helper): torchvision
does not import beside the CPU torch of the tests, so both are stood in by modules that raise if called, and
timm's `trunc_normal_` is torch's own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import numpy as np

FAMILIES = {"evf-sam": "EvfSamModel", "evf-sam2": "EvfSam2Model"}
PROMPTS = ["zebra top left", "[semantic] sky"]
IMAGE_HW = (480, 640)
VIDEO_FRAMES = 4  # EVF-SAM2: a panning scene of this many frames of IMAGE_HW, prompted with PROMPTS[0]
OBJECT_SCORE_BIAS = 20.0


def _paths(workdir: str) -> dict[str, str]:
  return {k: os.path.join(workdir, v) for k, v in
          (("ckpt", "evf_jax_ckpt"), ("hf", "exported"), ("ours", "ours.npz"), ("original", "original.npz"),
           ("frames", "frames"), ("ours_video", "ours_video.npy"))}


def ours(family: str, workdir: str, seed: int) -> None:
  import jax
  from evf_jax import cli
  from evf_jax.checkpoints import TOKENIZER_DIR, save_model
  from evf_jax.evf import EvfConfig
  from evf_jax.evf_sam2 import EvfSam2Config
  from evf_jax.families import family_of
  from evf_jax.predictor import Predictor
  from evf_testing.images import smooth_image
  from evf_testing.spm_model import train as train_spm
  from evf_testing.training import random_params

  p = _paths(workdir)
  config = EvfConfig.preset("evf-sam") if family == "evf-sam" else EvfSam2Config.preset("evf-sam2")
  params = random_params(family_of(config).abstract_params(config), seed)
  rng = np.random.default_rng(seed + 1)
  params = jax.tree.map(lambda x: x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32), params)
  if family == "evf-sam2":  # the object present on every frame: else the video is gated to "no object" (-1024)
    params["sam"]["sam_mask_decoder"]["pred_obj_score_head"]["layers_2"]["bias"] += np.float32(OBJECT_SCORE_BIAS)
  save_model(p["ckpt"], params, dict(config.to_dict(), param_dtype="float32"))
  del params
  spm_dir = train_spm(os.path.join(workdir, "spm"), "unigram")
  os.makedirs(os.path.join(p["ckpt"], TOKENIZER_DIR))
  os.replace(os.path.join(spm_dir, "sentencepiece.bpe.model"),
             os.path.join(p["ckpt"], TOKENIZER_DIR, "sentencepiece.bpe.model"))
  if cli.main(["export-hf", "--checkpoint", p["ckpt"], "--out", p["hf"]]) != 0:
    raise SystemExit("export-hf failed")
  predictor = Predictor.from_checkpoint(p["ckpt"])
  predictor.set_image(smooth_image(*IMAGE_HW, seed=3))
  result = predictor.predict(PROMPTS)
  ids = [predictor.tokenizer.encode(t) for t in PROMPTS]
  np.savez(p["ours"], logits=result.logits, ids=np.array(ids, dtype=object))


def ours_video(workdir: str) -> None:
  """EVF-SAM2: `VideoPredictor` on a panning scene of VIDEO_FRAMES JPEGs, prompted on frame 0 with PROMPTS[0]."""
  from evf_jax.video import VideoPredictor, read_frames
  from evf_testing.sam2_reference import write_video_frames
  p = _paths(workdir)
  os.makedirs(p["frames"])
  write_video_frames(p["frames"], VIDEO_FRAMES, *IMAGE_HW)
  frames = VideoPredictor.from_checkpoint(p["ckpt"]).predict(read_frames(p["frames"])[1], PROMPTS[0])
  np.save(p["ours_video"], np.stack([f.logits for f in frames]))


def _stand_ins() -> None:
  """torchvision and timm, which the original imports but its model does not use (module docstring)."""
  import importlib.abc
  import importlib.machinery
  import types

  import transformers  # noqa: F401  (before the stand-in: transformers probes torchvision's import spec)
  from evf_testing import torch_reference
  torch_reference.torchscale_beit3()  # registers timm.models.layers with drop_path when timm is missing
  layers = sys.modules["timm.models.layers"]
  if not hasattr(layers, "trunc_normal_"):
    import torch
    layers.trunc_normal_ = torch.nn.init.trunc_normal_

  class Unused(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)

      def unused(*args, **kwargs):
        raise RuntimeError(f"{self.__name__}.{name} is not available in this check")
      return unused

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
      if name == "torchvision" or name.startswith("torchvision."):
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
      return None

    def create_module(self, spec):
      return Unused(spec.name)

    def exec_module(self, module):
      module.__path__ = []

  sys.meta_path.insert(0, Finder())


def original(family: str, workdir: str, checkout: str) -> None:
  """Runs in the checkout's root: its SAM-2 builder finds its hydra configs by a path relative to it."""
  import torch
  import transformers
  _stand_ins()
  sys.path.insert(0, checkout)
  model_cls = getattr(importlib.import_module("model.evf_sam" if family == "evf-sam" else "model.evf_sam2"),
                      FAMILIES[family])
  from evf_testing.evf_reference import beit_input, sam_input
  from evf_testing.images import smooth_image
  from evf_testing.sam2_reference import sam2_input

  p = _paths(workdir)
  model, info = model_cls.from_pretrained(p["hf"], torch_dtype=torch.float32, low_cpu_mem_usage=True,
                                          output_loading_info=True)
  model.eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(p["hf"], padding_side="right", use_fast=False)
  image = smooth_image(*IMAGE_HW, seed=3)
  mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # inference.py's sam_preprocess
  if family == "evf-sam":
    sam_x, input_hw = sam_input(image, 1024, mean, std)
  else:
    sam_x, input_hw = sam2_input(image, 1024, mean, std), None  # its resize_list is unused for SAM-2
  beit_x = beit_input(image, 224)
  logits, ids = [], []
  with torch.no_grad():
    for prompt in PROMPTS:
      input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
      ids.append(input_ids[0].tolist())
      out = model.inference(sam_x, beit_x, input_ids, resize_list=[input_hw], original_size_list=[IMAGE_HW])
      logits.append(out[0].float().numpy())
  infos = {"image model": info}
  if family == "evf-sam2":  # inference_video.py's model: the same file, SAM-2 built as a video predictor
    del model
    video_cls = importlib.import_module("model.evf_sam2_video").EvfSam2Model
    video_model, infos["video model"] = video_cls.from_pretrained(p["hf"], torch_dtype=torch.float32,
                                                                  low_cpu_mem_usage=True, output_loading_info=True)
    video = {"video_logits": _original_video(video_model.eval(), tokenizer, p["frames"])}
  else:
    video = {}
  np.savez(p["original"], logits=np.stack(logits), ids=np.array(ids, dtype=object), **video,
           info=json.dumps({m: {k: [str(x) for x in v] for k, v in i.items()} for m, i in infos.items()}),
           versions=json.dumps({"transformers": transformers.__version__, "torch": torch.__version__}))


def _original_video(model, tokenizer, frames_dir: str) -> np.ndarray:
  """The video model's `inference()` (EVF's `add_new_text` on frame 0, then `propagate_in_video`) on the CPU, with
  the logits of every frame at the video's size recorded as they pass (it returns only masks). Its code is
  written for CUDA: `.cuda()` is the identity, the predictor's `torch.device("cuda")` is the CPU, and the
  connected components of its hole filling (a CUDA kernel) come from `connected_components_bruteforce`, which
  the tests check against scipy's labelling."""
  import types

  import torch
  from PIL import Image
  from evf_testing.evf_reference import beit_input
  from evf_testing.sam2_reference import connected_components_bruteforce
  predictor_module = importlib.import_module("model.segment_anything_2.sam2.sam2_video_predictor")
  misc = importlib.import_module("model.segment_anything_2.sam2.utils.misc")

  class TorchOnCpu(types.ModuleType):
    def __getattr__(self, name):
      return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
      return torch.device("cpu") if args and str(args[0]).startswith("cuda") else torch.device(*args, **kwargs)

  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  predictor_module.torch = TorchOnCpu("torch")
  misc.get_connected_components = connected_components_bruteforce
  predictor = model.visual_model
  propagate, logits = predictor.propagate_in_video, {}

  def recorded(*args, **kwargs):
    for frame_idx, obj_ids, video_res_masks in propagate(*args, **kwargs):
      logits[frame_idx] = video_res_masks[0, 0].float().numpy()
      yield frame_idx, obj_ids, video_res_masks

  predictor.propagate_in_video = recorded
  frame0 = np.asarray(Image.open(os.path.join(frames_dir, "00000.jpg")).convert("RGB"))
  input_ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
  with torch.no_grad():
    masks = model.inference(frames_dir, beit_input(frame0, 224), input_ids)
  assert sorted(masks) == sorted(logits) == list(range(VIDEO_FRAMES)), (sorted(masks), sorted(logits))
  for t, by_object in masks.items():  # what inference() returns is what was recorded
    np.testing.assert_array_equal(by_object[1][0], logits[t] > 0)
  return np.stack([logits[t] for t in range(VIDEO_FRAMES)])


def compare(family: str, workdir: str) -> dict:
  p = _paths(workdir)
  a, b = np.load(p["ours"], allow_pickle=True), np.load(p["original"], allow_pickle=True)
  diff = np.abs(a["logits"] - b["logits"])
  scale = float(np.abs(b["logits"]).max())
  differ = (a["logits"] > 0) != (b["logits"] > 0)
  info = json.loads(str(b["info"]))
  video = {}
  if "video_logits" in b:
    va, vb = np.load(p["ours_video"]), b["video_logits"]
    vdiff = np.abs(va - vb)
    video = {"video": {"frames": int(vb.shape[0]), "prompt": PROMPTS[0],
                       "max_abs_logit_diff_per_frame": [float(d.max()) for d in vdiff],
                       "logit_scale_per_frame": [float(np.abs(x).max()) for x in vb],
                       "mask_pixels_agree_per_frame": [float(np.mean((x > 0) == (y > 0))) for x, y in zip(va, vb)],
                       "foreground_share_per_frame": [float(np.mean(y > 0)) for y in vb]}}
  return {"family": family, "prompts": PROMPTS, "image_hw": list(IMAGE_HW), **video,
          "original_ran_with": json.loads(str(b["versions"])),
          "weights_bytes": os.path.getsize(os.path.join(p["hf"], "model.safetensors")),
          "loading_info": info, "all_keys_loaded": not any(any(i.values()) for i in info.values()),
          "token_ids_equal": [list(x) for x in a["ids"]] == [list(x) for x in b["ids"]],
          "max_abs_logit_diff": float(diff.max()), "logit_scale": scale,
          "max_rel_logit_diff": float(diff.max()) / max(scale, 1e-12),
          "mask_pixels_agree": float(np.mean(differ == 0)),
          # pixels whose mask differs only because their logits are within the difference of zero
          "max_abs_logit_where_masks_differ": float(np.abs(b["logits"])[differ].max()) if differ.any() else 0.0}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--original", required=True, help="a checkout of github.com/hustvl/EVF-SAM")
  ap.add_argument("--family", choices=sorted(FAMILIES), default="evf-sam")
  ap.add_argument("--workdir", required=True, help="an empty or new directory (~11 GB at the released sizes)")
  ap.add_argument("--original-pythonpath", default="",
                  help="prepended to PYTHONPATH for the original's step (a transformers 4 installed with --target)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", help="write the result here as JSON")
  ap.add_argument("--stage", choices=["ours", "ours-video", "original"],
                  help=argparse.SUPPRESS)  # one child process's part
  args = ap.parse_args(argv)
  checkout = os.path.abspath(args.original)
  workdir = os.path.abspath(args.workdir)
  if args.stage == "ours":
    ours(args.family, workdir, args.seed)
    return 0
  if args.stage == "ours-video":
    ours_video(workdir)
    return 0
  if args.stage == "original":
    original(args.family, workdir, checkout)
    return 0
  if not os.path.isfile(os.path.join(checkout, "model", "evf_sam.py")):
    print(f"error: --original {args.original}: not a checkout of hustvl/EVF-SAM (no model/evf_sam.py)",
          file=sys.stderr)
    return 2
  if os.path.isdir(workdir) and os.listdir(workdir):
    print(f"error: --workdir {args.workdir} is not empty", file=sys.stderr)
    return 2
  os.makedirs(workdir, exist_ok=True)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  def env(*first):
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [*first, repo, os.environ.get("PYTHONPATH")])))
  base = [sys.executable, "-m", "benchmarks.export_in_original", "--original", checkout, "--family", args.family,
          "--workdir", workdir, "--seed", str(args.seed)]
  subprocess.run(base + ["--stage", "ours"], check=True, env=env(), cwd=repo)
  if args.family == "evf-sam2":
    subprocess.run(base + ["--stage", "ours-video"], check=True, env=env(), cwd=repo)
  subprocess.run(base + ["--stage", "original"], check=True, env=env(args.original_pythonpath), cwd=checkout)
  result = compare(args.family, workdir)
  git = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True)
  result["original_commit"] = git.stdout.strip() if git.returncode == 0 else None
  print(json.dumps(result, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
