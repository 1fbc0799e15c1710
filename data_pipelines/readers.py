"""Readers of the raw downloads (docs/data.md#2-raw-datasets): each turns a dataset's own layout into `ImageTask`s.

An `ImageTask` is one image of one split: where its file is, plus `build(h, w)`, which returns the image's
prompt entries and masks (compressed RLE). `task_records` reads/validates the image, calls `build` with the
decoded size, and writes a record (records.py). Readers check their required files up front and raise a
UserError listing every missing one, and a UserError naming the file for annotations they cannot read.

`--src` is the dataset's root in the original EVF-SAM layout (docs/data.md#2-raw-datasets):
  refclef, refcoco, refcoco+, refcocog, grefcoco   dataset/refer_seg      (refs pickle, instances.json, images/)
  ade20k                                           dataset/ade20k         (images/, annotations/)
  obj365                                           dataset/Object365      (raw/Objects365_v1/2019-08-02/...)
  humanparsing                                     dataset/humanparsing   (JPEGImages/, SegmentationClassAug/)
  partimagenet                                     dataset/PartImageNet   (images/<split>/, annotations/<split>/<split>.json)
  pascal_part                                      dataset/vlpart/pascal_part  (<split>.json, VOCdevkit/VOC2010/JPEGImages/)
  custom (your own data, `--name NAME`)            any folder  (SPLIT.jsonl files: CUSTOM_LAYOUT)
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
import pickle
import re
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from data_pipelines import records, safe_pickle
from evf_jax.errors import UserError
from evf_jax.images import ImageReadError, decode_image
from evf_jax.tokenizer import check_prompts

Build = Callable[[int, int], tuple[list[records.Entry], list[bytes]]]


class EmptySplitError(ValueError):
  """Every image of a split was skipped (TFDS would refuse the empty split without saying why)."""


class SkipImage(Exception):
  """This image cannot be used (e.g. corrupt label map); prepare counts it under `reason` and goes on."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass
class ImageTask:
  split: str
  image_id: str
  path: str
  build: Build
  expected_hw: Optional[tuple[int, int]] = None  # the annotations' image size, where the layout states one
  # What the reader itself skipped in this split (e.g. refs whose image is not in instances.json); a task with
  # `counts` and no `path` carries only these, so that they reach the split's counts and an emptied split is seen.
  counts: Optional[dict[str, int]] = None


def _stated_hw(im: dict) -> Optional[tuple[int, int]]:
  """(height, width) of a COCO-style image entry, when it has both."""
  return (int(im["height"]), int(im["width"])) if "height" in im and "width" in im else None


def _require(paths: Iterable[str], dataset: str, src: str) -> None:
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise UserError(f"{dataset}: missing under {src}: " + ", ".join(os.path.relpath(p, src) for p in missing)
                    + " (see data_pipelines/readers.py for the expected layout)")


def _load_json(path: str):
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------- COCO-style segmentations -> RLE

def _rle_parts(seg, h: int, w: int) -> list[dict]:
  """A COCO `segmentation` (polygon list, RLE dict, or list of RLE dicts) -> list of compressed RLEs."""
  if isinstance(seg, dict):
    seg = [seg]
  if not seg:
    return []
  if isinstance(seg[0], dict):  # RLE(s); RefCLEF stores str counts, pycocotools wants bytes
    out = []
    for r in seg:
      if isinstance(r["counts"], list):  # uncompressed RLE
        out.append(mask_utils.frPyObjects(r, *r["size"]))
      else:
        counts = r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]
        out.append({"size": list(r["size"]), "counts": counts})
    return out
  polys = [p for p in seg if len(p) >= 6]  # < 3 points does not describe an area
  return mask_utils.frPyObjects(polys, h, w) if polys else []


def union_rle(parts: list[dict], h: int, w: int) -> bytes:
  """Union of RLEs as compressed counts; empty -> all-zero mask. Union = the original's sum, clipped to 1."""
  for p in parts:
    if list(p["size"]) != [h, w]:
      raise SkipImage("mask_size_mismatch")
  if not parts:
    return records.encode_mask(np.zeros((h, w), np.uint8))
  return mask_utils.merge(parts, intersect=False)["counts"] if len(parts) > 1 else parts[0]["counts"]


# ---------------------------------------------------------------- RefCOCO family (REFER / G_REFER)

REFER_DATASETS = {  # name -> (splitBy, image folder under refer_seg/)
    "refclef": ("unc", "images/saiapr_tc-12"),
    "refcoco": ("unc", "images/mscoco/images/train2014"),
    "refcoco+": ("unc", "images/mscoco/images/train2014"),
    "refcocog": ("umd", "images/mscoco/images/train2014"),
    "grefcoco": ("unc", "images/mscoco/images/train2014"),
}


def _eval_split_names(split: str) -> list[str]:
  """REFER's split semantics: testA/testB/testC select refs whose split *contains* the letter ("testAB")."""
  if split.startswith("test") and len(split) > 4:
    return [f"test{c}" for c in split[4:]]
  return [split]


def _load_refs(path: str) -> list:
  if path.endswith(".json"):
    refs = _load_json(path)
  else:
    try:
      refs = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as e:
      raise UserError(f"{path}: {e}") from None
    except OSError as e:
      raise UserError(f"cannot read {path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError) as e:  # truncated, empty or not a pickle at all
      raise UserError(f"cannot read {path}: not a complete pickle ({type(e).__name__}: {e})") from None
  if not isinstance(refs, list):
    raise UserError(f"{path}: expected a list of refs, found {type(refs).__name__}")
  for i, ref in enumerate(refs):
    if not isinstance(ref, dict) or not {"image_id", "ann_id", "split"} <= set(ref):
      raise UserError(f"{path}: ref {i} is not a ref (a dict with image_id, ann_id, split)")
  return refs


def _load_instances(path: str) -> tuple[dict, dict]:
  """instances.json -> ({image id: image}, {annotation id: annotation})."""
  inst = _load_json(path)
  if not isinstance(inst, dict) or not isinstance(inst.get("images"), list) \
      or not isinstance(inst.get("annotations"), list):
    raise UserError(f"{path}: expected a COCO-style object with \"images\" and \"annotations\" lists")
  try:
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    ok = all(isinstance(im["file_name"], str) for im in images.values())
  except (KeyError, TypeError):
    ok = False
  if not ok:
    raise UserError(f"{path}: every image needs an id and a file_name, every annotation an id")
  return images, anns


def read_refer(dataset: str, src: str) -> list[ImageTask]:
  split_by, image_dir = REFER_DATASETS[dataset]
  ann_dir = os.path.join(src, dataset)
  image_root = os.path.join(src, image_dir)
  inst_path = os.path.join(ann_dir, "instances.json")
  if dataset == "grefcoco":
    p, j = os.path.join(ann_dir, f"grefs({split_by}).p"), os.path.join(ann_dir, f"grefs({split_by}).json")
    refs_path = p if os.path.exists(p) or not os.path.exists(j) else j
  else:
    refs_path = os.path.join(ann_dir, f"refs({split_by}).p")
  _require([refs_path, inst_path, image_root], dataset, src)
  refs = _load_refs(refs_path)
  images, anns = _load_instances(inst_path)

  # (split, image_id) -> refs; train keeps sentences verbatim, eval ones are strip().lower()-ed (docs/data.md#5-evaluation-protocol).
  # A ref naming an image or annotation that instances.json lacks is skipped and counted, never a zero mask.
  by_image: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  no_image, no_ann = 0, 0
  for ref in refs:
    names = ["train"] if ref["split"] == "train" else _eval_split_names(ref["split"])
    if ref["image_id"] not in images:
      no_image += 1
      for name in names:
        by_image.setdefault((name, ref["image_id"]), [])  # counted once per image and split below
      continue
    if any(a != -1 and a not in anns for a in _ann_ids(ref)):  # -1: gRefCOCO's no-target (empty) expression
      no_ann += 1
      for name in names:
        counts[name]["ann_not_in_instances"] += 1
      continue
    for name in names:
      by_image[(name, ref["image_id"])].append(ref)
  if 2 * (no_image + no_ann) > len(refs):  # most refs unusable: instances.json of another download, not gaps
    raise UserError(f"{dataset}: {no_image + no_ann} of {len(refs)} refs in {refs_path} name an image ({no_image}) "
                    f"or annotation ({no_ann}) missing from {inst_path}; are both from the same download?")

  tasks = []
  for (split, image_id), image_refs in sorted(by_image.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    im = images.get(image_id)
    if im is None:
      counts[split]["image_not_in_instances"] += 1
    elif image_refs:
      tasks.append(ImageTask(split, str(image_id), os.path.join(image_root, im["file_name"]),
                             _refer_builder(image_refs, anns, train=(split == "train")), _stated_hw(im)))
  for split, c in sorted(counts.items()):
    tasks.insert(0, ImageTask(split, "", "", _no_build, counts=dict(c)))
  return tasks


def _no_build(h: int, w: int):
  raise RuntimeError("a counts-only task is never built")


def _ann_ids(ref: dict) -> list[int]:
  ids = ref["ann_id"]
  return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def _refer_builder(image_refs: list[dict], anns: dict, train: bool) -> Build:
  def build(h: int, w: int):
    masks: list[bytes] = []
    index_of: dict[tuple[int, ...], int] = {}
    entries = []
    for ref in image_refs:
      ids = tuple(_ann_ids(ref))
      if ids not in index_of:
        # gRefCOCO: a list means the union of those instances; [-1] is a no-target expression (all-zero mask).
        parts = []
        for a in ids:
          if a != -1:  # every other id is in `anns` (read_refer skipped the refs naming a missing one)
            parts += _rle_parts(anns[a].get("segmentation"), h, w)
        index_of[ids] = len(masks)
        masks.append(union_rle(parts, h, w))
      for sent in ref.get("sentences", []):
        text = sent["sent"] if train else sent["sent"].strip().lower()
        entries.append(records.Entry(text, index_of[ids], {
            "ref_id": int(ref.get("ref_id", -1)), "sent_id": int(sent.get("sent_id", -1)), "ann_ids": list(ids)}))
    return entries, masks
  return build


# ---------------------------------------------------------------- label-map datasets (ADE20K, HumanParsing)

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence',
    'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag',
)

HUMANPARSING_CLASSES = (  # ATR ids 0..17, left/right swapped to the viewer's side (docs/data.md#24-humanparsing)
    "background", "hat", "hair", "sunglasses", "upper clothes", "skirt", "pants", "dress", "belt",
    "right shoe", "left shoe", "face", "right leg", "left leg", "right arm", "left arm", "bag", "scarf")


def _read_label_map(path: str) -> np.ndarray:
  """The label ids of a single-channel map. Index PNGs ("P" mode) hold the ids directly: never converted through
  their palette. A colour (RGB/RGBA) map is accepted only as grey (R == G == B): a luma of colours is no label id."""
  try:
    with Image.open(path) as im:
      if im.mode in ("P", "L", "I") or im.mode.startswith("I;16"):
        arr = np.asarray(im)
      elif im.mode in ("RGB", "RGBA", "LA"):
        arr = np.asarray(im)
        grey = arr[..., 0]
        if im.mode != "LA" and not ((arr[..., 1] == grey).all() and (arr[..., 2] == grey).all()):
          raise SkipImage("corrupt_label_map")
        arr = grey
      else:  # e.g. "1", "F", "CMYK": not label ids
        raise SkipImage("corrupt_label_map")
  except (OSError, SyntaxError, ValueError):
    raise SkipImage("corrupt_label_map") from None
  if arr.ndim != 2:
    raise SkipImage("corrupt_label_map")
  return arr


def _sized_label_map(path: str, h: int, w: int) -> np.ndarray:
  label = _read_label_map(path)
  if label.shape != (h, w):
    raise SkipImage("label_size_mismatch")
  return label


ClassIds = Callable[[np.ndarray], list[tuple[int, int, str]]]


def _label_masks(label: np.ndarray, class_ids: ClassIds, first: int, meta: dict):
  """class_ids(label_map) -> [(stored value, class id, prompt)] -> (entries, masks): mask = (label_map == stored
  value), the masks numbered from `first`, each entry's meta `meta` and its class id."""
  entries, masks = [], []
  for value, cid, text in class_ids(label):
    entries.append(records.Entry(text, first + len(masks), {**meta, "class_id": int(cid)}))
    masks.append(records.encode_mask(label == value))
  return entries, masks


def _label_builder(label_path: str, class_ids: ClassIds) -> Build:
  def build(h: int, w: int):
    return _label_masks(_sized_label_map(label_path, h, w), class_ids, 0, {})
  return build


def _ade_classes(label: np.ndarray):
  # Label shift: raw 0 ("other") and anything > 150 become ignore; raw k -> class k-1 (docs/data.md#23-ade20k).
  # Ignore pixels are simply negatives in every mask, which (label == k) already gives.
  return [(int(v), int(v) - 1, "[semantic] " + ADE20K_CLASSES[int(v) - 1])
          for v in np.unique(label) if 1 <= v <= len(ADE20K_CLASSES)]


def read_ade20k(src: str) -> list[ImageTask]:
  _require([os.path.join(src, "images", "training"), os.path.join(src, "annotations", "training")], "ade20k", src)
  classes_file = os.path.join(src, "ade20k_classes.json")
  if os.path.exists(classes_file) and list(_load_json(classes_file)) != list(ADE20K_CLASSES):
    raise UserError(f"{classes_file} differs from the 150 SceneParsing classes this reader expects")
  tasks = []
  for folder, split in (("training", "train"), ("validation", "validation")):
    for label_path in sorted(glob.glob(os.path.join(src, "annotations", folder, "*.png"))):
      stem = os.path.splitext(os.path.basename(label_path))[0]
      tasks.append(ImageTask(split, stem, os.path.join(src, "images", folder, stem + ".jpg"),
                             _label_builder(label_path, _ade_classes)))
  return tasks


def _humanparsing_classes(label: np.ndarray):
  # Every present id is a candidate, background (0) included, so "[semantic] background" is a prompt.
  return [(int(v), int(v), "[semantic] " + HUMANPARSING_CLASSES[int(v)])
          for v in np.unique(label) if v < len(HUMANPARSING_CLASSES)]


def read_humanparsing(src: str) -> list[ImageTask]:
  img_dir, lab_dir = os.path.join(src, "JPEGImages"), os.path.join(src, "SegmentationClassAug")
  _require([img_dir, lab_dir], "humanparsing", src)
  tasks = []
  for label_path in sorted(glob.glob(os.path.join(lab_dir, "*.png"))):
    stem = os.path.splitext(os.path.basename(label_path))[0]
    tasks.append(ImageTask("train", stem, os.path.join(img_dir, stem + ".jpg"),
                           _label_builder(label_path, _humanparsing_classes)))
  return tasks


# ---------------------------------------------------------------- COCO-json datasets (O365, parts)

def _coco_tasks(path: str, split: str, image_root: str, builder: Callable[[list[dict], dict], Build]):
  coco = _load_json(path)
  if not isinstance(coco, dict):
    raise UserError(f"{path}: expected a COCO-style object, found {type(coco).__name__}")
  try:
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_image = collections.defaultdict(list)
    for a in coco.get("annotations", []):
      by_image[a["image_id"]].append(a)
    unknown = sorted({str(a["category_id"]) for a in coco.get("annotations", []) if a["category_id"] not in cats})
    tasks = []
    for im in sorted(coco.get("images", []), key=lambda im: im["id"]):
      if by_image.get(im["id"]):
        tasks.append(ImageTask(split, str(im["id"]), os.path.join(image_root, im["file_name"]),
                               builder(by_image[im["id"]], cats), _stated_hw(im)))
  except (KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not COCO-style ({type(e).__name__}: {e}); images need id and file_name, categories "
                    "id and name, annotations image_id and category_id") from None
  if unknown:  # the prompt is the category's name: there is none to give
    raise UserError(f"{path}: annotations name {len(unknown)} category_id(s) not in \"categories\": "
                    + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
  return tasks


def _o365_builder(image_anns: list[dict], cats: dict) -> Build:
  def build(h: int, w: int):
    masks, entries = [], []
    for a in image_anns:
      seg = a.get("segmentation")
      rle = seg[0] if isinstance(seg, list) and seg else seg
      if not isinstance(rle, dict):  # the original requires a compressed-RLE dict in segmentation[0]
        continue
      entries.append(records.Entry(cats[a["category_id"]], len(masks),  # name as stored, no prefix
                                   {"ann_ids": [int(a["id"])], "class_id": int(a["category_id"])}))
      masks.append(union_rle(_rle_parts(rle, h, w), h, w))
    return entries, masks
  return build


def read_obj365(src: str) -> list[ImageTask]:
  root = os.path.join(src, "raw", "Objects365_v1", "2019-08-02")
  json_path, image_root = os.path.join(root, "o365_res_instances.json"), os.path.join(root, "train")
  _require([json_path, image_root], "obj365", src)
  return _coco_tasks(json_path, "train", image_root, _o365_builder)


def _part_builder(prompt: Callable[[str], str]) -> Callable[[list[dict], dict], Build]:
  """Parts made semantic: instances of one category name merged into one mask (docs/data.md#25-partimagenet-and-pascal-part)."""
  def make(image_anns: list[dict], cats: dict) -> Build:
    def build(h: int, w: int):
      parts_by_name: dict[str, list[dict]] = collections.defaultdict(list)
      ids_by_name: dict[str, list[int]] = collections.defaultdict(list)
      for a in image_anns:
        try:
          parts = _rle_parts(a["segmentation"], h, w)
        except Exception:  # pylint: disable=broad-except
          continue  # the original skips annotations that fail to rasterise (a few broken ones exist)
        if not parts:
          continue
        name = cats[a["category_id"]]
        parts_by_name[name] += parts
        ids_by_name[name].append(int(a["id"]))
      masks, entries = [], []
      for name in sorted(parts_by_name):
        entries.append(records.Entry(prompt(name), len(masks), {"ann_ids": ids_by_name[name]}))
        masks.append(union_rle(parts_by_name[name], h, w))
      return entries, masks
    return build
  return make


def read_partimagenet(src: str) -> list[ImageTask]:
  train_json = os.path.join(src, "annotations", "train", "train.json")
  _require([train_json, os.path.join(src, "images", "train")], "partimagenet", src)
  tasks = []
  for split in ("train", "val", "test"):
    path = os.path.join(src, "annotations", split, f"{split}.json")
    if os.path.exists(path):
      tasks += _coco_tasks(path, split, os.path.join(src, "images", split),
                           _part_builder(lambda n: "[semantic] " + n.lower()))
  return tasks


def read_pascal_part(src: str) -> list[ImageTask]:
  image_root = os.path.join(src, "VOCdevkit", "VOC2010", "JPEGImages")
  _require([os.path.join(src, "train.json"), image_root], "pascal_part", src)
  tasks = []
  for split in ("train", "val"):
    path = os.path.join(src, f"{split}.json")
    if os.path.exists(path):
      tasks += _coco_tasks(path, split, image_root,
                           _part_builder(lambda n: "[semantic] " + n.replace(":", " ")))
  return tasks


# ---------------------------------------------------------------- tasks -> records

def _image_size(data: bytes) -> tuple[int, int]:
  """(h, w) of the image as every later stage decodes it (`evf_jax.images.decode_image`: EXIF applied)."""
  return decode_image(data).shape[:2]


def _counts_text(counts: dict) -> str:
  return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing counted"


def task_records(tasks: list[ImageTask], skipped: collections.Counter) -> Iterator[tuple[str, records.Record]]:
  """(split, Record) of each usable task; what cannot be used is skipped and counted in `skipped`. A split whose
  every image is skipped raises EmptySplitError with that split's counts, once the others are done."""
  per_split: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  written: collections.Counter = collections.Counter()

  def skip(split: str, reason: str, n: int = 1) -> None:
    skipped[reason] += n
    per_split[split][reason] += n

  for task in tasks:
    per_split[task.split].update()  # the split exists even if all of it is skipped
    for reason, n in (task.counts or {}).items():
      skip(task.split, reason, n)
    if not task.path:  # carries the reader's counts only
      continue
    try:
      with open(task.path, "rb") as f:
        data = f.read()
    except OSError:
      skip(task.split, "missing_image")
      continue
    try:
      h, w = _image_size(data)
    except ImageReadError:
      skip(task.split, "corrupt_image")
      continue
    if task.expected_hw is not None and (h, w) != task.expected_hw:
      skip(task.split, "image_size_mismatch")  # e.g. an EXIF rotation the annotations were not made on
      continue
    try:
      entries, masks = task.build(h, w)
    except SkipImage as e:
      skip(task.split, e.reason)
      continue
    if not entries:
      skip(task.split, "no_prompts")
      continue
    written[task.split] += 1
    # source is filled in by write_dataset
    yield task.split, records.Record(source="", image_id=task.image_id, image=data, h=h, w=w,
                                     masks=masks, entries=entries)
  empty = [split for split in sorted(per_split) if not written[split]]
  if empty:
    raise EmptySplitError("; ".join(f"split {split}: every image was skipped ({_counts_text(per_split[split])})"
                                    for split in empty))


READERS: dict[str, Callable[[str], list[ImageTask]]] = {
    **{name: (lambda src, name=name: read_refer(name, src)) for name in REFER_DATASETS},
    "ade20k": read_ade20k,
    "obj365": read_obj365,
    "humanparsing": read_humanparsing,
    "partimagenet": read_partimagenet,
    "pascal_part": read_pascal_part,
}


# ---------------------------------------------------------------- your own data (`run.py prepare --dataset custom`)

CUSTOM = "custom"
CUSTOM_LAYOUT = ("SRC/SPLIT.jsonl, one image per line: {\"image\": PATH, \"objects\": [{\"texts\": [TEXT, ...], "
                 "\"mask\": PNG_PATH} or {\"texts\": [...], \"segmentation\": COCO polygons or RLE}, ...]} and/or "
                 "\"label_map\": PNG_PATH with SRC/classes.json; paths relative to SRC "
                 "(docs/data.md#27-your-own-data)")
CUSTOM_CLASSES = "classes.json"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+\Z")  # TFDS split names (no "-", "[" or "+": slicing syntax)


_MASK_MODES = ("1", "L", "P", "I", "LA", "PA", "RGB", "RGBA")  # others (CMYK, float, YCbCr, ...) are no mask


def _mask_file(path: str, h: int, w: int) -> bytes:
  """A mask image -> compressed RLE (docs/data.md#27-your-own-data): where the image uses transparency, its visible
  (alpha > 0) pixels; otherwise its nonzero ones (any colour channel; a palette image's index); a JPEG's at 128
  and above, since JPEG noise makes a 0 background nonzero. EXIF orientation applied, as the image's."""
  try:
    with Image.open(path) as im:
      raw_16bit = any(";16" in str(tile[3]) for tile in im.tile) and im.mode.startswith(("RGB", "LA"))
      if im.mode not in _MASK_MODES and not im.mode.startswith("I;16") or raw_16bit:
        raise SkipImage("unsupported_mask")  # Pillow reads 16-bit colour as its high byte: 1 would read as 0
      turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
      if (im.size[::-1] if not turned else im.size) != (h, w):
        raise SkipImage("mask_size_mismatch")  # found before decoding: a mask of another size may be huge
      jpeg = im.format == "JPEG"
      im = ImageOps.exif_transpose(im)
      alpha = None
      if im.mode in ("LA", "PA", "RGBA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3] if im.mode == "P" else np.asarray(im.getchannel("A"))
      arr = np.asarray(im)
  except FileNotFoundError:
    raise SkipImage("missing_mask") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    raise SkipImage("corrupt_mask") from None
  if alpha is not None and (alpha < 255).any():
    return records.encode_mask(alpha > 0)
  if arr.ndim == 3:
    arr = arr[..., :3].max(-1) if arr.shape[-1] >= 3 else arr[..., 0]  # RGB(A): the colours; LA/PA: L or P
  return records.encode_mask(arr >= 128 if jpeg else arr != 0)


def _custom_texts(obj: dict, where: str) -> list[str]:
  texts = obj.get("texts")
  texts = [texts] if isinstance(texts, str) else texts
  if not isinstance(texts, list) or not texts:
    raise UserError(f"{where}: an object needs \"texts\", a list of one or more prompts")
  check_prompts(texts, lambda i: f"{where}: text {i}")
  return texts


def _custom_line(item, where: str, src: str):
  """One line -> (image path, its id or None, [(texts, "mask" or "segmentation", value)], label map path or None),
  checked."""
  if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not item["image"]:
    raise UserError(f"{where}: expected an object with \"image\" (a path) and \"objects\"")
  label_map = item.get("label_map")
  if label_map is not None and (not isinstance(label_map, str) or not label_map):
    raise UserError(f"{where}: \"label_map\" must be a path")
  objects = item.get("objects", [] if label_map else None)
  if not isinstance(objects, list) or not (objects or label_map):
    raise UserError(f"{where}: \"objects\" must be a non-empty list (or give a \"label_map\")")
  image_id = item.get("id")
  if image_id is not None and (not isinstance(image_id, (str, int)) or isinstance(image_id, bool)):
    raise UserError(f"{where}: \"id\" must be a string or an integer")
  for key in ("height", "width"):
    if key in item and not (isinstance(item[key], int) and not isinstance(item[key], bool) and item[key] > 0):
      raise UserError(f"{where}: \"{key}\" must be a positive integer")
  out = []
  for k, obj in enumerate(objects):
    at = f"{where}: object {k}"
    if not isinstance(obj, dict):
      raise UserError(f"{at}: expected an object with \"texts\" and a \"mask\" or \"segmentation\"")
    texts = _custom_texts(obj, at)
    kinds = [key for key in ("mask", "segmentation") if key in obj]
    if len(kinds) != 1:
      raise UserError(f"{at}: give one of \"mask\" (a mask image's path) and \"segmentation\" (COCO polygons or "
                      "RLE)" + (", not both" if kinds else ""))
    value = obj[kinds[0]]
    if kinds[0] == "mask":
      if not isinstance(value, str) or not value:
        raise UserError(f"{at}: \"mask\" must be a path")
      value = os.path.join(src, value)
    elif not _is_segmentation(value):
      raise UserError(f"{at}: \"segmentation\" must be COCO polygons (a list of [x1, y1, x2, y2, ...] lists of at "
                      "least 3 points, finite numbers) or an RLE ({\"size\": [h, w], \"counts\": ...} whose runs "
                      "cover h x w pixels)")
    out.append((texts, kinds[0], value))
  return (os.path.join(src, item["image"]), (None if image_id is None else str(image_id)), out,
          os.path.join(src, label_map) if label_map else None)


def _custom_classes(src: str) -> dict[int, str]:
  """SRC/classes.json: the prompt of each label-map value, {"1": "[semantic] road", ...} or a list indexed by value."""
  path = os.path.join(src, CUSTOM_CLASSES)
  classes = _load_json(path)
  if isinstance(classes, list):
    classes = {str(i): name for i, name in enumerate(classes) if name is not None}
  if not isinstance(classes, dict) or not classes or not all(re.fullmatch(r"[0-9]+", k) for k in classes):
    raise UserError(f"{path}: expected a list of prompts (index = label value) or an object {{\"VALUE\": PROMPT}}")
  check_prompts(list(classes.values()), lambda i: f"{path}: prompt of value {list(classes)[i]}")
  return {int(k): v for k, v in classes.items()}


def _compressed_counts(text: str) -> Optional[list[int]]:
  """The run lengths of a COCO compressed RLE string (each count in 5-bit groups, offset by 48, bit 0x20 meaning "more";
  from the fourth on, a difference from the count two before), or None where it is no such string."""
  counts, i = [], 0
  while i < len(text):
    value, shift, more = 0, 0, True
    while more:
      if i == len(text):
        return None
      c = ord(text[i]) - 48
      if not 0 <= c < 64:
        return None
      value |= (c & 0x1f) << shift
      more = bool(c & 0x20)
      shift += 5
      i += 1
      if not more and c & 0x10:
        value -= 1 << shift  # negative: the sign bit of the last group
    counts.append(value + counts[-2] if len(counts) > 2 else value)
  return counts


def _is_segmentation(value) -> bool:
  def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

  def rle(v):
    if not (isinstance(v, dict) and isinstance(v.get("size"), list) and len(v["size"]) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v["size"])):
      return False
    counts = v.get("counts")
    if isinstance(counts, str):
      counts = _compressed_counts(counts)
    elif not (isinstance(counts, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in counts)):
      return False
    # Runs that do not cover the mask exactly would be read past their end.
    return bool(counts) and min(counts) >= 0 and sum(counts) == v["size"][0] * v["size"][1]

  def polygon(v):
    return isinstance(v, list) and len(v) >= 6 and len(v) % 2 == 0 and all(number(x) for x in v)
  if isinstance(value, dict):
    return rle(value)
  return isinstance(value, list) and bool(value) and (all(polygon(p) for p in value) or all(rle(r) for r in value))


def _custom_builder(objects: list[tuple[list[str], str, object]], line: int, label_map: Optional[str],
                    classes: dict[int, str]) -> Build:
  def build(h: int, w: int):
    label = None
    if label_map:  # first: a missing or damaged map skips the image before any mask is read
      if not os.path.exists(label_map):
        raise SkipImage("missing_label_map")
      label = _sized_label_map(label_map, h, w)
    masks, entries = [], []
    for k, (texts, kind, value) in enumerate(objects):
      if kind == "mask":
        masks.append(_mask_file(value, h, w))
      else:
        try:
          parts = _rle_parts(value, h, w)
        except Exception:  # pylint: disable=broad-except  # pycocotools raises bare Exceptions
          raise SkipImage("bad_segmentation") from None
        masks.append(union_rle(parts, h, w))
      entries += [records.Entry(text, k, {"line": line, "object": k}) for text in texts]
    if label is not None:  # values classes.json does not name are negatives
      named = _label_masks(label, lambda m: [(int(v), int(v), classes[int(v)]) for v in np.unique(m)
                                             if int(v) in classes], len(masks), {"line": line})
      entries, masks = entries + named[0], masks + named[1]
    return entries, masks
  return build


def read_custom(src: str) -> list[ImageTask]:
  """Your own images, prompts and masks (`CUSTOM_LAYOUT`): one split per SPLIT.jsonl. Texts are kept as written in
  every split. Lines that cannot be what the layout says are one UserError naming the file and line; images and
  mask files that are missing or unreadable are skipped and counted."""
  paths = sorted(glob.glob(os.path.join(src, "*.jsonl")))
  if not paths:
    raise UserError(f"{CUSTOM}: no SPLIT.jsonl file in {src}; expected {CUSTOM_LAYOUT}")
  tasks, classes = [], None
  for path in paths:
    split = os.path.basename(path)[:-len(".jsonl")]
    if not _SPLIT_NAME.match(split) or split == "all":  # TFDS reserves "all" (every split together)
      raise UserError(f"{path}: {split!r} is no split name (letters, digits and _ only; not 'all')")
    seen: dict[str, int] = {}
    try:
      with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as some Windows editors write, is skipped
        lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read {path}: {e}") from None
    if not any(text.strip() for text in lines):
      raise UserError(f"{path}: no images (an empty split; remove the file or fill it)")
    for number, text in enumerate(lines, 1):
      if not text.strip():
        continue
      where = f"{path}:{number}"
      try:
        item = json.loads(text)
      except ValueError as e:
        raise UserError(f"{where}: not JSON ({e})") from None
      image_path, image_id, objects, label_map = _custom_line(item, where, src)
      if label_map and classes is None:
        if not os.path.isfile(os.path.join(src, CUSTOM_CLASSES)):
          raise UserError(f"{where}: a \"label_map\" needs {os.path.join(src, CUSTOM_CLASSES)}, the prompt of each "
                          "label value")
        classes = _custom_classes(src)
      given_id = f" (id {image_id!r})" if image_id is not None else ""
      image_id = image_id if image_id is not None else os.path.relpath(image_path, src)
      for key in (os.path.realpath(image_path), "id " + image_id):
        if key in seen:
          raise UserError(f"{where}: image {item['image']!r}{given_id} is also on line {seen[key]}; put all of an "
                          "image's objects on one line")
        seen[key] = number
      tasks.append(ImageTask(split, image_id, image_path, _custom_builder(objects, number, label_map, classes or {}),
                             _stated_hw(item)))
  return tasks
