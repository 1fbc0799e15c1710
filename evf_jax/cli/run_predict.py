"""`run.py predict`: masks for text prompts on images (the model loaded and compiled once for all), or for one text
prompt through a video (EVF-SAM2), written as PNGs (and optionally logits)."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Sequence

from evf_jax import storage
from evf_jax.cli import common
from evf_jax.errors import UserError
from evf_jax.images import (FILE_EXTENSIONS, PREDICTION_SUFFIXES, image_names, load_image, probe_image,
                            save_prediction)
from evf_jax.predictor import Predictor
from evf_jax.tokenizer import check_prompts
from evf_jax.train import checkpointing
from evf_jax.video import DEFAULT_CHUNK, VideoPredictor, read_frames

# A --video run's record (prompt, frames, object scores), written after the last frame: the run is complete.
TRACK_FILE = "track.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, type=common.nonempty,
                 help="an evf-jax checkpoint directory (from `run.py convert`, or a training run's export/)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--image", nargs="+", action="extend",
                   help="image files (JPEG, PNG, WebP, BMP, ...) or directories of them (their "
                        f"{', '.join(FILE_EXTENSIONS)} files, by name); every prompt is applied to every image, the "
                        "model loaded once")
  src.add_argument("--video", help="EVF-SAM2 only: a directory of frames (e.g. ffmpeg's 00000.jpg, 00001.jpg, ...; "
                                   f"its {', '.join(FILE_EXTENSIONS)} files in natural order: numbers in names by "
                                   "value, so frame2 before frame10; hidden files left out) or a video file (needs "
                                   "PyAV: pip install av); the prompt is read on the first frame and the object "
                                   "tracked through the others")
  p.add_argument("--prompt", action="append", required=True,
                 help="a referring text; repeat for several (e.g. --prompt 'zebra top left' --prompt '[semantic] sky'); "
                      "one with --video")
  p.add_argument("--out-dir", required=True,
                 help="where to write <stem>_<i>_mask.png and <stem>_<i>_vis.png (video: <frame-stem>_mask.png and "
                      f"<frame-stem>_vis.png per frame, then {TRACK_FILE} with every frame's object score: "
                      "written last, it says the video is done)")
  p.add_argument("--save-logits", action="store_true",
                 help="also write <stem>_<i>_logits.npy (video: <frame-stem>_logits.npy), float32, H x W")
  common.add_overwrite_arg(p, "; an image's or video's outputs that this run does not write (logits, a "
                              "prompt index or frame beyond this run's) are removed with them, so none is stale")
  p.add_argument("--skip-existing", action="store_true",
                 help="images: keep the images whose outputs are all in --out-dir (an interrupted or earlier run's) "
                      "and predict the others, replacing what they had written; run again with it to continue")
  p.add_argument("--chunk", type=int, default=None,
                 help=f"video: frames whose image features are computed in one batch (default {DEFAULT_CHUNK}; at "
                      "most the video's frames)")
  common.add_compute_args(p)
  p.add_argument("--max-text-len", type=int, default=None,
                 help="longest prompt in tokens (special tokens included), 3 to the model's limit (1022 for the "
                      "released models; the default); longer prompts are truncated with a warning")
  common.add_compilation_cache_arg(p)


def run(args: argparse.Namespace) -> int:
  prompts = list(args.prompt)
  check_prompts(prompts, lambda i: f"--prompt {i + 1}")
  common.check_compute_args(args)
  storage.check_output_dir(args.out_dir, "--out-dir")
  checkpointing.check_not_in_a_model(args.out_dir, "--out-dir")
  if args.skip_existing and args.overwrite:
    raise UserError("--skip-existing keeps finished outputs and --overwrite replaces them: choose one")
  if args.video is not None:
    if args.skip_existing:
      raise UserError("--skip-existing is for images: a video is tracked from its first frame, so run it whole")
    return run_video(args, prompts)
  if args.chunk is not None:  # it would be ignored: images are predicted one at a time
    raise UserError("--chunk is for --video")
  files, stems = image_files(args.image, args.out_dir)
  outputs = {s: _outputs(args, [f"{s}_{i}" for i in range(len(prompts))]) for s in stems}
  if args.skip_existing:  # every file is written whole (images.save_prediction): one that exists is finished
    common.check_no_directories(o for s in stems for o in outputs[s])  # a directory is no finished file
    done = {s for s in stems if all(os.path.exists(o) for o in outputs[s])}
  else:
    done = set()
    common.check_not_there([o for s in stems for o in outputs[s]], args.overwrite,
                           ", --skip-existing to keep the images done" if len(files) > 1 else "")
  todo = [(f, s) for f, s in zip(files, stems) if s not in done]
  if not todo:
    print(f"all {len(files)} image(s) have their outputs in {args.out_dir}: nothing to predict")
    return 0
  sizes = [probe_image(f) for f, _ in todo]  # every file is an image before the model loads
  predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, attention=args.attention,
                                        compilation_cache_dir=args.compilation_cache,
                                        max_text_len=args.max_text_len)
  for (f, _), hw in zip(todo, sizes):
    predictor.image_input.check_fits(hw, f)  # set_image would say "the image"
  with storage.output_dir(args.out_dir, "--out-dir"):
    earlier = os.listdir(args.out_dir) if args.overwrite or args.skip_existing else []
    for path, stem in todo:
      image = load_image(path)
      predictor.set_image(image)
      result = predictor.predict(prompts)
      _remove(_stale_image_outputs(args.out_dir, earlier, stem, outputs[stem]))
      if len(files) > 1:
        print(f"{path}:")
      for i, prompt in enumerate(prompts):
        mask = result.masks[i]
        save_prediction(os.path.join(args.out_dir, f"{stem}_{i}"), image, mask,
                        result.logits[i] if args.save_logits else None)
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f"[{i}] {shown!r}: mask area {int(mask.sum())} px ({100.0 * mask.mean():.2f}%), "
              f"score {float(result.scores[i]):.4f}")
  if len(files) > 1:
    kept = f" ({len(done)} of them done before, kept)" if done else ""
    print(f"{len(files)} images x {len(prompts)} prompts: masks in {args.out_dir}{kept}")
  return 0


def image_files(paths: Sequence[str], out_dir: str) -> tuple[list[str], list[str]]:
  """(--image's files, their stems): a file as given, a directory as its image files by name (hidden files, such
  as macOS's `._x.jpg`, left out). A file named twice is read once; two that would write the same outputs (the
  same stem, in any case: a case-insensitive file system holds one of them) are an error."""
  files = []
  for path in paths:
    if not os.path.isdir(path):
      if not os.path.exists(path):  # before the name checks: a typo is no name clash
        raise UserError(f"image not found: {path}")
      files.append(path)
      continue
    if os.path.realpath(path) == os.path.realpath(out_dir):  # a rerun would read the masks as images
      raise UserError(f"--out-dir {out_dir} is an --image directory; choose another --out-dir")
    try:
      names = image_names(path)
    except OSError as e:
      raise UserError(f"--image {path}: cannot list the directory ({e.strerror})") from None
    found = sorted(n for n in names if os.path.isfile(os.path.join(path, n)))
    if not found:
      raise UserError(f"--image {path}: a directory with no images ({', '.join(FILE_EXTENSIONS)})")
    files += [os.path.join(path, n) for n in found]
  by_stem: dict[str, str] = {}  # casefolded stem -> the file that has it
  unique: dict[str, tuple[str, str]] = {}  # real path -> (file as named, its stem)
  for f in files:
    real = os.path.realpath(f)
    if real in unique:
      continue
    stem = os.path.splitext(os.path.basename(f))[0]
    if stem.casefold() in by_stem:
      raise UserError(f"--image {by_stem[stem.casefold()]} and {f} would write the same files "
                      f"({stem}_<i>_mask.png, ...); rename one or predict them apart")
    by_stem[stem.casefold()] = f
    unique[real] = (f, stem)
  return [f for f, _ in unique.values()], [s for _, s in unique.values()]


def _outputs(args: argparse.Namespace, bases: list[str]) -> list[str]:
  """The files `save_prediction` writes for each base name."""
  suffixes = PREDICTION_SUFFIXES if args.save_logits else PREDICTION_SUFFIXES[:-1]
  return [os.path.join(args.out_dir, b + s) for b in bases for s in suffixes]


def _stale_image_outputs(out_dir: str, names: list[str], stem: str, written: list[str]) -> list[str]:
  """Files among `names` (of `out_dir`) that an earlier run wrote for the image `stem` (`<stem>_<i><suffix>`) and
  this run does not rewrite (`written`): its logits without --save-logits now, the prompts past this run's."""
  pattern = re.compile(re.escape(stem) + r"_[0-9]+(" + "|".join(map(re.escape, PREDICTION_SUFFIXES)) + ")")
  keep = set(written)
  return [f for f in (os.path.join(out_dir, n) for n in names if pattern.fullmatch(n)) if f not in keep]


def _remove(files: list[str]) -> None:
  for f in files:
    if os.path.isfile(f) or os.path.islink(f):
      os.remove(f)


def _stale_video_outputs(args: argparse.Namespace, stems: list[str]) -> list[str]:
  """With --overwrite: the earlier run's record (so that a run killed now is not taken for a complete one), the
  files of the frames it lists that this video lacks, and this video's frames' logits when this run writes none.
  A run killed before its record names no frames: those of its frames this video lacks stay."""
  record = os.path.join(args.out_dir, TRACK_FILE)
  earlier = []
  if os.path.isfile(record):
    try:
      earlier = [frame["name"] for frame in storage.read_json(record)["frames"]]
    except (UserError, OSError, KeyError, TypeError):
      print(f"warning: {record} is unreadable: the earlier run's frames that this video lacks stay")
  this = set(stems)
  # Names only (no path, nothing hidden): whatever the record says, nothing outside --out-dir is removed.
  gone = [n for n in earlier if isinstance(n, str) and n not in this and os.path.basename(n) == n
          and not n.startswith(".")]
  stale = [record] + [os.path.join(args.out_dir, n + s) for n in gone for s in PREDICTION_SUFFIXES]
  if not args.save_logits:  # this video's frames, logits from before
    stale += [os.path.join(args.out_dir, n + PREDICTION_SUFFIXES[-1]) for n in stems]
  return stale


def run_video(args: argparse.Namespace, prompts: list[str]) -> int:
  if len(prompts) != 1:
    raise UserError(f"--video takes one --prompt (the object to track), got {len(prompts)}")
  if args.chunk is None:
    args.chunk = DEFAULT_CHUNK
  if args.chunk < 2:
    raise UserError(f"--chunk must be at least 2, got {args.chunk}")
  if os.path.isdir(args.video) and os.path.realpath(args.video) == os.path.realpath(args.out_dir):
    # The masks and overlays written there would be read as frames by the next run.
    raise UserError(f"--out-dir {args.out_dir} is the frames directory (--video); choose another --out-dir")
  stems, frames = read_frames(args.video)  # a directory's frames are all checked here, before the load
  record = os.path.join(args.out_dir, TRACK_FILE)
  common.check_not_there(_outputs(args, stems) + [record], args.overwrite)
  # A chunk is padded to its full size: a longer one than the video would encode padding frames only.
  chunk = min(args.chunk, max(2, len(stems)))
  predictor = VideoPredictor.from_checkpoint(args.checkpoint, precision=args.precision, attention=args.attention,
                                             compilation_cache_dir=args.compilation_cache,
                                             max_text_len=args.max_text_len, chunk=chunk)
  shown: list = []

  def keep(frames):  # the frames again, for the overlays
    for f in frames:
      shown.append(f)
      yield f

  seen, track = 0, []
  with storage.output_dir(args.out_dir, "--out-dir"):
    if args.overwrite:
      _remove(_stale_video_outputs(args, stems))
    for out in predictor.iter_predict(keep(frames), prompts[0]):
      frame = shown.pop(0)
      save_prediction(os.path.join(args.out_dir, stems[out.index]), frame, out.mask,
                      out.logits if args.save_logits else None)
      seen += out.object_score > 0
      track.append({"name": stems[out.index], "object_score": round(float(out.object_score), 6),
                    "mask_area": int(out.mask.sum())})
      print(f"[{stems[out.index]}] mask area {int(out.mask.sum())} px ({100.0 * out.mask.mean():.2f}%), "
            f"object score {out.object_score:.4f}")
    storage.write_atomic(record, json.dumps({"video": args.video, "prompt": prompts[0],
                                             "checkpoint": args.checkpoint, "frames": track}, indent=1) + "\n")
  print(f"{len(stems)} frame{'s' if len(stems) != 1 else ''}, object seen on {seen}; {record} written")
  return 0
