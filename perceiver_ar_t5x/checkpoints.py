"""Orbax checkpoints in `MODEL_DIR/checkpoints/<step>`: atomic, keep-K, fallback.

Orbax writes each step into a temporary directory and renames it when complete,
so a killed save never looks like a checkpoint (the trainer's manager deletes
such leftovers; read-only managers, used by eval/infer, leave them alone because
a trainer may be writing them). A finished checkpoint that still fails to
restore (disk corruption, a truncated file) is logged and skipped in favour of
the previous one. The trainer moves it to `MODEL_DIR/checkpoints_corrupt/` so a
later save of the same step can proceed; nothing is deleted. In a multi-process
run only process 0 moves it; the others just skip it. MODEL_DIR may be a URL
(gs://...): orbax handles it itself, and the rest goes through `fileio`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from absl import logging

from perceiver_ar_t5x import fileio, training
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.models import PerceiverARModel

# Architecture fields stored with every checkpoint and checked against the config.
META_FIELDS = ("vocab_size", "num_latents", "embed_dim", "num_layers")


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not match the configuration."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """period: save every N steps (and at the end); keep: newest K kept (None: all)."""

  period: int = 1000
  keep: int | None = 3
  async_save: bool = True


def model_meta(model: PerceiverARModel, step: int) -> dict[str, Any]:
  m = model.module
  return {"step": step, **{k: getattr(m, k) for k in META_FIELDS}}


def check_meta(meta: dict[str, Any], model: PerceiverARModel, where: str) -> None:
  """Raises CheckpointError naming the first architecture field that differs."""
  for key in META_FIELDS:
    want = getattr(model.module, key)
    if key in meta and meta[key] != want:
      raise CheckpointError(f"checkpoint {where} has {key}={meta[key]} but the config has "
                            f"{key}={want}; use the run's gin file or a fresh MODEL_DIR")


class Checkpointer:
  """Saves/restores {'state': pytree, 'meta': json} under `<model_dir>/checkpoints`."""

  def __init__(self, model_dir: str, cfg: CheckpointConfig = CheckpointConfig(), *,
               read_only: bool = False):
    self.model_dir = fileio.absolute(model_dir)
    self.directory = os.path.join(self.model_dir, "checkpoints")
    self.cfg = cfg
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else cfg.keep, create=not read_only,
        read_only=read_only, enable_async_checkpointing=cfg.async_save and not read_only,
        cleanup_tmp_directories=not read_only)
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

  def try_meta(self, step: int) -> dict[str, Any]:
    """The step's meta, or {} when unreadable (restore_latest then skips that step)."""
    try:
      return self.read_meta(step) or {}
    except Exception:  # noqa: BLE001
      return {}

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable checkpoint out of orbax's sight (kept for inspection).

    Only process 0 moves it (the others would race on the same directory); every
    process skips the step either way.
    """
    if jax.process_index() != 0:
      return
    dest_dir = os.path.join(self.model_dir, "checkpoints_corrupt")
    fileio.gfile.makedirs(dest_dir)
    dest = os.path.join(dest_dir, f"{step}-{int(time.time())}")
    fileio.gfile.rename(os.path.join(self.directory, str(step)), dest)
    logging.warning("Moved unreadable checkpoint %d to %s", step, dest)
    self._manager.reload()

  def restore(self, step: int, args: ocp.args.Composite) -> Any:
    return self._manager.restore(step, args=args)

  def restore_latest(self, abstract_state: Any, *, partial: bool = False
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest restorable checkpoint, or None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings, so
    arrays land directly on the current mesh (which may differ from the mesh
    that saved them). `partial=True` restores only the keys present in it
    (e.g. {'params': ...} without the optimizer state).
    """
    for step in reversed(self.steps()):
      try:
        restored = self.restore(step, _restore_args(abstract_state, partial))
      except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
        logging.error("Checkpoint at step %d in %s is unreadable (%s: %s); trying an older one.",
                      step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        if not self.read_only:
          self._quarantine(step)
        continue
      return step, restored["state"], restored["meta"]
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _restore_args(abstract_state: Any, partial: bool) -> ocp.args.Composite:
  if partial:
    state = ocp.args.PyTreeRestore(
        item=abstract_state, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
  else:
    state = ocp.args.StandardRestore(abstract_state)
  return ocp.args.Composite(state=state, meta=ocp.args.JsonRestore())


def resolve_path(path: str) -> tuple[str, int | None]:
  """CHECKPOINT_PATH -> (model_dir, step or None for the newest good one).

  Accepts MODEL_DIR, MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/<step>.
  """
  path = fileio.absolute(path.rstrip("/"))
  base, parent = os.path.basename(path), os.path.dirname(path)
  isdir = fileio.gfile.isdir
  if base.isdigit() and os.path.basename(parent) == "checkpoints" and isdir(path):
    return os.path.dirname(parent), int(base)
  if base == "checkpoints" and isdir(path):
    return parent, None
  if isdir(os.path.join(path, "checkpoints")):
    return path, None
  raise CheckpointError(f"no checkpoint at {path!r}: expected MODEL_DIR, MODEL_DIR/checkpoints "
                        f"or MODEL_DIR/checkpoints/<step>")


def load_params(model: PerceiverARModel, checkpoint_path: str, length: int,
                partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig()
                ) -> tuple[Any, int, training.Partitioned]:
  """(params sharded on a fresh mesh, step, Partitioned) for eval and inference.

  Only the parameters are read (not the optimizer state), so eval/infer need no
  optimizer config. The newest unreadable checkpoint falls back to an older one
  unless a step was named explicitly.
  """
  model_dir, step = resolve_path(checkpoint_path)
  ckpt = Checkpointer(model_dir, read_only=True)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"no finished checkpoint in {ckpt.directory}")
  if step is not None and step not in steps:
    raise CheckpointError(f"step {step} not in {ckpt.directory}; found steps {steps}")
  check_meta(ckpt.try_meta(step if step is not None else steps[-1]), model,
             f"{ckpt.directory}/{step if step is not None else steps[-1]}")
  part = params_partitioning(model, length, partitioning_cfg)
  shapes = nn.unbox(training.abstract_params(model, length))
  abstract = {"params": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
      part.state_sharding.params)}
  if step is None:
    restored = ckpt.restore_latest(abstract, partial=True)
    if restored is None:
      raise CheckpointError(f"no checkpoint in {ckpt.directory} could be restored")
    step, state, _ = restored
  else:
    state = ckpt.restore(step, _restore_args(abstract, True))["state"]
  logging.info("Loaded parameters of step %d from %s", step, ckpt.directory)
  return state["params"], step, part


def params_partitioning(model: PerceiverARModel, length: int,
                         cfg: pt.PartitioningConfig) -> training.Partitioned:
  """Mesh and parameter shardings as training lays them out (no optimizer state)."""
  mesh = pt.make_mesh(cfg.num_partitions)
  rules = pt.logical_axis_rules(cfg)
  boxed = training.abstract_params(model, length)
  logical = nn.get_partition_spec(boxed)
  shardings = pt.fitted_shardings(logical, nn.unbox(boxed), mesh, rules)
  return training.Partitioned(mesh, tuple(rules), logical,
                              training.TrainState(step=None, params=shardings, opt_state=None),
                              pt.batch_sharding(mesh))

