"""Memory-lean attention: online softmax over key chunks, gradient by recomputation.

Perceiver AR's layer 0 attends from N latents to the whole input, so the plain
[batch, heads, latents, length] score matrix grows with the context (4 GiB in f32
at 1024 latents x 131072 keys x 8 heads). Here the keys are visited `chunk_size`
at a time with a running max / running sum (Milakov & Gimelshein 2018; the
FlashAttention recurrence, Dao et al. 2022, Alg. 1), and the backward pass
recomputes each chunk's probabilities from the saved log-sum-exp (Alg. 2) instead
of storing them. Live memory is O(latents x chunk_size) for scores plus the
inputs themselves: linear in the context.

`chunked_projected_attention` goes one step further for layer 0: the RMSNorm and
key/value projection run per chunk inside the loop (and again in the backward
pass), so only the layer-0 input and its gradient are ever full length. At 131072
tokens this takes the train step's XLA temp memory from 2.8 GiB (plain k/v) to
about 1 GiB, and it is also faster on CPU (the chunk's k/v stay in cache).

Masks are built per chunk from true positions (masks.attention_mask), exactly as
the plain kernel builds them, so both kernels compute the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from perceiver_ar_t5x import masks

KvFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array]]


def _key_chunks(length: int, chunk: int) -> tuple[int, int]:
  """(number of full chunks, size of the remainder chunk) along the key axis."""
  return length // chunk, length % chunk


def _take(tree: Any, start: jax.Array | int, size: int) -> Any:
  """`size` rows from `start` on axis 1 of every leaf (dynamic_slice: no copies)."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1), tree)


def _heads_first(x: jax.Array) -> jax.Array:
  """[batch, len, heads, d] -> [batch, heads, len, d]."""
  return jnp.swapaxes(x, 1, 2)


def _scores(qt: jax.Array, k: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
            kp: jax.Array, ks: jax.Array | None, k_spec: str = "bkhd") -> jax.Array:
  """Masked scores f32 [batch, heads, q, chunk].

  qt: [batch, heads, q, d]; k: [batch, chunk, heads, d] (k_spec "bkhd", the layer-0
  chunks as projected) or [batch, heads, chunk, d] ("bhkd": the latent self-attention,
  transposed once, where XLA CPU runs the heads-first product ~1.6x faster).
  """
  s = jnp.einsum(f"bhqd,{k_spec}->bhqk", qt, k, preferred_element_type=jnp.float32)
  return s + masks.mask_to_bias(masks.attention_mask(q_pos, kp, q_seg, ks))


def _loop(update: Callable, carry: Any, length: int, chunk: int) -> Any:
  """Runs update(carry, start, size) over full chunks (a loop) and the remainder."""
  full, rest = _key_chunks(length, chunk)
  carry = jax.lax.fori_loop(0, full, lambda i, c: update(c, i * chunk, chunk), carry)
  return update(carry, full * chunk, rest) if rest else carry


def _forward(kv_fn: KvFn, chunk: int, q: jax.Array, kv_params: Any, kv_in: Any,
             q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
             k_seg: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(out [batch, q, heads, d], log-sum-exp f32 [batch, heads, q])."""
  batch, q_len, heads, dim = q.shape
  qt = _heads_first(q)  # [batch, heads, q, d]
  out_dtype = q.dtype

  def update(carry: tuple[jax.Array, ...], start: jax.Array | int, size: int):
    m, denom, acc = carry
    kp, ks = _take((k_pos, k_seg), start, size)
    kc, vc = kv_fn(kv_params, _take(kv_in, start, size), kp)
    s = _scores(qt, kc, q_pos, q_seg, kp, ks)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vc.dtype), vc,
                    preferred_element_type=jnp.float32)
    return m_new, denom * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

  carry = (jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32),
           jnp.zeros((batch, heads, q_len), jnp.float32),
           jnp.zeros((batch, heads, q_len, dim), jnp.float32))
  m, denom, acc = _loop(update, carry, k_pos.shape[1], chunk)
  out = jnp.swapaxes(acc / denom[..., None], 1, 2).astype(out_dtype)
  return out, m + jnp.log(denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(kv_fn: KvFn, chunk: int, q: jax.Array, kv_params: Any, kv_in: Any,
               q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
               k_seg: jax.Array | None) -> jax.Array:
  return _forward(kv_fn, chunk, q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg)[0]


def _attention_fwd(kv_fn, chunk, q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg):
  out, lse = _forward(kv_fn, chunk, q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg)
  return out, (q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg, out, lse)


def _rows_t(x: jax.Array) -> jax.Array:
  """[b, h, q, d] -> f32 [b, h, d, q], materialised (a barrier keeps XLA from folding it)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x.astype(jnp.float32), 2, 3))


def _chunk_grads(qt: jax.Array, do_t: jax.Array, delta: jax.Array, lse: jax.Array,
                 k: jax.Array, v: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
                 kp: jax.Array, ks: jax.Array | None) -> tuple[jax.Array, ...]:
  """One layer-0 key chunk's f32 (dq, dk^T, dv^T), recomputing p = exp(s - lse)."""
  p = jnp.exp(_scores(qt, k, q_pos, q_seg, kp, ks) - lse[..., None])  # [b, h, q, chunk]
  return _grads_given_p(p, qt, do_t, delta, k, v, "bkhd")


def _grads_given_p(p: jax.Array, qt: jax.Array, do_t: jax.Array, delta: jax.Array,
                   k: jax.Array, v: jax.Array, k_spec: str) -> tuple[jax.Array, ...]:
  """f32 (dq, dk^T, dv^T) of one chunk from its probabilities; dS = p * (dP - delta).

  p: f32 [b, h, q, chunk]; qt, do_t: [b, h, q, d]; k, v laid out as k_spec (see
  _scores). dk and dv contract over the query rows: written as p^T dO they are a
  transposed-operand product that XLA CPU runs at ~half speed (f32 upcast, no fast
  bf16 kernel); as dO^T p and q^T dS, with the small dO^T / q^T materialised, they
  are plain row-major f32 products, returned transposed: [b, h, d, chunk].
  """
  dv_t = jnp.einsum("bhdq,bhqk->bhdk", _rows_t(do_t), p)
  dp = jnp.einsum(f"bhqd,{k_spec}->bhqk", do_t.astype(v.dtype), v,
                  preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None])  # f32 [b, h, q, chunk]
  dq = jnp.einsum(f"bhqk,{k_spec}->bhqd", ds.astype(qt.dtype), k.astype(qt.dtype),
                  preferred_element_type=jnp.float32)
  dk_t = jnp.einsum("bhdq,bhqk->bhdk", _rows_t(qt), ds)
  return dq, dk_t, dv_t


def _rows_last(x_t: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """[b, h, d, rows] -> [b, rows, h, d] in dtype."""
  return x_t.transpose(0, 3, 1, 2).astype(dtype)


def _delta(out: jax.Array, d_out: jax.Array) -> jax.Array:
  """rowsum(dO * O) f32 [batch, heads, q]."""
  return jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))


def _attention_bwd(kv_fn: KvFn, chunk: int, residuals: tuple, d_out: jax.Array) -> tuple:
  """Recomputes k, v and p = exp(s - lse) per chunk; dS = p * (dP - rowsum(dO * O))."""
  q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
  qt = _heads_first(q)  # [batch, heads, q, d]
  do_t = _heads_first(d_out)
  delta = _delta(out, d_out)

  def update(carry: tuple[Any, ...], start: jax.Array | int, size: int):
    dq, d_params, d_in = carry
    kp, ks = _take((k_pos, k_seg), start, size)
    (kc, vc), kv_vjp = jax.vjp(lambda w, x: kv_fn(w, x, kp), kv_params,
                               _take(kv_in, start, size))
    dq_c, dk_t, dv_t = _chunk_grads(qt, do_t, delta, lse, kc, vc, q_pos, q_seg, kp, ks)
    dq = dq + dq_c
    dw, dx = kv_vjp((_rows_last(dk_t, kc.dtype), _rows_last(dv_t, vc.dtype)))
    d_params = jax.tree_util.tree_map(jnp.add, d_params, dw)
    d_in = jax.tree_util.tree_map(
        lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start,
                                                           axis=1), d_in, dx)
    return dq, d_params, d_in

  zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # noqa: E731
  carry = (jnp.zeros(qt.shape, jnp.float32), zeros(kv_params), zeros(kv_in))
  dq, d_params, d_in = _loop(update, carry, k_pos.shape[1], chunk)
  return jnp.swapaxes(dq, 1, 2).astype(q.dtype), d_params, d_in, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _given_kv(_: Any, kv: tuple[jax.Array, jax.Array], __: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  return kv


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
  qt, kt, vt = map(_heads_first, (q, k, v))  # [batch, heads, n, d]
  outs, probs = [], []
  for lo, hi in _query_blocks(q.shape[1], block):
    s_q, s_k = (None, None) if seg is None else (seg[:, lo:hi], seg[:, :hi])
    s = _scores(qt[:, :, lo:hi], kt[:, :, :hi], pos[:, lo:hi], s_q, pos[:, :hi], s_k,
                k_spec="bhkd")
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))  # max finite: masks add a finite bias
    p = p / jnp.sum(p, axis=-1, keepdims=True)  # [batch, heads, hi - lo, hi]
    outs.append(jnp.einsum("bhqk,bhkd->bhqd", p.astype(vt.dtype), vt[:, :, :hi],
                           preferred_element_type=jnp.float32))
    probs.append(p.astype(q.dtype))
  out = jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2).astype(q.dtype)
  return out, (q, k, v, out, tuple(probs))


def _block_causal_bwd(block: int, residuals: tuple, d_out: jax.Array) -> tuple:
  """Per query block, the one-chunk backward from its kept probabilities; dk, dv in f32."""
  q, k, v, out, probs = residuals
  qt, kt, vt, do_t = map(_heads_first, (q, k, v, d_out))  # [batch, heads, n, d]
  delta = _delta(out, d_out)
  dqs = []
  batch, n, heads, dim = k.shape
  dk_t = jnp.zeros((batch, heads, dim, n), jnp.float32)
  dv_t = jnp.zeros((batch, heads, dim, n), jnp.float32)
  for p, (lo, hi) in zip(probs, _query_blocks(n, block)):
    dq_b, dk_b, dv_b = _grads_given_p(p.astype(jnp.float32), qt[:, :, lo:hi],
                                      do_t[:, :, lo:hi], delta[:, :, lo:hi],
                                      kt[:, :, :hi], vt[:, :, :hi], "bhkd")
    dqs.append(dq_b)
    dk_t = dk_t.at[..., :hi].add(dk_b)
    dv_t = dv_t.at[..., :hi].add(dv_b)
  dq = jnp.swapaxes(jnp.concatenate(dqs, axis=2), 1, 2)
  return (dq.astype(q.dtype), _rows_last(dk_t, k.dtype), _rows_last(dv_t, v.dtype),
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
  (kept in q.dtype, see _block_causal_fwd) instead of recomputing them.

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


def chunked_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                                  q_pos: jax.Array, k_pos: jax.Array,
                                  q_seg: jax.Array | None = None,
                                  k_seg: jax.Array | None = None, *,
                                  chunk_size: int = 1024) -> jax.Array:
  """Same contract as attention.dot_product_attention, memory linear in k_len.

  Args:
    q: [batch, q_len, heads, head_dim], pre-scaled by 1/sqrt(head_dim).
    k, v: [batch, k_len, heads, head_dim].
    q_pos, k_pos: [batch, q_len] / [batch, k_len] true positions (causal mask).
    q_seg, k_seg: optional segment ids for packed batches.
    chunk_size: keys per step (the last step takes the remainder).

  Returns:
    [batch, q_len, heads, head_dim] in q.dtype.
  """
  if k.shape != v.shape:
    raise ValueError(f"k and v must have one shape, got {k.shape} and {v.shape}")
  return chunked_projected_attention(q, None, (k, v), q_pos, k_pos, q_seg, k_seg,
                                     kv_fn=_given_kv, chunk_size=chunk_size)


def chunked_projected_attention(q: jax.Array, kv_params: Any, kv_in: Any, q_pos: jax.Array,
                                k_pos: jax.Array, q_seg: jax.Array | None = None,
                                k_seg: jax.Array | None = None, *, kv_fn: KvFn,
                                chunk_size: int = 1024) -> jax.Array:
  """Attention whose keys/values are made per chunk: k, v = kv_fn(kv_params, kv_in[chunk], pos).

  Fusing the key/value projection into the chunk loop means full-length keys and
  values (and their gradients) never exist: only `kv_in` (e.g. the normed layer-0
  input [batch, k_len, embed]) and its gradient are full length. The projection is
  recomputed in the backward pass.

  Args:
    q: [batch, q_len, heads, head_dim], pre-scaled.
    kv_params: pytree of weights kv_fn differentiates (gradients are returned).
    kv_in: pytree of [batch, k_len, ...] arrays sliced along axis 1.
    q_pos, k_pos, q_seg, k_seg: as in chunked_dot_product_attention.
    kv_fn: (kv_params, kv_in chunk, k_pos chunk) -> (k, v) [batch, chunk, heads, head_dim].
    chunk_size: keys per step.
  """
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  if q.ndim != 4 or q_pos.shape != q.shape[:2] or k_pos.ndim != 2:
    raise ValueError(f"expected q [b,q,h,d], q_pos [b,q], k_pos [b,k]; got "
                     f"{q.shape}, {q_pos.shape}, {k_pos.shape}")
  if q_seg is None or k_seg is None:
    q_seg = k_seg = None
  chunk = min(chunk_size, k_pos.shape[1])
  return _attention(kv_fn, chunk, q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg)
