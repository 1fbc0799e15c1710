"""`run.py serve`, the web demo: the page in a real browser (Debian's chromium driven by playwright), its messages
for bad input, and the command's errors. The model is a tiny random-weight checkpoint: the masks mean nothing,
but they must be the Predictor's masks, one per prompt, at the image's size."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from evf_jax import cli
from evf_jax.cli import run_serve
from evf_jax.errors import UserError
from evf_jax.images import load_image, overlay
from evf_jax.predictor import Predictor
from evf_testing.benchmarking import build_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
EXAMPLE = os.path.join(run_serve.EXAMPLES_DIR, run_serve.EXAMPLES[0][0])
TWO = "the blue square\nthe square on the left"
OTHER_TWO = "the green square\nthe blue triangle"  # as many prompts as TWO: the same compiled program

pytestmark = [pytest.mark.usefixtures("fast_compile"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]  # pandas deprecations in gradio


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return build_models("tiny", str(tmp_path_factory.mktemp("serve")))[2]


@pytest.fixture(scope="module")
def app(ckpt, tmp_path_factory):
  """One App per module; each test reads `app.segmenter.encodes` relative to its start."""
  with pytest.MonkeyPatch.context() as mp:  # gradio's upload and output cache, away from /tmp/gradio
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    yield run_serve.App(run_serve.Segmenter(Predictor.from_checkpoint(ckpt)), "a test model")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _can_bind(host: str) -> bool:
  """Whether `host` is an address of this machine (no IPv6 loopback in some containers; 127.0.0.2 is loopback
  on Linux, not on every system)."""
  try:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      s.bind((host, 0))
    return True
  except OSError:
    return False


def _png_header(w: int, h: int) -> bytes:
  """A PNG that declares w x h pixels and holds one row: its size is readable, its pixels are not."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * w)))
          + chunk(b"IEND", b""))


# The page in a browser.

def test_page_in_chromium(app, tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (scripts/setup_env.sh installs Debian's chromium when run as root)")
  sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
  image = load_image(EXAMPLE)
  warm_up = tmp_path / "flipped.png"  # the same size and prompt count: compiles what the page will run
  Image.fromarray(image[:, ::-1]).save(warm_up)
  warm = threading.Thread(target=app.segment_page, args=(str(warm_up), TWO, False))
  warm.start()  # ... while gradio and chromium start
  demo = app.build()
  port = _free_port()
  demo.launch(prevent_thread_lock=True, quiet=True, **run_serve.launch_kwargs("127.0.0.1", port))
  try:
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                  args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
      page = browser.new_page(viewport={"width": 1280, "height": 1000})
      page.set_default_timeout(120_000)
      page.goto(f"http://127.0.0.1:{port}/")

      def status_has(text):
        page.wait_for_function("t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text)

      page.click("#segment")  # no image yet: a message, and the server goes on serving
      status_has("no image")
      warm.join()
      encodes = app.segmenter.encodes
      page.set_input_files("#input-image input[type=file]", EXAMPLE)
      page.wait_for_selector("#input-image img")
      page.fill("#prompts textarea", TWO)
      page.click("#segment")
      status_has("encoded in")
      overlays = "Array.from(document.querySelectorAll('#overlays img'))"
      page.wait_for_function(f"{overlays}.length == 2 && {overlays}.every(i => i.complete && i.naturalWidth > 0)")
      sizes = page.evaluate(f"{overlays}.map(i => [i.naturalWidth, i.naturalHeight])")
      assert sizes == [[image.shape[1], image.shape[0]]] * 2
      assert app.segmenter.encodes == encodes + 1  # the uploaded image is not the warm-up image: encoded
      # The first overlay as served is exactly the Predictor's mask drawn on the image.
      src = page.evaluate(f"{overlays}[0].src")
      served = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
      want = app.segmenter.predictor.predict(TWO.splitlines()).masks[0]
      np.testing.assert_array_equal(served, overlay(image, want))
      assert "the square on the left" in page.inner_text("#scores")

      page.fill("#prompts textarea", OTHER_TWO)  # same image, other prompts: no new encoding
      page.check("#semantic input")
      page.click("#segment")
      page.wait_for_function("t => document.querySelector('#overlays').innerText.includes(t)",
                             arg="[semantic] the green square")
      page.wait_for_function(f"{overlays}.length == 2 && {overlays}.every(i => i.complete && i.naturalWidth > 0)")
      assert "embedding reused" in page.inner_text("#status")
      assert app.segmenter.encodes == encodes + 1
      assert "[semantic] the blue triangle" in page.inner_text("#scores")
      download = page.request.get(page.get_attribute("#masks a", "href")).body()  # the link, as a click gets it
      with zipfile.ZipFile(io.BytesIO(download)) as z:
        names = sorted(z.namelist())
      assert names == ["prompts.txt", "synthetic_val_1_0_mask.png", "synthetic_val_1_1_mask.png"]
      shot = tmp_path / "serve.png"
      page.screenshot(path=str(shot), full_page=True)
      browser.close()
  finally:
    demo.close()
  assert Image.open(shot).size[0] == 1280


# The Segment button's handler: results and messages.

def test_segment_outputs_masks_zip_and_scores(app, tmp_path):
  encodes = app.segmenter.encodes
  gallery, zip_path, table, _ = app.segment_page({"path": EXAMPLE, "orig_name": "my photo.png"}, TWO, False)
  image = load_image(EXAMPLE)
  want = app.segmenter.predictor.predict(TWO.splitlines())
  assert [caption.split(" (IoU")[0] for _, caption in gallery] == ["0: the blue square", "1: the square on the left"]
  for (picture, _), mask in zip(gallery, want.masks):
    np.testing.assert_array_equal(picture, overlay(image, mask))
  with zipfile.ZipFile(zip_path) as z:
    assert sorted(z.namelist()) == ["my_photo_0_mask.png", "my_photo_1_mask.png", "prompts.txt"]
    for i, mask in enumerate(want.masks):
      png = np.asarray(Image.open(io.BytesIO(z.read(f"my_photo_{i}_mask.png"))))
      np.testing.assert_array_equal(png, mask.astype(np.uint8) * 255)
    assert z.read("prompts.txt").decode().splitlines()[1].endswith("\tthe square on the left")
  assert f"{float(want.scores[1]):.3f}" in table.splitlines()[3]
  assert app.segmenter.encodes <= encodes + 1  # 0 when the browser test left this image's embedding
  encodes = app.segmenter.encodes
  gallery, _, _, again = app.segment_page(EXAMPLE, OTHER_TWO, False)
  assert "embedding reused" in again and app.segmenter.encodes == encodes
  assert gallery[1][1].startswith("1: the blue triangle")
  other = tmp_path / "other.png"
  Image.fromarray(image[::-1]).save(other)  # another image is encoded
  _, _, _, status = app.segment_page(str(other), TWO, False)
  assert "encoded in" in status and app.segmenter.encodes == encodes + 1


def test_semantic_checkbox_prefixes_each_prompt():
  assert run_serve.parse_prompts(" circles \n\n[semantic] squares\n", True) == ["[semantic] circles",
                                                                              "[semantic] squares"]
  assert run_serve.parse_prompts("circles\r\nsquares", False) == ["circles", "squares"]
  for text, semantic in (("circles\n[semantic]", False), ("circles\n [semantic] \u200b", True)):
    with pytest.raises(UserError, match=r"^prompt 2 is only the \[semantic\] tag: name what to segment"):
      run_serve.parse_prompts(text, semantic)


def _bad_inputs(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("this is not an image")
  truncated = tmp_path / "cut.png"
  with open(EXAMPLE, "rb") as f:
    truncated.write_bytes(f.read()[:300])
  big = tmp_path / "big.png"
  big.write_bytes(_png_header(5000, 4000))
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(_png_header(30000, 30000))
  thin = tmp_path / "thin.png"  # a valid image that SAM's longest-side resize would make 0 pixels high
  Image.new("RGB", (5000, 1)).save(thin)
  return {
      "no_image": (None, TWO, "no image"),
      "empty_prompt": (EXAMPLE, " \n\t\n", "no prompt"),
      "too_many_prompts": (EXAMPLE, "\n".join(["cat"] * 17), "at most 16"),
      "not_an_image": ({"path": str(text), "orig_name": "holiday.png"}, TWO, "not an image"),
      "truncated": ({"path": str(truncated), "orig_name": "holiday.png"}, TWO, "cannot decode image"),
      "huge": ({"path": str(big), "orig_name": "holiday.png"}, TWO, "5000x4000 (20.0 megapixels)"),
      "bomb": ({"path": str(bomb), "orig_name": "holiday.png"}, TWO, "too large to open"),
      "thin": ({"path": str(thin), "orig_name": "holiday.png"}, TWO, "5000x1: too thin for this model"),
  }


@pytest.mark.parametrize("kind", ["no_image", "empty_prompt", "too_many_prompts", "not_an_image", "truncated",
                                  "huge", "bomb", "thin"])
def test_bad_input_is_a_message_on_the_page(app, tmp_path, kind):
  image, prompts, expect = _bad_inputs(tmp_path)[kind]
  gallery, zip_path, table, status = app.segment_page(image, prompts, False)
  assert status.startswith("**Error:**") and expect in status, status
  assert gallery == [] and zip_path is None and table == ""
  if isinstance(image, dict):  # the file as the user named it, not gradio's copy
    assert "holiday" in status and str(tmp_path) not in status


def test_the_page_segments_uploads_only(app, tmp_path):
  """Through gradio's API as any client can call it: an upload is segmented; a bare {"path": ...} (no "meta", so
  gradio neither checks nor moves it) naming a file on the server is refused, not segmented and sent back."""
  import httpx
  from gradio_client import Client, handle_file
  secret = tmp_path / "private.png"
  Image.fromarray(255 - load_image(EXAMPLE)).save(secret)  # not an image any other test encodes
  demo = app.build()
  port = _free_port()
  demo.launch(prevent_thread_lock=True, quiet=True, **run_serve.launch_kwargs("127.0.0.1", port))
  try:
    url = f"http://127.0.0.1:{port}/gradio_api/call/segment"
    encodes = app.segmenter.encodes
    for image in ({"path": str(secret)}, {"path": str(secret), "orig_name": "x.png", "url": None}):
      event = httpx.post(url, json={"data": [image, TWO, False]}, timeout=30).json()["event_id"]
      reply = httpx.get(f"{url}/{event}", timeout=300).text
      assert "did not arrive as an upload" in reply and "private" not in reply, reply
    assert app.segmenter.encodes == encodes
    gallery, _, _, status = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
        handle_file(str(secret)), TWO, False, api_name="/segment")
    assert len(gallery) == 2 and "encoded in" in status and app.segmenter.encodes == encodes + 1, status
  finally:
    demo.close(verbose=False)


def test_an_upload_without_a_path_is_a_message(app):
  """A payload naming no file is the page's message, not an internal error from opening nothing."""
  for image in ({"path": None, "orig_name": "holiday.png"}, {"path": "", "orig_name": "holiday.png"}):
    status = app.segment_page(image, TWO, False)[3]
    assert status == "**Error:** the image did not arrive: upload it again", status


def test_limits_are_inclusive(app):
  """--max-pixels is the largest image accepted and MAX_PROMPTS the most prompts: an image of exactly that many
  pixels and exactly 16 prompts pass, one pixel less is refused."""
  h, w = load_image(EXAMPLE).shape[:2]
  predictor = app.segmenter.predictor
  assert run_serve.Segmenter(predictor, max_pixels=h * w).read_image(EXAMPLE, "x.png").shape == (h, w, 3)
  with pytest.raises(UserError, match=f"x.png is {w}x{h}"):
    run_serve.Segmenter(predictor, max_pixels=h * w - 1).read_image(EXAMPLE, "x.png")
  assert len(run_serve.parse_prompts("\n".join(["cat"] * run_serve.MAX_PROMPTS), False)) == 16


def test_prompts_are_shown_as_typed_not_as_markup(app):
  """The table is Markdown: a prompt's `|` would split its cell and `*` or `_` turn into emphasis unless escaped."""
  table = app.segment_page(EXAMPLE, "a | b\n*the* top_left", False)[2]
  rows = table.splitlines()[2:]
  assert rows[0].startswith(r"| 0 | a \| b | ") and rows[1].startswith(r"| 1 | \*the\* top\_left | "), rows


def test_a_truncated_prompt_is_a_warning_on_the_page(app, monkeypatch):
  """The tokenizer's warning for a prompt longer than max_text_len (cut to fit) reaches the status line, not only
  the server's log."""
  monkeypatch.setattr(app.segmenter.predictor.tokenizer, "max_text_len", 16)
  long = " ".join(["the blue square and the circle"] * 6)
  status = app.segment_page(EXAMPLE, f"{long}\nthe square on the left", False)[3]
  warned = [line for line in status.split("  \n") if line.startswith("Warning: ")]
  assert len(warned) == 1 and "prompt 0 has" in warned[0] and "truncated to 16" in warned[0], status


def test_only_the_newest_mask_zips_are_kept(app, monkeypatch):
  """Each request writes a zip; a server that runs for days keeps the newest KEEP_OUTPUTS of them, not all."""
  monkeypatch.setattr(run_serve, "KEEP_OUTPUTS", 2)
  zips = [app.segment_page(EXAMPLE, TWO, False)[1] for _ in range(4)]
  assert [os.path.exists(z) for z in zips] == [False, False, True, True]
  assert not os.path.exists(os.path.dirname(zips[1]))  # the folder too, not only the zip


def test_a_file_beside_the_upload_folder_is_refused(app, tmp_path):
  """Inside the upload folder means under it, not a name that starts like it (`gradio2` next to `gradio`)."""
  page = run_serve.App(app.segmenter)
  page._uploads = str(tmp_path / "gradio")
  beside = tmp_path / "gradio2" / "private.png"
  beside.parent.mkdir()
  Image.fromarray(load_image(EXAMPLE)[:, ::-1]).save(beside)
  encodes = app.segmenter.encodes
  status = page.uploaded_only({"path": str(beside)}, TWO, False)[3]
  assert status == "**Error:** the image did not arrive as an upload: upload it again", status
  assert app.segmenter.encodes == encodes


def test_a_bug_is_a_message_and_the_next_request_works(app, monkeypatch, capsys):
  def broken(image, prompts):
    raise RuntimeError("boom")

  with monkeypatch.context() as m:
    m.setattr(app.segmenter, "segment", broken)
    gallery, _, _, status = app.segment_page(EXAMPLE, TWO, False)
  assert status.startswith("**Internal error** (RuntimeError: boom)") and gallery == []
  assert "Traceback" in capsys.readouterr().err
  gallery, _, _, status = app.segment_page(EXAMPLE, TWO, False)
  assert len(gallery) == 2 and "prompts in" in status


# The command.

def test_only_the_serve_command_imports_gradio_and_only_when_serving():
  from tests.test_architecture import ROOT, imports
  found = [(str(path.relative_to(ROOT)), inside_function)
           for top in ("evf_jax", "convert", "data_pipelines") for path in sorted((ROOT / top).rglob("*.py"))
           for _, module, inside_function, _ in imports(path) if module.split(".")[0] == "gradio"]
  assert found == [("evf_jax/cli/run_serve.py", True)]


def test_serve_without_a_model_says_what_to_run(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "serve"], cwd=tmp_path, capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: no --checkpoint given"), r.stderr
  assert "scripts/run_default.sh" in lines[0] and str(tmp_path / "workdir" / "synthetic" / "export") in lines[0]


def test_serve_finds_the_default_jobs_model(tmp_path, monkeypatch):
  export = tmp_path / "workdir" / "synthetic" / "export"
  export.mkdir(parents=True)
  (export / "model_config.json").write_text("{}")
  monkeypatch.chdir(tmp_path)
  assert os.path.abspath(run_serve.resolve_checkpoint(None)) == str(export)
  assert run_serve.resolve_checkpoint("elsewhere") == "elsewhere"


def test_serve_errors_are_one_line(ckpt, tmp_path, capsys):
  port = ["--port", str(_free_port())]  # whether 7860 is taken here or not
  assert cli.main(["serve", "--checkpoint", str(tmp_path / "nope")] + port) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0]
  for n in ("2", "5000"):  # the model's text positions end at 1022: refused before anything is served
    assert cli.main(["serve", "--checkpoint", ckpt, "--max-text-len", n] + port) == 2
    assert capsys.readouterr().err.startswith(f"error: max text length {n}: expected 3")


@pytest.fixture
def no_model_load(monkeypatch):
  """Listening problems are found before the model loads: loading it fails the test."""
  def load(*args, **kwargs):
    raise AssertionError("the model was loaded before the listening problem was found")
  monkeypatch.setattr(run_serve.Predictor, "from_checkpoint", load)


def _serve_error(argv, capsys) -> str:
  assert cli.main(["serve"] + argv) == 2
  out, err = capsys.readouterr()
  assert "serving" not in out, out
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@contextlib.contextmanager
def _taken_port():
  """A port of 127.0.0.1 another socket listens on."""
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    yield taken.getsockname()[1]


def test_a_taken_port_is_one_line_before_the_model_loads(ckpt, no_model_load, capsys):
  with _taken_port() as port:
    err = _serve_error(["--checkpoint", ckpt, "--port", str(port)], capsys)
  assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: the port is taken"), err
  assert "another --port" in err


def test_a_port_taken_only_where_gradio_probes_is_one_line_before_the_model_loads(ckpt, no_model_load, capsys):
  """gradio binds the port on its own probe address (127.0.0.1) whatever --host; taken there only, --host ::1
  would have failed after the model load."""
  from gradio import http_server
  assert run_serve.gradio_probe_host() == http_server.LOCALHOST_NAME == "127.0.0.1"
  if not _can_bind("::1"):
    pytest.skip("no IPv6 loopback here")
  with _taken_port() as port:
    err = _serve_error(["--checkpoint", ckpt, "--host", "::1", "--port", str(port)], capsys)
  assert err == (f"error: cannot listen on [::1]:{port}: the port is taken on 127.0.0.1 (gradio needs it free "
                 "there, whatever --host); pass another --port"), err


@pytest.mark.parametrize("host, expect", [
    ("no-such-host.invalid", "--host no-such-host.invalid is not an address or a known host name"),
    ("192.0.2.1", "192.0.2.1 is not an address of this machine"),  # TEST-NET-1: nobody's address
    ("", "--host is empty"),  # gradio would have listened on 127.0.0.1
])
def test_a_bad_host_is_one_line_before_the_model_loads(ckpt, no_model_load, capsys, host, expect):
  err = _serve_error(["--checkpoint", ckpt, "--host", host, "--port", str(_free_port())], capsys)
  assert expect in err, err


def test_a_privileged_port_is_one_line(ckpt, no_model_load, capsys, monkeypatch):
  def denied(self, address):  # what a user who is not root gets for a port below 1024 (the tests may run as root)
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(socket.socket, "bind", denied)
  err = _serve_error(["--checkpoint", ckpt, "--port", "80"], capsys)
  assert err.startswith("error: cannot listen on 127.0.0.1:80: permission denied (ports below 1024 need root)")


def test_a_port_taken_while_the_model_loads_is_one_line(ckpt, capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
  monkeypatch.setattr(run_serve, "check_listen", lambda host, port: None)  # free then, taken now
  with _taken_port() as port:
    err = _serve_error(["--checkpoint", ckpt, "--port", str(port)], capsys)
  assert err.startswith(f"error: cannot listen on 127.0.0.1:{port} ("), err


def test_an_empty_path_flag_is_one_line(ckpt, no_model_load, capsys):
  err = _serve_error(["--checkpoint", ""], capsys)  # not the default model
  assert err == "error: --checkpoint is empty", err
  with pytest.raises(SystemExit) as e:  # argparse's check (all commands), not a silent run without a cache
    cli.main(["serve", "--checkpoint", ckpt, "--compilation-cache", " "])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and err == ["error: run.py serve: argument --compilation-cache: is empty "
                                       "(see run.py serve --help)"], err


def test_a_bad_max_pixels_is_one_line(ckpt, no_model_load, capsys):
  """--max-pixels 0 would refuse every image on the page: refused before the model loads."""
  err = _serve_error(["--checkpoint", ckpt, "--max-pixels", "0", "--port", str(_free_port())], capsys)
  assert err == "error: --max-pixels must be >= 1, got 0", err


def test_a_bracketed_ipv6_host_is_its_address():
  """--host [::1], as a URL writes it, listens on ::1 (getaddrinfo knows no brackets); the URL gets them back."""
  assert run_serve.listen_host(" [::1] ") == "::1" and run_serve.url_host("::1") == "[::1]"
  assert run_serve.listen_host("127.0.0.1") == "127.0.0.1"
  with pytest.raises(UserError, match="--host is empty"):
    run_serve.listen_host("[]")


@pytest.mark.parametrize("port", ["0", "-1", "70000"])
def test_a_port_out_of_range_is_one_line(ckpt, no_model_load, capsys, port):
  assert _serve_error(["--checkpoint", ckpt, "--port", port], capsys) == f"error: --port {port}: expected 1 to 65535"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1"])  # 127.0.0.2: not in NO_PROXY unless added
def test_serving_is_said_once_the_port_listens(ckpt, monkeypatch, tmp_path, host):
  """`serve` says "serving ... at URL" only when URL answers, never shares the page (GRADIO_SHARE=true would
  open a public link), starts behind an HTTP proxy (gradio fetches its own page with httpx, which would ask the
  proxy: NO_PROXY names --host too) and stops when gradio's wait for Ctrl-C ends."""
  import gradio as gr
  from gradio import networking
  if not _can_bind(host):
    pytest.skip(f"{host} is not an address here")
  port = _free_port()
  url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
  said = []

  class Stdout(io.StringIO):
    def write(self, text):
      if "serving" in text:  # is the page there when the line is written?
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
          said.append((text, s.connect_ex((host, port))))
      return super().write(text)

  tunnels = []
  monkeypatch.setattr(networking, "setup_tunnel", lambda *a, **k: tunnels.append(a) or "https://x.gradio.live")
  monkeypatch.setenv("GRADIO_SHARE", "true")
  for var in ("http_proxy", "HTTP_PROXY", "ALL_PROXY"):
    monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: a request through it fails
  monkeypatch.setenv("NO_PROXY", "example.com")
  monkeypatch.delenv("no_proxy", raising=False)
  monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
  limits = []  # the upload limit gradio enforces, as launched

  def block_thread(self):  # instead of Ctrl-C
    limits.append(self.max_file_size)
    self.close(verbose=False)

  monkeypatch.setattr(gr.Blocks, "block_thread", block_thread)
  monkeypatch.setattr(sys, "stdout", Stdout())
  assert cli.main(["serve", "--checkpoint", ckpt, "--host", host, "--port", str(port)]) == 0
  assert len(said) == 1 and f"at {url} " in said[0][0], said
  assert said[0][1] == 0, f"nothing listens at {url} when serve says it serves there"
  assert tunnels == []
  assert limits == [100 * 1024 ** 2]  # MAX_UPLOAD: gradio refuses bigger uploads itself
  assert os.environ["NO_PROXY"] == "example.com" and "no_proxy" not in os.environ  # as they were


SIGTERM_AT_SERVING = """
import os, signal, sys
from evf_jax import cli


class Out:  # SIGTERM to itself as the "serving" line is written: what a supervisor may do at once
  def write(self, text):
    sys.__stdout__.write(text)
    if text.startswith("serving "):
      os.kill(os.getpid(), signal.SIGTERM)
    return len(text)

  def __getattr__(self, name):  # the rest (isatty, fileno, ... for uvicorn's logging) as the real stdout's
    return getattr(sys.__stdout__, name)


sys.stdout = Out()
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_as_serving_is_said_stops_it_cleanly(ckpt, tmp_path):
  """The SIGTERM handler is in place when the "serving" line is written (it was set after: a supervisor that
  signalled at once killed the process, under load in the test below)."""
  env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", SIGTERM_AT_SERVING, "serve", "--checkpoint", ckpt, "--port",
                         str(_free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.startswith("serving "), (done.returncode, done.stdout, done.stderr)
  assert not [p for p in os.listdir(tmp_path) if p.startswith("evf_jax_serve_")]


def test_sigterm_stops_the_server_as_ctrl_c_does(ckpt, tmp_path):
  """`kill` (SIGTERM) ends serve with status 0 and removes its temporary folder of served masks; Python's default
  ended the process at once and left the folder behind."""
  env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "run.py", "serve", "--checkpoint", ckpt, "--port", str(_free_port())],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()  # "serving ... at URL": the folder exists and the port listens
    assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
    assert [p for p in os.listdir(tmp_path) if p.startswith("evf_jax_serve_")]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
  finally:
    proc.kill()
  assert not [p for p in os.listdir(tmp_path) if p.startswith("evf_jax_serve_")]

