"""The grain pipeline: shapes, K padding, determinism, exact resume, disjoint process shards, mixture, eval."""

import collections
import dataclasses

import numpy as np
import pytest

from data_pipelines import pipeline, prepare, records, sources, transforms
from data_pipelines.transforms import SampleConfig
from evf_testing import data_fixtures as F

SMALL = SampleConfig(sam_size=128, max_text_len=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  tok = F.train_tokenizer(str(root))
  data_dir = str(root / "tfds")  # TFDS datasets, read with tfds.data_source
  prepare.build("synthetic", data_dir, num_train=12, num_eval=4, seed=0, progress=False)
  F.write_refer(str(root / "raw"), "refcoco")
  prepare.build("refcoco", data_dir, str(root / "raw"), progress=False)
  return tok, str(root / "tfds" / "synthetic"), str(root / "tfds" / "refcoco")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_spec_with_default_sizes(data):
  tok, syn, _ = data
  ds = pipeline.train_dataset({"syn": (1, [syn])}, tok, global_batch_size=2, seed=0, process_index=0,
                              process_count=1)
  (b,) = _take(pipeline.train_iterator(ds), 1)
  expect = {"sam_image": ((2, 1024, 1024, 3), np.uint8), "beit_image": ((2, 224, 224, 3), np.float32),
            "input_ids": ((2, 3, 64), np.int32), "attention_mask": ((2, 3, 64), bool),
            "prompt_valid": ((2, 3), bool), "masks": ((2, 3, 1024, 1024), np.uint8),
            "valid_region": ((2, 1024, 1024), bool), "resize_hw": ((2, 2), np.int32),
            "orig_hw": ((2, 2), np.int32), "source_id": ((2,), np.int32)}
  assert set(b) == set(pipeline.BATCH_KEYS) == set(expect)
  for k, (shape, dtype) in expect.items():
    assert b[k].shape == shape and b[k].dtype == dtype, k
  for i in range(2):
    h, w = b["resize_hw"][i]
    assert max(h, w) == 1024 and h != w  # not square: a transposed region would show
    np.testing.assert_array_equal(b["valid_region"][i], (np.arange(1024)[:, None] < h) & (np.arange(1024) < w))
    assert not b["sam_image"][i, h:].any() and not b["sam_image"][i, :, w:].any()
    assert not b["masks"][i][:, h:].any()
  assert (b["input_ids"][..., 0] == 0).all() and b["attention_mask"].sum(-1).min() >= 3


def test_prompt_padding_and_masks_match_records(data):
  tok, _, ref = data
  cfg = SampleConfig(sam_size=128, max_text_len=16, num_prompts=5)
  ds = pipeline.train_dataset({"refer_seg": (1, [ref])}, tok, global_batch_size=1, seed=0, sample=cfg,
                              process_index=0, process_count=1)
  (b,) = _take(pipeline.train_iterator(ds), 1)
  (rec,) = records.read_records(ref, "train")  # the only train image has 3 sentences
  assert b["prompt_valid"][0].tolist() == [True, True, True, False, False]
  for j, e in enumerate(rec.entries):
    np.testing.assert_array_equal(b["masks"][0, j], transforms.mask_to_frame(rec.mask(e.mask_index), 128,
                                                                             "longest_side"))
    np.testing.assert_array_equal(b["input_ids"][0, j], transforms.encode_text(tok, e.text, 16))
  assert not b["masks"][0, 3:].any() and (b["input_ids"][0, 3:] == 1).all() and not b["attention_mask"][0, 3:].any()
  assert b["orig_hw"][0].tolist() == [48, 64] and b["resize_hw"][0].tolist() == [96, 128]


def test_choose_entries_without_replacement():
  rng = np.random.default_rng(0)
  counts = collections.Counter()
  for _ in range(3000):
    c = transforms.choose_entries(6, 3, rng)
    assert len(set(c)) == 3 and c == sorted(c)
    counts.update(c)
  assert all(abs(v / 3000 - 0.5) < 0.05 for v in counts.values())
  assert transforms.choose_entries(2, 3, rng) == [0, 1]


def test_same_seed_same_batches_and_exact_resume(data):
  tok, syn, ref = data
  mix = {"syn": (3, [syn]), "refer_seg": (1, [ref])}
  make = lambda seed: pipeline.train_dataset(mix, tok, global_batch_size=4, seed=seed, sample=SMALL,
                                             process_index=0, process_count=1)
  first = _take(pipeline.train_iterator(make(7)), 5)
  _assert_batches_equal(first, _take(pipeline.train_iterator(make(7)), 5))
  other = _take(pipeline.train_iterator(make(8)), 1)[0]
  assert not np.array_equal(other["orig_hw"], first[0]["orig_hw"])
  it = pipeline.train_iterator(make(7))
  _take(it, 2)
  state = it.get_state()
  resumed = pipeline.train_iterator(make(7))
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), first[2:])


def test_each_epoch_is_shuffled_and_prompts_are_drawn_anew_each_visit(data):
  """The 12 training images are read in an order that is not the files' and every image once an epoch; an image
  seen again gets other prompts (a synthetic image has 16-39 sentences, a sample takes 3)."""
  tok, syn, _ = data
  cfg = SampleConfig(sam_size=32, max_text_len=8, mask_size=16, beit_size=16)
  ds = pipeline.train_dataset({"syn": (1, [syn])}, tok, global_batch_size=1, seed=5, sample=cfg,
                              process_index=0, process_count=1)
  source = sources.open_split(syn, "train")
  files = [transforms.image_inputs(source[i], cfg)["sam_image"].tobytes() for i in range(len(source))]
  assert len(set(files)) == len(files) == 12
  visits = collections.defaultdict(list)
  order = []
  for j in range(3 * len(files)):
    b = ds[j]
    order.append(files.index(b["sam_image"][0].tobytes()))
    visits[order[-1]].append(b["input_ids"][0].tobytes())
  for epoch in range(3):
    assert sorted(order[12 * epoch:12 * epoch + 12]) == list(range(12)), order
  assert order[:12] != list(range(12)), order
  assert sum(len(set(v)) > 1 for v in visits.values()) >= 10, {k: len(set(v)) for k, v in visits.items()}


def test_process_shards_are_disjoint_and_complete(data):
  tok, syn, ref = data
  mix = {"syn": (1, [syn]), "refer_seg": (1, [ref])}
  make = lambda p, n: pipeline.train_dataset(mix, tok, global_batch_size=4, seed=1, sample=SMALL,
                                             process_index=p, process_count=n)
  glob = make(0, 1)
  parts = [make(p, 2) for p in range(2)]
  for j in range(3):  # process p's j-th batch = samples p, p+2 of global batch j: disjoint, together complete
    g = glob[j]
    for p in range(2):
      local = parts[p][j]
      for k in g:
        np.testing.assert_array_equal(local[k], g[k][p::2], err_msg=k)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_dataset(mix, tok, global_batch_size=3, seed=1, process_index=0, process_count=2)


def test_mixture_is_iid_with_weights(data):
  mix = pipeline.Mixture.of({"obj365": (1, ["o"]), "refer_seg": (3, ["a", "b", "c"])})
  assert mix.dirs() == ["o", "a", "b", "c"]
  np.testing.assert_allclose(mix.dir_probabilities(), [0.25, 0.25, 0.25, 0.25])
  sel = pipeline.IIDSelection([0.5, 0.3, 0.2], seed=3)
  picks = [sel[i] for i in range(20000)]
  assert all(idx == i for i, (_, idx) in enumerate(picks))
  freq = np.bincount([d for d, _ in picks], minlength=3) / len(picks)
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)
  assert [sel[i] for i in range(50)] == [pipeline.IIDSelection([0.5, 0.3, 0.2], seed=3)[i] for i in range(50)]
  # i.i.d., not interleaved: runs of the same source occur
  ds = [d for d, _ in picks[:200]]
  assert max(len(r) for r in "".join(map(str, ds)).replace("1", " ").replace("2", " ").split()) >= 3
  tok, syn, ref = data
  ds = pipeline.train_dataset({"syn": (1, [syn]), "refer_seg": (0, [ref])}, tok, global_batch_size=2, seed=0,
                              sample=SMALL, process_index=0, process_count=1)
  assert all((ds[j]["source_id"] == 0).all() for j in range(3))  # weight 0 is never drawn


def test_source_id_is_the_dir_drawn_as_often_as_its_weight_says(data):
  """`source_id` is the sample's index in `Mixture.dirs()` (the refcoco fixture's only train image is 48 x 64,
  none of the synthetic ones is); with weights 3 : 1 about a quarter of the samples come from the second."""
  tok, syn, ref = data
  cfg = SampleConfig(sam_size=32, max_text_len=8, mask_size=16, beit_size=16)
  make = lambda mix, b: pipeline.train_dataset(mix, tok, global_batch_size=b, seed=0, sample=cfg,  # noqa: E731
                                               process_index=0, process_count=1)
  only_ref = make({"syn": (0, [syn]), "refer_seg": (1, [ref])}, 2)
  assert all((only_ref[j]["source_id"] == 1).all() for j in range(2))
  mixed = make({"syn": (3, [syn]), "refer_seg": (1, [ref])}, 8)
  batches = [mixed[j] for j in range(20)]
  ids = np.concatenate([b["source_id"] for b in batches])
  from_ref = np.concatenate([(b["orig_hw"] == [48, 64]).all(-1) for b in batches])
  np.testing.assert_array_equal(ids, from_ref.astype(np.int32))
  assert 0.15 < ids.mean() < 0.35, ids.mean()


def test_mixture_spec_mistakes_and_single_locations():
  tfds_dir = sources.TfdsDataset("synthetic", "/data")
  assert pipeline.Mixture.of({"a": (2, tfds_dir), "b": (1, "some/dir")}).dirs() == [tfds_dir, "some/dir"]
  for spec, expect in (({"a": (-1, ["x"])}, "needs weight >= 0 and at least one dir"),
                       ({"a": (1, [])}, "needs weight >= 0 and at least one dir"),
                       ({"a": (0, ["x"]), "b": (0, ["y"])}, "mixture weights sum to 0")):
    with pytest.raises(ValueError, match=expect):
      pipeline.Mixture.of(spec)


def test_the_image_cache_keeps_datasets_apart(data):
  """Two datasets may name the same image id with other pixels and masks (refcoco and refcoco+ both use COCO's ids):
  the cache is keyed by the source as well."""
  tok, syn, ref = data
  cfg = SampleConfig(sam_size=64, max_text_len=8, mask_size=32, beit_size=32)
  a = sources.read_records(syn, "train")[0]
  b = dataclasses.replace(sources.read_records(ref, "train")[0], image_id=a.image_id)
  transform, rng = pipeline.TrainTransform(tok, cfg, cache_images=True), np.random.default_rng(0)
  transform((0, a), rng)
  np.testing.assert_array_equal(transform((1, b), rng)["sam_image"], transforms.image_inputs(b, cfg)["sam_image"])


def test_global_arrays_on_8_devices(data):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  tok, syn, _ = data
  ds = pipeline.train_dataset({"syn": (1, [syn])}, tok, global_batch_size=8, seed=0,
                              sample=SampleConfig(sam_size=64, max_text_len=8))
  local = ds[0]
  mesh = jax.make_mesh((8,), ("data",))
  batch = pipeline.make_global_batch(local, NamedSharding(mesh, P("data")))
  assert batch["masks"].shape == (8, 3, 64, 64) and len(batch["masks"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])


def test_eval_dataset_keeps_every_sentence_at_original_size(data):
  tok, _, ref = data
  (ex,) = list(pipeline.eval_dataset(ref, "testA", tok, low_res=32, sample=SMALL, process_index=0, process_count=1))
  (rec,) = records.read_records(ref, "testA")
  assert ex["texts"] == ["big box", "square thing"] and ex["masks"].shape == (2, rec.h, rec.w)
  np.testing.assert_array_equal(ex["masks"][0], rec.mask(rec.entries[0].mask_index))
  assert ex["input_ids"].shape == (2, 16) and ex["sam_image"].shape == (128, 128, 3)
  _, syn, _ = data
  ids = [[e["image_id"] for e in pipeline.eval_dataset(syn, "val", tok, low_res=32, sample=SMALL, process_index=p,
                                                       process_count=3)] for p in range(3)]
  flat = sum(ids, [])
  assert sorted(flat) == sorted(f"val-{i}" for i in range(4)) and len(set(flat)) == 4
  # `index` is the image's place in the split's files (evaluation slots and overlays), whatever the process
  files = sources.open_split(syn, "val")
  seen = [(e["index"], e["image_id"]) for p in range(3) for e in pipeline.eval_dataset(
      syn, "val", tok, low_res=32, sample=SMALL, process_index=p, process_count=3)]
  assert sorted(i for i, _ in seen) == list(range(4))
  assert all(files[i].image_id == image_id for i, image_id in seen), seen


@pytest.mark.slow  # ~50 s here: every grain worker process re-imports jax and the test modules
def test_resume_with_worker_processes(data):
  tok, syn, _ = data
  ds = pipeline.train_dataset({"syn": (1, [syn])}, tok, global_batch_size=2, seed=4, sample=SMALL,
                              process_index=0, process_count=1)
  it = pipeline.train_iterator(ds, worker_count=1)
  try:
    _take(it, 2)
    state = it.get_state()
    after = _take(it, 2)
  finally:
    it.close()
  resumed = pipeline.train_iterator(ds, worker_count=1)
  try:
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), after)
  finally:
    resumed.close()
  _assert_batches_equal(after, [ds[2], ds[3]])  # workers produce exactly the in-process batches
  del after


def test_sam2_square_mode(data):
  tok, syn, _ = data
  cfg = SampleConfig(sam_size=64, max_text_len=8, sam_mode="square", mask_size=32)
  b = pipeline.train_dataset({"syn": (1, [syn])}, tok, global_batch_size=2, seed=0, sample=cfg,
                             process_index=0, process_count=1)[0]
  assert (b["resize_hw"] == 64).all() and b["valid_region"].all() and b["masks"].shape == (2, 3, 32, 32)
  assert b["masks"][b["prompt_valid"]].reshape(-1, 32 * 32).any(1).all()  # stretched masks stay non-empty


def test_cached_images_give_the_same_batches(data):
  """cache_images keeps each image's frames and masks: later epochs must give exactly the batches without it."""
  tok, syn, ref = data
  cfg = SampleConfig(sam_size=64, max_text_len=8, num_prompts=4, mask_size=32, beit_size=32)
  make = lambda cache: pipeline.train_iterator(pipeline.train_dataset(  # noqa: E731
      {"syn": (1, [syn]), "ref": (1, [ref])}, tok, global_batch_size=4, seed=3, sample=cfg, process_index=0,
      process_count=1, cache_images=cache), read_threads=2)
  plain, cached = _take(make(False), 12), _take(make(True), 12)  # 48 samples of 12 + 2 images: several epochs
  _assert_batches_equal(plain, cached)
  # ... and the cache is used: the second sample of an image reuses its frame object.
  transform = pipeline.TrainTransform(tok, cfg, cache_images=True)
  rec = next(iter(sources.read_records(syn, "train")))
  rng = np.random.default_rng(0)
  assert transform((0, rec), rng)["sam_image"] is transform((0, rec), rng)["sam_image"]
