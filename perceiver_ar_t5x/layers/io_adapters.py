"""Perceiver IO's input adapters and classifier head (Jaegle et al. 2021, Sec. 3 and App. D).

An input adapter turns a modality into a [batch, m, channels] array the encoder's
cross-attention reads: token ids get a learned embedding plus a learned position
table (the byte-level language model); an array of any index shape (pixels, audio
samples, ...) gets Fourier position features concatenated to its channels, so
the model needs no knowledge of the modality's geometry beyond the positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.layers.embedding import (
  Embed,
  LearnedPositions,
  PositionEncoding,
  sinusoidal_positions,
)


class TokenInput(nn.Module):
  """Token ids [batch, length] -> embeddings + learned positions [batch, length, features].

  Params: `token_embed/embedding` [vocab, features] (also the MLM head, `attend`) and,
  with learned positions (the paper's MLM), `positions/embedding` [max_length, features].
  position_encoding SINUSOIDAL adds fixed sin/cos codes instead (no table): every
  position is distinct from the first step, which shortens the plateau a small MLM
  spends learning where its bytes are (README, Perceiver IO).
  """

  vocab_size: int
  features: int
  max_length: int
  dtype: jnp.dtype = jnp.float32
  position_encoding: PositionEncoding = PositionEncoding.LEARNED

  def setup(self) -> None:
    if self.position_encoding == PositionEncoding.ROTARY:
      raise ValueError("TokenInput takes LEARNED or SINUSOIDAL positions, not ROTARY")
    # small init: the same table is the MLM head, and unit-variance rows would start it
    # with logits of size sqrt(features)
    self.token_embed = Embed(self.vocab_size, self.features, dtype=self.dtype, stddev=0.02)
    if self.position_encoding == PositionEncoding.LEARNED:
      self.positions = LearnedPositions(self.max_length, self.features)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"TokenInput takes int token ids [batch, length], got {tokens.dtype} "
                       f"{tokens.shape}")
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"{tokens.shape[1]} tokens exceed the learned position table "
                       f"(max_length={self.max_length})")
    pos = jnp.arange(tokens.shape[1])[None, :]
    if self.position_encoding == PositionEncoding.LEARNED:
      return self.token_embed(tokens) + self.positions(pos).astype(self.dtype)
    code = sinusoidal_positions(pos, self.features) * 0.02  # the embeddings' scale
    return self.token_embed(tokens) + code.astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """[batch, n, features] -> f32 logits [batch, n, vocab] with the tied embedding."""
    return self.token_embed.attend(x)


def fourier_features(index_dims: tuple[int, ...], num_bands: int,
                     max_resolution: tuple[int, ...] | None = None, *,
                     concat_pos: bool = True, sine_only: bool = False) -> np.ndarray:
  """Fourier position features [prod(index_dims), channels] (paper App. D, Eq. 3).

  Positions are a grid over [-1, 1] per dimension; each dimension d gets num_bands
  frequencies linearly spaced from 1 to max_resolution[d] / 2 (Nyquist), and the
  features are [pos (if concat_pos), sin(pi f pos) (dimension-major), cos(pi f pos)
  (unless sine_only)], the layout of the official implementation.
  """
  res = tuple(index_dims if max_resolution is None else max_resolution)
  if len(res) != len(index_dims):
    raise ValueError(f"max_resolution {res} must have one entry per index dim {index_dims}")
  axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in index_dims]
  pos = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(index_dims))
  bands = np.stack([np.linspace(1.0, r / 2, num_bands, dtype=np.float32) for r in res])
  angles = (pos[:, :, None] * bands[None]).reshape(pos.shape[0], -1) * np.float32(np.pi)
  parts = [pos] if concat_pos else []
  parts += [np.sin(angles)] if sine_only else [np.sin(angles), np.cos(angles)]
  return np.concatenate(parts, axis=-1).astype(np.float32)


class ArrayInput(nn.Module):
  """An array [batch, *index_dims, channels] -> [batch, prod(index_dims), channels + pos].

  No params: the Fourier features (fourier_features) are concatenated to each
  element's channels, as the official image classifier's pixel input does.
  """

  index_dims: tuple[int, ...]
  num_bands: int
  max_resolution: tuple[int, ...] | None = None
  concat_pos: bool = True
  sine_only: bool = False
  dtype: jnp.dtype = jnp.float32

  def __call__(self, x: jax.Array) -> jax.Array:
    dims = tuple(self.index_dims)
    if x.ndim != len(dims) + 2 or tuple(x.shape[1:-1]) != dims:
      raise ValueError(f"ArrayInput expects [batch, {', '.join(map(str, dims))}, channels], "
                       f"got {x.shape}")
    pos = fourier_features(dims, self.num_bands, self.max_resolution,
                           concat_pos=self.concat_pos, sine_only=self.sine_only)
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).astype(self.dtype)
    pos = jnp.broadcast_to(jnp.asarray(pos, self.dtype), (x.shape[0],) + pos.shape)
    return jnp.concatenate([flat, pos], axis=-1)


class Classifier(nn.Module):
  """[batch, n, features] -> f32 logits [batch, n, num_classes] (params `kernel`, `bias`)."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (pt.EMBED, pt.VOCAB)),
                        (x.shape[-1], self.num_classes), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (pt.VOCAB,)),
                      (self.num_classes,), jnp.float32)
    return jnp.einsum("bne,ec->bnc", x.astype(jnp.float32), kernel) + bias
