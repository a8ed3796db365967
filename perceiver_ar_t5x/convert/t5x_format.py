"""Reads T5X checkpoints (flaxformer models) into nested dicts of numpy arrays, without t5x.

Perceiver AR models trained with T5X + flaxformer live in T5X checkpoints; t5x and flaxformer
are not installable here, so the importer reads the on-disk format directly. Two layouts exist
(google-research/t5x `t5x/checkpoints.py`; details and citations in the research notes):

- Legacy `Checkpointer`: `MODEL_DIR/checkpoint_<step>/checkpoint` is a flax.serialization
  msgpack `{'version': 3, 'optimizer': {'target': ..., 'state': {'step': ...}}}`. Unpartitioned
  leaves are inline numpy arrays (flax ext types); partitioned leaves are replaced by their
  TensorStore spec as a map (`{'driver': 'zarr', 'dtype', 'kvstore': {'driver': 'file',
  'path': 'target.decoder.layers_0.mlp.wo.kernel/'}, 'metadata': {...}}`), the path relative to
  the step dir, where a zarr v2 array (`.zarray`, gzip or zstd chunks) holds the data.
- Orbax (`OrbaxCheckpointManagerInterface`): `MODEL_DIR/checkpoint_<step>/state/` is an orbax
  PyTree checkpoint of `{'target': ..., 'state': {'step': ...}}` (`_METADATA` + OCDBT), or in
  older orbax an aggregate msgpack `checkpoint` whose leaves are `'PLACEHOLDER://<name>'` strings
  naming zarr dirs beside it.

Paths go through tf.io.gfile (via `fileio`) and TensorStore, so gs:// model dirs work.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import serialization

from perceiver_ar_t5x import fileio

_MSGPACK_FILE = "checkpoint"  # t5x checkpoints._FLAX_CHECKPOINT_FILE, orbax aggregate file
_ORBAX_ITEM = "state"  # t5x checkpoints._STATE_KEY: the orbax item holding the train state
_ORBAX_METADATA = "_METADATA"  # orbax PYTREE_METADATA_FILE
_PLACEHOLDER = "PLACEHOLDER://"  # orbax utils._PLACEHOLDER_PREFIX
_STEP_DIR = re.compile(r"checkpoint_(\d+)")  # t5x checkpoints_utils.all_steps
_SUPPORTED_VERSIONS = (0, 2, 3)  # 0: no 'version' key (plain flax); t5x refuses 1
_SPEC_KEYS = frozenset(("driver", "kvstore", "metadata"))  # t5x checkpoint_utils._contains_ts_spec
_GCS = re.compile(r"gs://([^/]+)/(.*)", re.DOTALL)


def read_t5x_checkpoint(path: str) -> tuple[dict[str, Any], int]:
  """Returns (the `target` parameter tree as nested dicts of numpy arrays, the step).

  `path` is a `checkpoint_<step>` dir, the `checkpoint` msgpack file in one, or a model dir
  (then its highest `checkpoint_<step>`). Arrays keep their stored dtype (bfloat16 comes back
  as `ml_dtypes.bfloat16`, bit-exact). The step is the stored `state.step`, else the one in the
  dir name. Anything unrecognised raises a one-line ValueError saying what was expected.
  """
  step_dir = _find_step_dir(fileio.absolute(path))
  orbax_dir = posixpath.join(step_dir, _ORBAX_ITEM)
  if fileio.gfile.isdir(orbax_dir):
    if fileio.gfile.exists(posixpath.join(orbax_dir, _ORBAX_METADATA)):
      target, step = _read_orbax(orbax_dir)
    else:
      target, step = _read_msgpack(orbax_dir)
  elif fileio.gfile.exists(posixpath.join(step_dir, _ORBAX_METADATA)):
    target, step = _read_orbax(step_dir)
  else:
    target, step = _read_msgpack(step_dir)
  if step is None:
    match = _STEP_DIR.fullmatch(posixpath.basename(step_dir))
    if match is None:
      raise ValueError(f"T5X checkpoint {step_dir}: no state.step stored and the dir name is "
                       f"not checkpoint_<step>")
    step = int(match.group(1))
  return target, step


def _find_step_dir(path: str) -> str:
  """The step dir for `path`: itself, the dir of a `checkpoint` file, or a model dir's latest."""
  if not fileio.gfile.exists(path):
    raise ValueError(f"Not a T5X checkpoint: {path} does not exist")
  if not fileio.gfile.isdir(path):
    if posixpath.basename(path) == _MSGPACK_FILE:
      return posixpath.dirname(path)
    raise ValueError(f"Not a T5X checkpoint: expected a dir or a '{_MSGPACK_FILE}' file, "
                     f"found the file {path}")
  names = sorted(n.rstrip("/") for n in fileio.gfile.listdir(path))
  if _MSGPACK_FILE in names or _ORBAX_ITEM in names or _ORBAX_METADATA in names:
    return path
  steps = [int(m.group(1)) for m in map(_STEP_DIR.fullmatch, names) if m]
  if steps:
    return posixpath.join(path, f"checkpoint_{max(steps)}")
  found = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
  raise ValueError(f"Not a T5X checkpoint: expected {path} to hold a '{_MSGPACK_FILE}' msgpack "
                   f"file, an orbax '{_ORBAX_ITEM}/' dir or checkpoint_<step> dirs; found {found}")


def _read_msgpack(ckpt_dir: str) -> tuple[dict[str, Any], int | None]:
  """Reads a T5X (or orbax aggregate) msgpack and the TensorStore arrays it refers to."""
  file = posixpath.join(ckpt_dir, _MSGPACK_FILE)
  if not fileio.gfile.exists(file):
    raise ValueError(f"Not a T5X checkpoint: expected the msgpack file {file}; it does not exist")
  with fileio.gfile.GFile(file, "rb") as f:
    raw = f.read()
  if raw.startswith(b"model_checkpoint_path"):
    raise ValueError(f"{file} is a TensorFlow checkpoint index (T5X_TF / Mesh TF), not a T5X "
                     f"msgpack checkpoint")
  try:
    contents = serialization.msgpack_restore(raw)
  except ValueError as e:  # msgpack's errors (truncated, extra data) are ValueErrors
    raise ValueError(f"T5X checkpoint {file} is not a readable msgpack ({len(raw)} bytes, "
                     f"truncated or corrupt?): {e}") from None
  return _target_and_step(_train_state(contents, file), ckpt_dir)


def _train_state(contents: Any, file: str) -> dict[str, Any]:
  """The train-state dict (`target`, `state`) inside the msgpack, by T5X checkpoint version."""
  if not isinstance(contents, dict):
    raise ValueError(f"T5X checkpoint {file}: expected a msgpack map at the top level, "
                     f"found {type(contents).__name__}")
  version = contents.get("version", 0)  # t5x: no version = a Flax optimizer state dict as is
  if version not in _SUPPORTED_VERSIONS:
    raise ValueError(f"T5X checkpoint {file}: expected version 2 or 3 (or none), found version "
                     f"{version!r}")
  if version:
    contents = contents.get("optimizer")
  if not isinstance(contents, dict) or not isinstance(contents.get("target"), dict):
    keys = sorted(contents) if isinstance(contents, dict) else type(contents).__name__
    raise ValueError(f"T5X checkpoint {file}: expected a 'target' parameter tree, found {keys}")
  return contents


def _target_and_step(state: dict[str, Any], ckpt_dir: str) -> tuple[dict[str, Any], int | None]:
  """Resolves `target` and `state.step` (never the optimizer state, often larger than both)."""
  wanted: dict[str, Any] = {"target": state["target"]}
  if isinstance(state.get("state"), dict) and state["state"].get("step") is not None:
    wanted["state"] = {"step": state["state"]["step"]}
  resolved = _resolve(wanted, ckpt_dir)
  return resolved["target"], _as_step(resolved.get("state", {}).get("step"), ckpt_dir)


def _as_step(step: Any, ckpt_dir: str) -> int | None:
  """The stored step as an int (it is a 0-d integer array or numpy scalar), or None."""
  if step is None:
    return None
  step = np.asarray(step)
  if step.shape != () or not np.issubdtype(step.dtype, np.integer):
    raise ValueError(f"T5X checkpoint {ckpt_dir}: expected state.step to be an integer scalar, "
                     f"found {step.dtype} {step.shape}")
  return int(step)


def _resolve(tree: dict[str, Any], ckpt_dir: str) -> dict[str, Any]:
  """Copies `tree` with every TensorStore reference replaced by its array.

  All opens, then all reads, are issued before waiting, so a checkpoint on GCS is read with
  TensorStore's concurrency rather than one parameter at a time.
  """
  pending: list[tuple[dict[str, Any], str, str, dict[str, Any], Any]] = []

  def walk(node: dict[str, Any], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
      leaf = f"{name}/{key}" if name else key
      if isinstance(value, dict) and _SPEC_KEYS <= value.keys():
        spec = _open_spec(value, ckpt_dir, leaf)
        pending.append((out, key, leaf, value, ts.open(spec, open=True)))
      elif isinstance(value, str) and value.startswith(_PLACEHOLDER):
        rel = value[len(_PLACEHOLDER):]
        spec = {"driver": "zarr", "kvstore": _kvstore(ckpt_dir, rel, leaf)}
        pending.append((out, key, leaf, {}, ts.open(spec, open=True)))
      elif isinstance(value, dict):
        out[key] = walk(value, leaf)
      elif isinstance(value, (np.ndarray, np.generic)):
        out[key] = np.array(value)  # msgpack arrays are read-only views of the file bytes
      else:
        raise ValueError(f"T5X checkpoint {ckpt_dir}: expected an array, a TensorStore spec or "
                         f"'{_PLACEHOLDER}<name>' at {leaf}, found {type(value).__name__}")
    return out

  result = walk(tree, "")
  stores = [_wait(opened, leaf, ckpt_dir) for _, _, leaf, _, opened in pending]
  reads = [store.read() for store in stores]  # every read in flight before the first wait
  for (out, key, leaf, spec, _), read in zip(pending, reads):
    out[key] = _check(_wait(read, leaf, ckpt_dir), spec, leaf, ckpt_dir)
  return result


def _open_spec(spec: dict[str, Any], ckpt_dir: str, leaf: str) -> dict[str, Any]:
  """The spec to open a stored T5X TensorStore reference (t5x `_read_ts`), path made absolute."""
  dtype = spec.get("dtype") or spec["metadata"].get("dtype")
  if dtype in ("uint16", "<u2"):
    raise ValueError(f"T5X checkpoint {ckpt_dir}: {leaf} is stored as uint16 (version-2 bfloat16);"
                     f" t5x refuses these too: re-save it with T5X version 3")
  kvstore = spec["kvstore"]
  if kvstore.get("driver") not in ("file", "gfile", "gcs"):
    raise ValueError(f"T5X checkpoint {ckpt_dir}: expected a file/gfile/gcs kvstore for {leaf}, "
                     f"found {kvstore.get('driver')!r}")
  rel = kvstore.get("path", spec.get("path"))  # tensorstore<0.1.14 put 'path' at the top level
  if not isinstance(rel, str):
    raise ValueError(f"T5X checkpoint {ckpt_dir}: the TensorStore spec of {leaf} has no path")
  return {"driver": spec["driver"], "kvstore": _kvstore(ckpt_dir, rel, leaf)}


def _kvstore(ckpt_dir: str, rel: str, leaf: str) -> dict[str, Any]:
  """A TensorStore kvstore for `rel` under `ckpt_dir` (local path or gs://bucket/...)."""
  full = posixpath.join(ckpt_dir, rel)
  gcs = _GCS.fullmatch(full)
  if gcs:
    return {"driver": "gcs", "bucket": gcs.group(1), "path": gcs.group(2)}
  if fileio.is_url(full):
    raise ValueError(f"T5X checkpoint {ckpt_dir}: TensorStore can read local or gs:// paths, "
                     f"not {full} (for {leaf})")
  return {"driver": "file", "path": full}


def _wait(future: Any, leaf: str, ckpt_dir: str) -> Any:
  """`future.result()`, with TensorStore's errors (ValueError) turned into one line."""
  try:
    return future.result()
  except ValueError as e:
    reason = str(e).split(" [source locations", 1)[0].splitlines()[0]
    raise ValueError(f"T5X checkpoint {ckpt_dir}: cannot read {leaf}: {reason}") from None


def _check(array: np.ndarray, spec: dict[str, Any], leaf: str, ckpt_dir: str) -> np.ndarray:
  """Checks the array read against the shape/dtype the msgpack recorded for it."""
  meta = spec.get("metadata", {})
  if "shape" in meta and tuple(meta["shape"]) != array.shape:
    raise ValueError(f"T5X checkpoint {ckpt_dir}: {leaf} should have shape "
                     f"{tuple(meta['shape'])} (msgpack), the zarr array has {array.shape}")
  if "dtype" in spec and ts.dtype(spec["dtype"]).numpy_dtype != array.dtype:
    raise ValueError(f"T5X checkpoint {ckpt_dir}: {leaf} should be {spec['dtype']} (msgpack), "
                     f"the zarr array is {array.dtype}")
  return array


def _read_orbax(state_dir: str) -> tuple[dict[str, Any], int | None]:
  """Restores `target` and `state.step` (not the optimizer state) of an orbax T5X checkpoint."""
  directory = epath.Path(state_dir)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    try:
      tree = checkpointer.metadata(directory).item_metadata.tree
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"Orbax T5X checkpoint {state_dir}: unreadable metadata: "
                       f"{str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("target"), dict):
      keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
      raise ValueError(f"Orbax T5X checkpoint {state_dir}: expected a 'target' tree, found {keys}")
    item: dict[str, Any] = {"target": tree["target"]}
    state = tree.get("state")
    if isinstance(state, dict) and "step" in state:
      item["state"] = {"step": state["step"]}
    restore_args = _map_leaves(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    try:
      restored = checkpointer.restore(directory, args=args)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"Orbax T5X checkpoint {state_dir}: cannot restore: "
                       f"{str(e).splitlines()[0]}") from None
  step = restored.get("state", {}).get("step")
  return _map_leaves(np.asarray, restored["target"]), _as_step(step, state_dir)


def _map_leaves(fn: Any, tree: Any) -> Any:
  """Maps `fn` over the non-dict leaves of nested dicts (empty dicts stay empty dicts)."""
  if isinstance(tree, dict):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)
