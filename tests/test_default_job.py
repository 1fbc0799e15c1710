"""The default job (`run.py synthetic`, what `scripts/run_default.sh` runs), reduced: 40 held-out images, 800
steps. Slow tier: besides its steps one run spends ~3 minutes of the 2 cores on data, compiles (initialiser,
step, evaluation, baseline, predictor) and baselines (docs/default_job.md#time), more than the default tier has
to spare. It trains from scratch on the generated set, and the trained model reads the text: its held-out cIoU is
well above both text-blind baselines (the same model with an empty prompt; every object). It also predicts,
draws its picture and resumes."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import precision_accuracy
from evf_jax import cli

CONFIG = '''from evf_jax.train import config as train_config

import importlib.util, os
_spec = importlib.util.spec_from_file_location("synthetic", os.path.join({repo!r}, "configs", "train", "synthetic.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def get_config(arg=None):
  c = _module.get_config()
  c.data.synthetic.num_eval = 40
  c.data.root = {data!r}  # outside the workdir: evaluation and prediction must read it there too
  return c
'''


@pytest.mark.slow
def test_the_default_job_learns_to_read(tmp_path, capsys):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = tmp_path / "reduced.py"
  config.write_text(CONFIG.format(repo=repo, data=str(tmp_path / "data")))
  work = tmp_path / "job"
  assert cli.main(["synthetic", "--workdir", str(work), "--config", str(config), "--steps", "800",
                   "--no-progress"]) == 0
  out = capsys.readouterr().out
  results = json.load(open(work / "results.json"))
  model, blind, every = (results[k]["ciou"] for k in ("EVF-SAM (trained here)", "text-blind: same model, empty prompt",
                                                      "text-blind: every object"))
  print(f"\nreduced default job: cIoU {model:.3f}, empty prompt {blind:.3f}, every object {every:.3f}")
  assert model > max(blind, every) + 0.05, results
  assert (work / "results.png").stat().st_size > 10_000
  assert len(list((work / "predict").glob("*_mask.png"))) == 4
  assert "EVF-SAM (trained here)" in out
  assert (tmp_path / "data" / "synthetic").is_dir() and not (work / "data").exists()
  # Run again: nothing to train; the export evaluated afresh gives the training run's numbers.
  assert cli.main(["synthetic", "--workdir", str(work), "--config", str(config), "--steps", "800",
                   "--no-progress"]) == 0
  again = json.load(open(work / "results.json"))
  for name, r in results.items():
    assert again[name]["ciou"] == pytest.approx(r["ciou"], abs=1e-4), name
  # bf16 inference of the trained model: nearly every mask pixel as in float32.
  r = precision_accuracy.compare(str(work / "export"), str(tmp_path / "data" / "synthetic"), images=3)
  assert r["fp32"]["sentences"] == r["bf16"]["sentences"] > 0
  assert r["agreement"]["pixels"] > 0.99, r
  assert abs(r["bf16"]["ciou"] - r["fp32"]["ciou"]) < 0.05, r
