"""Resuming a run: the newest readable checkpoint (state and input position), or a fresh init.

Kept apart from the loop so the rules are in one place: restore into abstract
shapes (no throw-away initialisation), refuse another model's checkpoint, never
fall back to step 0 when checkpoints exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import logging

from perceiver_ar_t5x import checkpoints, data_state, training
from perceiver_ar_t5x.models import PerceiverARModel


def restore_or_init(model: PerceiverARModel, ckpt: checkpoints.Checkpointer,
                    abstract: training.TrainState, meta: dict[str, Any],
                    init: Callable[[], training.TrainState]
                    ) -> tuple[int, training.TrainState, data_state.DataState]:
  """(step, state, input position) of the newest readable checkpoint, else (0, init(), {}).

  Restores straight into `abstract`'s shapes and shardings; `init` runs only when
  MODEL_DIR has no checkpoint. Another model's checkpoint raises CheckpointMismatch
  and an all-damaged MODEL_DIR raises CheckpointError: never a silent restart at 0.
  """
  if ckpt.steps():
    newest = ckpt.steps()[-1]
    checkpoints.check_meta(ckpt.try_meta(newest), model, f"{ckpt.directory}/{newest}")
  restored = ckpt.restore_latest(abstract, meta=meta)
  if restored is None:
    return 0, init(), {}
  step, state, _ = restored
  logging.info("Restored checkpoint for step %d from %s", step, ckpt.directory)
  return step, state, ckpt.read_data(step)
