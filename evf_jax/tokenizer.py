"""The text tokenizer of EVF-SAM: XLM-R ids over BEiT-3's sentencepiece model, without transformers.

EVF-SAM loads `XLMRobertaTokenizer` (the slow, sentencepiece one) from its checkpoint directory, whose
`sentencepiece.bpe.model` is BEiT-3's spm. That tokenizer uses fairseq's id layout:

  `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; a sentencepiece piece id i > 0 becomes i + 1 (the fairseq
  offset); sentencepiece's own id 0 (its `<unk>`) becomes 3; `<mask>` = len(spm) + 1.

and encodes a prompt as `[<s>] + pieces + [</s>]`. This module reproduces that with the
sentencepiece library directly. Text is always plain text: "[semantic]" is split into ordinary pieces,
and, unlike transformers, a literal "<s>" / "</s>" / "<pad>" / "<unk>" / "<mask>" inside a prompt is
not turned into a special id (EVF-SAM prompts never contain them).

Batches are right-padded with `<pad>` to a static length bucket, so a jitted model sees few shapes.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import sentencepiece as spm

from evf_jax import buckets as shape_buckets
from evf_jax import storage
from evf_jax.errors import UserError

SPM_FILE = "sentencepiece.bpe.model"

BOS_ID = 0   # <s>, also CLS
PAD_ID = 1   # <pad>
EOS_ID = 2   # </s>, also SEP
UNK_ID = 3   # <unk>
FAIRSEQ_OFFSET = 1

# BEiT-3's text positions: max_source_positions 1024 minus the fairseq offset 2.
MAX_TEXT_LEN = 1022
# The shortest cap that keeps text: <s>, one token, </s> (at 2 every prompt would be truncated to no text).
MIN_TEXT_LEN = 3


# The multitask models' prefix for semantic-level prompts ("[semantic] sky": every region of the class).
SEMANTIC_TAG = "[semantic]"


def _visible(text: str) -> str:
  return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def is_blank(text: str) -> bool:
  """True when `text` holds nothing but whitespace and invisible format characters (zero-width spaces, byte-order
  marks, joiners: Unicode category Cf). `str.strip` keeps the latter, yet such a prompt says nothing: the
  tokenizer turns it into "<s></s>" (zero-width spaces, marks) or an unknown piece (joiners)."""
  return not _visible(text)


def prompt_problem(text: str) -> Optional[str]:
  """Why `text` is no prompt (to follow "prompt N "), or None: blank (`is_blank`), or the semantic tag with
  nothing after it, which names no class to segment; or not UTF-8 (bytes a command line could not decode, held
  as surrogates, which sentencepiece cannot read)."""
  if is_blank(text):
    return "is empty or whitespace-only"
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return "is not valid UTF-8 text"
  if _visible(text) == SEMANTIC_TAG:
    return f"is only the {SEMANTIC_TAG} tag: name what to segment after it, e.g. '{SEMANTIC_TAG} sky'"
  return None


def check_prompts(prompts: Sequence[str], name: Callable[[int], str], error: type[Exception] = UserError) -> None:
  """`error` "<name(i)> <problem>" for the first of `prompts` that is no str or that `prompt_problem` refuses."""
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise error(f"{name(i)} is a {type(p).__name__}, not a str")
    problem = prompt_problem(p)
    if problem:
      raise error(f"{name(i)} {problem}")


def truncate_ids(ids: Sequence[int], max_text_len: int) -> list[int]:
  """`ids` cut to `max_text_len`, keeping the final id (`</s>`: BEiT-3 saw it at the end of every prompt)."""
  ids = list(ids)
  return ids if len(ids) <= max_text_len else ids[:max_text_len - 1] + ids[-1:]


class TokenizerError(UserError, ValueError):
  """The sentencepiece model is missing or not usable."""


def check_fits_model(tokenizer, beit3_config, error: type[Exception] = UserError, lengths: bool = True) -> None:
  """`error` unless every id `tokenizer` gives has a row in BEiT-3's embedding table (jax's gather reads an id past
  the table as NaN: NaN scores and empty masks, no error) and, with `lengths`, its longest prompt fits the text
  positions (training cuts prompts to its own data.max_text_len instead)."""
  vocab, positions = beit3_config.vocab_size, beit3_config.max_text_len
  if tokenizer.vocab_size > vocab:
    raise error(f"the tokenizer has {tokenizer.vocab_size} ids, more than this model's {vocab} (BEiT-3's "
                "vocab_size): another model's tokenizer?")
  if lengths and getattr(tokenizer, "max_text_len", 2) > positions:  # a longer prompt would fail inside BEiT-3's trace
    raise error(f"the tokenizer's max_text_len {tokenizer.max_text_len} exceeds this model's {positions} text "
                "positions")


class TextTokenizer:
  """XLM-R-style ids from a sentencepiece model (EVF-SAM's `XLMRobertaTokenizer`, slow version).

  Args:
    path: a directory containing `sentencepiece.bpe.model`, or the path of a `.model` file (either may be a
      gs:// URL: the file is downloaded, as sentencepiece reads local files only).
    max_text_len: the longest encoded prompt (special tokens included) `encode_batch` produces by
      default; longer prompts are truncated with a warning. The default is BEiT-3's limit (1022),
      so nothing the reference could run is cut.
  """

  def __init__(self, path: str, max_text_len: int = MAX_TEXT_LEN):
    if storage.is_url(path):
      remote = storage.path(storage.resolve(path, "tokenizer"))
      remote = remote / SPM_FILE if remote.is_dir() else remote
      model_file = storage.local_copy(remote) if remote.is_file() else str(remote)
    else:
      model_file = os.path.join(path, SPM_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(model_file):
      raise TokenizerError(f"{path}: no sentencepiece model (expected a .model file or a directory "
                           f"containing {SPM_FILE})")
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(model_file)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad proto
      raise TokenizerError(f"{model_file}: not a sentencepiece model ({e})") from e
    if self.sp.unk_id() != 0:
      raise TokenizerError(f"{model_file}: sentencepiece <unk> has id {self.sp.unk_id()}; the XLM-R id "
                           "mapping needs it at 0 (with <s>=1, </s>=2)")
    if max_text_len < MIN_TEXT_LEN:
      raise ValueError(f"max_text_len must be >= {MIN_TEXT_LEN} (<s>, a token and </s>), got {max_text_len}")
    self.model_file = model_file
    self.max_text_len = max_text_len

  # Ids.
  @property
  def mask_id(self) -> int:
    return len(self.sp) + FAIRSEQ_OFFSET

  @property
  def vocab_size(self) -> int:
    """Ids in use, `<mask>` included (the BEiT-3 embedding table may be larger: 64010)."""
    return len(self.sp) + FAIRSEQ_OFFSET + 1

  @property
  def pad_id(self) -> int:
    return PAD_ID

  def pieces(self, text: str) -> list[str]:
    return self.sp.EncodeAsPieces(text)

  def encode(self, text: str) -> list[int]:
    """`[0] + pieces + [2]`, every sentencepiece id shifted by the fairseq offset (its unk -> 3)."""
    ids = self.sp.EncodeAsIds(text)
    return [BOS_ID] + [i + FAIRSEQ_OFFSET if i else UNK_ID for i in ids] + [EOS_ID]

  def encode_batch(self, texts: Sequence[str], max_text_len: Optional[int] = None,
                   buckets: Optional[Sequence[int]] = shape_buckets.TEXT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and right-pads prompts to one static length.

    The length is the smallest of `buckets` that fits the longest prompt, capped at `max_text_len`
    (default: the tokenizer's); `buckets=None` always pads to `max_text_len`. A prompt longer than the
    cap keeps its first `max_text_len - 1` ids and its final `</s>`, and a warning names it.

    Returns:
      input_ids: int32 (N, L), padded with `<pad>` (1).
      attention_mask: bool (N, L), True at real tokens (EVF-SAM's `input_ids != 1`; the model's
        `text_padding_mask` is its negation).
    """
    cap = self.max_text_len if max_text_len is None else int(max_text_len)
    if cap < MIN_TEXT_LEN:
      raise ValueError(f"max_text_len must be >= {MIN_TEXT_LEN} (<s>, a token and </s>), got {cap}")
    encoded = [self.encode(t) for t in texts]
    for i, ids in enumerate(encoded):
      if len(ids) > cap:
        warnings.warn(f"prompt {i} has {len(ids)} tokens, more than max_text_len={cap}; truncated to "
                      f"{cap} (keeping the final </s>): {texts[i][:60]!r}", stacklevel=2)
        encoded[i] = truncate_ids(ids, cap)
    longest = max((len(ids) for ids in encoded), default=0)
    if buckets is None:
      length = cap
    else:
      length = min([b for b in sorted(buckets) if b >= longest] or [cap])
      length = min(length, cap)
    input_ids = np.full((len(encoded), length), PAD_ID, np.int32)
    for i, ids in enumerate(encoded):
      input_ids[i, :len(ids)] = ids
    attention_mask = np.zeros((len(encoded), length), bool)
    for i, ids in enumerate(encoded):
      attention_mask[i, :len(ids)] = True
    return input_ids, attention_mask
