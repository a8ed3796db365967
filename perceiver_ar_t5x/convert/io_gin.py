"""The `model.gin` of a converted Perceiver IO: gin/models/perceiver_io.gin's macros, plus
direct bindings for the fields that file gives no macro.

Unlike a converted Perceiver AR's model.gin, this one does not include
models/perceiver_io.gin: that file also defaults the task's macros (MASK_ID = None,
NUM_CLASSES = 0), so including it again after a run file would undo the task's [MASK]
id. It goes after a Perceiver IO run file (gin/runs/*_io_cpu.gin, which includes the
model file and the task) and sets every field that shapes or changes the params, even
those equal to the defaults, so the run file's own sizes cannot leak into the model.
Run-time choices (dtype, attention kernel and chunk) stay the run's.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from perceiver_ar_t5x.layers.block import BlockOptions
from perceiver_ar_t5x.layers.io_adapters import ArrayInput, TokenInput
from perceiver_ar_t5x.perceiver_io import PerceiverIO

# PerceiverIO fields that gin/models/perceiver_io.gin sets through a macro.
MACROS = {"num_latents": "NUM_LATENTS", "latent_dim": "LATENT_DIM",
          "num_outputs": "NUM_OUTPUTS", "decoder_dim": "DECODER_DIM", "head": "IO_HEAD",
          "num_classes": "NUM_CLASSES", "num_blocks": "NUM_BLOCKS",
          "num_self_attends_per_block": "NUM_SELF_ATTENDS_PER_BLOCK",
          "num_self_attend_heads": "NUM_SELF_ATTEND_HEADS",
          "self_attend_widening_factor": "SELF_ATTEND_WIDENING_FACTOR",
          "num_cross_attend_heads": "NUM_CROSS_ATTEND_HEADS",
          "cross_attend_widening_factor": "CROSS_ATTEND_WIDENING_FACTOR",
          "num_decoder_heads": "NUM_DECODER_HEADS", "decoder_qk_channels": "DECODER_QK_CHANNELS",
          "decoder_v_channels": "DECODER_V_CHANNELS",
          "decoder_query_residual": "DECODER_QUERY_RESIDUAL", "dropout_rate": "DROPOUT_RATE"}
TOKEN_MACROS = {"vocab_size": "VOCAB_SIZE", "features": "INPUT_DIM", "max_length": "MAX_LENGTH"}
BLOCK_MACROS = {"activation": "ACTIVATION"}
# Where each enum lives, as the gin file's dynamic-registration imports name it.
ENUM_MODULES = {"Head": "perceiver_io", "Activation": "mlp", "NormKind": "norms",
                "CrossKvNorm": "block", "PositionEncoding": "embedding"}
# Flax bookkeeping and run-time choices: the run file's, not the model's.
SKIPPED = ("parent", "name", "dtype", "attention_kernel", "attention_chunk_size")
BLOCK_SCOPE = "io/block.BlockOptions"  # perceiver_io.gin's scope for the IO block

HEADER = """\
# A converted Perceiver IO model ({source}); written by python -m perceiver_ar_t5x.convert.
# Put it after a Perceiver IO run file (that file includes models/perceiver_io.gin and
# the task, whose MASK_ID / vocabulary must be this model's), e.g.:
#   python -m perceiver_ar_t5x.eval --gin_file=gin/runs/text_mlm_io_cpu.gin \\
#     --gin_file=<MODEL_DIR>/model.gin --gin_file=gin/eval.gin \\
#     --gin.CHECKPOINT_PATH="'<MODEL_DIR>'" --gin_search_paths=gin
from __gin__ import dynamic_registration

from perceiver_ar_t5x import io_models
from perceiver_ar_t5x import perceiver_io
from perceiver_ar_t5x.layers import block
from perceiver_ar_t5x.layers import embedding
from perceiver_ar_t5x.layers import mlp
from perceiver_ar_t5x.layers import norms

MODEL = @io_models.PerceiverIOModel()
io_models.PerceiverIOModel.module = @perceiver_io.PerceiverIO()
"""


def gin_value(value: Any) -> str:
  """A Python value as gin text (enums as %module.Enum.MEMBER, tuples as tuples)."""
  if isinstance(value, enum.Enum):
    return f"%{ENUM_MODULES[type(value).__name__]}.{type(value).__name__}.{value.name}"
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value)


def _adapter_lines(adapter: TokenInput | ArrayInput) -> list[str]:
  """The input adapter: macros for tokens, direct bindings for a Fourier array input."""
  kind = type(adapter).__name__
  lines = [f"perceiver_io.PerceiverIO.input_adapter = @perceiver_io.{kind}()"]
  for f in dataclasses.fields(adapter):
    if f.name in SKIPPED:
      continue
    value = gin_value(getattr(adapter, f.name))
    if isinstance(adapter, TokenInput) and f.name in TOKEN_MACROS:
      lines.append(f"{TOKEN_MACROS[f.name]} = {value}")
    else:
      lines.append(f"perceiver_io.{kind}.{f.name} = {value}")
  return lines


def _block_lines(options: BlockOptions) -> list[str]:
  """Every BlockOptions field of the shared block (ACTIVATION through its macro)."""
  lines = []
  for f in dataclasses.fields(BlockOptions):
    value = gin_value(getattr(options, f.name))
    if f.name in BLOCK_MACROS:
      lines.append(f"{BLOCK_MACROS[f.name]} = {value}")
    else:
      lines.append(f"{BLOCK_SCOPE}.{f.name} = {value}")
  return lines


def model_gin(module: PerceiverIO, source: str) -> str:
  """The gin text that rebuilds `module` on top of a run file that includes
  gin/models/perceiver_io.gin."""
  macros, direct = [], []
  for f in dataclasses.fields(module):
    if f.name in SKIPPED or f.name in ("input_adapter", "block"):
      continue
    value = gin_value(getattr(module, f.name))
    if f.name in MACROS:
      macros.append(f"{MACROS[f.name]} = {value}")
    else:
      direct.append(f"perceiver_io.PerceiverIO.{f.name} = {value}")
  lines = [HEADER.format(source=source).rstrip("\n"), "",
           *_adapter_lines(module.input_adapter), *macros, "", *direct, "",
           *_block_lines(module.block)]
  return "\n".join(lines) + "\n"
