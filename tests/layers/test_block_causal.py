"""block_causal_attention computes dense causal self-attention: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x.layers.attention import dot_product_attention
from perceiver_ar_t5x.layers.block_causal import block_causal_attention

BATCH, ROWS, HEADS, DIM = 2, 11, 3, 4


def _inputs(packed: bool):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
  q, k, v = (jax.random.normal(key, (BATCH, ROWS, HEADS, DIM)) for key in (kq, kk, kv))
  pos = jnp.broadcast_to(jnp.arange(ROWS), (BATCH, ROWS))
  pos = pos.at[1].add(5)  # a latent window that starts mid-sequence
  if not packed:
    return q, k, v, pos, None
  seg = jnp.array([[1] * 4 + [2] * 7, [1] * 6 + [2] * 3 + [0] * 2])
  pos = pos.at[0, 4:].set(jnp.arange(7))  # positions restart in the second segment
  return q, k, v, pos, seg


def _value_and_grads(fn, q, k, v):
  f = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731 (non-trivial cotangent)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("block", [1, 3, 4, 11, 64])
def test_block_causal_equals_dense(packed: bool, block: int):
  q, k, v, pos, seg = _inputs(packed)
  want, want_grads = _value_and_grads(
      lambda q, k, v: dot_product_attention(q, k, v, pos, pos, seg, seg), q, k, v)
  got, got_grads = _value_and_grads(
      lambda q, k, v: block_causal_attention(q, k, v, pos, seg, block=block), q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_block_causal_rejects_bad_arguments():
  q, k, v, pos, _ = _inputs(False)
  with pytest.raises(ValueError, match="block must be positive"):
    block_causal_attention(q, k, v, pos, block=0)
  with pytest.raises(ValueError, match="self-attention"):
    block_causal_attention(q, k[:, :5], v[:, :5], pos)
