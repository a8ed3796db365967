"""The feed-forward block: gated (Shazeer 2020, "GLU Variants") or plain, biases optional.

Defaults are T5.1.1 / flaxformer's gated GELU without biases. The plain MLP with
biases and exact GELU is the official Perceiver AR's and krasserm's; squared ReLU
is Primer's (So et al. 2021). `activate` is the one definition of each activation,
used by this module and by the fused one-token decoding step.
"""

from __future__ import annotations

import enum

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.layers import matmul


class Activation(enum.Enum):
  GELU_TANH = "gelu_tanh"  # tanh approximation (jax.nn.gelu's default; T5/flaxformer)
  GELU = "gelu"  # exact, erf-based (PyTorch nn.GELU's default)
  RELU = "relu"
  SQUARED_RELU = "squared_relu"


def activate(kind: Activation, x: jax.Array) -> jax.Array:
  if kind == Activation.GELU_TANH:
    return nn.gelu(x, approximate=True)
  if kind == Activation.GELU:
    return nn.gelu(x, approximate=False)
  if kind == Activation.RELU:
    return nn.relu(x)
  return jnp.square(nn.relu(x))


def _kernel_init() -> nn.initializers.Initializer:
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class Mlp(nn.Module):
  """gated: (act(x W0) * (x W1)) Wo (params wi_0, wi_1, wo); else act(x Wi) Wo (wi, wo).

  With use_bias each kernel has a `<name>_bias` beside it.
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  activation: Activation = Activation.GELU_TANH
  gated: bool = True
  use_bias: bool = False

  def dense(self, x: jax.Array, name: str, features: int, axes: tuple[str, str]) -> jax.Array:
    """x [..., k] through the kernel `name` ([k, features]) and its bias if any."""
    kernel = self.param(name, nn.with_logical_partitioning(_kernel_init(), axes),
                        (x.shape[-1], features), jnp.float32)
    y = matmul.einsum("...k,kn->...n", x, kernel, self.dtype)
    if self.use_bias:
      bias = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     axes[1:]),
                        (features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """[..., embed] -> [..., embed]."""
    in_axes = (pt.EMBED, pt.MLP)
    if self.gated:
      hidden = (activate(self.activation, self.dense(x, "wi_0", self.mlp_dim, in_axes))
                * self.dense(x, "wi_1", self.mlp_dim, in_axes))
    else:
      hidden = activate(self.activation, self.dense(x, "wi", self.mlp_dim, in_axes))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return self.dense(hidden, "wo", x.shape[-1], (pt.MLP, pt.EMBED))
