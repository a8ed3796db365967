"""Exports our checkpoints as `model.safetensors` + `config.json`, and imports them back.

For sharing (e.g. on a model hub) without orbax, gin or torch: the params are one
safetensors file (float32, names '/'-joined as in our param tree, e.g.
`layers_0/attention/query`), and `config.json` holds every PerceiverAR field as JSON
(enums by name, `BlockOptions` as a dict; checkpoint_match.jsonable), the step and the
format version. The safetensors file is written and read here with numpy (format: an
8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`,
then the little-endian buffers, https://github.com/huggingface/safetensors); the
`safetensors` package is not needed. `load_safetensors` returns a `Converted`, so
`model_dir.write_model_dir` turns an export back into a MODEL_DIR.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import posixpath
import struct
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from perceiver_ar_t5x import checkpoints, fileio
from perceiver_ar_t5x.convert import model_dir, torch_files
from perceiver_ar_t5x.convert.model_dir import (
  ConversionError,
  Converted,
  check_params,
  describe_fields,
)
from perceiver_ar_t5x.models import PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "perceiver_ar_t5x"
FORMAT_VERSION = 1
_ALIGN = 8  # the header is padded with spaces to this (as the safetensors package does)
_OBJECTIVE_FIELDS = ("z_loss", "label_smoothing", "cropping")  # in describe_fields, not ours
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def write_safetensors(path: str, arrays: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes float32 `arrays` as a safetensors file, names sorted, buffers contiguous."""
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name in sorted(arrays):
    size = arrays[name].size * 4
    header[name] = {"dtype": "F32", "shape": list(arrays[name].shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-(len(text) + 8) % _ALIGN)
  with fileio.gfile.GFile(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for name in sorted(arrays):
      f.write(np.ascontiguousarray(arrays[name], "<f4").tobytes())


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: float32 array} of a safetensors file (torch_files.read_safetensors checks it)."""
  with fileio.gfile.GFile(path, "rb") as f:
    data = f.read()
  return {k: np.asarray(v, np.float32) for k, v in
          torch_files.read_safetensors(data, path).items()}


def _checkpoint_step(path: str) -> tuple[checkpoints.Checkpointer, int]:
  """The read-only Checkpointer and step for MODEL_DIR[/checkpoints[/<step>]] (newest)."""
  try:
    model_dir, step = checkpoints.resolve_path(path)
  except checkpoints.CheckpointError as e:
    raise ConversionError(str(e)) from None
  ckpt = checkpoints.Checkpointer(model_dir, read_only=True)
  steps = ckpt.steps()
  if not steps or (step is not None and step not in steps):
    ckpt.close()
    which = "no finished checkpoint" if step is None else f"no step {step}"
    raise ConversionError(f"{which} in {ckpt.directory}; found steps {steps}")
  return ckpt, steps[-1] if step is None else step


def export_safetensors(model_dir_or_checkpoint: str, out_dir: str) -> list[str]:
  """Writes out_dir/model.safetensors and out_dir/config.json; returns their paths.

  The architecture is the checkpoint's own (every module field is stored in its meta), so
  no gin is needed. Existing files in out_dir are not overwritten.
  """
  paths = [posixpath.join(out_dir, WEIGHTS), posixpath.join(out_dir, CONFIG)]
  existing = [p for p in paths if fileio.gfile.exists(p)]
  if existing:
    raise ConversionError(f"{existing[0]} exists; export into a new or empty directory")
  ckpt, step = _checkpoint_step(model_dir_or_checkpoint)
  step_dir = ckpt.step_dir(step)
  try:
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
    raise ConversionError(f"checkpoint {step_dir} stores no model fields in its meta")
  module, _ = module_from_fields(meta["model"], step_dir)
  params, _, _ = checkpoints.load_params(PerceiverARModel(module), step_dir, module.num_latents)
  fileio.gfile.makedirs(out_dir)
  arrays = {k: np.asarray(v, np.float32) for k, v in model_dir.flatten(params).items()}
  write_safetensors(paths[0], arrays, {"format": "flax", "producer": FORMAT})
  source = meta.get("converted_from") or f"{FORMAT} {ckpt.model_dir} step {step}"  # provenance
  config = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "source": source, "model": describe_fields(module)}
  fileio.write_text(paths[1], json.dumps(config, indent=2, sort_keys=True) + "\n")
  return paths


def _from_json(default: Any, value: Any, name: str, where: str) -> Any:
  """A stored JSON value back as the field's type (the default's: enum, dataclass, dtype)."""
  if isinstance(default, enum.Enum):
    cls = type(default)
    prefix, _, member = str(value).partition(".")
    if prefix != cls.__name__ or member not in cls.__members__:
      raise ConversionError(f"{where}: {name}={value!r} is not a {cls.__name__} "
                            f"({', '.join(f'{cls.__name__}.{m}' for m in cls.__members__)})")
    return cls[member]
  if dataclasses.is_dataclass(default):
    if not isinstance(value, dict):
      raise ConversionError(f"{where}: {name} should be a JSON object, found {value!r}")
    return type(default)(**_fields(type(default), default, value, f"{name}.", where))
  if name == "dtype":
    if value not in _DTYPE_NAMES:
      raise ConversionError(f"{where}: dtype={value!r} is not one of {_DTYPE_NAMES}")
    return getattr(jnp, value)
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if default is not None and type(value) is not type(default):
    raise ConversionError(f"{where}: {name}={value!r} should be a {type(default).__name__}")
  return value


def _fields(cls: type, defaults: Any, stored: dict[str, Any], prefix: str, where: str
            ) -> dict[str, Any]:
  """The constructor kwargs of dataclass `cls` from stored JSON; unknown fields refused."""
  names = {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
  unknown = sorted(set(stored) - names - set(_OBJECTIVE_FIELDS if cls is PerceiverAR else ()))
  if unknown:
    raise ConversionError(f"{where}: unknown field {prefix}{unknown[0]} (a newer format?)")
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name in stored:
      default = getattr(defaults, f.name, None) if defaults is not None else None
      kwargs[f.name] = _from_json(default, stored[f.name], prefix + f.name, where)
  return kwargs


def module_from_fields(fields: dict[str, Any], where: str) -> tuple[PerceiverAR, list[str]]:
  """The PerceiverAR that `describe_fields` described; fields it lacks take their defaults."""
  for required in ("vocab_size", "num_latents"):
    if not isinstance(fields.get(required), int):
      raise ConversionError(f"{where}: {required} should be an integer, found "
                            f"{fields.get(required)!r}")
  defaults = PerceiverAR(vocab_size=fields["vocab_size"], num_latents=fields["num_latents"])
  kwargs = _fields(PerceiverAR, defaults, fields, "", where)
  taken = [f"default: {f.name}={getattr(defaults, f.name)!r}"
           for f in dataclasses.fields(PerceiverAR)
           if f.name not in kwargs and f.name not in ("parent", "name")]
  return PerceiverAR(**kwargs), taken


def _files(path: str) -> Iterator[str]:
  folder = path if fileio.gfile.isdir(path) else posixpath.dirname(path)
  yield path if path.endswith(".safetensors") else posixpath.join(folder, WEIGHTS)
  yield posixpath.join(folder, CONFIG)


def load_safetensors(path: str) -> Converted:
  """An export (its dir, or its model.safetensors with config.json beside it) as ours."""
  weights, config_path = _files(fileio.absolute(path))
  for file in (weights, config_path):
    if not fileio.gfile.exists(file):
      raise ConversionError(f"not a {FORMAT} safetensors export: {file} does not exist")
  with fileio.gfile.GFile(config_path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{config_path} is not JSON: {e}") from None
  if not isinstance(config, dict) or config.get("format") != FORMAT:
    raise ConversionError(f"{config_path} is not a {FORMAT} export config (format "
                          f"{config.get('format') if isinstance(config, dict) else None!r})")
  if config.get("format_version") != FORMAT_VERSION:
    raise ConversionError(f"{config_path}: format_version {config.get('format_version')!r}; "
                          f"this reader knows {FORMAT_VERSION}")
  module, taken = module_from_fields(config.get("model") or {}, config_path)
  params = model_dir.nest(read_safetensors(weights))
  check_params(module, params)
  report = [f"read {weights} ({FORMAT} export, format version {FORMAT_VERSION})", *taken]
  return Converted(module=module, params=params, step=int(config.get("step", 0)),
                   source=str(config.get("source", weights)), report=report)
