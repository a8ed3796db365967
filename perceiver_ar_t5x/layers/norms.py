"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019; T5 / flaxformer) and LayerNorm
(Ba et al. 2016; the official Perceiver AR and krasserm's perceiver-io).

Both keep their statistics in float32 whatever the activation dtype, because bf16
variance estimates over wide embeddings are too coarse. `normalize` is the one
definition of the math: the modules, the fused key/value projection of the CHUNKED
kernel and the one-token decoding step all call it with the module's own params.
"""

from __future__ import annotations

import enum
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt


class NormKind(enum.Enum):
  """RMS: x / rms(x) * scale (no mean, no bias). LAYER: (x - mean) / std * scale + bias."""

  RMS = "rms"
  LAYER = "layer"


def normalize(x: jax.Array, params: Any, kind: NormKind, epsilon: float,
              dtype: jnp.dtype) -> jax.Array:
  """Normalises the last axis of x with params {"scale"[, "bias"]} ([features] each)."""
  x32 = x.astype(jnp.float32)
  if kind == NormKind.LAYER:
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
  y = x32 * inv * params["scale"]
  if "bias" in params:
    y = y + params["bias"]
  return y.astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float, dtype: jnp.dtype) -> jax.Array:
  """x / rms(x) * scale over the last axis, statistics in float32."""
  return normalize(x, {"scale": scale}, NormKind.RMS, epsilon, dtype)


class Norm(nn.Module):
  """RMSNorm or LayerNorm over the last axis; params `scale` (and `bias` for LAYER + use_bias).

  Attributes:
    kind: NormKind.RMS (default, as T5) or NormKind.LAYER.
    epsilon: added to the variance (1e-6 for T5; 1e-5 for PyTorch/Haiku LayerNorm).
    use_bias: LayerNorm's learned offset (ignored by RMS, which has none).
  """

  kind: NormKind = NormKind.RMS
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return normalize(x, self.norm_params(x.shape[-1]), self.kind, self.epsilon, self.dtype)

  def norm_params(self, features: int) -> dict[str, jax.Array]:
    """The params as the dict `normalize` takes (for fused callers)."""
    def param(name: str, init: nn.initializers.Initializer) -> jax.Array:
      return self.param(name, nn.with_logical_partitioning(init, (pt.EMBED,)), (features,),
                        jnp.float32)

    params = {"scale": param("scale", nn.initializers.ones)}
    if self.kind == NormKind.LAYER and self.use_bias:
      params["bias"] = param("bias", nn.initializers.zeros)
    return params
