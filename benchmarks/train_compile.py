"""The full training step compiled ahead of time for a TPU slice or a GPU cluster this machine does not have:
does the run fit before the pod is rented (as MaxText's train_compile.py).

    bash scripts/setup_static_env.sh tpu      # once: .venv-tpu-static (libtpu, ~1.5 GB)
    .venv-tpu-static/bin/python -m benchmarks.train_compile --topology v5p:2x4x4 \\
        --config configs/train/refcoco.py:size=huge [--mesh data=4,fsdp=8] [--batch-size 160] [--json F]
    bash scripts/setup_static_env.sh gpu      # once: .venv-gpu-static (jax's CUDA plugin, ~6 GB)
    .venv-gpu-static/bin/python -m benchmarks.train_compile --platform gpu --topology 4x1x8 --target h100 \\
        --config configs/train/multitask.py:size=huge
    .venv-tpu-static/bin/python -m benchmarks.train_compile --topology v5p:2x4x4 --config configs/train/refcoco.py:sam2

Either family: EVF-SAM (SAM-1 ViT) or EVF-SAM2 (SAM-2 Hiera), as the config's `model` section says (`sam` or
`sam2`; `--model-preset` replaces it by a preset of either), with the family's model class, frame and low-res
size (`evf_jax.families`).

It builds the step exactly as `Trainer.run` does (`state_layout` for the abstract sharded state, `make_train_step`,
`jax.jit` with the state and batch shardings and the state donated, lowered under `sharding.activate`) over a
mesh of the topology's compile-only devices, with the batch as ShapeDtypeStructs in the data pipeline's layout,
and compiles it without running anything. It reports the compile time; what one device holds (XLA's memory
analysis: arguments, outputs, temporaries) against the chip's HBM; the cross-device operations of one step, how
many and how many bytes (result shapes, loop trip counts applied); and the analytic model FLOPs per step.
`--eval` also compiles the evaluation step the trainer runs every `eval_every` steps, on the same mesh with the
parameters as training shards them, and reports its peak with the training state resident.

`--num-slices N` compiles for N TPU slices of the topology joined by the data-centre network (multi-slice),
the mesh laid out as `run.py train` lays it (`dcn_mesh`, `--dcn-mesh`: how many slices each axis spans; by
default "data" spans them all). XLA then compiles each slice's program with its collectives inside the slice
and hands what crosses slices to the DCN ("megascale") runtime as host transfers: those are reported apart,
as the bytes each device hands to the DCN per step.

TPU topologies are libtpu's names, `v5p:2x4x4` (v5p-64: v5p slices are named by TensorCores, two per chip, so
v5p-64 is 32 chips), `v5p:4x4x4` (64 chips, v5p-128), `v5e:16x16` (v5e-256), `v6e:4x4`...; GPU topologies are
hosts x 1 x GPUs per host (`1x1x8`, `4x1x8`). The mesh goes through `evf_jax.sharding.make_mesh` (as `run.py
train`): within a slice `jax.make_mesh`, which only accepts axis sizes that are products of the slice's
physical axes (on v5p 4x4x4, fsdp=8 is refused; fsdp=4 or 16 are not).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time

from benchmarks import deviceless  # imports no jax: main() sets the environment first

DEFAULT_TOPOLOGY = {"tpu": "v5e:2x2", "gpu": "1x1x4"}
DCN_SEND = "dcn-send"  # a host transfer to the multi-slice (megascale) runtime: what crosses slices
DEFAULT_CONFIG = "configs/train/refcoco.py:size=huge"

GiB = 2 ** 30
# Per-chip HBM, by jax's device_kind. GPUs: the device_memory_size of deviceless.TARGETS (what XLA is told).
HBM_BYTES = {"TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5p": 95 * GiB, "TPU v5": 95 * GiB,
             "TPU v4": 32 * GiB, "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB}
GPU_HBM = {name: int(re.search(r"device_memory_size: (\d+)", text).group(1))
           for name, text in deviceless.TARGETS.items()}


def hbm_bytes(device_kind: str, target: str | None = None) -> int | None:
  if target is not None:
    return GPU_HBM[target]
  for prefix in sorted(HBM_BYTES, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return HBM_BYTES[prefix]
  return None


# ------------------------------------------------------------------------------------------------ HLO text

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape: an array `bf16[8,128]{1,0:T(8,128)}` or a tuple of them (summed)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      bits = re.search(r"(\d+)", dtype)
      size = int(bits.group(1)) / 8 if bits else 4
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _split_shape(rhs: str) -> tuple[str, str]:
  """`(f32[2]{0}, s32[]) op(...)` -> ("(f32[2]{0}, s32[])", "op(...)"): the result shape, then the rest."""
  rhs = rhs.lstrip()
  if rhs.startswith("("):
    depth = 0
    for i, c in enumerate(rhs):
      depth += c == "("
      depth -= c == ")"
      if depth == 0:
        return rhs[:i + 1], rhs[i + 1:].lstrip()
    return rhs, ""
  shape, _, rest = rhs.partition(" ")
  return shape, rest.lstrip()


def _group_size(line: str, devices: int) -> int:
  """Devices per replica group of a collective (all of them when the groups are not given)."""
  # TPU: the mesh axes grouped, after the device order where that is not the mesh's own.
  named = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\S+)?\s*\{([^}]*)\}", line)
  if named:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", named.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if iota:
    return int(iota.group(1).split(",")[-1])
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if listed:
    return max(1, len([x for x in listed.group(1).split(",") if x]))
  return devices


def _link_bytes(op: str, result: int, group: int) -> float:
  """Bytes one device sends (= receives) for a collective with `result` bytes of output, in the bandwidth-
  optimal (ring) algorithm: the usual estimate of what crosses the links."""
  if group <= 1:
    return 0.0
  if op == "all-gather" or op == "all-to-all":
    return result * (group - 1) / group
  if op == "reduce-scatter":
    return result * (group - 1)
  if op == "all-reduce":
    return 2 * result * (group - 1) / group
  return float(result)  # collective-permute: the whole buffer


def _plain(shape: str) -> str:
  """The shape without layouts: `bf16[8,128]{1,0:T(8,128)}` -> `bf16[8,128]`."""
  return re.sub(r"\{[^{}]*\}", "", shape)


def _source(line: str) -> str:
  """The jax operation an HLO instruction came from (its metadata's op_name), or ""."""
  found = re.search(r'op_name="([^"]*)"', line)
  return found.group(1) if found else ""


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[dict]], dict[str, list[tuple[str, int | None]]], str | None]:
  """(collectives per computation, callees per computation with how often each runs per call, the entry's name).

  A collective is {"op", "bytes" (its result), "group", "shape", "source", "channel"}; async pairs are one
  collective, counted at `-start` with the bytes of its `-done` (the result; a start's tuple also holds the
  operands and context). A while loop's body runs its known_trip_count times, or, where XLA gives none (TPU), the
  bound of its condition when that is `counter < constant` (lax.scan's and lax.map's loops); None when neither is
  known.

  Two TPU forms are read as what they do. A reduce-scatter is a fusion (emitter `AllReduceScatterFusion`) whose
  body holds an all-reduce of the whole input and keeps this device's slice: one reduce-scatter with the
  fusion's result. An all-gather that XLA overlaps with compute is split into a start fusion, continuation
  fusions and a done fusion, each holding a copy of the same all-gather (same channel_id): `_rows` counts the
  copies once."""
  found: dict[str, list[dict]] = {}
  calls: dict[str, list[tuple[str, int | str | None]]] = {}
  bounds: dict[str, int] = {}          # condition computation -> N of its `i < N`
  constants: dict[str, int] = {}       # integer scalar constants of the current computation
  entry, current = None, None
  starts: dict[str, dict] = {}
  scatter_fusions: dict[str, dict] = {}  # computation -> the AllReduceScatterFusion that calls it
  for line in hlo_text.splitlines():
    inst = _INSTRUCTION.match(line)
    if inst is None:
      header = _HEADER.match(line)
      if header and "=" not in line.split("(")[0]:
        current = header.group(2)
        found.setdefault(current, [])
        calls.setdefault(current, [])
        constants = {}
        if header.group(1):
          entry = current
      continue
    if current is None:
      continue
    name, rhs = inst.groups()
    shape, rest = _split_shape(rhs)
    op_match = re.match(r"([\w\-]+)\(", rest)
    if op_match is None:
      continue
    op = op_match.group(1)
    if op == "constant" and re.fullmatch(r"[su](8|16|32|64)\[\]", _plain(shape)):
      value = re.match(r"constant\((-?\d+)\)", rest)
      if value:
        constants[name] = int(value.group(1))
    elif op == "compare" and "direction=LT" in rest and line.lstrip().startswith("ROOT"):
      operands = re.findall(r"%?([\w.\-]+)(?=[,)])", _split_shape(rest[len(op):])[0])
      if len(operands) == 2 and operands[1] in constants:
        bounds[current] = constants[operands[1]]
    for callee in _CALLEE.findall(line):
      factor: int | str | None = 1
      if re.search(r"\bbody=%?" + re.escape(callee) + r"\b", line):
        trip = _TRIP_COUNT.search(line)
        condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
        factor = int(trip.group(1)) if trip else ("condition:" + condition.group(1) if condition else None)
      calls[current].append((callee, factor))
    for group in _CALLEE_LIST.findall(line):
      calls[current].extend((c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip())
    if op == "fusion" and '"emitter":"AllReduceScatterFusion"' in line:
      callee = re.search(r"\bcalls=%?([\w.\-]+)", line)
      if callee:
        scatter_fusions[callee.group(1)] = {"bytes": shape_bytes(shape), "shape": _plain(shape),
                                            "source": _source(line)}
    if op == "send" and "xla_megascale_runtime" in line:  # one transfer to the other slices
      first = _ARRAY.search(shape)
      found[current].append({"op": DCN_SEND, "bytes": shape_bytes(first.group(0)) if first else 0, "group": 0,
                             "shape": _plain(first.group(0)) if first else "", "source": _source(line),
                             "channel": _channel(line)})
    elif op in deviceless.COLLECTIVES:
      found[current].append({"op": op, "bytes": shape_bytes(shape), "group": _group_size(line, 0),
                             "shape": _plain(shape), "source": _source(line), "channel": _channel(line)})
    elif op.endswith("-start") and op[:-len("-start")] in deviceless.COLLECTIVES:
      # Until its -done says otherwise: the shape itself where it is not a tuple (all-reduce-start).
      record = {"op": op[:-len("-start")], "bytes": 0 if shape.startswith("(") else shape_bytes(shape),
                "group": _group_size(line, 0), "shape": _plain(shape), "source": _source(line),
                "channel": _channel(line)}
      found[current].append(record)
      starts[name] = record
    elif op.endswith("-done") and op[:-len("-done")] in deviceless.COLLECTIVES:
      operands = _split_shape(rest[len(op):])[0]  # "(shape %start)"
      named = re.findall(r"%([\w.\-]+)", operands) or operands.strip("() ").split()[-1:]
      if named and named[-1] in starts:
        starts[named[-1]].update(bytes=shape_bytes(shape), shape=_plain(shape))
  for comp, fusion in scatter_fusions.items():
    inner = [o for o in found.get(comp, ()) if o["op"] == "all-reduce"]
    if inner:  # its body's all-reduce has no metadata of its own: the fusion's names the gradient
      found[comp] = [dict(inner[0], op="reduce-scatter", channel=None, **fusion)]
  resolved = {comp: [(callee, bounds.get(f[len("condition:"):]) if isinstance(f, str) else f) for callee, f in edges]
              for comp, edges in calls.items()}
  return found, resolved, entry


def _channel(line: str) -> str | None:
  found = re.search(r"\bchannel_id=(\d+)", line)
  return found.group(1) if found else None


def _executions(found, calls, entry) -> tuple[dict[str, int], list[str]]:
  """How often each computation runs per execution of the entry; and the loop bodies with collectives (in them
  or in what they call) whose trip count is unknown (counted once)."""
  has: dict[str, bool] = {}

  def holds(comp: str, stack: tuple[str, ...] = ()) -> bool:
    if comp not in has:
      has[comp] = bool(found.get(comp)) or any(holds(c, stack + (comp,)) for c, _ in calls.get(comp, ())
                                               if c not in stack)
    return has[comp]

  times: dict[str, int] = {}
  unknown: set[str] = set()

  def visit(comp: str, n: int, stack: tuple[str, ...]) -> None:
    if comp in stack:
      return
    times[comp] = times.get(comp, 0) + n
    for callee, factor in calls.get(comp, ()):
      if factor is None and holds(callee):
        unknown.add(callee)
      visit(callee, n * (1 if factor is None else factor), stack + (comp,))

  if entry is not None:
    visit(entry, 1, ())
  return times, sorted(unknown)


def _rows(hlo_text: str, devices: int) -> tuple[list[dict], list[str]]:
  found, calls, entry = parse_hlo(hlo_text)
  times, unknown = _executions(found, calls, entry)
  # One entry per collective: the copies of a split TPU collective share (op, channel_id, shape), each in its own
  # computation. Two in one computation are two collectives (XLA:CPU numbers every shard_map collective 1).
  picked: dict[tuple, tuple[dict, int, str]] = {}  # key -> (the collective, its executions per step, its computation)
  for comp, ops in found.items():
    n = times.get(comp, 1)  # one not reached from the entry (a call this parser missed): once
    for i, o in enumerate(ops):
      key = (o["op"], o["channel"], o["shape"]) if o["channel"] is not None else (comp, i)
      if key in picked and picked[key][2] != comp:
        first, m, home = picked[key]
        picked[key] = (dict(first, source=first["source"] or o["source"]), max(m, n), home)
      else:
        picked[(comp, i) if key in picked else key] = (o, n, comp)
  rows = []
  for o, n, _ in picked.values():
    if o["op"] == DCN_SEND:  # the whole transfer leaves the slice; the other slices are not in this program
      rows.append(dict(o, group=None, per_step=n, result_bytes=n * o["bytes"], link_bytes=n * o["bytes"]))
      continue
    group = o["group"] or devices
    rows.append(dict(o, group=group, per_step=n, result_bytes=n * o["bytes"],
                     link_bytes=n * _link_bytes(o["op"], o["bytes"], group)))
  return rows, unknown


def collective_traffic(hlo_text: str, devices: int) -> dict:
  """The cross-device operations of one execution of a compiled program, per kind: `ops` (in the program; the
  copies of a split TPU collective count once, so this can be below `deviceless.collectives`), `per_step`
  (executions, loop trip counts applied), `result_bytes` (their results' bytes on one device, summed over
  executions) and `link_bytes` (an estimate of what one device sends: the ring algorithm over each operation's
  replica group). Loops of unknown trip count holding collectives count once and are listed in
  "unknown_trip_counts"."""
  rows, unknown = _rows(hlo_text, devices)
  out: dict[str, dict] = {}
  for r in rows:
    kind = out.setdefault(r["op"], {"ops": 0, "per_step": 0, "result_bytes": 0, "link_bytes": 0.0})
    kind["ops"] += 1
    kind["per_step"] += r["per_step"]
    kind["result_bytes"] += r["result_bytes"]
    kind["link_bytes"] += r["link_bytes"]
  for kind in out.values():
    kind["link_bytes"] = int(kind["link_bytes"])
  result: dict = {op: out[op] for op in (*deviceless.COLLECTIVES, DCN_SEND) if op in out}
  if unknown:
    result["unknown_trip_counts"] = unknown
  return result


def largest_collectives(hlo_text: str, devices: int, n: int = 20) -> list[dict]:
  """The `n` cross-device operations that send the most per step (link bytes, trip counts applied), each with
  its result shape and the jax operation it came from: where to look when a step communicates more than it
  should."""
  rows, _ = _rows(hlo_text, devices)
  keys = ("op", "shape", "group", "per_step", "result_bytes", "link_bytes", "source")
  return [{k: int(r[k]) if k.endswith("bytes") else r[k] for k in keys}
          for r in sorted(rows, key=lambda r: -r["link_bytes"])[:n]]


# ------------------------------------------------------------------------------------------------ flags


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """"data=-1,fsdp=8,tensor=1" -> (("data", -1), ("fsdp", 8), ("tensor", 1))."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, size = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name.strip()) or not re.fullmatch(r"-?\d+", size.strip()):
      raise ValueError(f"--mesh {text!r}: expected NAME=SIZE,... e.g. data=-1,fsdp=8,tensor=1")
    out.append((name.strip(), int(size)))
  if not out:
    raise ValueError(f"--mesh {text!r}: no axes")
  return tuple(out)


def load_config(spec: str):
  """`configs/train/NAME.py[:arg]` -> its get_config(arg), as `run.py train --config` reads it."""
  from evf_jax.train import config as train_config  # lazy: jax is imported after main() sets the environment
  return train_config.load_file(spec)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not the usage block
    self.exit(2, f"error: {message} (see --help)\n")


def _args(argv):
  ap = _Parser(prog="benchmarks.train_compile", description=__doc__.split("\n")[0])
  ap.add_argument("--platform", default="tpu", choices=sorted(DEFAULT_TOPOLOGY))
  ap.add_argument("--topology", help="tpu: a libtpu topology, e.g. v5p:2x4x4 (v5p-64), v5p:4x4x4, v5e:16x16 "
                  "(v5e-256), v5e:2x2 (default); gpu: hosts x 1 x GPUs per host, e.g. 1x1x8, 4x1x8 (default 1x1x4)")
  ap.add_argument("--target", choices=sorted(deviceless.TARGETS), help="gpu: the chip (default h100)")
  ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"a training config file[:arg] (default {DEFAULT_CONFIG})")
  ap.add_argument("--model-preset", help="replace the config's model by a preset of either family (EVF-SAM: tiny, "
                  "base, evf-sam; EVF-SAM2: toy, evf-sam2); one of the other family also takes that family's "
                  "default trainable set")
  ap.add_argument("--batch-size", type=int, help="images per optimizer step (default: the config's)")
  ap.add_argument("--mesh", help='mesh axes, e.g. "data=8,fsdp=8,tensor=1" (default: the config\'s)')
  ap.add_argument("--num-slices", type=int, default=1, help="tpu: this many slices of --topology joined by the "
                  "data-centre network (multi-slice; default 1)")
  ap.add_argument("--dcn-mesh", help='with --num-slices: how many slices each mesh axis spans, e.g. "data=2" '
                  "(default: the config's dcn_mesh, all slices on data)")
  ap.add_argument("--grad-accum", type=int, help="microbatches per step (default: the config's)")
  ap.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                  help="recompute block activations in the backward pass (default: the config's)")
  ap.add_argument("--replicate-frozen", action=argparse.BooleanOptionalAction, default=None,
                  help="every device holds the frozen parameters whole instead of sharded by the rules (default: "
                  "the config's replicate_frozen)")
  ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="compute dtype (default: the config's)")
  ap.add_argument("--attention", choices=("xla", "cudnn"), help="default: the config's; cudnn is for gpu")
  ap.add_argument("--prompts", type=int, help="prompts per image K (default: the config's data.num_prompts)")
  ap.add_argument("--text-len", type=int, help="tokens per prompt (default: the config's data.max_text_len, the "
                  "length the data pipeline pads every prompt to)")
  ap.add_argument("--mask-size", type=int, help="loss resolution (default: data.mask_size, or SAM's input size)")
  ap.add_argument("--eval", action="store_true", help="also compile the evaluation step as the trainer runs it "
                  "(`evals`): on the training mesh, with the parameters as training shards them, the training state "
                  "resident beside it")
  ap.add_argument("--eval-prompts", type=int, default=8, help="--eval: prompt slots per image (a power of two, as "
                  "the evaluator buckets them; default 8)")
  ap.add_argument("--eval-text-len", type=int, default=32, help="--eval: tokens per prompt (a text bucket; default 32)")
  ap.add_argument("--eval-size", type=int, default=640, help="--eval: original image sizes padded to this (a "
                  "multiple of eval.size_multiple; default 640, RefCOCO's largest side)")
  ap.add_argument("--json", help="write the summary here (an existing file is not overwritten)")
  ap.add_argument("--dump-hlo", help="also write the compiled HLO text here (not overwritten)")
  args = ap.parse_args(argv)
  for path in (args.json, args.dump_hlo):
    if path and os.path.exists(path):
      ap.error(f"{path} exists; not overwriting it")
  if args.platform == "tpu" and args.target:
    ap.error("--target is for --platform gpu (a TPU's chip is in --topology)")
  if args.platform == "tpu" and args.attention == "cudnn":
    ap.error("--attention cudnn is for --platform gpu")
  if args.attention == "cudnn" and args.precision == "fp32":
    ap.error("--attention cudnn needs --precision bf16 or fp16")
  for name in ("batch_size", "grad_accum", "prompts", "text_len", "mask_size", "eval_prompts", "eval_text_len",
               "eval_size"):
    value = getattr(args, name)
    if value is not None and value < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if args.num_slices < 1:
    ap.error(f"--num-slices must be >= 1, got {args.num_slices}")
  if args.num_slices > 1 and args.platform != "tpu":
    ap.error("--num-slices is for --platform tpu")
  for name in ("mesh", "dcn_mesh"):
    if getattr(args, name) is not None:
      try:
        setattr(args, name, parse_mesh(getattr(args, name)))
      except ValueError as e:
        ap.error(str(e))
  if not os.path.isfile(args.config.partition(":")[0]):
    ap.error(f"--config {args.config.partition(':')[0]}: no such file")
  args.topology = args.topology or DEFAULT_TOPOLOGY[args.platform]
  if args.platform == "gpu":
    args.target = args.target or "h100"
  return args


def use_preset(cfg, preset: str) -> None:
  """Replaces the config's model by `preset` (either family). The config's `trainable` patterns are kept within a
  family; across, they name the other family's parameters, so the new family's default set replaces them."""
  from evf_jax.train import config as train_config
  was_sam2 = "sam2" in cfg.model
  cfg.model = train_config.model_fields(preset)
  if ("sam2" in cfg.model) != was_sam2:
    cfg.trainable = train_config.default_trainable(cfg.model)


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
  args = _args(argv)
  if args.platform == "tpu":
    error = deviceless.use_compile_only_tpu("benchmarks.train_compile")
  else:  # Triton GEMMs off, as in eval_compile: with no device to autotune on, some have no valid tiling
    error = deviceless.use_compile_only_cuda("--xla_gpu_enable_triton_gemm=false", "benchmarks.train_compile")
  if error:
    return _fail(error)

  import functools

  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from evf_jax import families, flops, sharding
  from evf_jax.errors import UserError
  from evf_jax.runtime import compute_dtype
  from evf_jax.sam import rel_pos_attention
  from evf_jax.train import config as train_config
  from evf_jax.train import optimizer, partition
  from evf_jax.train.step import BATCH_KEYS, StepOptions, make_train_step
  from evf_jax.train.trainer import state_layout

  try:
    cfg = load_config(args.config)
  except UserError as e:  # names the file and what is wrong with it
    return _fail(str(e))
  overrides = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "remat": args.remat,
               "precision": args.precision, "attention": args.attention, "mesh": args.mesh,
               "dcn_mesh": args.dcn_mesh, "replicate_frozen": args.replicate_frozen}
  for key, value in overrides.items():
    if value is not None:
      cfg[key] = value
  try:
    if args.model_preset:
      use_preset(cfg, args.model_preset)
    model_config = train_config.model_config(cfg.model)
    dtype = compute_dtype(cfg.precision, cfg.attention)
  except UserError as e:
    return _fail(str(e))
  family, image_input = families.family_of(model_config), families.image_input(model_config)
  if args.platform == "tpu" and cfg.attention == "cudnn":
    return _fail("the config's attention is cudnn, which is for --platform gpu: pass --attention xla")
  k = args.prompts or int(cfg.data.num_prompts)
  text_len = args.text_len or int(cfg.data.max_text_len)
  mask_size = args.mask_size or int(cfg.data.mask_size) or image_input.size

  try:
    devices = (deviceless.tpu_devices(args.topology, args.num_slices) if args.platform == "tpu"
               else deviceless.cuda_devices(args.target, args.topology))
  except Exception as e:  # the compiler plugin's message for a topology it does not know
    return _fail(f"{args.platform} topology {args.topology!r}: {str(e).splitlines()[0]}")
  if args.platform == "tpu":
    # SAM's global attention sizes its steps by the backend jax runs on (the CPU here), not the target.
    rel_pos_attention.default_chunking = functools.partial(rel_pos_attention.default_chunking, platform="tpu")
  try:
    mesh = sharding.make_mesh(cfg.mesh, devices, dcn=cfg.dcn_mesh)
    sizes = tuple(mesh.shape.values())
    across = (sharding.dcn_shape(cfg.dcn_mesh, mesh.axis_names, sizes, args.num_slices) if args.num_slices > 1
              else (1,) * len(sizes))  # one slice: make_mesh checks only dcn_mesh's axis names
  except UserError as e:
    return _fail(str(e))
  except Exception as e:  # jax.make_mesh: axis sizes that are not products of the slice's physical axes
    return _fail(f"mesh {dict(cfg.mesh)} on {args.topology}: {str(e).splitlines()[0]}")
  rules = sharding.rules_for(mesh, [tuple(r) for r in cfg.sharding_rules])
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, P())
  data_ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))
  accum = max(1, int(cfg.grad_accum))
  if cfg.batch_size % accum or (cfg.batch_size // accum) % data_ways:
    return _fail(f"batch_size {cfg.batch_size} with grad_accum {accum} gives microbatches of "
                 f"{cfg.batch_size / accum:g} images, which the {data_ways} batch shards of mesh "
                 f"{dict(mesh.shape)} do not divide (pass --batch-size or --grad-accum)")

  # The trainer's optimizer and state layout.
  schedule = optimizer.learning_rate(cfg.optimizer.lr, total_steps=cfg.total_steps,
                                     warmup_steps=cfg.optimizer.warmup_steps, schedule=cfg.optimizer.schedule,
                                     end_factor=cfg.optimizer.end_factor)
  tx = optimizer.from_config(cfg.optimizer, schedule)
  try:
    shapes, shards, report = state_layout(model_config, cfg.trainable, tx, mesh, rules,
                                          replicate_frozen=cfg.replicate_frozen)
  except UserError as e:
    return _fail(str(e))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards)
  encoder_frozen = partition.encoder_frozen(shapes["params"])
  decoder_trained = partition.decoder_trained(shapes["params"])
  options = StepOptions.from_config(cfg, dtype, encoder_frozen)
  model = family.model_class(model_config, attention=cfg.attention, remat=cfg.remat, dtype=dtype)
  step_fn = make_train_step(model, model_config, tx, schedule, options)

  # The batch as data_pipelines.pipeline makes it (evf_testing.training.random_batch's dtypes), in the family's
  # square SAM frame: shapes only, so SAM-1's padded frame and SAM-2's stretched one compile alike.
  b, s, bs = int(cfg.batch_size), image_input.size, model_config.beit3.img_size
  layout = {"sam_image": ((b, s, s, 3), np.uint8), "resize_hw": ((b, 2), np.int32),
            "beit_image": ((b, bs, bs, 3), np.float32), "input_ids": ((b, k, text_len), np.int32),
            "attention_mask": ((b, k, text_len), np.bool_), "prompt_valid": ((b, k), np.bool_),
            "masks": ((b, k, mask_size, mask_size), np.uint8), "valid_region": ((b, mask_size, mask_size), np.bool_)}
  assert set(layout) == set(BATCH_KEYS)
  batch = {key: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sh) for key, (shape, dt) in layout.items()}

  with sharding.activate(mesh, rules):
    train_step = jax.jit(step_fn, in_shardings=(shards, batch_sh), out_shardings=(shards, replicated),
                         donate_argnums=0)
    start = time.perf_counter()
    try:
      lowered = train_step.trace(abstract, batch).lower()
      lower_s = time.perf_counter() - start
      compiled = lowered.compile()
    except Exception as e:
      return _fail(f"compiling the train step failed after {time.perf_counter() - start:.0f} s: {_first_line(e)}")
  compile_s = time.perf_counter() - start - lower_s

  mem = _memory_bytes(compiled, ("argument", "output", "alias", "temp", "generated_code"))
  # Donated state: outputs alias arguments, so the peak is arguments + non-aliased outputs + temporaries.
  mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
  hbm = hbm_bytes(devices[0].device_kind, args.target if args.platform == "gpu" else None)
  hlo = compiled.as_text()
  per_slice = len(devices) // args.num_slices  # a multi-slice program's collectives stay inside its slice
  traffic = collective_traffic(hlo, per_slice)
  model_flops = flops.train_step(model_config, images=b, prompts_per_image=k, text_len=text_len,
                                 encoder_frozen=encoder_frozen, decoder_trained=decoder_trained)
  try:
    xla_flops = float(compiled.cost_analysis().get("flops", 0.0))
  except Exception:
    xla_flops = None
  peak = flops.peak_flops(devices[0].device_kind)
  n_params = {part: sum(math.prod(x.shape) for x in jax.tree.leaves(shapes[part])) for part in ("params", "frozen")}

  summary = {
      "family": family.name,
      "settings": {
          "platform": args.platform, "topology": args.topology, "target": args.target, "config": args.config,
          "model_preset": args.model_preset, "mesh": dict(mesh.shape), "num_slices": args.num_slices,
          "dcn_mesh": dict(zip(mesh.axis_names, across)),
          "batch_size": b,
          "grad_accum": int(cfg.grad_accum), "remat": bool(cfg.remat), "precision": cfg.precision,
          "replicate_frozen": bool(cfg.replicate_frozen),
          "attention": cfg.attention, "prompts_per_image": k, "text_len": text_len, "mask_size": mask_size,
          "sam_img_size": s, "beit_img_size": bs, "encoder_frozen": encoder_frozen,
          "decoder_trained": decoder_trained,
          "sharding_rules": [list(r) for r in rules],
      },
      "devices": len(devices), "device_kind": devices[0].device_kind,
      "jax": jax.__version__, "date": datetime.date.today().isoformat(),
      "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
      "parameters": {"trained": n_params["params"], "frozen": n_params["frozen"]},
      "replicated_dims": {"count": len(report), "examples": report[:8]},
      "state_per_device_bytes": {part: _per_device_bytes(abstract[part]) for part in ("params", "frozen", "opt_state")},
      "batch_per_device_bytes": _per_device_bytes(batch),
      "memory_per_device_bytes": mem,
      "hbm_bytes": hbm,
      "fits": None if hbm is None else mem["total"] <= hbm,
      "collectives": traffic,
      "largest_collectives": largest_collectives(hlo, per_slice),
      "model_flops_per_step": model_flops,
      "model_flops_per_device": model_flops / len(devices),
      "xla_flops_per_device": xla_flops,
      "peak_flops_per_device": peak,
      "step_s_at_peak": None if not peak else model_flops / len(devices) / peak,
  }
  if args.eval:
    try:
      summary["evaluation"] = _compile_eval(args, cfg, model_config, mesh, rules, abstract, summary)
    except Exception as e:
      return _fail(f"compiling the evaluation step failed: {_first_line(e)}")
  if args.dump_hlo:
    with open(args.dump_hlo, "x") as f:
      f.write(hlo)
  _print(summary)
  if args.json:
    with open(args.json, "x") as f:
      json.dump(summary, f, indent=2)
  return 0


def _first_line(error: Exception) -> str:
  """The first line of a compiler's message (at most 500 characters), or the exception's type."""
  text = str(error).strip()
  return text.splitlines()[0][:500] if text else type(error).__name__


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  import jax
  import numpy as np
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _memory_bytes(compiled, names: tuple[str, ...]) -> dict[str, int]:
  """XLA's memory analysis of a compiled program, per device: {"argument": bytes, ...} for `names`."""
  memory = compiled.memory_analysis()
  return {name: int(getattr(memory, f"{name}_size_in_bytes", 0) or 0) for name in names}


def _verdict(hbm: int | None, fits: bool | None) -> str:
  return "" if hbm is None else f" of {hbm / GiB:.1f} GiB HBM: " + ("fits" if fits else "DOES NOT FIT")


def _compile_eval(args, cfg, model_config, mesh, rules, abstract, summary: dict) -> dict:
  """The evaluation step `Trainer` runs every `eval_every` steps (`run_train`'s evaluator), compiled for the same
  devices: the parameters keep the training state's shardings and the rest of the state stays in memory, so the
  peak while evaluating is the whole state plus the step's batch, outputs and temporaries."""
  from evf_jax import buckets, evaluate, families, sharding
  from evf_jax.train import config as train_config
  from evf_jax.train import partition

  devices = mesh.devices.size
  images = buckets.round_up(max(1, int(cfg.eval.batch_size)), devices)  # as evaluate.Evaluator rounds it
  axes = sharding.batch_axes(mesh, rules)
  image_input = families.image_input(model_config)
  batch = evaluate.batch_spec(images, args.eval_prompts, args.eval_text_len, args.eval_size,
                              sam_size=image_input.size, beit_size=model_config.beit3.img_size,
                              low_res=image_input.low_res, sharding=sharding.batch_sharding(mesh, rules))
  params = partition.merge(abstract["params"], abstract["frozen"])
  predict = evaluate.evf_predict_fn(model_config, *train_config.eval_compute(cfg))
  step = evaluate.sharded_step(predict, mesh, False, axes)
  start = time.perf_counter()
  with sharding.activate(mesh, rules):
    compiled = step.trace(params, batch).lower().compile()
  mem = _memory_bytes(compiled, ("argument", "output", "temp", "generated_code"))
  batch_bytes = _per_device_bytes(batch)
  peak = sum(summary["state_per_device_bytes"].values()) + batch_bytes + mem["output"] + mem["temp"] + \
      mem["generated_code"]
  hlo = compiled.as_text()
  hbm = summary["hbm_bytes"]
  return {"images": images, "prompts_per_image": args.eval_prompts, "text_len": args.eval_text_len,
          "size": args.eval_size, "compile_s": round(time.perf_counter() - start, 1),
          "memory_per_device_bytes": mem, "batch_per_device_bytes": batch_bytes, "peak_per_device_bytes": peak,
          "fits": None if hbm is None else peak <= hbm,
          "collectives": collective_traffic(hlo, devices // args.num_slices),
          "largest_collectives": largest_collectives(hlo, devices // args.num_slices)}


def _print_traffic(collectives: dict, what: str) -> None:
  traffic = {k: v for k, v in collectives.items() if isinstance(v, dict)}
  if not traffic:
    print("  cross-device operations: none")
    return
  print(f"  cross-device operations per {what}:")
  for op, t in traffic.items():
    if op == DCN_SEND:
      print(f"    {'to other slices':<19} {t['per_step']:>6} ({t['ops']} in the program)  handed to the DCN per "
            f"device {t['result_bytes'] / GiB:8.3f} GiB")
      continue
    print(f"    {op:<19} {t['per_step']:>6} ({t['ops']} in the program)  results {t['result_bytes'] / GiB:8.3f} "
          f"GiB  sent per device ~{t['link_bytes'] / GiB:8.3f} GiB")
  if "unknown_trip_counts" in collectives:
    print(f"    (loops of unknown trip count counted once: {collectives['unknown_trip_counts']})")


def _print(summary: dict) -> None:
  st, mem = summary["settings"], summary["memory_per_device_bytes"]
  hbm = summary["hbm_bytes"]
  family = summary["family"]
  print(f"{family} training step, {st['config']}{' (model ' + st['model_preset'] + ')' if st['model_preset'] else ''}"
        f" for {st['platform']} {st['topology']}"
        f"{' x ' + str(st['num_slices']) + ' slices' if st.get('num_slices', 1) > 1 else ''} "
        f"({summary['devices']} x {summary['device_kind']}), mesh "
        f"{st['mesh']}: batch {st['batch_size']} images x {st['prompts_per_image']} prompts x {st['text_len']} "
        f"tokens, masks {st['mask_size']}, grad_accum {st['grad_accum']}, remat {st['remat']}, {st['precision']}, "
        f"attention {st['attention']}{', frozen parameters replicated' if st['replicate_frozen'] else ''}")
  print(f"  parameters: {summary['parameters']['trained']:,} trained, {summary['parameters']['frozen']:,} frozen; "
        f"{summary['replicated_dims']['count']} parameter dimension(s) replicated (mesh does not divide them)")
  print(f"  lowered in {summary['lower_s']:.1f} s, compiled in {summary['compile_s']:.1f} s")
  verdict = _verdict(hbm, summary["fits"])
  print(f"  per device: arguments {mem['argument'] / GiB:.2f} GiB (state "
        f"{sum(summary['state_per_device_bytes'].values()) / GiB:.2f}, batch "
        f"{summary['batch_per_device_bytes'] / GiB:.2f}), outputs {mem['output'] / GiB:.2f} GiB "
        f"({mem['alias'] / GiB:.2f} aliased), temporaries {mem['temp'] / GiB:.2f} GiB; total "
        f"{mem['total'] / GiB:.2f} GiB{verdict}")
  _print_traffic(summary["collectives"], "step")
  at_peak = summary["step_s_at_peak"]
  print(f"  model FLOPs: {summary['model_flops_per_step'] / 1e12:.1f} TFLOP per step, "
        f"{summary['model_flops_per_device'] / 1e12:.2f} TFLOP per device"
        + (f" ({at_peak * 1e3:.0f} ms at the chip's bf16 peak)" if at_peak else "")
        + (f"; XLA counts {summary['xla_flops_per_device'] / 1e12:.2f} TFLOP per device (with remat)"
           if summary["xla_flops_per_device"] else ""))
  ev = summary.get("evaluation")
  if ev:
    m = ev["memory_per_device_bytes"]
    print(f"{family} evaluation step during training, {ev['images']} images x {ev['prompts_per_image']} prompts x "
          f"{ev['text_len']} tokens, images padded to {ev['size']}: compiled in {ev['compile_s']:.1f} s")
    print(f"  per device: batch {ev['batch_per_device_bytes'] / GiB:.2f} GiB, temporaries {m['temp'] / GiB:.2f} GiB, "
          f"outputs {m['output'] / GiB:.3f} GiB; with the training state "
          f"{ev['peak_per_device_bytes'] / GiB:.2f} GiB{_verdict(hbm, ev['fits'])}")
    _print_traffic(ev["collectives"], "evaluation step")


if __name__ == "__main__":
  sys.exit(main())
