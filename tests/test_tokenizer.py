"""TextTokenizer: XLM-R/fairseq ids over a sentencepiece model, on small models trained here.

Findings about transformers 5.x (`XLMRobertaTokenizer`, now backed by `tokenizers` and a Unigram model):
  - `XLMRobertaTokenizer(vocab_file=...)` builds a 5-token vocabulary (the specials only); loading
    with `from_pretrained(directory)` converts the sentencepiece model properly.
  - For a sentencepiece *unigram* model (XLM-R's own "sentencepiece.bpe.model" is one) its ids equal ours.
  - For a sentencepiece *BPE* model it segments differently (it scores BPE pieces as a unigram model),
    so it is not a faithful stand-in for the slow tokenizer EVF-SAM used. We use sentencepiece directly.
  - It turns literal "<s>", "</s>", "<mask>"... inside the text into special ids (as the slow tokenizer
    also did); we treat text as plain text (EVF-SAM prompts never contain these strings).
"""

from __future__ import annotations

import os
import random
import types
import warnings

import numpy as np
import pytest

from evf_jax import tokenizer as T

from evf_testing.spm_model import UNICODE, WORDS, train as _train  # noqa: F401


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp("spm_bpe")), "bpe")


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp("spm_unigram")), "unigram")


def varied_strings(n=240, seed=1) -> list[str]:
  rng = random.Random(seed)
  fixed = ["", " ", "   ", "\t", "\n", "[semantic]", "[semantic] ", "[semantic] the man on the left",
           "  leading spaces", "trailing spaces   ", "  both  ", "multiple    inner   spaces",
           "tabs\tand\nnewlines", "UPPER Case MiXeD", "123", "3.14159", "-42", "1,000,000", "#1 (left)",
           "a/b\\c", "quote's \"double\"", "!!!???", "...", "e-mail@example.com", "50%", "x<s>y".replace("<s>", "_"),
           "😀😀", "東京タワー", "the 2nd car, far-right!", "ﬁne ½ Ⅻ １２３"]
  out = list(fixed)
  punct = list(".,;:!?-()[]{}'\"/&%$#@*+=~`^|<>")
  while len(out) < n:
    parts = []
    for _ in range(rng.randint(0, 14)):
      r = rng.random()
      if r < 0.55:
        parts.append(rng.choice(WORDS))
      elif r < 0.7:
        parts.append(rng.choice(UNICODE))
      elif r < 0.85:
        parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
      else:
        parts.append("".join(rng.choice(punct) for _ in range(rng.randint(1, 3))))
    s = rng.choice([" ", "  ", "", " \t"]).join(parts)
    if rng.random() < 0.3:
      s = "[semantic] " + s
    if rng.random() < 0.2:
      s = rng.choice([" ", "   ", "\n"]) + s
    if rng.random() < 0.2:
      s = s + rng.choice([" ", "  ", "\t"])
    out.append(s)
  return out


def test_ids_are_sentencepiece_plus_offset(bpe_dir):
  import sentencepiece as spm
  tok = T.TextTokenizer(bpe_dir)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(bpe_dir, T.SPM_FILE))
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
  strings = varied_strings()
  assert len(strings) >= 200
  saw_unk = False
  for s in strings:
    ids = tok.encode(s)
    sp_ids = sp.encode(s)
    assert ids == [0] + [i + 1 if i != 0 else 3 for i in sp_ids] + [2], s
    assert ids[0] == 0 and ids[-1] == 2 and T.PAD_ID not in ids
    assert all(3 <= i < tok.mask_id for i in ids[1:-1]), s
    saw_unk |= 3 in ids
  assert saw_unk  # some characters (emoji, CJK) are outside the small model


def test_special_ids_and_sizes(bpe_dir):
  tok = T.TextTokenizer(bpe_dir)
  assert tok.encode("") == [0, 2]
  assert tok.mask_id == len(tok.sp) + 1
  assert tok.vocab_size == len(tok.sp) + 2
  assert tok.pad_id == 1
  # "[semantic]" is ordinary text: the same ids as its pieces, no special id inside.
  ids = tok.encode("[semantic] dog")
  assert ids[1:-1] == [tok.sp.piece_to_id(p) + 1 for p in tok.pieces("[semantic] dog")]


def test_paths_and_errors(bpe_dir, tmp_path):
  a = T.TextTokenizer(bpe_dir).encode("red car")
  b = T.TextTokenizer(os.path.join(bpe_dir, T.SPM_FILE)).encode("red car")
  assert a == b
  with pytest.raises(T.TokenizerError, match="no sentencepiece model"):
    T.TextTokenizer(str(tmp_path))
  bad = tmp_path / "broken.model"
  bad.write_bytes(b"not a proto")
  with pytest.raises(T.TokenizerError, match="not a sentencepiece model"):
    T.TextTokenizer(str(bad))


def test_blank_prompts_are_those_the_tokenizer_drops_entirely(bpe_dir):
  """`is_blank` (what predict, the video predictor and the demo refuse or skip): every prompt the tokenizer encodes
  as "<s></s>" (whitespace, zero-width spaces, byte-order marks), and invisible joiners it keeps as an unknown
  piece; a prompt with one visible character is not blank."""
  from evf_jax.predictor import PromptError, encode_prompts
  tok = T.TextTokenizer(bpe_dir)
  dropped = ["", " \t\n", "\u200b", "\u200b \u200b", "\ufeff", "\u00a0\u3000"]
  assert all(tok.encode(t) == [T.BOS_ID, T.EOS_ID] and T.is_blank(t) for t in dropped)
  assert T.is_blank("\u200d\u2060") and tok.encode("\u200d\u2060") != [T.BOS_ID, T.EOS_ID]
  for text in ("a", "\u200bcar", "red\u200b"):
    assert not T.is_blank(text) and len(tok.encode(text)) > 2, repr(text)
  with pytest.raises(PromptError, match="prompt 1 is empty or whitespace-only"):
    encode_prompts(tok, ["car", "\u200b"])  # what Predictor.predict checks prompts with
  # Text the tokenizer drops though it is not blank: control characters.
  assert not T.is_blank("\x01\x02") and tok.encode("\x01\x02") == [T.BOS_ID, T.EOS_ID]
  with pytest.raises(PromptError, match="prompt 0 has no text the tokenizer keeps"):
    encode_prompts(tok, ["\x01\x02"])


def test_the_semantic_tag_alone_is_no_prompt():
  """"[semantic]" names no class: refused (the model would segment whatever the bare tag suggests to it); with
  a class after it, or as part of other text, it is a prompt."""
  from evf_jax.predictor import PromptError, encode_prompts
  for text in ("[semantic]", " [semantic]\u200b ", "\t[semantic]\n"):
    assert T.prompt_problem(text).startswith("is only the [semantic] tag"), repr(text)
  for text in ("[semantic] sky", "[semantic]sky", "the [semantic] tag", "[Semantic]"):
    assert T.prompt_problem(text) is None, repr(text)
  assert T.prompt_problem(" ") == "is empty or whitespace-only"
  with pytest.raises(PromptError, match=r"prompt 0 is only the \[semantic\] tag: name what to segment after it"):
    encode_prompts(None, ["[semantic] ", "car"])  # refused before the tokenizer is used


def test_encode_batch_buckets_and_padding(bpe_dir):
  tok = T.TextTokenizer(bpe_dir)
  texts = ["dog", "[semantic] the man on the left", ""]
  ids, mask = tok.encode_batch(texts)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  assert ids.shape == (3, 16)
  for i, t in enumerate(texts):
    enc = tok.encode(t)
    np.testing.assert_array_equal(ids[i, :len(enc)], enc)
    assert (ids[i, len(enc):] == 1).all()
    np.testing.assert_array_equal(mask[i], np.arange(16) < len(enc))
  np.testing.assert_array_equal(mask, ids != 1)  # EVF-SAM's attention_masks = input_ids != 1
  long = " ".join(["umbrella"] * 12)
  assert tok.encode_batch(["dog", long])[0].shape[1] == (16 if len(tok.encode(long)) <= 16 else 32)
  assert tok.encode_batch(["dog"] * 2, buckets=None, max_text_len=24)[0].shape == (2, 24)
  assert tok.encode_batch(["dog"], buckets=(8, 40))[0].shape == (1, 8)
  assert tok.encode_batch([])[0].shape == (0, 16)


def test_a_prompt_as_long_as_a_bucket_stays_in_it(bpe_dir):
  """The smallest bucket that fits: 16 ids pad to 16, 17 to 32, 32 to 32 (not the next bucket up)."""
  tok = T.TextTokenizer(bpe_dir)
  texts = [prefix + " ".join(["dog"] * k) for k in range(1, 40) for prefix in ("", "a ")]
  by_length = {len(tok.encode(t)): t for t in texts}
  for n, width in ((16, 16), (17, 32), (32, 32)):
    assert tok.encode_batch(["dog", by_length[n]])[0].shape == (2, width), n
  with pytest.raises(ValueError, match="max_text_len must be >= 3"):  # <s></s> alone: no text left
    tok.encode_batch(["dog"], max_text_len=2)


def test_a_tokenizer_fits_a_model_up_to_its_last_row_and_position():
  model = types.SimpleNamespace(vocab_size=100, max_text_len=64)
  T.check_fits_model(types.SimpleNamespace(vocab_size=100, max_text_len=64), model)
  for vocab, length, expect in ((101, 64, "has 101 ids, more than this model's 100"),
                                (100, 65, "max_text_len 65 exceeds this model's 64 text positions")):
    with pytest.raises(T.UserError, match=expect):
      T.check_fits_model(types.SimpleNamespace(vocab_size=vocab, max_text_len=length), model)


def test_truncation_keeps_eos_and_warns(bpe_dir):
  tok = T.TextTokenizer(bpe_dir, max_text_len=10)
  long = "the man on the left sitting with a red umbrella holding a blue dog"
  full = tok.encode(long)
  assert len(full) > 10
  with pytest.warns(UserWarning, match="prompt 1 has"):
    ids, mask = tok.encode_batch(["dog", long])
  assert ids.shape == (2, 10)
  np.testing.assert_array_equal(ids[1], full[:9] + [2])
  assert mask[1].all()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tok.encode_batch(["dog", long], max_text_len=64)  # a per-call cap overrides the tokenizer's


def test_matches_transformers_on_unigram(unigram_dir):
  """transformers 5's XLMRobertaTokenizer (from a directory) agrees with us on a unigram spm."""
  transformers = pytest.importorskip("transformers")
  try:
    hf = transformers.XLMRobertaTokenizer.from_pretrained(unigram_dir)
  except Exception as e:  # pragma: no cover - depends on the installed transformers
    pytest.skip(f"transformers cannot load the test model: {e}")
  tok = T.TextTokenizer(unigram_dir)
  assert len(hf) == tok.vocab_size and hf.mask_token_id == tok.mask_id
  assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
  for s in varied_strings():
    assert hf(s)["input_ids"] == tok.encode(s), repr(s)
