"""Tiny raw datasets in each original download format, and a tiny sentencepiece tokenizer, for data tests."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


class SpTokenizer:
  """XLM-R id convention over a small sentencepiece BPE model: [0] + (piece ids + 1) + [2], pad 1.

  Loads the model lazily so the object pickles (grain workers) as just a path.
  """

  def __init__(self, model_path: str):
    self.model_path = model_path
    self._sp = None

  def __getstate__(self):
    return {"model_path": self.model_path, "_sp": None}

  def encode(self, text: str) -> list[int]:
    if self._sp is None:
      import sentencepiece as spm
      self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    return [0] + [i + 1 for i in self._sp.encode(text)] + [2]


def train_tokenizer(tmp_dir: str) -> SpTokenizer:
  import sentencepiece as spm
  from data_pipelines import synthetic
  corpus = os.path.join(tmp_dir, "corpus.txt")
  with open(corpus, "w") as f:
    for i in range(40):
      for e in synthetic.make_example(123, "train", i).entries:
        f.write(e.text + "\n")
    f.write("the man on the left\nperson wearing a hat\nwall person flag quadruped head cat\n")
  prefix = os.path.join(tmp_dir, "sp")
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=80, model_type="bpe",
                                 character_coverage=1.0, minloglevel=2, num_threads=1)
  return SpTokenizer(prefix + ".model")


def save_jpeg(path: str, h: int, w: int, seed: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def save_label_png(path: str, label: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def rect_poly(x0, y0, x1, y1) -> list[float]:
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def rle_of(mask: np.ndarray, str_counts: bool = True) -> dict:
  r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": list(r["size"]), "counts": r["counts"].decode() if str_counts else r["counts"]}


def reference_mask(segmentation, h: int, w: int) -> np.ndarray:
  """The original loader's path: decode every polygon / RLE, sum over channels, then clip (docs/data.md#21-refcoco-family)."""
  if not segmentation:
    return np.zeros((h, w), np.uint8)
  if isinstance(segmentation[0], dict):
    rles = [dict(r, counts=r["counts"].encode() if isinstance(r["counts"], str) else r["counts"])
            for r in segmentation]
  else:
    rles = mask_utils.frPyObjects(segmentation, h, w)
  m = mask_utils.decode(rles)
  return np.minimum(m.sum(axis=2), 1).astype(np.uint8)


# ---------------------------------------------------------------- refer_seg layout

REFER_IMAGES = {1: (48, 64), 2: (60, 40), 3: (50, 50), 4: (30, 30)}  # image id -> (h, w); 4 is corrupt


def refer_annotations() -> list[dict]:
  m = np.zeros((48, 64), np.uint8)
  m[5:20, 30:60] = 1
  return [
      {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,  # two overlapping polygons
       "segmentation": [rect_poly(2, 3, 20, 30), [10, 10, 28, 12, 15, 40]]},
      {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [rle_of(m)]},  # RLE list
      {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": []},  # empty -> zero mask
      {"id": 4, "image_id": 3, "category_id": 1, "iscrowd": 0, "segmentation": [rect_poly(5, 5, 40, 30)]},
      {"id": 5, "image_id": 4, "category_id": 1, "iscrowd": 0, "segmentation": [rect_poly(1, 1, 9, 9)]},
  ]


def refer_refs() -> list[dict]:
  def sents(*texts):
    # raw (the annotator's text) differs from sent: the reader takes sent, the normalised one
    return [{"sent_id": 100 + i, "sent": t, "raw": t.upper() + " .", "tokens": t.split()} for i, t in enumerate(texts)]
  return [
      {"ref_id": 10, "ann_id": 1, "image_id": 1, "category_id": 1, "split": "train",
       "sentences": sents("Left Man", "the guy in red")},
      {"ref_id": 11, "ann_id": 2, "image_id": 1, "category_id": 2, "split": "train",
       "sentences": sents("dog on the right")},
      {"ref_id": 12, "ann_id": 3, "image_id": 2, "category_id": 1, "split": "val",
       "sentences": sents("  The EMPTY one ")},
      {"ref_id": 13, "ann_id": 4, "image_id": 3, "category_id": 1, "split": "testA",
       "sentences": sents("big box", "Square thing")},
      {"ref_id": 14, "ann_id": 5, "image_id": 4, "category_id": 1, "split": "train",
       "sentences": sents("broken image")},
  ]


def write_refer(src: str, dataset: str = "refcoco", corrupt: bool = True) -> None:
  """refer_seg/{images/..., <dataset>/refs(unc|umd).p + instances.json}; image 4 is a corrupt JPEG."""
  from data_pipelines.readers import REFER_DATASETS
  split_by, image_dir = REFER_DATASETS[dataset]
  images = []
  for image_id, (h, w) in REFER_IMAGES.items():
    name = f"COCO_train2014_{image_id:012d}.jpg"
    path = os.path.join(src, image_dir, name)
    save_jpeg(path, h, w, image_id)
    if image_id == 4 and corrupt:
      with open(path, "r+b") as f:  # keep the header, garble the rest: PIL opens it, then fails to decode
        data = f.read()
        f.seek(0)
        f.write(data[:200] + b"\x00" * 50)
        f.truncate(250)
    images.append({"id": image_id, "file_name": name, "height": h, "width": w})
  anns = refer_annotations()
  if dataset == "refclef":  # RefCLEF stores RLE dicts with str counts
    for a in anns:
      if a["segmentation"] and not isinstance(a["segmentation"][0], dict):
        h, w = REFER_IMAGES[a["image_id"]]
        a["segmentation"] = [rle_of(reference_mask(a["segmentation"], h, w))]
  ann_dir = os.path.join(src, dataset)
  os.makedirs(ann_dir, exist_ok=True)
  with open(os.path.join(ann_dir, "instances.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"},
                                                                   {"id": 2, "name": "dog"}]}, f)
  refs = refer_refs()
  if dataset == "grefcoco":
    refs[0]["ann_id"] = [1, 2]  # union of two instances
    refs[1]["ann_id"] = [-1]  # no target
    for r in refs:
      r["ann_id"] = r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]]
      r["category_id"] = [r["category_id"]]
    with open(os.path.join(ann_dir, f"grefs({split_by}).json"), "w") as f:
      json.dump(refs, f)
  else:
    with open(os.path.join(ann_dir, f"refs({split_by}).p"), "wb") as f:
      pickle.dump(refs, f, protocol=2)


# ---------------------------------------------------------------- semantic / part datasets

def ade_label() -> np.ndarray:
  lab = np.zeros((40, 52), np.uint8)  # 0 = "other" -> ignored
  lab[0:10] = 1  # wall
  lab[10:25, 0:20] = 13  # person
  lab[30:40, 40:52] = 150  # flag
  return lab


def write_ade20k(src: str) -> None:
  save_jpeg(os.path.join(src, "images", "training", "ADE_train_1.jpg"), 40, 52, 1)
  save_label_png(os.path.join(src, "annotations", "training", "ADE_train_1.png"), ade_label())
  save_jpeg(os.path.join(src, "images", "validation", "ADE_val_1.jpg"), 40, 52, 2)
  save_label_png(os.path.join(src, "annotations", "validation", "ADE_val_1.png"), ade_label()[::-1])


def humanparsing_label() -> np.ndarray:
  lab = np.zeros((36, 24), np.uint8)
  lab[5:15, 2:10] = 9  # ATR 9 = "right shoe" after the viewer-side swap
  lab[20:30, 12:20] = 15  # "left arm"
  return lab


def write_humanparsing(src: str) -> None:
  save_jpeg(os.path.join(src, "JPEGImages", "hp_1.jpg"), 36, 24, 3)
  save_label_png(os.path.join(src, "SegmentationClassAug", "hp_1.png"), humanparsing_label())


def o365_mask() -> np.ndarray:
  m = np.zeros((32, 44), np.uint8)
  m[4:20, 6:30] = 1
  return m


def write_obj365(src: str) -> None:
  root = os.path.join(src, "raw", "Objects365_v1", "2019-08-02")
  save_jpeg(os.path.join(root, "train", "obj365_train_1.jpg"), 32, 44, 4)
  coco = {"images": [{"id": 7, "file_name": "obj365_train_1.jpg", "height": 32, "width": 44}],
          "annotations": [{"id": 70, "image_id": 7, "category_id": 3, "segmentation": [rle_of(o365_mask())],
                           "bbox": [6, 4, 24, 16], "area": 384, "iscrowd": 0}],
          "categories": [{"id": 3, "name": "Person"}]}
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "o365_res_instances.json"), "w") as f:
    json.dump(coco, f)


def part_coco(names: list[str], file_name: str) -> dict:
  return {
      "images": [{"id": 1, "file_name": file_name, "height": 40, "width": 40}],
      "annotations": [
          {"id": 1, "image_id": 1, "category_id": 0, "segmentation": [rect_poly(1, 1, 10, 10)], "iscrowd": 0},
          {"id": 2, "image_id": 1, "category_id": 0, "segmentation": [rect_poly(20, 20, 30, 35)], "iscrowd": 0},
          {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [rect_poly(5, 25, 15, 38)], "iscrowd": 0},
          {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, "x", 4, 5, 6]], "iscrowd": 0},  # broken
      ],
      "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
  }


def write_partimagenet(src: str) -> None:
  save_jpeg(os.path.join(src, "images", "train", "n01_1.JPEG"), 40, 40, 5)
  os.makedirs(os.path.join(src, "annotations", "train"), exist_ok=True)
  with open(os.path.join(src, "annotations", "train", "train.json"), "w") as f:
    json.dump(part_coco(["Quadruped Head", "Quadruped Body"], "n01_1.JPEG"), f)


def write_pascal_part(src: str) -> None:
  save_jpeg(os.path.join(src, "VOCdevkit", "VOC2010", "JPEGImages", "2008_000001.jpg"), 40, 40, 6)
  with open(os.path.join(src, "train.json"), "w") as f:
    json.dump(part_coco(["cat:head", "potted plant:pot"], "2008_000001.jpg"), f)


def encode_png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


# ---------------------------------------------------------------- your own data (`--dataset custom`)

def custom_masks() -> dict[str, np.ndarray]:
  """The masks of write_custom's objects, by their first text (image a.jpg is 30 x 40, b.png 24 x 24)."""
  box = np.zeros((30, 40), np.uint8)
  box[3:12, 5:25] = 1
  blob = np.zeros((30, 40), np.uint8)
  blob[15:28, 20:38] = 1
  small = np.zeros((24, 24), np.uint8)
  small[2:9, 10:20] = 1
  return {"the Red box": box, "[semantic] blob": blob, "the triangle": reference_mask([[0, 0, 20, 0, 0, 20]], 30, 40),
          "a square": small, "The Small Thing": small}


def write_custom(src: str) -> None:
  """train.jsonl: a.jpg with a grey PNG mask (0/255), an RGBA mask (colour in G only, alpha 0 off the object) and
  polygons; b.png with a compressed RLE; c.jpg whose mask file is missing; d.jpg that does not exist. val.jsonl:
  b.png again with an uncompressed RLE, its text in capitals (kept as written)."""
  m = custom_masks()
  save_jpeg(os.path.join(src, "img", "a.jpg"), 30, 40, 1)
  os.makedirs(os.path.join(src, "masks"))
  Image.fromarray(m["the Red box"] * 255).save(os.path.join(src, "masks", "a_box.png"))
  rgba = np.zeros((30, 40, 4), np.uint8)
  rgba[..., 1] = m["[semantic] blob"] * 200
  rgba[..., 3] = m["[semantic] blob"] * 255
  Image.fromarray(rgba, mode="RGBA").save(os.path.join(src, "masks", "a_blob.png"))
  with open(os.path.join(src, "img", "b.png"), "wb") as f:
    f.write(encode_png(np.full((24, 24, 3), 90, np.uint8)))
  save_jpeg(os.path.join(src, "img", "c.jpg"), 20, 20, 2)
  train = [
      {"image": "img/a.jpg", "objects": [
          {"texts": ["the Red box", "box at the top"], "mask": "masks/a_box.png"},
          {"texts": "[semantic] blob", "mask": "masks/a_blob.png"},
          {"texts": ["the triangle"], "segmentation": [[0, 0, 20, 0, 0, 20]]}]},
      {"image": "img/b.png", "id": 7, "objects": [{"texts": ["a square"], "segmentation": rle_of(m["a square"])}]},
      {"image": "img/c.jpg", "objects": [{"texts": ["gone"], "mask": "masks/none.png"}]},
      {"image": "img/d.jpg", "objects": [{"texts": ["nothing"], "segmentation": [[0, 0, 5, 0, 0, 5]]}]},
  ]
  counts = _uncompressed_counts(m["a square"])
  val = [{"image": "img/b.png", "objects": [{"texts": ["The Small Thing"],
                                             "segmentation": {"size": [24, 24], "counts": counts}}]}]
  for name, lines in (("train", train), ("val", val)):
    with open(os.path.join(src, f"{name}.jsonl"), "w") as f:
      f.write("\n".join(json.dumps(line) for line in lines) + "\n\n")  # a blank line is allowed


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
  """COCO's uncompressed RLE of a mask: run lengths in column-major order, starting with a run of zeros."""
  flat = np.asarray(mask, np.uint8).flatten(order="F")
  counts, value, run = [], 0, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  return counts + [run]
