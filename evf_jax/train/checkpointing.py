"""Training checkpoints: the train state and the data iterator's position in one orbax step, written
asynchronously, kept as the last K plus the best by evaluation gIoU; resumption from a workdir; the final export.

Layout of a workdir:
  config.json          the run's configuration, written once; a resume must match it (`check_resume`)
  initialisation.json  where the parameters started (files and their digests), for the export's provenance
  checkpoints/<step>/  orbax: "state" (params, frozen params, optimizer state, step) and "data" (grain's
                       iterator state, one JSON per process). A save is written to a temporary folder and
                       renamed when complete, so a process killed at any moment leaves the last complete step
                       readable; leftovers of an interrupted save are removed at the next start.
  export/              the trained model as an evf-jax checkpoint directory (what `Predictor`, `run.py predict`
                       and `run.py eval` load); `run.py export` writes any kept step as one elsewhere
  tokenizer/           the sentencepiece model the run trained (train_tokenizer_vocab > 0)
  run.lock             held (flock) by the run using the workdir, naming its process; a second run is refused
The workdir may be a gs:// URL (`evf_jax.storage`): there orbax marks a finished save with a commit file
instead of a rename, and the export is copied into place (not atomic).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Any, Mapping, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from evf_jax import __version__, checkpoints, storage
from evf_jax.errors import UserError, first_line, innermost
from evf_jax.tokenizer import SPM_FILE
from evf_jax.train import partition

CONFIG_FILE = "config.json"
INIT_FILE = "initialisation.json"
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = "run.lock"
BEST_METRIC = "giou"


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir` for this run: a second run started on it (a scheduler's retry while the first still runs,
  the same command in two terminals) is refused in one line naming the first, instead of both writing the same
  checkpoints, metrics and export. An flock on WORKDIR/run.lock, taken by process 0 and released when the run
  ends or its process dies (SIGKILL included). A gs:// workdir, or a file system without locks, is not locked."""
  handle, refusal = None, ""
  if jax.process_index() == 0 and not storage.is_url(workdir):
    try:
      handle = _take_lock(workdir)
    except UserError as e:
      refusal = str(e)
  refused = bool(refusal)
  if jax.process_count() > 1:  # every process stops, not only the one that found the lock taken
    refused = bool(multihost_utils.broadcast_one_to_all(np.array(refused)))
  if refused:
    if handle is not None:
      handle.close()
    raise UserError(refusal or f"process 0 found --workdir {workdir} in use by another run (its output says which)")
  try:
    yield
  finally:
    if handle is not None:
      handle.close()  # releases the lock


def _take_lock(workdir: str):
  os.makedirs(workdir, exist_ok=True)
  handle = open(os.path.join(workdir, LOCK_FILE), "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "a process that did not say which"
    handle.close()
    raise UserError(f"--workdir {workdir} is in use by another run ({holder}); wait for it to end or stop it, or "
                    "use another --workdir") from None
  except OSError:  # no locks on this file system (some network mounts): run unguarded, as before
    handle.close()
    return None
  handle.seek(0)
  handle.truncate()
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
  handle.flush()
  return handle


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a complete checkpoint (a save orbax finalised)."""
  directory = storage.path(os.path.join(workdir, CHECKPOINT_DIR))
  return directory.is_dir() and bool(ocp.utils.checkpoint_steps(directory))


class _SavesWithoutMetrics(logging.Filter):
  """Drops orbax's warning at every save without eval metrics once `best_fn` is set: most saves have none (a
  checkpoint between evaluations), which the BestN policy expects."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The run's CheckpointManager: async saves; keeps the latest `keep` steps and the best by eval gIoU (also when
  this run evaluates nothing: an earlier run's best stays)."""
  checkpoints.use_array_handler()
  absl_logger = logging.getLogger("absl")  # orbax logs through absl
  if not any(isinstance(f, _SavesWithoutMetrics) for f in absl_logger.filters):
    absl_logger.addFilter(_SavesWithoutMetrics())
  best_metric = lambda m: m[BEST_METRIC]  # noqa: E731
  policies = [ocp.checkpoint_managers.LatestN(n=max(1, keep)),
              ocp.checkpoint_managers.BestN(get_metric_fn=best_metric, reverse=False, n=1,
                                            keep_checkpoints_without_metrics=False)]
  # best_fn does not choose what is kept (the policies do), but without it orbax neither writes a step's
  # metrics to disk nor reads them back, and a resumed run would drop the best checkpoint as having none.
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True,
      best_fn=best_metric, best_mode="max",
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
  return ocp.CheckpointManager(storage.path(os.path.join(workdir, CHECKPOINT_DIR)),
                               item_names=("state", "data"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         metrics: Optional[Mapping[str, float]] = None, force: bool = False) -> bool:
  """Starts an async save of `state` and the iterator's position at `step` (the device-to-host copy is done
  when this returns, so the state may be donated to the next step)."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=grain.checkpoint.CheckpointSave(data_iterator)),
                   metrics=dict(metrics) if metrics else None, force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any) -> Any:
  """The state of `step` with the shapes, dtypes and shardings of `abstract_state` (so a run may resume on
  another mesh or process count), and the iterator moved to the saved position."""
  state = restore_state(mngr, step, abstract_state)
  data_iterator.set_state(_data_state(os.path.join(str(mngr.directory), str(step), "data")))
  return state


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """`restore` without the data iterator (UserError for a checkpoint that cannot be read)."""
  try:
    with checkpoints.quiet_if_restore_fails():
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # noqa: BLE001 (whatever orbax or TensorStore raise: one line naming the checkpoint)
    if isinstance(e, ValueError) and "tree structures do not match" in str(e):
      # The config matched (check_resume), so the code lays out the state differently (what is trained, or the
      # optimizer's state): another version.
      raise UserError(f"{mngr.directory}/{step}: saved with another split of trained and frozen parameters or "
                      f"another optimizer state than this version makes; use another --workdir (the checkpoint is "
                      f"left as it is)") from None
    earlier = [s for s in mngr.all_steps() if s < step]
    instead = (f"delete that folder to resume from step {max(earlier)}" if earlier else
               "delete that folder to start afresh")
    raise UserError(f"{mngr.directory}/{step}: cannot restore it ({first_line(innermost(e))[:300]}); it is damaged "
                    f"(a copy cut short?) or was saved with another model: {instead}, or use another "
                    "--workdir") from None
  return restored["state"]


def kept_steps(workdir: str) -> tuple[list[int], Optional[int]]:
  """The complete checkpoints of `workdir` and the best of them by eval gIoU (None where none was evaluated).
  Read-only: a run using the workdir keeps its save in progress (a manager of its own would remove it)."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                         save_interval_steps=0, best_fn=lambda m: m[BEST_METRIC], best_mode="max")
  with checkpoints.absl_errors_only():  # orbax's notes that the directory is read-only
    mngr = ocp.CheckpointManager(storage.path(os.path.join(workdir, CHECKPOINT_DIR)), options=options)
    try:
      return sorted(mngr.all_steps()), mngr.best_step()
    finally:
      mngr.close()


def restore_model_params(workdir: str, step: int) -> dict:
  """The model's parameters saved at `step` (trained and frozen merged, as host arrays), without the optimizer
  state, whatever mesh or processes wrote them (UserError for a step that cannot be read)."""
  path = storage.path(os.path.join(workdir, CHECKPOINT_DIR, str(step), "state"))
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    with checkpoints.quiet_if_restore_fails(), checkpoints.absl_errors_only():  # the state has no metadata file of
      saved = checkpointer.metadata(path).item_metadata                        # its own (the step's is above it)
      target = {k: saved[k] for k in ("params", "frozen")}
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)))
  except Exception as e:  # noqa: BLE001 (whatever orbax or TensorStore raise: one line naming the checkpoint)
    raise UserError(f"{path}: cannot read the parameters ({first_line(innermost(e))[:300]}); the step was removed "
                    "meanwhile (a run keeps its latest ones), or its files are damaged") from None
  return partition.merge(restored["params"], restored["frozen"])


def tokenizer_source(cfg: Mapping[str, Any], workdir: str) -> tuple[str, bool]:
  """Where a run's sentencepiece model is (a file or a directory holding it), and whether the run trains it
  there: the config's `tokenizer`, else its init checkpoint's, else WORKDIR/tokenizer when `train_tokenizer_vocab`
  is set (UserError otherwise). `cfg` is the run's config (a ConfigDict, or config.json as read)."""
  if cfg["tokenizer"]:
    return cfg["tokenizer"], False
  if cfg["init"]["evf_checkpoint"]:
    return os.path.join(cfg["init"]["evf_checkpoint"], checkpoints.TOKENIZER_DIR), False
  if cfg.get("train_tokenizer_vocab", 0) > 0:
    return os.path.join(workdir, TOKENIZER_DIR), True
  raise UserError("no tokenizer: set --config.tokenizer (a sentencepiece model, e.g. BEiT-3's beit3.spm), "
                  "init.evf_checkpoint, or train_tokenizer_vocab")


def _data_state(directory: str) -> Any:
  """This process's saved iterator state. Written by another number of processes, the saved states must all be
  equal (our pipelines' state is the global batch index, the same on every process) and that one is used."""
  mine = storage.path(os.path.join(directory, f"process_{jax.process_index()}-of-{jax.process_count()}.json"))
  if mine.is_file():
    return _read_state(mine)
  saved = sorted(storage.path(directory).glob("process_*-of-*.json"))
  if not saved:
    raise UserError(f"{directory}: the checkpoint holds no data-iterator state")
  states = [_read_state(p) for p in saved]
  if any(s != states[0] for s in states):
    raise UserError(f"{directory}: saved by {len(saved)} processes with different data positions; resume with "
                    f"that many processes")
  return states[0]


def _read_state(path) -> Any:
  text = path.read_text()
  try:
    return json.loads(text)
  except ValueError:
    return text.encode()


# ---------------------------------------------------------------- outputs that would be lost

# A workdir's folders a run replaces or removes.
RUN_OWNED = (CHECKPOINT_DIR, EXPORT_DIR, EXPORT_DIR + ".partial", EXPORT_DIR + ".old")


def check_not_in_a_model(out: str, flag: str, itself: bool = True) -> None:
  """UserError when the local directory `out` is inside an evf-jax checkpoint (a directory holding
  model_config.json) or inside a training workdir's checkpoints/ or export/ (or is one, with `itself`): convert
  --overwrite, export and the workdir's next training run replace those whole, and what was written there is
  lost without a word."""
  if storage.is_url(out):
    return
  # What marks them, beyond names common elsewhere (a project's config.json, its checkpoints/ folder).
  is_workdir = lambda d: os.path.isfile(os.path.join(d, CONFIG_FILE)) and any(  # noqa: E731
      os.path.exists(os.path.join(d, name)) for name in (INIT_FILE, LOCK_FILE))
  is_checkpoint = lambda d: os.path.isfile(os.path.join(d, checkpoints.CONFIG_FILE)) and os.path.isdir(  # noqa: E731
      os.path.join(d, checkpoints.PARAMS_DIR))
  path = os.path.realpath(out)
  first = True
  while True:
    parent = os.path.dirname(path)
    if os.path.basename(path) in RUN_OWNED and is_workdir(parent):
      raise UserError(f"{flag} {out} is in the run's {os.path.basename(path)}/ of {parent}, which training "
                      "replaces or removes; choose a directory elsewhere")
    if (itself or not first) and is_checkpoint(path):
      raise UserError(f"{flag} {out} is {'' if first else 'inside '}the evf-jax checkpoint {path}, which convert, "
                      "export and training replace whole; choose a directory elsewhere")
    if parent == path:
      return
    path, first = parent, False


# ---------------------------------------------------------------- the run's configuration

# Settings a resumed run may change: how long and how often, where evaluation reads, how data is read, how the
# devices are laid out (checkpoints restore onto any mesh). Everything else must match the saved config.
RESUME_MAY_CHANGE = ("total_steps", "checkpoint_every", "eval_every", "log_every", "keep_checkpoints", "evals",
                     "eval", "progress", "peak_tflops", "mesh", "init", "data.workers", "data.read_threads",
                     "data.prefetch", "data.root", "data.synthetic", "export_best", "replicate_frozen", "dcn_mesh",
                     # memory and speed only (grad_accum is not: with loss.images_per_group 0 each microbatch
                     # is one mean, so it changes the loss)
                     "remat", "data.cache_images",
                     # what a run that diverged resumes from its last checkpoint with (the state holds no lr)
                     "optimizer.lr", "optimizer.warmup_steps")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def _normalise(value: Any) -> Any:
  return json.loads(json.dumps(value))  # tuples -> lists, as stored


# Settings added after workdirs were written, with the value that reproduces those runs: a workdir without
# them reads as having it.
ADDED_SETTINGS = {"optimizer.name": "adamw", "optimizer.muon_momentum": 0.95, "dcn_mesh": [["data", -1]],
                  "loss.images_per_group": 0}


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], workdir: str) -> list[str]:
  """UserError naming the first setting that differs between the workdir's config and this run's; returns the
  changed settings that are allowed (for the log)."""
  before, now = list(_normalise(saved).get("evals") or []), list(_normalise(current).get("evals") or [])
  if before and now and before[0] != now[0]:  # evals may change, but a gIoU of another split is no comparison
    raise UserError(f"{workdir} keeps its best checkpoint by the gIoU of its first eval split, {before[0]!r}; this "
                    f"run's first is {now[0]!r}: put {before[0]!r} first in --config.evals (others may follow), "
                    "or use another --workdir")
  a, b = _flat(_normalise(saved)), _flat(_normalise(current))
  a = {**ADDED_SETTINGS, **a}
  allowed = []
  # The model first: another model (family) is what to name, not the first of the settings that differ with it.
  for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("model."), k)):
    if a.get(key, "<missing>") == b.get(key, "<missing>"):
      continue
    if any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE):
      allowed.append(key)
      continue
    if key not in a or key not in b:  # another model family, or another layout of the config
      where = "this run's config" if key in b else f"the workdir's {CONFIG_FILE}"
      raise UserError(f"{workdir} was trained with another configuration: {key} is only in {where}; use another "
                      f"--workdir, or that configuration to resume")
    raise UserError(f"{workdir} was trained with {key}={a[key]!r}, this run has {b[key]!r}; set "
                    f"--config.{key} to {a[key]!r} to resume it, or use another --workdir")
  return allowed


def read_run_config(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, CONFIG_FILE)
  return storage.read_json(path) if storage.path(path).is_file() else None


def write_run_config(workdir: str, config: Mapping[str, Any], initialisation: Mapping[str, Any]) -> None:
  """At a run's start: its configuration and where its parameters started (a resumed run has no init)."""
  if jax.process_index() == 0:
    storage.write_atomic(os.path.join(workdir, INIT_FILE), json.dumps(_normalise(initialisation), indent=2))
    storage.write_atomic(os.path.join(workdir, CONFIG_FILE), json.dumps(_normalise(config), indent=2, sort_keys=True))


def read_initialisation(workdir: str) -> dict:
  """What `write_run_config` recorded of the initialisation; a workdir from before the record says so."""
  path = os.path.join(workdir, INIT_FILE)
  if not storage.path(path).is_file():
    return {"init": "unknown (the workdir was started by a version that did not record it)"}
  return storage.read_json(path)


# ---------------------------------------------------------------- export

def training_provenance(run: Mapping[str, Any], workdir: str, step: int) -> dict:
  """provenance.json of a model exported from a training run: `run` ({"config", "initialisation"}) and where
  and when it comes from."""
  return dict(run, source="evf-jax training", workdir=workdir, step=step, evf_jax=__version__,
              created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def save_trained_model(directory: str, params: Any, model_config: Any, provenance: Mapping[str, Any],
                       tokenizer_model: Optional[str]) -> None:
  """`checkpoints.save_model` of a trained model: float32 parameters, the run's sentencepiece model."""
  config = {**model_config.to_dict(), checkpoints.PARAM_DTYPE_KEY: "float32"}
  checkpoints.save_model(directory, params, config, provenance, {SPM_FILE: tokenizer_model} if tokenizer_model else {})


def export(workdir: str, params: Any, model_config: Any, provenance: Mapping[str, Any],
           tokenizer_model: Optional[str]) -> str:
  """Writes `<workdir>/export/`, an evf-jax checkpoint directory, atomically (a finished export replaces the
  previous one only once complete; on GCS the old one is removed and the finished export copied into place).
  Every process calls this (the parameters may be sharded)."""
  out = os.path.join(storage.resolve(workdir, "--workdir"), EXPORT_DIR)
  staging = out + ".partial"
  if jax.process_index() == 0:
    storage.remove_tree(staging)
  multihost_utils.sync_global_devices("evf_jax export: staging cleared")
  save_trained_model(staging, params, model_config, provenance, tokenizer_model)
  if jax.process_index() == 0:
    if storage.is_url(out):  # no rename: keeping the old export aside would copy it whole once more
      storage.remove_tree(out)
      storage.move_tree(staging, out)
    else:
      old = out + ".old"
      storage.remove_tree(old)
      if storage.path(out).exists():
        storage.move_tree(out, old)
      storage.move_tree(staging, out)
      storage.remove_tree(old)
  multihost_utils.sync_global_devices("evf_jax export: done")
  return out
