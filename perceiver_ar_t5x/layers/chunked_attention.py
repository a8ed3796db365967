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
key/value projection run per chunk inside the loop, and so does their backward
pass, so the gradients of k and v are never full length (at 131072 tokens the
plain-k/v step needed 2.8 GiB of XLA temp memory, this one about 1 GiB). The
forward pass keeps the projected k and v (activation dtype, 256 MiB in bf16 at
131072 tokens) so that the backward pass does not project them again.

`heads_first`, `row_major` and `output_delta` are shared with block_causal.py.

Masks are built per chunk from true positions (masks.attention_mask), exactly as
the plain kernel builds them, so both kernels compute the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from perceiver_ar_t5x import masks

KvFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array]]


def _key_chunks(length: int, chunk: int) -> tuple[int, int]:
  """(number of full chunks, size of the remainder chunk) along the key axis."""
  return length // chunk, length % chunk


def _take(tree: Any, start: jax.Array | int, size: int) -> Any:
  """`size` rows from `start` on axis 1 of every leaf (dynamic_slice: no copies)."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1), tree)


def row_major(x: jax.Array) -> jax.Array:
  """x laid out row-major in memory, e.g. a transpose materialised as such.

  XLA CPU otherwise tends to keep a transpose as a layout change of its operand, and a
  dot whose operand is not row-major is upcast to f32 and left to the slow generic
  kernel (bf16 products of the full-length heads-first k/v ran in f32 that way).
  A CPU workaround: on accelerators, layouts (tiled ones on TPU) stay XLA's choice.
  """
  if jax.default_backend() != "cpu":
    return x
  return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


def heads_first(x: jax.Array) -> jax.Array:
  """[batch, len, heads, d] -> [batch, heads, len, d], row-major (see row_major)."""
  return row_major(jnp.swapaxes(x, 1, 2))


def _masked_scores(qt: jax.Array, k: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
                   kp: jax.Array, ks: jax.Array | None) -> jax.Array:
  """Masked scores f32 [batch, heads, q, chunk]; qt [b, h, q, d], k [b, chunk, h, d]."""
  s = jnp.einsum("bhqd,bkhd->bhqk", qt, k, preferred_element_type=jnp.float32)
  return s + masks.mask_to_bias(masks.attention_mask(q_pos, kp, q_seg, ks))


def _loop(update: Callable, carry: Any, length: int, chunk: int) -> Any:
  """Runs update(carry, start, size) over full chunks (a loop) and the remainder."""
  full, rest = _key_chunks(length, chunk)
  carry = jax.lax.fori_loop(0, full, lambda i, c: update(c, i * chunk, chunk), carry)
  return update(carry, full * chunk, rest) if rest else carry


def _forward(kv_fn: KvFn, chunk: int, q: jax.Array, kv_params: Any, kv_in: Any,
             q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
             k_seg: jax.Array | None, keep_kv: bool = False) -> tuple[Any, ...]:
  """(out [batch, q, heads, d], log-sum-exp f32 [batch, heads, q], kept (k, v) or None).

  keep_kv: also return the full-length k, v [batch, k_len, heads, d] (written chunk by
  chunk), so that the backward pass need not project them again.
  """
  batch, q_len, heads, _ = q.shape
  qt = heads_first(q)  # [batch, heads, q, d]
  out_dtype = q.dtype

  def update(carry: tuple[Any, ...], start: jax.Array | int, size: int):
    m, denom, acc, kept = carry
    kp, ks = _take((k_pos, k_seg), start, size)
    kc, vc = kv_fn(kv_params, _take(kv_in, start, size), kp)
    if keep_kv:
      kept = tuple(jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=1)
                   for buf, x in zip(kept, (kc, vc)))
    s = _masked_scores(qt, kc, q_pos, q_seg, kp, ks)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vc.dtype), vc,
                    preferred_element_type=jnp.float32)
    return m_new, denom * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv, kept

  kept = None
  shapes = jax.eval_shape(kv_fn, kv_params, _take(kv_in, 0, 1), k_pos[:, :1])
  if keep_kv:
    kept = tuple(jnp.zeros((x.shape[0], k_pos.shape[1]) + x.shape[2:], x.dtype) for x in shapes)
  v_dim = shapes[1].shape[-1]  # may differ from the query/key head dim (Perceiver IO)
  carry = (jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32),
           jnp.zeros((batch, heads, q_len), jnp.float32),
           jnp.zeros((batch, heads, q_len, v_dim), jnp.float32), kept)
  m, denom, acc, kept = _loop(update, carry, k_pos.shape[1], chunk)
  out = jnp.swapaxes(acc / denom[..., None], 1, 2).astype(out_dtype)
  return out, m + jnp.log(denom), kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(kv_fn: KvFn, chunk: int, q: jax.Array, kv_params: Any, kv_in: Any,
               q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
               k_seg: jax.Array | None) -> jax.Array:
  return _forward(kv_fn, chunk, q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg)[0]


def _attention_fwd(kv_fn, chunk, q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg):
  given = kv_fn is _given_kv  # k, v are kv_in itself, a residual already: no second copy
  out, lse, kept = _forward(kv_fn, chunk, q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg,
                            keep_kv=not given)
  return out, (q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg, out, lse,
               kv_in if given else kept)


def _rows_t(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """[b, h, q, d] -> [b, h, d, q] in dtype, materialised row-major."""
  return row_major(jnp.swapaxes(x.astype(dtype), 2, 3))


def _chunk_grads(qt: jax.Array, do_t: jax.Array, delta: jax.Array, lse: jax.Array,
                 k: jax.Array, v: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
                 kp: jax.Array, ks: jax.Array | None) -> tuple[jax.Array, ...]:
  """One layer-0 key chunk's f32 (dq, dk^T, dv^T), recomputing p = exp(s - lse).

  qt, do_t: [b, h, q, d]; k, v: [b, chunk, h, d]. dS = p * (dP - delta). Products run
  at v.dtype with f32 accumulation (p and dS rounded to it). dk and dv contract over
  the query rows: written as p^T dO they are a transposed-operand product that XLA
  CPU runs several times slower; as dO^T p and q^T dS, with the small dO^T / q^T
  materialised, they are plain row-major products, returned transposed: [b, h, d, chunk].
  """
  dtype = v.dtype
  p = jnp.exp(_masked_scores(qt, k, q_pos, q_seg, kp, ks) - lse[..., None])  # [b, h, q, chunk]
  dv_t = jnp.einsum("bhdq,bhqk->bhdk", _rows_t(do_t, dtype), p.astype(dtype),
                    preferred_element_type=jnp.float32)
  dp = jnp.einsum("bhqd,bkhd->bhqk", do_t.astype(dtype), v, preferred_element_type=jnp.float32)
  ds = (p * (dp - delta[..., None])).astype(dtype)  # [b, h, q, chunk]
  dq = jnp.einsum("bhqk,bkhd->bhqd", ds, k.astype(dtype), preferred_element_type=jnp.float32)
  dk_t = jnp.einsum("bhdq,bhqk->bhdk", _rows_t(qt, dtype), ds,
                    preferred_element_type=jnp.float32)
  return dq, dk_t, dv_t


def _rows_last(x_t: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """[b, h, d, rows] -> [b, rows, h, d] in dtype."""
  return x_t.transpose(0, 3, 1, 2).astype(dtype)


def output_delta(out: jax.Array, d_out: jax.Array) -> jax.Array:
  """rowsum(dO * O) f32 [batch, heads, q]."""
  return jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))


def _attention_bwd(kv_fn: KvFn, chunk: int, residuals: tuple, d_out: jax.Array) -> tuple:
  """Recomputes p = exp(s - lse) per chunk from the kept k, v; dS = p * (dP - rowsum(dO * O)).

  The projection's backward (kv_fn's vjp) runs per chunk as well, so the gradients
  of k and v never exist at full length.
  """
  q, kv_params, kv_in, q_pos, k_pos, q_seg, k_seg, out, lse, kept = residuals
  qt = heads_first(q)  # [batch, heads, q, d]
  do_t = heads_first(d_out)
  delta = output_delta(out, d_out)

  def update(carry: tuple[Any, ...], start: jax.Array | int, size: int):
    dq, d_params, d_in = carry
    kp, ks = _take((k_pos, k_seg), start, size)
    # the vjp's own forward outputs go unused (k, v come from `kept`), so XLA drops them
    _, kv_vjp = jax.vjp(lambda w, x: kv_fn(w, x, kp), kv_params, _take(kv_in, start, size))
    kc, vc = _take(kept, start, size)
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
