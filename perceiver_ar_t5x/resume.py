"""Resuming a run: the newest readable checkpoint (state and input position), or a fresh init.

Kept apart from the loop so the rules are in one place: restore into abstract
shapes (no throw-away initialisation), refuse another model's checkpoint, never
fall back to step 0 when checkpoints exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import logging

from perceiver_ar_t5x import checkpoint_match, checkpoints, data_state, training
from perceiver_ar_t5x.models import PerceiverARModel


def restore_or_init(model: PerceiverARModel, ckpt: checkpoints.Checkpointer,
                    abstract: training.TrainState, meta: dict[str, Any],
                    init: Callable[[], training.TrainState],
                    fresh_optimizer: Callable[[Any, int], training.TrainState] | None = None
                    ) -> tuple[int, training.TrainState, data_state.DataState]:
  """(step, state, input position) of the newest readable checkpoint, else (0, init(), {}).

  Restores straight into `abstract`'s shapes and shardings; `init` runs only when
  MODEL_DIR has no checkpoint. Another model's checkpoint raises CheckpointMismatch
  and an all-damaged MODEL_DIR raises CheckpointError: never a silent restart at 0.
  A newest checkpoint with parameters only (a converted model: convert/model_dir.py)
  is fine-tuned: its params are restored and `fresh_optimizer(params, step)` starts
  the optimizer state.
  """
  if ckpt.steps():
    newest = ckpt.steps()[-1]
    checkpoints.check_meta(ckpt.try_meta(newest), model, f"{ckpt.directory}/{newest}")
    if fresh_optimizer is not None and _params_only(ckpt, newest):
      # a reader of its own: a partial restore registers a handler the trainer's saves
      # of the whole state would clash with
      reader = checkpoints.Checkpointer(ckpt.model_dir, read_only=True)
      restored = reader.restore_step(newest, {"params": abstract.params}, partial=True,
                                     meta=meta)
      reader.close()
      if restored is None:
        raise checkpoints.CheckpointError(f"checkpoint {newest} in {ckpt.directory} is "
                                          f"unreadable")
      logging.info("Checkpoint %d holds parameters only (a converted model): fine-tuning "
                   "from it with a fresh optimizer state", newest)
      return newest, fresh_optimizer(restored[0]["params"], newest), {}
  restored = ckpt.restore_latest(abstract, meta=meta)
  if restored is None:
    return 0, init(), {}
  step, state, _ = restored
  logging.info("Restored checkpoint for step %d from %s", step, ckpt.directory)
  return step, state, ckpt.read_data(step)


def _params_only(ckpt: checkpoints.Checkpointer, step: int) -> bool:
  try:
    stored = checkpoint_match.stored_shapes(ckpt.step_dir(step))
  except checkpoints.READ_ERRORS:
    return False  # damaged: restore_latest decides what to do with it
  return not any(name.startswith("opt_state") for name in stored)
