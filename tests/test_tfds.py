"""TFDS datasets: TFDS's own `ref_coco` read and evaluated directly, our builders against the old format
(same records, same batches, same gIoU/cIoU), split slicing, and the old format's deprecation."""

import json
import os
import pickle
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import eval_splits, pipeline, prepare, records, sources
from data_pipelines.transforms import SampleConfig
from evf_jax import evaluate
from evf_testing import data_fixtures as F

SMALL = SampleConfig(sam_size=128, max_text_len=16)

# One COCO-style world written both ways: refer_seg (our readers) and TFDS ref_coco's refcoco.json.
IMAGES = {1: (48, 64), 2: (60, 40), 3: (50, 50)}  # image id -> (h, w)
ANNS = [  # polygons only: ref_coco rasterises with frPyObjects, which takes no string-count RLE
    {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [F.rect_poly(2, 3, 20, 30)]},
    {"id": 12, "image_id": 1, "category_id": 2, "segmentation": [F.rect_poly(30, 5, 60, 40)]},
    {"id": 21, "image_id": 2, "category_id": 1, "segmentation": [F.rect_poly(4, 4, 30, 50), [10, 10, 28, 12, 15, 40]]},
    {"id": 22, "image_id": 2, "category_id": 2, "segmentation": [F.rect_poly(0, 40, 40, 60)]},
    {"id": 31, "image_id": 3, "category_id": 1, "segmentation": [F.rect_poly(5, 5, 40, 30)]},
]
REFS = [  # (ref_id, ann_id, split, sentences)
    (1, 11, "train", ["Left Man", "the guy"]),
    (2, 12, "val", ["  The DOG ", "dog on the right"]),
    (3, 11, "val", ["left man"]),
    (4, 21, "val", ["Tall Thing"]),
    (5, 22, "val", ["bottom strip", "the floor"]),
    (6, 31, "testA", ["big box"]),
    (7, 31, "testB", ["Small Box"]),  # ref_coco's refcoco_unc needs every one of its splits
]


def _ann(a):
  h, w = IMAGES[a["image_id"]]
  m = F.reference_mask(a["segmentation"], h, w)
  ys, xs = np.nonzero(m)
  return dict(a, iscrowd=0, area=int(m.sum()), bbox=[int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1,
                                                      int(np.ptp(ys)) + 1])


def _sentences(texts, ref_id):
  return [{"sent_id": 100 * ref_id + i, "sent": t, "raw": t, "tokens": t.split()} for i, t in enumerate(texts)]


def write_refer_seg(src):
  images = []
  for image_id, (h, w) in IMAGES.items():
    name = f"COCO_train2014_{image_id:012d}.jpg"
    F.save_jpeg(os.path.join(src, "images/mscoco/images/train2014", name), h, w, image_id)
    images.append({"id": image_id, "file_name": name, "height": h, "width": w})
  os.makedirs(os.path.join(src, "refcoco"), exist_ok=True)
  with open(os.path.join(src, "refcoco", "instances.json"), "w") as f:
    json.dump({"images": images, "annotations": [_ann(a) for a in ANNS],
               "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]}, f)
  anns = {a["id"]: a for a in ANNS}
  refs = [{"ref_id": r, "ann_id": a, "image_id": anns[a]["image_id"], "category_id": anns[a]["category_id"],
           "split": s, "sentences": _sentences(t, r)} for r, a, s, t in REFS]
  with open(os.path.join(src, "refcoco", "refs(unc).p"), "wb") as f:
    pickle.dump(refs, f, protocol=2)


def write_ref_coco_manual(manual):
  """TFDS ref_coco's manual dir: refcoco.json (as its manual_download_process.py writes it) + coco_train2014/."""
  anns = {a["id"]: _ann(a) for a in ANNS}
  coco = {}
  for image_id, (h, w) in IMAGES.items():
    name = f"COCO_train2014_{image_id:012d}.jpg"
    F.save_jpeg(os.path.join(manual, "coco_train2014", name), h, w, image_id)  # same seed: same bytes
    coco[str(image_id)] = {"info": {"file_name": name, "height": h, "width": w},
                           "anns": [a for a in anns.values() if a["image_id"] == image_id]}
  refs = [{"dataset": "refcoco", "dataset_partition": "unc", "split": s, "image_id": anns[a]["image_id"],
           "ref_id": r, "ann": anns[a], "sentences": _sentences(t, r)} for r, a, s, t in REFS]
  with open(os.path.join(manual, "refcoco.json"), "w") as f:
    json.dump({"ref": refs, "coco_anns": coco}, f)


def build_ref_coco(data_dir, manual, monkeypatch):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.features import feature
  # ref_coco's sentences are a nested Sequence, whose encoder asks TensorInfo.dtype, a property that imports
  # TensorFlow; numpy's dtype is all it needs. Building needs this (or TF), reading does not.
  monkeypatch.setattr(feature.TensorInfo, "dtype", property(lambda self: self.np_dtype))
  tfds.display_progress_bar(False)
  builder = tfds.builder("ref_coco/refcoco_unc", data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_dir=os.path.join(manual, "dl"),
                               download_config=tfds.download.DownloadConfig(manual_dir=manual))
  monkeypatch.undo()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  write_refer_seg(str(root / "raw"))
  data_dir = str(root / "data")
  prepare.build("refcoco", data_dir, str(root / "raw"), progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    prepare.prepare("refcoco", str(root / "old" / "refcoco"), str(root / "raw"), progress=False)
  mp = pytest.MonkeyPatch()
  write_ref_coco_manual(str(root / "manual"))
  build_ref_coco(str(root / "coco_tfds"), str(root / "manual"), mp)
  return root, F.train_tokenizer(str(root))


def _oracle(params, batch):
  """Deterministic, imperfect predictions: GT with a pixel pattern flipped (as in test_evaluate)."""
  s = batch["masks"].shape[-1]
  flip = (jnp.arange(s)[:, None] * 7 + jnp.arange(s)[None, :] * 3) % 5 == 0
  return jnp.where((batch["masks"] > 0) ^ flip, 1.0, -1.0)


def _evaluate(location, split, tok):
  ev = evaluate.Evaluator(_oracle, devices=jax.devices()[:1], options=evaluate.EvalOptions(batch_size=2,
                                                                                           progress=False))
  ds = pipeline.eval_dataset(location, split, tok, low_res=32, sample=SMALL, process_index=0, process_count=1)
  r = ev.run({}, iter(ds), total=len(ds))
  return {k: r[k] for k in ("giou", "ciou", "images", "sentences", "total_intersection", "total_union")}


def test_ref_coco_built_without_tensorflow_is_read_and_evaluated_directly(world):
  root, tok = world
  assert "tensorflow" not in sys.modules  # built (with the one-line patch) and read without TF
  split = eval_splits.parse_split("refcoco|unc|val")
  resolved, where, meta = eval_splits.resolve_data_dir(str(root / "coco_tfds"), split)
  assert where == sources.TfdsDataset("ref_coco/refcoco_unc:1.1.0", str(root / "coco_tfds"))
  assert resolved.split == "validation" and meta["dataset"] == "refcoco" and meta["splits"]["validation"]["images"] == 2
  ours = sources.read_records(str(root / "data" / "refcoco"), "val")
  theirs = sorted(sources.read_records(where, "validation"), key=lambda r: r.image_id)  # TFDS shuffled its files
  assert [r.image_id for r in theirs] == [r.image_id for r in ours] == ["1", "2"]
  for a, b in zip(ours, theirs):  # same images, sentences (strip().lower()), and masks
    assert a.image == b.image and (a.h, a.w) == (b.h, b.w) and b.source == "refcoco"
    assert sorted(e.text for e in a.entries) == sorted(e.text for e in b.entries)
    for ea in a.entries:
      eb = next(e for e in b.entries if e.text == ea.text)
      np.testing.assert_array_equal(a.mask(ea.mask_index), b.mask(eb.mask_index))
  assert "the dog" in [e.text for r in theirs for e in r.entries]
  train = sources.read_records(where, "train")  # train text stays raw
  assert [e.text for e in train[0].entries] == ["Left Man", "the guy"]
  assert [e.text for e in sources.read_records(where, "train[:1]")[0].entries] == ["Left Man", "the guy"]  # sliced too
  # The same gIoU / cIoU from TFDS's ref_coco, from our builder, and from the old format (the reader before).
  with pytest.warns(DeprecationWarning, match="old prepared format"):
    old = _evaluate(str(root / "old" / "refcoco"), "val", tok)
  assert old["sentences"] == 6 and 0 < old["giou"] < 1
  assert _evaluate(str(root / "data" / "refcoco"), "val", tok) == old
  assert _evaluate(where, "validation", tok) == old
  # ...also through a sliced split name.
  resolved, where, _ = eval_splits.resolve_data_dir(str(root / "coco_tfds"),
                                                    eval_splits.parse_split("refcoco|unc|val[1:]"))
  assert resolved.split == "validation[1:]" and _evaluate(where, resolved.split, tok)["images"] == 1


def test_ref_coco_trains_directly(world):
  root, tok = world
  location = str(root / "coco_tfds" / "ref_coco" / "refcoco_unc")
  ds = pipeline.train_dataset({"refer_seg": (1, [location])}, tok, global_batch_size=2, seed=0, sample=SMALL,
                              process_index=0, process_count=1)
  b = ds[0]
  assert b["masks"].shape == (2, 3, 128, 128) and b["prompt_valid"][:, :2].all()  # the train image's 2 sentences
  with pytest.raises(ValueError, match="configs refcoco_unc"):  # the dataset folder alone names no config
    sources.locate(str(root / "coco_tfds" / "ref_coco"))


def test_a_dataset_folder_means_its_newest_version_in_numeric_order(tmp_path):
  """1.10.0 is newer than 1.9.0 (a string sort says otherwise)."""
  for version in ("1.9.0", "1.10.0", "1.2.0"):
    (tmp_path / "synthetic" / version).mkdir(parents=True)
    (tmp_path / "synthetic" / version / sources.DATASET_INFO).write_text(
        json.dumps({"name": "synthetic", "version": version}))
  assert sources.tfds_at(str(tmp_path / "synthetic")) == sources.TfdsDataset("synthetic:1.10.0", str(tmp_path))


def test_damaged_or_missing_shards_are_one_line_when_the_split_opens(world, tmp_path):
  """A copy cut short, a shard deleted or a JSON file damaged: refused in one line naming what, when training or
  evaluation opens the split (array_record's own error came from a reading thread, after the checkpoint load)."""
  root, tok = world
  shutil.copytree(root / "data", tmp_path / "data")
  version = tmp_path / "data" / "refcoco" / "1.0.0"
  (train_shard,) = version.glob("refcoco-train.array_record-*")
  os.truncate(train_shard, 3000)
  with pytest.raises(sources.DataReadError, match=r"^refcoco:1.0.0 in .*: split 'train': cannot read example 0 "
                                                  r"\(.*\); its files are damaged or missing: prepare it again$"):
    pipeline.train_dataset({"refer_seg": (1, [str(tmp_path / "data" / "refcoco")])}, tok, global_batch_size=2,
                           seed=0, sample=SMALL, process_index=0, process_count=1)
  for shard in version.glob("refcoco-val.array_record-*"):
    shard.unlink()
  with pytest.raises(sources.DataReadError, match=r"split 'val'.*No such file or directory"):
    pipeline.eval_dataset(str(tmp_path / "data" / "refcoco"), "val", tok, low_res=32, sample=SMALL)
  # Its JSON files damaged: the file named, not a KeyError or AttributeError from where it is used.
  for name, text, expect in (("metadata.json", "[1]", "expected a JSON object, found list"),
                             ("features.json", "garb", "not valid JSON"),
                             ("dataset_info.json", "{}", "names no dataset")):
    shutil.copy(root / "data" / "refcoco" / "1.0.0" / name, tmp_path / name)
    (version / name).write_text(text)
    with pytest.raises(sources.DataReadError, match=f"^{version / name}: {expect}.*prepare it again$"):
      sources.describe(str(tmp_path / "data" / "refcoco"))
    shutil.copy(tmp_path / name, version / name)


def test_tfds_batches_equal_the_old_format_and_resume_exactly(world):
  root, tok = world
  new, old = str(root / "data" / "refcoco"), str(root / "old" / "refcoco")
  assert ([records.serialize(r) for r in sources.read_records(new, "train")]
          == [records.serialize(r) for r in records.read_records(old, "train")])
  make = lambda d, split="train": pipeline.train_dataset({"refer_seg": (1, [d])}, tok, global_batch_size=2,
                                                         seed=3, sample=SMALL, split=split, process_index=0,
                                                         process_count=1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    before = [make(old)[j] for j in range(2)]
  it = pipeline.train_iterator(make(new))
  got = [next(it) for _ in range(2)]
  for x, y in zip(got, before):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  state = it.get_state()
  nxt = next(it)
  resumed = pipeline.train_iterator(make(new))
  resumed.set_state(state)
  for k, v in next(resumed).items():
    np.testing.assert_array_equal(v, nxt[k], err_msg=k)
  with pytest.raises(ValueError, match="split 'bogus'"):
    make(new, "bogus")
