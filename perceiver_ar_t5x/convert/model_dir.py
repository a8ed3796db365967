"""Writes a converted model as a MODEL_DIR: an orbax checkpoint at its step plus `model.gin`.

Every importer returns a `Converted` (our module with its options, the params in our
tree, the source's step, and a report of what was mapped); this file is the one that
turns it into files, so eval, infer and train read a converted model exactly as
they read one of ours. The params are checked against the module's own abstract
init first: a converter that produced a wrong name or shape fails here, naming it,
and nothing is written. An existing checkpoint is never overwritten. Both model
families are written alike; only their model.gin differs (io_gin.py for Perceiver IO).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perceiver_ar_t5x import checkpoint_match, checkpoints, fileio
from perceiver_ar_t5x.convert import io_gin
from perceiver_ar_t5x.io_models import PerceiverIOModel
from perceiver_ar_t5x.layers.block import BlockOptions
from perceiver_ar_t5x.models import PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR
from perceiver_ar_t5x.perceiver_io import Head, PerceiverIO, TokenInput

# PerceiverAR fields that gin/models/perceiver_ar.gin sets through a macro.
_MACROS = {"vocab_size": "VOCAB_SIZE", "num_latents": "NUM_LATENTS", "embed_dim": "EMBED_DIM",
           "num_heads": "NUM_HEADS", "head_dim": "HEAD_DIM", "mlp_dim": "MLP_DIM",
           "num_layers": "NUM_LAYERS", "dropout_rate": "DROPOUT_RATE",
           "prefix_dropout": "PREFIX_DROPOUT", "position_encoding": "POSITION_ENCODING",
           "rotary_fraction": "ROTARY_FRACTION", "max_length": "MAX_LENGTH"}
# Where each enum type used by a field lives, as gin's dynamic registration names it.
_ENUM_MODULES = {"PositionEncoding": "embedding", "NormKind": "norms", "Activation": "mlp",
                 "CrossKvNorm": "block", "AttentionKernel": "attention",
                 "RematPolicy": "perceiver_ar"}
_SKIPPED = ("parent", "name", "dtype", "remat_policy", "attention_kernel",
            "attention_chunk_size", "scan_layers")  # run-time choices, not the model's


class ConversionError(ValueError):
  """A source the converter does not recognise, or params that do not fit the model."""


@dataclasses.dataclass
class Converted:
  """An imported model: our module, its params (numpy, our tree), the step, a report.

  input_shape: an example input shape for the param check; an array-input Perceiver IO
  needs one (its channel count is no module field, the encoder reads it at init).
  """

  module: PerceiverAR | PerceiverIO
  params: dict[str, Any]
  step: int
  source: str
  report: list[str] = dataclasses.field(default_factory=list)
  input_shape: tuple[int, ...] | None = None


def gin_value(value: Any) -> str:
  """A Python value as gin text (enums as %module.Enum.MEMBER)."""
  if isinstance(value, enum.Enum):
    return f"%{_ENUM_MODULES[type(value).__name__]}.{type(value).__name__}.{value.name}"
  return repr(value)


def model_gin(module: PerceiverAR, source: str) -> str:
  """The gin text that rebuilds `module` on top of gin/models/perceiver_ar.gin."""
  lines = [f"# A converted model ({source}); written by python -m perceiver_ar_t5x.convert.",
           "# Use with a task and a binary config, after them:",
           "#   python -m perceiver_ar_t5x.eval --gin_file=gin/tasks/<task>.gin "
           "--gin_file=gin/eval.gin --gin_file=<MODEL_DIR>/model.gin "
           "--gin.CHECKPOINT_PATH=<MODEL_DIR> --gin_search_paths=gin",
           "from __gin__ import dynamic_registration", "",
           "from perceiver_ar_t5x import perceiver_ar",
           "from perceiver_ar_t5x.layers import attention",
           "from perceiver_ar_t5x.layers import block",
           "from perceiver_ar_t5x.layers import embedding",
           "from perceiver_ar_t5x.layers import mlp",
           "from perceiver_ar_t5x.layers import norms", "",
           "include 'models/perceiver_ar.gin'", ""]
  defaults = PerceiverAR(vocab_size=1, num_latents=1)
  for f in dataclasses.fields(module):
    value = getattr(module, f.name)
    if f.name in _MACROS:
      lines.append(f"{_MACROS[f.name]} = {gin_value(value)}")
    elif f.name not in _SKIPPED and f.name != "block" and value != getattr(defaults, f.name):
      lines.append(f"perceiver_ar.PerceiverAR.{f.name} = {gin_value(value)}")
  lines += ["", "perceiver_ar.PerceiverAR.block = @block.BlockOptions()"]
  for f in dataclasses.fields(BlockOptions):
    lines.append(f"block.BlockOptions.{f.name} = {gin_value(getattr(module.block, f.name))}")
  return "\n".join(lines) + "\n"


def flatten(tree: Any) -> dict[str, Any]:
  """{"layers_0/attention/query": leaf} of a nested param tree (the converters' names)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`: '/'-joined names -> the nested tree."""
  return traverse_util.unflatten_dict(flat, sep="/")


def objective(module: PerceiverAR | PerceiverIO) -> PerceiverARModel | PerceiverIOModel:
  """The model (module + default objective) whose init and checkpoint meta the binaries use."""
  if isinstance(module, PerceiverIO):
    return PerceiverIOModel(module)
  return PerceiverARModel(module)


def _abstract_params(module: PerceiverAR | PerceiverIO,
                     input_shape: tuple[int, ...] | None) -> Any:
  """The module's own params as shapes: its init on an example input, nothing computed."""
  rng = jax.random.key(0)
  if isinstance(module, PerceiverAR):
    return jax.eval_shape(lambda r: PerceiverARModel(module).init(r, module.num_latents), rng)
  adapter = module.input_adapter
  if isinstance(adapter, TokenInput):
    length = adapter.max_length
    if module.head == Head.MLM:  # an MLM decodes one query per input position
      length = min(length, module.num_outputs)
    return jax.eval_shape(lambda r: PerceiverIOModel(module).init(r, length), rng)
  if input_shape is None:
    raise ConversionError("an array-input Perceiver IO needs an example input shape "
                          "(Converted.input_shape: [batch, *index_dims, channels])")
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  return jax.eval_shape(lambda r, x: module.init({"params": r}, x)["params"], rng, x)


def check_params(module: PerceiverAR | PerceiverIO, params: dict[str, Any],
                 input_shape: tuple[int, ...] | None = None) -> None:
  """Raises ConversionError unless params has exactly the module's names and shapes."""
  abstract = _abstract_params(module, input_shape)
  want = {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract)).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten(nn.unbox(params)).items()}
  for name in sorted(want.keys() | got.keys()):
    if want.get(name) != got.get(name):
      raise ConversionError(f"converted params do not fit the model: {name} is "
                            f"{got.get(name, 'missing')}, the model needs "
                            f"{want.get(name, 'no such parameter')}")


def write_model_dir(model_dir: str, converted: Converted) -> str:
  """Writes MODEL_DIR/checkpoints/<step> (params only), MODEL_DIR/model.gin and
  convert-report.txt; returns model.gin's path."""
  check_params(converted.module, converted.params, converted.input_shape)
  model = objective(converted.module)
  ckpt = checkpoints.Checkpointer(model_dir, checkpoints.CheckpointConfig(async_save=False))
  if ckpt.steps():
    raise ConversionError(f"{ckpt.directory} already has checkpoints {ckpt.steps()}; "
                          f"convert into a new MODEL_DIR")
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), nn.unbox(converted.params))
  state = {"step": np.asarray(converted.step, np.int32), "params": params}
  meta = checkpoints.model_meta(model, converted.step)
  meta["converted_from"] = converted.source
  ckpt.save(converted.step, state, meta, force=True)
  ckpt.wait()
  ckpt.close()
  module = converted.module
  gin_text = (io_gin.model_gin(module, converted.source) if isinstance(module, PerceiverIO)
              else model_gin(module, converted.source))
  fileio.write_text(os.path.join(model_dir, "model.gin"), gin_text)
  fileio.write_text(os.path.join(model_dir, "convert-report.txt"),
                    "\n".join([f"source: {converted.source}", f"step: {converted.step}",
                               *converted.report]) + "\n")
  return os.path.join(model_dir, "model.gin")


def describe_fields(module: PerceiverAR | PerceiverIO) -> dict[str, Any]:
  """The module's fields as JSON values (for reports and exported configs)."""
  return checkpoint_match.model_fields(objective(module))
