"""A Google Cloud Storage stand-in for tests: gcp-storage-emulator serving one bucket from memory on a local
port, with the environment that points our three GCS clients at it (gcsfs and google-cloud-storage read
STORAGE_EMULATOR_HOST; tensorstore, which writes orbax's arrays, reads TENSORSTORE_GCS_HTTP_URL once per process
and sends the fixed token of GOOGLE_AUTH_TOKEN_FOR_TESTING). One emulator per process: tensorstore keeps the
first URL it read.

The emulator (2026.7.19) lacks two things of GCS that tensorstore's OCDBT writer relies on, added here: a
download's `x-goog-generation` header (without it tensorstore fails with "Malformed StorageGeneration" when it
reads back a manifest it wrote, in about a third of the saves of a small model) and the `ifGenerationMatch`
precondition of uploads (the writer's guard against concurrent commits: 412 when the object's generation
differs, "0" meaning that it must not exist). It also serves each connection on its own thread."""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import socket
import threading
from http import HTTPStatus
from typing import Iterator

BUCKET = "evf-jax-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_patched = False
_upload_lock = threading.Lock()


def _patch_emulator() -> None:
  global _patched
  if _patched:
    return
  from gcp_storage_emulator import server as emulator_server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def generation(storage, bucket: str, name: str) -> str:
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"

  download, media_upload = objects.download, objects._media_upload

  def download_with_generation(request, response, storage, *args, **kwargs):
    current = generation(storage, request.params["bucket_name"], request.params["object_id"])
    if current != "0":
      response["x-goog-generation"] = current
    return download(request, response, storage, *args, **kwargs)

  def media_upload_with_precondition(request, response, storage):
    want = request.query.get("ifGenerationMatch")
    with _upload_lock:
      if want and generation(storage, request.params["bucket_name"], request.query["name"][0]) != want[0]:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      return media_upload(request, response, storage)

  objects.download = download_with_generation  # `objects.get` looks both up at call time
  objects._media_upload = media_upload_with_precondition

  def serve_concurrently(self):
    # The emulator's HTTPServer serves one connection at a time: a client that connects and stalls stops it
    # for every other (seen once as a 2-process run whose second process never got past its first request).
    self._httpd = http.server.ThreadingHTTPServer((self._host, self._port),
                                                  functools.partial(emulator_server.RequestHandler, self._storage))
    self._httpd.daemon_threads = True
    self.is_running.set()
    self._httpd.serve_forever()

  emulator_server.APIThread.run = serve_concurrently
  _patched = True


@contextlib.contextmanager
def emulator(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
  """Serves `bucket`; yields the environment variables a child process needs (they are also set here)."""
  from gcp_storage_emulator.server import create_server
  _patch_emulator()
  for name in ("gcp_storage_emulator", "gcsfs", "google_auth_httplib2"):
    logging.getLogger(name).setLevel(logging.CRITICAL)  # 404s of existence checks; no credentials (expected)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
