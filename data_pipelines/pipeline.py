"""Grain input pipeline: a weighted, seeded, resumable mixture of prepared datasets -> static-shape batches.

    per dataset:      tfds.data_source (or an old prepared dir, data_pipelines.sources) -> MapDataset.source
                      -> shuffle(seed) -> repeat()                                            (infinite)
    mixture:          select_from_datasets with an i.i.d. categorical choice per global index (counter RNG)
    per sample:       random_map(draw <= K prompts, decode masks, SAM/BEiT inputs, tokenise, pad)
    per process:      slice(process_index::process_count) -> batch(global_batch / process_count)
    iteration:        to_iter_dataset(ReadOptions) [-> mp_prefetch(worker_count)]; get_state/set_state resume
    on device:        make_global_batch -> jax.make_array_from_process_local_data

Mixture semantics (docs/data.md#6-training-mixture): the original draws the source of every sample i.i.d. from
weights / sum(weights), and for `refer_seg` draws one of its refer datasets uniformly. Here a group has a
weight and a list of datasets ("dirs": TFDS dataset folders, `sources.TfdsDataset`s, or old prepared
directories, see data_pipelines/sources.py); the group is drawn with its weight and the dir uniformly inside it, which
is the same distribution as one categorical over dirs with weight_g / len(dirs_g). The draw for global
sample i is a pure function of (seed, i), so any sample can be recomputed and a resumed iterator continues
with exactly the next batch. The i-th sample drawn from dir d reads element i of d's shuffled, repeated
stream (not "the next unread one"), which keeps the map O(1) and still visits each dir's images in a
seeded random order, each image equally often in expectation (the original samples with replacement).

Batch dict (process-local numpy; B = global_batch_size / process_count, K = num_prompts, L = max_text_len,
S = mask_size, default = sam_size = 1024):

  sam_image      (B, 1024, 1024, 3) uint8    SAM frame, resized and zero-padded bottom/right; NOT normalised:
                                             evf_jax.sam.transforms.normalize_and_pad on device
                                             (uint8 is 4x less host->device traffic than float32)
  beit_image     (B, 224, 224, 3)   float32  BEiT-3 input, already normalised (bicubic overshoot kept)
  input_ids      (B, K, L)          int32    XLM-R ids, padded with 1
  attention_mask (B, K, L)          bool     input_ids != 1
  prompt_valid   (B, K)             bool     False for padding prompts (images with < K candidates)
  masks          (B, K, S, S)       uint8    {0,1} GT in the SAM frame (zero for padding prompts)
  valid_region   (B, S, S)          bool     un-padded part of the SAM frame at S
  resize_hw      (B, 2)             int32    (h', w') of the un-padded image at 1024 (SAM-1 postprocess crop)
  orig_hw        (B, 2)             int32    original (H, W)
  source_id      (B,)               int32    index of the sample's dataset dir in `Mixture.dirs()`
"""

from __future__ import annotations

import bisect
import dataclasses
import sys
from typing import Any, Mapping, Optional, Sequence

import grain
import jax
import numpy as np
from absl import flags

from data_pipelines import sources, transforms
from data_pipelines.transforms import SampleConfig, Tokenizer
from evf_jax import families

BATCH_KEYS = ("sam_image", "beit_image", "input_ids", "attention_mask", "prompt_valid", "masks",
              "valid_region", "resize_hw", "orig_hw", "source_id")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
  """A stateless 64-bit mixer: a counter-based RNG (value depends only on the input)."""
  x = (x + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def _uniform(seed: int, index: int) -> float:
  return (_splitmix64(_splitmix64(seed & _MASK64) ^ index) >> 11) / float(1 << 53)


def _derive_seed(seed: int, *salt: int) -> int:
  x = seed & _MASK64
  for s in salt:
    x = _splitmix64(x ^ (s & _MASK64))
  return x & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Group:
  """One mixture component: drawn with `weight`; inside it, one of `dirs` uniformly (like refer_seg)."""
  weight: float
  dirs: tuple[sources.Location, ...]


@dataclasses.dataclass(frozen=True)
class Mixture:
  groups: Mapping[str, Group]

  @classmethod
  def of(cls, spec: Mapping[str, tuple[float, Sequence[str]] | Group]) -> "Mixture":
    """{"refer_seg": (3, [dir_refcoco, dir_refcoco+]), "obj365": (1, [dir_o365])} -> Mixture."""
    groups = {}
    for name, g in spec.items():
      if not isinstance(g, Group):
        weight, dirs = g
        single = isinstance(dirs, (str, sources.TfdsDataset, sources.LegacyDataset))
        g = Group(float(weight), tuple([dirs] if single else dirs))
      if g.weight < 0 or not g.dirs:
        raise ValueError(f"mixture group {name!r}: needs weight >= 0 and at least one dir")
      groups[name] = g
    if not sum(g.weight for g in groups.values()) > 0:
      raise ValueError("mixture weights sum to 0")
    return cls(groups)

  def dirs(self) -> list[sources.Location]:
    return [d for g in self.groups.values() for d in g.dirs]

  def dir_probabilities(self) -> list[float]:
    total = sum(g.weight for g in self.groups.values())
    return [g.weight / total / len(g.dirs) for g in self.groups.values() for _ in g.dirs]


class IIDSelection(grain.transforms.DatasetSelectionMap):
  """Global index i -> (component drawn i.i.d. from `probs` with a counter RNG, i)."""

  def __init__(self, probs: Sequence[float], seed: int):
    self._cum = np.cumsum(np.asarray(probs, np.float64) / np.sum(probs)).tolist()
    self._cum[-1] = 1.0
    self._seed = seed

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    return bisect.bisect_right(self._cum, _uniform(self._seed, index)), index


class _Tag:
  """Record -> (source_id, Record). A class, not a lambda, so the pipeline pickles for mp workers."""

  def __init__(self, source_id: int):
    self.source_id = source_id

  def __call__(self, rec):
    return self.source_id, rec


class TrainTransform:
  """(source_id, Record), rng -> one training example (see the module docstring for the keys).

  cache_images: keep each image's prompt-independent inputs (`transforms.image_inputs`: frames, masks at the loss
  resolution) in this process's memory, keyed by (source, image id), so later epochs skip decoding and resizing.
  The batches are the same; the memory grows with the dataset (~120 KB per image at the synthetic config's
  sizes, megabytes at SAM's 1024 frame): for small datasets only."""

  def __init__(self, tokenizer: Tokenizer, cfg: SampleConfig, cache_images: bool = False):
    self.tokenizer, self.cfg = tokenizer, cfg
    self._images: Optional[dict] = {} if cache_images else None

  def __call__(self, item, rng: np.random.Generator) -> dict[str, np.ndarray]:
    source_id, rec = item
    chosen = transforms.choose_entries(len(rec.entries), self.cfg.num_prompts, rng)
    image = None
    if self._images is not None:
      key = (source_id, rec.image_id)
      image = self._images.get(key)
      if image is None:  # reader threads may both compute it once: same values, last one kept
        image = self._images[key] = transforms.image_inputs(rec, self.cfg)
    return transforms.train_example(rec, chosen, self.tokenizer, self.cfg, source_id, image=image)


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  if process_index is None or process_count is None:
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def train_dataset(mixture: Mixture | Mapping[str, Any], tokenizer: Tokenizer, *, global_batch_size: int,
                  seed: int, sample: SampleConfig = SampleConfig(), split: str = "train",
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  cache_images: bool = False) -> grain.MapDataset:
  """The infinite training stream as a MapDataset of process-local batches (dicts of numpy arrays).

  `split` is a TFDS split, slicing included ("train[:1%]"), read from every dataset of the mixture.
  `cache_images`: see `TrainTransform`.
  Element j of the result is this process's part of global batch j: samples
  j * global_batch_size + process_index + n * process_count for n < global_batch_size / process_count,
  so processes get disjoint samples and together the same global batch for any process count.
  """
  if not isinstance(mixture, Mixture):
    mixture = Mixture.of(mixture)
  p_index, p_count = _process(process_index, process_count)
  if global_batch_size % p_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {p_count} processes")
  components = []
  for i, d in enumerate(mixture.dirs()):
    src = sources.open_split(d, split)
    if len(src) == 0:
      raise ValueError(f"{d}: split {split!r} is empty")
    components.append(grain.MapDataset.source(src).shuffle(seed=_derive_seed(seed, 1, i)).repeat()
                      .map(_Tag(i)))
  mixed = grain.MapDataset.select_from_datasets(
      components, IIDSelection(mixture.dir_probabilities(), _derive_seed(seed, 2)))
  # The per-sample RNG depends on the global index, so a sample is the same whatever the process count.
  samples = mixed.random_map(TrainTransform(tokenizer, sample, cache_images), seed=_derive_seed(seed, 3))
  local = samples.slice(slice(p_index, None, p_count))
  return local.batch(global_batch_size // p_count, drop_remainder=True)


def train_iterator(dataset: grain.MapDataset, *, worker_count: int = 0, read_threads: int = 2,
                   prefetch: int = 8, worker_buffer_size: int = 1) -> grain.DatasetIterator:
  """Iterator over `train_dataset(...)`; `get_state()` / `set_state()` resume exactly (also with workers).

  read_threads / prefetch: grain.ReadOptions (threads that run the per-sample transform in this process);
  worker_count > 0 moves the work to that many processes (grain.mp_prefetch).
  """
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; run.py does not use absl.app
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size))
  return iter(ds)


def make_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded along the batch axis by `sharding`.

  `sharding` is a jax.sharding.Sharding for the leading (batch) axis, e.g.
  NamedSharding(mesh, PartitionSpec(("data",))); it is applied to every key (trailing axes replicated).
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# ---------------------------------------------------------------- evaluation

class EvalTransform:
  """(index in the process's slice, Record) -> one eval example (`transforms.eval_example`) plus its
  file-order `index` and the unpadded postprocess matrices `a_y`, `a_x` (computed here, in grain's threads)."""

  def __init__(self, tokenizer: Tokenizer, cfg: SampleConfig, low_res: int, process_index: int,
               process_count: int):
    self.tokenizer, self.cfg, self.low_res = tokenizer, cfg, low_res
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, local_index: int, rec) -> dict:
    ex = transforms.eval_example(rec, self.tokenizer, self.cfg)
    a_y, a_x = families.mask_matrices(tuple(int(v) for v in ex["resize_hw"]), tuple(int(v) for v in ex["orig_hw"]),
                                      square=self.cfg.sam_mode == "square", low_res=self.low_res,
                                      img_size=self.cfg.sam_size)
    return dict(ex, index=self.process_index + local_index * self.process_count, a_y=a_y, a_x=a_x)


def eval_dataset(data_dir: sources.Location, split: str, tokenizer: Tokenizer, *, low_res: int,
                 sample: SampleConfig = SampleConfig(), process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> grain.MapDataset:
  """One element per image of the split (`data_dir`: any location of data_pipelines.sources; `split` may be
  sliced, "val[:10%]") with every sentence (ragged, see `EvalTransform`); `low_res` is the
  side of the model's low-resolution mask logits (`SamConfig.low_res_size`).

  Process p gets images p, p + P, ...: disjoint, and together every image exactly once (no padding
  duplicates, unlike the original DistributedSampler), in file order.
  """
  p_index, p_count = _process(process_index, process_count)
  src = sources.open_split(data_dir, split)
  local = grain.MapDataset.source(src).slice(slice(p_index, None, p_count))
  return local.map_with_index(EvalTransform(tokenizer, sample, low_res, p_index, p_count))
