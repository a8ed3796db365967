"""The CHUNKED kernel computes the PLAIN kernel's function: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x.layers.attention import AttentionKernel, dot_product_attention
from perceiver_ar_t5x.layers.chunked_attention import chunked_dot_product_attention
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

BATCH, Q_LEN, K_LEN, HEADS, DIM = 2, 5, 13, 3, 4


def _inputs(packed: bool):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (BATCH, Q_LEN, HEADS, DIM))
  k = jax.random.normal(kk, (BATCH, K_LEN, HEADS, DIM))
  v = jax.random.normal(kv, (BATCH, K_LEN, HEADS, DIM))
  k_pos = jnp.broadcast_to(jnp.arange(K_LEN), (BATCH, K_LEN))
  # second example: latents start mid-sequence and a key gap (prefix dropout)
  k_pos = k_pos.at[1].set(jnp.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]))
  q_pos = k_pos[:, -Q_LEN:]
  if not packed:
    return q, k, v, q_pos, k_pos, None, None
  k_seg = jnp.array([[1] * 7 + [2] * 6, [1] * 3 + [2] * 8 + [0] * 2])
  return q, k, v, q_pos, k_pos, k_seg[:, -Q_LEN:], k_seg


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
def test_chunked_equals_plain_value_and_grads(packed: bool, chunk_size: int):
  q, k, v, *rest = _inputs(packed)

  def loss(kernel):
    def f(q, k, v):
      return jnp.sum(jnp.sin(kernel(q, k, v, *rest)))  # non-trivial output cotangent
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

  plain, plain_grads = loss(dot_product_attention)
  chunked, chunked_grads = loss(
      lambda *a: chunked_dot_product_attention(*a, chunk_size=chunk_size))
  np.testing.assert_allclose(chunked, plain, atol=1e-5)
  for got, want in zip(chunked_grads, plain_grads):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunked_bfloat16_close_to_float32():
  q, k, v, *rest = _inputs(packed=True)
  want = dot_product_attention(q, k, v, *rest)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = chunked_dot_product_attention(*bf, *rest, chunk_size=4)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_bad_chunk_size_is_rejected():
  with pytest.raises(ValueError, match="chunk_size"):
    chunked_dot_product_attention(*_inputs(False), chunk_size=0)


@pytest.mark.slow
def test_model_loss_and_grads_equal_with_prefix_dropout_and_segments():
  """Whole model, training mode: prefix dropout removes keys, packing adds segments."""
  kw = dict(vocab_size=13, num_latents=4, embed_dim=12, num_heads=3, head_dim=8, mlp_dim=20,
            num_layers=3, prefix_dropout=0.5)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 1, 13)
  segments = jnp.array([[1] * 4 + [2] * 6, [1] * 8 + [0] * 2])
  positions = jnp.array([list(range(4)) + list(range(6)), list(range(8)) + [0, 0]])
  plain = PerceiverAR(**kw)
  chunked = PerceiverAR(**kw, attention_kernel=AttentionKernel.CHUNKED, attention_chunk_size=3)
  params = plain.init(jax.random.PRNGKey(0), tokens)["params"]

  def loss(module, p):
    logits = module.apply({"params": p}, tokens, positions=positions, segment_ids=segments,
                          deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(chunked, p)))(params)
  np.testing.assert_allclose(got, want, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         got_grads, want_grads)


@pytest.mark.parametrize("norm", [NormKind.RMS, NormKind.LAYER])
def test_projected_attention_with_fused_norm_equals_plain(norm):
  """Norm + k/v projection (+ biases) inside the chunk loop: same values and grads."""
  from perceiver_ar_t5x.layers.attention import project_key_value
  from perceiver_ar_t5x.layers.chunked_attention import chunked_projected_attention

  q, _, _, q_pos, k_pos, q_seg, k_seg = _inputs(packed=True)
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  x = jax.random.normal(keys[0], (BATCH, K_LEN, 6))  # [batch, keys, embed]
  weights = {"key": jax.random.normal(keys[1], (6, HEADS, DIM)),
             "value": jax.random.normal(keys[2], (6, HEADS, DIM)),
             "norm": {"scale": 1.0 + jax.random.normal(keys[3], (6,))}}
  if norm == NormKind.LAYER:  # LayerNorm's bias and projection biases ride along
    extra = jax.random.split(jax.random.PRNGKey(6), 3)
    weights["norm"]["bias"] = jax.random.normal(extra[0], (6,))
    weights["key_bias"] = jax.random.normal(extra[1], (HEADS, DIM))
    weights["value_bias"] = jax.random.normal(extra[2], (HEADS, DIM))
  kv_fn = lambda w, x, pos: project_key_value(  # noqa: E731
      w, x, pos, dtype=jnp.float32, rotary_fraction=0.5, max_timescale=1e4, norm_kind=norm,
      norm_epsilon=1e-6 if norm == NormKind.RMS else 1e-5)

  def plain(q, w, x):
    k, v = kv_fn(w, x, k_pos)
    return jnp.sum(jnp.sin(dot_product_attention(q, k, v, q_pos, k_pos, q_seg, k_seg)))

  def chunked(q, w, x):
    out = chunked_projected_attention(q, w, x, q_pos, k_pos, q_seg, k_seg, kv_fn=kv_fn,
                                      chunk_size=5)
    return jnp.sum(jnp.sin(out))

  want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(q, weights, x)
  got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(q, weights, x)
  tol = 1e-5 if norm == NormKind.RMS else 5e-5  # summation order (chunks) differs: ~1.4e-5 seen
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=tol, rtol=tol),
                         got, want)
