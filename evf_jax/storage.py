"""Where a run's files and checkpoint directories live: local paths, or `gs://` URLs (Google Cloud Storage).

Small files go through `etils.epath` (gcsfs on `gs://`), arrays through orbax (tensorstore's own GCS driver).
Credentials are Google's application defaults (on a TPU VM or GCE, the VM's service account). Object stores
have no rename and no append, so the few places that need them (`write_atomic`, `append_line`, `move_tree`)
say what they do there instead.

Importing this module turns gcsfs's directory-listing cache off for gs:// (fsspec's config default for the
protocol; a value the user set there wins): a run's bucket is also written by tensorstore and by the other
processes of a run, whose objects a cached listing hides (gcsfs then says a file just listed does not exist).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Union

import fsspec
from etils import epath

from evf_jax.errors import UserError, first_line

SCHEMES = ("gs://",)  # the URL schemes a path may have; others are refused by `resolve`

PathLike = Union[str, os.PathLike]

fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_url(path: PathLike) -> bool:
  return "://" in str(path)


def resolve(path: PathLike, what: str) -> str:
  """A local path made absolute, or a supported URL as given (without a trailing "/"); `what` names the flag or
  setting in the error for another URL scheme."""
  path = str(path)
  if not path.strip():  # abspath("") is the current directory: a run would write into wherever it started
    raise UserError(f"{what} is empty")
  if not is_url(path):
    return os.path.abspath(path)
  if not path.startswith(SCHEMES):
    raise UserError(f"{what} {path}: only local paths and {', '.join(SCHEMES)} URLs are supported")
  if path.rstrip("/").count("/") < 2 or not path[len("gs://"):].split("/")[0]:
    raise UserError(f"{what} {path}: expected gs://BUCKET[/PATH]")
  return path.rstrip("/")


def check_writable(directory: str, what: str) -> None:
  """Creates `directory` if missing and writes and removes a small file or object in it, so that a missing
  bucket, missing credentials, a read-only disk or a path under a file are one line now rather than a traceback
  at the first save."""
  probe = path(directory) / f".evf_jax_write_check.{uuid.uuid4().hex}"  # every process of a run checks at once
  try:
    if not is_url(directory):
      os.makedirs(directory, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # gcsfs / google-auth raise many kinds; all mean the same to the user
    if isinstance(e, OSError) and e.strerror:
      message = e.strerror
    else:
      message = first_line(e)
    raise UserError(f"{what} {directory}: cannot write there ({message[:300]})") from None


def check_output_dir(path: str, flag: str) -> None:
  """UserError, before any work is done, when local `path` cannot be an output directory: empty, a URL, not a
  directory, under a file or a dangling symbolic link, or not writable. Nothing is created, so a command that fails
  later leaves nothing behind."""
  if not path or not path.strip():
    raise UserError(f"{flag} is empty; expected a directory")
  if is_url(path):  # os.makedirs would make a local folder named "gs:"
    raise UserError(f"{flag} {path}: expected a local directory (these files are written locally; write them "
                    "to a local disk or a gcsfuse mount and copy them to the bucket)")
  full = os.path.abspath(path)  # as the command will create it (a quoted ~ is a directory named ~)
  if os.path.exists(full) and not os.path.isdir(full):
    raise UserError(f"{flag} {path} is a file; expected a directory")
  existing = full
  while not os.path.exists(existing):  # the deepest part that exists: a directory must be created in it
    if os.path.islink(existing):  # os.makedirs cannot create what a dangling link names
      raise UserError(f"{flag} {path}: {existing} is a symbolic link to {os.readlink(existing)}, which does not "
                      "exist")
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"{flag} {path}: cannot create it, {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"{flag} {path}: cannot write in {existing} (permission denied)")


@contextlib.contextmanager
def output_dir(path: str, flag: str) -> Iterator[None]:
  """Creates local directory `path` for the body to write into: one that cannot be created (a name too long, a
  file system that refuses it) is a UserError. If the body fails, the directories made here are removed again
  while they are still empty, so a command that fails leaves no empty folder behind."""
  made = []
  full = os.path.abspath(path)
  while not os.path.exists(full):
    made.append(full)
    full = os.path.dirname(full)
  try:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise UserError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
    yield
  except BaseException:
    for d in made:  # deepest first; a directory that now holds files is kept with everything above it
      try:
        if os.path.isdir(d):  # the deepest ones may never have been made
          os.rmdir(d)
      except OSError:
        break
    raise


def path(p: PathLike) -> epath.Path:
  return epath.Path(str(p))


def write_atomic(p: PathLike, text: str) -> None:
  """Writes a text file that readers see whole or not at all: a local file via a temporary file and a rename;
  a GCS object is replaced whole by a single upload anyway."""
  target = path(p)
  if is_url(p):
    target.write_text(text)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = str(p) + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, str(p))


def append_line(p: PathLike, line: str) -> None:
  """Appends one line. GCS objects cannot be appended to: the object is read and written again whole (fine for
  a log of a few thousand lines; a killed write leaves the previous version)."""
  if not is_url(p):
    with open(str(p), "a") as f:
      f.write(line.rstrip("\n") + "\n")
    return
  target = path(p)
  old = target.read_text() if target.exists() else ""
  target.write_text(old + line.rstrip("\n") + "\n")


_downloads: list[str] = []


def local_copy(p: PathLike) -> str:
  """A local path with the file's contents: the path itself when local, else a copy downloaded into a
  temporary folder that is removed when the process exits (for libraries that read only local files, such as
  sentencepiece)."""
  if not is_url(p):
    return str(p)
  if not _downloads:
    _downloads.append(tempfile.mkdtemp(prefix="evf_jax_"))
    atexit.register(shutil.rmtree, _downloads[0], True)
  local = os.path.join(tempfile.mkdtemp(dir=_downloads[0]), path(p).name)
  path(p).copy(local)
  return local


class LocalMirror:
  """A folder for libraries that write only local files (jax's profiler, tensorboardX, sentencepiece), seen in
  `directory`: the folder itself when it is local, else a temporary one whose files `upload` copies there."""

  def __init__(self, directory: str, prefix: str = "evf_jax_"):
    self.directory = directory
    self.local = tempfile.mkdtemp(prefix=prefix) if is_url(directory) else directory

  def upload(self) -> None:
    if self.local != self.directory:
      copy_tree(self.local, self.directory)

  def close(self, upload: bool = True) -> None:
    """Uploads (unless told not to), then removes the temporary folder."""
    if self.local != self.directory:
      if upload:
        self.upload()
      remove_tree(self.local)

  def __enter__(self) -> "LocalMirror":
    return self

  def __exit__(self, exc_type, *_) -> None:
    self.close(upload=exc_type is None)  # what a failed writer left is not uploaded


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under `src` to the same place under `dst` (either may be a URL)."""
  for rel in _files_under(str(src)):
    out = path(dst) / rel
    if not is_url(dst):
      out.parent.mkdir(parents=True, exist_ok=True)
    (path(src) / rel).copy(out, overwrite=True)


def _files_under(root: str) -> list[str]:
  """The files under folder `root`, as paths relative to it (epath's walk and `**` do not work on gcsfs)."""
  if is_url(root):
    fs, base = fsspec.core.url_to_fs(root)
    return sorted(posixpath.relpath(f, base) for f in fs.find(base))
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Moves folder `src` to `dst`, which must not exist: one rename locally; on GCS a copy of each object and the
  removal of `src` (not atomic: readers may see a partial `dst` meanwhile)."""
  if not is_url(src) and not is_url(dst):
    os.replace(str(src), str(dst))
    return
  copy_tree(src, dst)
  path(src).rmtree()


def remove_tree(p: PathLike) -> None:
  """Removes a folder and everything under it; nothing when it is not there."""
  target = path(p)
  if target.exists():
    target.rmtree()


def read_json(file: str, error: type[Exception] = UserError, advice: str = "") -> dict[str, Any]:
  """A JSON file (local or gs://) holding an object, or `error` naming the file when it is not valid JSON or not
  an object (every file we read is one; a list would fail later at .get); `advice` ends the message."""
  try:
    value = json.loads(path(file).read_text())
  except ValueError as e:
    problem = f"not valid JSON ({e})"
  else:
    if isinstance(value, dict):
      return value
    problem = f"expected a JSON object, found {type(value).__name__}"
  raise error(f"{file}: {problem}" + (f"; {advice}" if advice else ""))
