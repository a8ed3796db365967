"""Logical axis names, the one rules function, and mesh helpers.

Every parameter and the main activations carry *logical* axis names (the T5X
convention). `logical_axis_rules` maps them onto the two physical mesh axes
`data` and `model`; changing the parallelism strategy means changing the rules,
never the model code. The same code runs on one CPU, on 8 fake CPU devices,
on several processes and on a TPU pod slice: only the mesh differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

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

Rules = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class PartitioningConfig:
  """How to lay the model out on devices.

  Attributes:
    num_partitions: size of the `model` mesh axis (tensor parallelism over
      heads/mlp/vocab); the `data` axis gets the remaining devices (T5X's
      `num_partitions`). Devices are taken in `jax.devices()` order, which is
      process-major, so a model group stays on one host while
      num_partitions <= local devices.
    fsdp: also shard parameters (and optimizer slots) over the `data` axis
      along `embed` (ZeRO-3 / FSDP style parameter sharding).
    shard_length: shard layer-0 keys/values along the input length over the
      `model` axis, so a very long context spans devices (sequence parallelism
      for the one layer that sees the whole input).
  """

  num_partitions: int = 1
  fsdp: bool = False
  shard_length: bool = False


def logical_axis_rules(config: PartitioningConfig = PartitioningConfig()) -> Rules:
  """The one rules function: logical axis name -> mesh axis (or None = replicated)."""
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
  """A (data, model) mesh over all (or the given) devices; model groups are consecutive."""
  devices = list(jax.devices() if devices is None else devices)
  if num_partitions < 1 or len(devices) % num_partitions:
    raise ValueError(
        f"num_partitions={num_partitions} must divide the device count {len(devices)}")
  grid = np.asarray(devices).reshape(len(devices) // num_partitions, num_partitions)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def logical_sharding(mesh: Mesh, logical_spec: Any, rules: Rules) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_spec, mesh, rules)


def fitted_shardings(logical_spec: Any, shapes: Any, mesh: Mesh, rules: Rules) -> Any:
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


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """Which slice of every global batch this process feeds (T5X's DataLayout).

  Processes whose devices hold the same rows of the `data` axis (a model group
  spanning hosts) are replicas: they get the same shard_index and must read
  the same examples.
  """

  shard_index: int
  num_shards: int


def data_layout(mesh: Mesh, process_index: int | None = None) -> DataLayout:
  """The data shard of `process_index` (default: this process) on `mesh`."""
  process_index = jax.process_index() if process_index is None else process_index
  rows_of: dict[int, set[int]] = {}
  for (row, _), device in np.ndenumerate(mesh.devices):
    rows_of.setdefault(device.process_index, set()).add(row)
  if process_index not in rows_of:
    raise ValueError(f"process {process_index} owns no device of mesh {dict(mesh.shape)}")
  groups = sorted({tuple(sorted(rows)) for rows in rows_of.values()})
  if len({len(g) for g in groups}) != 1:
    raise ValueError(f"processes hold unequal numbers of data rows on mesh {dict(mesh.shape)}")
  return DataLayout(groups.index(tuple(sorted(rows_of[process_index]))), len(groups))


def global_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy rows -> global arrays sharded over `data` (any process count).

  Each process passes its `batch_size // num_shards` rows (see `data_layout`);
  the result has the global batch size, rows ordered by shard index. Arrays
  that are already global (not fully addressable) pass through.
  """
  sharding = batch_sharding(mesh)
  shards = data_layout(mesh).num_shards

  def to_global(x: Any) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding, x, (x.shape[0] * shards,) + x.shape[1:])

  return {k: to_global(v) for k, v in batch.items()}


def replicate(x: jax.Array, mesh: Mesh) -> jax.Array:
  """A value that is identical on every process (an rng key) -> a replicated global array."""
  sharding = replicated(mesh)
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  return jax.jit(lambda y: y, out_shardings=sharding)(x)


def mesh_summary(mesh: Mesh) -> str:
  """One line: the mesh's axes and sizes, devices and processes."""
  return f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices in {jax.process_count()} " \
         "process(es)"


def describe(mesh: Mesh, params_logical: Any, params_sharding: Any) -> list[str]:
  """The mesh, then one line per parameter: path, logical axes -> mesh axes."""
  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  logical = jax.tree_util.tree_flatten_with_path(params_logical, is_leaf=is_spec)[0]
  mesh_specs = jax.tree.leaves(params_sharding,
                               is_leaf=lambda x: isinstance(x, NamedSharding))
  lines = [mesh_summary(mesh)]
  for (path, spec), sharding in zip(logical, mesh_specs, strict=True):
    lines.append(f"{jax.tree_util.keystr(path)}: {tuple(spec)} -> {tuple(sharding.spec)}")
  return lines
