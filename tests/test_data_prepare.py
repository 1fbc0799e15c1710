"""`run.py prepare` on tiny fixtures in every raw format: masks, prompt rules, splits, bad inputs.

Each builds the dataset's TFDS builder (data_pipelines/tfds_builders) and reads it back: the round trip of
every builder on its fixture."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import records, sources
from evf_jax import cli
from evf_testing import data_fixtures as F

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prepare(tmp_path, dataset, writer, *writer_args):
  src, data_dir = str(tmp_path / "raw"), str(tmp_path / "tfds")
  writer(src, *writer_args)
  assert cli.main(["prepare", "--dataset", dataset, "--src", src, "--data_dir", data_dir, "--no-progress"]) == 0
  out = os.path.join(data_dir, dataset.replace("+", "plus"))  # DATA_DIR/NAME: the newest version in it
  return out, sources.describe(out)


def _by_text(recs):
  return {e.text: (r, e) for r in recs for e in r.entries}


@pytest.mark.parametrize("dataset", ["refcoco", "refcoco+", "refcocog", "refclef"])
def test_refer_family(tmp_path, dataset):
  out, meta = _prepare(tmp_path, dataset, F.write_refer, dataset)
  assert meta["skipped"] == {"corrupt_image": 1}  # image 4 is a broken JPEG: skipped and counted
  assert {k: v["images"] for k, v in meta["splits"].items()} == {"train": 1, "val": 1, "testA": 1}
  anns = {a["id"]: a for a in F.refer_annotations()}
  train = _by_text(records.read_records(out, "train"))
  assert set(train) == {"Left Man", "the guy in red", "dog on the right"}  # train text verbatim
  for text, ann_id in (("Left Man", 1), ("the guy in red", 1), ("dog on the right", 2)):
    rec, entry = train[text]
    h, w = F.REFER_IMAGES[rec_id := int(rec.image_id)]
    assert (rec.h, rec.w) == (h, w) and rec_id == anns[ann_id]["image_id"]
    expected = F.reference_mask(anns[ann_id]["segmentation"], h, w)
    if dataset == "refclef":  # stored as RLE in the fixture, built from the same polygons
      expected = F.reference_mask([F.rle_of(F.reference_mask(anns[ann_id]["segmentation"], h, w))], h, w)
    np.testing.assert_array_equal(rec.mask(entry.mask_index), expected)
    assert entry.ids["ann_ids"] == [ann_id]
  assert train["Left Man"][1].mask_index == train["the guy in red"][1].mask_index  # one mask per ref
  # Eval splits: every sentence, strip().lower(); empty segmentation -> all-zero mask.
  (val,) = records.read_records(out, "val")
  assert [e.text for e in val.entries] == ["the empty one"] and not val.mask(0).any()
  (test_a,) = records.read_records(out, "testA")
  assert [e.text for e in test_a.entries] == ["big box", "square thing"]


def test_grefcoco_union_and_no_target(tmp_path):
  out, _ = _prepare(tmp_path, "grefcoco", F.write_refer, "grefcoco")
  train = _by_text(records.read_records(out, "train"))
  anns = {a["id"]: a for a in F.refer_annotations()}
  rec, e = train["Left Man"]
  union = np.maximum(F.reference_mask(anns[1]["segmentation"], 48, 64), F.reference_mask(anns[2]["segmentation"], 48, 64))
  np.testing.assert_array_equal(rec.mask(e.mask_index), union)
  rec, e = train["dog on the right"]
  assert e.ids["ann_ids"] == [-1] and not rec.mask(e.mask_index).any()


def test_ade20k_label_shift_and_prefix(tmp_path):
  out, meta = _prepare(tmp_path, "ade20k", F.write_ade20k)
  assert set(meta["splits"]) == {"train", "validation"}
  (rec,) = records.read_records(out, "train")
  lab = F.ade_label()
  got = {e.text: (e.ids["class_id"], rec.mask(e.mask_index)) for e in rec.entries}
  assert set(got) == {"[semantic] wall", "[semantic] person", "[semantic] flag"}  # raw 0 is never a prompt
  for text, raw in (("[semantic] wall", 1), ("[semantic] person", 13), ("[semantic] flag", 150)):
    assert got[text][0] == raw - 1
    np.testing.assert_array_equal(got[text][1], (lab == raw).astype(np.uint8))


def test_humanparsing_includes_background_viewer_side(tmp_path):
  out, _ = _prepare(tmp_path, "humanparsing", F.write_humanparsing)
  (rec,) = records.read_records(out, "train")
  lab = F.humanparsing_label()
  got = {e.text: rec.mask(e.mask_index) for e in rec.entries}
  assert set(got) == {"[semantic] background", "[semantic] right shoe", "[semantic] left arm"}
  np.testing.assert_array_equal(got["[semantic] background"], (lab == 0).astype(np.uint8))
  np.testing.assert_array_equal(got["[semantic] left arm"], (lab == 15).astype(np.uint8))


def test_obj365_rle_and_name_as_stored(tmp_path):
  out, _ = _prepare(tmp_path, "obj365", F.write_obj365)
  (rec,) = records.read_records(out, "train")
  assert [e.text for e in rec.entries] == ["Person"]
  np.testing.assert_array_equal(rec.mask(0), F.o365_mask())


@pytest.mark.parametrize("dataset,writer,texts", [
    ("partimagenet", F.write_partimagenet, ("[semantic] quadruped head", "[semantic] quadruped body")),
    ("pascal_part", F.write_pascal_part, ("[semantic] cat head", "[semantic] potted plant pot")),
])
def test_parts_merged_per_category(tmp_path, dataset, writer, texts):
  out, _ = _prepare(tmp_path, dataset, writer)
  (rec,) = records.read_records(out, "train")
  got = {e.text: rec.mask(e.mask_index) for e in rec.entries}
  assert set(got) == set(texts)
  coco = F.part_coco(["a", "b"], "x")
  head = np.maximum(F.reference_mask(coco["annotations"][0]["segmentation"], 40, 40),
                    F.reference_mask(coco["annotations"][1]["segmentation"], 40, 40))
  np.testing.assert_array_equal(got[texts[0]], head)  # two instances -> one semantic mask
  # The broken annotation (id 4) is skipped; the category keeps its valid instance.
  np.testing.assert_array_equal(got[texts[1]], F.reference_mask(coco["annotations"][2]["segmentation"], 40, 40))


def test_missing_files_listed_in_one_line(tmp_path, capsys):
  src = tmp_path / "raw"
  (src / "refcoco").mkdir(parents=True)
  assert cli.main(["prepare", "--dataset", "refcoco", "--src", str(src), "--data_dir", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: refcoco: missing")
  for name in ("refs(unc).p", "instances.json", "images/mscoco/images/train2014"):
    assert name in err[0]
  assert not (tmp_path / "o" / "refcoco").exists()


def test_malicious_pickle_is_refused(tmp_path, capsys):
  src = str(tmp_path / "raw")
  F.write_refer(src, "refcoco")

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path / 'pwned'}",))

  with open(os.path.join(src, "refcoco", "refs(unc).p"), "wb") as f:
    pickle.dump([Evil()], f, protocol=2)
  assert cli.main(["prepare", "--dataset", "refcoco", "--src", src, "--data_dir", str(tmp_path / "o")]) == 2
  assert "refusing to load global" in capsys.readouterr().err
  assert not (tmp_path / "pwned").exists()


def test_cli_subprocess_exit_codes_and_no_overwrite(tmp_path):
  data_dir = str(tmp_path / "tfds")
  run = lambda *a: subprocess.run([sys.executable, "run.py", "prepare", *a], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)
  ok = run("--dataset", "synthetic", "--data_dir", data_dir, "--num-train", "6", "--num-eval", "2", "--seed", "3")
  assert ok.returncode == 0, ok.stderr
  assert "train: 6 images" in ok.stdout
  assert "tensorflow" not in ok.stderr.lower()  # TFDS built ArrayRecord without TensorFlow
  again = run("--dataset", "synthetic", "--data_dir", data_dir)
  assert again.returncode == 2
  path = os.path.join(data_dir, "synthetic", "1.0.0")
  assert again.stderr.strip().splitlines() == [f"error: {path} already exists; choose another --data_dir or remove it"]
  missing = run("--dataset", "ade20k", "--src", str(tmp_path / "nope"), "--data_dir", str(tmp_path / "o2"))
  assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_synthetic_prepare_matches_generator(tmp_path):
  from data_pipelines import synthetic
  data_dir = str(tmp_path / "tfds")
  assert cli.main(["prepare", "--dataset", "synthetic", "--data_dir", data_dir, "--num-train", "5", "--num-eval",
                   "3", "--seed", "9", "--no-progress"]) == 0
  meta = sources.describe(os.path.join(data_dir, "synthetic"))
  assert meta["seed"] == 9 and meta["splits"]["train"]["images"] == 5 and meta["splits"]["val"]["images"] == 3
  want = [synthetic.make_example(9, "train", i) for i in range(5)]
  assert meta["splits"]["train"]["prompts"] == sum(len(r.entries) for r in want)
  recs = records.read_records(os.path.join(data_dir, "synthetic"), "train")
  assert [records.serialize(r) for r in recs] == [records.serialize(r) for r in want]
  # tfds.data_source with split slicing, in file order
  sliced = sources.read_records(sources.TfdsDataset("synthetic", data_dir), "train[2:4]")
  assert [r.image_id for r in sliced] == ["train-2", "train-3"]


def test_old_format_still_written_read_with_a_warning_and_converted(tmp_path):
  old = str(tmp_path / "old")
  with pytest.warns(DeprecationWarning, match="old prepared format"):
    assert cli.main(["prepare", "--dataset", "synthetic", "--out", old, "--num-train", "3", "--num-eval", "1",
                     "--seed", "2", "--no-progress"]) == 0
  with pytest.warns(DeprecationWarning, match="run.py prepare"):
    legacy = [records.serialize(r) for r in sources.read_records(old, "train")]
  data_dir = str(tmp_path / "tfds")
  # One command converts it: the old directory is the builder's manual dir.
  assert cli.main(["prepare", "--dataset", "synthetic", "--src", old, "--data_dir", data_dir]) == 2  # generated set
  assert cli.main(["prepare", "--dataset", "refcoco", "--src", old, "--data_dir", data_dir, "--no-progress"]) == 2
  src = str(tmp_path / "raw")
  F.write_refer(src, "refcoco")
  with pytest.warns(DeprecationWarning):
    assert cli.main(["prepare", "--dataset", "refcoco", "--src", src, "--out", str(tmp_path / "oldref"),
                     "--no-progress"]) == 0
  assert cli.main(["prepare", "--dataset", "refcoco", "--src", str(tmp_path / "oldref"), "--data_dir", data_dir,
                   "--no-progress"]) == 0
  for split in ("train", "val", "testA"):
    assert ([records.serialize(r) for r in records.read_records(str(tmp_path / "oldref"), split)]
            == [records.serialize(r) for r in sources.read_records(os.path.join(data_dir, "refcoco"), split)])
  assert legacy == [records.serialize(synthetic_example) for synthetic_example in _synthetic(2, 3)]


def _synthetic(seed, n):
  from data_pipelines import synthetic
  return [synthetic.make_example(seed, "train", i) for i in range(n)]
