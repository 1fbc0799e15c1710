"""Where a compiled program spends its device time, from a `jax.profiler` trace: each traced operation is
matched to its HLO instruction, whose `op_name` metadata carries JAX's name stack (the Flax module path and the
transform: `jvp(...)` forward, `transpose(jvp(...))` backward), and the time is summed per part of the model.

On a GPU the kernels on the device's stream lines carry the instruction in `args.hlo_op`. Inside a command
buffer (CUDA graph) they carry only the buffer's name, so the program must run with
`--xla_gpu_enable_command_buffer=` (empty: no command buffers) to be attributed. On the CPU the thunk
executor records one event per instruction on its worker threads; a loop's events contain its body's, so each
event counts its exclusive time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Callable

NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=")
_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="((?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_OPERAND = re.compile(r"(?<![=\w])%([\w.\-]+)")
_PARAMETER = re.compile(r"\sparameter\(\d+\)")


def trace_file(trace_dir: str) -> str:
  """The one `*.trace.json.gz` that `jax.profiler.trace(trace_dir)` wrote."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if len(paths) != 1:
    raise ValueError(f"expected one trace file under {trace_dir}, found {len(paths)}")
  return paths[0]


def load_trace(path: str) -> list[dict]:
  """The events of a `*.trace.json.gz` (`trace_file`)."""
  with gzip.open(path) as f:
    return json.load(f)["traceEvents"]


def module_name(hlo_text: str) -> str:
  """`HloModule <name>, ...` -> name."""
  m = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
  if not m:
    raise ValueError("not an HLO module's text")
  return m.group(1)


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the `op_name` metadata it stands for, over every computation of a compiled module's
  text. An instruction without metadata of its own (XLA's fusions, layout copies, split reductions) takes its
  fused computation's (the root's, else the first there), else its first operand's."""
  own, calls, operands, of_computation, order = {}, {}, {}, {}, []
  current = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _COMPUTATION.match(line)
      current = m.group(1) if m and not line.startswith("HloModule") else None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    root, name = bool(m.group(1)), m.group(2)
    order.append(name)
    op = _OP_NAME.search(line)
    if op and not _PARAMETER.search(line):  # a parameter's op_name is the argument's path, not an operation
      own[name] = op.group(1)
      if current and (root or current not in of_computation):
        of_computation[current] = op.group(1)
    call = _CALLS.search(line)
    if call:
      calls[name] = call.group(1)
    operands[name] = _OPERAND.findall(line[m.end():].split("metadata=")[0])
  out = {}
  for name in order:  # operands come before their users
    found = own.get(name) or of_computation.get(calls.get(name, ""))
    if not found:
      found = next((out[x] for x in operands[name] if x in out), None)
    if found:
      out[name] = found
  return out


def instructions(hlo_text: str) -> set[str]:
  """The names of every instruction of a module's text."""
  return {m.group(2) for m in map(_INSTRUCTION.match, hlo_text.splitlines()) if m}


def _exclusive(events: list[dict]) -> list[tuple[dict, float]]:
  """(event, its duration less that of the events it contains), for events of one thread."""
  out, stack = [], []  # stack of [event, end, exclusive]
  for e in sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0))):
    end = e["ts"] + e.get("dur", 0)
    while stack and stack[-1][1] <= e["ts"]:
      out.append(tuple(stack.pop()[::2]))
    if stack:
      stack[-1][2] -= e.get("dur", 0)
    stack.append([e, end, e.get("dur", 0)])
  out.extend(tuple(s[::2]) for s in reversed(stack))
  return out


def op_times(events: list[dict], module: str, instructions=None) -> collections.Counter:
  """HLO instruction -> device microseconds summed over the trace, for the ops of `module`.

  A GPU's time is that of the kernels on its stream lines (the profiler's derived lines, which repeat them,
  are skipped); a CPU's is each thunk's exclusive time on the executor's threads. An event that names its op
  but not its module counts when `instructions` (the module's instruction names) holds the op: for a trace in
  which only that module ran.
  """
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  streams = {k for k, name in threads.items() if "/device:" in procs.get(k[0], "") and "stream" in name.lower()}
  def ours(args):
    if "hlo_op" not in args:
      return False
    if "hlo_module" in args:
      return args["hlo_module"] == module
    return instructions is not None and args["hlo_op"] in instructions

  ops = [e for e in events if e.get("ph") == "X" and ours(e.get("args") or {})]
  if streams:
    ops = [e for e in ops if (e["pid"], e["tid"]) in streams]
  per_thread = collections.defaultdict(list)
  for e in ops:
    per_thread[(e["pid"], e["tid"])].append(e)
  out = collections.Counter()
  for line in per_thread.values():
    for e, us in _exclusive(line):
      out[e["args"]["hlo_op"]] += us
  return out


def pass_of(op_name: str) -> str:
  """"backward" (inside a `transpose(...)`: gradients, and recomputation under remat), "forward" (inside a
  `jvp(...)`), or "outside" (neither: the optimizer update, norms, bookkeeping)."""
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "outside"


def attribute(times: collections.Counter, names: dict[str, str], part_of: Callable[[str], str],
              per: int = 1, top: int = 30) -> dict:
  """Device time per (part, pass), in ms per `per` iterations, and the `top` instructions.

  part_of(op_name) names the part ("" op_names, from instructions without metadata, go to "unattributed")."""
  total = sum(times.values())
  parts, passes = collections.Counter(), collections.Counter()
  for op, us in times.items():
    name = names.get(op, "")
    key = (part_of(name) if name else "unattributed", pass_of(name) if name else "outside")
    parts[key] += us
    passes[key[1]] += us

  def ms(us):
    return us / 1e3 / per

  rows = [{"part": p, "pass": q, "ms": ms(us), "share": us / max(total, 1e-9)} for (p, q), us in parts.most_common()]
  ops = [{"op": op, "op_name": names.get(op, "")[-160:], "ms": ms(us)} for op, us in times.most_common(top)]
  return {"device_ms": ms(total), "passes_ms": {k: ms(v) for k, v in passes.items()}, "parts": rows, "top_ops": ops,
          "ops_seen": len(times), "ops_with_metadata": sum(op in names for op in times)}
