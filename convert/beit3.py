"""torchscale BEiT-3 state dict -> Flax params of `evf_jax.beit3.Beit3`.

Sources accepted:
  - a torchscale `BEiT3` state dict (keys `text_embed.weight`, `encoder.layers.0...`), prefix "";
  - the official BEiT-3 checkpoints (`beit3_{base,large}_patch16_224.pth`): `{"model": {...}}`, which
    `convert.io.load_state_dict` unwraps, with the encoder under `beit3.`; prefix "beit3.";
  - EVF-SAM checkpoints, encoder under `mm_extractor.beit3.`; prefix "mm_extractor.beit3.".
  `prefix=None` picks whichever of these three the dict holds.

Keys outside `prefix` are not BEiT-3's and are left alone (SAM, the projector `text_hidden_fcs`, or the
task heads of fine-tuned BEiT-3 checkpoints such as `head.*`, `fc_norm.*`, `pooler.*`, which EVF-SAM's
`load_state_dict(strict=False)` also skipped). Under the prefix the engine is strict: every key must be
converted, every parameter filled, shapes must agree, and one `ConversionError` lists every problem.
`IGNORE` names the keys under the prefix that are dropped on purpose: none today (BEiT-3 has no
buffers, no output projection with `no_output_layer=True`, no relative-position tables).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from convert.rules import ConversionError, ConversionResult, Rule, convert, strip_prefix
from evf_jax.beit3.config import Beit3Config
from evf_jax.beit3.model import abstract_params

_L = r"encoder\.layers\.(\d+)\."
_T = r"encoder/layers_\1/"

RULES: list[Rule] = [
    Rule(r"text_embed\.weight", "text_embed/embedding"),
    Rule(r"vision_embed\.proj\.weight", "vision_embed/proj/kernel", "conv2d"),
    Rule(r"vision_embed\.proj\.bias", "vision_embed/proj/bias"),
    Rule(r"vision_embed\.(cls_token|mask_token)", r"vision_embed/\1"),
    Rule(r"encoder\.embed_positions\.(A|B)\.weight", r"encoder/embed_positions/\1/embedding"),
    # Multiway linears: torch (out, in) -> flax (in, out).
    Rule(_L + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(A|B)\.weight", _T + r"self_attn/\2/\3/kernel", "linear"),
    Rule(_L + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(A|B)\.bias", _T + r"self_attn/\2/\3/bias"),
    Rule(_L + r"ffn\.(A|B)\.(fc1|fc2)\.weight", _T + r"ffn/\2/\3/kernel", "linear"),
    Rule(_L + r"ffn\.(A|B)\.(fc1|fc2)\.bias", _T + r"ffn/\2/\3/bias"),
    # Multiway LayerNorms: weight -> scale.
    Rule(_L + r"self_attn\.inner_attn_ln\.(A|B)\.weight", _T + r"self_attn/inner_attn_ln/\2/scale"),
    Rule(_L + r"self_attn\.inner_attn_ln\.(A|B)\.bias", _T + r"self_attn/inner_attn_ln/\2/bias"),
    Rule(_L + r"(self_attn_layer_norm|final_layer_norm)\.(A|B)\.weight", _T + r"\2/\3/scale"),
    Rule(_L + r"(self_attn_layer_norm|final_layer_norm)\.(A|B)\.bias", _T + r"\2/\3/bias"),
    Rule(_L + r"ffn\.(A|B)\.ffn_layernorm\.weight", _T + r"ffn/\2/ffn_layernorm/scale"),
    Rule(_L + r"ffn\.(A|B)\.ffn_layernorm\.bias", _T + r"ffn/\2/ffn_layernorm/bias"),
    Rule(r"encoder\.layer_norm\.(A|B)\.weight", r"encoder/layer_norm/\1/scale"),
    Rule(r"encoder\.layer_norm\.(A|B)\.bias", r"encoder/layer_norm/\1/bias"),
]

IGNORE: tuple[str, ...] = ()

KNOWN_PREFIXES = ("", "beit3.", "mm_extractor.beit3.")


def detect_prefix(state_dict: Mapping[str, Any]) -> str:
  """The prefix under which `state_dict` holds a BEiT-3 encoder (one of KNOWN_PREFIXES)."""
  found = [p for p in KNOWN_PREFIXES if p + "text_embed.weight" in state_dict]
  if len(found) != 1:
    raise ConversionError(
        [f"expected exactly one BEiT-3 encoder (a 'text_embed.weight' key under one of "
         f"{list(KNOWN_PREFIXES)}), found {len(found)}: {found}"], "BEiT-3 checkpoint")
  return found[0]


def convert_beit3(state_dict: Mapping[str, np.ndarray], config: Beit3Config,
                  prefix: Optional[str] = "", dtype: Optional[Any] = None) -> ConversionResult:
  """Converts the BEiT-3 part of a torch state dict; returns `ConversionResult(params, mapping)`.

  Args:
    state_dict: flat {key: numpy array} (e.g. from `convert.io.load_state_dict`).
    config: the architecture to convert onto (see `infer_beit3_size` to pick one).
    prefix: where the encoder lives ("", "beit3.", "mm_extractor.beit3."); None: detect it.
    dtype: cast floating tensors to this dtype (default float32, the model's param dtype).
  Raises:
    ConversionError listing every problem at once.
  """
  if prefix is None:
    prefix = detect_prefix(state_dict)
  sub = strip_prefix(state_dict, prefix) if prefix else dict(state_dict)
  if not sub:
    raise ConversionError([f"no keys under prefix {prefix!r}"], "BEiT-3 checkpoint")
  return convert(sub, RULES, abstract_params(config), ignore=IGNORE, dtype=dtype,
                 what=f"BEiT-3 checkpoint (prefix {prefix!r})")


def infer_beit3_size(state_dict: Mapping[str, Any], prefix: Optional[str] = "") -> str:
  """'base' or 'large' from the embedding width and the layer count (a ConversionError otherwise)."""
  if prefix is None:
    prefix = detect_prefix(state_dict)
  key = prefix + "text_embed.weight"
  if key not in state_dict:
    raise ConversionError([f"{key!r} is missing: not a BEiT-3 checkpoint under prefix {prefix!r}"],
                          "BEiT-3 checkpoint")
  width = int(np.shape(state_dict[key])[1])
  rx = prefix + "encoder.layers."
  layers = {int(k[len(rx):].split(".", 1)[0]) for k in state_dict if k.startswith(rx)}
  depth = max(layers) + 1 if layers else 0
  for name in ("base", "large"):
    c = Beit3Config.preset(name)
    if (c.embed_dim, c.num_layers) == (width, depth):
      return name
  raise ConversionError([f"BEiT-3 with width {width} and {depth} layers is neither base (768, 12) "
                         f"nor large (1024, 24)"], "BEiT-3 checkpoint")
