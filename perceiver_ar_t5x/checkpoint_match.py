"""Does a checkpoint fit the configured model? Decided from metadata, before any array is read.

A restore that cannot match must refuse (t5x names the parameter it failed to map)
rather than treat the checkpoint as corrupt and start over. Orbax records every
array's shape in the step's `state/_METADATA`; comparing that tree with the
configured model's abstract state (`jax.eval_shape`, no initialisation) tells a
config change apart from a damaged file without touching the array data. The
message names the first parameter that differs and the recorded configuration
values (model fields, and the gin macros the train binary passes in) that changed.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from perceiver_ar_t5x.models import PerceiverARModel

Shapes = dict[str, tuple[int, ...]]  # "params/layers_0/attention/query" -> shape

# Module fields flax adds to every linen dataclass; they do not describe the model.
_FLAX_FIELDS = ("parent", "name")
_OBJECTIVE_FIELDS = ("z_loss", "label_smoothing", "cropping", "mask_id")


def jsonable(value: Any) -> Any:
  """A JSON value that identifies `value` (enums by name, dtypes by name, others by str)."""
  if isinstance(value, enum.Enum):
    return f"{type(value).__name__}.{value.name}"
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
            if f.name not in _FLAX_FIELDS}  # a module field (Perceiver IO's input adapter)
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, type) or isinstance(value, np.dtype):
    try:
      return np.dtype(value).name
    except TypeError:
      pass
  return str(value)


def model_fields(model: PerceiverARModel) -> dict[str, Any]:
  """Every field of the module and the objective: what shapes (and trains) the params."""
  module = model.module
  fields = {f.name: jsonable(getattr(module, f.name)) for f in dataclasses.fields(module)
            if f.name not in _FLAX_FIELDS}
  fields.update({k: jsonable(getattr(model, k)) for k in _OBJECTIVE_FIELDS if hasattr(model, k)})
  return fields


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_shapes(tree: Any) -> Shapes:
  """{"a/b/c": shape} of a pytree of arrays, ShapeDtypeStructs or orbax ArrayMetadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def stored_shapes(step_dir: str, item: str = "state") -> Shapes:
  """Shapes recorded in a checkpoint's metadata (reads no array data).

  Raises OSError / ValueError when the metadata is missing or unreadable.
  """
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(step_dir, item)))
  return flat_shapes(meta.tree)


def first_mismatch(stored: Shapes, wanted: Shapes, *, partial: bool
                   ) -> tuple[str, tuple[int, ...] | None, tuple[int, ...] | None] | None:
  """(name, stored shape, wanted shape) of the first difference; None when they fit.

  A shape of None means "absent on that side". `partial`: the config asks for a
  subset (e.g. params only), so extra stored entries are fine.
  """
  for name, shape in wanted.items():
    if stored.get(name) != shape:
      return name, stored.get(name), shape
  if not partial:
    for name, shape in stored.items():
      if name not in wanted:
        return name, shape, None
  return None


def config_changes(stored_meta: Mapping[str, Any], current_meta: Mapping[str, Any]
                   ) -> list[str]:
  """["NUM_HEADS 2 -> 4", ...]: recorded model fields that differ, by macro name when known.

  A model field `num_heads` is reported as the gin macro `NUM_HEADS` when both
  runs recorded that macro (the convention of gin/models/*.gin); when no model field
  differs (older checkpoints, an optimizer change) the differing macros are listed.
  """
  old_model, new_model = stored_meta.get("model") or {}, current_meta.get("model") or {}
  old_cfg, new_cfg = stored_meta.get("config") or {}, current_meta.get("config") or {}
  changes = []
  for field, new in new_model.items():
    if field in old_model and old_model[field] != new:
      macro = field.upper()
      if macro in old_cfg and macro in new_cfg and old_cfg[macro] != new_cfg[macro]:
        changes.append(f"{macro} {old_cfg[macro]!r} -> {new_cfg[macro]!r}")
      else:
        changes.append(f"{field} {old_model[field]!r} -> {new!r}")
  if not changes:  # older checkpoints, or a change outside the model (e.g. the optimizer)
    changes = [f"{k} {old_cfg[k]!r} -> {v!r}" for k, v in new_cfg.items()
               if k in old_cfg and old_cfg[k] != v]
  return changes


def mismatch_message(mismatch: tuple[str, Any, Any], step: int, changes: list[str]) -> str:
  """One line: the first mismatching entry, then what changed in the configuration."""
  name, stored, wanted = mismatch
  shown = name.removeprefix("params/")
  if stored is None:
    text = f"{shown} is not in checkpoint {step}, the config gives {wanted}"
  elif wanted is None:
    text = f"{shown} {stored} is in checkpoint {step} but not in the config"
  else:
    text = f"{shown} is {stored} in checkpoint {step}, the config gives {wanted}"
  because = ", ".join(changes) if changes else "no recorded config value differs"
  return f"{text}: {because}"
