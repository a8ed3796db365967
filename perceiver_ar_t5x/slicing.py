"""Pure index arithmetic: sequence lengths, latent windows, prefix dropout.

Perceiver AR places its latents on the *last* `num_latents` positions of each
example (paper, Sec. 3.1). Examples in a batch have different lengths, so every
function here works per example with a [batch] vector of window starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_latent_positions(num_latents: int, length: int) -> int:
  """Latent rows actually used: a sequence shorter than num_latents is all latents."""
  return min(num_latents, length)


def sequence_lengths(target_tokens: jax.Array) -> jax.Array:
  """[batch, length] -> [batch]: index of the last non-padding target + 1."""
  nonpad = target_tokens != 0
  idx = jnp.arange(1, target_tokens.shape[-1] + 1)
  return jnp.max(jnp.where(nonpad, idx, 0), axis=-1)


def latent_starts(lengths: jax.Array, num_latents: int, total_length: int) -> jax.Array:
  """[batch] first latent position: the window ends at each example's length."""
  n = num_latent_positions(num_latents, total_length)
  return jnp.clip(lengths - n, 0, total_length - n).astype(jnp.int32)


def window(x: jax.Array, starts: jax.Array, size: int) -> jax.Array:
  """x[b, starts[b] : starts[b] + size] for x of shape [batch, length, ...]."""
  idx = starts[:, None] + jnp.arange(size)[None, :]  # [batch, size]
  return take(x, idx)


def take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Per-example gather along axis 1: x [batch, length, ...], idx [batch, k]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def num_kept_prefix(prefix_length: int, rate: float) -> int:
  """Static number of prefix positions kept by prefix dropout."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"prefix_dropout must be in [0, 1), got {rate}")
  return int(round(prefix_length * (1.0 - rate)))


def prefix_keep_indices(rng: jax.Array, starts: jax.Array, num_latents: int,
                        total_length: int, keep: int) -> jax.Array:
  """[batch, keep] positions of the prefix kept by prefix dropout (paper, Sec. 3.3).

  Chooses `keep` positions uniformly among each example's prefix [0, start).
  When an example's prefix is shorter than `keep` (short sequences), the
  remaining slots take positions after the latent window, which the causal mask
  hides from every latent, so they change nothing. Latent positions are never
  chosen: they are appended separately.
  """
  pos = jnp.arange(total_length)[None, :]
  in_prefix = pos < starts[:, None]
  in_window = (pos >= starts[:, None]) & (pos < starts[:, None] + num_latents)
  score = jax.random.uniform(rng, (starts.shape[0], total_length))
  score = jnp.where(in_prefix, score, jnp.where(in_window, -2.0, -1.0))
  _, idx = jax.lax.top_k(score, keep)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)
