"""`run.py train`: train EVF-SAM or EVF-SAM2 from a config, on whatever devices there are.

    python run.py train --config configs/train/synthetic.py --workdir W [--config.total_steps=200]
    python run.py train --config configs/train/refcoco.py:size=huge --workdir W --config.init.sam_checkpoint=...

Flags are absl's (`--config`, `--config.<field>`, `--workdir`) because ml_collections' config_flags are;
several processes join with `--coordinator_address HOST:PORT --num_processes N --process_id I`, or with no
flags where jax detects them (Cloud TPU VMs, Slurm's srun, Open MPI's mpirun: evf_jax/cli/cluster.py).
Running the same command again resumes from the workdir. Everything a user can get wrong is checked before
anything compiles.
`--profile_steps N` traces N steps into <workdir>/profile; `--compilation_cache DIR` lets a resumed run skip
compiling (docs/training.md#profiling-and-compile-time).
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import sys
from typing import Optional, Sequence

import jax
import numpy as np
import sentencepiece as spm
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from convert.pretrained import init_from_pretrained
from data_pipelines import pipeline, prepare, sources
from data_pipelines.tfds_builders import builder_name, prepare_command
from data_pipelines.transforms import SampleConfig
from evf_jax import checkpoints, evaluate, families, sharding, storage
from evf_jax.cli import cluster, run_eval
from evf_jax.errors import UserError
from evf_jax.families import ModelConfig
from evf_jax.runtime import (PRECISIONS, check_accelerator_in_use, check_attention_platform,
                             check_precision_platform, compute_dtype, enable_compilation_cache)
from evf_jax.tokenizer import MIN_TEXT_LEN, SPM_FILE, TextTokenizer, check_fits_model
from evf_jax.train import checkpointing, optimizer
from evf_jax.train import config as train_config
from evf_jax.train.trainer import ProfileWindow, Trainer

DATA_DIR = "data"             # <workdir>/data: generated synthetic data when data.root is ""
_DASHES = "-\u2013\u2014"      # a flag's hyphens, and the en and em dashes a document's typography makes of them


class _ConfigFileParser(flags.ArgumentParser):
  """Reads `--config FILE[:arg]` with `train_config.load_file`, in place of ml_collections' loader: that one
  turns a bad file into a traceback, or into an error only when a field is first read (which `_config_error`
  cannot tell from a mistyped field)."""

  def parse(self, argument: str):
    cfg = train_config.load_file(argument)
    cfg.lock()  # an unknown --config.FIELD is an error
    return cfg

  def flag_type(self) -> str:
    return "config object"


def _flags(argv: Sequence[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "a training config: configs/train/NAME.py[:args]",
                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
  fv["config"].parser = _ConfigFileParser()
  flags.DEFINE_string("workdir", None, "where checkpoints, logs and the exported model go", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)", flag_values=fv)
  flags.DEFINE_string("coordinator_bind_address", None, "where process 0 listens (default: every interface; "
                      "127.0.0.1:PORT keeps a run on one machine to itself)", flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout", 100, "seconds before a silent process is declared dead (multi-process)",
                       flag_values=fv)
  flags.DEFINE_string("compilation_cache", None, "persistent compilation cache directory: a resumed run reads its "
                      "compiled step from there instead of compiling again", flag_values=fv)
  flags.DEFINE_integer("profile_steps", 0, "trace this many training steps with jax.profiler into "
                       "<workdir>/profile (process 0)", flag_values=fv)
  flags.DEFINE_integer("profile_skip", 1, "steps of this launch to run before the traced ones", flag_values=fv)
  return fv


def add_arguments(p) -> None:  # `run.py --help` lists the command; its flags are absl's (`run.py train --help`)
  p.add_argument("flags", nargs="*", help="--config configs/train/NAME.py --workdir DIR [--config.FIELD=VALUE ...]")


def _config_error(e: BaseException) -> str:
  """One line from what absl and ml_collections raise: the flag, and the innermost cause (their outer messages
  wrap it in a traceback's text)."""
  chain = [e]
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
    chain.append(nxt)
  texts = [str(x.args[0]) if isinstance(x, KeyError) and x.args else str(x) for x in chain]
  if any(isinstance(x, (KeyError, AttributeError)) for x in chain):
    field = next((x.args[0] for x in reversed(chain) if isinstance(x, KeyError) and x.args), "?")
    hint = next((m.group(1) for t in texts if (m := re.search(r'Did you mean "([^"]+)"', t))), None)
    return (f"the config has no field {field!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            + "; see configs/train/*.py and evf_jax/train/config.py")
  lines = [line.strip() for line in texts[-1].splitlines() if line.strip()] or [type(chain[-1]).__name__]
  reason = lines[-1] if isinstance(chain[-1], OSError) else lines[0]  # OSError: "[Errno 2] No such file ..."
  flag = re.match(r"(flag --\S+?): ", texts[0])
  prefix = flag.group(1) if flag else "--config" if isinstance(chain[0], OSError) else ""
  return f"{prefix}: {reason}" if prefix and reason not in prefix else reason


def parse(argv: Sequence[str]) -> flags.FlagValues:
  """absl parsing with every mistake as a one-line UserError."""
  argv = ["run.py train", *argv]
  fv = _flags(argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + fv.module_help(sys.modules[__name__]))
    raise SystemExit(0)
  try:
    stray = fv(argv)[1:]
    if stray:  # absl hands back what is not a flag; ignoring it would drop what the user meant to set
      raise UserError(f"unexpected argument{'s' if len(stray) > 1 else ''} {', '.join(map(repr, stray))}: "
                      "run.py train takes only flags (--config FILE --workdir DIR --config.FIELD=VALUE)"
                      + _flag_hint(fv, stray))
    if fv.config is None:
      raise UserError("--config is required: e.g. --config configs/train/synthetic.py")
  except UserError:
    raise
  except (flags.Error, OSError, ValueError, AttributeError, KeyError) as e:
    raise UserError(_config_error(e)) from None
  if not fv.workdir:
    raise UserError("--workdir is required")
  for name in ("workdir", "coordinator_address", "compilation_cache"):
    value = fv[name].value
    if value and value.startswith("-"):  # `--workdir $W` with W unset: absl takes the next flag as the value
      raise UserError(f"--{name} {value}: a flag taken as its value (was the value left out?); a path that starts "
                      "with '-' is written ./-NAME")
  return fv


def _flag_hint(fv: flags.FlagValues, stray: Sequence[str]) -> str:
  """"; did you mean --X?" when a stray argument is a flag that lost its dashes, or got a document's en or em
  dash in their place."""
  for arg in stray:
    flag = arg.lstrip(_DASHES)
    if flag.split("=", 1)[0] in fv or flag.startswith("config."):
      return f"; did you mean --{flag}?"
  return ""


def _initialise_distributed(fv: flags.FlagValues) -> bool:
  """Joins the other processes (flags, or the launcher jax detects) before anything touches jax's backends."""
  return cluster.initialise(fv.coordinator_address, fv.num_processes, fv.process_id,
                            coordinator_bind_address=fv.coordinator_bind_address,
                            heartbeat_timeout=fv.heartbeat_timeout)


def _check_config(cfg) -> ModelConfig:
  compute_dtype(cfg.precision, cfg.attention)
  check_attention_platform(cfg.attention)
  check_precision_platform(cfg.precision)
  eval_precision, _ = train_config.eval_compute(cfg)
  if eval_precision not in PRECISIONS:
    raise UserError(f"config.eval.precision {cfg.eval.precision!r}: expected '' (the training's) or one of "
                    f"{', '.join(PRECISIONS)}")
  check_precision_platform(eval_precision)
  _check_ranges(cfg)
  if not cfg.data.mixture:
    raise UserError("config.data.mixture is empty")
  for key, allowed in (("name", optimizer.OPTIMIZERS), ("schedule", optimizer.SCHEDULES)):
    if cfg.optimizer[key] not in allowed:
      raise UserError(f"config.optimizer.{key} {cfg.optimizer[key]!r}: expected one of {', '.join(allowed)}")
  model_config = train_config.model_config(cfg.model)
  if int(cfg.data.max_text_len) > model_config.beit3.max_text_len:  # it failed in the model's init, with a traceback
    raise UserError(f"config.data.max_text_len {cfg.data.max_text_len}: this model's BEiT-3 has text positions for "
                    f"{model_config.beit3.max_text_len} tokens (model.beit3.max_source_positions)")
  if cfg.init.evf_checkpoint and not storage.path(cfg.init.evf_checkpoint).is_dir():
    raise UserError(f"init.evf_checkpoint: no such directory: {cfg.init.evf_checkpoint}")
  return model_config


# (setting, lowest value, whether the lowest is allowed): each was accepted and trained silently wrong (a negative
# learning rate, no prompts so no loss), or failed inside a compiled step or a reading thread.
_RANGES = (*((key, 1, True) for key in ("total_steps", "batch_size", "checkpoint_every", "eval_every", "log_every",
                                        "grad_accum", "keep_checkpoints")),
           ("loss.images_per_group", 0, True), ("loss.bce_weight", 0, True), ("loss.dice_weight", 0, True),
           ("data.num_prompts", 1, True), ("data.max_text_len", MIN_TEXT_LEN, True), ("data.mask_size", 0, True),
           ("data.read_threads", 1, True), ("data.workers", 0, True), ("data.prefetch", 0, True),
           ("optimizer.lr", 0, True), ("optimizer.warmup_steps", 0, True), ("optimizer.clip_norm", 0, True),
           ("optimizer.weight_decay", 0, True), ("optimizer.end_factor", 0, True), ("optimizer.eps", 0, False),
           ("optimizer.b1", 0, True), ("optimizer.b2", 0, True), ("optimizer.muon_momentum", 0, True),
           ("eval.batch_size", 1, True), ("eval.size_multiple", 1, True), ("eval.min_prompts", 1, True))
_BELOW_ONE = ("optimizer.b1", "optimizer.b2", "optimizer.muon_momentum")  # a momentum of 1 never forgets


def _check_ranges(cfg) -> None:
  for key, low, inclusive in _RANGES:
    *sections, field = key.split(".")
    section = functools.reduce(lambda c, name: c.get(name, {}), sections, cfg)
    if field not in section:  # a config file of one's own without it: the code's default applies
      continue
    value = section[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= low if inclusive else value > low) and (key not in _BELOW_ONE or value < 1)
    if not ok:
      bound = f"in [{low}, 1)" if key in _BELOW_ONE else f"{'>=' if inclusive else '>'} {low}"
      raise UserError(f"config.{key} must be {bound}, got {value!r}")


def _locate(root: str, name: str) -> str | None:
  """ROOT/NAME (a TFDS dataset folder, e.g. "synthetic" or "ref_coco/refcoco_unc", or an old prepared
  directory), else ROOT/<TFDS name> ("refcoco+" -> refcocoplus); None when neither holds a dataset."""
  for path in dict.fromkeys([os.path.join(root, name), os.path.join(root, builder_name(name))]):
    try:
      sources.locate(path)
      return path
    except FileNotFoundError:
      continue
    except ValueError as e:
      raise UserError(str(e)) from None
  return None


def data_root(cfg, workdir: str) -> str:
  """Where the training data lives: `data.root`, or <workdir>/data when that is empty (`train` has checked
  that it is local)."""
  return cfg.data.root or os.path.join(workdir, DATA_DIR)


def _check_data_location(cfg, workdir: str) -> None:
  """grain reads local files (a bucket mounted with gcsfuse is local to it): no dataset root may be a URL."""
  for key in ("data.root", "eval.root"):
    section, field = key.split(".")
    if storage.is_url(cfg[section][field]):
      raise UserError(f"{key} {cfg[section][field]}: datasets are read from local paths (mount a bucket with "
                      "gcsfuse to read it there)")
  if not cfg.data.root and storage.is_url(workdir):
    raise UserError(f"data.root is empty, so the data would live in {workdir}/{DATA_DIR}, but datasets are read "
                    "from local paths: set --config.data.root to a local directory")


def _data_dirs(cfg, workdir: str) -> tuple[str, dict[str, tuple[float, list[str]]]]:
  """(data root, the mixture with dataset locations); generates a missing synthetic dataset when configured."""
  root = data_root(cfg, workdir)
  split = cfg.data.get("split", "train")
  mixture = {}
  for group, (weight, names) in cfg.data.mixture.items():
    dirs = []
    for name in ([names] if isinstance(names, str) else names):
      directory = _locate(root, name)
      if directory is None:
        if name == "synthetic" and cfg.data.synthetic.num_train > 0:
          directory = os.path.join(root, "synthetic")
          if jax.process_index() == 0:
            print(f"generating the synthetic dataset in {directory}")
            syn = cfg.data.synthetic
            prepare.build("synthetic", root, num_train=syn.num_train, num_eval=syn.num_eval, seed=syn.seed,
                          progress=False)
          multihost_utils.sync_global_devices("evf_jax: synthetic data")
        else:
          raise UserError(f"data.mixture.{group}: no prepared dataset at {os.path.join(root, builder_name(name))} "
                          f"(build it with `{prepare_command(name, root)}`, or set "
                          "--config.data.root)")
      if split.split("[", 1)[0] not in sources.describe(directory).get("splits", {}):
        raise UserError(f"{directory} has no {split.split('[', 1)[0]} split")
      dirs.append(directory)
    mixture[group] = (float(weight), dirs)
  return root, mixture


def _tokenizer(cfg, workdir: str, mixture) -> TextTokenizer:
  directory, trained_here = checkpointing.tokenizer_source(cfg, workdir)
  if trained_here:
    if not storage.path(os.path.join(directory, SPM_FILE)).is_file() and jax.process_index() == 0:
      split = cfg.data.get("split", "train")
      texts = [e.text for _, dirs in mixture.values() for d in dirs for r in sources.read_records(d, split)
               for e in r.entries]
      with storage.LocalMirror(directory) as mirror:  # sentencepiece writes local files
        train_tokenizer(texts, mirror.local, cfg.train_tokenizer_vocab)
    multihost_utils.sync_global_devices("evf_jax: tokenizer")
  return TextTokenizer(directory)


def train_tokenizer(texts: Sequence[str], directory: str, vocab_size: int) -> str:
  """A sentencepiece BPE model of the prompts, with XLM-R's id layout (<unk>=0, <s>=1, </s>=2; the fairseq
  offset is added by `TextTokenizer`), written atomically as directory/sentencepiece.bpe.model."""
  os.makedirs(directory, exist_ok=True)
  corpus = os.path.join(directory, "corpus.txt")
  with open(corpus, "w", encoding="utf-8") as f:
    f.write("\n".join(sorted(set(texts))))
  prefix = os.path.join(directory, "partial")
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
                                 hard_vocab_limit=False, num_threads=1, minloglevel=2)
  os.replace(prefix + ".model", os.path.join(directory, SPM_FILE))
  os.remove(prefix + ".vocab")
  os.remove(corpus)
  return directory


def _init_fn(cfg, model_config: ModelConfig):
  """The function that makes the starting parameters (called only when there is nothing to resume), and a
  description for the export's provenance. Paths are checked now, before anything compiles."""
  init = cfg.init
  rng = jax.random.key(cfg.seed)
  family = families.family_of(model_config)
  if init.evf_checkpoint:
    loaded = checkpoints.read_config(init.evf_checkpoint)
    if loaded.get("model_type") != family.model_type:
      held = families.BY_MODEL_TYPE.get(loaded.get("model_type"))
      raise UserError(f"init.evf_checkpoint {init.evf_checkpoint} holds "
                      f"{held.name if held else repr(loaded.get('model_type'))}; config.model is {family.name}")
    want = model_config.to_dict()
    for key in ("sam2" if "sam2" in want else "sam", "beit3"):
      if loaded.get(key) != want[key]:
        diff = sorted(k for k in want[key] if loaded.get(key, {}).get(k) != want[key][k])
        raise UserError(f"init.evf_checkpoint {init.evf_checkpoint} is another model: its {key} differs in "
                        f"{', '.join(diff)} from config.model")

    def from_evf():
      return jax.tree.map(np.asarray, checkpoints.load_checkpoint(init.evf_checkpoint)[1])
    return from_evf, {"init": "evf_checkpoint", "path": storage.resolve(init.evf_checkpoint, "init.evf_checkpoint")}
  if init.sam_checkpoint or init.beit3_checkpoint:
    for key in ("sam_checkpoint", "beit3_checkpoint"):
      if init[key] and not os.path.isfile(init[key]):
        raise UserError(f"init.{key}: no such file: {init[key]}")
    # Read and size-checked now (a wrong model fails in seconds, before any compile); kept on the host.
    params, report = init_from_pretrained(model_config, sam_path=init.sam_checkpoint or None,
                                          beit3_path=init.beit3_checkpoint or None, rng=rng)
    if jax.process_index() == 0:
      print(report.summary())
    return (lambda: params), {"init": "pretrained", **report.to_dict()}
  if init.from_scratch:
    return (lambda: family.init_params(model_config, rng)), {"init": "random", "seed": cfg.seed}
  raise UserError("no initialisation: set init.evf_checkpoint, or init.sam_checkpoint and init.beit3_checkpoint, "
                  "or init.from_scratch=True")


def eval_options(cfg, model_config: ModelConfig) -> evaluate.EvalOptions:
  """The evaluator's settings from the config's `eval` section."""
  return evaluate.EvalOptions(batch_size=cfg.eval.batch_size, size_multiple=cfg.eval.size_multiple,
                              min_prompts=cfg.eval.min_prompts, progress=cfg.progress,
                              max_text_len=min(1022, model_config.beit3.max_text_len))


def _eval_fn(cfg, model_config: ModelConfig, tokenizer, mesh, rules, data_root: str):
  if not cfg.evals:
    return None
  located = run_eval.locate_splits(cfg.eval.root or data_root, list(cfg.evals))
  options = eval_options(cfg, model_config)
  evaluator = evaluate.Evaluator(evaluate.evf_predict_fn(model_config, *train_config.eval_compute(cfg)), mesh=mesh,
                                 batch_axes=sharding.batch_axes(mesh, rules), options=options)

  def fn(params, step):
    return {split.name: run_eval.evaluate_split(evaluator, params, tokenizer, model_config, location, split.split,
                                                name=f"eval {split.name}")
            for split, location, _ in located}
  return fn


def run(args) -> int:
  return main(args.flags)


def main(argv: Optional[Sequence[str]] = None) -> int:
  fv = parse(sys.argv[2:] if argv is None else argv)
  profile = ProfileWindow(fv.profile_steps, fv.profile_skip)
  distributed = _initialise_distributed(fv)

  def run_training() -> int:
    check_accelerator_in_use()  # here, not in train(): the default job (run.py synthetic) runs wherever jax does
    if fv.compilation_cache is not None:
      if not fv.compilation_cache.strip():
        raise UserError("--compilation_cache is empty")  # it would silently compile everything again
      enable_compilation_cache(fv.compilation_cache)
    summary = train(fv.config, fv.workdir, profile=profile)
    # Preemption (SIGTERM) is a clean stop: the state is saved and the scheduler may restart the job. Ctrl-C is not.
    return 130 if summary.stopped_early and "SIGINT" in summary.stopped_early else 0

  return cluster.run_joined(distributed, run_training)


def train(cfg, workdir: str, profile: Optional[ProfileWindow] = None):
  """Everything `run.py train` does after parsing; returns the trainer's Summary."""
  if jax.process_count() > 1:  # jax's preemption notifier owns SIGTERM
    return _train(cfg, workdir, profile)
  # SIGTERM before the training loop (data, tokenizer, restore, pretrained weights: minutes at full size) ends
  # the run with status 0, as one during training does: a scheduler may count 143 as a failure. The trainer's
  # own handler, which saves the step, takes over for the loop.
  previous = signal.signal(signal.SIGTERM, _stop_before_training)
  try:
    return _train(cfg, workdir, profile)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _stop_before_training(signum, frame) -> None:
  print("stopped by SIGTERM before training (nothing to save); run the same command again to start", flush=True)
  raise SystemExit(0)


def _train(cfg, workdir: str, profile: Optional[ProfileWindow]):
  workdir = storage.resolve(workdir, "--workdir")  # a local path, or gs://BUCKET/PATH
  _check_data_location(cfg, workdir)
  model_config = _check_config(cfg)
  # Every process starts its backend before any storage I/O: jax gives the others 2 minutes to join.
  sharding.check_axes_used(cfg.mesh, jax.device_count(), cfg.sharding_rules)
  mesh = sharding.make_mesh(cfg.mesh, dcn=cfg.dcn_mesh)
  if storage.path(workdir).is_file():
    raise UserError(f"--workdir {workdir} is a file")
  storage.check_writable(workdir, "--workdir")
  with checkpointing.workdir_lock(workdir):  # before the data, tokenizer or anything else is written there
    return _train_locked(cfg, workdir, model_config, mesh, profile)


def _train_locked(cfg, workdir: str, model_config: ModelConfig, mesh, profile: Optional[ProfileWindow]):
  rules = sharding.rules_for(mesh, cfg.sharding_rules)
  data_root, mixture = _data_dirs(cfg, workdir)
  tokenizer = _tokenizer(cfg, workdir, mixture)
  check_fits_model(tokenizer, model_config.beit3, lengths=False)
  if checkpointing.has_checkpoint(workdir):  # resuming: the parameters come from the checkpoint
    init, init_description = (lambda: None), {}
  else:
    init, init_description = _init_fn(cfg, model_config)
  eval_fn = _eval_fn(cfg, model_config, tokenizer, mesh, rules, data_root)
  image_input = families.image_input(model_config)  # EVF-SAM2: the image stretched to the frame, as in eval
  sample = SampleConfig(num_prompts=cfg.data.num_prompts, max_text_len=cfg.data.max_text_len,
                        sam_size=image_input.size, sam_mode="square" if image_input.square else "longest_side",
                        mask_size=cfg.data.mask_size or None, beit_size=model_config.beit3.img_size)
  dataset = pipeline.train_dataset(mixture, tokenizer, global_batch_size=cfg.batch_size, seed=cfg.seed,
                                   sample=sample, split=cfg.data.get("split", "train"),
                                   cache_images=cfg.data.cache_images)
  iterator = pipeline.train_iterator(dataset, worker_count=cfg.data.workers, read_threads=cfg.data.read_threads,
                                     prefetch=cfg.data.prefetch)
  trainer = Trainer(cfg, workdir=workdir, model_config=model_config, mesh=mesh, data_iterator=iterator,
                    init_params=init, eval_fn=eval_fn, tokenizer_model=tokenizer.model_file,
                    provenance={"config": cfg.to_dict(), "initialisation": init_description}, profile=profile)
  summary = trainer.run()
  if jax.process_index() == 0 and summary.stopped_early is None:
    print(f"done: step {summary.step}; model in {summary.export}")
  return summary
