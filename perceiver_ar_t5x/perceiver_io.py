"""Perceiver IO (Jaegle et al. 2021, arXiv:2107.14795) on this project's own layers.

Inputs of any size are cross-attended into a learned latent array (the encoder,
Sec. 2.1); a stack of self-attention blocks works on the latents only, repeated
`num_blocks` times with shared weights (`num_self_attends_per_block` blocks each);
an output query array cross-attends to the latents (the decoder, Sec. 2.2) and a
head turns each output row into logits: the tied input embedding for masked
language modelling (Sec. 4.1) or a linear classifier (one query, Sec. 4.5).

Every block is layers/block.py's `Block` (the one Perceiver AR uses) with the options
Perceiver IO needs: LayerNorm with bias, plain MLP with biases and exact or tanh
GELU (`BlockOptions`), separate query/key and value channels, a key/value input
width of its own, query residual on or off, and no causal mask. Nothing here is
causal: every block is given equal positions, and input padding is masked with
segment ids (a padded key has segment 0, every query segment 1), so the CHUNKED
kernel serves the encoder over long inputs unchanged.

Channel defaults follow the official code: a cross-attention's query/key channels
default to the key/value input's width ("kv" shape for attention), value channels
to the query/key channels; self-attention's to the latent width.
"""

from __future__ import annotations

import enum

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.layers.attention import AttentionKernel
from perceiver_ar_t5x.layers.block import Block, BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.embedding import PositionEncoding, sinusoidal_positions
from perceiver_ar_t5x.layers.io_adapters import ArrayInput, Classifier, TokenInput
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind

# The official and Hugging Face block: pre-LayerNorm (eps 1e-5) with bias, biased
# projections, a plain 1-hidden-layer MLP. HF's MLM uses exact GELU, Haiku's the tanh form.
IO_BLOCK = BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                        activation=Activation.GELU, gated_mlp=False)

__all__ = ["IO_BLOCK", "ArrayInput", "Head", "PerceiverIO", "TokenInput"]


class Head(enum.Enum):
  """What the decoder's output rows become.

  MLM: logits over the input vocabulary from the tied token embedding plus a bias
    (`logits_bias`), one row per input position (Sec. 4.1).
  CLASSIFY: a linear classifier (`classifier`) on each output query (one for a
    sequence or image label).
  """

  MLM = "mlm"
  CLASSIFY = "classify"


def _heads(name: str, channels: int, heads: int) -> int:
  if channels % heads:
    raise ValueError(f"{name}: {channels} channels do not split into {heads} heads")
  return channels // heads


class PerceiverIO(nn.Module):
  """inputs -> logits [batch, outputs, vocab or classes].

  Attributes:
    input_adapter: TokenInput (token ids + learned positions) or ArrayInput (an
      array with Fourier-feature positions).
    num_latents, latent_dim: the latent array's shape (param `latents`).
    num_outputs, decoder_dim: the output query table (`output_queries`); an MLM
      decodes the first `length` rows for an input of `length` tokens.
    head, num_classes: Head.MLM or Head.CLASSIFY (num_classes outputs).
    num_blocks, num_self_attends_per_block: the latent stack runs the
      `self_attend_{i}` blocks num_blocks times (weights shared across repeats).
    *_heads, *_qk_channels, *_v_channels, *_widening_factor: per attention kind
      (cross_attend: encoder; self_attend: latent stack; decoder); channels are
      totals over heads (None: the official defaults, see the module docstring).
    use_query_residual, decoder_query_residual: add the attention output to the
      query rows in the encoder / decoder (HF's and the official MLM decoder: off).
    output_queries: LEARNED (a table, `output_queries`; the paper's MLM) or SINUSOIDAL
      (fixed sin/cos codes of each output position, no params; the paper's Fourier
      output queries for dense outputs).
    block: the shared block's options (norm, biases, activation, MLP kind).
    attention_kernel: PLAIN or CHUNKED for the encoder (memory linear in input length).
  """

  input_adapter: TokenInput | ArrayInput
  num_latents: int
  latent_dim: int
  num_outputs: int
  decoder_dim: int
  head: Head = Head.MLM
  num_classes: int = 0
  num_blocks: int = 1
  num_self_attends_per_block: int = 2
  num_self_attend_heads: int = 8
  self_attend_qk_channels: int | None = None
  self_attend_v_channels: int | None = None
  self_attend_widening_factor: int = 1
  num_cross_attend_heads: int = 1
  cross_attend_qk_channels: int | None = None
  cross_attend_v_channels: int | None = None
  cross_attend_widening_factor: int = 1
  use_query_residual: bool = True
  num_decoder_heads: int = 1
  decoder_qk_channels: int | None = None
  decoder_v_channels: int | None = None
  decoder_widening_factor: int = 1
  decoder_query_residual: bool = False
  output_queries: PositionEncoding = PositionEncoding.LEARNED
  block: BlockOptions = IO_BLOCK
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_kernel: AttentionKernel = AttentionKernel.PLAIN
  attention_chunk_size: int = 1024

  def _block(self, name: str, q_dim: int, kv_dim: int | None, heads: int, qk: int | None,
             v: int | None, widening: int, query_residual: bool = True,
             kernel: AttentionKernel = AttentionKernel.PLAIN) -> Block:
    """A non-causal block; kv_dim None = self-attention over the q rows."""
    qk = qk or kv_dim or q_dim
    v = v or qk
    return Block(embed_dim=q_dim, num_heads=heads, head_dim=_heads(name, qk, heads),
                 v_head_dim=_heads(name, v, heads), mlp_dim=widening * q_dim,
                 kv_features=kv_dim, dropout_rate=self.dropout_rate, rotary_fraction=None,
                 dtype=self.dtype, attention_kernel=kernel,
                 attention_chunk_size=self.attention_chunk_size, options=self.block,
                 kv_norm=CrossKvNorm.SEPARATE if kv_dim else CrossKvNorm.SHARED,
                 query_residual=query_residual, causal=False, name=name)

  def _check(self, inputs: jax.Array, input_mask: jax.Array | None) -> None:
    if self.head == Head.MLM:
      if not isinstance(self.input_adapter, TokenInput):
        raise ValueError("Head.MLM decodes with the token embedding: it needs a TokenInput")
      if inputs.shape[-1] > self.num_outputs:
        raise ValueError(f"inputs of length {inputs.shape[-1]} need {inputs.shape[-1]} output "
                         f"queries; the model has num_outputs={self.num_outputs}")
    elif self.num_classes <= 0:
      raise ValueError(f"Head.CLASSIFY needs num_classes > 0, got {self.num_classes}")
    if input_mask is not None and input_mask.shape != inputs.shape[:2]:
      raise ValueError(f"input_mask {input_mask.shape} must be [batch, length] of inputs "
                       f"{inputs.shape}")

  @nn.compact
  def __call__(self, inputs: jax.Array, input_mask: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """inputs [batch, length] token ids (TokenInput) or [batch, *index_dims, channels]
    (ArrayInput); input_mask [batch, length] (1 = real, 0 = padding) for token inputs.

    Returns f32 logits [batch, length, vocab] (MLM) or [batch, num_outputs, classes].
    """
    self._check(inputs, input_mask)
    x = self.input_adapter(inputs)  # [batch, m, c]
    b, m, c = x.shape
    d = self.latent_dim
    seg = (jnp.ones((b, m), jnp.int32) if input_mask is None
           else (input_mask > 0).astype(jnp.int32))
    latents = self.param("latents", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (pt.LATENTS, pt.EMBED)),
                         (self.num_latents, d), jnp.float32)
    z = jnp.broadcast_to(latents.astype(self.dtype), (b, self.num_latents, d))
    zeros = lambda n: jnp.zeros((b, n), jnp.int32)  # noqa: E731  (equal positions: no mask)

    encoder = self._block("encoder", d, c, self.num_cross_attend_heads,
                          self.cross_attend_qk_channels, self.cross_attend_v_channels,
                          self.cross_attend_widening_factor, self.use_query_residual,
                          self.attention_kernel)
    z = encoder(z, zeros(self.num_latents), jnp.ones((b, self.num_latents), jnp.int32),
                x, zeros(m), seg, deterministic=deterministic)
    self_attends = [self._block(f"self_attend_{i}", d, None, self.num_self_attend_heads,
                                self.self_attend_qk_channels, self.self_attend_v_channels,
                                self.self_attend_widening_factor)
                    for i in range(self.num_self_attends_per_block)]
    for _ in range(self.num_blocks):
      for blk in self_attends:
        z = blk(z, zeros(self.num_latents), None, deterministic=deterministic)

    n = m if self.head == Head.MLM else self.num_outputs
    queries = jnp.broadcast_to(self._queries(n).astype(self.dtype), (b, n, self.decoder_dim))
    decoder = self._block("decoder", self.decoder_dim, d, self.num_decoder_heads,
                          self.decoder_qk_channels, self.decoder_v_channels,
                          self.decoder_widening_factor, self.decoder_query_residual)
    out = decoder(queries, zeros(n), None, z, zeros(self.num_latents), None,
                  deterministic=deterministic)  # [batch, n, decoder_dim]
    return self._logits(out)

  def _queries(self, n: int) -> jax.Array:
    """The first n output queries [n, decoder_dim]."""
    if self.output_queries == PositionEncoding.SINUSOIDAL:
      return sinusoidal_positions(jnp.arange(n)[None], self.decoder_dim)[0]
    table = self.param("output_queries", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (pt.LENGTH, pt.EMBED)),
                       (self.num_outputs, self.decoder_dim), jnp.float32)
    return table[:n]

  def _logits(self, out: jax.Array) -> jax.Array:
    if self.head == Head.MLM:
      vocab = self.input_adapter.vocab_size
      bias = self.param("logits_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (pt.VOCAB,)), (vocab,), jnp.float32)
      return self.input_adapter.attend(out) + bias
    return Classifier(self.num_classes, name="classifier")(out)
