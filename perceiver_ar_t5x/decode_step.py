"""The one-token decoding step's pieces: cache attention, in-place cache writes, and
Block's layer math on weights laid out once per decode for matrix-vector products.

Why the layout. At batch 1 a step is a chain of about forty small matrix-vector
products, and on XLA CPU each product pays a fixed cost on top of streaming its
weights (measured here on a 2-core EPYC: a [512, 512] product streams at ~17 GB/s,
a [512, 1536] one at ~30 GB/s). `StepWeights` therefore concatenates the query,
key and value kernels (query pre-scaled by head_dim**-0.5, as
Attention.project_query scales it) into one [embed, 3 * heads * head_dim] matrix
and wi_0 | wi_1 into one [embed, 2 * mlp] matrix, and flattens the output
projection to [heads * head_dim, embed] so that no weight is transposed inside the
loop. The layer math is Block.__call__'s, term by term (norms, rotary and gelu are
the modules' own); tests/test_decode_cache.py checks the result against the full
forward pass.

Cache layout: keys and values are both [batch * heads, head_dim, keys]. The value
product then contracts the minor (contiguous) axis of both operands; with values
as [.., keys, head_dim] it read a 67 MB layer-0 cache at ~13 GB/s instead of ~45.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import masks
from perceiver_ar_t5x.layers import rotary
from perceiver_ar_t5x.perceiver_ar import Block


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
           k_pos: jax.Array) -> jax.Array:
  """q [b, q, heads, d] (scaled, rotated), k and v [b * heads, d, keys] -> [b, q, heads, d].

  The masked softmax of attention.dot_product_attention on the cache layout.
  """
  b, length, heads, d = q.shape
  q = q.transpose(0, 2, 1, 3).reshape(b * heads, length, d)
  logits = jnp.einsum("nqd,ndk->nqk", q, k, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, heads, length, -1)
  logits = logits + masks.mask_to_bias(masks.attention_mask(q_pos, k_pos))
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b * heads, length, -1)
  out = jnp.einsum("nqk,ndk->nqd", weights, v)
  return out.reshape(b, heads, length, d).transpose(0, 2, 1, 3)


def write_column(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes example b's heads new[b*h:(b+1)*h] ([.., d, 1]) at key index[b] of the cache.

  One dynamic_update_slice per example: XLA updates those in place, where a
  scatter is expanded (on CPU) into a loop that copies the whole cache.
  """
  heads = cache.shape[0] // index.shape[0]
  for b in range(index.shape[0]):
    piece = new[b * heads:(b + 1) * heads].astype(cache.dtype)
    cache = jax.lax.dynamic_update_slice(cache, piece, (b * heads, 0, index[b]))
  return cache


@flax.struct.dataclass
class LayerWeights:
  """One Block's kernels for one-token steps (module dtype)."""

  qkv: jax.Array  # [embed, 3 * heads * head_dim]: query * head_dim**-0.5 | key | value
  out: jax.Array  # [heads * head_dim, embed]
  mlp_in: jax.Array  # [embed, 2 * mlp]: wi_0 | wi_1
  mlp_out: jax.Array  # [mlp, embed]


def layer_weights(blk: Block, params: Any) -> LayerWeights:
  """Lays out one block's params (`params` = that block's own tree) for steps."""
  p = nn.unbox(params)
  att, mlp, dtype = p["attention"], p["mlp"], blk.dtype
  embed = att["query"].shape[0]
  query = att["query"].astype(dtype) * (blk.head_dim ** -0.5)  # as project_query scales it
  qkv = jnp.concatenate([query, att["key"].astype(dtype), att["value"].astype(dtype)], axis=1)
  return LayerWeights(
      qkv=qkv.reshape(embed, -1), out=att["out"].astype(dtype).reshape(-1, embed),
      mlp_in=jnp.concatenate([mlp["wi_0"], mlp["wi_1"]], axis=1).astype(dtype),
      mlp_out=mlp["wo"].astype(dtype))


def _rotate(blk: Block, x: jax.Array, pos: jax.Array) -> jax.Array:
  """x [b, heads, d] at positions pos [b]: the rotary of Attention (None = none)."""
  fraction = blk.attention.rotary_fraction
  if fraction is None:
    return x
  return rotary.apply_rotary(x[:, None], pos[:, None], fraction=fraction,
                             max_timescale=blk.attention.max_timescale)[:, 0]


def step_layer(blk: Block, w: LayerWeights, x: jax.Array, pos: jax.Array, ck: jax.Array,
               cv: jax.Array, slot: jax.Array, k_pos: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One block on one new row per example: Block.__call__ with the row's key/value cached.

  x [b, embed] at positions pos [b]; ck, cv [b * heads, d, keys] get the new key/value
  at key index slot [b]; k_pos [b or 1, keys] are the cached keys' positions.
  Returns (x [b, embed], ck, cv).
  """
  b, heads, d = x.shape[0], blk.num_heads, blk.head_dim
  dtype = blk.dtype
  y = blk.pre_attention_norm(x).astype(dtype)
  qkv = (y @ w.qkv).reshape(b, 3, heads, d)
  q, k = _rotate(blk, qkv[:, 0], pos), _rotate(blk, qkv[:, 1], pos)
  ck = write_column(ck, k.reshape(b * heads, d, 1), slot)
  cv = write_column(cv, qkv[:, 2].reshape(b * heads, d, 1), slot)
  attended = attend(q[:, None], ck, cv, pos[:, None], k_pos)  # [b, 1, heads, d]
  x = x + attended.reshape(b, heads * d).astype(dtype) @ w.out
  h = blk.pre_mlp_norm(x).astype(dtype) @ w.mlp_in
  mlp = blk.mlp.mlp_dim
  return x + (nn.gelu(h[:, :mlp]) * h[:, mlp:]) @ w.mlp_out, ck, cv
