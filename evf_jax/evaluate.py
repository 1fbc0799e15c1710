"""Referring-segmentation evaluation (gIoU / cIoU) of EVF-SAM on prepared datasets, jitted and sharded.

The protocol is EVF-SAM's eval.py (DATA_SPEC §4.2, metrics in `evf_jax.metrics`): every sentence of every
ref of the split is one prompt (already `strip().lower()`-ed in the prepared records), prediction =
logits > 0 after SAM's postprocess to the ORIGINAL image size, compared with the GT mask there. Every image
is evaluated exactly once (the original's DistributedSampler repeats images to fill the last batch; we pad
with masked-out slots instead).

Split names and data directories:
  "DATASET|SPLITBY|SPLIT", as eval.py names them: refcoco|unc|val, refcoco|unc|testA, refcoco|unc|testB,
  refcoco+|unc|{val,testA,testB}, refcocog|umd|{val,test} (the eight standard splits), plus
  refclef|unc|{val,testA,testB,testC}, grefcoco|unc|{val,testA,testB}, and "synthetic|val".
  SPLIT is the split inside DATA/DATASET, a directory written by
  `run.py prepare --dataset DATASET --out DATA/DATASET` (DATA may also be one prepared directory itself).

One step, for B images (B a multiple of the device count; the batch axis is sharded over a 1-D "data"
mesh, params are replicated):
  host    B images with all their sentences, padded to K prompt slots (power-of-two bucket of the most
          sentences in the batch), GT masks and postprocess matrices padded to S x S (S = the largest side
          in the batch rounded up to `size_multiple`); padding slots have prompt_valid = False and padding
          pixels lie outside orig_hw. A look-ahead window of images is sorted by (K, S) so batches are
          homogeneous and few shapes compile.
  device  SAM image embedding once per image; BEiT-3 + decoder for its K prompts; postprocess as
          A_y @ low_res @ A_x^T; (I, U) per prompt slot, int32 (B, K).
  host    one transfer of (I, U) per step (fetched one step late, so the device runs ahead), summed
          exactly (metrics.IoUAccumulator).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from evf_jax import metrics, postprocess
from evf_jax.errors import UserError

STANDARD_SPLITS = ("refcoco|unc|val", "refcoco|unc|testA", "refcoco|unc|testB",
                   "refcoco+|unc|val", "refcoco+|unc|testA", "refcoco+|unc|testB",
                   "refcocog|umd|val", "refcocog|umd|test")
# splitBy of each refer dataset: the one partition `run.py prepare` reads (data_pipelines.readers).
REFER_SPLIT_BY = {"refclef": "unc", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}
SYNTHETIC = "synthetic"

# Logical-axis rules for evaluation: the batch axis over the mesh's "data" axis, everything else
# replicated (params are small enough to replicate for inference).
AXIS_RULES = (("batch", "data"),)

# A prediction function: (params, batch) -> logits (B, K, S, S) at the original resolution (padded).
PredictFn = Callable[[Any, dict], Any]


# ---------------------------------------------------------------- split names and data directories

@dataclasses.dataclass(frozen=True)
class EvalSplit:
  name: str     # as the user wrote it, e.g. "refcoco|unc|val"
  dataset: str  # the prepared directory's dataset, e.g. "refcoco"
  split: str    # the split inside it, e.g. "val"

  @property
  def tag(self) -> str:
    """File-name form: refcoco_unc_val, refcoco+_unc_testA, synthetic_val."""
    return self.name.replace("|", "_")


def parse_split(name: str) -> EvalSplit:
  parts = name.split("|")
  dataset = parts[0]
  if dataset == SYNTHETIC:
    if len(parts) != 2:
      raise UserError(f"split {name!r}: the synthetic set is named 'synthetic|SPLIT', e.g. 'synthetic|val'")
    split = parts[1]
  elif dataset in REFER_SPLIT_BY:
    if len(parts) != 3:
      raise UserError(f"split {name!r}: expected DATASET|SPLITBY|SPLIT, e.g. 'refcoco|unc|val'")
    if parts[1] != REFER_SPLIT_BY[dataset]:
      raise UserError(f"split {name!r}: {dataset} is prepared from its {REFER_SPLIT_BY[dataset]!r} "
                      f"partition only (use '{dataset}|{REFER_SPLIT_BY[dataset]}|{parts[2]}')")
    split = parts[2]
  else:
    known = ", ".join(sorted(REFER_SPLIT_BY) + [SYNTHETIC])
    raise UserError(f"split {name!r}: unknown dataset {dataset!r} (known: {known})")
  if not split:
    raise UserError(f"split {name!r}: empty split name")
  if split == "train":
    raise UserError(f"split {name!r}: train records keep raw sentences and are not an evaluation split")
  return EvalSplit(name, dataset, split)


def expand_splits(names: Sequence[str]) -> list[EvalSplit]:
  """Parses --split values in order, "standard" standing for the eight standard splits; no duplicates."""
  out: list[EvalSplit] = []
  for n in names:
    for m in (STANDARD_SPLITS if n == "standard" else (n,)):
      s = parse_split(m)
      if s not in out:
        out.append(s)
  return out


def resolve_data_dir(data: str, split: EvalSplit) -> tuple[str, dict]:
  """The prepared directory holding `split` -> (its path, its meta.json). UserError if absent."""
  from data_pipelines import records
  if not os.path.isdir(data):
    raise UserError(f"--data {data}: no such directory")
  if os.path.isfile(os.path.join(data, records.META_FILE)):
    directory = data  # --data is one prepared dataset
  else:
    directory = os.path.join(data, split.dataset)
    if not os.path.isfile(os.path.join(directory, records.META_FILE)):
      raise UserError(f"{split.name}: no prepared dataset at {directory} (write it with `run.py prepare "
                      f"--dataset {split.dataset} --out {directory}`)")
  try:
    meta = records.read_meta(directory)
  except (OSError, ValueError) as e:
    raise UserError(f"{directory}: {e}") from None
  if meta.get("dataset") != split.dataset:
    raise UserError(f"{split.name}: {directory} holds dataset {meta.get('dataset')!r}, not {split.dataset!r}")
  splits = meta.get("splits", {})
  if split.split not in splits:
    raise UserError(f"{split.name}: {directory} has no split {split.split!r} "
                    f"(it has: {', '.join(sorted(splits)) or 'none'})")
  return directory, meta


# ---------------------------------------------------------------- host side: examples -> padded batches

def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class _AddMatrices:
  """eval example -> the same plus its file-order index and unpadded postprocess matrices (in grain threads)."""

  def __init__(self, low_res: int, img_size: int):
    self.low_res, self.img_size = low_res, img_size

  def __call__(self, index: int, ex: dict) -> dict:
    a_y, a_x = postprocess.mask_postprocess_matrices(tuple(int(v) for v in ex["resize_hw"]),
                                                     tuple(int(v) for v in ex["orig_hw"]),
                                                     low_res=self.low_res, img_size=self.img_size)
    return dict(ex, index=index, a_y=a_y, a_x=a_x)


def _last_token(mask: np.ndarray) -> int:
  """1 + the last column holding a real token (not the count: an id may equal <pad> mid-sentence)."""
  cols = np.flatnonzero(np.asarray(mask).any(axis=0))
  return int(cols[-1]) + 1 if cols.size else 0


@dataclasses.dataclass(frozen=True)
class Slot:
  """Who sits in one image slot of a batch (for the host-side bookkeeping)."""
  index: int  # file order within the split
  image_id: str
  texts: tuple[str, ...]


class Batcher:
  """Ragged eval examples -> fixed-shape numpy batches (see the module docstring) and their slots.

  batch_images: images per batch (already a multiple of the device count); lookahead: how many batches'
  worth of images are sorted together by shape bucket (metrics are order-independent).
  """

  def __init__(self, batch_images: int, *, size_multiple: int = 128, lookahead: int = 16,
               text_buckets: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024), min_prompts: int = 2,
               pad_id: int = 1, bos_id: int = 0, eos_id: int = 2):
    self.batch_images, self.size_multiple, self.lookahead = batch_images, size_multiple, lookahead
    self.text_buckets, self.min_prompts = tuple(sorted(text_buckets)), min_prompts
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

  def _k(self, ex) -> int:
    return _pow2_at_least(max(self.min_prompts, len(ex["texts"])))

  def _s(self, ex) -> int:
    return _round_up(int(max(ex["orig_hw"])), self.size_multiple)

  def batches(self, examples: Iterable[dict]) -> Iterator[tuple[dict, list[Optional[Slot]]]]:
    window = self.batch_images * self.lookahead
    buf: list[dict] = []
    for ex in examples:
      buf.append(ex)
      if len(buf) == window:
        yield from self._flush(buf)
        buf = []
    yield from self._flush(buf)

  def _flush(self, buf: list[dict]):
    buf = sorted(buf, key=lambda e: (self._k(e), self._s(e), e["index"]))
    for i in range(0, len(buf), self.batch_images):
      yield self.assemble(buf[i:i + self.batch_images])

  def assemble(self, exs: list[dict]) -> tuple[dict, list[Optional[Slot]]]:
    b = self.batch_images
    k = max(self._k(e) for e in exs)
    s = max(self._s(e) for e in exs)
    longest = max(_last_token(e["attention_mask"]) for e in exs)
    length = next((t for t in self.text_buckets if t >= longest), longest)
    sam_size = exs[0]["sam_image"].shape[0]
    beit_shape = exs[0]["beit_image"].shape
    low = exs[0]["a_y"].shape[1]
    # Filler prompts "<s></s>" keep every text row non-empty; their results are masked out.
    ids = np.full((b, k, length), self.pad_id, np.int32)
    ids[:, :, 0], ids[:, :, 1] = self.bos_id, self.eos_id
    mask = np.zeros((b, k, length), bool)
    mask[:, :, :2] = True
    batch = {
        "sam_image": np.zeros((b, sam_size, sam_size, 3), np.uint8),
        "resize_hw": np.full((b, 2), sam_size, np.int32),
        "beit_image": np.zeros((b,) + beit_shape, np.float32),
        "input_ids": ids, "attention_mask": mask,
        "prompt_valid": np.zeros((b, k), bool),
        "masks": np.zeros((b, k, s, s), np.uint8),
        "a_y": np.zeros((b, s, low), np.float32), "a_x": np.zeros((b, s, low), np.float32),
        "orig_hw": np.zeros((b, 2), np.int32),
    }
    slots: list[Optional[Slot]] = [None] * b
    for i, e in enumerate(exs):
      n = len(e["texts"])
      h, w = (int(v) for v in e["orig_hw"])
      batch["sam_image"][i] = e["sam_image"]
      batch["resize_hw"][i] = e["resize_hw"]
      batch["beit_image"][i] = e["beit_image"]
      t = min(length, e["input_ids"].shape[1])  # examples come padded to max_text_len; cut to the bucket
      batch["input_ids"][i, :n, :t] = e["input_ids"][:, :t]
      batch["attention_mask"][i, :n, :t] = e["attention_mask"][:, :t]
      batch["prompt_valid"][i, :n] = True
      batch["masks"][i, :n, :h, :w] = e["masks"]
      batch["a_y"][i, :h] = e["a_y"]
      batch["a_x"][i, :w] = e["a_x"]
      batch["orig_hw"][i] = (h, w)
      slots[i] = Slot(int(e["index"]), str(e["image_id"]), tuple(e["texts"]))
    return batch, slots


def batch_spec(images: int, prompts: int, text_len: int, size: int, *, sam_size: int, beit_size: int,
               low_res: int, sharding=None) -> dict:
  """ShapeDtypeStructs of the batches `Batcher.assemble` builds: `images` images of `prompts` prompts of
  `text_len` tokens, original sizes padded to `size`; for compiling the step ahead of time."""
  import jax
  layout = {
      "sam_image": ((images, sam_size, sam_size, 3), np.uint8), "resize_hw": ((images, 2), np.int32),
      "beit_image": ((images, beit_size, beit_size, 3), np.float32),
      "input_ids": ((images, prompts, text_len), np.int32),
      "attention_mask": ((images, prompts, text_len), np.bool_), "prompt_valid": ((images, prompts), np.bool_),
      "masks": ((images, prompts, size, size), np.uint8),
      "a_y": ((images, size, low_res), np.float32), "a_x": ((images, size, low_res), np.float32),
      "orig_hw": ((images, 2), np.int32),
  }
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, (shape, dtype) in layout.items()}


# ---------------------------------------------------------------- device side

def evf_predict_fn(config, precision: str = "fp32", attention_impl: Optional[str] = None) -> PredictFn:
  """EVF-SAM as a PredictFn: SAM embedding once per image, BEiT-3 + decoder per prompt, postprocess."""
  import jax
  import jax.numpy as jnp

  from evf_jax.evf import EvfSam
  from evf_jax.predictor import compute_dtype
  from evf_jax.sam.transforms import normalize_and_pad
  dtype = compute_dtype(precision, attention_impl)
  model = EvfSam(config, attention_impl=attention_impl, dtype=dtype)

  def predict(params, batch):
    v = {"params": params}
    x = normalize_and_pad(batch["sam_image"], batch["resize_hw"], config.sam.img_size, config.sam.pixel_mean,
                          config.sam.pixel_std).astype(dtype)
    embeddings = model.apply(v, x, method=EvfSam.embed_image)  # (B, h, w, C): once per image

    def one_image(embedding, beit, ids, mask):  # all K prompts of one image
      prompts = model.apply(v, beit[None].astype(dtype), ids, mask, method=EvfSam.text_prompts)
      low, _ = model.apply(v, embedding[None], prompts, method=EvfSam.decode)
      return low[:, 0]

    low = jax.vmap(one_image)(embeddings, batch["beit_image"], batch["input_ids"], batch["attention_mask"])
    # SAM's postprocess to each image's original size (zero rows beyond it), in float32 like Predictor.
    return jnp.einsum("bhk,bnkl,bwl->bnhw", batch["a_y"], low.astype(jnp.float32), batch["a_x"],
                      precision="highest")

  return predict


def oracle_predict_fn(params, batch):
  """Predicts the ground truth exactly (tests the metric path without a model): scores 1.0 / 1.0."""
  import jax.numpy as jnp
  return jnp.where(batch["masks"] > 0, 1.0, -1.0)


def make_mesh(devices: Optional[Sequence] = None):
  """A 1-D ("data",) mesh over `devices` (default: all)."""
  import jax
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def _step_fn(predict_fn: PredictFn, with_predictions: bool):
  import jax.numpy as jnp

  def step(params, batch):
    logits = predict_fn(params, batch)
    s = logits.shape[-1]
    rows = jnp.arange(s)[None, :, None] < batch["orig_hw"][:, 0, None, None]
    cols = jnp.arange(s)[None, None, :] < batch["orig_hw"][:, 1, None, None]
    region = (rows & cols)[:, None]  # (B, 1, S, S): pixels of the original image
    inter, union = metrics.intersection_union(logits, batch["masks"], region)
    valid = batch["prompt_valid"]
    out = {"inter": jnp.where(valid, inter, 0), "union": jnp.where(valid, union, 0)}
    if with_predictions:
      out["pred"] = (logits > 0) & region
    return out
  return step


def sharded_step(predict_fn: PredictFn, mesh, with_predictions: bool):
  """The jitted evaluation step on `mesh`: params replicated, the batch and the results split over "data".
  Pure data parallelism: it compiles without any communication between devices (tested)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  data = NamedSharding(mesh, P("data"))
  return jax.jit(_step_fn(predict_fn, with_predictions), in_shardings=(NamedSharding(mesh, P()), data),
                 out_shardings=data)


@dataclasses.dataclass
class EvalOptions:
  batch_size: int = 8        # images per step; rounded up to a multiple of the device count
  size_multiple: int = 128   # original sizes are padded up to a multiple of this (compiled shapes)
  lookahead: int = 16        # batches' worth of images sorted together by shape
  read_threads: int = 4      # grain threads decoding images / masks
  max_text_len: int = 1022   # prompts longer than this (tokens) are cut, keeping </s>; 1022 cuts none
  save_overlays: int = 0     # overlays for the first N images (file order) of each split
  progress: bool = True


class Evaluator:
  """Runs the protocol for any PredictFn on a mesh; `run(...)` evaluates one split.

  Args:
    predict_fn: (params, batch) -> logits (B, K, S, S) at the original resolution; `evf_predict_fn(config)`
      for EVF-SAM, `oracle_predict_fn` to test the metric path.
    params: replicated onto the mesh.
    tokenizer: anything with `encode(text) -> ids` (`[0] + pieces + [2]`).
    sam_size, beit_size, low_res: the model's SAM input, BEiT-3 input and low-res mask sizes.
    devices: default all of `jax.devices()`.
  """

  def __init__(self, predict_fn: PredictFn, params: Any, tokenizer, *, sam_size: int, beit_size: int,
               low_res: int, devices: Optional[Sequence] = None, options: EvalOptions = EvalOptions()):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    if jax.process_count() > 1:
      raise UserError("multi-process evaluation is not supported yet; run on one host")
    self.mesh = make_mesh(devices)
    self.num_devices = self.mesh.devices.size
    self.options = options
    self.batch_images = _round_up(max(1, options.batch_size), self.num_devices)
    self.tokenizer = tokenizer
    self.sam_size, self.beit_size, self.low_res = sam_size, beit_size, low_res
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    replicated = NamedSharding(self.mesh, P())
    self.params = jax.device_put(params, replicated)
    self._steps = {flag: sharded_step(predict_fn, self.mesh, flag) for flag in (False, True)}

  def _examples(self, data_dir: str, split: str):
    import grain

    from data_pipelines import pipeline
    from data_pipelines.transforms import SampleConfig
    sample = SampleConfig(max_text_len=self.options.max_text_len, sam_size=self.sam_size,
                          beit_size=self.beit_size)
    ds = pipeline.eval_dataset(data_dir, split, self.tokenizer, sample=sample, process_index=0, process_count=1)
    ds = ds.map_with_index(_AddMatrices(self.low_res, self.sam_size))
    threads = max(1, self.options.read_threads)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 2 * self.batch_images))
    return len(ds), ds.to_iter_dataset(read)

  def run(self, data_dir: str, split: str, *, name: Optional[str] = None,
          overlay_dir: Optional[str] = None) -> dict:
    """Evaluates split `split` of the prepared directory `data_dir`; returns the metrics and run facts."""
    import flax.linen as nn
    import jax
    from tqdm import tqdm
    name = name or split
    t0 = time.perf_counter()
    total, examples = self._examples(data_dir, split)
    batcher = Batcher(self.batch_images, size_multiple=self.options.size_multiple,
                      lookahead=self.options.lookahead, pad_id=getattr(self.tokenizer, "pad_id", 1))
    acc = metrics.IoUAccumulator()
    overlays = _OverlayWriter(data_dir, split, overlay_dir, self.options.save_overlays)
    bar = tqdm(total=total, desc=name, unit="img", disable=not self.options.progress, dynamic_ncols=True)
    images = steps = 0
    pending = None

    def consume(out, slots):
      nonlocal images
      out = jax.device_get(out)  # one small transfer per step: (I, U) of every slot
      for i, slot in enumerate(slots):
        if slot is None:
          continue
        n = len(slot.texts)
        ious = acc.add(out["inter"][i, :n], out["union"][i, :n])
        if "pred" in out and overlays.wants(slot):
          overlays.write(slot, out["pred"][i, :n], ious)
        images += 1
      bar.update(sum(s is not None for s in slots))
      if acc.sentences:
        bar.set_postfix(gIoU=f"{100 * acc.giou:.2f}", cIoU=f"{100 * acc.ciou:.2f}", refresh=False)

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(AXIS_RULES):
      for host_batch, slots in batcher.batches(examples):
        with_preds = any(s is not None and overlays.wants(s) for s in slots)
        batch = {k: jax.make_array_from_process_local_data(self.data_sharding, v) for k, v in host_batch.items()}
        out = self._steps[with_preds](self.params, batch)  # dispatched asynchronously
        steps += 1
        if pending is not None:
          consume(*pending)  # the previous step's results, while this one runs
        pending = (out, slots)
      if pending is not None:
        consume(*pending)
    bar.close()
    wall = time.perf_counter() - t0
    if images != total:  # cannot happen unless the data source changed under us
      raise RuntimeError(f"{name}: evaluated {images} images, the split has {total}")
    result = acc.result()
    result.update(images=images, steps=steps, wall_time_s=wall,
                  sentences_per_s=acc.sentences / wall if wall > 0 else None,
                  devices=self.num_devices, device_kind=self.mesh.devices.flat[0].device_kind,
                  platform=self.mesh.devices.flat[0].platform, batch_size=self.batch_images,
                  size_multiple=self.options.size_multiple)
    if overlays.directory and overlays.index:
      overlays.finish()
      result["overlays"] = overlays.directory
    return result


class _OverlayWriter:
  """PNG overlays (prediction | ground truth, the reference's colour blend) for the first N images."""

  def __init__(self, data_dir: str, split: str, directory: Optional[str], count: int):
    self.data_dir, self.split, self.count = data_dir, split, count
    self.directory = directory if count > 0 else None
    self.index: list[dict] = []
    self._source = None

  def wants(self, slot: Slot) -> bool:
    return self.directory is not None and slot.index < self.count

  def write(self, slot: Slot, preds: np.ndarray, ious: np.ndarray) -> None:
    import grain
    from PIL import Image

    from data_pipelines import records, transforms
    from evf_jax.images import overlay
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(records.shard_paths(self.data_dir, self.split))
      os.makedirs(self.directory, exist_ok=True)
    rec = records.deserialize(self._source[slot.index])  # re-read: the batch holds no original pixels
    image = transforms.decode_image(rec.image)
    h, w = image.shape[:2]
    for j, text in enumerate(slot.texts):
      gt = rec.mask(rec.entries[j].mask_index).astype(bool)
      pred = np.asarray(preds[j][:h, :w], bool)
      file = f"{slot.index:05d}_{slot.image_id}_{j}.png".replace("/", "_")
      Image.fromarray(np.concatenate([overlay(image, pred), overlay(image, gt)], axis=1)).save(
          os.path.join(self.directory, file))
      self.index.append({"file": file, "image_id": slot.image_id, "sentence": text, "iou": float(ious[j])})

  def finish(self) -> None:
    with open(os.path.join(self.directory, "index.json"), "w") as f:
      json.dump(sorted(self.index, key=lambda d: d["file"]), f, indent=1)


# ---------------------------------------------------------------- a checkpoint on several splits

def evaluate_checkpoint(checkpoint: str, data: str, split_names: Sequence[str], *, out_dir: Optional[str],
                        options: EvalOptions = EvalOptions(), precision: str = "fp32",
                        attention_impl: Optional[str] = None,
                        devices: Optional[Sequence] = None) -> list[dict]:
  """`run.py eval`: every split of `split_names` with one checkpoint; writes OUT_DIR/<split tag>.json.

  Splits and data directories are all checked before the (slow) checkpoint load.
  """
  from evf_jax import checkpoints
  from evf_jax.evf import cast_kernels
  from evf_jax.predictor import compute_dtype, load_checkpoint
  dtype = compute_dtype(precision, attention_impl)
  splits = expand_splits(split_names)
  if not splits:
    raise UserError("no --split given")
  located = [(s,) + resolve_data_dir(data, s) for s in splits]
  if out_dir and os.path.isfile(out_dir):
    raise UserError(f"--out-dir {out_dir} is a file")
  config, params, tokenizer = load_checkpoint(checkpoint, max_text_length=options.max_text_len)
  raw_config = checkpoints.read_config(checkpoint)
  provenance = checkpoints.read_provenance(checkpoint)
  params = cast_kernels(params, dtype)
  evaluator = Evaluator(evf_predict_fn(config, precision, attention_impl), params, tokenizer,
                        sam_size=config.sam.img_size, beit_size=config.beit3.img_size,
                        low_res=config.sam.low_res_size, devices=devices, options=options)
  results = []
  for split, directory, meta in located:
    overlay_dir = os.path.join(out_dir, "overlays", split.tag) if out_dir and options.save_overlays else None
    r = evaluator.run(directory, split.split, name=split.name, overlay_dir=overlay_dir)
    r = {"split": split.name, "dataset": split.dataset, "data_split": split.split,
         "data_dir": os.path.abspath(directory), **r, "precision": precision,
         "protocol": "EVF-SAM eval.py: every sentence a prompt, logits > 0 at the original resolution; "
                     "cIoU = sum I / sum U, gIoU = mean I/U per sentence (empty union = 1)",
         "checkpoint": {"path": os.path.abspath(checkpoint),
                        "sam_scale": raw_config.get("sam_scale"),
                        "mm_extractor_scale": raw_config.get("mm_extractor_scale"),
                        "param_dtype": raw_config.get("param_dtype", "float32"),
                        "provenance": provenance},
         "dataset_meta": {k: meta.get(k) for k in ("dataset", "skipped", "src", "seed") if k in meta}}
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      path = os.path.join(out_dir, f"{split.tag}.json")
      with open(path, "w") as f:
        json.dump(r, f, indent=2, sort_keys=True)
      r["json"] = path
    results.append(r)
  return results


def format_table(results: Sequence[dict]) -> str:
  """The printed summary: one row per split, IoUs in percent."""
  rows = [("split", "images", "sentences", "gIoU", "cIoU", "time", "sent/s")]
  for r in results:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    rows.append((r["split"], str(r["images"]), str(r["sentences"]), pct(r["giou"]), pct(r["ciou"]),
                 f"{r['wall_time_s']:.1f}s", f"{r['sentences_per_s'] or 0:.2f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                   for row in rows)
