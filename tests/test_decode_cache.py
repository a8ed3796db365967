"""Golden check: cached decoding computes exactly what the full forward pass computes.

The tiny model has 4 latents and 3 layers; prompts of 9, 2 and 0 tokens decode 12
more, so the batch holds a prompt longer than the latents, one shorter, an empty
one, and every example's window fills and resets several times, at different steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x import decoding
from perceiver_ar_t5x.decode_cache import CachedDecoder
from perceiver_ar_t5x.layers import decode_ops
from perceiver_ar_t5x.layers.attention import AttentionKernel
from perceiver_ar_t5x.layers.block import BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.models import PerceiverARModel

PROMPTS = np.random.default_rng(0).integers(1, 13, (3, 9)).astype(np.int32)
LENGTHS = np.array([9, 2, 0])
NEW = 12


def _model(module, **overrides):
  model = PerceiverARModel(module.clone(**overrides))
  return model, model.init(jax.random.key(1), 10)


def _assert_exact(model, params, result, atol=1e-5):
  """Every decoded position's logits == one full forward pass with that step's window."""
  rows, where = [], []
  for b, prompt_length in enumerate(LENGTHS):
    for p in range(prompt_length, int(result.lengths[b, 0])):
      start = int(result.window_starts[b, 0, p])
      assert p - model.num_latents < start <= p
      inputs = np.pad(result.tokens[b, 0], (1, 0))[:-1]  # shifted right: BOS 0, as seqio does
      rows.append(np.pad(inputs, (0, model.num_latents)))  # room for a whole window
      where.append((b, p, start))
  assert len(rows) == NEW * len(LENGTHS)
  starts = jnp.array([s for _, _, s in where])
  full = jax.jit(model.logits)(params, {"decoder_input_tokens": jnp.asarray(np.stack(rows))},
                               starts)
  for i, (b, p, start) in enumerate(where):
    np.testing.assert_allclose(result.logits[b, 0, p], full[i, p - start], atol=atol,
                               rtol=atol, err_msg=f"example {b}, position {p}, start {start}")


@pytest.mark.parametrize("fill", [None, 1])
def test_cached_logits_equal_full_forward_at_every_position(tiny_module, fill):
  model, params = _model(tiny_module)
  result = decoding.decode(model, params, PROMPTS, LENGTHS, NEW, jax.random.key(2),
                           decoding.SamplingConfig(temperature=1.0), fill=fill,
                           record_logits=True)
  _assert_exact(model, params, result)
  starts = result.window_starts[:, 0]
  expected_fill = 2 if fill is None else fill
  for b, prompt_length in enumerate(LENGTHS):
    s = starts[b, prompt_length:NEW + prompt_length]
    resets = np.flatnonzero(np.diff(s)) + 1  # steps right after a reset
    assert len(resets) >= 2, s
    positions = prompt_length + resets
    # a reset keeps `fill` latents: the window restarts fill - 1 positions back
    np.testing.assert_array_equal(s[resets], positions - expected_fill + 1)


# Every block and model option (and each position encoding and layer layout), in three
# models that between them set each one away from its default.
OPTIONS = {
    "official": dict(
        block=BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                           activation=Activation.SQUARED_RELU, gated_mlp=False,
                           cross_kv_norm=CrossKvNorm.SEPARATE),
        latent_query_projection=True, output_bias=True, max_timescale=37.0),
    "krasserm": dict(
        block=BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                           activation=Activation.GELU, gated_mlp=False,
                           cross_kv_norm=CrossKvNorm.PREFIX),
        position_encoding=PositionEncoding.LEARNED, position_table_trainable=False,
        rotary_layers=2, rotary_fraction=1.0, final_norm=False, tie_embeddings=True,
        output_bias=True, cross_mlp_dim=7),
    "flaxformer": dict(  # + sinusoidal positions and scanned latent layers
        block=BlockOptions(scale_query=False, activation=Activation.RELU), rotary_layers=1,
        attention_kernel=AttentionKernel.CHUNKED, attention_chunk_size=4,
        position_encoding=PositionEncoding.SINUSOIDAL, scan_layers=True),
}


def _perturbed(params, seed=11):
  """Init params plus noise, so zero biases and unit norm scales are exercised too."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_exact_for_every_block_option(tiny_module, name):
  model, params = _model(tiny_module, **OPTIONS[name])
  params = _perturbed(params)
  result = decoding.decode(model, params, PROMPTS, LENGTHS, NEW, jax.random.key(3),
                           decoding.SamplingConfig(temperature=1.0), record_logits=True)
  _assert_exact(model, params, result)


def test_bfloat16_activations_stay_close_to_the_full_forward_pass(tiny_module):
  """bf16 activations: the cached and full paths round differently; the gap stays small."""
  model, params = _model(tiny_module, dtype=jnp.bfloat16, **OPTIONS["official"])
  result = decoding.decode(model, params, PROMPTS, LENGTHS, NEW, jax.random.key(3),
                           decoding.SamplingConfig(temperature=1.0), record_logits=True)
  _assert_exact(model, params, result, atol=0.15)


def test_fill_equal_to_latents_is_the_window_ending_at_each_position(tiny_module):
  """fill = num_latents resets every step: the sliding reference, latents = last positions."""
  model, params = _model(tiny_module)
  result = decoding.decode(model, params, PROMPTS, LENGTHS, NEW, jax.random.key(4),
                           decoding.SamplingConfig(temperature=1.0), fill=4, record_logits=True)
  for b, prompt_length in enumerate(LENGTHS):
    p = np.arange(prompt_length, prompt_length + NEW)
    np.testing.assert_array_equal(result.window_starts[b, 0, p], np.maximum(p - 3, 0))
  _assert_exact(model, params, result)


def test_mixed_prompt_lengths_in_a_batch_equal_each_alone(tiny_module):
  model, params = _model(tiny_module)
  greedy = decoding.SamplingConfig()
  together = decoding.decode(model, params, PROMPTS, LENGTHS, NEW, jax.random.key(5), greedy,
                             record_logits=True)
  for b, prompt_length in enumerate(LENGTHS):
    alone = decoding.decode(model, params, PROMPTS[b:b + 1, :max(prompt_length, 1)],
                            LENGTHS[b:b + 1], NEW, jax.random.key(6), greedy, record_logits=True)
    width = prompt_length + NEW
    np.testing.assert_array_equal(together.tokens[b, 0, :width], alone.tokens[0, 0, :width])
    np.testing.assert_allclose(together.logits[b, 0, :width], alone.logits[0, 0, :width],
                               atol=1e-5)


def test_empty_prompt_starts_from_the_start_token(tiny_module):
  model, params = _model(tiny_module)
  decoder = CachedDecoder(model.module, 16)
  tokens = jnp.zeros((1, 16), jnp.int32)  # decoder input 0 = BOS at position 0
  cache, logits = jax.jit(decoder.prefill)(params, tokens, jnp.array([0]))
  full = jax.jit(model.logits)(params, {"decoder_input_tokens": tokens[:, :1]}, jnp.array([0]))
  np.testing.assert_allclose(logits, full[:, 0], atol=1e-5)
  assert int(cache.position[0]) == 0 and int(cache.window_start[0]) == 0


def test_cache_has_the_documented_layout(tiny_module):
  model, params = _model(tiny_module)
  decoder = CachedDecoder(model.module, 16)
  cache, _ = jax.jit(decoder.prefill)(params, jnp.zeros((2, 16), jnp.int32), jnp.array([5, 9]))
  assert cache.layer0_k.shape == (2 * 3, 8, 16)  # [batch * heads, head_dim, length]
  assert cache.layer0_v.shape == (2 * 3, 8, 16)  # values: the same layout
  assert len(cache.latent_k) == 2 and cache.latent_k[0].shape == (2 * 3, 8, 4)
  np.testing.assert_array_equal(cache.window_start, [2, 6])  # windows end at the prompts
  with pytest.raises(ValueError, match="cache length 16"):
    decoder.prefill(params, jnp.zeros((2, 12), jnp.int32), jnp.array([5, 9]))


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_matvec_equals_the_plain_product(splits):
  """Step weights [splits, k / splits, n] (k = 7 zero-padded) give x @ w, batch 1 and 2."""
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
  stored = decode_ops.split_rows(w, splits)
  assert stored.shape == (splits, -(-7 // splits), 5)
  for batch in (1, 2):
    x = jnp.asarray(rng.standard_normal((batch, 7)), jnp.float32)
    np.testing.assert_allclose(decode_ops.matvec(x, stored), x @ w, atol=1e-6, rtol=1e-6)


def test_batch_one_uses_split_weights_and_stays_exact(tiny_module):
  """Batch 1 takes the split-product path; its logits equal the full forward pass."""
  model, params = _model(tiny_module)
  result = decoding.decode(model, params, PROMPTS[:1], LENGTHS[:1], NEW, jax.random.key(8),
                           decoding.SamplingConfig(temperature=1.0), record_logits=True)
  tokens = np.pad(result.tokens[0, 0], (1, 0))[:-1]
  logits = jax.jit(model.logits)  # one compilation for every position
  for p in range(LENGTHS[0], LENGTHS[0] + NEW):
    start = int(result.window_starts[0, 0, p])
    row = jnp.asarray(np.pad(tokens, (0, model.num_latents))[None])
    full = logits(params, {"decoder_input_tokens": row}, jnp.array([start]))
    np.testing.assert_allclose(result.logits[0, 0, p], full[0, p - start], atol=1e-5,
                               rtol=1e-5, err_msg=f"position {p}")
