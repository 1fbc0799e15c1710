"""Record format, the restricted unpickler, and the synthetic dataset."""

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
