"""Shape buckets: jitted programs see a few padded shapes instead of one per input, so new inputs of a known
bucket do not recompile. One definition for the predictor, the evaluator and the tokenizer."""

from __future__ import annotations

# Original image sizes are padded up to a multiple of this for the mask postprocess (and the evaluator's
# ground-truth masks).
SIZE_MULTIPLE = 128
# Token lengths a batch of prompts is padded to (the smallest that fits its longest prompt).
TEXT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pow2_at_least(n: int) -> int:
  """The prompt-count bucket: the smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, (n - 1).bit_length())
