"""Rotary position embeddings (Su et al. 2021, RoFormer) on a fraction of each head.

Perceiver AR applies rotary embeddings to queries and keys with their *true*
sequence positions, so a latent at position 7000 rotates as position 7000 even
though it is row 0 of the latent array (paper, Sec. 3.2). Only the first
`rotary_dim` features of every head are rotated; the rest carry content only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_dim(head_dim: int, fraction: float) -> int:
  """Number of rotated features per head (even, at most head_dim)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"rotary fraction must be in [0, 1], got {fraction}")
  return int(head_dim * fraction) // 2 * 2


def apply_rotary(x: jax.Array, positions: jax.Array, *, fraction: float = 1.0,
                 max_timescale: float = 1e4) -> jax.Array:
  """Rotates feature pairs of `x` by angles proportional to `positions`.

  Args:
    x: [batch, length, heads, head_dim] queries or keys.
    positions: [batch, length] integer positions in the full sequence.
    fraction: share of head_dim that is rotated.
    max_timescale: wavelength of the slowest rotating pair.

  Returns:
    x with the first `rotary_dim` features rotated; same shape and dtype.
  """
  dim = rotary_dim(x.shape[-1], fraction)
  if dim == 0:
    return x
  half = dim // 2
  inv_freq = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, half]
  sin = jnp.sin(angles)[:, :, None, :]  # [batch, length, 1, half]
  cos = jnp.cos(angles)[:, :, None, :]
  rot, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
  x1, x2 = rot[..., :half], rot[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
