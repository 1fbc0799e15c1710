"""Shared set-up for the benchmarks: one random-weight PyTorch EVF-SAM, saved as a Hugging Face-style
directory and converted with OUR converter, so both sides compute with the same weights.

Benchmarks run from the repository root as modules (`python -m benchmarks.<name>`); they need the dev
requirements (torch, segment-anything, torchscale), like the tests.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import statistics
import time

import numpy as np

PROMPTS = ["zebra top left", "[semantic] sky", "the man on the right holding a red umbrella", "cat",
           "the second car from the left", "a small dog lying on the grass", "[semantic] road", "woman in white"]


def test_image(h: int = 480, w: int = 640, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([np.sin(xx / 23.0 + c) * np.cos(yy / 31.0 - c) for c in range(3)], -1)
  return (base * 100 + 128 + rng.normal(0, 15, (h, w, 3))).clip(0, 255).astype(np.uint8)


def train_spm(directory: str) -> str:
  """A small sentencepiece BPE model (the real one ships with the checkpoints)."""
  from evf_testing.spm_model import train
  return train(directory, "bpe")


def build_models(size: str, workdir: str, seed: int = 0, dtype: str = "float32"):
  """-> (EvfConfig, torch reference module, converted checkpoint dir). Cached in `workdir`."""
  from evf_jax.evf import EvfConfig
  from evf_testing import evf_reference as ref
  config = EvfConfig.preset(size)
  model = ref.build_torch_evf(config, seed)
  ckpt = os.path.join(workdir, f"evf_{size}_{dtype}")
  if not os.path.isfile(os.path.join(ckpt, "model_config.json")):
    from convert.evf import STORED_DTYPES, convert_directory
    spm = train_spm(os.path.join(workdir, "spm"))
    hf = ref.write_hf_directory(model, config, os.path.join(spm, "sentencepiece.bpe.model"),
                                os.path.join(workdir, f"hf_{size}"))
    precision = {v: k for k, v in STORED_DTYPES.items()}[dtype]  # "float32" -> "fp32"
    convert_directory(hf, ckpt, precision=precision, overwrite=True, log=lambda *_: None)
  return config, model, ckpt


def timed(fn, repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def alternate(pairs: dict, rounds: int) -> dict:
  """{name: (ours_fn, reference_fn)} -> {name: (ours median s, reference median s, ours all, reference all)}: each
  pair's two sides alternate within every round, after one untimed call of each. On a shared machine only such
  same-run ratios mean anything."""
  out = {}
  for name, (ours, ref) in pairs.items():
    ours()
    ref()
    t_ours, t_ref = [], []
    for _ in range(rounds):
      for fn, ts in ((ref, t_ref), (ours, t_ours)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    out[name] = (statistics.median(t_ours), statistics.median(t_ref), t_ours, t_ref)
    print(f"[{name}] ours {out[name][0]:.3f} s, reference {out[name][1]:.3f} s", flush=True)  # a stopped run keeps it
  return out


def print_ratios(times: dict, width: int = 44) -> None:
  """`alternate`'s result as a table (seconds, ratio ours / reference) and the raw times."""
  print(f"{'':<{width}} {'ours [s]':>10} {'reference [s]':>14} {'ratio':>8}")
  for name, (o, r, _, _) in times.items():
    print(f"{name:<{width}} {o:>10.3f} {r:>14.3f} {o / r:>8.3f}")
  for name, (_, _, o, r) in times.items():
    print(f"raw {name}: ours {[round(v, 3) for v in o]}, reference {[round(v, 3) for v in r]}")


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
  print("RESULT " + json.dumps(result), flush=True)


def parse_results(stdout: str) -> dict:
  for line in stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError("child printed no RESULT line:\n" + stdout[-3000:])


def dense_products(fn, *args) -> collections.Counter:
  """The dense-layer matrix products of `fn(*args)`, read from its jaxpr: {(rows, in, out): count}, for every
  `dot_general` whose right operand is a 2-D matrix contracted on its first axis (a flax Dense kernel), with
  the left operand's other axes folded into rows; products inside `scan` count once per step."""
  import jax
  found = collections.Counter()

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lc, rc), (_, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        if len(rhs) == 2 and tuple(rc) == (0,) and not rb and tuple(lc) == (len(lhs) - 1,):
          rows = int(np.prod(lhs[:-1]))
          found[(rows, rhs[0], rhs[1])] += times
      steps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner, times * steps)

  walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
  return found
