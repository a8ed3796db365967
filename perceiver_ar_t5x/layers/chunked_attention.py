"""Memory-lean attention: online softmax over key chunks, gradient by recomputation.

Perceiver AR's layer 0 attends from N latents to the whole input, so the plain
[batch, heads, latents, length] score matrix grows with the context (4 GiB in f32
at 1024 latents x 131072 keys x 8 heads). Here the keys are visited `chunk_size`
at a time with a running max / running sum (Milakov & Gimelshein 2018; the
FlashAttention recurrence, Dao et al. 2022, Alg. 1), and the backward pass
recomputes each chunk's probabilities from the saved log-sum-exp (Alg. 2) instead
of storing them. Live memory is O(latents x chunk_size) for scores plus the
inputs themselves: linear in the context.

Masks are built per chunk from true positions (masks.attention_mask), exactly as
the plain kernel builds them, so both kernels compute the same function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from perceiver_ar_t5x import masks

_PAD_BIAS = 2.0 * masks.NEG_INF  # below the mask bias: pads never share a masked row's mass


def _chunked(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
  """[batch, num_chunks * chunk, ...] -> [num_chunks, batch, chunk, ...]."""
  x = x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunked(x: jax.Array, length: int) -> jax.Array:
  """[num_chunks, batch, chunk, ...] -> [batch, length, ...] (drops the padding)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _split_keys(k: jax.Array, v: jax.Array, k_pos: jax.Array, k_seg: jax.Array | None,
                chunk: int) -> tuple[jax.Array, ...]:
  """Pads the key axis to a multiple of `chunk` and splits it into chunks."""
  batch, length = k_pos.shape
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  valid = jnp.ones((batch, length), bool)
  if k_seg is None:
    k_seg = jnp.zeros((batch, length), jnp.int32)

  def split(x: jax.Array) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return _chunked(jnp.pad(x, widths), num_chunks, chunk)

  return tuple(split(x) for x in (k, v, k_pos, k_seg, valid))


def _chunk_bias(q_pos: jax.Array, q_seg: jax.Array | None, kp: jax.Array,
                ks: jax.Array | None, valid: jax.Array) -> jax.Array:
  """[batch, 1, q_len, chunk] additive bias: 0 / mask bias / padding bias."""
  bias = masks.mask_to_bias(masks.attention_mask(q_pos, kp, q_seg, ks))
  return jnp.where(valid[:, None, None, :], bias, _PAD_BIAS)


def _scores(qt: jax.Array, kc: jax.Array, bias: jax.Array) -> jax.Array:
  """qt [batch, heads, q, d], kc [batch, chunk, heads, d] -> f32 [batch, heads, q, chunk]."""
  return jnp.einsum("bhqd,bkhd->bhqk", qt, kc, preferred_element_type=jnp.float32) + bias


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
             q_seg: jax.Array | None, k_seg: jax.Array | None, chunk: int
             ) -> tuple[jax.Array, jax.Array]:
  """(out [batch, q, heads, d] in v.dtype, log-sum-exp f32 [batch, heads, q])."""
  batch, q_len, heads, dim = q.shape
  qt = jnp.swapaxes(q, 1, 2)  # [batch, heads, q, d]
  seg_on = q_seg is not None and k_seg is not None

  def step(carry: tuple[jax.Array, ...], xs: tuple[jax.Array, ...]):
    m, l, acc = carry
    kc, vc, kp, ks, valid = xs
    s = _scores(qt, kc, _chunk_bias(q_pos, q_seg if seg_on else None, kp,
                                    ks if seg_on else None, valid))
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vc,
                    preferred_element_type=jnp.float32)
    return (m_new, l, acc * corr[..., None] + pv), None

  init = (jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32),
          jnp.zeros((batch, heads, q_len), jnp.float32),
          jnp.zeros((batch, heads, q_len, dim), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(step, init, _split_keys(k, v, k_pos, k_seg, chunk))
  out = jnp.swapaxes(acc / l[..., None], 1, 2).astype(v.dtype)
  return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
               q_seg: jax.Array | None, k_seg: jax.Array | None, chunk: int) -> jax.Array:
  return _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, chunk)[0]


def _attention_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, chunk):
  out, lse = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, chunk)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _attention_bwd(chunk: int, residuals: tuple, d_out: jax.Array) -> tuple:
  """Recomputes p = exp(s - lse) per chunk; dS = p * (dP - rowsum(dO * O))."""
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = residuals
  seg_on = q_seg is not None and k_seg is not None
  qt = jnp.swapaxes(q, 1, 2)  # [batch, heads, q, d]
  do_t = jnp.swapaxes(d_out, 1, 2).astype(v.dtype)  # [batch, heads, q, d]
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def step(dq: jax.Array, xs: tuple[jax.Array, ...]):
    kc, vc, kp, ks, valid = xs
    s = _scores(qt, kc, _chunk_bias(q_pos, q_seg if seg_on else None, kp,
                                    ks if seg_on else None, valid))
    p = jnp.exp(s - lse[..., None])  # [batch, heads, q, chunk]
    dv = jnp.einsum("bhqk,bhqd->bkhd", p.astype(v.dtype), do_t,
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhqd,bkhd->bhqk", do_t, vc, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    dq = dq + jnp.einsum("bhqk,bkhd->bhqd", ds, kc, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhqk,bhqd->bkhd", ds, qt, preferred_element_type=jnp.float32)
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = jnp.zeros(qt.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(step, dq0, _split_keys(k, v, k_pos, k_seg, chunk))
  length = k.shape[1]
  return (jnp.swapaxes(dq, 1, 2).astype(q.dtype), _unchunked(dk, length),
          _unchunked(dv, length), None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


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
    chunk_size: keys per step; the key axis is padded to a multiple of it.

  Returns:
    [batch, q_len, heads, head_dim] in v.dtype.
  """
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != k_pos.shape:
    raise ValueError(f"expected q [b,q,h,d], k=v [b,k,h,d], k_pos [b,k]; got "
                     f"{q.shape}, {k.shape}, {v.shape}, {k_pos.shape}")
  chunk = min(chunk_size, k.shape[1])
  return _attention(q, k, v, q_pos, k_pos, q_seg, k_seg, chunk)
