"""Writes synthetic checkpoints in T5X's legacy msgpack + TensorStore layout, for tests.

Written from google-research/t5x `t5x/checkpoints.py` (`Checkpointer.save`,
`_write_state_to_tensorstore`, `_get_parameter_infos`, `_get_spec`, `_choose_chunk_shape`) and
flax `serialization.to_bytes`, not from our reader, so the reader is tested against the format
and not against itself. What t5x does, step by step:

- `MODEL_DIR/checkpoint_<step>.tmp-<timestamp>/` is filled, then renamed to `checkpoint_<step>`.
- Each partitioned leaf (one with logical axes; the name is its tree path joined by '/') goes to
  a zarr v2 TensorStore at `<name with '/' -> '.'>/` in that dir, with metadata
  `{'compressor': {'id': 'gzip'}, 'shape', 'chunks'}` (numpy leaves, chunks from
  `_choose_chunk_shape(shape, 64 MiB / itemsize)`) or `{'compressor': {'id': 'zstd'}, ...,
  'chunks': shard shape}` (jax.Array leaves, jax `array_serialization._get_metadata`). `target`
  leaves are written through a `cast` driver to the save dtype (`SaveCheckpointConfig.dtype`,
  'float32' by default), and the spec kept for the msgpack carries that dtype.
- Unpartitioned leaves (no axes: `state.step` always) stay in the msgpack as flax ext-typed
  numpy arrays; `target` ones are cast to the save dtype (`_cast_arr_if_not_partitioned`).
- The msgpack `checkpoint` is `to_bytes({'version': 3, 'optimizer': written})`, where each
  TensorStore leaf is `ts.Spec.to_json()` with the path relative to the step dir (t5x registers
  ts.Spec with flax serialization that way). `written` went through `jax.tree_util`, which sorts
  dict keys; the top level keeps `version` before `optimizer`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import serialization

VERSION = 3  # t5x checkpoints.VERSION since 2021-06-10: bfloat16 stored natively
DESIRED_CHUNK_SIZE_BYTES = 64 * 1024 * 1024  # t5x checkpoints._DESIRED_CHUNK_SIZE_BYTES
GCS_DUMMY_BUCKET = "t5x-dummy-bucket"  # what t5x writes for gs:// model dirs


def choose_chunk_shape(write_shape: tuple[int, ...], target_elements: int) -> list[int]:
  """t5x's greedy chunking: drop the largest dim's largest divisor until under the target."""
  factors = [[i for i in range(1, size + 1) if size % i == 0] for size in write_shape]
  while int(np.prod([f[-1] for f in factors])) > target_elements:
    largest = max(range(len(factors)), key=lambda i: factors[i][-1])
    factors[largest].pop()
  return [f[-1] for f in factors]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}; the '/'-joined names t5x gives its parameter infos."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else key
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def _unflatten_sorted(flat: Mapping[str, Any]) -> dict[str, Any]:
  """'/'-names back to nested dicts with sorted keys (as jax.tree_util returns them)."""
  tree: dict[str, Any] = {}
  for name in sorted(flat):
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = flat[name]
  return tree


def _write_tensorstore(ckpt_dir: str, name: str, arr: np.ndarray, save_dtype: str | None,
                       shard_shape: tuple[int, ...] | None, kvstore_driver: str) -> dict:
  """Writes one partitioned leaf as t5x does; returns the spec JSON that goes in the msgpack."""
  if shard_shape is None:  # numpy leaf: gzip, t5x's own chunking
    chunks = choose_chunk_shape(arr.shape, DESIRED_CHUNK_SIZE_BYTES // arr.dtype.itemsize)
    metadata = {"compressor": {"id": "gzip"}, "shape": arr.shape, "chunks": np.array(chunks)}
  else:  # jax.Array leaf: zstd, one chunk per device shard
    metadata = {"compressor": {"id": "zstd"}, "shape": arr.shape,
                "chunks": np.array(np.maximum(1, shard_shape))}
  path = name.replace("/", ".")
  if kvstore_driver == "gcs":  # t5x `_get_spec` for gs:// dirs: dummy bucket, top-level path
    spec = {"driver": "zarr", "dtype": arr.dtype.name, "path": path, "metadata": metadata,
            "kvstore": {"driver": "gcs", "bucket": GCS_DUMMY_BUCKET}}
  else:  # 'gfile' is Google's internal TensorStore driver: spelled 'file' to build the spec
    spec = {"driver": "zarr", "dtype": arr.dtype.name, "metadata": metadata,
            "kvstore": {"driver": "file", "path": path}}
  stored = ts.Spec(spec).to_json()
  if kvstore_driver == "gfile":  # as in t5x's testdata tiny_t5/checkpoint_1/checkpoint
    stored["kvstore"]["driver"] = "gfile"
  if save_dtype is not None:
    stored["dtype"] = save_dtype
  local = ts.Spec(spec).to_json()  # the data itself goes to the local disk in tests
  local["dtype"] = stored["dtype"]
  local["kvstore"] = {"driver": "file", "path": os.path.join(ckpt_dir, local["kvstore"]["path"])}
  if save_dtype is not None:
    local = {"driver": "cast", "base": local, "dtype": arr.dtype.name}
  store = ts.open(local, create=True, open=True).result()
  store.write(arr).result()
  return stored


def _numpy_dtype(name: str) -> np.dtype:
  """'bfloat16' -> ml_dtypes.bfloat16 (what jnp.bfloat16 is); other names as numpy reads them."""
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def write_t5x_checkpoint(model_dir: str, state_dict: Mapping[str, Any], *,
                         inline: Iterable[str] = (), save_dtype: str | None = "float32",
                         shard_shapes: Mapping[str, tuple[int, ...]] | None = None,
                         kvstore_driver: str = "file") -> str:
  """Writes `state_dict` (a T5X `train_state.state_dict()`) as `model_dir/checkpoint_<step>`.

  Args:
    model_dir: the T5X model dir (created if missing).
    state_dict: `{'target': params, 'state': {'step': int, 'param_states': ...}}`.
    inline: '/'-names of leaves without partitioning, written into the msgpack (`state/step`
      always is).
    save_dtype: T5X's save dtype for `target` ('float32', 'bfloat16' or None for no cast).
    shard_shapes: '/'-names of leaves saved as sharded jax.Arrays -> their shard shape (zstd).
    kvstore_driver: 'file' (today), 'gfile' (older t5x) or 'gcs' (written to a gs:// dir and
      copied here).

  Returns:
    The `checkpoint_<step>` dir.
  """
  step = int(state_dict["state"]["step"])
  final_dir = os.path.join(model_dir, f"checkpoint_{step}")
  tmp_dir = f"{final_dir}.tmp-{int(time.time())}"
  os.makedirs(tmp_dir)
  inline = set(inline) | {"state/step"}
  shard_shapes = shard_shapes or {}
  written: dict[str, Any] = {}
  for name, value in flatten(state_dict).items():
    cast = save_dtype if name.startswith("target/") else None
    if isinstance(value, Mapping):  # an empty node (optax EmptyState) passes through
      written[name] = {}
    elif name in inline:
      arr = np.asarray(value) if name != "state/step" else np.int32(value)
      written[name] = arr.astype(_numpy_dtype(cast)) if cast else arr
    else:
      written[name] = _write_tensorstore(tmp_dir, name, np.asarray(value), cast,
                                         shard_shapes.get(name), kvstore_driver)
  contents = {"version": VERSION, "optimizer": _unflatten_sorted(written)}
  with open(os.path.join(tmp_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents, in_place=True))
  os.rename(tmp_dir, final_dir)
  return final_dir


def write_orbax_aggregate_checkpoint(model_dir: str, state_dict: Mapping[str, Any]) -> str:
  """Older orbax layout (t5x testdata `tiny_orbax/1/checkpoint`), under t5x's `state` item.

  `checkpoint_<step>/state/checkpoint` is a msgpack of the state tree in which every array leaf
  is the string 'PLACEHOLDER://<dotted name>' (orbax utils `leaf_placeholder`); the array is a
  zarr dir of that name beside it (zstd, as orbax's array handler writes it).
  """
  step = int(state_dict["state"]["step"])
  state_dir = os.path.join(model_dir, f"checkpoint_{step}", "state")
  os.makedirs(state_dir)
  written: dict[str, Any] = {}
  for name, value in flatten(state_dict).items():
    arr = np.asarray(value)
    dotted = name.replace("/", ".")
    metadata = {"compressor": {"id": "zstd"}, "shape": arr.shape, "chunks": arr.shape}
    spec = {"driver": "zarr", "dtype": arr.dtype.name, "metadata": metadata,
            "kvstore": {"driver": "file", "path": os.path.join(state_dir, dotted)}}
    ts.open(spec, create=True, open=True).result().write(arr).result()
    written[name] = "PLACEHOLDER://" + dotted
  with open(os.path.join(state_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(_unflatten_sorted(written), in_place=True))
  return os.path.dirname(state_dir)
