"""RMSNorm (Zhang & Sennrich 2019), as used by T5 / flaxformer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float, dtype: jnp.dtype) -> jax.Array:
  """x / rms(x) * scale over the last axis, statistics in float32."""
  x32 = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
  return (x32 * inv_rms * scale).astype(dtype)


class RMSNorm(nn.Module):
  """Scales by the root-mean-square of the features; no mean subtraction, no bias.

  Statistics are computed in float32 whatever the activation dtype, because
  bf16 variance estimates over wide embeddings are too coarse.
  """

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (pt.EMBED,)),
                       (x.shape[-1],), jnp.float32)
    return rms_norm(x, scale, self.epsilon, self.dtype)
