"""Gated-GELU feed-forward block (Shazeer 2020, "GLU Variants"), no biases."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.layers import matmul


def _kernel_init() -> nn.initializers.Initializer:
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class GatedGeluMlp(nn.Module):
  """out = (gelu(x W0) * (x W1)) Wo; the gate doubles the input projections."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    embed = x.shape[-1]
    def param(name: str, shape: tuple[int, int], axes: tuple[str, str]) -> jax.Array:
      init = nn.with_logical_partitioning(_kernel_init(), axes)
      return self.param(name, init, shape, jnp.float32)

    wi_0 = param("wi_0", (embed, self.mlp_dim), (pt.EMBED, pt.MLP))
    wi_1 = param("wi_1", (embed, self.mlp_dim), (pt.EMBED, pt.MLP))
    wo = param("wo", (self.mlp_dim, embed), (pt.MLP, pt.EMBED))
    gate = matmul.einsum("...e,em->...m", x, wi_0, self.dtype)
    hidden = nn.gelu(gate) * matmul.einsum("...e,em->...m", x, wi_1, self.dtype)
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return matmul.einsum("...m,me->...e", hidden, wo, self.dtype)  # [batch, length, embed]
