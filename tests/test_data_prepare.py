"""`run.py prepare` on tiny fixtures in every raw format: masks, prompt rules, splits, bad inputs.

Each builds the dataset's TFDS builder (data_pipelines/tfds_builders) and reads it back: the round trip of
every builder on its fixture."""

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from data_pipelines import records, sources
from evf_jax import cli
from evf_testing import data_fixtures as F

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
  assert train["the guy in red"][1].ids == {"ref_id": 10, "sent_id": 101, "ann_ids": [1]}  # traceable to the source
  # Eval splits: every sentence, strip().lower(); empty segmentation -> all-zero mask.
  (val,) = records.read_records(out, "val")
  assert [e.text for e in val.entries] == ["the empty one"] and not val.mask(0).any()
  (test_a,) = records.read_records(out, "testA")
  assert [e.text for e in test_a.entries] == ["big box", "square thing"]
  # The fixture writes where REFER_DATASETS says: hold that table to the documented layout (docs/data.md#21).
  refs = "refs(umd).p" if dataset == "refcocog" else "refs(unc).p"
  images = "images/saiapr_tc-12" if dataset == "refclef" else "images/mscoco/images/train2014"
  assert (tmp_path / "raw" / dataset / refs).is_file() and (tmp_path / "raw" / images).is_dir()


def test_refer_eval_split_semantics():
  """REFER's test splits select refs whose split contains the letter: a "testAB" ref is in testA and testB."""
  from data_pipelines import readers
  assert readers._eval_split_names("testAB") == ["testA", "testB"]
  assert readers._eval_split_names("testA") == ["testA"] and readers._eval_split_names("val") == ["val"]


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


def test_index_png_label_map_ids_are_its_indices(tmp_path):
  """HumanParsing's label maps are index ("P") PNGs with a colour palette: the ids are the indices, not the
  palette's colours or their luma (the other fixtures' maps are grey "L" PNGs)."""
  from PIL import Image

  def write(src):
    F.write_humanparsing(src)
    im = Image.fromarray(F.humanparsing_label(), mode="P")
    im.putpalette(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tobytes())
    im.save(os.path.join(src, "SegmentationClassAug", "hp_1.png"))
  out, _ = _prepare(tmp_path, "humanparsing", write)
  (rec,) = records.read_records(out, "train")
  got = {e.text: rec.mask(e.mask_index) for e in rec.entries}
  assert set(got) == {"[semantic] background", "[semantic] right shoe", "[semantic] left arm"}
  np.testing.assert_array_equal(got["[semantic] right shoe"], (F.humanparsing_label() == 9).astype(np.uint8))


def _obj365_with_a_polygon(src):
  F.write_obj365(src)
  path = os.path.join(src, "raw", "Objects365_v1", "2019-08-02", "o365_res_instances.json")
  _edit_json(path, lambda d: (d["categories"].append({"id": 4, "name": "Dog"}), d["annotations"].append(
      {"id": 71, "image_id": 7, "category_id": 4, "segmentation": [F.rect_poly(1, 1, 9, 9)], "iscrowd": 0})))


def test_obj365_rle_and_name_as_stored(tmp_path):
  # A polygon annotation is skipped (the original takes only a compressed-RLE dict in segmentation[0]).
  out, _ = _prepare(tmp_path, "obj365", _obj365_with_a_polygon)
  (rec,) = records.read_records(out, "train")
  assert [e.text for e in rec.entries] == ["Person"]
  assert rec.entries[0].ids == {"ann_ids": [70], "class_id": 3}  # the annotation's id and its category's
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


def test_class_tables_hold_the_documented_ids():
  """A swapped pair in a class table silently trains one class's masks under another's name. HumanParsing: the
  table of docs/data.md#24-humanparsing; ADE20K: ids of the SceneParsing objectInfo150 list (raw value k = k-th)."""
  from data_pipelines import readers
  with open(os.path.join(ROOT, "docs", "data.md")) as f:
    doc = f.read().split("### 2.4 HumanParsing")[1].split("### 2.5")[0]
  documented = dict(re.findall(r"(\d+) \| ([a-z][a-z ]*[a-z]) \|", doc))
  assert len(documented) == 18
  assert {str(i): name for i, name in enumerate(readers.HUMANPARSING_CLASSES)} == documented
  known = {1: "wall", 2: "building", 3: "sky", 4: "floor", 5: "tree", 13: "person", 15: "door", 20: "chair",
           21: "car", 81: "bus", 84: "truck", 91: "airplane", 149: "clock", 150: "flag"}
  assert len(readers.ADE20K_CLASSES) == len(set(readers.ADE20K_CLASSES)) == 150
  assert {k: readers.ADE20K_CLASSES[k - 1] for k in known} == known


@pytest.mark.parametrize("dataset", ["partimagenet", "pascal_part"])
def test_parts_every_split_from_its_own_files(tmp_path, dataset):
  """PartImageNet reads train, val and test (each from images/<split>/), Pascal-Part train and val: a split left
  out, or read from another split's images, would go unnoticed with train alone."""
  src = tmp_path / "raw"
  splits = ("train", "val", "test") if dataset == "partimagenet" else ("train", "val")
  for k, split in enumerate(splits):
    name = f"{split}_1.jpg"  # another image per split, of another size
    if dataset == "partimagenet":
      image, ann = src / "images" / split / name, src / "annotations" / split / f"{split}.json"
    else:
      image, ann = src / "VOCdevkit" / "VOC2010" / "JPEGImages" / name, src / f"{split}.json"
    F.save_jpeg(str(image), 40, 40 + k, k)
    coco = F.part_coco(["a:b", "c:d", "e:f"], name)
    coco["images"][0]["width"] = 40 + k
    # "e:f" has one annotation, a polygon of 2 points: no area, so no prompt (never an all-zero mask)
    coco["annotations"].append({"id": 5, "image_id": 1, "category_id": 2, "segmentation": [[1, 1, 9, 9]]})
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(coco))
  out, meta = _prepare(tmp_path, dataset, lambda s: None)
  assert sorted(meta["splits"]) == sorted(splits) and meta["skipped"] == {}
  for k, split in enumerate(splits):
    (rec,) = records.read_records(out, split)
    assert (rec.h, rec.w) == (40, 40 + k) and len(rec.entries) == 2


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


def test_synthetic_prepare_matches_generator(tmp_path, monkeypatch):
  from data_pipelines import synthetic
  data_dir = str(tmp_path / "tfds")
  system_tmp = tmp_path / "system_tmp"  # TFDS's bucket lookup left an empty directory here per builder
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  assert cli.main(["prepare", "--dataset", "synthetic", "--data_dir", data_dir, "--num-train", "5", "--num-eval",
                   "3", "--seed", "9", "--no-progress"]) == 0
  assert list(system_tmp.iterdir()) == []
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


# ---------------------------------------------------------------- bad inputs: one line, exit status 2

def _fails(capsys, *argv) -> str:
  """Runs `prepare` expecting a user error; returns its one line."""
  assert cli.main(["prepare", *argv, "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def _edit_json(path, edit):
  import json
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)


def test_old_format_dir_of_the_same_name_is_refused(tmp_path, capsys):
  # sources.locate prefers DATA/NAME/meta.json: a TFDS dataset built inside it would never be read.
  data_dir = tmp_path / "data"
  with pytest.warns(DeprecationWarning):
    assert cli.main(["prepare", "--dataset", "synthetic", "--out", str(data_dir / "synthetic"), "--num-train", "2",
                     "--num-eval", "1", "--no-progress"]) == 0
  err = _fails(capsys, "--dataset", "synthetic", "--data_dir", str(data_dir), "--num-train", "1", "--num-eval", "1")
  assert "old prepared format" in err and "another --data_dir" in err
  assert not (data_dir / "synthetic" / "1.0.0").exists()
  # Converting in place is the same mistake.
  (data_dir / "refcoco").mkdir()
  records.write_meta(str(data_dir / "refcoco"), {"dataset": "refcoco", "splits": {}})
  err = _fails(capsys, "--dataset", "refcoco", "--src", str(data_dir / "refcoco"), "--data_dir", str(data_dir))
  assert "old prepared format" in err
  assert os.listdir(data_dir / "refcoco") == ["meta.json"]


def test_refs_not_in_instances_are_skipped_and_counted_not_zero_masks(tmp_path, capsys):
  src = str(tmp_path / "raw")
  F.write_refer(src, "refcoco")
  inst = os.path.join(src, "refcoco", "instances.json")
  _edit_json(inst, lambda d: d.update(annotations=[a for a in d["annotations"] if a["id"] != 2]))
  assert cli.main(["prepare", "--dataset", "refcoco", "--src", src, "--data_dir", str(tmp_path / "o"),
                   "--no-progress"]) == 0
  out = str(tmp_path / "o" / "refcoco")
  assert sources.describe(out)["skipped"] == {"ann_not_in_instances": 1, "corrupt_image": 1}
  assert set(_by_text(records.read_records(out, "train"))) == {"Left Man", "the guy in red"}  # ref 11 left out
  # An image missing from instances.json is counted; here it empties testA, which stops the build.
  _edit_json(inst, lambda d: d.update(images=[im for im in d["images"] if im["id"] != 3]))
  err = _fails(capsys, "--dataset", "refcoco", "--src", src, "--data_dir", str(tmp_path / "o2"))
  assert err == "error: refcoco: split testA: every image was skipped (image_not_in_instances 1)"
  # Most refs unresolvable: an instances.json of another download, refused naming both files.
  _edit_json(inst, lambda d: d.update(annotations=[a for a in d["annotations"] if a["id"] > 3]))
  err = _fails(capsys, "--dataset", "refcoco", "--src", src, "--data_dir", str(tmp_path / "o3"))
  assert "4 of 5 refs" in err and "image (1) or annotation (3)" in err and inst in err
  assert not (tmp_path / "o2" / "refcoco").exists() and not (tmp_path / "o3" / "refcoco").exists()


def test_grefcoco_list_naming_one_missing_annotation_is_skipped(tmp_path):
  """A gRefCOCO ann_id list is skipped when any of its ids (not -1) is missing, not only when all are
  (docs/data.md#21-refcoco-family): the union of the rest would be a wrong mask, or fail the build."""
  src = str(tmp_path / "raw")
  F.write_refer(src, "grefcoco")
  _edit_json(os.path.join(src, "grefcoco", "grefs(unc).json"), lambda refs: refs[0].update(ann_id=[1, 99]))
  out, meta = _prepare(tmp_path, "grefcoco", lambda s: None)
  assert meta["skipped"] == {"ann_not_in_instances": 1, "corrupt_image": 1}
  assert set(_by_text(records.read_records(out, "train"))) == {"dog on the right"}  # ref 10's sentences left out


def test_colour_label_map_skipped_grey_rgb_accepted(tmp_path, capsys):
  from PIL import Image
  src = str(tmp_path / "raw")
  F.write_humanparsing(src)
  label_png = os.path.join(src, "SegmentationClassAug", "hp_1.png")
  lab = F.humanparsing_label()
  Image.fromarray(np.stack([lab] * 3, axis=-1)).save(label_png)  # grey RGB: the same ids
  out, _ = _prepare(tmp_path, "humanparsing", lambda s: None)
  (rec,) = records.read_records(out, "train")
  got = {e.text: rec.mask(e.mask_index) for e in rec.entries}
  np.testing.assert_array_equal(got["[semantic] left arm"], (lab == 15).astype(np.uint8))
  for k, colour in enumerate(([lab * 10, lab, np.zeros_like(lab)], [lab, lab, lab * 2])):  # R = G, B differs
    Image.fromarray(np.stack(colour, axis=-1)).save(label_png)  # a colour map: its luma is no label id
    err = _fails(capsys, "--dataset", "humanparsing", "--src", src, "--data_dir", str(tmp_path / f"o{k + 2}"))
    assert err == "error: humanparsing: split train: every image was skipped (corrupt_label_map 1)"


def _truncate(path, n):
  with open(path, "r+b") as f:
    f.truncate(n)


def _pickle_dict(path):
  with open(path, "wb") as f:
    pickle.dump({"refs": []}, f, protocol=2)


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


@pytest.mark.parametrize("name,breaks,message", [
    ("refs(unc).p", lambda p: _truncate(p, 100), "not a complete pickle (UnpicklingError"),
    ("refs(unc).p", lambda p: _truncate(p, 0), "not a complete pickle (EOFError"),
    ("refs(unc).p", _pickle_dict, "expected a list of refs, found dict"),
    ("instances.json", lambda p: _write(p, "{}"), 'expected a COCO-style object with "images"'),
    ("instances.json", lambda p: _write(p, "[]"), 'expected a COCO-style object with "images"'),
])
def test_unreadable_refer_annotations_name_the_file(tmp_path, capsys, name, breaks, message):
  src = str(tmp_path / "raw")
  F.write_refer(src, "refcoco")
  path = os.path.join(src, "refcoco", name)
  breaks(path)
  err = _fails(capsys, "--dataset", "refcoco", "--src", src, "--data_dir", str(tmp_path / "o"))
  assert path in err and message in err


def test_obj365_unknown_category_names_the_file(tmp_path, capsys):
  src = str(tmp_path / "raw")
  F.write_obj365(src)
  path = os.path.join(src, "raw", "Objects365_v1", "2019-08-02", "o365_res_instances.json")
  _edit_json(path, lambda d: d.update(categories=[{"id": 9, "name": "Dog"}]))
  err = _fails(capsys, "--dataset", "obj365", "--src", src, "--data_dir", str(tmp_path / "o"))
  assert err == f'error: {path}: annotations name 1 category_id(s) not in "categories": 3'


def test_split_with_every_image_skipped_says_why(tmp_path, capsys):
  src = str(tmp_path / "raw")
  F.write_refer(src, "refcoco")
  os.remove(os.path.join(src, "images/mscoco/images/train2014/COCO_train2014_000000000002.jpg"))  # all of val
  (tmp_path / "o").mkdir()  # the user's, empty
  err = _fails(capsys, "--dataset", "refcoco", "--src", src, "--data_dir", str(tmp_path / "o"))
  assert err == "error: refcoco: split val: every image was skipped (missing_image 1)"
  assert os.listdir(tmp_path / "o") == []  # the folders the build made are gone, the user's folder is not
  with pytest.warns(DeprecationWarning):  # the old format's writer says the same
    err = _fails(capsys, "--dataset", "refcoco", "--src", src, "--out", str(tmp_path / "old"))
  assert err == "error: refcoco: split val: every image was skipped (missing_image 1)"
  assert not (tmp_path / "old").exists() and not (tmp_path / "old.partial").exists()


def test_images_whose_annotations_do_not_fit_are_skipped(tmp_path, capsys):
  """An image whose size is not the one instances.json states (e.g. EXIF-rotated after annotation) is skipped:
  its polygons would be drawn on the wrong geometry. An image with no prompt (an ADE20K map of only "other") is
  skipped too, not written as a sample with nothing to learn."""
  src = str(tmp_path / "raw")
  F.write_refer(src, "refcoco")
  _edit_json(os.path.join(src, "refcoco", "instances.json"),
             lambda d: d["images"][0].update(height=64, width=48))  # image 1 is 48 x 64
  err = _fails(capsys, "--dataset", "refcoco", "--src", src, "--data_dir", str(tmp_path / "o"))
  assert err == "error: refcoco: split train: every image was skipped (corrupt_image 1, image_size_mismatch 1)"
  F.write_ade20k(str(tmp_path / "ade"))
  F.save_label_png(str(tmp_path / "ade" / "annotations" / "validation" / "ADE_val_1.png"), np.zeros((40, 52)))
  err = _fails(capsys, "--dataset", "ade20k", "--src", str(tmp_path / "ade"), "--data_dir", str(tmp_path / "o"))
  assert err == "error: ade20k: split validation: every image was skipped (no_prompts 1)"


def test_bad_output_dirs_are_one_line(tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  synthetic = ("--dataset", "synthetic", "--num-train", "1", "--num-eval", "1")
  assert "is a file" in _fails(capsys, *synthetic, "--data_dir", str(a_file))
  assert f"{a_file} is a file" in _fails(capsys, *synthetic, "--data_dir", str(a_file / "sub"))
  assert "prepare writes local directories" in _fails(capsys, *synthetic, "--data_dir", "gs://bucket/data")
  with pytest.warns(DeprecationWarning):
    assert "is a file" in _fails(capsys, *synthetic, "--out", str(a_file / "sub"))
    assert "prepare writes local directories" in _fails(capsys, *synthetic, "--out", "gs://bucket/old")
  assert not os.path.exists("gs:") and sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.parametrize("flags,named", [
    (("--num-train", "0"), "--num-train"), (("--num-eval", "-2"), "--num-eval"), (("--seed", "-1"), "--seed"),
    (("--records-per-shard", "0"), "--records-per-shard"),
])
@pytest.mark.parametrize("where", ["--data_dir", "--out"])
def test_synthetic_sizes_and_seed_checked_up_front(tmp_path, capsys, flags, named, where):
  assert named in _fails(capsys, "--dataset", "synthetic", where, str(tmp_path / "o"), *flags)
  assert not (tmp_path / "o").exists()


def test_flags_that_would_do_nothing_are_refused(tmp_path, capsys):
  """A number given where nothing reads it (it was ignored): synthetic's sizes and seed for a dataset read from
  --src, --records-per-shard for a TFDS build (TFDS shards it)."""
  line = _fails(capsys, "--dataset", "refcoco", "--src", str(tmp_path), "--data_dir", str(tmp_path / "o"),
                "--num-train", "5", "--seed", "1")
  assert "--num-train, --seed: for --dataset synthetic only" in line, line
  line = _fails(capsys, "--dataset", "synthetic", "--data_dir", str(tmp_path / "o"), "--records-per-shard", "10")
  assert "--records-per-shard is for the deprecated --out only" in line, line
  assert not (tmp_path / "o").exists()


def test_old_format_out_of_the_users_or_left_by_a_killed_run(tmp_path, capsys):
  """The deprecated --out: a directory holding the user's files is refused in one line before anything is
  written (the final rename failed with a traceback after the work), and the `.partial` folder a killed run left
  is replaced by the next run (its makedirs failed with a traceback)."""
  synthetic = ("--dataset", "synthetic", "--num-train", "1", "--num-eval", "1")
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("mine")
  with pytest.warns(DeprecationWarning):
    err = _fails(capsys, *synthetic, "--out", str(mine))
  assert err == f"error: {mine} already exists and is not empty; choose another --out or remove it"
  assert os.listdir(mine) == ["notes.txt"] and os.listdir(tmp_path) == ["mine"]
  (tmp_path / "old.partial").mkdir()  # what a SIGKILLed run leaves
  (tmp_path / "old.partial" / "leftover").write_bytes(b"cut off")
  with pytest.warns(DeprecationWarning):
    assert cli.main(["prepare", *synthetic, "--out", str(tmp_path / "old"), "--no-progress"]) == 0
  assert sorted(os.listdir(tmp_path)) == ["mine", "old"] and "leftover" not in os.listdir(tmp_path / "old")
  with pytest.warns(DeprecationWarning):
    assert len(sources.read_records(str(tmp_path / "old"), "train")) == 1


def test_stale_incomplete_folders_of_a_killed_run_are_removed(tmp_path):
  name_dir = tmp_path / "data" / "synthetic"
  (name_dir / "incomplete.5TSI2O_1.0.0").mkdir(parents=True)  # what a SIGKILLed build leaves
  (name_dir / "incomplete.5TSI2O_1.0.0" / "synthetic-train.array_record-00000-of-00001").write_bytes(b"x")
  (name_dir / "notes").mkdir()  # anything else is left alone
  assert cli.main(["prepare", "--dataset", "synthetic", "--data_dir", str(tmp_path / "data"), "--num-train", "1",
                   "--num-eval", "1", "--no-progress"]) == 0
  assert sorted(os.listdir(name_dir)) == ["1.0.0", "notes"]


# ---------------------------------------------------------------- your own data

def _prepare_custom(tmp_path, name="mine"):
  src, data_dir = str(tmp_path / "raw"), str(tmp_path / "tfds")
  F.write_custom(src)
  assert cli.main(["prepare", "--dataset", "custom", "--name", name, "--src", src, "--data_dir", data_dir,
                   "--no-progress"]) == 0
  return os.path.join(data_dir, name)


def test_custom_dataset_masks_texts_and_splits(tmp_path, capsys):
  out = _prepare_custom(tmp_path)
  assert "skipped: missing_image 1, missing_mask 1" in capsys.readouterr().out
  meta = sources.describe(out)
  assert meta["dataset"] == "mine" and meta["format"] == "custom"
  assert {k: (v["images"], v["prompts"]) for k, v in meta["splits"].items()} == {"train": (2, 5), "val": (1, 1)}
  expected = F.custom_masks()
  train = records.read_records(out, "train")
  assert [r.image_id for r in train] == ["img/a.jpg", "7"] and {r.source for r in train} == {"mine"}
  texts = _by_text(train)
  assert set(texts) == {"the Red box", "box at the top", "[semantic] blob", "the triangle", "a square"}
  for text, (rec, entry) in texts.items():
    first = "the Red box" if text == "box at the top" else text
    np.testing.assert_array_equal(rec.mask(entry.mask_index), expected[first], err_msg=text)
  assert texts["box at the top"][1].mask_index == texts["the Red box"][1].mask_index  # one mask, two texts
  assert texts["the triangle"][1].ids == {"line": 1, "object": 2}
  (val,) = records.read_records(out, "val")
  assert [e.text for e in val.entries] == ["The Small Thing"]  # kept as written outside train too
  np.testing.assert_array_equal(val.mask(0), expected["The Small Thing"])  # an uncompressed RLE


def _png_rgb16(rgb: np.ndarray) -> bytes:
  """A 16-bit RGB PNG (Pillow cannot write one): signature, IHDR, one IDAT of filter-0 rows, IEND."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  h, w = rgb.shape[:2]
  rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_custom_mask_images_as_drawing_tools_write_them(tmp_path, capsys):
  """Lossy JPEG masks, cut-outs on a transparent background, palette transparency, a byte-order mark, colour in
  any channel, opaque RGBA (its colours), palette indices; colour modes a mask cannot be (16-bit colour, which
  Pillow reads as its high byte, and CMYK) are skipped and counted."""
  from PIL import Image
  src = tmp_path / "raw"
  (src / "m").mkdir(parents=True)
  F.save_jpeg(str(src / "a.jpg"), 30, 40, 0)
  box = np.zeros((30, 40), np.uint8)
  box[4:20, 6:30] = 1
  Image.fromarray(box * 255).save(src / "m" / "jpeg.jpg", quality=60)  # its noise makes the background nonzero
  cutout = np.full((30, 40, 4), 255, np.uint8)  # white where transparent, opaque red on the object
  cutout[..., 3] = box * 255
  cutout[box == 1, :3] = (200, 0, 0)
  Image.fromarray(cutout, mode="RGBA").save(src / "m" / "cutout.png")
  palette = Image.fromarray(np.where(box == 1, 0, 1).astype(np.uint8), mode="P")  # index 0 is the object here
  palette.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
  palette.info["transparency"] = 1
  palette.save(src / "m" / "palette.png", transparency=1)
  Image.fromarray(np.stack([box * 255] * 3, -1)).convert("CMYK").save(src / "m" / "cmyk.jpg")
  (src / "m" / "rgb16.png").write_bytes(_png_rgb16(np.stack([box] * 3, -1)))  # values 0 and 1: high byte 0
  green = np.zeros((30, 40, 3), np.uint8)  # colour in G alone: any channel counts, not only the first
  green[box == 1, 1] = 180
  Image.fromarray(green).save(src / "m" / "green.png")
  opaque = np.full((30, 40, 4), 255, np.uint8)  # RGBA without transparency: its colours, not its alpha
  opaque[..., :3] = np.stack([np.zeros_like(box), np.zeros_like(box), box * 255], -1)
  Image.fromarray(opaque, mode="RGBA").save(src / "m" / "opaque.png")
  indexed = Image.fromarray(box, mode="P")  # no transparency: the index counts, not its colour (1 is black here)
  indexed.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
  indexed.save(src / "m" / "indexed.png")
  names = ("jpeg.jpg", "cutout.png", "palette.png", "cmyk.jpg", "rgb16.png", "green.png", "opaque.png", "indexed.png")
  for name in names:  # one image file per line: an image is on one line only
    (src / f"{name}.jpg").write_bytes((src / "a.jpg").read_bytes())
  lines = [{"image": f"{name}.jpg", "id": name, "objects": [{"texts": "the box", "mask": f"m/{name}"}]}
           for name in names]
  (src / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x) for x in lines).encode())
  data = str(tmp_path / "tfds")
  assert cli.main(["prepare", "--dataset", "custom", "--name", "m", "--src", str(src), "--data_dir", data,
                   "--no-progress"]) == 0
  assert "skipped: unsupported_mask 2" in capsys.readouterr().out
  recs = records.read_records(os.path.join(data, "m"), "train")
  assert [r.image_id for r in recs] == ["jpeg.jpg", "cutout.png", "palette.png", "green.png", "opaque.png",
                                        "indexed.png"]
  for rec in recs:
    np.testing.assert_array_equal(rec.mask(0), box, err_msg=rec.image_id)


@pytest.mark.parametrize("orientation,shown", [(5, np.transpose), (6, lambda m: np.rot90(m, -1))])
def test_custom_mask_with_exif_orientation_turns_as_its_image(tmp_path, orientation, shown):
  """A photo and its mask, both stored 20 x 30 with EXIF orientation 5 (transpose) or 6 (turn clockwise), are
  read as shown, 30 x 20: the mask as turned as the image."""
  from PIL import Image
  src = tmp_path / "raw"
  src.mkdir()
  stored = np.zeros((20, 30), np.uint8)
  stored[2:6, 3:25] = 1
  exif = Image.new("L", (1, 1)).getexif()
  exif[0x0112] = orientation
  Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(src / "a.jpg", exif=exif)
  Image.fromarray(stored * 255).save(src / "m.png", exif=exif)
  (src / "train.jsonl").write_text(json.dumps({"image": "a.jpg", "objects": [{"texts": "it", "mask": "m.png"}]}))
  data = str(tmp_path / "tfds")
  assert cli.main(["prepare", "--dataset", "custom", "--name", "x", "--src", str(src), "--data_dir", data,
                   "--no-progress"]) == 0
  (rec,) = records.read_records(os.path.join(data, "x"), "train")
  assert (rec.h, rec.w) == (30, 20)
  np.testing.assert_array_equal(rec.mask(0), shown(stored))


def test_custom_rle_of_another_size_is_skipped(tmp_path, capsys):
  """An RLE states its own size; one that is not its image's (20 x 20 on a 30 x 40 image) would be decoded
  as runs over the wrong grid: skipped and counted, never stored."""
  src = tmp_path / "raw"
  F.save_jpeg(str(src / "a.jpg"), 30, 40, 0)
  line = {"image": "a.jpg", "objects": [{"texts": "it", "segmentation": F.rle_of(np.ones((20, 20)))}]}
  (src / "train.jsonl").write_text(json.dumps(line))
  err = _fails(capsys, "--dataset", "custom", "--name", "x", "--src", str(src), "--data_dir", str(tmp_path / "o"))
  assert err == "error: custom: split train: every image was skipped (mask_size_mismatch 1)"


def test_custom_label_maps_give_one_prompt_per_named_value(tmp_path, capsys):
  """A semantic dataset of one's own: a label map per image, the prompt of each value in classes.json; values it
  does not name (background, 255 = ignore) are negatives in every mask; objects may share the line."""
  src = tmp_path / "raw"
  label = np.zeros((20, 30), np.uint8)
  label[2:8, 3:12], label[10:18, 5:25], label[0, :] = 1, 3, 255
  F.save_label_png(str(src / "labels" / "a.png"), label)
  F.save_label_png(str(src / "labels" / "small.png"), label[:10])
  for name in ("a", "b", "c", "d"):
    F.save_jpeg(str(src / f"{name}.jpg"), 20, 30, 0)
  (src / "classes.json").write_text(json.dumps(["[semantic] background", "[semantic] road", None, "car"]))
  lines = [{"image": "a.jpg", "label_map": "labels/a.png",
            "objects": [{"texts": "the top row", "segmentation": [[0, 0, 29, 0, 29, 0.9, 0, 0.9]]}]},
           {"image": "b.jpg", "label_map": "labels/missing.png"},
           {"image": "c.jpg", "label_map": "labels/small.png"},
           {"image": "d.jpg", "objects": [{"texts": "anything", "segmentation": [[0, 0, 5, 0, 0, 5]]}]}]
  (src / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  data = str(tmp_path / "tfds")
  assert cli.main(["prepare", "--dataset", "custom", "--name", "sem", "--src", str(src), "--data_dir", data,
                   "--no-progress"]) == 0
  assert "skipped: label_size_mismatch 1, missing_label_map 1" in capsys.readouterr().out
  rec = records.read_records(os.path.join(data, "sem"), "train")[0]
  by_text = {e.text: (e.mask_index, e.ids) for e in rec.entries}
  assert list(by_text) == ["the top row", "[semantic] background", "[semantic] road", "car"]  # no prompt for 255
  for text, value in (("[semantic] background", 0), ("[semantic] road", 1), ("car", 3)):
    index, ids = by_text[text]
    assert ids == {"line": 1, "class_id": value}
    np.testing.assert_array_equal(rec.mask(index), label == value, err_msg=text)
  np.testing.assert_array_equal(rec.mask(by_text["the top row"][0]), F.reference_mask(lines[0]["objects"][0][
      "segmentation"], 20, 30))
  # classes.json is needed, and must hold prompts.
  (src / "classes.json").write_text(json.dumps({"1": "road", "\u00b2": "car"}))
  assert re.search(r"classes.json: expected a list of prompts", _fails(capsys, "--dataset", "custom", "--name", "s2",
                                                                          "--src", str(src), "--data_dir", data))
  (src / "classes.json").write_text(json.dumps({"1": "road", "3": " "}))
  assert re.search(r"classes.json: prompt of value 3 is empty", _fails(capsys, "--dataset", "custom", "--name", "s2",
                                                                          "--src", str(src), "--data_dir", data))
  (src / "classes.json").unlink()
  assert re.search(r"train.jsonl:1: a \"label_map\" needs .*classes.json",
                   _fails(capsys, "--dataset", "custom", "--name", "s2", "--src", str(src), "--data_dir", data))


def test_custom_splits_evaluate_by_name(tmp_path):
  """`NAME|SPLIT` names a custom dataset's split for run.py eval and training's evals."""
  from data_pipelines import eval_splits
  out = _prepare_custom(tmp_path, "shoes")
  split, where, meta = eval_splits.resolve_data_dir(os.path.dirname(out), eval_splits.parse_split("shoes|val[:1]"))
  assert (split.dataset, split.split, meta["dataset"]) == ("shoes", "val[:1]", "shoes")
  assert len(sources.open_split(where, split.split)) == 1
  # A custom train split holds its texts as written, like every split: it evaluates too (refer train splits do not).
  assert eval_splits.resolve_data_dir(os.path.dirname(out), eval_splits.parse_split("shoes|train"))[0].split == "train"
  with pytest.raises(Exception, match=r"no prepared dataset at .*boots \(build it with `run.py prepare --dataset "
                     r"custom --name boots --src JSONL_DIR"):
    eval_splits.resolve_data_dir(os.path.dirname(out), eval_splits.parse_split("boots|val"))


def _custom_fails(tmp_path, capsys, lines, *extra, name="mine", file="train.jsonl") -> str:
  src = tmp_path / "raw"
  src.mkdir(exist_ok=True)
  F.save_jpeg(str(src / "a.jpg"), 10, 10, 0)
  if lines is not None:
    (src / file).write_text("\n".join(lines) + "\n")
  return _fails(capsys, "--dataset", "custom", *(("--name", name) if name else ()), "--src", str(src),
                "--data_dir", str(tmp_path / "tfds"), *extra)


POLY = '[[0, 0, 5, 0, 0, 5]]'


@pytest.mark.parametrize("lines, message", [
    (None, r"custom: no SPLIT.jsonl file in .*raw; expected SRC/SPLIT.jsonl"),
    (['{"image": "a.jpg", "objects": []'], r"train.jsonl:1: not JSON"),
    (['', '["a.jpg"]'], r"train.jsonl:2: expected an object with \"image\""),
    (['{"image": "a.jpg", "objects": []}'], r"train.jsonl:1: \"objects\" must be a non-empty list \(or give a "),
    (['{"image": "a.jpg", "label_map": 3}'], r"train.jsonl:1: \"label_map\" must be a path"),
    (['{"image": "a.jpg", "height": "10", "objects": [{"texts": "ok", "segmentation": %s}]}' % POLY],
     r"train.jsonl:1: \"height\" must be a positive integer"),
    (['{"image": "a.jpg", "objects": [{"segmentation": %s}]}' % POLY], r"object 0: an object needs \"texts\""),
    (['{"image": "a.jpg", "objects": [{"texts": ["  "], "segmentation": %s}]}' % POLY],
     r"object 0: text 0 is empty or whitespace-only"),
    (['{"image": "a.jpg", "objects": [{"texts": ["ok", "[semantic]"], "segmentation": %s}]}' % POLY],
     r"object 0: text 1 is only the \[semantic\] tag"),
    (['{"image": "a.jpg", "objects": [{"texts": ["ok", 3], "segmentation": %s}]}' % POLY],
     r"object 0: text 1 is a int, not a str"),
    (['{"image": "a.jpg", "objects": [{"texts": ["ok"], "mask": "m.png", "segmentation": %s}]}' % POLY],
     r"object 0: give one of \"mask\" .* and \"segmentation\" .*, not both"),
    (['{"image": "a.jpg", "objects": [{"texts": ["ok"]}]}'], r"object 0: give one of \"mask\""),
    (['{"image": "a.jpg", "objects": [{"texts": ["ok"], "segmentation": [[0, 0, 5]]}]}'],
     r"object 0: \"segmentation\" must be COCO polygons"),
    (['{"image": "a.jpg", "objects": [{"texts": ["ok"], "segmentation": {"counts": "x"}}]}'],
     r"object 0: \"segmentation\" must be COCO polygons .* or an RLE"),
    (['{"image": "a.jpg", "objects": [{"texts": ["ok"], "segmentation": %s}]}' % POLY] * 2,
     r"train.jsonl:2: image 'a.jpg' is also on line 1; put all of an image's objects on one line"),
    (['{"image": "a.jpg", "id": 1, "objects": [{"texts": "ok", "segmentation": %s}]}' % POLY,
      '{"image": "./a.jpg", "id": 2, "objects": [{"texts": "ok", "segmentation": %s}]}' % POLY],
     r"train.jsonl:2: image './a.jpg' \(id '2'\) is also on line 1"),
    (['{"image": "a.jpg", "id": true, "objects": [{"texts": "ok", "segmentation": %s}]}' % POLY],
     r"\"id\" must be a string or an integer"),
    # Python's json reads NaN; pycocotools would rasterise it into some shape.
    (['{"image": "a.jpg", "objects": [{"texts": "ok", "segmentation": [[0, 0, NaN, 0, 4, 4]]}]}'],
     r"object 0: \"segmentation\" must be COCO polygons .*finite numbers"),
    # Runs that do not cover size[0] x size[1] pixels: pycocotools would read past them (garbage, or a crash later).
    (['{"image": "a.jpg", "objects": [{"texts": "ok", "segmentation": {"size": [10, 10], "counts": [10, 5]}}]}'],
     r"object 0: \"segmentation\" must be .* an RLE .* whose runs cover h x w pixels"),
    (['{"image": "a.jpg", "objects": [{"texts": "ok", "segmentation": {"size": [10, 10], "counts": ""}}]}'],
     r"whose runs cover h x w pixels"),
    (['{"image": "a.jpg", "objects": [{"texts": "ok", "segmentation": {"size": [10, 10], "counts": "0`0"}}]}'],
     r"whose runs cover h x w pixels"),
])
def test_custom_lines_that_are_not_the_layout_are_one_line_naming_file_and_line(tmp_path, capsys, lines, message):
  assert re.search(message, _custom_fails(tmp_path, capsys, lines))
  assert not (tmp_path / "tfds" / "mine").exists()


@pytest.mark.parametrize("name, message", [
    ("", r"--dataset custom needs --name NAME"),
    ("My_Set", r"--name My_Set: use lowercase letters"),
    ("refcocoplus", r"--name refcocoplus: that is one of the datasets run.py prepare builds itself"),
    ("coco", r"--name coco: a dataset of TFDS's catalogue has that name"),
])
def test_custom_names_that_cannot_be_found_again_are_refused(tmp_path, capsys, name, message):
  ok = ['{"image": "a.jpg", "objects": [{"texts": ["ok"], "segmentation": %s}]}' % POLY]
  assert re.search(message, _custom_fails(tmp_path, capsys, ok, name=name))


def test_custom_flag_misuse_is_refused(tmp_path, capsys):
  ok = ['{"image": "a.jpg", "objects": [{"texts": ["ok"], "segmentation": %s}]}' % POLY]
  assert re.search(r"--name a{65}: 65 characters; use at most 64", _custom_fails(tmp_path, capsys, ok, name="a" * 65))
  (tmp_path / "raw" / "val.jsonl").write_text("\n \n")
  assert re.search(r"val.jsonl: no images \(an empty split", _custom_fails(tmp_path, capsys, ok))
  (tmp_path / "raw" / "val.jsonl").unlink()
  assert re.search(r"all.jsonl: 'all' is no split name", _custom_fails(tmp_path, capsys, ok, file="all.jsonl"))
  (tmp_path / "raw" / "all.jsonl").unlink()
  assert re.search(r"'my-val' is no split name", _custom_fails(tmp_path, capsys, ok, file="my-val.jsonl"))
  (tmp_path / "raw" / "my-val.jsonl").unlink()
  assert "--name is for --dataset custom only" in _fails(capsys, "--dataset", "ade20k", "--name", "x", "--src",
                                                         str(tmp_path / "raw"), "--data_dir", str(tmp_path / "d"))
  assert "give --data_dir, not the deprecated --out" in _fails(capsys, "--dataset", "custom", "--name", "x", "--src",
                                                               str(tmp_path / "raw"), "--out", str(tmp_path / "o"))
