"""EVF-SAM2 on videos: the text prompt on frame 0, then SAM-2's memory carries the object through the other
frames (`evf_jax.sam2.tracking`).

As EVF-SAM2's video inference: BEiT-3 fuses frame 0 with the text (one prompt, no padding mask), the projected
[CLS] is frame 0's only sparse prompt; frames are squashed to the model size with PIL's bicubic resize and
normalised as SAM-2's frame loader does (`evf_jax.sam2.transforms.video_frame`, not the image path's torch
uint8 bilinear); every frame's hole-filled low-res logits are resized straight to the original size (bilinear,
align_corners=False) and thresholded at 0. Frames must all have the size of frame 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evf_jax import images, postprocess
from evf_jax.beit3.preprocess import beit_image
from evf_jax.checkpoints import load_checkpoint
from evf_jax.errors import UserError, first_line
from evf_jax.evf import cast_kernels
from evf_jax.evf_sam2 import EvfSam2, EvfSam2Config, postprocess_matrices
from evf_jax.predictor import PromptError, encode_prompts
from evf_jax.runtime import check_precision_platform, compute_dtype, enable_compilation_cache
from evf_jax.sam2 import tracking
from evf_jax.sam2.transforms import video_frame
from evf_jax.tokenizer import check_fits_model


@dataclasses.dataclass
class VideoFrame:
  index: int
  logits: np.ndarray        # (H, W) float32 at the original size
  mask: np.ndarray          # (H, W) bool, logits > 0
  object_score: float       # the object-score logit (<= 0: "no object", the logits are then all -1024)


DEFAULT_CHUNK = 4  # frames encoded in one batch


class VideoPredictor:
  """`VideoPredictor.from_checkpoint(dir).predict(frames, prompt)`: frames are RGB uint8 (H, W, 3) arrays of one
  size; `iter_predict` yields `VideoFrame`s one chunk at a time (frames are read lazily).

  chunk: frames whose image features are encoded in one batch (and tracked in one `lax.scan` call).
  fill_hole_area: background holes of at most this many low-res pixels are filled (EVF-SAM2's video setting: 8).
  """

  def __init__(self, config: EvfSam2Config, params: Any, tokenizer, *, precision: str = "fp32",
               attention: str = "xla", chunk: int = DEFAULT_CHUNK, fill_hole_area: int = 8):
    if not isinstance(config, EvfSam2Config):
      raise UserError("video needs an EVF-SAM2 checkpoint (SAM-2 has the video memory); this one is EVF-SAM")
    dtype = compute_dtype(precision, attention)
    check_precision_platform(precision)
    check_fits_model(tokenizer, config.beit3)
    self.config, self.tokenizer = config, tokenizer
    self.model = EvfSam2(config, attention=attention, dtype=dtype)
    self.params = jax.device_put(cast_kernels(params, dtype))
    self.tracker = tracking.VideoTracker(config.sam2, self.params["sam"], dtype=dtype, attention=attention,
                                         chunk=chunk, fill_hole_area=fill_hole_area)
    model = self.model

    @jax.jit
    def text_prompt(params, beit, input_ids, attention_mask):
      return model.apply({"params": params}, beit.astype(model.dtype), input_ids, attention_mask,
                         method="text_prompts").astype(jnp.float32)

    @jax.jit
    def upsample(low, a_y, a_x):
      return postprocess.apply_matrices(low, a_y, a_x)

    self._text_prompt, self._upsample = text_prompt, upsample

  @classmethod
  def from_checkpoint(cls, directory: str, *, precision: str = "fp32", attention: str = "xla",
                      compilation_cache_dir: str | None = None, max_text_len: int | None = None,
                      **kwargs) -> VideoPredictor:
    compute_dtype(precision, attention)  # bad choices before the (slow) load
    check_precision_platform(precision)
    if compilation_cache_dir:
      enable_compilation_cache(compilation_cache_dir)
    config, params, tokenizer = load_checkpoint(directory, max_text_len=max_text_len)
    if not isinstance(config, EvfSam2Config):
      raise UserError(f"{directory} is an EVF-SAM (SAM-1) checkpoint: video needs EVF-SAM2")
    return cls(config, params, tokenizer, precision=precision, attention=attention, **kwargs)

  def prompt_embedding(self, frame0: np.ndarray, prompt: str) -> jax.Array:
    """(1, C): BEiT-3 on frame 0 and the text, projected (the one sparse prompt of frame 0)."""
    if not isinstance(prompt, str):  # a list would be several objects: one is tracked
      raise PromptError(f"the prompt must be a str (one object to track), got a {type(prompt).__name__}")
    ids, mask = encode_prompts(self.tokenizer, [prompt], name="the prompt")
    beit = beit_image(frame0, self.config.beit3.img_size)[None]
    return self._text_prompt(self.params, jnp.asarray(beit), jnp.asarray(ids), jnp.asarray(mask))

  def iter_predict(self, frames: Iterable[np.ndarray], prompt: str) -> Iterator[VideoFrame]:
    it = iter(frames)
    try:
      frame0 = images.check_rgb_array(next(it))
    except StopIteration:
      raise UserError("the video has no frames") from None
    hw = frame0.shape[:2]
    s = self.config.sam2.image_size
    prompts = self.prompt_embedding(frame0, prompt)
    a_y, a_x = (jnp.asarray(a) for a in postprocess_matrices(hw, self.config.sam2.low_res_size))

    def model_frames():
      yield video_frame(frame0, s)
      for i, f in enumerate(it, start=1):
        f = images.check_rgb_array(f)
        if f.shape[:2] != hw:
          raise UserError(f"frame {i} is {f.shape[1]}x{f.shape[0]}, frame 0 is {hw[1]}x{hw[0]}: a video's frames "
                          "must all have one size")
        yield video_frame(f, s)

    for i, (low, score) in enumerate(self.tracker.run(model_frames(), prompts)):
      logits = np.array(self._upsample(jnp.asarray(low[0]), a_y, a_x), np.float32)  # writable
      yield VideoFrame(i, logits, logits > 0, float(score[0]))

  def predict(self, frames: Iterable[np.ndarray], prompt: str) -> list[VideoFrame]:
    return list(self.iter_predict(frames, prompt))


def read_frames(path: str) -> tuple[list[str], Iterator[np.ndarray]]:
  """A video as (frame stems, iterator of RGB uint8 frames, read lazily: memory holds a chunk, not the video).

  A directory: its image files (`images.FILE_EXTENSIONS`, any case; hidden files such as macOS's `._x.jpg` left
  out) in natural order (`frame_key`: `frame2` before `frame10`, ffmpeg's `%05d.jpg` by number, what SAM-2's
  loader expects); every frame's header is read up front, so a file that is no image or has another size than
  frame 0 is refused before any work. A file: decoded with PyAV (optional: `pip install av`) twice, once up front
  to count and check its frames, then as they are used; frames are turned as the stream's display rotation says
  (a phone's portrait video, shown upright as ffmpeg's autorotate shows it); stems `00000`, `00001`, ... Problems
  are `UserError`s.
  """
  if not os.path.exists(path):
    raise UserError(f"video not found: {path}")
  if os.path.isdir(path):
    names = _frame_names(path)
    files = [os.path.join(path, n) for n in names]
    _check_frame_sizes(files)
    return [os.path.splitext(n)[0] for n in names], (images.load_image(f) for f in files)
  try:
    import av  # lazy: optional (PyAV), only video files need it
  except ImportError:
    raise UserError(f"reading a video file needs PyAV (pip install av); or give a directory of frames: {path}") \
        from None
  count, first = 0, None
  with _decode_errors(path):
    with av.open(path) as container:
      for frame in container.decode(video=0):  # decoded (corrupt data shows), not converted
        hw = _upright_hw(frame)
        if first is None:
          first = hw
        elif hw != first:
          raise UserError(f"frame {count} of {path} is {hw[1]}x{hw[0]}, frame 0 is {first[1]}x{first[0]}: a "
                          "video's frames must all have one size")
        count += 1
  if not count:
    raise UserError(f"the video has no frames: {path}")

  def frames():
    with _decode_errors(path):
      with av.open(path) as container:
        for frame in container.decode(video=0):
          yield _upright(frame.to_ndarray(format="rgb24"), frame.rotation)

  return [f"{i:05d}" for i in range(count)], frames()


@contextlib.contextmanager
def _decode_errors(path: str):
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 (PyAV's many errors: not a video, no video stream, corrupt data)
    raise UserError(f"cannot decode the video {path}: {first_line(e)}") from None


def _quarter_turns(rotation: float) -> int:
  """Counterclockwise quarter turns for a display rotation in degrees (PyAV's `frame.rotation`, counterclockwise)."""
  return int(round(rotation / 90)) % 4


def _upright_hw(frame) -> tuple[int, int]:
  hw = (frame.height, frame.width)
  return hw[::-1] if _quarter_turns(frame.rotation) % 2 else hw


def _upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
  k = _quarter_turns(rotation)
  return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def frame_key(stem: str) -> tuple:
  """Natural order: the stem as alternating text (case-folded) and numbers, so `frame2` < `frame10` and
  `1.5` < `10.0`. ASCII digits only: `int` of other Unicode digits (`²`) fails or means something else."""
  parts = re.split(r"([0-9]+)", stem)
  return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts))


def _frame_names(path: str) -> list[str]:
  """A frames directory's image files, in natural order; names that would collide are refused."""
  try:
    names = images.image_names(path)
  except OSError as e:
    raise UserError(f"cannot list the frames directory {path} ({e.strerror or first_line(e)})") from None
  if not names:
    raise UserError(f"no frames ({', '.join(images.FILE_EXTENSIONS)}) in the directory {path}")
  for n in sorted(names):
    f = os.path.join(path, n)
    if not os.path.isfile(f):  # dropping it would track a video with a frame missing
      what = "a broken symbolic link" if os.path.islink(f) and not os.path.exists(f) else "not a file"
      raise UserError(f"frame {f} is {what}: remove it or point it at an image")
  by_stem: dict[str, str] = {}  # case-folded stem -> its name: outputs are named by stem
  by_key: dict[tuple, str] = {}
  for n in sorted(names):
    stem = os.path.splitext(n)[0]
    if stem.casefold() in by_stem:  # a case-insensitive disk holds one <stem>_mask.png
      raise UserError(f"frames {by_stem[stem.casefold()]} and {n} in {path} would write the same outputs "
                      f"({stem}_mask.png, ...); rename one")
    by_stem[stem.casefold()] = n
    key = frame_key(stem)
    if key in by_key:
      raise UserError(f"frames {by_key[key]} and {n} in {path} have the same place in the order (numbers are "
                      "compared by value); rename one")
    by_key[key] = n
  return sorted(names, key=lambda n: frame_key(os.path.splitext(n)[0]))


def _check_frame_sizes(files: list[str]) -> None:
  """Every frame readable as an image of frame 0's size, before the model loads and any output is written."""
  hw = images.probe_image(files[0], oriented=True)  # every unreadable file is an ImageReadError naming it
  for f in files[1:]:
    other = images.probe_image(f, oriented=True)
    if other != hw:
      raise UserError(f"frame {f} is {other[1]}x{other[0]}, frame 0 ({files[0]}) is {hw[1]}x{hw[0]}: a video's "
                      "frames must all have one size")
