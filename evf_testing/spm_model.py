"""A small sentencepiece model trained on a generated corpus, for tests and benchmarks (the real
`sentencepiece.bpe.model` ships with EVF-SAM checkpoints and cannot be downloaded here)."""

from __future__ import annotations

import os
import random

WORDS = ("the a man woman left right red blue car dog cat on of with sitting standing person tree sky "
         "building semantic second from far small big green yellow shirt holding umbrella").split()
UNICODE = ["café", "naïve", "東京", "ñandú", "Ελλάδα", "щука", "مرحبا", "😀", "é", "ﬁ", "Ⅻ", "１２３", "€", "½"]


def corpus(seed=0) -> list[str]:
  rng = random.Random(seed)
  letters = "abcdefghijklmnopqrstuvwxyz"
  lines = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(1500)]
  lines += [" ".join(rng.choice(WORDS + UNICODE[:6]) for _ in range(rng.randint(1, 12)))
            + rng.choice(["", ".", ",", "!", "?", " 42", " [semantic]"]) for _ in range(2500)]
  return lines


def train(directory: str, model_type: str = "bpe") -> str:
  import sentencepiece as spm
  os.makedirs(directory, exist_ok=True)
  corpus_file = os.path.join(directory, "corpus.txt")
  with open(corpus_file, "w", encoding="utf-8") as f:
    f.write("\n".join(corpus()))
  # sentencepiece's defaults are XLM-R's: <unk>=0, <s>=1, </s>=2, no pad piece.
  spm.SentencePieceTrainer.train(
      input=corpus_file, model_prefix=os.path.join(directory, "sentencepiece.bpe"), vocab_size=300,
      model_type=model_type, character_coverage=0.9995, num_threads=1, hard_vocab_limit=False,
      minloglevel=2)
  return directory


