"""The Perceiver AR decoder (Hawthorne et al. 2022, arXiv:2202.07765).

Layer 0 is a cross-attention whose queries are the last `num_latents` positions
of each example and whose keys/values are the whole input (minus dropped prefix
positions at training time); it is causal in true positions. The remaining
`num_layers - 1` blocks are causal self-attention over the latents only, so the
cost of depth is independent of the context length. Logits come out for the
latent positions only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x import slicing
from perceiver_ar_t5x.layers.attention import AttentionKernel
from perceiver_ar_t5x.layers.block import Block, BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.embedding import (
  Embed,
  LatentQuery,
  LearnedPositions,
  OutputHead,
  PositionEncoding,
  sinusoidal_positions,
)
from perceiver_ar_t5x.layers.norms import Norm
from perceiver_ar_t5x.layers.stack import (
  POLICIES,
  FieldBlock,
  RematPolicy,
  ScannedBlock,
  latent_layer_params,
)


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
    rotary_layers: how many leading layers rotate queries/keys (None: all layers
      with ROTARY, none with an absolute encoding; krasserm's models add rotary
      to a learned table in layer 0 only).
    max_length: rows of the learned absolute position table.
    position_table_trainable: False freezes the learned table (no gradient reaches it;
      the official model's frozen sinusoidal table is imported as such a table).
    tie_embeddings: reuse the input embedding as the output head.
    output_bias: a learned bias on the logits.
    final_norm: normalise before the output head (krasserm's text models have none).
    latent_query_projection: layer 0's query rows are a learned affine map of the
      latents' embeddings (`latent_query`; the official model); the keys/values and
      the residual take the unprojected rows and the projected ones respectively.
    cross_mlp_dim: layer 0's MLP width where it differs from the latent layers' (krasserm).
    block: the block's architecture variants (norms, biases, MLP; layers/block.py).
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
  rotary_layers: int | None = None
  max_timescale: float = 1e4
  max_length: int = 8192
  position_table_trainable: bool = True
  tie_embeddings: bool = False
  output_bias: bool = False
  final_norm: bool = True
  latent_query_projection: bool = False
  cross_mlp_dim: int | None = None
  block: BlockOptions = BlockOptions()
  dtype: jnp.dtype = jnp.float32
  remat_policy: RematPolicy = RematPolicy.NONE
  attention_kernel: AttentionKernel = AttentionKernel.PLAIN
  attention_chunk_size: int = 1024
  scan_layers: bool = False

  @property
  def num_rotary_layers(self) -> int:
    if self.rotary_layers is not None:
      return min(self.rotary_layers, self.num_layers)
    return self.num_layers if self.position_encoding == PositionEncoding.ROTARY else 0

  def block_kwargs(self, index: int) -> dict[str, Any]:
    """The Block fields of layer `index` (0 = the cross-attention layer)."""
    if self.scan_layers and 1 < self.num_rotary_layers < self.num_layers:
      raise ValueError(f"scan_layers needs the same rotary in every latent layer; "
                       f"rotary_layers={self.rotary_layers} of {self.num_layers}")
    if self.latent_query_projection and self.block.cross_kv_norm == CrossKvNorm.PREFIX:
      raise ValueError("latent_query_projection with CrossKvNorm.PREFIX is not a known model")
    rotary = self.rotary_fraction if index < self.num_rotary_layers else None
    mlp_dim = self.cross_mlp_dim if index == 0 and self.cross_mlp_dim else self.mlp_dim
    return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, head_dim=self.head_dim,
                mlp_dim=mlp_dim, dropout_rate=self.dropout_rate, rotary_fraction=rotary,
                max_timescale=self.max_timescale, dtype=self.dtype,
                attention_kernel=self.attention_kernel,
                attention_chunk_size=self.attention_chunk_size, options=self.block,
                kv_norm=self.block.cross_kv_norm if index == 0 else CrossKvNorm.SHARED)

  def make_block(self, index: int) -> Block:
    """An unbound Block for layer `index` (bind it to `layer_params(params)[index]`)."""
    return Block(**self.block_kwargs(index), parent=None)

  def layer_params(self, params: Any) -> list[Any]:
    """Each block's own params, 0..L-1 (latent params un-stacked under either layout)."""
    return [params["layers_0"]] + [latent_layer_params(params, i)
                                   for i in range(1, self.num_layers)]

  def _remat(self, cls: type[nn.Module], **kwargs: Any) -> type[nn.Module]:
    if self.remat_policy == RematPolicy.NONE:
      return cls
    return nn.remat(cls, policy=POLICIES[self.remat_policy], **kwargs)

  def _block(self, index: int, deterministic: bool) -> Block:
    return self._remat(FieldBlock)(**self.block_kwargs(index), deterministic=deterministic,
                                    name=f"layers_{index}")

  def _latent_stack(self, h: jax.Array, lat_pos: jax.Array, lat_seg: jax.Array | None,
                    deterministic: bool) -> jax.Array:
    """Blocks 1..num_layers-1: self-attention over the latents, unrolled or scanned."""
    if not self.scan_layers:
      for i in range(1, self.num_layers):
        h = self._block(i, deterministic)(h, lat_pos, lat_seg)
      return h
    if self.num_layers < 2:
      return h
    scanned = nn.scan(self._remat(ScannedBlock, prevent_cse=False),
                      variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers - 1,
                      metadata_params={nn.PARTITION_NAME: pt.LAYERS})
    h, _ = scanned(**self.block_kwargs(1), deterministic=deterministic,
                   name="latent_layers")(h, lat_pos, lat_seg)
    return h

  # The embedding and the head, as submodules (inside __call__) and from params
  # (cached decoding): the one place that knows their parameter names.
  # Submodules are made with a name inside __call__ and with parent=None (free-standing,
  # applied to that name's params) by the *_from_params methods.
  def _embedder(self, **kw: Any) -> Embed:
    return Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, **kw)

  def _positions(self, **kw: Any) -> LearnedPositions:
    return LearnedPositions(self.max_length, self.embed_dim, **kw)

  def _final_norm(self, **kw: Any) -> Norm:
    o = self.block
    return Norm(kind=o.norm, epsilon=o.norm_epsilon, dtype=self.dtype, **kw)

  def _head(self, **kw: Any) -> OutputHead:
    return OutputHead(self.vocab_size, **kw)

  def _add_positions(self, x: jax.Array, positions: jax.Array, table: Any) -> jax.Array:
    if self.position_encoding == PositionEncoding.LEARNED:
      rows = table(positions)
      if not self.position_table_trainable:
        rows = jax.lax.stop_gradient(rows)
      x = x + rows.astype(self.dtype)
    elif self.position_encoding == PositionEncoding.SINUSOIDAL:
      x = x + sinusoidal_positions(positions, self.embed_dim).astype(self.dtype)
    return x

  def _logits(self, h: jax.Array, embedder: Any, head: Any, bias: jax.Array | None
              ) -> jax.Array:
    logits = embedder.attend(h) if self.tie_embeddings else head(h)  # f32 [b, r, vocab]
    return logits if bias is None else logits + bias

  def embed_from_params(self, params: Any, tokens: jax.Array, positions: jax.Array
                        ) -> jax.Array:
    """[b, r] tokens at [b, r] positions -> [b, r, embed], as __call__ embeds them."""
    x = self._embedder(parent=None).apply({"params": params["token_embedder"]}, tokens)

    def table(pos: jax.Array) -> jax.Array:
      return self._positions(parent=None).apply({"params": params["position_embedder"]}, pos)

    return self._add_positions(x, positions, table)

  def _latent_query(self, **kw: Any) -> LatentQuery:
    return LatentQuery(self.embed_dim, dtype=self.dtype, **kw)

  def latent_query_from_params(self, params: Any, x: jax.Array) -> jax.Array:
    """Layer 0's query rows from the latents' embedded rows x [b, r, embed]."""
    if not self.latent_query_projection:
      return x
    return self._latent_query(parent=None).apply({"params": params["latent_query"]}, x)

  def head_from_params(self, params: Any, h: jax.Array) -> jax.Array:
    """[b, r, embed] -> float32 logits [b, r, vocab]: final norm and output head."""
    if self.final_norm:
      h = self._final_norm(parent=None).apply({"params": params["decoder_norm"]}, h)
    embedder = self._embedder(parent=None).bind({"params": params["token_embedder"]})
    head = (None if self.tie_embeddings else
            self._head(parent=None).bind({"params": params["logits_dense"]}))
    bias = nn.unbox(params["logits_bias"]) if self.output_bias else None
    return self._logits(h, embedder, head, bias)

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
    embedder = self._embedder(name="token_embedder")
    learned = self.position_encoding == PositionEncoding.LEARNED
    table = self._positions(name="position_embedder") if learned else None
    x = self._add_positions(embedder(tokens), positions, table)  # [batch, length, embed]
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (pt.BATCH, pt.LENGTH, pt.EMBED))

    lat_x = slicing.window(x, latent_starts, n)  # [batch, latents, embed]
    lat_pos = slicing.window(positions, latent_starts, n)  # [batch, latents]
    lat_seg = None if segment_ids is None else slicing.window(segment_ids, latent_starts, n)
    kv_x, k_pos, k_seg = x, positions, segment_ids
    index = jnp.arange(length)[None, :]
    kv_is_latent = (index >= latent_starts[:, None]) & (index < latent_starts[:, None] + n)
    if not deterministic and self.prefix_dropout > 0.0 and length > n:
      keep = slicing.num_kept_prefix(length - n, self.prefix_dropout)
      idx = slicing.prefix_keep_indices(self.make_rng("dropout"), latent_starts, n, length,
                                        keep)  # [batch, keep]
      kv_x = jnp.concatenate([slicing.take(x, idx), lat_x], axis=1)
      k_pos = jnp.concatenate([slicing.take(positions, idx), lat_pos], axis=1)
      kv_is_latent = jnp.arange(keep + n)[None, :] >= keep
      if segment_ids is not None:
        k_seg = jnp.concatenate([slicing.take(segment_ids, idx), lat_seg], axis=1)
    # Layer-0 keys/values: their length axis may be sharded (PartitioningConfig.shard_length).
    kv_x = nn.with_logical_constraint(kv_x, (pt.BATCH, pt.LENGTH, pt.EMBED))  # [b, keys, e]

    q_x = (self._latent_query(name="latent_query")(lat_x) if self.latent_query_projection
           else lat_x)
    h = self._block(0, deterministic)(q_x, lat_pos, lat_seg, kv_x, k_pos, k_seg, kv_is_latent)
    h = self._latent_stack(h, lat_pos, lat_seg, deterministic)
    if self.final_norm:
      h = self._final_norm(name="decoder_norm")(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    head = None if self.tie_embeddings else self._head(name="logits_dense")
    bias = (self.param("logits_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   (pt.VOCAB,)),
                       (self.vocab_size,), jnp.float32) if self.output_bias else None)
    return self._logits(h, embedder, head, bias)  # [batch, latents, vocab]
