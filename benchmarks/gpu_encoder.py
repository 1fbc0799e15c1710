"""Where the SAM-H image encoder's time goes on a GPU (bf16), and the cuDNN end-to-end path.

    python benchmarks/gpu_encoder.py [--batch 8]

Times, at full size (random weights): one global-attention block and one windowed block with each
attention path; the whole encoder with float32-stored vs bfloat16-stored params; a plain bf16 matmul
of the MLP's shape (what the chip gives this problem); and `Predictor` end to end with cuDNN attention.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.gpu import encoder_matmul_flops  # noqa: E402


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timeit(fn, *args, repeats=10):
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", default="evf-sam")
  args = ap.parse_args()
  import jax
  import jax.numpy as jnp
  from evf_jax.evf import EvfConfig, EvfSam, init_params
  from evf_jax.sam.image_encoder import Block
  cfg = EvfConfig.preset(args.size)
  sam = cfg.sam
  b, g, d = args.batch, sam.embedding_size, sam.embed_dim
  key = jax.random.key(0)

  # 1. A plain matmul of the MLP's first layer shape.
  x = jax.random.normal(key, (b * g * g, d), jnp.bfloat16)
  w = jax.random.normal(key, (d, 4 * d), jnp.bfloat16)
  mm = jax.jit(lambda x, w: x @ w)
  t = timeit(mm, x, w)
  log(f"matmul ({b * g * g}x{d}) @ ({d}x{4 * d}) bf16: {2 * b * g * g * d * 4 * d / t / 1e12:.0f} TFLOP/s")

  # 2. One block of each kind, each attention path.
  xb = jax.random.normal(key, (b, g, g, d), jnp.bfloat16)
  for ws, name in ((0, "global"), (sam.window_size, "windowed")):
    for impl in ("xla", "cudnn"):
      blk = Block(d, sam.num_heads, sam.mlp_ratio, ws, (g, g), attention_impl=impl, dtype=jnp.bfloat16)
      try:
        p = jax.jit(blk.init)(key, xb)
        t = timeit(jax.jit(blk.apply), p, xb)
        log(f"{name} block, attention={impl}, batch {b}: {t * 1e3:.2f} ms")
      except Exception as e:
        log(f"{name} block, attention={impl}: FAILED {type(e).__name__}: {str(e)[:200]}")

  # 3. The whole encoder, params stored in float32 (cast on use) vs bfloat16.
  params = init_params(cfg, key)
  imgs = jax.random.normal(key, (b, sam.img_size, sam.img_size, 3), jnp.bfloat16)
  flops = b * encoder_matmul_flops(sam)
  for impl in ("cudnn",) if jax.default_backend() == "gpu" else ("xla",):
    model = EvfSam(cfg, attention_impl=impl, dtype=jnp.bfloat16)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=EvfSam.embed_image))
    for pdt in ("float32", "bfloat16"):
      pp = params if pdt == "float32" else jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
      t = timeit(fn, pp, imgs)
      log(f"encoder attention={impl} params {pdt}, batch {b}: {t * 1e3:.1f} ms, {b / t:.1f} img/s, "
          f"{flops / t / 1e12:.0f} TFLOP/s")

  # 4. Predictor end to end with cuDNN attention (BEiT-3's padding mask included).
  from evf_jax.predictor import Predictor
  from evf_jax.tokenizer import TextTokenizer
  tok = TextTokenizer(common.train_spm(tempfile.mkdtemp()))
  image = common.test_image()
  for prec, impl in (("bf16", "cudnn"), ("bf16", None)):
    pred = Predictor(cfg, params, tok, precision=prec, attention_impl=impl)
    try:
      for n in (1, 8):
        def run():
          pred.set_image(image)
          return pred.predict(common.PROMPTS[:n])
        run()
        t, _ = common.timed(run, 5, warmup=1)
        log(f"Predictor {prec} attention={impl}: {n} prompt(s) {t * 1e3:.1f} ms")
      t0 = time.perf_counter()
      for _ in range(5):
        pred.set_image(image)
      jax.block_until_ready(pred.image_embedding)
      log(f"  set_image alone: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms")
    except Exception as e:
      log(f"Predictor {prec} attention={impl}: FAILED {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
  main()
