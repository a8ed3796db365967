"""Logical axis names, the one rules function, and mesh helpers.

Every parameter and the main activations carry *logical* axis names (the T5X
convention). `logical_axis_rules` maps them onto the two physical mesh axes
`data` and `model`; changing the parallelism strategy means changing the rules,
never the model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The one set of logical axis names used across the package.
BATCH = "batch"
LENGTH = "length"  # full input length (layer-0 keys/values)
LATENTS = "latents"  # latent positions (queries of layer 0, whole latent stack)
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"  # per-head feature dim
VOCAB = "vocab"
LAYERS = "layers"  # stacked (scanned) layer axis
JOINED_KV = "joined_kv"

LOGICAL_AXES = (BATCH, LENGTH, LATENTS, EMBED, MLP, HEADS, KV, VOCAB, LAYERS, JOINED_KV)

DATA_AXIS = "data"
MODEL_AXIS = "model"


@dataclasses.dataclass(frozen=True)
class PartitioningConfig:
  """How to lay the model out on devices.

  Attributes:
    num_partitions: size of the `model` mesh axis (tensor parallelism over
      heads/mlp/vocab); the `data` axis gets the remaining devices (T5X's
      `num_partitions`).
    fsdp: also shard parameters over the `data` axis along `embed` (ZeRO-3 /
      FSDP style parameter sharding).
    shard_length: shard layer-0 keys/values along the input length over the
      `model` axis, so very long contexts span devices.
  """

  num_partitions: int = 1
  fsdp: bool = False
  shard_length: bool = False


def logical_axis_rules(config: PartitioningConfig = PartitioningConfig()
                       ) -> tuple[tuple[str, Any], ...]:
  """The one rules function: logical axis name -> mesh axis (or None)."""
  return (
      (BATCH, DATA_AXIS),
      (LENGTH, MODEL_AXIS if config.shard_length else None),
      (LATENTS, None),
      (EMBED, DATA_AXIS if config.fsdp else None),
      (MLP, MODEL_AXIS),
      (HEADS, MODEL_AXIS),
      (KV, None),
      (VOCAB, MODEL_AXIS),
      (LAYERS, None),
      (JOINED_KV, MODEL_AXIS),
  )


def make_mesh(num_partitions: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  if num_partitions < 1 or len(devices) % num_partitions:
    raise ValueError(
        f"num_partitions={num_partitions} must divide the device count {len(devices)}")
  grid = np.asarray(devices).reshape(len(devices) // num_partitions, num_partitions)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def logical_sharding(mesh: Mesh, logical_spec: Any,
                     rules: Sequence[tuple[str, Any]]) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_spec, mesh, rules)


def fitted_shardings(logical_spec: Any, shapes: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]]) -> Any:
  """Like `logical_sharding`, but a dim that the mesh axis does not divide is replicated.

  A tiny test vocabulary of 11 cannot be split over a model axis of 2; rather
  than refusing, that one dimension stays whole (the others keep their rule).
  """
  mesh_specs = nn.logical_to_mesh(logical_spec, rules)

  def fit(spec: PartitionSpec, shape: Any) -> NamedSharding:
    axes = []
    for dim, axis in zip(shape.shape, tuple(spec) + (None,) * (len(shape.shape) - len(spec))):
      names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      axes.append(axis if dim % size == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*axes))

  return jax.tree.map(fit, mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split along their leading axis over `data`."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe_shardings(params_spec: Any) -> list[str]:
  """One line per parameter: path, logical axes (for logs and model-info.txt)."""
  flat = jax.tree_util.tree_flatten_with_path(
      params_spec, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  return [f"{jax.tree_util.keystr(path)}: {tuple(spec)}" for path, spec in flat]
