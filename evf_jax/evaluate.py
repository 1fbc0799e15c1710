"""Referring-segmentation evaluation (gIoU / cIoU), jitted and sharded, from one CPU to many hosts.

The protocol is EVF-SAM's eval.py (docs/data.md#5-evaluation-protocol, metrics in `evf_jax.metrics`): every
sentence of every ref of the split is one prompt (already `strip().lower()`-ed in the prepared records),
prediction = logits > 0 after SAM's postprocess to the ORIGINAL image size, compared with the GT mask there.
Every image is evaluated exactly once (the original's DistributedSampler repeats images to fill the last
batch; we pad with masked-out slots instead).

The evaluator takes examples, not files: `data_pipelines.pipeline.eval_dataset` reads a prepared split into
them (one per image, with its postprocess matrices), and `params` are passed per call, so a training run
evaluates its live parameters with the same code (`run.py eval` and the trainer's periodic evaluation).

One step, for B images (B a multiple of the device count; the batch axis is split over the mesh's batch axes,
params keep their sharding or are replicated):
  host    B images with all their sentences, padded to K prompt slots (power-of-two bucket of the most
          sentences in the batch), GT masks and postprocess matrices padded to S x S (S = the largest side
          in the batch rounded up to `size_multiple`); padding slots have prompt_valid = False and padding
          pixels lie outside orig_hw. A look-ahead window of images is sorted by (K, S) so batches are
          homogeneous and few shapes compile. With several processes, each assembles its share of the
          global batch and all agree on (K, S, L) per step.
  device  SAM image embedding once per image; BEiT-3 + decoder for its K prompts; postprocess as
          A_y @ low_res @ A_x^T; (I, U) per prompt slot, int32 (B, K).
  host    one transfer of (I, U) per step (fetched one step late, so the device runs ahead), summed
          exactly (metrics.IoUAccumulator), then summed over processes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from evf_jax import buckets, families, layers, metrics
from evf_jax.runtime import compute_dtype
from evf_jax.tokenizer import BOS_ID, EOS_ID, PAD_ID

# A prediction function: (params, batch) -> logits (B, K, S, S) at the original resolution (padded).
PredictFn = Callable[[Any, dict], Any]


# ---------------------------------------------------------------- host side: examples -> padded batches

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


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """The padded shape of one batch: prompt slots per image, original-size side, tokens per prompt."""
  prompts: int
  size: int
  text_len: int


class Batcher:
  """Ragged eval examples -> fixed-shape numpy batches (see the module docstring) and their slots.

  batch_images: images per batch (this process's share); lookahead: how many batches' worth of images are
  sorted together by shape bucket (metrics are order-independent).
  """

  def __init__(self, batch_images: int, *, size_multiple: int = buckets.SIZE_MULTIPLE, lookahead: int = 16,
               text_buckets: Sequence[int] = buckets.TEXT_BUCKETS, min_prompts: int = 2):
    self.batch_images, self.size_multiple, self.lookahead = batch_images, size_multiple, lookahead
    self.text_buckets, self.min_prompts = tuple(sorted(text_buckets)), min_prompts

  def _k(self, ex) -> int:
    return buckets.pow2_at_least(max(self.min_prompts, len(ex["texts"])))

  def _s(self, ex) -> int:
    return buckets.round_up(int(max(ex["orig_hw"])), self.size_multiple)

  def groups(self, examples: Iterable[dict]) -> Iterator[list[dict]]:
    """The examples in groups of at most `batch_images`, sorted by shape within each look-ahead window."""
    window = self.batch_images * self.lookahead
    buf: list[dict] = []
    for ex in examples:
      buf.append(ex)
      if len(buf) == window:
        yield from self._sorted_groups(buf)
        buf = []
    yield from self._sorted_groups(buf)

  def _sorted_groups(self, buf: list[dict]) -> Iterator[list[dict]]:
    buf = sorted(buf, key=lambda e: (self._k(e), self._s(e), e["index"]))
    for i in range(0, len(buf), self.batch_images):
      yield buf[i:i + self.batch_images]

  def shape_of(self, exs: Sequence[dict]) -> BatchShape:
    longest = max(_last_token(e["attention_mask"]) for e in exs)
    return BatchShape(prompts=max(self._k(e) for e in exs), size=max(self._s(e) for e in exs),
                      text_len=next((t for t in self.text_buckets if t >= longest), longest))

  def batches(self, examples: Iterable[dict]) -> Iterator[tuple[dict, list[Optional[Slot]]]]:
    for group in self.groups(examples):
      yield self.assemble(group)

  def assemble(self, exs: Sequence[dict], shape: Optional[BatchShape] = None,
               like: Optional[dict] = None) -> tuple[dict, list[Optional[Slot]]]:
    """One batch of `exs` padded to `shape` (default: theirs). With no examples (a process whose share ran
    out while others still have images), `like` gives the per-image array shapes."""
    b = self.batch_images
    shape = shape or self.shape_of(exs)
    k, s, length = shape.prompts, shape.size, shape.text_len
    first = exs[0] if exs else like
    sam_size = first["sam_image"].shape[0]
    beit_shape = first["beit_image"].shape
    low = first["a_y"].shape[1]
    # Filler prompts "<s></s>" keep every text row non-empty; their results are masked out.
    ids = np.full((b, k, length), PAD_ID, np.int32)
    ids[:, :, 0], ids[:, :, 1] = BOS_ID, EOS_ID
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

def evf_predict_fn(config: families.ModelConfig, precision: str = "fp32", attention: str = "xla") -> PredictFn:
  """EVF-SAM (or EVF-SAM2) as a PredictFn: SAM embedding once per image, BEiT-3 + decoder per prompt,
  postprocess (the batch's matrices; `data_pipelines.pipeline.EvalTransform` builds them for the family)."""
  dtype = compute_dtype(precision, attention)
  model = families.family_of(config).model_class(config, attention=attention, dtype=dtype)
  image_input = families.image_input(config)

  def predict(params, batch):
    v = {"params": params}
    x = image_input.normalize(batch["sam_image"], batch["resize_hw"]).astype(dtype)
    # (B, h, w, C), or EVF-SAM2's (embedding, high-res features): once per image. Methods by name: the family's
    # model class overrides them.
    embeddings = model.apply(v, x, method="embed_image")

    def one_image(embedding, beit, ids, mask):  # all K prompts of one image
      prompts = model.apply(v, beit[None].astype(dtype), ids, mask, method="text_prompts")
      low, _ = model.apply(v, jax.tree.map(lambda e: e[None], embedding), prompts, method="decode")
      return low[:, 0]

    low = layers.batch_vmap(one_image)(embeddings, batch["beit_image"], batch["input_ids"], batch["attention_mask"])
    # SAM's postprocess to each image's original size (zero rows beyond it), in float32 like Predictor.
    return jnp.einsum("bhk,bnkl,bwl->bnhw", batch["a_y"], low.astype(jnp.float32), batch["a_x"],
                      precision="highest")

  return predict


def oracle_predict_fn(params, batch):
  """Predicts the ground truth exactly (tests the metric path without a model): scores 1.0 / 1.0."""
  return jnp.where(batch["masks"] > 0, 1.0, -1.0)


def make_mesh(devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
  """A 1-D ("data",) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def _step_fn(predict_fn: PredictFn, with_predictions: bool):
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


def sharded_step(predict_fn: PredictFn, mesh: jax.sharding.Mesh, with_predictions: bool,
                 batch_axes: Optional[Sequence[str]] = None):
  """The jitted evaluation step on `mesh`: the batch and the results split over `batch_axes` (default: every
  mesh axis), params as the caller placed them (replicated, or sharded as in training). With replicated
  params it is pure data parallelism and compiles without any communication between devices (tested)."""
  data = NamedSharding(mesh, P(tuple(batch_axes or mesh.axis_names)))
  return jax.jit(_step_fn(predict_fn, with_predictions), out_shardings=data)


@dataclasses.dataclass
class EvalOptions:
  batch_size: int = 8        # images per step; rounded up to a multiple of the device count
  size_multiple: int = buckets.SIZE_MULTIPLE  # original sizes are padded up to a multiple of this
  lookahead: int = 16        # batches' worth of images sorted together by shape
  read_threads: int = 4      # grain threads decoding images / masks (used by the callers' datasets)
  max_text_len: int = 1022   # prompts longer than this (tokens) are cut, keeping </s>; 1022 cuts none
  min_prompts: int = 2       # prompt slots per image are a power of two >= this (fewer compiled shapes)
  progress: bool = True


class PredictionSink(Protocol):
  """Receives the binary predictions of chosen images (e.g. to write overlays)."""

  def wants(self, slot: Slot) -> bool: ...

  def write(self, slot: Slot, preds: np.ndarray, ious: np.ndarray) -> None: ...


class Evaluator:
  """Runs the protocol for any PredictFn on a mesh; `run(params, examples)` evaluates one split.

  Args:
    predict_fn: (params, batch) -> logits (B, K, S, S) at the original resolution; `evf_predict_fn(config)`
      for EVF-SAM, `oracle_predict_fn` to test the metric path.
    mesh: the devices (default: a 1-D mesh over all devices, or `devices`); batch_axes: the mesh axes the
      batch is split over (default: all).
  """

  def __init__(self, predict_fn: PredictFn, *, mesh: Optional[jax.sharding.Mesh] = None,
               batch_axes: Optional[Sequence[str]] = None, devices: Optional[Sequence] = None,
               options: EvalOptions = EvalOptions()):
    self.mesh = mesh if mesh is not None else make_mesh(devices)
    self.num_devices = self.mesh.devices.size
    self.options = options
    self.batch_images = buckets.round_up(max(1, options.batch_size), self.num_devices)
    self.processes = jax.process_count()
    self.data_sharding = NamedSharding(self.mesh, P(tuple(batch_axes or self.mesh.axis_names)))
    self.replicated = NamedSharding(self.mesh, P())
    self._steps = {flag: sharded_step(predict_fn, self.mesh, flag, batch_axes) for flag in (False, True)}

  def _place(self, x):
    """Params already on this mesh keep their sharding; anything else is replicated onto it."""
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh:
      return x
    if self.processes > 1 and isinstance(x, jax.Array) and x.is_fully_addressable:
      x = np.asarray(x)  # this process's copy (e.g. loaded onto its first device): jax moves none across hosts
    return jax.device_put(x, self.replicated)

  def _plan(self, groups: Iterator[list[dict]], batcher: Batcher) -> Iterator[tuple[list[dict], BatchShape]]:
    """(this process's images, padded shape) per step. With several processes, every process takes the same
    number of steps (an exhausted one contributes empty batches) and the largest shape any asks for."""
    if self.processes == 1:
      for group in groups:
        yield group, batcher.shape_of(group)
      return
    while True:
      group = next(groups, [])
      mine = batcher.shape_of(group) if group else BatchShape(0, 0, 0)
      row = np.asarray([mine.prompts, mine.size, mine.text_len, len(group)], np.int64)
      every = np.asarray(multihost_utils.process_allgather(row)).reshape(self.processes, 4)
      if not every[:, 3].any():
        return
      yield group, BatchShape(*(int(v) for v in every[:, :3].max(axis=0)))

  def run(self, params: Any, examples: Iterable[dict], *, total: int, name: str = "eval",
          sink: Optional[PredictionSink] = None, like: Optional[dict] = None) -> dict:
    """Evaluates this process's `examples` (`total` of them; every process calls `run` together) with
    `params`; returns the metrics over all processes and run facts. `like`: one example of the split, for a
    process whose share is empty."""
    t0 = time.perf_counter()
    params = jax.tree.map(self._place, params)
    local_images = self.batch_images // self.processes
    cap = self.options.max_text_len  # the model's text positions end there: no bucket beyond it
    batcher = Batcher(local_images, size_multiple=self.options.size_multiple, lookahead=self.options.lookahead,
                      text_buckets=tuple(t for t in buckets.TEXT_BUCKETS if t < cap) + (cap,),
                      min_prompts=self.options.min_prompts)
    acc = metrics.IoUAccumulator()
    bar = tqdm(total=total, desc=name, unit="img", dynamic_ncols=True,
               disable=not self.options.progress or jax.process_index() != 0)
    images = steps = 0
    pending = None

    def consume(out, slots):
      nonlocal images
      out = {k: np.asarray(multihost_utils.global_array_to_host_local_array(v, self.mesh, self.data_sharding.spec))
             if self.processes > 1 else np.asarray(v) for k, v in out.items()}  # (I, U): one small transfer
      for i, slot in enumerate(slots):
        if slot is None:
          continue
        n = len(slot.texts)
        ious = acc.add(out["inter"][i, :n], out["union"][i, :n])
        if "pred" in out and sink is not None and sink.wants(slot):
          sink.write(slot, out["pred"][i, :n], ious)
        images += 1
      bar.update(sum(s is not None for s in slots))
      if acc.sentences:
        bar.set_postfix(gIoU=f"{100 * acc.giou:.2f}", cIoU=f"{100 * acc.ciou:.2f}", refresh=False)

    examples = iter(examples)
    first = next(examples, None)
    like = like if like is not None else first
    if first is not None:
      examples = _chain_first(first, examples)
    for group, shape in self._plan(batcher.groups(examples), batcher):
      if like is None:
        raise ValueError(f"{name}: this process has no examples; pass `like` (one example of the split)")
      host_batch, slots = batcher.assemble(group, shape, like=like)
      local_preds = sink is not None and any(s is not None and sink.wants(s) for s in slots)
      with_preds = (bool(multihost_utils.process_allgather(np.asarray(local_preds)).any())
                    if self.processes > 1 else local_preds)
      batch = {k: jax.make_array_from_process_local_data(self.data_sharding, v) for k, v in host_batch.items()}
      out = self._steps[with_preds](params, batch)  # dispatched asynchronously
      steps += 1
      if pending is not None:
        consume(*pending)  # the previous step's results, while this one runs
      pending = (out, slots)
    if pending is not None:
      consume(*pending)
    bar.close()
    if images != total:  # cannot happen unless the data source changed under us
      raise RuntimeError(f"{name}: evaluated {images} images, expected {total}")
    result = _combine_processes(acc, images) if self.processes > 1 else dict(acc.result(), images=images)
    wall = time.perf_counter() - t0
    device = self.mesh.devices.flat[0]
    result.update(steps=steps, wall_time_s=wall,
                  sentences_per_s=result["sentences"] / wall if wall > 0 else None,
                  devices=self.num_devices, processes=self.processes, device_kind=device.device_kind,
                  platform=device.platform, batch_size=self.batch_images, size_multiple=self.options.size_multiple)
    return result


def _chain_first(first, rest):
  yield first
  yield from rest


def gather_64bit(values: np.ndarray) -> np.ndarray:
  """Every process's 1-d int64 or float64 `values`, bit for bit, as (processes, n): jax without x64 would
  gather int64 as int32 (wrapping past 2**31 pixels) and float64 as float32, so they travel as int32 pairs."""
  values = np.ascontiguousarray(values).reshape(-1)
  pairs = np.asarray(multihost_utils.process_allgather(values.view(np.int32)))
  return pairs.reshape(-1, 2 * values.size).copy().view(values.dtype)


def _combine_processes(acc: metrics.IoUAccumulator, images: int) -> dict:
  """Every process's totals, summed: integers exactly, the sum of sentence IoUs per process then over
  processes in process order (deterministic)."""
  mine = np.asarray([acc.sentences, acc.total_inter, acc.total_union, acc.empty_union, images], np.int64)
  counts = gather_64bit(mine)
  iou_sums = gather_64bit(np.asarray([acc.iou_sum], np.float64)).reshape(-1)
  sentences, inter, union, empty, total_images = (int(v) for v in counts.sum(axis=0))
  return {"giou": math.fsum(iou_sums) / sentences if sentences else None,
          "ciou": inter / (union + metrics.EPS) if sentences else None,
          "sentences": sentences, "total_intersection": inter, "total_union": union,
          "empty_union_sentences": empty, "images": total_images}
