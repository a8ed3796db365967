"""Orbax checkpoints in `MODEL_DIR/checkpoints/<step>`: atomic, keep-K, fallback.

Orbax writes each step into a temporary directory and renames it when complete,
so a killed save never looks like a checkpoint. A finished checkpoint that still
fails to restore (disk corruption, a truncated file) is logged and skipped in
favour of the previous one; nothing is deleted.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not match the configuration."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """period: save every N steps (and at the end); keep: newest K kept (None: all)."""

  period: int = 1000
  keep: int | None = 3
  async_save: bool = True


class Checkpointer:
  """Saves/restores {'state': pytree, 'meta': json} under `<model_dir>/checkpoints`."""

  def __init__(self, model_dir: str, cfg: CheckpointConfig = CheckpointConfig()):
    self.directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, create=True, enable_async_checkpointing=cfg.async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest restorable checkpoint, or None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings, so
    arrays land directly on the current mesh (which may differ from the mesh
    that saved them).
    """
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
        logging.error("Checkpoint at step %d in %s is unreadable (%s: %s); trying an older one.",
                      step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        continue
      return step, restored["state"], restored["meta"]
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
