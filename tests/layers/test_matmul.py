"""layers.matmul.einsum: f32 is plain einsum; bf16 has f32 accumulation in both passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x.layers import matmul

SPECS = [("ble,ehd->blhd", (2, 5, 6), (6, 3, 4)), ("...e,em->...m", (2, 5, 6), (6, 7)),
         ("bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 7, 3, 4))]


def _operands(x_shape, y_shape):
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  return jax.random.normal(kx, x_shape), jax.random.normal(ky, y_shape)


def _grads(fn, x, y):
  return jax.grad(lambda x, y: jnp.sum(jnp.sin(fn(x, y).astype(jnp.float32))), (0, 1))(x, y)


@pytest.mark.parametrize("spec,x_shape,y_shape", SPECS)
def test_float32_is_plain_einsum(spec, x_shape, y_shape):
  x, y = _operands(x_shape, y_shape)
  np.testing.assert_array_equal(matmul.einsum(spec, x, y), jnp.einsum(spec, x, y))
  for got, want in zip(_grads(lambda a, b: matmul.einsum(spec, a, b), x, y),
                       _grads(lambda a, b: jnp.einsum(spec, a, b), x, y)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec,x_shape,y_shape", SPECS)
def test_bfloat16_matches_rounded_operands(spec, x_shape, y_shape):
  """bf16 result = f32 einsum of bf16-rounded operands; grads keep the operands' dtypes."""
  x, y = _operands(x_shape, y_shape)
  bf = jnp.bfloat16
  got = matmul.einsum(spec, x, y, bf, out_dtype=jnp.float32)
  want = jnp.einsum(spec, x.astype(bf).astype(jnp.float32), y.astype(bf).astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  grads = _grads(lambda a, b: matmul.einsum(spec, a, b, bf), x, y)
  ref = _grads(lambda a, b: jnp.einsum(spec, a, b), x, y)
  for g, r, operand in zip(grads, ref, (x, y)):
    assert g.dtype == operand.dtype and g.shape == operand.shape
    np.testing.assert_allclose(g, r, atol=0.1, rtol=0.05)


def test_bfloat16_backward_contracts_bf16_operands():
  """Every dot of the VJP reads bf16 operands (the fast CPU/TPU path), none f32 x f32."""
  x, y = _operands((2, 5, 6), (6, 7))
  f = jax.grad(lambda a, b: jnp.sum(matmul.einsum("...e,em->...m", a, b, jnp.bfloat16)
                                    .astype(jnp.float32) ** 2), (0, 1))
  dots = [e for e in jax.make_jaxpr(f)(x, y).eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert eqn.params["preferred_element_type"] == jnp.float32


def test_trace_in_one_operand_is_rejected():
  x, y = _operands((2, 5), (5, 3))
  with pytest.raises(ValueError, match="summed within one operand"):
    matmul.einsum("ab,bc->c", x, y, jnp.bfloat16)
