"""Causal self-attention over the latents that skips the wholly masked key blocks.

The latent stack's scores are latents x latents whatever the context, so unlike
layer 0 (chunked_attention.py) this kernel keeps each query block's
probabilities for the backward pass instead of recomputing them; it shares the
score and gradient algebra with chunked_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from perceiver_ar_t5x.layers.chunked_attention import (
  grads_given_probs,
  heads_first,
  masked_scores,
  output_delta,
  rows_last,
)


def _query_blocks(n: int, block: int) -> list[tuple[int, int]]:
  return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_causal(block: int, q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
                  seg: jax.Array | None) -> jax.Array:
  return _block_causal_fwd(block, q, k, v, pos, seg)[0]


def _block_causal_fwd(block, q, k, v, pos, seg):
  """Each query block is one softmax over keys [0, hi); its probabilities are kept.

  Keeping them (activation dtype, batch x heads x n^2 x ~9/16: what autodiff of plain
  attention would keep) saves the backward pass the score product, the mask and the
  exp; RematPolicy.FULL frees them between layers.
  """
  qt, kt, vt = map(heads_first, (q, k, v))  # [batch, heads, n, d]
  outs, probs = [], []
  for lo, hi in _query_blocks(q.shape[1], block):
    s_q, s_k = (None, None) if seg is None else (seg[:, lo:hi], seg[:, :hi])
    s = masked_scores(qt[:, :, lo:hi], kt[:, :, :hi], pos[:, lo:hi], s_q, pos[:, :hi], s_k,
                      k_spec="bhkd")
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))  # max finite: masks add a finite bias
    p = (p / jnp.sum(p, axis=-1, keepdims=True)).astype(vt.dtype)  # [b, h, hi - lo, hi]
    outs.append(jnp.einsum("bhqk,bhkd->bhqd", p, vt[:, :, :hi],
                           preferred_element_type=jnp.float32))
    probs.append(p)  # the product's own operand: one conversion serves both
  out = jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2).astype(q.dtype)
  return out, (q, k, v, out, tuple(probs))


def _block_causal_bwd(block: int, residuals: tuple, d_out: jax.Array) -> tuple:
  """Per query block, the one-chunk backward from its kept probabilities; dk, dv in f32."""
  q, k, v, out, probs = residuals
  qt, kt, vt, do_t = map(heads_first, (q, k, v, d_out))  # [batch, heads, n, d]
  delta = output_delta(out, d_out)
  dqs = []
  batch, n, heads, dim = k.shape
  dk_t = jnp.zeros((batch, heads, dim, n), jnp.float32)
  dv_t = jnp.zeros((batch, heads, dim, n), jnp.float32)
  for p, (lo, hi) in zip(probs, _query_blocks(n, block)):
    dq_b, dk_b, dv_b = grads_given_probs(p.astype(jnp.float32), qt[:, :, lo:hi],
                                         do_t[:, :, lo:hi], delta[:, :, lo:hi],
                                         kt[:, :, :hi], vt[:, :, :hi], "bhkd")
    dqs.append(dq_b)
    dk_t = dk_t.at[..., :hi].add(dk_b)
    dv_t = dv_t.at[..., :hi].add(dv_b)
  dq = jnp.swapaxes(jnp.concatenate(dqs, axis=2), 1, 2)
  return (dq.astype(q.dtype), rows_last(dk_t, k.dtype), rows_last(dv_t, v.dtype),
          None, None)


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
