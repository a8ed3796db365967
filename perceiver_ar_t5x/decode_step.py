"""The one-token decoding step's pieces: cache attention, in-place cache writes, and
Block's layer math on weights laid out once per decode for matrix-vector products.

Why the layout. At batch 1 a step is a chain of about thirty matrix-vector
products, and XLA CPU runs each [1, k] x [k, n] product on one thread (one core's
read bandwidth: ~22 of the machine's ~31 GB/s on a 2-core EPYC) and pays a fixed
cost per product on top. So `LayerWeights` (made once per decode):
  * concatenates the query, key and value kernels (query pre-scaled by
    head_dim**-0.5, as Attention.project_query scales it) into one matrix, and
    wi_0 | wi_1 into one: fewer, larger products;
  * flattens the output projection to [heads * head_dim, embed], so no weight is
    transposed inside the loop;
  * stores every matrix [splits, k / splits, n] (a free reshape; k zero-padded to
    a multiple of splits): the product becomes a batched dot over the splits,
    which XLA runs on all cores, plus a sum of `splits` partial results. With
    splits = 2 a 76 MB chain of products streams at ~33 GB/s instead of ~23.
Splitting only changes the order of the float additions. At larger batches the
plain product is faster (weights are reused across rows), so `matvec` uses the
split only for batch 1. The layer math is Block.__call__'s, term by term (norms,
rotary and gelu are the modules' own); tests/test_decode_cache.py checks the
result against the full forward pass.

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
  """One Block's kernels for one-token steps (module dtype), each [splits, k / splits, n]."""

  qkv: jax.Array  # k = embed, n = 3 * heads * head_dim: query * head_dim**-0.5 | key | value
  out: jax.Array  # k = heads * head_dim, n = embed
  mlp_in: jax.Array  # k = embed, n = 2 * mlp: wi_0 | wi_1
  mlp_out: jax.Array  # k = mlp (zero-padded to a multiple of splits), n = embed


def _split(w: jax.Array, splits: int) -> jax.Array:
  """[k, n] -> [splits, ceil(k / splits), n], zero rows appended."""
  k = w.shape[0]
  w = jnp.pad(w, ((0, -k % splits), (0, 0)))
  return w.reshape(splits, -1, w.shape[1])


def layer_weights(blk: Block, params: Any, splits: int) -> LayerWeights:
  """Lays out one block's params (`params` = that block's own tree) for steps."""
  p = nn.unbox(params)
  att, mlp, dtype = p["attention"], p["mlp"], blk.dtype
  embed = att["query"].shape[0]
  query = (att["query"] * blk.head_dim ** -0.5).astype(dtype)  # as project_query scales it
  qkv = jnp.concatenate([query, att["key"].astype(dtype), att["value"].astype(dtype)], axis=1)
  mlp_in = jnp.concatenate([mlp["wi_0"], mlp["wi_1"]], axis=1).astype(dtype)
  return LayerWeights(
      qkv=_split(qkv.reshape(embed, -1), splits),
      out=_split(att["out"].astype(dtype).reshape(-1, embed), splits),
      mlp_in=_split(mlp_in, splits), mlp_out=_split(mlp["wo"].astype(dtype), splits))


def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [b, k] times a split weight [splits, k', n] (k' * splits >= k, zero rows) -> [b, n]."""
  splits, rows, n = w.shape
  b = x.shape[0]
  x = jnp.pad(x, ((0, 0), (0, splits * rows - x.shape[1])))
  if b > 1 or splits == 1:  # weights are reused across rows: the plain product is faster
    return x @ w.reshape(splits * rows, n)
  parts = jnp.einsum("sbk,skn->sbn", x.reshape(b, splits, rows).transpose(1, 0, 2), w)
  return jnp.sum(parts, axis=0)


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
  qkv = matvec(y, w.qkv).reshape(b, 3, heads, d)
  q, k = _rotate(blk, qkv[:, 0], pos), _rotate(blk, qkv[:, 1], pos)
  ck = write_column(ck, k.reshape(b * heads, d, 1), slot)
  cv = write_column(cv, qkv[:, 2].reshape(b * heads, d, 1), slot)
  attended = attend(q[:, None], ck, cv, pos[:, None], k_pos)  # [b, 1, heads, d]
  x = x + matvec(attended.reshape(b, heads * d).astype(dtype), w.out)
  h = matvec(blk.pre_mlp_norm(x).astype(dtype), w.mlp_in)
  mlp = blk.mlp.mlp_dim
  return x + matvec(nn.gelu(h[:, :mlp]) * h[:, mlp:], w.mlp_out), ck, cv
