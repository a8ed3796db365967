"""Partitioning: rules, meshes, data layout, and mesh-independence of loss and grads.

The equality tests run one loss/grad computation on meshes (1,1) (a single
device), (8,1) and (4,2) of the 8 fake CPU devices: the partitioned
program must compute the same numbers as the single-device one.
"""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x import training
from perceiver_ar_t5x.layers.block import BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.models import CroppingMethod, PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

BATCH, LENGTH = 16, 20  # batch divides every data axis below


def divisible_model(**overrides) -> PerceiverARModel:
  """Distinct sizes that the model axis (2 or 4) divides: vocab 12, heads 4, mlp 28."""
  module = PerceiverAR(vocab_size=12, num_latents=6, embed_dim=24, num_heads=4, head_dim=8,
                       mlp_dim=28, num_layers=2, max_length=32)
  module = module.clone(**overrides)
  return PerceiverARModel(module, cropping=CroppingMethod.FULL_LATENTS)


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(seed)
  tokens = rs.randint(2, 12, (BATCH, LENGTH)).astype(np.int32)
  lengths = rs.randint(LENGTH - 6, LENGTH + 1, BATCH)
  tokens[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
  inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), tokens[:, :-1]], axis=1)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens,
          "decoder_loss_weights": (tokens > 0).astype(np.int32)}


def loss_and_grads(model: PerceiverARModel, mesh_shape: tuple[int, int],
                   cfg: pt.PartitioningConfig = pt.PartitioningConfig()):
  """(loss, grads as numpy, the params' shardings) of one training-mode step on a mesh."""
  data, model_axis = mesh_shape
  mesh = pt.make_mesh(model_axis, jax.devices()[:data * model_axis])
  state, part = training.create_state(model, optax.sgd(0.1), jax.random.key(0), LENGTH, mesh,
                                      pt.logical_axis_rules(cfg))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, r: model.loss_fn(p, b, r)[0]),
                    in_shardings=(part.state_sharding.params, part.batch_sharding,
                                  pt.replicated(mesh)))
  with part.context():
    loss, grads = grad_fn(state.params, pt.global_batch(make_batch(), mesh),
                          pt.replicate(jax.random.key(7), mesh))
  specs = jax.tree.map(lambda x: tuple(x.sharding.spec), state.params)
  return float(loss), jax.tree.map(np.asarray, grads), specs


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def single_device():
  return loss_and_grads(divisible_model(dropout_rate=0.1, prefix_dropout=0.3), (1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2)])
def test_loss_and_grads_do_not_depend_on_the_mesh(single_device, mesh_shape):
  loss, grads, specs = loss_and_grads(
      divisible_model(dropout_rate=0.1, prefix_dropout=0.3), mesh_shape)
  ref_loss, ref_grads, _ = single_device
  assert abs(loss - ref_loss) <= 1e-6
  assert max_diff(grads, ref_grads) <= 1e-6
  if mesh_shape[1] > 1:  # the model really is split: heads over `model`
    assert specs["layers_0"]["attention"]["query"] == (None, "model", None)


@pytest.mark.slow
def test_fsdp_and_length_sharding_do_not_change_the_numbers(single_device):
  cfg = pt.PartitioningConfig(num_partitions=2, fsdp=True, shard_length=True)
  loss, grads, specs = loss_and_grads(
      divisible_model(dropout_rate=0.1, prefix_dropout=0.3), (4, 2), cfg)
  assert abs(loss - single_device[0]) <= 1e-6
  assert max_diff(grads, single_device[1]) <= 1e-6
  assert specs["layers_0"]["attention"]["key"] == ("data", "model", None)


def _layer0_key_lengths(hlo: str, batch_per_device: int) -> set[int]:
  """Per-device key lengths of layer 0's key/value projections in compiled HLO.

  The projection is a [batch * keys, heads * head_dim] dot on each device.
  """
  pattern = (r"= f32\[(\d+),\d+\]\S* dot\([^\n]*"
             r"layers_0/attention/(?:attention\.project_key_value/)?ble,ehd->blhd")
  return {int(m.group(1)) // batch_per_device for m in re.finditer(pattern, hlo)}


@pytest.mark.parametrize("shard_length", [False, True])
def test_shard_length_splits_layer0_keys_over_the_model_axis(shard_length):
  """The compiled per-device program sees 1/4 of the 64 keys when length is sharded."""
  model = divisible_model(max_length=64)
  model = PerceiverARModel(model.module, cropping=CroppingMethod.NONE)
  length, mesh = 64, pt.make_mesh(4)
  cfg = pt.PartitioningConfig(num_partitions=4, shard_length=shard_length)
  state, part = training.create_state(model, optax.sgd(0.1), jax.random.key(0), length, mesh,
                                      pt.logical_axis_rules(cfg))
  tokens = np.random.RandomState(1).randint(2, 12, (8, length)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
           "decoder_loss_weights": np.ones_like(tokens)}
  loss = jax.jit(lambda p, b: model.loss_fn(p, b, None)[0],
                 in_shardings=(part.state_sharding.params, part.batch_sharding))
  with part.context():
    hlo = loss.lower(state.params, pt.global_batch(batch, mesh)).compile().as_text()
  assert _layer0_key_lengths(hlo, 8 // 2) == ({length // 4} if shard_length else {length})


def test_rules_name_every_logical_axis_once():
  for cfg in (pt.PartitioningConfig(), pt.PartitioningConfig(fsdp=True, shard_length=True)):
    rules = dict(pt.logical_axis_rules(cfg))
    assert set(rules) == set(pt.LOGICAL_AXES) and len(pt.logical_axis_rules(cfg)) == len(rules)
    assert rules[pt.BATCH] == "data" and rules[pt.HEADS] == "model"
    assert rules[pt.EMBED] == ("data" if cfg.fsdp else None)
    assert rules[pt.LENGTH] == ("model" if cfg.shard_length else None)


def test_make_mesh_shapes_and_errors():
  assert dict(pt.make_mesh(2).shape) == {"data": 4, "model": 2}
  assert dict(pt.make_mesh(1, jax.devices()[:1]).shape) == {"data": 1, "model": 1}
  with pytest.raises(ValueError, match="num_partitions=3 must divide the device count 8"):
    pt.make_mesh(3)


def test_fitted_shardings_replicate_a_dim_that_does_not_divide():
  mesh = pt.make_mesh(4)
  logical = {"w": PartitionSpec(pt.EMBED, pt.VOCAB), "b": PartitionSpec(pt.HEADS, pt.KV)}
  shapes = {"w": jax.ShapeDtypeStruct((6, 11), jnp.float32),
            "b": jax.ShapeDtypeStruct((8, 3), jnp.float32)}
  got = pt.fitted_shardings(logical, shapes, mesh, pt.logical_axis_rules())
  assert got["w"].spec == PartitionSpec(None, None)  # 11 over model=4: replicated
  assert got["b"].spec == PartitionSpec("model", None)


def _fake_mesh(shape: tuple[int, int], devices_per_process: int):
  devices = [types.SimpleNamespace(process_index=i // devices_per_process)
             for i in range(shape[0] * shape[1])]
  return types.SimpleNamespace(devices=np.array(devices, dtype=object).reshape(shape),
                               shape={"data": shape[0], "model": shape[1]})


@pytest.mark.parametrize(("shape", "per_process", "expected"), [
    ((8, 1), 4, [(0, 2), (1, 2)]),  # 2 hosts x 4 devices, pure data parallel
    ((4, 2), 2, [(0, 4), (1, 4), (2, 4), (3, 4)]),
    ((2, 4), 2, [(0, 2), (0, 2), (1, 2), (1, 2)]),  # a model group spans 2 hosts: replicas
    ((1, 8), 4, [(0, 1), (0, 1)]),
])
def test_data_layout(shape, per_process, expected):
  mesh = _fake_mesh(shape, per_process)
  got = [pt.data_layout(mesh, i) for i in range(len(expected))]
  assert [(g.shard_index, g.num_shards) for g in got] == expected


def test_global_batch_on_one_process_is_the_batch_split_over_data():
  mesh = pt.make_mesh(2)
  batch = make_batch()
  out = pt.global_batch(batch, mesh)
  for key, value in batch.items():
    assert out[key].sharding == NamedSharding(mesh, PartitionSpec("data"))
    np.testing.assert_array_equal(np.asarray(out[key]), value)


def test_describe_lists_the_mesh_and_every_param():
  mesh = pt.make_mesh(2)
  _, part = training.create_state(divisible_model(), optax.sgd(0.1), jax.random.key(0), LENGTH,
                                  mesh, pt.logical_axis_rules(pt.PartitioningConfig(2)))
  lines = pt.describe(mesh, part.params_logical, part.state_sharding.params)
  assert lines[0] == "mesh {'data': 4, 'model': 2} over 8 devices in 1 process(es)"
  assert "['layers_0']['attention']['query']: ('embed', 'heads', 'kv') -> (None, 'model', None)" \
      in lines
  assert len(lines) == 1 + len(jax.tree.leaves(part.state_sharding.params))


# Every option that adds or reshapes a parameter (layer 0's own norm, biases, plain MLP,
# latent query, frozen learned table, layer-0 MLP width, tied head + bias, no final norm).
BLOCK_OPTIONS = dict(block=BlockOptions(norm=NormKind.LAYER, use_bias=True, gated_mlp=False,
                                        activation=Activation.SQUARED_RELU,
                                        cross_kv_norm=CrossKvNorm.SEPARATE),
                     latent_query_projection=True, output_bias=True,
                     position_encoding=PositionEncoding.LEARNED, position_table_trainable=False,
                     rotary_layers=1, cross_mlp_dim=12, tie_embeddings=True, final_norm=False)


@pytest.mark.slow
def test_block_options_do_not_depend_on_the_mesh():
  """Every option's params carry logical axes that shard (fsdp + model axis) to the same
  numbers as one device."""
  model = divisible_model(dropout_rate=0.1, prefix_dropout=0.3, **BLOCK_OPTIONS)
  ref_loss, ref_grads, _ = loss_and_grads(model, (1, 1))
  cfg = pt.PartitioningConfig(num_partitions=2, fsdp=True)
  loss, grads, specs = loss_and_grads(model, (4, 2), cfg)
  assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)  # the tied head's loss is ~17
  assert max_diff(grads, ref_grads) <= 1e-5
  assert specs["layers_0"]["attention"]["query_bias"] == ("model", None)
