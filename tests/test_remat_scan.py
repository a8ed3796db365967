"""Remat policies and the scanned latent stack compute the default model's function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x.perceiver_ar import PerceiverAR, RematPolicy, latent_layer_params

KW = dict(vocab_size=13, num_latents=4, embed_dim=12, num_heads=3, head_dim=8, mlp_dim=20,
          num_layers=3, prefix_dropout=0.5, dropout_rate=0.0)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 1, 13)


def _loss_and_grads(module: PerceiverAR, params):
  def loss(p):
    logits = module.apply({"params": p}, TOKENS, deterministic=False,
                          rngs={"dropout": jax.random.PRNGKey(2)})
    return jnp.mean(jnp.sin(logits))
  return jax.jit(jax.value_and_grad(loss))(params)


def _stacked(params):
  """Unrolled `layers_1..` -> the scanned layout (`latent_layers`, leading layer axis)."""
  params = dict(params)
  latent = [params.pop(f"layers_{i}") for i in range(1, KW["num_layers"])]
  params["latent_layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *latent)
  return params


@pytest.fixture(scope="module")
def reference():
  module = PerceiverAR(**KW)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), TOKENS)["params"])
  return params, _loss_and_grads(module, params)


@pytest.mark.parametrize("policy", list(RematPolicy))
def test_remat_policies_match_default(reference, policy: RematPolicy):
  params, (want, want_grads) = reference
  got, got_grads = _loss_and_grads(PerceiverAR(**KW, remat_policy=policy), params)
  np.testing.assert_allclose(got, want, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         got_grads, want_grads)


@pytest.mark.parametrize("policy", [RematPolicy.NONE, RematPolicy.DOTS_NO_BATCH])
def test_scanned_stack_matches_unrolled(reference, policy: RematPolicy):
  params, (want, want_grads) = reference
  module = PerceiverAR(**KW, scan_layers=True, remat_policy=policy)
  init_shapes = jax.eval_shape(
      lambda: nn.unbox(module.init(jax.random.PRNGKey(0), TOKENS)["params"]))
  stacked = _stacked(params)
  assert (jax.tree_util.tree_map(jnp.shape, init_shapes)
          == jax.tree_util.tree_map(jnp.shape, stacked))
  got, got_grads = _loss_and_grads(module, stacked)
  np.testing.assert_allclose(got, want, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         got_grads, _stacked(want_grads))


def test_latent_layer_params_reads_both_layouts(reference):
  params, _ = reference
  stacked = _stacked(params)
  for i in range(1, KW["num_layers"]):
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           latent_layer_params(stacked, i), params[f"layers_{i}"])
    assert latent_layer_params(params, i) is params[f"layers_{i}"]
