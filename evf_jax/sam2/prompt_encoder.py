"""SAM-2's prompt encoder. Mirrors `sam2/modeling/sam/prompt_encoder.py`, which is SAM-1's with one change:
point labels 2 and 3 (box corners given as points, as SAM2Base passes boxes) add the corner embeddings
`point_embeddings_2` / `_3`. Everything else, EVF-SAM's `extra_sparse` text token included, is
`evf_jax.sam.prompt_encoder.PromptEncoder`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from evf_jax.sam import prompt_encoder as sam1


class PromptEncoder(sam1.PromptEncoder):
  """Points (labels -1 pad, 0 negative, 1 positive, 2 / 3 box top-left / bottom-right), boxes, masks and
  extra sparse tokens -> sparse (B, N, C) and dense (B, h, w, C) embeddings."""

  def _embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    emb = super()._embed_points(coords, labels, pad)
    if pad:  # the padding entry's label is -1: nothing to add there
      labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], axis=1)
    lab = labels.astype(jnp.int32)[..., None]
    emb = emb + jnp.where(lab == 2, self.point_embeddings_2.astype(jnp.float32), 0.0)
    return emb + jnp.where(lab == 3, self.point_embeddings_3.astype(jnp.float32), 0.0)
