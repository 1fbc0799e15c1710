"""`run.py export-hf`: evf-jax checkpoints back to the original's Hugging Face layout, for both families.

A random-weight toy EVF-SAM and EVF-SAM2 in the released layout (the PyPI references + EVF's glue), converted
and written back, give the same file: same keys, bit-equal tensors, the config fields the original reads.
Weights changed on the evf-jax side (as training changes them) load strictly into the PyTorch reference through
transformers' `from_pretrained`, as EVF-SAM's code loads its checkpoints, and give Predictor's logits; the
tokenizer loads with `AutoTokenizer(use_fast=False)` and gives our ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from convert.rules import source_mapping
from evf_jax import cli
from evf_jax.checkpoints import TOKENIZER_DIR, load_checkpoint, save_model
from evf_jax.evf import EvfConfig
from evf_jax.evf_sam2 import EvfSam2Config
from evf_jax.predictor import Predictor
from evf_jax.tokenizer import TextTokenizer
from evf_testing import evf_reference as ref
from evf_testing import sam2_reference as ref2
from evf_testing.images import smooth_image
from evf_testing.spm_model import train as train_spm

pytestmark = pytest.mark.usefixtures("fast_compile")  # toy sizes: compiling is the cost
CONFIGS = {"evf-sam": EvfConfig.preset("tiny"), "evf-sam2": EvfSam2Config.preset("toy")}
PROMPTS = ["zebra top left", "[semantic] sky"]


def _build_torch(name: str, seed: int):
  config = CONFIGS[name]
  return ref.build_torch_evf(config, seed) if name == "evf-sam" else ref2.build_torch_evf_sam2(config, seed=seed)


def _safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  from safetensors import safe_open
  from safetensors.numpy import load_file
  with safe_open(path, "np") as f:
    metadata = f.metadata()
  return load_file(path), metadata


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  """A unigram model, as XLM-R's (and BEiT-3's) is: transformers 5 segments BPE models its own way."""
  return os.path.join(train_spm(str(tmp_path_factory.mktemp("spm")), "unigram"), "sentencepiece.bpe.model")


@pytest.fixture(scope="module", params=list(CONFIGS))
def released(request, spm_file, tmp_path_factory):
  """(family, the toy in the released layout, its `run.py convert`)."""
  d = tmp_path_factory.mktemp(request.param)
  hf = ref.write_hf_directory(_build_torch(request.param, 5), CONFIGS[request.param], spm_file, str(d / "hf"))
  ckpt = str(d / "ckpt")
  assert cli.main(["convert", "--src", hf, "--out", ckpt]) == 0
  return request.param, hf, ckpt


def test_a_converted_checkpoint_written_back_is_the_released_file(released, tmp_path):
  name, hf, ckpt = released
  out = str(tmp_path / "hf_again")
  assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", out]) == 0
  want, _ = _safetensors(os.path.join(hf, "model.safetensors"))
  got, metadata = _safetensors(os.path.join(out, "model.safetensors"))
  assert metadata == {"format": "pt"}  # as save_pretrained writes it (transformers 4 checks it)
  mode = {f: os.stat(os.path.join(out, f)).st_mode & 0o777 for f in ("model.safetensors", "config.json")}
  assert mode["model.safetensors"] == mode["config.json"], mode  # as readable as any file the user writes
  assert sorted(got) == sorted(want)
  if name == "evf-sam2":  # EVF's name for the memory fuser's layer scale, not Meta's `gamma`
    assert "visual_model.memory_encoder.fuser.layers.0.weight" in got
  for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  cfg_in, cfg_out = (json.load(open(os.path.join(d, "config.json"))) for d in (hf, out))
  for key in ("model_type", "sam_scale", "mm_extractor_scale", "hidden_size", "out_dim", "architectures"):
    assert cfg_out[key] == cfg_in[key], key
  assert cfg_out["torch_dtype"] == "float32"
  for f in ("sentencepiece.bpe.model", "tokenizer_config.json"):
    assert open(os.path.join(out, f), "rb").read() == open(os.path.join(hf, f), "rb").read(), f


def _edited_checkpoint(ckpt: str, out: str, edit) -> str:
  """The checkpoint with its parameters (host arrays) passed through `edit`, saved as evf-jax saves a model."""
  config, params, _ = load_checkpoint(ckpt)
  save_model(out, edit(jax.tree.map(np.asarray, params)), dict(config.to_dict(), param_dtype="float32"))
  shutil.copytree(os.path.join(ckpt, TOKENIZER_DIR), os.path.join(out, TOKENIZER_DIR))
  return out


def _changed_checkpoint(ckpt: str, out: str) -> str:
  """The checkpoint with every parameter moved, as training moves them."""
  rng = np.random.default_rng(1)
  return _edited_checkpoint(ckpt, out, lambda params: jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params))


def _as_evf_fuser(fuser) -> None:
  """EVF's bundled sam2 names the fuser blocks' layer scale `weight` (PyPI sam2: `gamma`)."""
  for layer in fuser.layers:
    scale = layer.gamma
    del layer.gamma
    layer.__class__ = type("EvfCXBlock", (type(layer),), {"gamma": property(lambda self: self.weight)})
    layer.weight = scale


def _from_pretrained(name: str, directory: str):
  """The torch reference loaded as EVF-SAM's inference.py loads its model: transformers' `from_pretrained`
  (`low_cpu_mem_usage`, which renames no keys but says what it did not fill)."""
  import transformers

  class Config(transformers.PretrainedConfig):
    model_type = "evf"

  class Model(transformers.PreTrainedModel):
    config_class = Config

    def __init__(self, config):
      super().__init__(config)
      import torch
      with torch.device("cpu"):  # transformers builds on the meta device; the reference fills random weights
        inner = _build_torch(name, seed=99)  # other weights: everything must come from the file
      if name == "evf-sam2":
        _as_evf_fuser(inner.visual_model.memory_encoder.fuser)
      self.visual_model, self.mm_extractor, self.text_hidden_fcs = (inner.visual_model, inner.mm_extractor,
                                                                    inner.text_hidden_fcs)
      self.post_init()

    def _init_weights(self, module):  # keep the modules as built; the file fills them
      pass

  model, info = Model.from_pretrained(directory, low_cpu_mem_usage=True, output_loading_info=True)
  return model.eval(), info


def test_trained_weights_load_into_the_original(released, tmp_path):
  name, _, ckpt = released
  changed = _changed_checkpoint(ckpt, str(tmp_path / "trained"))
  out = str(tmp_path / "hf")
  assert cli.main(["export-hf", "--checkpoint", changed, "--out", out]) == 0
  model, info = _from_pretrained(name, out)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  config = CONFIGS[name]
  tokenizer = TextTokenizer(os.path.join(changed, TOKENIZER_DIR))
  import transformers
  hf_tok = transformers.AutoTokenizer.from_pretrained(out, use_fast=False)
  assert type(hf_tok).__name__ == "XLMRobertaTokenizer"
  for prompt in PROMPTS:
    assert hf_tok(prompt)["input_ids"] == tokenizer.encode(prompt), prompt

  hw = (70, 100)
  image = smooth_image(*hw, seed=3)
  want = []
  for prompt in PROMPTS:
    ids = np.asarray([tokenizer.encode(prompt)])
    if name == "evf-sam":
      want.append(ref.reference_predict(model, config, image, ids)[0][0])
    else:
      s = config.sam2
      want.append(ref2.reference_evf_sam2(model, ref2.sam2_input(image, s.image_size, s.pixel_mean, s.pixel_std),
                                          ref.beit_input(image, config.beit3.img_size), ids, hw)[0][0])
  p = Predictor.from_checkpoint(changed)
  p.set_image(image)
  got = p.predict(PROMPTS).logits
  err, scale = float(np.abs(got - np.stack(want)).max()), float(np.abs(np.stack(want)).max())
  print(f"[export-hf] {name}: Predictor vs the exported file in PyTorch: max abs {err:.3g} (scale {scale:.3g})")
  assert err <= 2e-5 * max(1.0, scale), (err, scale)


@pytest.mark.parametrize("released", ["evf-sam2"], indirect=True)
def test_any_size_converts_back(released, tmp_path, capsys):
  """A model of its own sizes (the default job's) is written with a note that the original cannot build it;
  `run.py convert` reads the sizes back from config.json; a bf16 file on request."""
  name, _, ckpt = released
  config, params, _ = load_checkpoint(ckpt)
  out = str(tmp_path / "hf")
  assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", out, "--precision", "bf16"]) == 0
  said = capsys.readouterr().out
  assert "note: the original" in said and "mask 0" not in said  # toy sizes; multimask_output as the original
  got, _ = _safetensors(os.path.join(out, "model.safetensors"))
  assert {str(v.dtype) for v in got.values()} == {"bfloat16"}
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  back = str(tmp_path / "back")
  assert cli.main(["convert", "--src", out, "--out", back]) == 0
  config_back, params_back, _ = load_checkpoint(back)
  assert config_back == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)):
    np.testing.assert_array_equal(np.asarray(a).astype(jax.numpy.bfloat16).astype(np.float32), b)
  # A model that decodes mask 0 (multimask_output False) is written with a note that the original picks another.
  single = str(tmp_path / "single")
  save_model(single, params, dict(config.to_dict(), param_dtype="float32", multimask_output=False))
  shutil.copytree(os.path.join(ckpt, TOKENIZER_DIR), os.path.join(single, TOKENIZER_DIR))
  assert cli.main(["export-hf", "--checkpoint", single, "--out", str(tmp_path / "hf_single")]) == 0
  assert "note: this model decodes SAM-2's mask 0" in capsys.readouterr().out


@pytest.mark.parametrize("released", ["evf-sam"], indirect=True)
def test_a_bf16_checkpoint_with_its_sentencepiece_model_alone(released, tmp_path):
  """A bf16 checkpoint is written in bfloat16 by default (its own dtype) and in float32 on request, its bfloat16
  arrays cast too. Its tokenizer folder holding only the sentencepiece model (a training run's own tokenizer),
  the export still gets the tokenizer_config.json that makes AutoTokenizer pick the slow XLM-R tokenizer."""
  import transformers
  _, hf, _ = released
  ckpt = str(tmp_path / "bf16")
  assert cli.main(["convert", "--src", hf, "--out", ckpt, "--precision", "bf16"]) == 0
  tok = os.path.join(ckpt, TOKENIZER_DIR)
  for name in os.listdir(tok):
    if name != "sentencepiece.bpe.model":
      os.remove(os.path.join(tok, name))
  for precision, dtype in ((None, "bfloat16"), ("fp32", "float32")):
    out = str(tmp_path / f"hf_{dtype}")
    flags = ["--precision", precision] if precision else []
    assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", out, *flags]) == 0
    got, _ = _safetensors(os.path.join(out, "model.safetensors"))
    assert {str(v.dtype) for v in got.values()} == {dtype}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == dtype
  hf_tok = transformers.AutoTokenizer.from_pretrained(out, use_fast=False)
  assert type(hf_tok).__name__ == "XLMRobertaTokenizer"
  assert hf_tok(PROMPTS[0])["input_ids"] == TextTokenizer(tok).encode(PROMPTS[0])


def test_released_sizes_config_json():
  """config.json of the released sizes (no models built): read as the original's (without "evf_jax") by
  `run.py convert`, it gives the same config (hidden_size is BEiT-3's width, out_dim the prompt width; the toys
  have one width for both), and no note says the original cannot build it; a released scale name over other
  sizes gets that note."""
  from convert.evf import EVF_JAX_KEY, config_from_hf
  from convert.export_hf import hf_config, original_cannot_build
  from evf_jax.beit3.config import Beit3Config
  from evf_jax.sam.config import SamConfig
  from evf_jax.sam2 import SAM2_CONFIGS
  for config, sam_part, other_sam in ((EvfConfig.preset("evf-sam"), "sam", SamConfig.preset("vit_b")),
                                      (EvfSam2Config.preset("evf-sam2"), "sam2", SAM2_CONFIGS["hiera_b+"])):
    as_original = {k: v for k, v in hf_config(config, "float32").items() if k != EVF_JAX_KEY}
    assert config_from_hf(as_original, sam2=sam_part == "sam2") == config
    assert original_cannot_build(config) is None
    for part, other in ((sam_part, other_sam), ("beit3", Beit3Config.preset("base"))):
      why = original_cannot_build(dataclasses.replace(config, **{part: other}))
      assert why and why.startswith(f"its {part} is not the released size"), why


def test_a_bucket_as_out_is_one_line(tmp_path, monkeypatch, capsys):
  """--out gs://...: refused before the checkpoint is read, not written to a local folder named "gs:"."""
  monkeypatch.chdir(tmp_path)
  line = _error(capsys, ["export-hf", "--checkpoint", str(tmp_path / "none"), "--out", "gs://bucket/hf"])
  assert line.startswith("error: --out gs://bucket/hf: a local directory is expected"), line
  assert os.listdir(tmp_path) == []


@pytest.mark.slow  # ~20 s: the full-size models' parameter shapes
def test_released_sizes_map_every_tensor():
  """Read backwards, the tables give the released files' tensor counts (SAM-H + BEiT-3-L: 1569; SAM-B +
  BEiT-3-B: 809) and one key per parameter, without building the models."""
  from convert.export_hf import rules_for
  from evf_jax.families import family_of
  for config, count in ((EvfConfig.preset("evf-sam"), 1569), (EvfConfig.preset("base"), 809),
                        (EvfSam2Config.preset("evf-sam2"), None)):
    mapping = source_mapping(family_of(config).abstract_params(config), rules_for(config))
    keys = [k for k, _ in mapping.values()]
    assert len(set(keys)) == len(keys)
    if count is not None:
      assert len(keys) == count, config.sam_scale


def _error(capsys, argv) -> str:
  assert cli.main(argv) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


@pytest.mark.parametrize("released", ["evf-sam"], indirect=True)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow warning would print a second line
def test_bad_input_is_one_line(released, tmp_path, capsys):
  _, hf, ckpt = released
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  line = _error(capsys, ["export-hf", "--checkpoint", ckpt, "--out", str(mine)])
  assert "refusing to overwrite" in line and "pass --overwrite" not in line, line  # it would not help
  assert "refusing to overwrite" in _error(capsys, ["export-hf", "--checkpoint", ckpt, "--out", str(mine),
                                                    "--overwrite"])
  assert (mine / "notes.txt").read_text() == "keep me"
  # A Hugging Face directory that is no export of ours (a download of the released model: its config.json has
  # no "evf_jax"), or whose config.json is not JSON, is never replaced, --overwrite or not.
  download = tmp_path / "download"
  shutil.copytree(hf, download)
  for config in (None, "{not json"):
    if config is not None:
      (download / "config.json").write_text(config)
    before = {f: (download / f).read_bytes() for f in os.listdir(download)}
    line = _error(capsys, ["export-hf", "--checkpoint", ckpt, "--out", str(download), "--overwrite"])
    assert "is not an evf-jax export directory; refusing to overwrite it" in line, line
    assert {f: (download / f).read_bytes() for f in os.listdir(download)} == before
  # --out under a file: refused before the checkpoint is read.
  afile = tmp_path / "afile"
  afile.write_text("x")
  assert f"{afile} is a file" in _error(capsys, ["export-hf", "--checkpoint", str(tmp_path / "none"), "--out",
                                                 str(afile / "x")])
  assert "not a converted evf-jax checkpoint" in _error(capsys, ["export-hf", "--checkpoint", hf, "--out",
                                                                 str(tmp_path / "x")])
  assert "no such checkpoint directory" in _error(capsys, ["export-hf", "--checkpoint", str(tmp_path / "none"),
                                                           "--out", str(tmp_path / "y")])
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
  # A weight beyond float16's range: fp16 refused, nothing written.
  def beyond_fp16(params):  # one element of the tensor: the rest fits
    bias = params["projector"]["fc1"]["bias"].copy()
    bias[3] = 1e5
    params["projector"]["fc1"]["bias"] = bias
    return params

  big = _edited_checkpoint(ckpt, str(tmp_path / "big"), beyond_fp16)
  line = _error(capsys, ["export-hf", "--checkpoint", big, "--out", str(tmp_path / "z"), "--precision", "fp16"])
  assert "exceed float16's range (e.g. text_hidden_fcs.0.0.bias)" in line, line
  assert not (tmp_path / "z").exists()
  # An earlier export is replaced with --overwrite.
  out = str(tmp_path / "hf")
  assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", out]) == 0
  assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", out, "--overwrite", "--precision", "bf16"]) == 0
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".old-" in p]


@pytest.mark.parametrize("released", ["evf-sam"], indirect=True)
def test_overwrite_keeps_the_users_files_and_links(released, tmp_path, capsys):
  """An earlier export that also holds the user's files is refused before the checkpoint loads, --overwrite or
  not; one reached through a symbolic link is replaced where the link points, the link kept."""
  _, _, ckpt = released
  (tmp_path / "real").mkdir()
  out = tmp_path / "real" / "hf"
  assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", str(out)]) == 0
  (out / "notes.txt").write_text("keep me")
  for extra in ([], ["--overwrite"]):
    line = _error(capsys, ["export-hf", "--checkpoint", str(tmp_path / "none"), "--out", str(out), *extra])
    assert "holds notes.txt, which an evf-jax export directory does not" in line, line
  assert (out / "notes.txt").read_text() == "keep me"
  (out / "notes.txt").unlink()
  (tmp_path / "links").mkdir()
  link = tmp_path / "links" / "hf"
  link.symlink_to(out)
  assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", str(link), "--overwrite", "--precision", "bf16"]) == 0
  assert link.is_symlink() and os.readlink(link) == str(out)
  assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
  assert os.listdir(tmp_path / "links") == ["hf"] and os.listdir(tmp_path / "real") == ["hf"]
