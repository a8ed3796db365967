"""Causal self-attention over the latents that skips the wholly masked key blocks.

The latent stack's scores are latents x latents whatever the context, so unlike
layer 0 (chunked_attention.py) this kernel keeps each query block's
probabilities for the backward pass instead of recomputing them. It works
key-major (scores and probabilities as [batch, heads, keys, queries]) so that every
product of both passes has a layout XLA CPU runs fast (see _block_causal_fwd).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from perceiver_ar_t5x import masks
from perceiver_ar_t5x.layers.chunked_attention import heads_first, output_delta, row_major


def _query_blocks(n: int, block: int) -> list[tuple[int, int]]:
  return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


def _key_major(x: jax.Array) -> jax.Array:
  """[batch, n, heads, d] -> row-major [batch, heads, d, n]: the left operand of v^T p^T."""
  return row_major(x.transpose(0, 2, 3, 1))


def _scores_t(qt: jax.Array, kt: jax.Array, pos: jax.Array, seg: jax.Array | None,
              lo: int, hi: int) -> jax.Array:
  """Masked scores of query block [lo, hi) against keys [0, hi), key-major: f32 [b, h, k, q]."""
  s_q, s_k = (None, None) if seg is None else (seg[:, lo:hi], seg[:, :hi])
  mask = masks.attention_mask(pos[:, lo:hi], pos[:, :hi], s_q, s_k)  # [b, 1, q, k]
  s = jnp.einsum("bhkd,bhqd->bhkq", kt[:, :, :hi], qt[:, :, lo:hi],
                 preferred_element_type=jnp.float32)
  return s + jnp.swapaxes(masks.mask_to_bias(mask), 2, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_causal(block: int, q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
                  seg: jax.Array | None) -> jax.Array:
  return _block_causal_fwd(block, q, k, v, pos, seg)[0]


def _block_causal_fwd(block, q, k, v, pos, seg):
  """Each query block is one softmax over keys [0, hi); its probabilities are kept.

  Probabilities are held key-major, p^T [b, h, keys, queries], so that every product
  of both passes is a plain (row-major x row-major or x transposed) one: out^T =
  v^T p^T here, dv = p^T dO and dk = dS^T q in the backward pass. The other layout
  needs p^T dO with the contraction over the leading axis of both operands, which XLA
  CPU runs several times slower. Keeping them (activation dtype, batch x heads x
  n^2 x ~9/16: what autodiff of plain attention would keep) saves the backward pass
  the score product, the mask and the exp; RematPolicy.FULL frees them between layers.
  """
  qt, kt, v_km = heads_first(q), heads_first(k), _key_major(v)
  outs, probs = [], []
  for lo, hi in _query_blocks(q.shape[1], block):
    s = _scores_t(qt, kt, pos, seg, lo, hi)
    p = jnp.exp(s - jnp.max(s, axis=2, keepdims=True))  # max finite: masks add a finite bias
    p = (p / jnp.sum(p, axis=2, keepdims=True)).astype(v.dtype)  # [b, h, hi, hi - lo]
    outs.append(jnp.einsum("bhdk,bhkq->bhdq", v_km[..., :hi], p,
                           preferred_element_type=jnp.float32))
    probs.append(p)  # the product's own operand: one conversion serves both
  out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2).astype(q.dtype)
  return out, (q, k, v, out, tuple(probs))


def _block_causal_bwd(block: int, residuals: tuple, d_out: jax.Array) -> tuple:
  """Per query block, the one-block backward from its kept p^T; dS^T = p^T * (dP^T - delta).

  Products run at the activation dtype with f32 accumulation (dS^T rounded to it, as
  the forward's p^T is); dk and dv accumulate in f32.
  """
  q, k, v, out, probs = residuals
  dtype = v.dtype
  qt, vt, do_t = heads_first(q), heads_first(v), heads_first(d_out.astype(dtype))
  k_km = _key_major(k)
  delta = output_delta(out, d_out)  # [b, h, q]
  batch, n, heads, dim = k.shape
  dk = jnp.zeros((batch, heads, n, dim), jnp.float32)
  dv = jnp.zeros((batch, heads, n, dim), jnp.float32)
  dqs = []
  for p, (lo, hi) in zip(probs, _query_blocks(n, block)):
    do_b = do_t[:, :, lo:hi]
    dp = jnp.einsum("bhkd,bhqd->bhkq", vt[:, :, :hi], do_b, preferred_element_type=jnp.float32)
    ds = (p.astype(jnp.float32) * (dp - delta[:, :, None, lo:hi])).astype(dtype)
    dv = dv.at[:, :, :hi].add(jnp.einsum("bhkq,bhqd->bhkd", p, do_b,
                                         preferred_element_type=jnp.float32))
    dk = dk.at[:, :, :hi].add(jnp.einsum("bhkq,bhqd->bhkd", ds, qt[:, :, lo:hi].astype(dtype),
                                         preferred_element_type=jnp.float32))
    dqs.append(jnp.einsum("bhdk,bhkq->bhdq", k_km[..., :hi].astype(dtype), ds,
                          preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dqs, axis=3).transpose(0, 3, 1, 2)
  return (dq.astype(q.dtype), jnp.swapaxes(dk, 1, 2).astype(k.dtype),
          jnp.swapaxes(dv, 1, 2).astype(v.dtype), None, None)


_block_causal.defvjp(_block_causal_fwd, _block_causal_bwd)


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
                           seg: jax.Array | None = None, *, block: int = 128) -> jax.Array:
  """Causal self-attention that never computes a key block wholly after its query block.

  Queries and keys are the same rows, in sequence order: row j > i holds a later
  position of the same segment, or another segment, so it is masked for row i
  (masks.attention_mask). Query block [lo, hi) therefore needs keys [0, hi) only:
  (n/block + 1) / (2 n/block) of the dense work (9/16 at 1024 rows, block 128).
  Each block is one softmax over its keys with the dense kernel's masks, so the
  result is the dense kernel's; the backward pass reuses the blocks' probabilities
  (kept in v.dtype, see _block_causal_fwd) instead of recomputing them.

  Args:
    q, k, v: [batch, n, heads, head_dim], q pre-scaled by 1/sqrt(head_dim).
    pos, seg: [batch, n] positions and optional segment ids of the rows.
    block: query rows per block (the last block may be shorter).

  Returns:
    [batch, n, heads, head_dim] in q.dtype.
  """
  if q.shape != k.shape or k.shape != v.shape or pos.shape != q.shape[:2]:
    raise ValueError(f"self-attention needs q, k, v [b,n,h,d] and pos [b,n] alike; got "
                     f"{q.shape}, {k.shape}, {v.shape}, {pos.shape}")
  if block <= 0:
    raise ValueError(f"block must be positive, got {block}")
  return _block_causal(min(block, q.shape[1]), q, k, v, pos, seg)
