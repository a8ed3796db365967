"""Exact cached Perceiver AR decoding: the cache and the cached forward pass.

What is cached, per example:
  * layer 0: keys/values of every input position, keys stored already rotated;
    a new token adds one column/row and never touches the others.
  * latent layers 1..L-1: keys/values of the current latent window.
Keys and values are both laid out [batch * heads, head_dim, keys] (example-major):
the layout XLA's batched matrix-vector products read as it is, contracting the
contiguous axis, so a step writes its new column in place and reads each cache
once, instead of transposing or copying it (layers/decode_ops.py has the numbers).

Why the window is anchored. A latent's hidden state depends on where its window
starts (it attends to the latents before it in the window), so a window that
slides one position per step would make every cached latent key stale; rolling
old slots off and keeping the rest (as krasserm's perceiver-io does) yields
logits the model never computes. Here each example's window is anchored at
`window_start` s and grows by one position per step, so the logits at position
p equal the full forward pass with `latent_starts = s` (row p - s) exactly.
When an example's window is full it alone is reset (paper, Sec. 3.4 keeps half
the latents): the window restarts at s = p + 1 - fill and its latent stack is
recomputed for those `fill` rows from the cached layer-0 keys/values.
fill = num_latents resets every step: the window then always ends at the
predicted position (the uncached reference, at full price).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from perceiver_ar_t5x.layers.block import Block, CrossKvNorm, StepWeights
from perceiver_ar_t5x.layers.decode_ops import attend, attend_segments
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

_ROW_CHUNK = 128  # layer-0 query rows per chunk when a reset attends to a long context


@flax.struct.dataclass
class DecodeCache:
  """Per-example decoding state; every array has the batch on its first axis (latents: each)."""

  tokens: jax.Array  # [batch, length] decoder inputs (position 0 = BOS 0)
  position: jax.Array  # [batch] the position whose logits were computed last
  window_start: jax.Array  # [batch] first position of the latent window
  layer0_k: jax.Array  # [batch * heads, head_dim, length], rotated
  layer0_v: jax.Array  # [batch * heads, head_dim, length]
  latent_k: tuple[jax.Array, ...]  # per latent layer [batch * heads, head_dim, latents]
  latent_v: tuple[jax.Array, ...]  # per latent layer [batch * heads, head_dim, latents]
  # CrossKvNorm.PREFIX only: layer 0's keys/values of the window's rows, made from the
  # query rows' norm (layer0_k/v hold every position's prefix-norm keys/values)
  window0_k: jax.Array | None = None  # [batch * heads, head_dim, latents]
  window0_v: jax.Array | None = None


_HIDDEN = 2 ** 30  # a key position no query reaches: hides a cached key


def _key_values(blk: Block, y: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normed rows [b, r, embed] -> rotated keys and values, each [b * heads, d, r]."""
  k, v = blk.attention.project_key_value(y, pos)  # [b, r, heads, d]
  b, r, heads, d = k.shape
  return (k.transpose(0, 2, 3, 1).reshape(b * heads, d, r),
          v.transpose(0, 2, 3, 1).reshape(b * heads, d, r))


def _rows_over_cache(blk: Block, x: jax.Array, pos: jax.Array,
                     segments: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
  """Block on rows x [1, r, embed] whose keys are already cached; chunked over rows."""
  rows = x.shape[1]
  chunk = next((c for c in (_ROW_CHUNK, 64, 32, 16, 8, 4, 2) if rows % c == 0 and c < rows),
               rows)

  def one(args: tuple[jax.Array, jax.Array]) -> jax.Array:
    xc, pc = args  # [1, chunk, embed], [1, chunk]
    q = blk.attention.project_query(blk.norm_query(xc), pc)
    return blk.finish(xc, attend_segments(q, segments, pc))

  xs = x.reshape(rows // chunk, 1, chunk, x.shape[-1])
  out = jax.lax.map(one, (xs, pos.reshape(rows // chunk, 1, chunk)))
  return out.reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class CachedDecoder:
  """The cached forward pass of `module` for caches of `length` positions.

  Attributes:
    module: the PerceiverAR whose params are decoded (any layer layout).
    length: static cache length (prompt + new tokens, bucketed by the caller).
    fill: latents kept after a reset (default num_latents // 2), in [1, latents].
    splits: pieces each step weight's contraction is cut into, so that batch-1
      matrix-vector products run on that many cores (layers/decode_ops.py).
  """

  module: PerceiverAR
  length: int
  fill: int | None = None
  splits: int = 2

  @property
  def latents(self) -> int:
    return min(self.module.num_latents, self.length)

  @property
  def reset_fill(self) -> int:
    fill = self.latents // 2 if self.fill is None else self.fill
    return max(1, min(fill, self.latents))

  @property
  def prefix_kv_norm(self) -> bool:
    """Layer 0's window keys differ from its prefix keys (CrossKvNorm.PREFIX)."""
    return self.module.block.cross_kv_norm == CrossKvNorm.PREFIX

  def blocks(self, params: Any) -> list[Block]:
    """Bound blocks 0..L-1 (latent params un-stacked once, outside the decode loop)."""
    m = self.module
    return [m.make_block(i).bind({"params": p}) for i, p in enumerate(m.layer_params(params))]

  def prefill(self, params: Any, tokens: jax.Array, prompt_lengths: jax.Array
              ) -> tuple[DecodeCache, jax.Array]:
    """Caches the prompts and returns logits [batch, vocab] predicting position prompt_length.

    tokens: [batch, length] decoder inputs (0, prompt..., anything after);
    prompt_lengths: [batch]. The first window holds min(latents, prompt + 1) positions.
    """
    batch, length = tokens.shape
    if length != self.length:
      raise ValueError(f"tokens must have the cache length {self.length}, got {length}")
    blocks = self.blocks(params)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = self.module.embed_from_params(params, tokens, pos)  # [batch, length, embed]
    k0, v0 = _key_values(blocks[0], blocks[0].norm_kv(x), pos)
    m = self.module
    shape = (batch * m.num_heads, m.head_dim, self.latents)
    p = prompt_lengths.astype(jnp.int32)
    window = jnp.zeros(shape, k0.dtype) if self.prefix_kv_norm else None
    cache = DecodeCache(tokens=tokens.astype(jnp.int32), position=p, window_start=p,
                        layer0_k=k0, layer0_v=v0,
                        latent_k=tuple(jnp.zeros(shape, k0.dtype) for _ in blocks[1:]),
                        latent_v=tuple(jnp.zeros(shape, v0.dtype) for _ in blocks[1:]),
                        window0_k=window, window0_v=window)
    start = jnp.maximum(p + 1 - self.latents, 0)
    logits = jnp.zeros((batch, m.vocab_size), jnp.float32)

    def one(b: jax.Array, carry: tuple[DecodeCache, jax.Array]):
      return self.reset_example(params, blocks, *carry, b, start[b], self.latents)

    return jax.lax.fori_loop(0, batch, one, (cache, logits))

  def reset_example(self, params: Any, blocks: list[Block], cache: DecodeCache,
                    logits: jax.Array, b: jax.Array, start: jax.Array, rows: int
                    ) -> tuple[DecodeCache, jax.Array]:
    """Restarts example b's window at `start`: recomputes `rows` latents from layer 0's cache.

    Rows past the example's position are computed from whatever the buffers hold;
    the causal mask keeps them from every valid row, and steps overwrite them.
    """
    pos = start + jnp.arange(rows, dtype=jnp.int32)[None, :]  # [1, rows]
    tokens = jax.lax.dynamic_slice(cache.tokens, (b, start), (1, rows))
    x = self.module.embed_from_params(params, tokens, pos)  # [1, rows, embed]
    heads = self.module.num_heads
    k0 = jax.lax.dynamic_slice_in_dim(cache.layer0_k, b * heads, heads)  # [heads, d, length]
    v0 = jax.lax.dynamic_slice_in_dim(cache.layer0_v, b * heads, heads)
    k_pos = jnp.arange(self.length, dtype=jnp.int32)[None, :]
    q_x = self.module.latent_query_from_params(params, x)
    window = {}
    if self.prefix_kv_norm:  # the window's own keys, from the query rows' norm
      wk, wv = _key_values(blocks[0], blocks[0].norm_query(q_x), pos)  # [heads, d, rows]
      segments = [(k0, v0, jnp.where(k_pos < start, k_pos, _HIDDEN)), (wk, wv, pos)]
      at = (b * heads, 0, 0)
      window = dict(window0_k=jax.lax.dynamic_update_slice(cache.window0_k, wk, at),
                    window0_v=jax.lax.dynamic_update_slice(cache.window0_v, wv, at))
    else:
      segments = [(k0, v0, k_pos)]
    x = _rows_over_cache(blocks[0], q_x, pos, segments)  # [1, rows, embed]
    latent_k, latent_v = [], []
    for blk, ck, cv in zip(blocks[1:], cache.latent_k, cache.latent_v):
      y = blk.norm_query(x)
      k, v = _key_values(blk, y, pos)
      x = blk.finish(x, attend(blk.attention.project_query(y, pos), k, v, pos, pos))
      latent_k.append(jax.lax.dynamic_update_slice(ck, k, (b * heads, 0, 0)))
      latent_v.append(jax.lax.dynamic_update_slice(cv, v, (b * heads, 0, 0)))
    row = jax.lax.dynamic_slice_in_dim(x, cache.position[b] - start, 1, axis=1)
    logits = logits.at[b].set(self.module.head_from_params(params, row)[0, 0])
    cache = cache.replace(window_start=cache.window_start.at[b].set(start),
                          latent_k=tuple(latent_k), latent_v=tuple(latent_v), **window)
    return cache, logits

  def step_weights(self, params: Any) -> tuple[StepWeights, ...]:
    """Every block's kernels laid out for `step` (Block.step_weights); make once per decode."""
    return tuple(blk.step_weights(self.splits) for blk in self.blocks(params))

  def step(self, params: Any, cache: DecodeCache, advance: jax.Array,
           weights: tuple[StepWeights, ...] | None = None) -> tuple[DecodeCache, jax.Array]:
    """Moves examples with advance [batch] one position on; logits [batch, vocab] there.

    cache.tokens must already hold the new input token at position + 1. Examples
    that do not advance recompute their current logits (writing identical keys).
    weights: `step_weights(params)`, made outside the decode loop (else made here).
    """
    blocks = self.blocks(params)
    weights = self.step_weights(params) if weights is None else weights
    n = self.latents
    p = cache.position + advance.astype(jnp.int32)
    s = cache.window_start
    token = jnp.take_along_axis(cache.tokens, p[:, None], axis=1)  # [b, 1]
    x = self.module.embed_from_params(params, token, p[:, None])[:, 0]  # [b, embed]
    q_x = self.module.latent_query_from_params(params, x)
    # a full window's write lands on its last slot; the reset below rewrites the window
    slot = jnp.minimum(p - s, n - 1)
    lat_pos = s[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    k_pos = jnp.arange(self.length, dtype=jnp.int32)[None, :]
    window = None
    if self.prefix_kv_norm:
      k_pos = jnp.where(k_pos < s[:, None], k_pos, _HIDDEN)
      window = (cache.window0_k, cache.window0_v, slot, lat_pos)
    x, k0, v0, window = blocks[0].step(weights[0], q_x, p, cache.layer0_k, cache.layer0_v, p,
                                       k_pos, kv_row=None if q_x is x else x, window=window)
    latent_k, latent_v = [], []
    for blk, w, ck, cv in zip(blocks[1:], weights[1:], cache.latent_k, cache.latent_v):
      x, ck, cv, _ = blk.step(w, x, p, ck, cv, slot, lat_pos)
      latent_k.append(ck)
      latent_v.append(cv)
    cache = cache.replace(position=p, layer0_k=k0, layer0_v=v0, latent_k=tuple(latent_k),
                          latent_v=tuple(latent_v))
    if window is not None:
      cache = cache.replace(window0_k=window[0], window0_v=window[1])
    logits = self.module.head_from_params(params, x[:, None])[:, 0]  # [batch, vocab]
    return self.reset_full(params, cache, logits, advance & (p - s >= n), blocks)

  def reset_full(self, params: Any, cache: DecodeCache, logits: jax.Array, full: jax.Array,
                 blocks: list[Block] | None = None) -> tuple[DecodeCache, jax.Array]:
    """Resets, one by one, the examples whose window is full ([batch] bool)."""
    fill = self.reset_fill
    blocks = self.blocks(params) if blocks is None else blocks

    def one(b: jax.Array, carry: tuple[DecodeCache, jax.Array]):
      start = carry[0].position[b] + 1 - fill
      return jax.lax.cond(full[b], lambda c: self.reset_example(params, blocks, *c, b, start,
                                                                fill), lambda c: c, carry)

    def all_full(carry: tuple[DecodeCache, jax.Array]):
      return jax.lax.fori_loop(0, full.shape[0], one, carry)

    return jax.lax.cond(jnp.any(full), all_full, lambda c: c, (cache, logits))
