"""The Transformer block every Perceiver AR layer is made of, and its one-token step.

One class owns the block's math: the full forward pass (`__call__`), the
prefill/reset path of cached decoding (`norm_query`, `norm_kv`, `finish`) and the
one-token step (`step`, on weights laid out by `step_weights`) all use the same
norms, projections, residual wiring and activation, so an option added here reaches
every path at once. tests/test_decode_cache.py checks cached == full forward for
every option.
"""

from __future__ import annotations

import dataclasses
import enum

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.layers import decode_ops
from perceiver_ar_t5x.layers.attention import Attention, AttentionKernel
from perceiver_ar_t5x.layers.mlp import Activation, Mlp, activate
from perceiver_ar_t5x.layers.norms import Norm, NormKind


class CrossKvNorm(enum.Enum):
  """Which norm layer 0's keys/values get.

  SHARED: the query rows' norm, on every key (T5X / flaxformer style).
  SEPARATE: a norm of their own (`pre_attention_kv_norm`) on every key (official).
  PREFIX: their own norm on the prefix keys; the latent keys are the query rows'
    normed rows (krasserm's perceiver-io concatenates kv_norm(prefix) and q_norm(latents)).
  """

  SHARED = "shared"
  SEPARATE = "separate"
  PREFIX = "prefix"


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """Architecture variants of the block (defaults: T5.1.1 / flaxformer style).

  Attributes:
    norm: RMS (default) or LAYER norms, everywhere including the final norm.
    norm_epsilon: the norms' epsilon (PyTorch and Haiku LayerNorm use 1e-5).
    use_bias: biases on the attention and MLP projections.
    activation: the MLP's activation (GELU_TANH is jax.nn.gelu's default).
    gated_mlp: gated MLP (wi_0, wi_1, wo) or a plain one (wi, wo).
    scale_query: multiply queries by head_dim**-0.5 at run time; False where the
      scale is folded into the query kernel (flaxformer).
    cross_kv_norm: the norm of layer 0's keys/values (CrossKvNorm).
  """

  norm: NormKind = NormKind.RMS
  norm_epsilon: float = 1e-6
  use_bias: bool = False
  activation: Activation = Activation.GELU_TANH
  gated_mlp: bool = True
  scale_query: bool = True
  cross_kv_norm: CrossKvNorm = CrossKvNorm.SHARED


@flax.struct.dataclass
class StepWeights:
  """One block's kernels for one-token steps (module dtype), each [splits, k / splits, n].

  Biases are [n] (None without biases). The query columns carry the query scale.
  """

  qkv: jax.Array  # k = embed, n = 3 * heads * head_dim: query | key | value
  out: jax.Array  # k = heads * head_dim, n = embed
  mlp_in: jax.Array  # k = embed, n = mlp (plain) or 2 * mlp (wi_0 | wi_1)
  mlp_out: jax.Array  # k = mlp (zero-padded to a multiple of splits), n = embed
  qkv_bias: jax.Array | None = None
  out_bias: jax.Array | None = None
  mlp_in_bias: jax.Array | None = None
  mlp_out_bias: jax.Array | None = None


class Block(nn.Module):
  """Pre-norm attention + MLP, both residual; cross-attention when kv_x is given.

  kv_norm: the key/value rows' norm (CrossKvNorm; SHARED for self-attention).
  query_residual: add the attention output to the query rows (else replace them).
  kv_features, v_head_dim: key/value input width and per-head value width where they
    differ from embed_dim and head_dim (Perceiver IO's cross-attentions).
  causal: self-attention masks later positions (Perceiver AR). Perceiver IO's blocks
    are not causal: every query sees every key whose position is <= its own, and its
    callers pass equal positions (padding is masked by segment ids).
  """

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
  options: BlockOptions = BlockOptions()
  kv_norm: CrossKvNorm = CrossKvNorm.SHARED
  query_residual: bool = True
  kv_features: int | None = None
  v_head_dim: int | None = None
  causal: bool = True

  def _norm(self, name: str) -> Norm:
    o = self.options
    return Norm(kind=o.norm, epsilon=o.norm_epsilon, dtype=self.dtype, name=name)

  def setup(self) -> None:
    o = self.options
    self.pre_attention_norm = self._norm("pre_attention_norm")
    if self.kv_norm != CrossKvNorm.SHARED:
      self.pre_attention_kv_norm = self._norm("pre_attention_kv_norm")
    self.attention = Attention(embed_dim=self.embed_dim, num_heads=self.num_heads,
                               head_dim=self.head_dim, rotary_fraction=self.rotary_fraction,
                               max_timescale=self.max_timescale,
                               dropout_rate=self.dropout_rate, dtype=self.dtype,
                               kernel=self.attention_kernel,
                               chunk_size=self.attention_chunk_size, use_bias=o.use_bias,
                               scale_query=o.scale_query, kv_features=self.kv_features,
                               v_head_dim=self.v_head_dim)
    self.pre_mlp_norm = self._norm("pre_mlp_norm")
    self.mlp = Mlp(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                   activation=o.activation, gated=o.gated_mlp, use_bias=o.use_bias)
    self.dropout = nn.Dropout(self.dropout_rate)

  def norm_query(self, x: jax.Array) -> jax.Array:
    return self.pre_attention_norm(x)

  def norm_kv(self, x: jax.Array) -> jax.Array:
    """The norm of key/value rows outside the latent window (prefix keys)."""
    if self.kv_norm == CrossKvNorm.SHARED:
      return self.pre_attention_norm(x)
    return self.pre_attention_kv_norm(x)

  def _kv_norm_spec(self, kv_x: jax.Array) -> tuple[dict[str, jax.Array], NormKind, float]:
    """The key/value norm as (params, kind, epsilon), for fusing into the CHUNKED kernel."""
    if self.kv_norm == CrossKvNorm.SHARED:
      norm = self.pre_attention_norm
    else:
      norm = self.pre_attention_kv_norm
      if self.is_initializing():
        norm(kv_x[:, :1])  # creates its params; the kernel applies it per chunk
    return nn.unbox(norm.variables["params"]), self.options.norm, self.options.norm_epsilon

  def _residual(self, x: jax.Array, attended: jax.Array) -> jax.Array:
    return x + attended if self.query_residual else attended

  def _mlp_residual(self, x: jax.Array, deterministic: bool) -> jax.Array:
    h = self.mlp(self.pre_mlp_norm(x), deterministic=deterministic)
    return x + self.dropout(h, deterministic=deterministic)

  def __call__(self, x: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
               kv_x: jax.Array | None = None, k_pos: jax.Array | None = None,
               k_seg: jax.Array | None = None, kv_is_latent: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """x [batch, latents, embed]; kv_x [batch, keys, embed] or None for self-attention.

    kv_is_latent: [batch, keys] bool, which key rows are the latents (CrossKvNorm.PREFIX).
    """
    y = self.norm_query(x)
    kv_norm = None
    if kv_x is None:
      kv_y, k_pos, k_seg = y, q_pos, q_seg
    elif self.kv_norm == CrossKvNorm.PREFIX:
      if kv_is_latent is None:
        raise ValueError("CrossKvNorm.PREFIX needs kv_is_latent")
      kv_y = jnp.where(kv_is_latent[..., None], self.norm_query(kv_x), self.norm_kv(kv_x))
    elif self.attention_kernel == AttentionKernel.CHUNKED:
      kv_y, kv_norm = kv_x, self._kv_norm_spec(kv_x)  # normed per key chunk in the kernel
    else:
      kv_y = self.norm_kv(kv_x)
    a = self.attention(y, kv_y, q_pos, k_pos, q_seg, k_seg, kv_norm=kv_norm,
                       self_attention=kv_x is None and self.causal,
                       deterministic=deterministic)
    x = nn.with_logical_constraint(self._residual(x, a), (pt.BATCH, pt.LATENTS, pt.EMBED))
    return self._mlp_residual(x, deterministic)

  def finish(self, x: jax.Array, attended: jax.Array) -> jax.Array:
    """The rest of __call__ after softmax attention: attended [b, r, heads, d] -> [b, r, embed]."""
    return self._mlp_residual(self._residual(x, self.attention.project_out(attended)), True)

  def step_weights(self, splits: int) -> StepWeights:
    """This block's params laid out for `step` (layers/decode_ops.py); make once per decode."""
    att, mlp, dtype = self.attention, self.mlp.variables["params"], self.dtype
    p = nn.unbox(mlp)
    query, query_bias = att.query_kernel()
    embed = query.shape[0]
    qkv = jnp.concatenate([query, att.key, att.value], axis=1).reshape(embed, -1)
    names = ("wi_0", "wi_1") if self.options.gated_mlp else ("wi",)
    mlp_in = jnp.concatenate([p[n] for n in names], axis=1)

    def lay(w: jax.Array) -> jax.Array:
      return decode_ops.split_rows(w.astype(dtype), splits)

    w = StepWeights(qkv=lay(qkv), out=lay(att.out.reshape(-1, embed)), mlp_in=lay(mlp_in),
                    mlp_out=lay(p["wo"]))
    if not self.options.use_bias:
      return w
    return w.replace(
        qkv_bias=jnp.concatenate([query_bias, att.key_bias, att.value_bias]).reshape(-1),
        out_bias=att.out_bias,
        mlp_in_bias=jnp.concatenate([p[f"{n}_bias"] for n in names]),
        mlp_out_bias=p["wo_bias"])

  def step(self, w: StepWeights, x: jax.Array, pos: jax.Array, ck: jax.Array, cv: jax.Array,
           slot: jax.Array, k_pos: jax.Array, *, kv_row: jax.Array | None = None,
           window: tuple[jax.Array, ...] | None = None
           ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...] | None]:
    """__call__ on one new row per example, its key/value written into the cache.

    x [b, embed] at positions pos [b]; ck, cv [b * heads, d, keys] get the new key/value
    at key index slot [b]; k_pos [b or 1, keys] are the cached keys' positions.
    kv_row: [b, embed] the row's key/value input where it differs from x (layer 0
      of models with a latent query projection).
    window: CrossKvNorm.PREFIX only: (wk, wv [b * heads, d, latents], w_slot [b],
      w_pos [b, latents]), the window's latent keys (made from the query rows' norm);
      ck/cv then hold the prefix-norm keys, and k_pos must hide those of the window.
    Returns (x [b, embed], ck, cv, window).
    """
    b, heads, d = x.shape[0], self.num_heads, self.head_dim
    hd = heads * d

    def dense(y: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
      y = decode_ops.matvec(y.astype(self.dtype), kernel)
      return y if bias is None else y + bias.astype(self.dtype)

    y = self.norm_query(x)
    if kv_row is None and self.kv_norm == CrossKvNorm.SHARED:
      qkv = dense(y, w.qkv, w.qkv_bias)  # [b, 3 * hd]
      q, kv = qkv[:, :hd], qkv[:, hd:]
    else:  # query and key/value rows differ: one product over both
      kv_row = x if kv_row is None else kv_row
      qkv = dense(jnp.concatenate([y, self.norm_kv(kv_row)]), w.qkv, w.qkv_bias)
      q, kv = qkv[:b, :hd], qkv[b:, hd:]

    def rotated(z: jax.Array) -> jax.Array:  # [b, hd] -> [b, 1, heads, d]
      return self.attention.rotate(z.reshape(b, 1, heads, d), pos[:, None])

    def column(z: jax.Array) -> jax.Array:  # [b, 1, heads, d] -> [b * heads, d, 1]
      return z.reshape(b * heads, d, 1)

    def write(k: jax.Array, v: jax.Array, ck: jax.Array, cv: jax.Array, at: jax.Array):
      return (decode_ops.write_column(ck, column(rotated(k)), at),
              decode_ops.write_column(cv, column(v), at))

    ck, cv = write(kv[:, :hd], kv[:, hd:], ck, cv, slot)
    segments = [(ck, cv, k_pos)]
    if window is not None:
      wk, wv, w_slot, w_pos = window
      wk, wv = write(qkv[:b, hd:2 * hd], qkv[:b, 2 * hd:], wk, wv, w_slot)
      segments.append((wk, wv, w_pos))
      window = (wk, wv, w_slot, w_pos)
    attended = decode_ops.attend_segments(rotated(q), segments, pos[:, None])  # [b, 1, h, d]
    x = self._residual(x, dense(attended.reshape(b, hd), w.out, w.out_bias))
    h = dense(self.pre_mlp_norm(x), w.mlp_in, w.mlp_in_bias)
    if self.options.gated_mlp:
      h = activate(self.options.activation, h[:, :self.mlp_dim]) * h[:, self.mlp_dim:]
    else:
      h = activate(self.options.activation, h)
    return x + dense(h, w.mlp_out, w.mlp_out_bias), ck, cv, window
