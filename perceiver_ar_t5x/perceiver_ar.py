"""The Perceiver AR decoder (Hawthorne et al. 2022, arXiv:2202.07765).

Layer 0 is a cross-attention whose queries are the last `num_latents` positions
of each example and whose keys/values are the whole input (minus dropped prefix
positions at training time); it is causal in true positions. The remaining
`num_layers - 1` blocks are causal self-attention over the latents only, so the
cost of depth is independent of the context length. Logits come out for the
latent positions only.
"""

from __future__ import annotations

import enum
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x import slicing
from perceiver_ar_t5x.layers.attention import Attention, AttentionKernel
from perceiver_ar_t5x.layers.embedding import (
  Embed,
  LearnedPositions,
  OutputHead,
  PositionEncoding,
  sinusoidal_positions,
)
from perceiver_ar_t5x.layers.mlp import GatedGeluMlp
from perceiver_ar_t5x.layers.norms import RMSNorm


class RematPolicy(enum.Enum):
  """What each block keeps for the backward pass (jax.checkpoint policies).

  NONE: keep everything (no recomputation; most memory).
  FULL: keep only the block inputs; recompute the whole block.
  DOTS: keep matmul outputs, recompute elementwise ops.
  DOTS_NO_BATCH: keep only matmuls without batch dims (projections, MLP), recompute
    attention scores (the usual choice for long sequences).
  """

  NONE = "none"
  FULL = "full"
  DOTS = "dots"
  DOTS_NO_BATCH = "dots_no_batch"


_POLICIES = {
    RematPolicy.FULL: None,
    RematPolicy.DOTS: jax.checkpoint_policies.dots_saveable,
    RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-RMSNorm attention + gated-GELU MLP; cross-attention when kv_x is given."""

  embed_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  rotary_fraction: float | None = 0.5
  max_timescale: float = 1e4
  dtype: jnp.dtype = jnp.float32
  attention_kernel: AttentionKernel = AttentionKernel.PLAIN
  attention_chunk_size: int = 1024

  def setup(self) -> None:
    self.pre_attention_norm = RMSNorm(dtype=self.dtype)
    self.attention = Attention(embed_dim=self.embed_dim, num_heads=self.num_heads,
                               head_dim=self.head_dim, rotary_fraction=self.rotary_fraction,
                               max_timescale=self.max_timescale,
                               dropout_rate=self.dropout_rate, dtype=self.dtype,
                               kernel=self.attention_kernel,
                               chunk_size=self.attention_chunk_size)
    self.pre_mlp_norm = RMSNorm(dtype=self.dtype)
    self.mlp = GatedGeluMlp(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                            dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, x: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
               kv_x: jax.Array | None = None, k_pos: jax.Array | None = None,
               k_seg: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
    """x [batch, latents, embed]; kv_x [batch, keys, embed] or None for self-attention."""
    y = self.pre_attention_norm(x)
    kv_scale = None
    if kv_x is None:
      kv_y, k_pos, k_seg = y, q_pos, q_seg
    elif self.attention_kernel == AttentionKernel.CHUNKED:
      # the same norm as the latent rows had, applied per key chunk inside the kernel
      kv_y, kv_scale = kv_x, nn.unbox(self.pre_attention_norm.variables["params"]["scale"])
    else:
      kv_y = self.pre_attention_norm(kv_x)  # the same norm as the latent rows had
    x = x + self.attention(y, kv_y, q_pos, k_pos, q_seg, k_seg, kv_norm_scale=kv_scale,
                           self_attention=kv_x is None, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (pt.BATCH, pt.LATENTS, pt.EMBED))
    h = self.mlp(self.pre_mlp_norm(x), deterministic=deterministic)
    return x + self.dropout(h, deterministic=deterministic)


class _FieldBlock(Block):
  """A Block whose `deterministic` is a field, so remat/scan never trace the flag."""

  deterministic: bool = True

  def __call__(self, x: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
               kv_x: jax.Array | None = None, k_pos: jax.Array | None = None,
               k_seg: jax.Array | None = None) -> jax.Array:
    return super().__call__(x, q_pos, q_seg, kv_x, k_pos, k_seg,
                            deterministic=self.deterministic)


class _ScannedBlock(_FieldBlock):
  """A latent self-attention block in nn.scan's (carry, x) -> (carry, y) form."""

  def __call__(self, x: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None
               ) -> tuple[jax.Array, None]:
    return super().__call__(x, q_pos, q_seg), None


def latent_layer_params(params: Any, index: int) -> Any:
  """Params of latent block `index` (1..num_layers-1) under either layer layout.

  Unrolled models store `layers_{index}`; scanned models (scan_layers=True) store
  all latent blocks stacked on a leading axis under `latent_layers`.
  """
  if "latent_layers" in params:
    return jax.tree_util.tree_map(lambda p: p[index - 1], params["latent_layers"])
  return params[f"layers_{index}"]


class PerceiverAR(nn.Module):
  """Token ids -> logits for the latent positions.

  Attributes:
    vocab_size: output and input vocabulary size.
    num_latents: N, the number of final positions that become latents.
    num_layers: 1 cross-attention layer + (num_layers - 1) latent self-attention layers.
    prefix_dropout: fraction of prefix (non-latent) positions removed from
      layer 0's keys at training time (paper, Sec. 3.3); removed for real, so
      layer 0 costs (1 - prefix_dropout) of its full price.
    position_encoding: rotary (default) or an absolute encoding.
    rotary_fraction: share of each head's features that are rotated.
    max_length: rows of the learned absolute position table.
    tie_embeddings: reuse the input embedding as the output head.
    dtype: activation dtype (params are always float32).
    remat_policy: what each block saves for the backward pass (RematPolicy).
    attention_kernel: PLAIN or CHUNKED attention (same numbers; CHUNKED has
      memory linear in the context, for layer 0 at long contexts).
    attention_chunk_size: keys per step of the CHUNKED kernel.
    scan_layers: run the latent blocks with nn.scan (compile time flat in depth);
      params then live stacked under `latent_layers` (see latent_layer_params).
  """

  vocab_size: int
  num_latents: int
  embed_dim: int = 512
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 1365
  num_layers: int = 6
  dropout_rate: float = 0.0
  prefix_dropout: float = 0.0
  position_encoding: PositionEncoding = PositionEncoding.ROTARY
  rotary_fraction: float = 0.5
  max_timescale: float = 1e4
  max_length: int = 8192
  tie_embeddings: bool = False
  dtype: jnp.dtype = jnp.float32
  remat_policy: RematPolicy = RematPolicy.NONE
  attention_kernel: AttentionKernel = AttentionKernel.PLAIN
  attention_chunk_size: int = 1024
  scan_layers: bool = False

  def _block_kwargs(self) -> dict[str, Any]:
    rotary = self.rotary_fraction if self.position_encoding == PositionEncoding.ROTARY else None
    return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, head_dim=self.head_dim,
                mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, rotary_fraction=rotary,
                max_timescale=self.max_timescale, dtype=self.dtype,
                attention_kernel=self.attention_kernel,
                attention_chunk_size=self.attention_chunk_size)

  def _remat(self, cls: type[nn.Module], **kwargs: Any) -> type[nn.Module]:
    if self.remat_policy == RematPolicy.NONE:
      return cls
    return nn.remat(cls, policy=_POLICIES[self.remat_policy], **kwargs)

  def _block(self, name: str, deterministic: bool) -> Block:
    return self._remat(_FieldBlock)(**self._block_kwargs(), deterministic=deterministic,
                                    name=name)

  def _latent_stack(self, h: jax.Array, lat_pos: jax.Array, lat_seg: jax.Array | None,
                    deterministic: bool) -> jax.Array:
    """Blocks 1..num_layers-1: self-attention over the latents, unrolled or scanned."""
    if not self.scan_layers:
      for i in range(1, self.num_layers):
        h = self._block(f"layers_{i}", deterministic)(h, lat_pos, lat_seg)
      return h
    if self.num_layers < 2:
      return h
    scanned = nn.scan(self._remat(_ScannedBlock, prevent_cse=False),
                      variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers - 1,
                      metadata_params={nn.PARTITION_NAME: pt.LAYERS})
    h, _ = scanned(**self._block_kwargs(), deterministic=deterministic,
                   name="latent_layers")(h, lat_pos, lat_seg)
    return h

  def embed_tokens(self, embedder: Embed, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """[batch, length] -> [batch, length, embed], absolute positions added if configured."""
    x = embedder(tokens)
    if self.position_encoding == PositionEncoding.LEARNED:
      x = x + LearnedPositions(self.max_length, self.embed_dim,
                               name="position_embedder")(positions).astype(self.dtype)
    elif self.position_encoding == PositionEncoding.SINUSOIDAL:
      x = x + sinusoidal_positions(positions, self.embed_dim).astype(self.dtype)
    return x

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, latent_starts: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Computes logits [batch, min(num_latents, length), vocab] (float32).

    Args:
      tokens: [batch, length] decoder input token ids.
      positions: [batch, length] positions (default 0..length-1; per segment when packed).
      segment_ids: [batch, length] packed-example ids (0 = padding), or None.
      latent_starts: [batch] first latent position of each example (default
        length - num_latents: the latents are the last positions).
      deterministic: disables dropout and prefix dropout.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be int [batch, length], got {tokens.dtype}{tokens.shape}")
    batch, length = tokens.shape
    n = slicing.num_latent_positions(self.num_latents, length)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if latent_starts is None:
      latent_starts = jnp.full((batch,), length - n, jnp.int32)
    embedder = Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="token_embedder")
    x = self.embed_tokens(embedder, tokens, positions)  # [batch, length, embed]
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (pt.BATCH, pt.LENGTH, pt.EMBED))

    lat_x = slicing.window(x, latent_starts, n)  # [batch, latents, embed]
    lat_pos = slicing.window(positions, latent_starts, n)  # [batch, latents]
    lat_seg = None if segment_ids is None else slicing.window(segment_ids, latent_starts, n)
    kv_x, k_pos, k_seg = x, positions, segment_ids
    if not deterministic and self.prefix_dropout > 0.0 and length > n:
      keep = slicing.num_kept_prefix(length - n, self.prefix_dropout)
      idx = slicing.prefix_keep_indices(self.make_rng("dropout"), latent_starts, n, length,
                                        keep)  # [batch, keep]
      kv_x = jnp.concatenate([slicing.take(x, idx), lat_x], axis=1)
      k_pos = jnp.concatenate([slicing.take(positions, idx), lat_pos], axis=1)
      if segment_ids is not None:
        k_seg = jnp.concatenate([slicing.take(segment_ids, idx), lat_seg], axis=1)
    # Layer-0 keys/values: their length axis may be sharded (PartitioningConfig.shard_length).
    kv_x = nn.with_logical_constraint(kv_x, (pt.BATCH, pt.LENGTH, pt.EMBED))  # [b, keys, e]

    h = self._block("layers_0", deterministic)(lat_x, lat_pos, lat_seg, kv_x, k_pos, k_seg)
    h = self._latent_stack(h, lat_pos, lat_seg, deterministic)
    h = RMSNorm(dtype=self.dtype, name="decoder_norm")(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    if self.tie_embeddings:
      return embedder.attend(h)
    return OutputHead(self.vocab_size, name="logits_dense")(h)  # [batch, latents, vocab]
