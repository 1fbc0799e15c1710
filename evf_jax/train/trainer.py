"""The training loop: sharded state, the jitted step, checkpoints, resumption, preemption, logging, periodic
evaluation and the final export. One process per host; the same code on one CPU, a GPU, GPU clusters and TPU
pod slices (only the config's mesh changes).

The caller (`run.py train`, `evf_jax/cli/run_train.py`) builds what is outside the library: the data iterator
(grain, with get_state/set_state), the function that initialises parameters when there is nothing to resume,
and the evaluation function; the configuration is an ml_collections ConfigDict (configs/train/*.py document
every field).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from evf_jax import families, flops, sharding, storage
from evf_jax.errors import UserError, first_line
from evf_jax.families import ModelConfig
from evf_jax.runtime import compilation_cache_hits, compute_dtype
from evf_jax.train import checkpointing, optimizer, partition
from evf_jax.train.step import BATCH_KEYS, StepOptions, make_train_step

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"

InitFn = Callable[[], Any]                                  # -> the full parameter tree (host arrays)
EvalFn = Callable[[Any, int], dict[str, dict[str, Any]]]    # (params, step) -> {split: result}


class TrainingDiverged(UserError):
  """The loss became NaN or infinite; nothing was saved from that state."""


@dataclasses.dataclass(frozen=True)
class ProfileWindow:
  """Trace `steps` training steps with `jax.profiler` once this launch has run `skip` steps (process 0 only);
  the trace goes to <workdir>/profile/plugins/profile/<time>/ (an .xplane.pb for TensorBoard's profile plugin
  or xprof, a .trace.json.gz for Perfetto)."""
  steps: int
  skip: int = 1

  def __post_init__(self):
    if self.steps < 0 or self.skip < 0:
      raise UserError(f"profile: steps {self.steps} and skip {self.skip} must be >= 0")


@dataclasses.dataclass
class Summary:
  step: int
  resumed_from: Optional[int]
  stopped_early: Optional[str]
  last_metrics: dict[str, float]
  evals: dict[int, dict[str, dict[str, Any]]]
  export: Optional[str]
  export_step: Optional[int] = None  # the step whose model export/ holds


def state_layout(model_config: ModelConfig, trainable, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 rules, replicate_frozen: bool = False) -> tuple[dict, dict, list[str]]:
  """(abstract state, state shardings, parameter dimensions replicated because the mesh does not divide them).

  The state is {"step", "params" (trained), "frozen", "opt_state"}; parameters are sharded by the logical-axis
  rules (the frozen ones replicated instead with `replicate_frozen`), the optimizer's moments like their
  parameters, everything else replicated."""
  replicated = NamedSharding(mesh, P())
  abstract_params = families.family_of(model_config).abstract_params
  boxed = abstract_params(model_config, boxed=True)
  param_sh, report = sharding.param_shardings(boxed, mesh, rules)
  shapes = abstract_params(model_config)
  unknown = partition.check_patterns(partition.paths(shapes), list(trainable))
  if unknown:
    raise UserError(f"trainable: pattern(s) {', '.join(unknown)} match no parameter that can be trained")
  trained_shapes, frozen_shapes = partition.split(shapes, list(trainable))
  trained_sh, frozen_sh = partition.split(param_sh, list(trainable))
  if replicate_frozen:
    frozen_sh = jax.tree.map(lambda _: replicated, frozen_sh)
  opt_shapes = jax.eval_shape(tx.init, trained_shapes)
  opt_sh = optimizer.state_shardings(tx, opt_shapes, trained_sh, replicated)
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": trained_shapes, "frozen": frozen_shapes,
            "opt_state": opt_shapes}
  shards = {"step": replicated, "params": trained_sh, "frozen": frozen_sh, "opt_state": opt_sh}
  return shapes, shards, report


def fresh_state(params: Any, trainable, tx: optax.GradientTransformation, shards: dict) -> dict:
  """The state at step 0 from a full host parameter tree, placed as `shards` says (from every process), its
  parameters in float32 as `state_layout` has them: an init checkpoint stored in bfloat16 would otherwise train in
  bfloat16, optimizer state included, and a resume (which restores into the layout) would then differ."""
  params = jax.tree.map(lambda x: x if x.dtype == np.float32 else np.asarray(x, np.float32), params)
  trained, frozen = partition.split(params, list(trainable))
  trained = sharding.put_global(trained, shards["params"])
  frozen = sharding.put_global(frozen, shards["frozen"])
  opt_state = jax.jit(tx.init, out_shardings=shards["opt_state"])(trained)
  step = jax.device_put(jnp.zeros((), jnp.int32), shards["step"])
  return {"step": step, "params": trained, "frozen": frozen, "opt_state": opt_state}


def _memory_line(compiled) -> str:
  try:
    m = compiled.memory_analysis()
    return (f" (per device: {(m.argument_size_in_bytes + m.output_size_in_bytes) / 2**30:.2f} GiB arguments and "
            f"outputs, {m.temp_size_in_bytes / 2**30:.2f} GiB temporaries)")
  except Exception:  # not every backend reports it
    return ""


def _host(tree: Any) -> Any:
  """Replicated device values -> host numpy (this process's copy; works with several processes)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def _drop_rows_after(metrics_file: str, step: int) -> None:
  """Removes the rows of `metrics_file` (JSON lines with a "step") logged after `step`, and a last line a kill
  cut short."""
  if not storage.path(metrics_file).is_file():
    return
  lines = storage.path(metrics_file).read_text().splitlines()

  def keep(line: str) -> bool:
    try:
      return json.loads(line).get("step", 0) <= step
    except ValueError:
      return False

  kept = [line for line in lines if keep(line)]
  if len(kept) != len(lines):
    storage.write_atomic(metrics_file, "".join(line + "\n" for line in kept))


class _EventWriter:
  """tensorboardX's SummaryWriter into `directory`, through a `storage.LocalMirror` (tensorboardX's own GCS
  writer re-uploads the whole file again when garbage-collected, after `close`, and needs a second GCS client)."""

  def __init__(self, directory: str, purge_step: Optional[int] = None):
    """purge_step: TensorBoard hides the earlier event files' points from this step on (the steps a resumed run
    trains again after a kill)."""
    from tensorboardX import SummaryWriter  # lazy: it imports torch where installed (~3 s per run.py start)
    self.mirror = storage.LocalMirror(directory, prefix="evf_jax_tensorboard_")
    self.writer = SummaryWriter(self.mirror.local, purge_step=purge_step)

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self.writer.add_scalar(tag, value, step)

  def sync(self) -> None:
    """Makes what was added visible in `directory`."""
    self.writer.flush()
    self.mirror.upload()

  def close(self) -> None:
    self.writer.close()
    self.mirror.close()


def peak_flops_per_device(cfg) -> Optional[float]:
  """What MFU is measured against: the config's `peak_tflops`, else the device kind's bf16 peak (None: no MFU)."""
  if cfg.get("peak_tflops"):
    return float(cfg.peak_tflops) * 1e12
  return flops.peak_flops(jax.devices()[0].device_kind)


class Trainer:
  def __init__(self, cfg, *, workdir: str, model_config: ModelConfig, mesh: jax.sharding.Mesh,
               data_iterator: Iterator[dict], init_params: InitFn, eval_fn: Optional[EvalFn] = None,
               tokenizer_model: Optional[str] = None, provenance: Optional[dict] = None,
               profile: Optional[ProfileWindow] = None, log=print):
    self.cfg = cfg
    self.workdir = storage.resolve(workdir, "--workdir")
    self.model_config = model_config
    self.mesh = mesh
    self.rules = sharding.rules_for(mesh, [tuple(r) for r in cfg.sharding_rules])
    self.data_iterator = data_iterator
    self.init_params = init_params
    self.eval_fn = eval_fn
    self.tokenizer_model = tokenizer_model
    self.provenance = dict(provenance or {})
    self.profile = profile if profile and profile.steps and jax.process_index() == 0 else None
    self._tracing: Optional[storage.LocalMirror] = None  # where the running trace writes
    self.log = log if jax.process_index() == 0 else (lambda *a, **k: None)
    self._stop_signal: Optional[str] = None
    self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
    self.replicated = NamedSharding(mesh, P())
    self._check_batch()

  # ---------------------------------------------------------------- set-up

  def _check_batch(self) -> None:
    cfg = self.cfg
    data_ways = math.prod(self.mesh.shape[a] for a in sharding.batch_axes(self.mesh, self.rules))
    per_step = cfg.batch_size // max(1, cfg.grad_accum)
    if cfg.batch_size % max(1, cfg.grad_accum) or per_step % data_ways:
      raise UserError(f"batch_size {cfg.batch_size} with grad_accum {cfg.grad_accum} gives microbatches of "
                      f"{cfg.batch_size / max(1, cfg.grad_accum):g} images, which the {data_ways} batch shards "
                      f"of mesh {dict(self.mesh.shape)} do not divide")
    group = cfg.loss.images_per_group
    if group and per_step % group:
      raise UserError(f"batch_size {cfg.batch_size} with grad_accum {cfg.grad_accum} gives microbatches of "
                      f"{per_step} images, which loss.images_per_group {group} does not divide")
    if cfg.batch_size % jax.process_count():
      raise UserError(f"batch_size {cfg.batch_size} is not divisible by {jax.process_count()} processes")

  def _install_signal_handlers(self) -> dict:
    """SIGTERM and Ctrl-C stop the loop at the next step, which is saved; returns the handlers they replace."""
    if jax.process_count() > 1:
      return {}  # jax's preemption notifier owns SIGTERM; `reached_preemption` tells every process the same step

    def handler(signum, frame):
      if self._stop_signal is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
      self._stop_signal = signal.Signals(signum).name

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

  # ---------------------------------------------------------------- the loop

  def run(self) -> Summary:
    cfg = self.cfg
    storage.path(self.workdir).mkdir(parents=True, exist_ok=True)
    saved = checkpointing.read_run_config(self.workdir)
    run_config = cfg.to_dict()
    mngr = checkpointing.manager(self.workdir, cfg.keep_checkpoints)
    latest = mngr.latest_step()
    if saved is not None and latest is not None:
      changed = checkpointing.check_resume(saved, run_config, self.workdir)
      if changed:
        self.log(f"resuming with changed settings: {', '.join(changed)}")
    elif saved is not None:  # e.g. a run that failed on a bad setting: checking against it would demand that setting
      self.log(f"{self.workdir} holds no checkpoint: starting afresh, its {checkpointing.CONFIG_FILE} replaced")
    dtype = compute_dtype(cfg.precision, cfg.attention)
    self.schedule = optimizer.learning_rate(cfg.optimizer.lr, total_steps=cfg.total_steps,
                                            warmup_steps=cfg.optimizer.warmup_steps,
                                            schedule=cfg.optimizer.schedule, end_factor=cfg.optimizer.end_factor)
    self.tx = optimizer.from_config(cfg.optimizer, self.schedule)
    shapes, shards, report = state_layout(self.model_config, cfg.trainable, self.tx, self.mesh, self.rules,
                                          replicate_frozen=cfg.replicate_frozen)
    if report:
      self.log(f"sharding: {len(report)} parameter dimension(s) replicated because the mesh does not divide "
               f"them, e.g. {report[0]}")
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards)

    if latest is not None and saved is None:  # resuming would check nothing: another config's state may load
      raise UserError(f"{self.workdir} holds checkpoints (the latest: step {latest}) but not the "
                      f"{checkpointing.CONFIG_FILE} of their run, which a resumed run's settings are checked against: "
                      "put it back, or use another --workdir")
    if latest is not None and latest > cfg.total_steps:  # it would export step `latest` as if it were the end
      raise UserError(f"total_steps {cfg.total_steps} is below step {latest}, where {self.workdir} already is: "
                      f"run it with total_steps {latest} or more, or use another --workdir")
    if latest is not None:
      self.log(f"resuming from {self.workdir}/{checkpointing.CHECKPOINT_DIR}/{latest}")
      state = checkpointing.restore(mngr, latest, abstract, self.data_iterator)
      self.provenance["initialisation"] = checkpointing.read_initialisation(self.workdir)
    else:
      checkpointing.write_run_config(self.workdir, run_config, self.provenance.get("initialisation", {}))
      state = fresh_state(self.init_params(), cfg.trainable, self.tx, shards)
    start = int(_host(state["step"]))
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["frozen"]))
    encoder_frozen = partition.encoder_frozen(shapes["params"])
    self.log(f"parameters: {n_trained:,} trained, {n_frozen:,} frozen"
             f"{' (SAM image encoder frozen: forward only)' if encoder_frozen else ''}; mesh {dict(self.mesh.shape)}"
             f" on {jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")

    options = StepOptions.from_config(cfg, dtype, encoder_frozen)
    model = families.family_of(self.model_config).model_class(self.model_config, attention=cfg.attention,
                                                              remat=cfg.remat, dtype=dtype)
    step_fn = make_train_step(model, self.model_config, self.tx, self.schedule, options)
    with sharding.activate(self.mesh, self.rules):
      train_step = jax.jit(step_fn, in_shardings=(shards, self.batch_sharding), out_shardings=(shards, self.replicated),
                           donate_argnums=0)

    writer = None
    if jax.process_index() == 0:
      # A run killed after its last checkpoint (or before its first) logged steps it now trains again.
      _drop_rows_after(os.path.join(self.workdir, METRICS_FILE), start)
      writer = _EventWriter(os.path.join(self.workdir, TENSORBOARD_DIR), purge_step=start + 1)
    previous_handlers = self._install_signal_handlers()
    summary = Summary(step=start, resumed_from=latest, stopped_early=None, last_metrics={}, evals={}, export=None)
    try:
      self._loop(state, train_step, mngr, start, writer, summary, encoder_frozen,
                 partition.decoder_trained(shapes["params"]))
    finally:
      if self._tracing:  # the run ended inside the profile window
        self._stop_trace(None, None)
      mngr.wait_until_finished()  # never leave an async save half-written at exit
      for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
      if writer is not None:
        writer.close()
    return summary

  def _loop(self, state, train_step, mngr, start, writer, summary, encoder_frozen, decoder_trained):
    cfg = self.cfg
    total = int(cfg.total_steps)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not cfg.get("progress", True) or jax.process_index() != 0)
    peak = peak_flops_per_device(cfg)
    window: list[dict] = []
    t_last, wait = time.perf_counter(), 0.0
    pending = None  # (step, metrics on device): fetched one step late, so the device runs ahead
    last_saved = start if summary.resumed_from is not None else None
    step = start
    step_flops = None
    with sharding.activate(self.mesh, self.rules):
      while step < total:
        if self.profile and step - start == self.profile.skip:
          # jax's profiler writes through local file I/O: a gs:// workdir gets the trace once it stops
          trace = storage.LocalMirror(os.path.join(self.workdir, PROFILE_DIR), prefix="evf_jax_profile_")
          try:
            jax.profiler.start_trace(trace.local)
            self._tracing = trace
          except RuntimeError as e:  # e.g. a trace the caller already runs: train on without this one
            trace.close(upload=False)
            self.log(f"\nno profile: {first_line(e)}")
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):  # xprof's step boundaries
          t0 = time.perf_counter()
          host_batch = {k: v for k, v in next(self.data_iterator).items() if k in BATCH_KEYS}
          wait += time.perf_counter() - t0
          batch = sharding.global_batch(host_batch, self.batch_sharding)
          if step_flops is None:  # the first step: compile ahead, say how long it took and what a device holds
            b, k, length = host_batch["input_ids"].shape
            step_flops = flops.train_step(self.model_config, images=cfg.batch_size, prompts_per_image=k,
                                          text_len=length, encoder_frozen=encoder_frozen,
                                          decoder_trained=decoder_trained)
            t_lower = time.perf_counter()
            lowered = train_step.lower(state, batch)
            t_compile, hits = time.perf_counter(), compilation_cache_hits()
            train_step = lowered.compile()
            cached = " (read from the compilation cache)" if compilation_cache_hits() > hits else ""
            self.log(f"compiled the train step in {time.perf_counter() - t_compile:.1f} s{cached} after "
                     f"{t_compile - t_lower:.1f} s of tracing and lowering{_memory_line(train_step)}; "
                     f"{step_flops / 1e9:.2f} GFLOP per step")
            t_last, wait = time.perf_counter(), 0.0  # the first report's window starts here, its waits too
          state, metrics = train_step(state, batch)
        step += 1
        if self._tracing and step - start == self.profile.skip + self.profile.steps:
          self._stop_trace(metrics, step)
        if pending is not None:
          window.append(self._check(*pending))
        pending = (step, metrics)

        is_eval = self.eval_fn is not None and (step % cfg.eval_every == 0 or step == total)
        is_save = step % cfg.checkpoint_every == 0 or step == total or is_eval
        stop = self._stop_requested(mngr, step)
        if is_save or stop or step % cfg.log_every == 0:
          window.append(self._check(*pending))  # the state about to be saved came from finite numbers
          pending = None
          now = time.perf_counter()
          self._report(window, step, now - t_last, wait, step_flops, peak, bar, writer)
          summary.last_metrics = dict(window[-1])
          window, t_last, wait = [], time.perf_counter(), 0.0
        elif bar.n < step:
          bar.update(step - bar.n)
        eval_metrics = None
        if is_eval:
          results = self.eval_fn(partition.merge(state["params"], state["frozen"]), step)
          summary.evals[step] = results
          self._report_eval(results, step, writer)
          first = next(iter(results.values()))
          eval_metrics = {checkpointing.BEST_METRIC: float(first["giou"]), "ciou": float(first["ciou"])}
          t_last = time.perf_counter()  # evaluation time is not training time
        if is_save or stop:
          checkpointing.save(mngr, step, state, self.data_iterator, eval_metrics, force=True)
          last_saved = step
        if stop:
          summary.stopped_early = stop
          self.log(f"\n{stop}: saved step {step}; run the same command again to resume")
          break
    bar.close()
    summary.step = step
    if last_saved != step and not summary.stopped_early:
      checkpointing.save(mngr, step, state, self.data_iterator, force=True)
    mngr.wait_until_finished()
    if not summary.stopped_early and step >= total:
      export_step = step
      best = mngr.best_step() if cfg.export_best else None
      if cfg.export_best and best is None:
        self.log("export_best: no step was evaluated; exporting the last one")
      elif best is not None and best != step:
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = None  # the last state's memory, for the best one's
        state = checkpointing.restore_state(mngr, best, like)
        export_step = best
      summary.export = self._export(state, export_step)
      summary.export_step = export_step
      self.log(f"exported the trained model of step {export_step}"
               f"{' (the best by gIoU)' if cfg.export_best and best is not None else ''} to {summary.export}")

  def _stop_trace(self, metrics, step: Optional[int]) -> None:
    jax.block_until_ready(metrics)  # the traced steps' device work ends inside the trace
    jax.profiler.stop_trace()
    self._tracing.close()
    self._tracing = None
    if step is not None:
      steps = f"steps {step - self.profile.steps + 1}-{step}" if self.profile.steps > 1 else f"step {step}"
      self.log(f"\nprofiled {steps}: {os.path.join(self.workdir, PROFILE_DIR)}")

  def _stop_requested(self, mngr, step: int) -> Optional[str]:
    if jax.process_count() > 1:
      return "preempted (SIGTERM)" if mngr.reached_preemption(step) else None
    if self._stop_signal:
      return f"stopped by {self._stop_signal}"
    return None

  def _check(self, step: int, metrics) -> dict:
    values = {k: float(v) for k, v in _host(metrics).items()}
    if not math.isfinite(values["loss"]):
      raise TrainingDiverged(f"the loss is {values['loss']} at step {step}; stopped without saving that state "
                             f"(the last checkpoint in {self.workdir} is intact): resume from it with a lower "
                             f"--config.optimizer.lr or a higher --config.optimizer.warmup_steps")
    values["step"] = step
    return values

  # ---------------------------------------------------------------- logging

  def _report(self, window, step, seconds, wait, step_flops, peak, bar, writer):
    cfg = self.cfg
    n = len(window)
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[-1] if k != "step"}
    steps_per_s = n / seconds if seconds > 0 else float("nan")
    mean["images_per_s"] = steps_per_s * cfg.batch_size
    mean["step_s"] = 1.0 / steps_per_s if steps_per_s else float("nan")
    mean["data_wait_fraction"] = wait / seconds if seconds > 0 else 0.0
    if peak:
      mean["mfu"] = step_flops * steps_per_s / (jax.device_count() * peak)
    if bar.n < step:
      bar.update(step - bar.n)
    post = {"loss": f"{mean['loss']:.4f}", "bce": f"{mean['bce']:.4f}", "dice": f"{mean['dice']:.4f}",
            "lr": f"{mean['lr']:.2e}", "gnorm": f"{mean['grad_norm']:.3f}", "img/s": f"{mean['images_per_s']:.1f}"}
    if "mfu" in mean:
      post["mfu"] = f"{100 * mean['mfu']:.1f}%"
    bar.set_postfix(post, refresh=True)
    if jax.process_index() == 0:
      for k, v in mean.items():
        writer.add_scalar(f"train/{k}", v, step)
      writer.sync()
      storage.append_line(os.path.join(self.workdir, METRICS_FILE),
                          json.dumps({"step": step, "time": time.time(), **{f"train/{k}": v for k, v in mean.items()}}))

  def _report_eval(self, results, step, writer):
    line = ", ".join(f"{name} gIoU {100 * r['giou']:.2f} cIoU {100 * r['ciou']:.2f}" for name, r in results.items())
    self.log(f"\nstep {step}: {line}")
    if jax.process_index() == 0:
      row = {"step": step, "time": time.time()}
      for name, r in results.items():
        for key in ("giou", "ciou"):
          writer.add_scalar(f"eval/{name}/{key}", r[key], step)
          row[f"eval/{name}/{key}"] = r[key]
      writer.sync()
      storage.append_line(os.path.join(self.workdir, METRICS_FILE), json.dumps(row))

  # ---------------------------------------------------------------- export

  def _export(self, state, step: int) -> str:
    params = partition.merge(state["params"], state["frozen"])
    provenance = checkpointing.training_provenance(self.provenance, self.workdir, step)
    return checkpointing.export(self.workdir, params, self.model_config, provenance, self.tokenizer_model)
