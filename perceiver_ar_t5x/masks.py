"""Attention masks built from positions, never from array indices.

Perceiver AR's queries (latents) and keys (the whole, possibly prefix-dropped,
input) live at different array offsets, so "causal" has to be stated in terms of
true sequence positions: query at position p may see key at position q iff
q <= p (paper, Sec. 3.1) and, for packed batches, both belong to the same segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e10  # finite, so fully masked rows give a uniform (not NaN) softmax


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None = None,
                   k_seg: jax.Array | None = None) -> jax.Array:
  """Boolean mask [batch, 1, q_len, k_len]: True where the query may attend.

  Args:
    q_pos: [batch, q_len] positions of the queries.
    k_pos: [batch, k_len] positions of the keys.
    q_seg: optional [batch, q_len] segment ids (packed examples).
    k_seg: optional [batch, k_len] segment ids.
  """
  mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [batch, q_len, k_len]
  if q_seg is not None and k_seg is not None:
    mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
  return mask[:, None, :, :]


def mask_to_bias(mask: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """0 where attending is allowed, a large negative number elsewhere."""
  return jnp.where(mask, 0.0, NEG_INF).astype(dtype)
