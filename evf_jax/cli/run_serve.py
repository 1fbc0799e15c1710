"""`run.py serve`: a web page (gradio) that segments an image by text prompts, served from this machine.

The page: an image (uploaded, or one of the examples in examples/), prompts one per line, a `[semantic]` checkbox
and a "Segment" button. It shows one overlay and the predicted IoU per prompt, offers the binary masks as a zip
of PNGs, and says how long encoding the image and running the prompts took. The last image's embedding is kept,
so segmenting the same image again with other prompts runs only the prompt path. Bad input (no image, no prompt,
an unreadable or huge file) is a message on the page, and the server keeps serving.

gradio is imported only when the page is built, so the library and the other commands do not need it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import hashlib
import importlib.util
import io
import itertools
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from evf_jax import storage
from evf_jax.checkpoints import CONFIG_FILE
from evf_jax.cli import common, run_synthetic
from evf_jax.errors import UserError, first_line
from evf_jax.images import ImageReadError, load_image, overlay
from evf_jax.predictor import Prediction, Predictor
from evf_jax.tokenizer import SEMANTIC_TAG as SEMANTIC, check_prompts, is_blank
from evf_jax.train.checkpointing import EXPORT_DIR

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES_DIR = os.path.join(REPO, "examples")
# Held-out images of the synthetic dataset (data_pipelines/synthetic.py: seed 0, split "val", images 1, 2, 5),
# so the default job's model has seen their kind of image and words but not these images.
EXAMPLES = (
    ("synthetic_val_1.png", "the blue square\nthe square on the left", False),
    ("synthetic_val_5.png", "the red triangle\nthe circle on the left\nthe largest square", False),
    ("synthetic_val_2.png", "circles\nsquares", True),
)
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_PROMPTS = 16
KEEP_OUTPUTS = 32     # mask zips kept on disk (the newest); gradio copies each into its own cache when served
MAX_UPLOAD = "100mb"  # gradio refuses bigger uploads itself


def default_checkpoint() -> str:
  """Where the default job (`run.py synthetic`, scripts/run_default.sh) exports its model, relative to here."""
  return os.path.join(run_synthetic.DEFAULT_WORKDIR, EXPORT_DIR)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", default=None,
                 help="an evf-jax checkpoint directory (default: the model the default job exported, "
                      f"{default_checkpoint()} under the current directory)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
  common.add_compute_args(p)
  p.add_argument("--max-text-len", type=int, default=None,
                 help="longest prompt in tokens (special tokens included), 3 to the model's limit (1022 for the "
                      "released models; the default); longer prompts are truncated with a warning")
  p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                 help=f"largest image accepted, in pixels (default {DEFAULT_MAX_PIXELS}); bigger ones get a message")
  common.add_compilation_cache_arg(p)


def resolve_checkpoint(checkpoint: str | None) -> str:
  if checkpoint is not None:  # an empty --checkpoint is an error, not the default model
    storage.resolve(checkpoint, "--checkpoint")
    return checkpoint
  d = default_checkpoint()
  if os.path.isfile(os.path.join(d, CONFIG_FILE)):
    return d
  raise UserError(f"no --checkpoint given and no model from the default job in {os.path.abspath(d)}: run "
                  "`bash scripts/run_default.sh` first and serve from the repository root, or pass --checkpoint DIR")


def listen_host(host: str) -> str:
  """--host as an address to bind: brackets around an IPv6 address dropped; UserError when empty (gradio would
  listen on 127.0.0.1 instead)."""
  bare = host.strip()
  if bare.startswith("[") and bare.endswith("]"):
    bare = bare[1:-1]
  if not bare:
    raise UserError("--host is empty: pass an address of this machine (127.0.0.1: this machine only; 0.0.0.0: "
                    "every interface)")
  return bare


def url_host(host: str) -> str:
  """A bare address as it goes in a URL (and to gradio, which builds its own URL from it): IPv6 in brackets."""
  return f"[{host}]" if ":" in host else host


def check_listen(host: str, port: int) -> None:
  """UserError unless `host`:`port` can be listened on now, tried the way uvicorn binds (asyncio: each address
  the host resolves to, SO_REUSEADDR, IPv6 sockets IPv6-only). Before the model loads, so a taken port, an unknown
  host or a privileged port is one line at once, not gradio's and uvicorn's log lines after the load."""
  where = f"cannot listen on {url_host(host)}:{port}"
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except (OSError, UnicodeError) as e:  # socket.gaierror: not an address, and no such host name
    raise UserError(f"{where}: --host {host} is not an address or a known host name "
                    f"({getattr(e, 'strerror', None) or e}); pass an address of this machine (127.0.0.1 or "
                    "0.0.0.0)") from None
  for family, kind, proto, _, address in dict.fromkeys(infos):
    try:
      s = socket.socket(family, kind, proto)
    except OSError:  # a family this machine lacks: asyncio skips it too
      continue
    with s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
      try:
        s.bind(address)
      except OSError as e:
        raise UserError(f"{where}: {_bind_problem(host, e)}") from None
  # gradio refuses a port it cannot bind on its own probe address, whatever the host (e.g. --host ::1 with the port
  # taken on 127.0.0.1 only).
  probe = gradio_probe_host()
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((probe, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise UserError(f"{where}: the port is taken on {probe} (gradio needs it free there, whatever --host); "
                        "pass another --port") from None


def gradio_probe_host() -> str:
  """Where gradio tries a port before it serves (its http_server.LOCALHOST_NAME, read here without importing
  gradio, which takes seconds)."""
  return os.getenv("GRADIO_SERVER_NAME", "127.0.0.1")


def _bind_problem(host: str, e: OSError) -> str:
  if e.errno == errno.EADDRINUSE:
    return "the port is taken (another server, or a `run.py serve` still running?); pass another --port"
  if e.errno == errno.EACCES:
    return "permission denied (ports below 1024 need root); pass --port 1024 or above"
  if e.errno == errno.EADDRNOTAVAIL:
    return f"{host} is not an address of this machine; pass one of its addresses (127.0.0.1, or 0.0.0.0 for all)"
  return str(e.strerror or e)


def parse_prompts(text: str | None, semantic: bool) -> list[str]:
  """The prompts box: one prompt per non-blank line; with `semantic`, each gets the "[semantic] " prefix."""
  prompts = [line.strip() for line in (text or "").splitlines() if not is_blank(line)]
  if not prompts:
    raise UserError("no prompt: type at least one (one per line), then press Segment")
  if len(prompts) > MAX_PROMPTS:
    raise UserError(f"{len(prompts)} prompts: at most {MAX_PROMPTS} at a time")
  if semantic:
    prompts = [p if p.startswith(SEMANTIC) else f"{SEMANTIC} {p}" for p in prompts]
  check_prompts(prompts, lambda i: f"prompt {i + 1}")
  return prompts


@dataclasses.dataclass
class Segmentation:
  prompts: list[str]
  prediction: Prediction
  encode_s: float | None  # None: the image's embedding was already there (not re-encoded)
  prompts_s: float
  warnings: list[str]


class Segmenter:
  """The page's model: one Predictor for every visitor, and which image its cached embedding belongs to.

  `encodes` counts images encoded so far (the tests check that new prompts on the same image add none)."""

  def __init__(self, predictor: Predictor, max_pixels: int = DEFAULT_MAX_PIXELS):
    self.predictor = predictor
    self.max_pixels = max_pixels
    self.encodes = 0
    self._key = None
    self._lock = threading.Lock()

  def read_image(self, path: str, name: str) -> np.ndarray:
    """An uploaded file -> RGB uint8; errors name the file as the user called it, not gradio's copy."""
    try:  # the size from the header first, so a huge image is refused before it is decoded
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
          w, h = im.size
    except Image.DecompressionBombError as e:
      raise UserError(f"{name} is too large to open ({str(e).split('.')[0]}); scale it down first") from None
    except Exception:  # noqa: BLE001  (not an image, truncated, ...: load_image says which, below)
      w = h = 0
    if w * h > self.max_pixels:
      raise UserError(f"{name} is {w}x{h} ({w * h / 1e6:.1f} megapixels); this page takes images up to "
                      f"{self.max_pixels / 1e6:.1f} megapixels (run.py serve --max-pixels): scale it down first")
    try:
      picture = load_image(path)
    except ImageReadError as e:
      raise UserError(str(e).replace(path, name)) from None
    self.predictor.image_input.check_fits(picture.shape[:2], name)
    return picture

  def segment(self, image: np.ndarray, prompts: Sequence[str]) -> Segmentation:
    key = (image.shape, hashlib.sha256(image.tobytes()).hexdigest())
    with self._lock:  # one image at a time on the device; the key and the predictor's image change together
      encode_s = None
      if key != self._key:
        self._key = None
        t0 = time.perf_counter()
        self.predictor.set_image(image)
        jax.block_until_ready(self.predictor.image_embedding)
        encode_s = time.perf_counter() - t0
        self._key = key
        self.encodes += 1
      t0 = time.perf_counter()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prediction = self.predictor.predict(list(prompts))
      prompts_s = time.perf_counter() - t0
    shown = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]  # e.g. a truncated prompt
    return Segmentation(list(prompts), prediction, encode_s, prompts_s, shown)


def _md(text: str) -> str:
  """Plain text shown verbatim in Markdown (prompts and file names are the user's)."""
  return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)  # after "**Error:** " or "| ": nothing else is markup


def _inside(path: str, folder: str | None) -> bool:
  if not folder:  # no page built yet
    return False
  try:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
  except ValueError:  # a NUL in the path
    return False
  return os.path.commonpath([path, folder]) == folder


def _stem(name: str) -> str:
  return re.sub(r"[^\w.-]", "_", os.path.splitext(os.path.basename(name))[0])[:60] or "image"


class App:
  """The page's behaviour, separate from its layout: `segment_page` is the Segment button's handler."""

  def __init__(self, segmenter: Segmenter, description: str = ""):
    self.segmenter = segmenter
    self.description = description
    self._out_root = tempfile.mkdtemp(prefix="evf_jax_serve_")
    atexit.register(shutil.rmtree, self._out_root, ignore_errors=True)
    self._serial = itertools.count()
    self._uploads = None  # gradio's upload folder, once `build` made the page

  def segment_page(self, image: Any, prompts_text: str | None, semantic: bool):
    """(image as gradio sends it unprocessed: a dict with `path` and `orig_name`, or a path; the prompts box;
    the checkbox) -> (overlays, masks zip, per-prompt table, status line)."""
    try:
      if not image:
        raise UserError("no image: upload one (or pick an example below), then press Segment")
      path = image.get("path") if isinstance(image, dict) else str(image)
      name = (image.get("orig_name") if isinstance(image, dict) else None) or os.path.basename(path or "")
      if not path:
        raise UserError("the image did not arrive: upload it again")
      prompts = parse_prompts(prompts_text, bool(semantic))
      picture = self.segmenter.read_image(path, name)
      seg = self.segmenter.segment(picture, prompts)
      return self._outputs(picture, name, seg)
    except UserError as e:
      return [], None, "", f"**Error:** {_md(str(e))}"
    except Exception as e:  # noqa: BLE001  (a bug: the page says so, the log has the traceback, the server goes on)
      traceback.print_exc()
      return [], None, "", f"**Internal error** ({_md(type(e).__name__)}: {_md(str(e))}); see the server's log."

  def uploaded_only(self, image: Any, prompts_text: str | None, semantic: bool):
    """The Segment button as `build` wires it: `segment_page` for files in gradio's upload folder only. With
    preprocess=False gradio checks a file only when its payload says it is one (its "meta"); a bare {"path": ...}
    from an API client would reach the handler unchecked, and any image this process can read would come back."""
    path = image.get("path") if isinstance(image, dict) else image
    if path and not _inside(str(path), self._uploads):
      return [], None, "", "**Error:** the image did not arrive as an upload: upload it again"
    return self.segment_page(image, prompts_text, semantic)

  def _outputs(self, picture: np.ndarray, name: str, seg: Segmentation):
    p = seg.prediction
    gallery = [(overlay(picture, m), f"{i}: {prompt} (IoU {float(s):.3f})")
               for i, (prompt, m, s) in enumerate(zip(seg.prompts, p.masks, p.scores))]
    table = "\n".join(["| # | prompt | predicted IoU | mask area |", "|---|---|---|---|"] + [
        f"| {i} | {_md(prompt)} | {float(s):.3f} | {100.0 * m.mean():.2f} % |"
        for i, (prompt, m, s) in enumerate(zip(seg.prompts, p.masks, p.scores))])
    return gallery, self._write_masks(name, seg), table, self._status(picture, seg)

  def _status(self, picture: np.ndarray, seg: Segmentation) -> str:
    h, w = picture.shape[:2]
    n = len(seg.prompts)
    if seg.encode_s is None:
      first = f"Image {w}x{h}: embedding reused (same image, not encoded again)"
    else:
      first = f"Image {w}x{h} encoded in {seg.encode_s:.2f} s (kept for further prompts on it)"
    line = f"{first}; {n} prompt{'s' if n > 1 else ''} in {seg.prompts_s:.2f} s."
    return "  \n".join([line] + [f"Warning: {_md(m)}" for m in seg.warnings])

  def _write_masks(self, name: str, seg: Segmentation) -> str:
    """A zip of `<stem>_<i>_mask.png` (0 / 255, the image's size) and prompts.txt; the newest few are kept."""
    serial = next(self._serial)
    d = os.path.join(self._out_root, f"{serial:08d}")
    os.makedirs(d)
    stem = _stem(name)
    path = os.path.join(d, f"{stem}_masks.zip")
    with zipfile.ZipFile(path, "w") as z:
      for i, m in enumerate(seg.prediction.masks):
        buf = io.BytesIO()
        Image.fromarray(m.astype(np.uint8) * 255).save(buf, format="PNG")
        z.writestr(f"{stem}_{i}_mask.png", buf.getvalue())
      z.writestr("prompts.txt", "".join(f"{i}\t{float(s):.4f}\t{prompt}\n" for i, (prompt, s) in
                                        enumerate(zip(seg.prompts, seg.prediction.scores))))
    old = os.path.join(self._out_root, f"{serial - KEEP_OUTPUTS:08d}")
    shutil.rmtree(old, ignore_errors=True)
    return path

  def build(self, examples: bool = True):
    """The gradio page (gr.Blocks), not yet launched."""
    import gradio as gr  # lazy: only this command needs gradio

    with gr.Blocks(title="evf-jax: segment by text", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
      self._uploads = demo.GRADIO_CACHE
      gr.Markdown("## evf-jax: segment an image by text\n" + self.description)
      with gr.Row():
        with gr.Column():
          image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="input-image")
          prompts = gr.Textbox(label="Prompts, one per line", lines=3, elem_id="prompts",
                               placeholder="the blue square\nthe circle on the left")
          semantic = gr.Checkbox(label=f"{SEMANTIC}: every instance of a class (prefixes each prompt)",
                                 elem_id="semantic")
          button = gr.Button("Segment", variant="primary", elem_id="segment")
        with gr.Column():
          status = gr.Markdown(elem_id="status")
          gallery = gr.Gallery(label="One overlay per prompt", format="png", columns=2, height="auto", object_fit="contain",
                               interactive=False, elem_id="overlays")
          table = gr.Markdown(elem_id="scores")
          masks = gr.File(label="Binary masks (zip of PNGs)", interactive=False, elem_id="masks")
      if examples:
        gr.Examples([[os.path.join(EXAMPLES_DIR, f), text, sem] for f, text, sem in EXAMPLES],
                    inputs=[image, prompts, semantic], label="Examples (held-out images of the synthetic dataset)")
      # preprocess=False: the handler reads the upload itself, so an unreadable file is our message, not gradio's.
      button.click(self.uploaded_only, inputs=[image, prompts, semantic], outputs=[gallery, masks, table, status],
                   preprocess=False, api_name="segment")
    return demo


def launch_kwargs(host: str, port: int) -> dict:
  """gradio's launch() settings; `host` bare (`listen_host`). share=False and mcp_server=False whatever the
  environment says (GRADIO_SHARE=true would open a public link, GRADIO_MCP_SERVER another endpoint)."""
  return {"server_name": url_host(host), "server_port": port, "show_error": True, "ssr_mode": False,
          "max_file_size": MAX_UPLOAD, "share": False, "mcp_server": False}


@contextlib.contextmanager
def no_proxy_for(host: str):
  """NO_PROXY (and no_proxy) naming this machine while gradio starts: launch() fetches its own page with httpx,
  which honours http_proxy / ALL_PROXY and would ask the proxy for 127.0.0.1 (a traceback, or a refusal)."""
  saved = {var: os.environ.get(var) for var in ("NO_PROXY", "no_proxy")}
  for var, value in saved.items():
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    os.environ[var] = ",".join(dict.fromkeys(names + ["localhost", "127.0.0.1", "::1", host]))
  try:
    yield
  finally:
    for var, value in saved.items():
      if value is None:
        os.environ.pop(var, None)
      else:
        os.environ[var] = value


def run(args: argparse.Namespace) -> int:
  common.check_compute_args(args)
  if not 0 < args.port < 65536:
    raise UserError(f"--port {args.port}: expected 1 to 65535")
  if args.max_pixels < 1:
    raise UserError(f"--max-pixels must be >= 1, got {args.max_pixels}")
  if importlib.util.find_spec("gradio") is None:
    raise UserError("gradio is not installed: pip install -r requirements.txt (or bash scripts/setup_env.sh)")
  host = listen_host(args.host)
  checkpoint = resolve_checkpoint(args.checkpoint)
  check_listen(host, args.port)  # before the (slow) model load
  predictor = Predictor.from_checkpoint(checkpoint, precision=args.precision, attention=args.attention,
                                        compilation_cache_dir=args.compilation_cache,
                                        max_text_len=args.max_text_len)
  description = (f"Model: {_md(storage.resolve(checkpoint, '--checkpoint'))} ({args.precision}). Upload an image or pick an "
                 "example, type prompts (one per line), press Segment. The image is encoded once; new prompts "
                 "on it run only the prompt path. The first request of each shape also compiles.")
  demo = App(Segmenter(predictor, args.max_pixels), description).build()
  url = f"http://{url_host(host)}:{args.port}"
  try:  # quiet: gradio's own lines would say "running" too, and suggest share=True
    with no_proxy_for(host):
      demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(host, args.port))
  except (OSError, ValueError) as e:  # the port was taken while the model loaded, localhost unreachable (a proxy?)
    demo.close(verbose=False)
    first = re.split(r"\.\s", first_line(e))[0]
    raise UserError(f"cannot listen on {url_host(host)}:{args.port} ({first}); pass another --port or --host") from None
  # SIGTERM (kill, systemd, a container's stop) stops it as Ctrl-C does: Python's default for it ends the process
  # at once, without the exit handlers that remove the served masks' temporary folder. Set before the "serving"
  # line, which tells a supervisor it may signal.
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    print(f"serving {checkpoint} at {url} (Ctrl-C stops)", flush=True)  # only now: the port is listening
    demo.block_thread()
  except KeyboardInterrupt:  # before block_thread, which closes the server itself on one
    demo.close(verbose=False)
  finally:
    signal.signal(signal.SIGTERM, previous)
  return 0


def _interrupt(signum, frame) -> None:
  raise KeyboardInterrupt
