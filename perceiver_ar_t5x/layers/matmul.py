"""Contractions at the activation dtype with float32 accumulation, forward and backward.

With bf16 activations every matmul should read bf16 operands and accumulate in
float32: that is what TPUs do natively and what CPUs with AVX512-BF16 / AMX run
at about twice their f32 rate. Plain `jnp.einsum` on bf16 operands gets neither:
its backward pass contracts the float32 cotangent with the bf16 operand, so XLA
upcasts both and runs the slow f32 kernel, and a bf16-output dot is upcast on
CPU as well. `einsum` here fixes both passes: the forward contracts bf16 x bf16
-> f32 (then casts to the activation dtype), and its VJP casts the cotangent to
the activation dtype and runs the two transposed contractions the same way.
In float32 it is exactly `jnp.einsum`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _operands(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(" ", "").split("->")
  a, b = inputs.split(",")
  return a, b, out


def _check(spec: str) -> None:
  """Each operand's indices must appear in the other operand or the output."""
  a, b, out = _operands(spec)
  for mine, others in ((a, b + out), (b, a + out)):
    lonely = set(mine.replace(".", "")) - set(others)
    if lonely:
      raise ValueError(f"einsum {spec!r}: indices {sorted(lonely)} are summed within one "
                       "operand; the mixed-precision VJP needs them in the other or the output")


def _accumulate(spec: str, x: jax.Array, y: jax.Array, dtype: jnp.dtype,
                out_dtype: jnp.dtype) -> jax.Array:
  return jnp.einsum(spec, x.astype(dtype), y.astype(dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _low_precision(spec: str, x: jax.Array, y: jax.Array, dtype: jnp.dtype,
                   out_dtype: jnp.dtype) -> jax.Array:
  return _accumulate(spec, x, y, dtype, out_dtype)


def _low_precision_fwd(spec, x, y, dtype, out_dtype):
  return _accumulate(spec, x, y, dtype, out_dtype), (x, y)


def _low_precision_bwd(spec: str, dtype: jnp.dtype, _: jnp.dtype, residuals: tuple,
                       ct: jax.Array):
  x, y = residuals
  a, b, out = _operands(spec)
  ct = ct.astype(dtype)
  dx = jnp.einsum(f"{out},{b}->{a}", ct, y.astype(dtype), preferred_element_type=jnp.float32)
  dy = jnp.einsum(f"{a},{out}->{b}", x.astype(dtype), ct, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dy.astype(y.dtype)


_low_precision.defvjp(_low_precision_fwd, _low_precision_bwd)


def einsum(spec: str, x: jax.Array, y: jax.Array, dtype: jnp.dtype = jnp.float32,
           out_dtype: jnp.dtype | None = None) -> jax.Array:
  """jnp.einsum(spec, x, y) computed at `dtype` with float32 accumulation.

  Args:
    spec: a two-operand einsum without repeated-index traces, e.g. "ble,ehd->blhd".
    x, y: operands of any float dtype (cast to `dtype`; gradients come back in theirs).
    dtype: the compute dtype. float32 gives plain jnp.einsum (and its autodiff).
    out_dtype: the result's dtype (default `dtype`), e.g. float32 attention logits
      from bf16 queries and keys.
  """
  dtype = jnp.dtype(dtype)
  out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
  if dtype == jnp.float32:
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype)).astype(out_dtype)
  _check(spec)
  return _low_precision(spec, x, y, dtype, out_dtype)
