"""A frames directory as `read_frames` and `run.py predict --video` read it: natural order, hidden files, names that
would collide, entries that are no files, headers checked before the model loads, one-line errors for what cannot
be listed or opened. The CLI tests use a stand-in predictor: what is tested happens around the model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from evf_jax import cli, images, video
from evf_jax.cli import run_predict
from evf_jax.errors import UserError
from evf_jax.video import VideoFrame, read_frames
from evf_testing.cli_errors import error_line


def _frames(d, names, hw=(6, 8)):
  d.mkdir(exist_ok=True)
  for i, n in enumerate(names):
    Image.fromarray(np.full((*hw, 3), 10 * i, np.uint8)).save(str(d / n))
  return str(d)


def test_natural_order(tmp_path):
  names = [f"frame{t}.png" for t in range(1, 13)]
  stems, frames = read_frames(_frames(tmp_path / "a", names[::-1]))
  assert stems == [f"frame{t}" for t in range(1, 13)]
  assert [int(f[0, 0, 0]) for f in frames] == [10 * (11 - i) for i in range(12)]  # the files in that order
  decimal = ["0.0.png", "0.5.png", "1.0.png", "10.0.png", "2.0.png"]
  assert read_frames(_frames(tmp_path / "b", decimal))[0] == ["0.0", "0.5", "1.0", "2.0", "10.0"]
  assert read_frames(_frames(tmp_path / "c", ["Shot2.png", "shot10.png", "shot1_b.png"]))[0] == \
      ["shot1_b", "Shot2", "shot10"]  # text case-insensitive
  # '²' is a Unicode digit: int() of it raised; it is text here.
  assert read_frames(_frames(tmp_path / "d", ["1.png", "\u00b2.png", "10.png"]))[0] == ["1", "10", "\u00b2"]


def test_names_that_collide_are_refused(tmp_path):
  with pytest.raises(UserError, match=r"frames 01\.jpg and 1\.png in .* same place in the order"):
    read_frames(_frames(tmp_path / "a", ["1.png", "01.jpg", "2.png"]))
  with pytest.raises(UserError, match=r"frames A\.png and a\.png in .* would write the same outputs"):
    read_frames(_frames(tmp_path / "b", ["a.png", "A.png"]))
  with pytest.raises(UserError, match=r"frames x\.jpg and x\.png in .* would write the same outputs"):
    read_frames(_frames(tmp_path / "c", ["x.png", "x.jpg"]))


def test_hidden_files_and_entries_that_are_no_files(tmp_path):
  d = _frames(tmp_path / "a", ["00000.jpg", "00001.jpg"])
  (tmp_path / "a" / "._00001.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(64))
  stems, frames = read_frames(d)
  assert stems == ["00000", "00001"] and len(list(frames)) == 2
  os.symlink(str(tmp_path / "gone.jpg"), str(tmp_path / "a" / "00002.jpg"))
  with pytest.raises(UserError, match=r"frame .*00002\.jpg is a broken symbolic link"):
    read_frames(d)
  os.remove(os.path.join(d, "00002.jpg"))
  os.mkdir(os.path.join(d, "00003.png"))
  with pytest.raises(UserError, match=r"frame .*00003\.png is not a file"):
    read_frames(d)


def test_headers_are_checked_up_front(tmp_path):
  d = _frames(tmp_path / "a", ["0.png", "1.png", "2.png"])
  Image.fromarray(np.zeros((7, 8, 3), np.uint8)).save(os.path.join(d, "2.png"))
  with pytest.raises(UserError, match=r"frame .*2\.png is 8x7, frame 0 \(.*0\.png\) is 8x6"):
    read_frames(d)  # not only once the iterator reaches it
  (tmp_path / "a" / "2.png").write_text("not an image")
  with pytest.raises(UserError, match=r"not an image .*2\.png"):
    read_frames(d)
  # A frame stored turned, with the EXIF orientation that turns it back, has frame 0's size as loaded.
  im = Image.fromarray(np.zeros((8, 6, 3), np.uint8))
  exif = im.getexif()
  exif[0x0112] = 6
  os.remove(os.path.join(d, "2.png"))
  im.save(os.path.join(d, "2.jpg"), exif=exif)
  stems, frames = read_frames(d)
  assert stems == ["0", "1", "2"] and [f.shape for f in frames] == [(6, 8, 3)] * 3


def test_unlistable_and_unopenable_are_one_line(tmp_path, monkeypatch):
  d = _frames(tmp_path / "a", ["0.png", "1.png"])

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  with monkeypatch.context() as m:  # root reads anything: the refusal is simulated
    m.setattr(video.os, "listdir", refuse)
    with pytest.raises(UserError, match=r"cannot list the frames directory .* \(Permission denied\)"):
      read_frames(d)
  monkeypatch.setattr(images, "open", refuse, raising=False)
  with pytest.raises(images.ImageReadError, match=r"cannot open image .*1\.png: Permission denied"):
    images.load_image(os.path.join(d, "1.png"))


class _Stand:
  """In place of `VideoPredictor`: records how it was made, masks nothing."""
  made: list = []

  @classmethod
  def from_checkpoint(cls, directory, **kwargs):
    cls.made.append(kwargs)
    return cls()

  def iter_predict(self, frames, prompt):
    for i, f in enumerate(frames):
      yield VideoFrame(i, np.full(f.shape[:2], -1.0, np.float32), np.zeros(f.shape[:2], bool), 1.0)


@pytest.fixture
def stand(monkeypatch):
  _Stand.made = []
  monkeypatch.setattr(run_predict, "VideoPredictor", _Stand)
  return _Stand


def _predict(d, out, *more):
  return ["predict", "--checkpoint", "ckpt", "--video", d, "--prompt", "the dog", "--out-dir", str(out), *more]


def test_cli_chunk_capped_and_summary(tmp_path, stand, capsys):
  d = _frames(tmp_path / "five", [f"{t}.png" for t in range(5)])
  assert cli.main(_predict(d, tmp_path / "o1", "--chunk", "64")) == 0
  assert stand.made[-1]["chunk"] == 5  # a chunk of 64 would encode 59 padding frames
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("5 frames, object seen on 5; ")
  assert cli.main(_predict(d, tmp_path / "o2", "--chunk", "3")) == 0
  assert stand.made[-1]["chunk"] == 3
  one = _frames(tmp_path / "one", ["0.png"])
  assert cli.main(_predict(one, tmp_path / "o3")) == 0
  assert stand.made[-1]["chunk"] == 2  # the tracker's least
  record = tmp_path / "o3" / "track.json"
  assert capsys.readouterr().out.strip().splitlines()[-1] == f"1 frame, object seen on 1; {record} written"
  assert sorted(os.listdir(tmp_path / "o3")) == ["0_mask.png", "0_vis.png", "track.json"]


def test_cli_track_record_and_overwrite_leaves_nothing_stale(tmp_path, stand, capsys, monkeypatch):
  """track.json is written after the last frame (per frame: name, object score, mask area), so a stopped run has
  none; --overwrite removes the earlier run's record, its frames this video lacks and logits not written now,
  and nothing else."""
  out = tmp_path / "o"
  five = _frames(tmp_path / "five", [f"{t:05d}.png" for t in range(5)])
  assert cli.main(_predict(five, out, "--save-logits")) == 0
  record = json.loads((out / "track.json").read_text())
  assert record["prompt"] == "the dog" and record["video"] == five
  assert record["frames"] == [{"name": f"{t:05d}", "object_score": 1.0, "mask_area": 0} for t in range(5)]
  assert len(os.listdir(out)) == 5 * 3 + 1
  (out / "notes.txt").write_text("mine")  # the user's: stays
  three = _frames(tmp_path / "three", [f"{t:05d}.png" for t in range(3)])
  line = error_line(capsys, _predict(three, out))
  assert "00000_mask.png exists" in line and "--overwrite" in line, line
  (out / "00000_logits.npy").rename(out / "keep_logits.npy")  # not named by this run or the record: stays
  assert cli.main(_predict(three, out, "--overwrite")) == 0
  assert sorted(os.listdir(out)) == sorted([f"0000{t}{s}" for t in range(3) for s in ("_mask.png", "_vis.png")]
                                           + ["keep_logits.npy", "notes.txt", "track.json"])
  assert [f["name"] for f in json.loads((out / "track.json").read_text())["frames"]] == ["00000", "00001", "00002"]

  def stopped(self, frames, prompt):  # a run stopped after frame 1: no record, the earlier one gone too
    for i, f in enumerate(frames):
      if i == 2:
        raise KeyboardInterrupt
      yield VideoFrame(i, np.zeros(f.shape[:2], np.float32), np.zeros(f.shape[:2], bool), 1.0)

  with monkeypatch.context() as m:
    m.setattr(_Stand, "iter_predict", stopped)
    assert cli.main(_predict(five, out, "--overwrite")) != 0
  assert capsys.readouterr().err.strip() == "error: interrupted"
  assert not (out / "track.json").exists() and (out / "00001_mask.png").exists()
  (tmp_path / "only_record").mkdir()  # a record alone is an earlier run's output too
  (tmp_path / "outside_mask.png").write_text("the user's")  # a record naming it does not remove it
  (tmp_path / "absolute_mask.png").write_text("the user's")  # nor by an absolute path (not hidden, unlike ../)
  (tmp_path / "only_record" / "track.json").write_text(json.dumps(
      {"frames": [{"name": "../outside"}, {"name": str(tmp_path / "absolute")}, {"name": 3}]}))
  line = error_line(capsys, _predict(three, tmp_path / "only_record"))
  assert "track.json exists" in line, line
  assert cli.main(_predict(three, tmp_path / "only_record", "--overwrite")) == 0
  assert (tmp_path / "outside_mask.png").exists() and (tmp_path / "absolute_mask.png").exists()
  (tmp_path / "only_record" / "track.json").write_text("{}")
  assert cli.main(_predict(three, tmp_path / "only_record", "--overwrite")) == 0
  assert "track.json is unreadable" in capsys.readouterr().out


def test_cli_out_dir_that_is_the_frames_directory(tmp_path, stand, capsys):
  """Masks and overlays written among the frames would be read as frames by the next run: refused before the
  model loads, with the directory named either way, and nothing written there."""
  d = _frames(tmp_path / "a", ["0.png", "1.png"])
  for out in (d, os.path.join(d, "")):
    line = error_line(capsys, _predict(d, out))
    assert line == f"error: --out-dir {out} is the frames directory (--video); choose another --out-dir", line
  assert stand.made == [] and sorted(os.listdir(d)) == ["0.png", "1.png"]


def test_cli_bad_frames_before_the_load(tmp_path, stand, capsys):
  d = _frames(tmp_path / "a", [f"{t:05d}.jpg" for t in range(4)])
  Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(os.path.join(d, "00002.jpg"))
  line = error_line(capsys, _predict(d, tmp_path / "o"))
  assert "00002.jpg is 9x6" in line and "00000.jpg" in line, line
  assert stand.made == [] and not (tmp_path / "o").exists()  # no model, no outputs


def test_cli_frame_that_cannot_be_opened(tmp_path, stand, capsys, monkeypatch):
  d = _frames(tmp_path / "a", ["0.png", "1.png"])
  real = open

  def refuse_frame_1(path, *args, **kwargs):
    if str(path).endswith("1.png"):
      raise PermissionError(13, "Permission denied")
    return real(path, *args, **kwargs)

  monkeypatch.setattr(images, "open", refuse_frame_1, raising=False)
  line = error_line(capsys, _predict(d, tmp_path / "o"))
  assert "cannot open image" in line and "1.png" in line, line


def test_the_video_prompt_is_one_str():
  """A list (several objects) or None is refused in one line, not a TypeError from inside the tokenizer."""
  from evf_jax.predictor import PromptError
  from evf_jax.video import VideoPredictor
  predictor = VideoPredictor.__new__(VideoPredictor)  # the check runs before anything the constructor sets
  frame = np.zeros((6, 8, 3), np.uint8)
  for prompt, kind in ((["dog"], "list"), (None, "NoneType")):
    with pytest.raises(PromptError, match=f"the prompt must be a str \\(one object to track\\), got a {kind}"):
      predictor.prompt_embedding(frame, prompt)


def _video_file(path, n=5, rotation=None, hw=(48, 64)):
  import av
  frames = []
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = hw[1], hw[0], "yuv420p"
    if rotation is not None:
      stream.set_display_rotation(rotation)
    for i in range(n):
      a = np.full((*hw, 3), 40, np.uint8)
      a[..., 1] = 30 * i
      a[:8, :16] = 250  # a bright block at the top left of the stored frame
      frames.append(a)
      for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return str(path)


def test_video_file_read_lazily_and_upright(tmp_path):
  """A video file is counted and checked up front, then decoded as its frames are used (a generator: memory holds
  what the tracker holds, not the video); a display rotation of -90 degrees (a phone's portrait video) turns each
  frame a quarter clockwise, as ffmpeg's autorotate shows it."""
  import inspect
  stems, frames = read_frames(_video_file(tmp_path / "v.mp4"))
  assert stems == [f"{i:05d}" for i in range(5)] and inspect.isgenerator(frames)
  plain = list(frames)
  assert len(plain) == 5 and plain[0].shape == (48, 64, 3) and plain[0][:8, :16].mean() > 200
  stems, frames = read_frames(_video_file(tmp_path / "portrait.mp4", rotation=-90))
  turned = list(frames)
  assert len(stems) == 5 and turned[0].shape == (64, 48, 3) and turned[0].flags.c_contiguous
  np.testing.assert_array_equal(turned[2], np.rot90(plain[2], -1))  # clockwise: the block is at the top right
  assert turned[0][:16, -8:].mean() > 200


def test_video_file_problems_before_any_frame(tmp_path):
  whole = _video_file(tmp_path / "v.mp4")
  with open(whole, "rb") as f:
    data = f.read()
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(data[:len(data) // 3])  # the index (moov) is at the end: nothing is readable
  with pytest.raises(UserError, match=r"cannot decode the video .*cut\.mp4"):
    read_frames(str(cut))
  notes = tmp_path / "notes.mp4"
  notes.write_text("not a video")
  with pytest.raises(UserError, match="cannot decode the video"):
    read_frames(str(notes))
  import av
  empty = tmp_path / "empty.avi"  # a video stream without frames (AVI keeps one; an MP4 without frames has none)
  with av.open(str(empty), "w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()
  with pytest.raises(UserError, match=r"^the video has no frames: .*empty\.avi$"):
    read_frames(str(empty))


def test_cli_video_file(tmp_path, stand, capsys):
  assert cli.main(_predict(_video_file(tmp_path / "v.mp4", n=3), tmp_path / "o")) == 0
  written = [f"0000{i}{s}" for i in range(3) for s in ("_mask.png", "_vis.png")] + ["track.json"]
  assert sorted(os.listdir(tmp_path / "o")) == sorted(written)
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("3 frames, object seen on 3; ")
