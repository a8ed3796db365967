"""Perceiver IO: adapters, padding, weight sharing, kernels, the objective, and meshes.

Sizes are distinct (batch 2, length 10, latents 4 x 12, heads 3 / 2, decoder 6 wide)
so a transposed axis fails loudly. Equality with the reference implementations is in
tests/convert/test_hf_io.py and test_official_io.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x import training
from perceiver_ar_t5x.io_models import PerceiverIOModel
from perceiver_ar_t5x.layers.attention import AttentionKernel
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.layers.io_adapters import fourier_features
from perceiver_ar_t5x.perceiver_io import ArrayInput, Head, PerceiverIO, TokenInput

LENGTH, VOCAB, MASK = 10, 17, 16


def mlm_module(**overrides) -> PerceiverIO:
  kw = dict(input_adapter=TokenInput(VOCAB, 6, LENGTH), num_latents=4, latent_dim=12,
            num_outputs=LENGTH, decoder_dim=6, num_blocks=2, num_self_attends_per_block=2,
            num_self_attend_heads=3, num_cross_attend_heads=2, cross_attend_qk_channels=8,
            cross_attend_v_channels=4, num_decoder_heads=2, decoder_qk_channels=4)
  return PerceiverIO(**{**kw, **overrides})


def mlm_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(seed)
  targets = rs.randint(3, MASK, (2, LENGTH)).astype(np.int32)
  targets[1, 7:] = 0  # padding
  masked = (rs.rand(2, LENGTH) < 0.4) & (targets > 0)
  masked[:, 0] = True
  inputs = np.where(masked, MASK, targets).astype(np.int32)
  return {"encoder_input_tokens": inputs, "encoder_target_tokens": targets,
          "encoder_loss_weights": masked.astype(np.int32)}


def init(module: PerceiverIO, x: jax.Array, mask=None):
  return module.init(jax.random.key(0), x, mask)["params"]


def test_every_param_has_logical_axes_and_the_documented_names():
  boxed = init(mlm_module(), jnp.ones((2, LENGTH), jnp.int32))
  specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree.leaves(nn.unbox(boxed))
  assert len(specs) == len(shapes) and all(len(s) == x.ndim for s, x in zip(specs, shapes))
  p = nn.unbox(boxed)
  assert set(p) == {"input_adapter", "latents", "encoder", "self_attend_0", "self_attend_1",
                    "output_queries", "decoder", "logits_bias"}
  enc = p["encoder"]["attention"]  # qk 8 = 2 x 4, v 4 = 2 x 2, keys from the 6-wide input
  assert enc["query"].shape == (12, 2, 4) and enc["key"].shape == (6, 2, 4)
  assert enc["value"].shape == (6, 2, 2) and enc["out"].shape == (2, 2, 12)
  assert p["encoder"]["pre_attention_kv_norm"]["bias"].shape == (6,)
  assert p["decoder"]["attention"]["key"].shape == (12, 2, 2)  # qk 4 over 2 heads
  assert p["decoder"]["attention"]["value"].shape == (12, 2, 2)  # v defaults to qk
  assert p["self_attend_0"]["mlp"]["wi"].shape == (12, 12)


def test_padding_is_invisible_and_blocks_are_shared():
  module, batch = mlm_module(), mlm_batch()
  tokens, mask = jnp.asarray(batch["encoder_input_tokens"]), batch["encoder_input_tokens"] > 0
  params = init(module, tokens, mask)
  out = module.apply({"params": params}, tokens, mask)
  assert out.shape == (2, LENGTH, VOCAB)
  changed = tokens.at[1, 7:].set(5)  # other tokens at padded positions: same logits
  np.testing.assert_array_equal(module.apply({"params": params}, changed, mask), out)
  unmasked = module.apply({"params": params}, changed, jnp.ones_like(mask))
  assert float(jnp.abs(unmasked - out).max()) > 1e-3  # the mask matters
  once = module.clone(num_blocks=1)  # same params, the stack run once: other numbers
  assert float(jnp.abs(once.apply({"params": params}, tokens, mask) - out).max()) > 1e-3


def test_chunked_encoder_equals_plain_forward_and_backward():
  module, batch = mlm_module(), mlm_batch(1)
  chunked = module.clone(attention_kernel=AttentionKernel.CHUNKED, attention_chunk_size=3)
  tokens, mask = jnp.asarray(batch["encoder_input_tokens"]), batch["encoder_input_tokens"] > 0
  params = nn.unbox(init(module, tokens, mask))

  def loss(m, p):
    return jnp.sum(jnp.sin(m.apply({"params": p}, tokens, mask)))

  np.testing.assert_allclose(chunked.apply({"params": params}, tokens, mask),
                             module.apply({"params": params}, tokens, mask), atol=2e-5)
  grad = jax.jit(jax.grad(loss, 1), static_argnums=0)  # one compile beats eager op-by-op
  g_plain, g_chunk = grad(module, params), grad(chunked, params)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(b, a, atol=2e-4 * (1 + float(np.abs(a).max())))


def test_fixed_positions_have_no_tables_and_still_tell_positions_apart():
  module = mlm_module(input_adapter=TokenInput(VOCAB, 6, LENGTH,
                                               position_encoding=PositionEncoding.SINUSOIDAL),
                      output_queries=PositionEncoding.SINUSOIDAL)
  tokens = jnp.full((1, LENGTH), 5, jnp.int32)
  params = nn.unbox(init(module, tokens))
  assert "positions" not in params["input_adapter"] and "output_queries" not in params
  out = module.apply({"params": params}, tokens)  # same token everywhere: rows differ by position
  assert float(jnp.abs(out[0, 1:] - out[0, :1]).min(axis=-1).max()) > 0


def test_fourier_features_golden():
  got = fourier_features((3,), num_bands=2)  # positions -1, 0, 1; bands 1, 1.5 (= 3 / 2)
  pos = np.array([-1.0, 0.0, 1.0])[:, None]
  angles = np.pi * pos * np.array([1.0, 1.5])[None]
  np.testing.assert_allclose(got, np.concatenate([pos, np.sin(angles), np.cos(angles)], 1),
                             atol=1e-6)
  two_d = fourier_features((2, 3), num_bands=4)
  assert two_d.shape == (6, 2 + 2 * 2 * 4)
  np.testing.assert_allclose(two_d[:, :2], [[-1, -1], [-1, 0], [-1, 1], [1, -1], [1, 0], [1, 1]])


def test_array_input_classifier():
  module = PerceiverIO(ArrayInput((5, 4), num_bands=3), num_latents=4, latent_dim=12,
                       num_outputs=1, decoder_dim=6, head=Head.CLASSIFY, num_classes=5,
                       num_self_attend_heads=3)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 4, 3), jnp.float32)
  params = init(module, x)
  assert nn.unbox(params)["encoder"]["attention"]["key"].shape[0] == 3 + 2 + 2 * 2 * 3
  assert module.apply({"params": params}, x).shape == (2, 1, 5)
  with pytest.raises(ValueError, match=r"expects \[batch, 5, 4, channels\]"):
    module.apply({"params": params}, x[:, :4])


def test_shape_errors_say_what_was_expected():
  module = mlm_module(num_outputs=8)
  with pytest.raises(ValueError, match="num_outputs=8"):
    init(module, jnp.ones((2, LENGTH), jnp.int32))
  with pytest.raises(ValueError, match="num_classes > 0"):
    init(mlm_module(head=Head.CLASSIFY), jnp.ones((2, LENGTH), jnp.int32))
  with pytest.raises(ValueError, match="do not split into 3 heads"):
    init(mlm_module(self_attend_qk_channels=10), jnp.ones((2, LENGTH), jnp.int32))
  model = PerceiverIOModel(mlm_module(), mask_id=MASK)
  with pytest.raises(ValueError, match="exceeds the model's 10 positions"):
    model.check_lengths({"inputs": 12, "targets": 12})


def test_objective_counts_only_masked_positions():
  model, batch = PerceiverIOModel(mlm_module(), mask_id=MASK), mlm_batch()
  params = nn.unbox(model.init(jax.random.key(0), LENGTH))
  loss, m = model.loss_fn(params, batch, None)
  logits = model.logits(params, batch)
  logp = jax.nn.log_softmax(logits)
  w = batch["encoder_loss_weights"].astype(bool)
  nll = -np.take_along_axis(np.asarray(logp), batch["encoder_target_tokens"][..., None], -1)[..., 0]
  assert float(m["weight_sum"]) == w.sum()
  np.testing.assert_allclose(float(loss), nll[w].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["correct_sum"]),
                             (np.argmax(logits, -1) == batch["encoder_target_tokens"])[w].sum())
  # unmasked_weight: the loss adds the real unmasked bytes (never padding) at that weight;
  # the metrics stay on the masked bytes
  loss2, m2 = PerceiverIOModel(mlm_module(), mask_id=MASK, unmasked_weight=0.25).loss_fn(
      params, batch, None)
  rest = ~w & (batch["encoder_input_tokens"] > 0)
  np.testing.assert_allclose(float(loss2), (nll[w].sum() + 0.25 * nll[rest].sum())
                             / (w.sum() + 0.25 * rest.sum()), rtol=1e-5)
  assert {k: float(v) for k, v in m2.items()} == {k: float(v) for k, v in m.items()}


def _mesh_loss_and_grads(mesh_shape):
  model = PerceiverIOModel(mlm_module(num_self_attend_heads=2, dropout_rate=0.1), mask_id=MASK)
  data, model_axis = mesh_shape
  mesh = pt.make_mesh(model_axis, jax.devices()[:data * model_axis])
  state, part = training.create_state(model, optax.sgd(0.1), jax.random.key(0), LENGTH, mesh,
                                      pt.logical_axis_rules(pt.PartitioningConfig()))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, r: model.loss_fn(p, b, r)[0]),
                    in_shardings=(part.state_sharding.params, part.batch_sharding,
                                  pt.replicated(mesh)))
  batch = {k: np.concatenate([v] * 4) for k, v in mlm_batch().items()}  # 8 rows
  with part.context():
    loss, grads = grad_fn(state.params, pt.global_batch(batch, mesh),
                          pt.replicate(jax.random.key(7), mesh))
  specs = jax.tree.map(lambda x: tuple(x.sharding.spec), state.params)
  return float(loss), jax.tree.map(np.asarray, grads), specs


def test_loss_and_grads_do_not_depend_on_the_mesh():
  ref_loss, ref_grads, _ = _mesh_loss_and_grads((1, 1))
  for shape in [(8, 1), (4, 2)]:
    loss, grads, specs = _mesh_loss_and_grads(shape)
    assert abs(loss - ref_loss) <= 1e-6, shape
    # relative to each gradient's size (the latents' sum over the batch reaches ~10)
    diff = max(float(np.max(np.abs(a - b)) / (1.0 + np.max(np.abs(b)))) for a, b in
               zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert diff <= 5e-6, (shape, diff)  # f32 sums over 8 shards; a wrong split is O(1)
    if shape[1] > 1:  # really split: heads over `model`
      assert specs["self_attend_0"]["attention"]["query"] == (None, "model", None)
