"""Token embedding, output head and absolute position encodings."""

from __future__ import annotations

import enum

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_t5x import partitioning as pt


class PositionEncoding(enum.Enum):
  """How positions enter the model.

  ROTARY: rotate queries/keys in every attention layer (default, paper Sec. 3.2).
  LEARNED: a learned absolute table added to the token embeddings.
  SINUSOIDAL: fixed sin/cos absolute encodings added to the token embeddings.
  """

  ROTARY = "rotary"
  LEARNED = "learned"
  SINUSOIDAL = "sinusoidal"


class Embed(nn.Module):
  """Token embedding table; `attend` reuses it as a tied output head."""

  vocab_size: int
  features: int
  dtype: jnp.dtype = jnp.float32
  stddev: float = 1.0  # init; 0.02 for Perceiver IO's tied MLM head (HF's initializer_range)

  def setup(self) -> None:
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=self.stddev),
                                     (pt.VOCAB, pt.EMBED)),
        (self.vocab_size, self.features), jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # [batch, length] -> [batch, length, embed]
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    # [batch, latents, embed] -> [batch, latents, vocab], f32 logits.
    return jnp.einsum("ble,ve->blv", x.astype(jnp.float32), self.embedding)


class OutputHead(nn.Module):
  """Untied projection to the vocabulary; logits are always float32."""

  vocab_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                                     (pt.EMBED, pt.VOCAB)),
        (x.shape[-1], self.vocab_size), jnp.float32)
    return jnp.einsum("ble,ev->blv", x.astype(jnp.float32), kernel)


class LatentQuery(nn.Module):
  """The official Perceiver AR's affine map of the latents' embeddings to layer 0's queries."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (pt.EMBED, pt.JOINED_KV)),
        (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (pt.EMBED,)),
                      (self.features,), jnp.float32)
    y = jnp.einsum("...e,ef->...f", x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)  # [batch, latents, embed]


class LearnedPositions(nn.Module):
  """A learned absolute position table of `max_length` rows."""

  max_length: int
  features: int

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (pt.LENGTH, pt.EMBED)),
        (self.max_length, self.features), jnp.float32)
    return jnp.take(table, positions, axis=0, mode="clip")  # [batch, length, embed]


def sinusoidal_positions(positions: jax.Array, features: int,
                         max_timescale: float = 1e4) -> jax.Array:
  """Vaswani et al. (2017) encodings: [batch, length] -> [batch, length, features]."""
  half = features // 2
  inv = max_timescale ** (-np.arange(half, dtype=np.float32) / max(half, 1))
  angles = positions.astype(jnp.float32)[..., None] * inv
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(enc, [(0, 0), (0, 0), (0, features - 2 * half)])
