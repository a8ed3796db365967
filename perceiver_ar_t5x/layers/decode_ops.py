"""Primitives of the one-token decoding step: matrix-vector products on split weights,
in-place cache writes, and attention over the cache layout. No layer math lives here:
Block.step (layers/block.py) composes these with its own norms, projections and MLP.

Why split weights. At batch 1 a step is a chain of about thirty matrix-vector
products, and XLA CPU runs each [1, k] x [k, n] product on one thread (one core's
read bandwidth: ~22 of the machine's ~31 GB/s on a 2-core EPYC) and pays a fixed
cost per product on top. So the step's weights (Block.step_weights, made once per
decode) are fused (query | key | value, wi_0 | wi_1) into fewer, larger products,
the output projection is flattened to [heads * head_dim, embed] so nothing is
transposed inside the loop, and every matrix is stored [splits, k / splits, n]
(a free reshape; k zero-padded to a multiple of splits): the product becomes a
batched dot over the splits, which XLA runs on all cores, plus a sum of `splits`
partial results. With splits = 2 a 76 MB chain of products streams at ~33 GB/s
instead of ~23. Splitting only changes the order of the float additions. At
larger batches the plain product is faster (weights are reused across rows), so
`matvec` uses the split only for batch 1.

Cache layout: keys and values are both [batch * heads, head_dim, keys]. The value
product then contracts the minor (contiguous) axis of both operands; with values
as [.., keys, head_dim] it read a 67 MB layer-0 cache at ~13 GB/s instead of ~45.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from perceiver_ar_t5x import masks


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
           k_pos: jax.Array) -> jax.Array:
  """q [b, q, heads, d] (scaled, rotated), k and v [b * heads, d, keys] -> [b, q, heads, d].

  The masked softmax of attention.dot_product_attention on the cache layout.
  """
  return attend_segments(q, [(k, v, k_pos)], q_pos)


def attend_segments(q: jax.Array, segments: list[tuple[jax.Array, jax.Array, jax.Array]],
                    q_pos: jax.Array) -> jax.Array:
  """One softmax over the keys of several caches: segments of (k, v [b * heads, d, keys_i],
  k_pos [b or 1, keys_i]); a key at position > its query's is masked (pass a large
  position to hide a cached key). -> [b, q, heads, d]
  """
  b, length, heads, d = q.shape
  q = q.transpose(0, 2, 1, 3).reshape(b * heads, length, d)
  logits = []
  for k, _, k_pos in segments:
    scores = jnp.einsum("nqd,ndk->nqk", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, heads, length, -1)
    logits.append(scores + masks.mask_to_bias(masks.attention_mask(q_pos, k_pos)))
  weights = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  out, start = None, 0
  for (_, v, _), scores in zip(segments, logits, strict=True):
    size = scores.shape[-1]
    w = weights[..., start:start + size].astype(v.dtype).reshape(b * heads, length, size)
    part = jnp.einsum("nqk,ndk->nqd", w, v)
    out, start = part if out is None else out + part, start + size
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


def split_rows(w: jax.Array, splits: int) -> jax.Array:
  """[k, n] -> [splits, ceil(k / splits), n], zero rows appended."""
  k = w.shape[0]
  w = jnp.pad(w, ((0, -k % splits), (0, 0)))
  return w.reshape(splits, -1, w.shape[1])


def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [b, k] times a split weight [splits, k', n] (k' * splits >= k, zero rows) -> [b, n]."""
  splits, rows, n = w.shape
  b = x.shape[0]
  x = jnp.pad(x, ((0, 0), (0, splits * rows - x.shape[1])))
  if b > 1 or splits == 1:  # weights are reused across rows: the plain product is faster
    return x @ w.reshape(splits * rows, n)
  parts = jnp.einsum("sbk,skn->sbn", x.reshape(b, splits, rows).transpose(1, 0, 2), w)
  return jnp.sum(parts, axis=0)
