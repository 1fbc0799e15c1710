"""A procedural referring-segmentation dataset: no download, deterministic from a seed, exact masks.

Each image holds 3-6 non-overlapping shapes (circle, square, triangle) in 4 colours on a plain grey
background, at a random size between `min_size` and `max_size` per side (mostly non-square). Shapes and colours
are drawn from small sets so several objects usually share a shape or a colour; the expressions are generated
only where they are unambiguous, so a model has to read both the text and the image:

  "the red circle"                         colour + shape unique in the image
  "the circle"                             shape unique
  "the blue square on the left" / "right"  extreme of a group (colour+shape, shape or colour) along x,
  "the green shape at the top" / "bottom"  ... or along y, only if the gap to the runner-up is clear
  "the largest triangle" / "the smallest yellow shape"   extreme area, only if clearly larger/smaller
  "[semantic] circles"                     all circles (union), the semantic-level prompt (docs/data.md#11-prompt-forms)

Masks are rasterised analytically at pixel centres and the image is painted from the same masks, so
they are exact. Images are stored as PNG (lossless) in the common record format (data_pipelines/records.py).
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
from PIL import Image

from data_pipelines import records

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
_COLOUR_NAMES = tuple(COLOURS)


def _rasterise(shape: str, cy: float, cx: float, r: float, h: int, w: int) -> np.ndarray:
  """Exact {0,1} mask of one shape, tested at pixel centres. r = circumradius-like half size."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  if shape == "circle":
    m = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
  elif shape == "square":
    m = (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
  else:  # upward triangle with apex at top, base at the bottom of the [cy-r, cy+r] box
    top, bottom = cy - r, cy + r
    t = (y - top) / (2 * r)  # 0 at the apex, 1 at the base
    m = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= t * r)
  return m.astype(np.uint8)


def _place_objects(rng: np.random.Generator, h: int, w: int) -> list[dict]:
  n = int(rng.integers(3, 7))
  # Small pools per image make repeats of a shape or a colour likely, which is what makes the task need text.
  shapes = rng.choice(SHAPES, size=int(rng.integers(1, 3)) + 1, replace=False)
  colours = rng.choice(_COLOUR_NAMES, size=int(rng.integers(2, 4)), replace=False)
  objs: list[dict] = []
  for _ in range(200):  # rejection sampling of non-overlapping boxes
    if len(objs) == n:
      break
    r = float(rng.uniform(0.06, 0.2) * min(h, w))
    cy, cx = float(rng.uniform(r + 1, h - r - 1)), float(rng.uniform(r + 1, w - r - 1))
    if any(abs(cy - o["cy"]) < r + o["r"] + 2 and abs(cx - o["cx"]) < r + o["r"] + 2 for o in objs):
      continue
    objs.append({"shape": str(rng.choice(shapes)), "colour": str(rng.choice(colours)), "cy": cy, "cx": cx, "r": r})
  for o in objs:
    o["mask"] = _rasterise(o["shape"], o["cy"], o["cx"], o["r"], h, w)
    o["area"] = int(o["mask"].sum())
  return [o for o in objs if o["area"] > 0]


def _expressions(objs: list[dict]) -> list[tuple[str, list[int], dict]]:
  """(text, object indices whose union is the mask, ids) for every unambiguous expression."""
  out: list[tuple[str, list[int], dict]] = []

  def group(pred):
    return [i for i, o in enumerate(objs) if pred(o)]

  for i, o in enumerate(objs):
    c, s = o["colour"], o["shape"]
    if len(group(lambda p: p["colour"] == c and p["shape"] == s)) == 1:
      out.append((f"the {c} {s}", [i], {"object": i}))
    if len(group(lambda p: p["shape"] == s)) == 1:
      out.append((f"the {s}", [i], {"object": i}))
  groups = {}
  for s in SHAPES:
    groups[s] = group(lambda p, s=s: p["shape"] == s)
    for c in _COLOUR_NAMES:
      groups[f"{c} {s}"] = group(lambda p, c=c, s=s: p["shape"] == s and p["colour"] == c)
  for c in _COLOUR_NAMES:
    groups[f"{c} shape"] = group(lambda p, c=c: p["colour"] == c)
  for desc, members in groups.items():
    if len(members) < 2:
      continue
    rs = [objs[i]["r"] for i in members]
    for key, lo_word, hi_word, fmt in (("cx", "on the left", "on the right", "the {d} {w}"),
                                       ("cy", "at the top", "at the bottom", "the {d} {w}"),
                                       ("area", "smallest", "largest", "the {w} {d}")):
      vals = sorted((objs[i][key], i) for i in members)
      # Clear margin: positions must differ by half the smallest size, areas by 30 %.
      gap_ok = ((lambda a, b: b - a > 0.5 * min(rs)) if key != "area" else (lambda a, b: b > 1.3 * a))
      if gap_ok(vals[0][0], vals[1][0]):
        out.append((fmt.format(d=desc, w=lo_word), [vals[0][1]], {"object": vals[0][1]}))
      if gap_ok(vals[-2][0], vals[-1][0]):
        out.append((fmt.format(d=desc, w=hi_word), [vals[-1][1]], {"object": vals[-1][1]}))
  for s in SHAPES:
    if groups[s]:
      out.append((f"[semantic] {s}s", groups[s], {"class": s}))
  return out


def make_example(seed: int, split: str, index: int, min_size: int = 96, max_size: int = 320) -> records.Record:
  """The `index`-th synthetic image of `split`, a pure function of (seed, split, index)."""
  split_code = sum(split.encode())  # any stable per-split number keeps train and eval images different
  rng = np.random.default_rng([seed, split_code, index])
  h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
  objs = _place_objects(rng, h, w)
  background = np.array([int(rng.integers(90, 170))] * 3, np.uint8)
  image = np.broadcast_to(background, (h, w, 3)).copy()
  for o in objs:
    image[o["mask"].astype(bool)] = COLOURS[o["colour"]]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")

  masks: list[bytes] = []
  mask_of: dict[tuple[int, ...], int] = {}
  entries: list[records.Entry] = []
  for text, members, ids in _expressions(objs):
    key = tuple(sorted(members))
    if key not in mask_of:
      union = np.zeros((h, w), np.uint8)
      for i in key:
        union |= objs[i]["mask"]
      mask_of[key] = len(masks)
      masks.append(records.encode_mask(union))
    entries.append(records.Entry(text, mask_of[key], ids))
  return records.Record(source="synthetic", image_id=f"{split}-{index}", image=buf.getvalue(), h=h, w=w,
                        masks=masks, entries=entries)


def generate(seed: int, num_train: int, num_eval: int) -> Iterator[tuple[str, records.Record]]:
  """(split, record) pairs: `num_train` train images then `num_eval` "val" images."""
  for split, n in (("train", num_train), ("val", num_eval)):
    for i in range(n):
      yield split, make_example(seed, split, i)
