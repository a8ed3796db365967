"""Multi-head attention with separate query and key/value inputs.

One module serves both Perceiver AR attention kinds: layer 0 (latent queries,
keys/values over the whole input) and the latent self-attention stack (queries
and keys/values both the latents). Masks come from true positions (see masks.py).
"""

from __future__ import annotations

import enum
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import masks
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.layers import matmul, rotary
from perceiver_ar_t5x.layers.block_causal import block_causal_attention
from perceiver_ar_t5x.layers.chunked_attention import chunked_projected_attention
from perceiver_ar_t5x.layers.norms import NormKind, normalize


class AttentionKernel(enum.Enum):
  """How softmax(q k^T) v is computed; both give the same numbers.

  PLAIN: materialises the [batch, heads, q_len, k_len] scores (fastest for short keys).
  CHUNKED: online softmax over `chunk_size` keys at a time with the key/value
    projection fused into the loop, gradient by recomputation
    (chunked_attention.py): memory linear in k_len, no full-length k/v.
  """

  PLAIN = "plain"
  CHUNKED = "chunked"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                          k_pos: jax.Array, q_seg: jax.Array | None = None,
                          k_seg: jax.Array | None = None) -> jax.Array:
  """Plain softmax attention; q is expected pre-scaled by 1/sqrt(head_dim).

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, k_len, heads, head_dim]
    q_pos, k_pos: [batch, q_len] / [batch, k_len] positions for the causal mask.
    q_seg, k_seg: optional segment ids for packed batches.

  Returns:
    [batch, q_len, heads, head_dim]
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits + masks.mask_to_bias(masks.attention_mask(q_pos, k_pos, q_seg, k_seg))
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  # plain jnp.einsum, not matmul.einsum: XLA CPU has no bf16 x bf16 -> f32 kernel for
  # some of this product's transposes (the CHUNKED kernel writes its own backward)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def project_key_value(weights: dict[str, Any], x: jax.Array, positions: jax.Array, *,
                      dtype: jnp.dtype, rotary_fraction: float | None, max_timescale: float,
                      norm_kind: NormKind = NormKind.RMS, norm_epsilon: float = 1e-6
                      ) -> tuple[jax.Array, jax.Array]:
  """x [batch, len, embed] -> rotated keys, values [batch, len, heads, head_dim].

  weights: {"key", "value"} kernels, their "key_bias"/"value_bias" if the layer has
  biases, and "norm" (the key/value input's norm params) to normalise x first (fused so
  that the CHUNKED kernel never holds the normed input at full length).
  """
  if "norm" in weights:
    x = normalize(x, weights["norm"], norm_kind, norm_epsilon, dtype)
  x = x.astype(dtype)
  k = matmul.einsum("ble,ehd->blhd", x, weights["key"], dtype)
  v = matmul.einsum("ble,ehd->blhd", x, weights["value"], dtype)
  if "key_bias" in weights:
    k = k + weights["key_bias"].astype(dtype)
    v = v + weights["value_bias"].astype(dtype)
  if rotary_fraction is not None:
    k = rotary.apply_rotary(k, positions, fraction=rotary_fraction, max_timescale=max_timescale)
  return k, v


class Attention(nn.Module):
  """Projections, optional rotary embeddings, masked attention and output projection.

  The projection methods are public so cached decoding runs them one step at a
  time with the same parameters; `kv_weights` and `query_kernel` are the only
  places that know how the parameters combine.

  Attributes:
    use_bias: biases on the query/key/value ([heads, head_dim]) and output ([embed])
      projections (official Perceiver AR, krasserm); T5-style models have none.
    scale_query: multiply queries by head_dim**-0.5 at run time. False for models
      that fold the scale into the query kernel (flaxformer's initialiser does).
    kv_features: width of the key/value input where it differs from the query rows'
      (Perceiver IO's cross-attentions: inputs -> latents, latents -> output queries).
    v_head_dim: per-head value width where it differs from the query/key head_dim
      (Perceiver IO's separate qk and v channels).
  """

  embed_dim: int
  num_heads: int
  head_dim: int
  rotary_fraction: float | None = 1.0  # None: no rotary (absolute positions are used)
  max_timescale: float = 1e4
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  kernel: AttentionKernel = AttentionKernel.PLAIN
  chunk_size: int = 1024
  causal_block: int = 128
  use_bias: bool = False
  scale_query: bool = True
  kv_features: int | None = None
  v_head_dim: int | None = None

  def setup(self) -> None:
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=0, out_axis=(1, 2))
    out_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=(0, 1), out_axis=2)
    in_shape = (self.embed_dim, self.num_heads, self.head_dim)
    kv_in = self.kv_features or self.embed_dim
    v_dim = self.v_head_dim or self.head_dim
    in_axes = (pt.EMBED, pt.HEADS, pt.KV)

    def param(name: str, init, shape, axes) -> jax.Array:
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)

    self.query = param("query", init, in_shape, in_axes)
    self.key = param("key", init, (kv_in,) + in_shape[1:], in_axes)
    self.value = param("value", init, (kv_in, self.num_heads, v_dim), in_axes)
    self.out = param("out", out_init, (self.num_heads, v_dim, self.embed_dim),
                     (pt.HEADS, pt.KV, pt.EMBED))
    if self.use_bias:
      zeros = nn.initializers.zeros
      self.query_bias = param("query_bias", zeros, in_shape[1:], in_axes[1:])
      self.key_bias = param("key_bias", zeros, in_shape[1:], in_axes[1:])
      self.value_bias = param("value_bias", zeros, (self.num_heads, v_dim), in_axes[1:])
      self.out_bias = param("out_bias", zeros, (self.embed_dim,), (pt.EMBED,))
    self.dropout = nn.Dropout(self.dropout_rate)

  @property
  def query_scale(self) -> float:
    return self.head_dim ** -0.5 if self.scale_query else 1.0

  def query_kernel(self) -> tuple[jax.Array, jax.Array | None]:
    """The query kernel and bias [embed | -, heads, head_dim] with the query scale folded in."""
    bias = self.query_bias * self.query_scale if self.use_bias else None
    return self.query * self.query_scale, bias

  def kv_weights(self, norm: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """The key/value params as project_key_value takes them (plus the input norm's)."""
    weights = {"key": self.key, "value": self.value}
    if self.use_bias:
      weights.update(key_bias=self.key_bias, value_bias=self.value_bias)
    if norm is not None:
      weights["norm"] = norm
    return weights

  def project_query(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """[batch, len, embed] -> scaled, rotated queries [batch, len, heads, head_dim]."""
    kernel, bias = self.query_kernel()
    q = matmul.einsum("ble,ehd->blhd", x, kernel, self.dtype)
    if bias is not None:
      q = q + bias.astype(self.dtype)
    return self.rotate(q, positions)

  def project_key_value(self, x: jax.Array, positions: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
    """[batch, len, embed] -> rotated keys and values [batch, len, heads, head_dim]."""
    return self._kv_fn()(self.kv_weights(), x, positions)

  def _kv_fn(self, norm_kind: NormKind = NormKind.RMS, norm_epsilon: float = 1e-6):
    return functools.partial(project_key_value, dtype=self.dtype,
                             rotary_fraction=self.rotary_fraction,
                             max_timescale=self.max_timescale, norm_kind=norm_kind,
                             norm_epsilon=norm_epsilon)

  def project_out(self, x: jax.Array) -> jax.Array:
    """[batch, len, heads, head_dim] -> [batch, len, embed]."""
    y = matmul.einsum("blhd,hde->ble", x, self.out, self.dtype)
    return y + self.out_bias.astype(self.dtype) if self.use_bias else y

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embedding of queries/keys x [batch, len, heads, d] (identity without rotary)."""
    if self.rotary_fraction is None:
      return x
    return rotary.apply_rotary(x, positions, fraction=self.rotary_fraction,
                               max_timescale=self.max_timescale)

  def __call__(self, q_in: jax.Array, kv_in: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
               q_seg: jax.Array | None = None, k_seg: jax.Array | None = None, *,
               kv_norm: tuple[dict[str, jax.Array], NormKind, float] | None = None,
               self_attention: bool = False, deterministic: bool = True) -> jax.Array:
    """q_in [batch, q_len, embed], kv_in [batch, k_len, embed] -> [batch, q_len, embed].

    kv_norm: if given, (params, kind, epsilon) of a norm applied to kv_in inside the
      key/value projection (per chunk for the CHUNKED kernel).
    self_attention: kv_in is q_in (the latent stack): block_causal_attention skips
      the key blocks after each query block, whatever the kernel (CHUNKED and
      PLAIN differ only for layer 0's long keys).
    """
    q = self.project_query(q_in, q_pos)
    if kv_norm is None:
      weights, kv_fn = self.kv_weights(), self._kv_fn()
    else:
      weights, kv_fn = self.kv_weights(kv_norm[0]), self._kv_fn(*kv_norm[1:])
    if self.kernel == AttentionKernel.CHUNKED and not self_attention:
      out = chunked_projected_attention(q, weights, kv_in, q_pos, k_pos, q_seg, k_seg,
                                        kv_fn=kv_fn, chunk_size=self.chunk_size)
    else:
      k, v = kv_fn(weights, kv_in, k_pos)
      out = (block_causal_attention(q, k, v, q_pos, q_seg, block=self.causal_block)
             if self_attention else dot_product_attention(q, k, v, q_pos, k_pos, q_seg, k_seg))
    return self.dropout(self.project_out(out), deterministic=deterministic)
