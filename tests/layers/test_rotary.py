import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x.layers import rotary


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_scores_depend_only_on_offsets(fraction):
  q = jax.random.normal(jax.random.key(0), (1, 1, 3, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 3, 8))

  def score(qp, kp):
    rq = rotary.apply_rotary(q, jnp.array([[qp]]), fraction=fraction)
    rk = rotary.apply_rotary(k, jnp.array([[kp]]), fraction=fraction)
    return jnp.einsum("bqhd,bkhd->h", rq, rk)

  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(score(5000, 4990), score(10, 0), rtol=1e-4, atol=1e-4)
  assert not np.allclose(score(7, 3), score(7, 4), atol=1e-3)


def test_fraction_leaves_rest_untouched():
  x = jax.random.normal(jax.random.key(2), (2, 5, 3, 8))
  pos = jnp.tile(jnp.arange(5)[None], (2, 1)) * 13
  out = rotary.apply_rotary(x, pos, fraction=0.5)
  np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
  assert not np.allclose(out[..., 1:, :, :4], x[..., 1:, :, :4])
  np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)  # position 0 is not rotated
  assert rotary.rotary_dim(10, 0.5) == 4
