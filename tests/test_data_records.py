"""Record format, the restricted unpickler, and the synthetic dataset."""

import collections
import os
import pickle
import pickletools

import numpy as np
import pytest

from data_pipelines import records, safe_pickle, synthetic



class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_safe_pickle_loads_plain_data():
  refs = [{"ref_id": 1, "ann_id": [1, -1], "sentences": [{"sent": "the man", "sent_id": 3}], "x": 1.5,
           "ok": True, "none": None, "t": (1, 2)}]
  assert safe_pickle.loads(pickle.dumps(refs, protocol=2)) == refs
  assert safe_pickle.loads(pickle.dumps(refs, protocol=5)) == refs


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_safe_pickle_refuses_code(protocol):
  data = pickle.dumps([{"a": _Evil()}], protocol=protocol)
  with pytest.raises(safe_pickle.UnsafePickleError):
    safe_pickle.loads(data)


def test_safe_pickle_refuses_any_global():
  for obj in (np.zeros(2), pickle.Pickler, {1, 2}):  # a set needs the `builtins.set` global at protocol 2
    data = pickle.dumps(obj, protocol=2)
    with pytest.raises(safe_pickle.UnsafePickleError):
      safe_pickle.loads(data)


def test_safe_pickle_reads_python2_strings():
  # Python 2 writes `str` as SHORT_BINSTRING (bytes); "caf\xc3\xa9" is UTF-8 for "café".
  sent = "caf\u00e9".encode("utf-8")
  data = (b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U" + bytes([len(sent)]) + sent +
          b"q\x03U\x06ref_idq\x04K\x07ua.")
  pickletools.dis(data, out=open(os.devnull, "w"))  # well-formed
  assert safe_pickle.loads(data) == [{"sent": "caf\u00e9", "ref_id": 7}]


def test_record_roundtrip():
  m = np.zeros((5, 7), np.uint8)
  m[1:3, 2:6] = 1
  rec = records.Record("refcoco", "12", b"\xff\xd8jpeg", 5, 7, [records.encode_mask(m)],
                       [records.Entry("the dog", 0, {"ref_id": 3, "ann_ids": [4]})])
  back = records.deserialize(records.serialize(rec))
  assert back == rec
  np.testing.assert_array_equal(back.mask(0), m)
  bad = records.serialize(rec).replace(b"\xa1v\x01", b"\xa1v\x02")
  with pytest.raises(ValueError, match="version"):
    records.deserialize(bad)


def test_synthetic_is_deterministic_and_exact():
  a, b = synthetic.make_example(5, "train", 3), synthetic.make_example(5, "train", 3)
  assert records.serialize(a) == records.serialize(b)
  assert records.serialize(synthetic.make_example(6, "train", 3)) != records.serialize(a)
  assert records.serialize(synthetic.make_example(5, "val", 3)) != records.serialize(a)
  # ... by their pixels, not only their ids: an eval image that is a train image measures memory
  train = {synthetic.make_example(5, "train", i).image for i in range(4)}
  assert not train & {synthetic.make_example(5, "val", i).image for i in range(4)}
  sizes = set()
  for i in range(20):
    rec = synthetic.make_example(0, "train", i)
    sizes.add((rec.h, rec.w))
    from evf_jax.images import decode_image
    img = decode_image(rec.image)
    background = img[0, 0]
    # Every mask is exactly a set of coloured pixels, and single-object masks have one colour.
    for e in rec.entries:
      m = rec.mask(e.mask_index).astype(bool)
      assert m.any()
      assert not (img[m] == background).all(axis=-1).any()
      if "object" in e.ids:
        assert len(np.unique(img[m], axis=0)) == 1
  assert any(h != w for h, w in sizes) and len(sizes) > 10


def test_synthetic_expressions_need_text_and_image():
  texts, shared = [], 0
  for i in range(30):
    rec = synthetic.make_example(1, "train", i)
    texts += [e.text for e in rec.entries]
    shared += len(rec.masks) < len(rec.entries) or any("left" in e.text for e in rec.entries)
  assert any(t.startswith("[semantic] ") for t in texts)
  for word in ("left", "right", "top", "bottom", "largest", "smallest", "red", "circle", "square", "triangle"):
    assert any(word in t for t in texts), word
  assert shared > 20  # most images have objects that share a shape or a colour


def _objects_from_pixels(rec):
  """A synthetic image's objects read back from its pixels alone: one (mask, shape, colour) per connected
  non-background region. Shape from how much of its bounding box it fills (square 1, circle ~pi/4, triangle ~1/2);
  colour from which channels are bright."""
  from scipy import ndimage
  from evf_jax.images import decode_image
  img = decode_image(rec.image).astype(int)
  labels, n = ndimage.label((img != img[0, 0]).any(-1))  # a corner is never inside a shape
  objs = []
  for k in range(1, n + 1):
    m = labels == k
    ys, xs = np.nonzero(m)
    fill = m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.95 else "circle" if fill > 0.62 else "triangle"
    r, g, b = img[ys[0], xs[0]]
    colour = ("yellow" if r > 150 and g > 150 else "red" if r > 150 else "green" if g > max(r, b) else "blue")
    objs.append({"mask": m, "shape": shape, "colour": colour, "area": int(m.sum()),
                 "x": (xs.min() + xs.max()) / 2, "y": (ys.min() + ys.max()) / 2})
  return objs


def _matches(o, desc):
  words = desc.split()
  return all(w == o["colour"] or w == o["shape"] or w == "shape" for w in words) and len(words) <= 2


def test_synthetic_expressions_are_true_of_their_masks():
  """Each expression, checked against the objects seen in the image: "the red circle" is the one red circle,
  "on the left" the leftmost of its group by a clear margin, "largest" clearly the largest, "[semantic] circles"
  every circle. A swapped word or a dropped uniqueness check would train the model on false text."""
  import re
  extremes = {"on the left": ("x", -1), "on the right": ("x", 1), "at the top": ("y", -1),
              "at the bottom": ("y", 1), "smallest": ("area", -1), "largest": ("area", 1)}
  checked = collections.Counter()
  for i in range(40):
    rec = synthetic.make_example(2, "train", i)
    objs = _objects_from_pixels(rec)
    for e in rec.entries:
      got = rec.mask(e.mask_index).astype(bool)
      if (m := re.fullmatch(r"\[semantic\] (circle|square|triangle)s", e.text)):
        want = [o for o in objs if o["shape"] == m[1]]
        np.testing.assert_array_equal(got, np.any([o["mask"] for o in want], 0), err_msg=e.text)
        checked["semantic"] += 1
        continue
      m = (re.fullmatch(r"the (smallest|largest) (.+)", e.text)
           or re.fullmatch(r"the (.+) (on the left|on the right|at the top|at the bottom)", e.text))
      word, desc = (m[1], m[2]) if m and m[1] in extremes else (m[2], m[1]) if m else (None, e.text[4:])
      group = [o for o in objs if _matches(o, desc)]
      (target,) = [o for o in group if np.array_equal(o["mask"], got)] or [None]
      assert target is not None, (i, e.text)  # the mask is exactly one object of the group the text names
      if word is None:
        assert len(group) == 1, (i, e.text)  # "the red circle": the only one
        checked["unique"] += 1
        continue
      key, sign = extremes[word]
      others = [o[key] for o in group if o is not target]
      assert others, (i, e.text)  # an extreme of a group of one says nothing
      if key == "area":  # clearly larger/smaller: 25 % at least
        assert (target[key] >= 1.25 * max(others)) if sign > 0 else (1.25 * target[key] <= min(others)), (i, e.text)
      else:  # clearly further along that side: 1.5 pixels at least between bounding-box centres
        assert sign * (target[key] - (max(others) if sign > 0 else min(others))) >= 1.5, (i, e.text)
      checked[word] += 1
  assert len(checked) == 8 and min(checked.values()) >= 3, checked  # every form was seen
