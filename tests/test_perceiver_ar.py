"""The decoder: causality, latent placement, prefix dropout, parameter shapes."""

import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x.layers.attention import Attention, AttentionKernel
from perceiver_ar_t5x.layers.embedding import PositionEncoding

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tiny_param_shapes.json"


def _tokens(batch=2, length=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 1, 13)


def _init(module, tokens):
  return module.init(jax.random.key(0), tokens)


@pytest.mark.parametrize("encoding", list(PositionEncoding))
def test_changing_a_future_token_never_changes_an_earlier_logit(tiny_module, encoding):
  module = tiny_module.clone(position_encoding=encoding)
  tokens = _tokens()
  params = _init(module, tokens)
  base = module.apply(params, tokens)  # latents at positions 6..9
  for pos in range(6, 10):
    changed = tokens.at[:, pos].set((tokens[:, pos] % 12) + 1)
    out = module.apply(params, changed)
    row = pos - 6
    np.testing.assert_allclose(out[:, :row], base[:, :row], atol=1e-6)
    assert not np.allclose(out[:, row:], base[:, row:], atol=1e-6)


def test_prefix_tokens_are_read(tiny_module):
  tokens = _tokens()
  params = _init(tiny_module, tokens)
  changed = tokens.at[:, 0].set((tokens[:, 0] % 12) + 1)
  assert not np.allclose(tiny_module.apply(params, changed), tiny_module.apply(params, tokens))


def test_latents_are_the_last_positions_per_example(tiny_module):
  tokens = _tokens(length=10)
  params = _init(tiny_module, tokens)
  # Example 1 is 7 long: its window starts at 3 and must equal a 7-token run of it.
  starts = jnp.array([6, 3])
  out = tiny_module.apply(params, tokens, latent_starts=starts)
  alone = tiny_module.apply(params, tokens[1:, :7])
  np.testing.assert_allclose(out[1], alone[0], atol=1e-5)
  np.testing.assert_allclose(out[0], tiny_module.apply(params, tokens)[0], atol=1e-6)


def test_sequence_shorter_than_num_latents_is_all_latents(tiny_module):
  tokens = _tokens(length=3)
  params = _init(tiny_module, tokens)
  assert tiny_module.apply(params, tokens).shape == (2, 3, 13)


def _layer0_key_lengths(module, params, tokens, **kwargs):
  seen = []

  def record(next_fun, args, kwargs_, context):
    if isinstance(context.module, Attention) and context.method_name == "__call__":
      seen.append(args[1].shape[1])  # kv_in [batch, keys, embed]
    return next_fun(*args, **kwargs_)

  with nn.intercept_methods(record):
    module.apply(params, tokens, **kwargs)
  return seen


def test_prefix_dropout_really_removes_keys(tiny_module):
  module = tiny_module.clone(prefix_dropout=0.5)
  tokens = _tokens(length=12)  # prefix 8, latents 4
  params = _init(module, tokens)
  train = _layer0_key_lengths(module, params, tokens, deterministic=False,
                              rngs={"dropout": jax.random.key(1)})
  evals = _layer0_key_lengths(module, params, tokens)
  assert train[0] == 4 + 4 and evals[0] == 12
  assert train[1:] == [4, 4] and evals[1:] == [4, 4]  # latent stack unchanged


def test_prefix_dropout_keeps_latents_and_is_rng_driven(tiny_module):
  module = tiny_module.clone(prefix_dropout=0.5)
  tokens = _tokens(length=12)
  params = _init(module, tokens)

  def run(seed):
    return module.apply(params, tokens, deterministic=False, rngs={"dropout": jax.random.key(seed)})

  np.testing.assert_array_equal(run(3), run(3))
  assert not np.allclose(run(3), run(4))


def test_param_shapes_and_logical_axes_match_golden(tiny_module):
  boxed = jax.eval_shape(lambda: tiny_module.init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32)))
  flat = jax.tree_util.tree_flatten_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  got = {jax.tree_util.keystr(p): {"shape": list(v.value.shape), "axes": list(v.names)}
         for p, v in flat}
  assert got == json.loads(GOLDEN.read_text())


def test_bad_tokens_are_rejected_with_shape_in_message(tiny_module):
  with pytest.raises(ValueError, match=r"int \[batch, length\]"):
    tiny_module.init(jax.random.key(0), jnp.zeros((10,), jnp.int32))


@pytest.mark.parametrize("kernel", list(AttentionKernel))
def test_bfloat16_activations_track_float32_and_keep_float32_grads(tiny_module, kernel):
  """bf16 runs the matmuls on bf16 operands (f32 accumulation); grads stay f32 and close."""
  tiny_module = tiny_module.clone(attention_kernel=kernel, attention_chunk_size=4)
  tokens = _tokens(length=10)
  params = _init(tiny_module, tokens)

  def loss(module):
    def f(p):
      logits = module.apply(p, tokens)  # [batch, latents, vocab] f32
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 3])
    return jax.value_and_grad(f)(params)

  want, want_grads = loss(tiny_module)
  got, got_grads = loss(tiny_module.clone(dtype=jnp.bfloat16))
  np.testing.assert_allclose(got, want, rtol=2e-2)
  for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, w, atol=5e-2 * float(jnp.max(jnp.abs(w))) + 1e-6)


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str, str]]:
  """(lhs dtype, rhs dtype, op_name) of every dot in an optimised HLO module's text."""
  dtypes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  return [(dtypes.get(lhs, "?"), dtypes.get(rhs, "?"), op)
          for lhs, rhs, op in re.findall(
              r" dot\(%([\w.\-]+), %([\w.\-]+)\)[^\n]*?op_name=\"([^\"]+)\"", hlo)]


def test_bfloat16_training_step_runs_every_product_but_the_logits_in_bf16(tiny_module):
  """XLA CPU runs a bf16 dot in f32 when an operand is a transpose kept as a layout change
  (its operand upcaster); heads_first / row_major materialise the transposes instead.

  Shapes big enough for XLA's bf16 dot library (at the tiny fixture's it upcasts
  anyway); 256 latents = two query blocks, the last of which reads the unsliced k/v.
  The PLAIN kernel's layer-0 backward still runs f32 products (autodiff's transposes).
  """
  probe = jax.jit(lambda a, b: jnp.einsum("bqd,bkd->bqk", a, b, preferred_element_type=jnp.float32))
  x = jnp.ones((16, 256, 32), jnp.bfloat16)
  if _dot_operand_dtypes(probe.lower(x, x).compile().as_text())[0][:2] != ("bf16", "bf16"):
    pytest.skip("this CPU's XLA runs even a plain bf16 dot in f32")
  module = tiny_module.clone(num_latents=256, embed_dim=64, num_heads=2, head_dim=32,
                             mlp_dim=128, max_length=512, dtype=jnp.bfloat16,
                             attention_kernel=AttentionKernel.CHUNKED, attention_chunk_size=128)
  tokens = _tokens(length=512)
  params = _init(module, tokens)

  def loss(p):
    return jnp.mean(module.apply(p, tokens))

  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  dots = _dot_operand_dtypes(hlo)
  assert len(dots) > 50
  upcast = [op for lhs, rhs, op in dots if "logits" not in op and (lhs, rhs) != ("bf16", "bf16")]
  assert not upcast, upcast
