"""The embedded default job (`run.py demo`) runs every stage on data it makes itself."""

import json
import os

from evf_jax import cli


def test_demo_runs_end_to_end(tmp_path, capsys):
  work = str(tmp_path / "demo")
  assert cli.main(["demo", "--workdir", work, "--num-train", "6", "--num-eval", "2"]) == 0
  out = capsys.readouterr().out
  assert "[4/4]" in out and "random weights" in out
  assert os.path.isfile(os.path.join(work, "checkpoint_random_tiny", "tokenizer", "sentencepiece.bpe.model"))
  masks = [f for f in os.listdir(os.path.join(work, "predict")) if f.endswith("_mask.png")]
  assert masks
  result = json.load(open(os.path.join(work, "eval", "synthetic_val.json")))
  assert result["images"] == 2 and result["sentences"] > 0
  assert 0.0 <= result["giou"] <= 1.0 and 0.0 <= result["ciou"] <= 1.0
  # A second run reuses the data and the checkpoint.
  assert cli.main(["demo", "--workdir", work, "--num-train", "6", "--num-eval", "2"]) == 0
  assert "using the checkpoint" in capsys.readouterr().out
