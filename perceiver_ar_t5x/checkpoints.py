"""Orbax checkpoints in `MODEL_DIR/checkpoints/<step>`: atomic, keep-K, refuse or fall back.

Orbax writes each step into a temporary directory and renames it when complete,
so a killed save never looks like a checkpoint (the trainer's manager deletes
such leftovers; read-only managers, used by eval/infer, leave them alone because
a trainer may be writing them).

Before any array is read, the step's recorded shapes are compared with the
configured model (`checkpoint_match`): a checkpoint of another architecture is
refused with `CheckpointMismatch` (naming the parameter and the changed config
values) and nothing is moved. Only what is proven damaged is quarantined: metadata
or arrays that still fail to read after retries with backoff (transient storage
errors pass on retry). The trainer moves it to `MODEL_DIR/checkpoints_corrupt/`
(process 0 only) and uses the previous one; if every checkpoint is damaged it
stops with an error rather than start over. MODEL_DIR may be a URL (gs://...):
orbax handles it itself, and the rest goes through `fileio`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from absl import logging

from perceiver_ar_t5x import checkpoint_match, data_state, fileio, training
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.models import PerceiverARModel

# Architecture fields checked by name against the config (all model fields are stored).
META_FIELDS = ("vocab_size", "num_latents", "embed_dim", "num_layers")
# What a failed read raises (tensorstore and JSON errors are ValueErrors, missing files
# OSErrors); retried, and if it persists the checkpoint is damaged.
READ_ERRORS = (OSError, ValueError)
T = TypeVar("T")


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not match the configuration."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint of another model: refused, never quarantined."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """period: save every N steps (and at the end); keep: newest K kept (None: all).

  read_attempts / retry_delay_s: a failing read is retried with doubling delays
  before the checkpoint counts as damaged.
  """

  period: int = 1000
  keep: int | None = 3
  async_save: bool = True
  read_attempts: int = 3
  retry_delay_s: float = 0.5


def model_meta(model: PerceiverARModel, step: int,
               config_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Stored with each checkpoint: every model field and the config (gin macro) values."""
  m = model.module
  return {"step": step, **{k: getattr(m, k) for k in META_FIELDS if hasattr(m, k)},
          "model": checkpoint_match.model_fields(model),
          "config": checkpoint_match.jsonable(dict(config_values or {}))}


def check_meta(meta: dict[str, Any], model: PerceiverARModel, where: str) -> None:
  """Raises CheckpointMismatch naming the first architecture field that differs."""
  for key in META_FIELDS:
    want = getattr(model.module, key, None)  # Perceiver IO has other fields (in "model")
    if key in meta and meta[key] != want:
      raise CheckpointMismatch(f"checkpoint {where} has {key}={meta[key]} but the config has "
                               f"{key}={want}; use the run's gin file or a fresh MODEL_DIR")


class Checkpointer:
  """Saves/restores {'state': pytree, 'meta': json, 'data': input position} per step."""

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

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False,
           data: data_state.DataState | None = None) -> bool:
    """`data`: this process's input position, captured by the caller at `step`."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data is not None:
      items[data_state.ITEM] = data_state.DataStateSave(_data_name(), data)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def try_meta(self, step: int) -> dict[str, Any]:
    """The step's meta, or {} when unreadable (restore_latest then decides about that step)."""
    try:
      return self.read_meta(step) or {}
    except READ_ERRORS:
      return {}

  def read_data(self, step: int) -> data_state.DataState:
    """This process's input position saved with `step` ({} when the step has none)."""
    if not fileio.gfile.isdir(os.path.join(self.step_dir(step), data_state.ITEM)):
      return {}
    args = ocp.args.Composite(**{data_state.ITEM: data_state.DataStateRestore(_data_name())})
    return self._retrying(step, lambda: self._manager.restore(step, args=args)[data_state.ITEM]
                          ) or {}

  def _retrying(self, step: int, read: Callable[[], T]) -> T | None:
    """read(), retried with doubling delays; None when it keeps failing (damaged)."""
    for attempt in range(self.cfg.read_attempts):
      try:
        return read()
      except READ_ERRORS as e:
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
      if attempt + 1 < self.cfg.read_attempts:
        logging.warning("Reading checkpoint %d failed (%s); retrying.", step, reason)
        time.sleep(self.cfg.retry_delay_s * 2 ** attempt)
    logging.error("Checkpoint at step %d in %s is unreadable after %d attempts (%s).",
                  step, self.directory, self.cfg.read_attempts, reason)
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a damaged checkpoint out of orbax's sight (kept for inspection).

    Only process 0 moves it (the others would race on the same directory); every
    process skips the step either way. Read-only users (eval/infer) only skip it.
    """
    if self.read_only or jax.process_index() != 0:
      return
    dest_dir = os.path.join(self.model_dir, "checkpoints_corrupt")
    fileio.gfile.makedirs(dest_dir)
    dest = os.path.join(dest_dir, f"{step}-{int(time.time())}")
    fileio.gfile.rename(self.step_dir(step), dest)
    logging.warning("Moved unreadable checkpoint %d to %s", step, dest)
    self._manager.reload()

  def restore(self, step: int, args: ocp.args.Composite) -> Any:
    return self._manager.restore(step, args=args)

  def check_fits(self, step: int, stored: checkpoint_match.Shapes, abstract_state: Any, *,
                 partial: bool, meta: Mapping[str, Any] | None) -> None:
    """Raises CheckpointMismatch when `step`'s recorded shapes differ from the config's."""
    mismatch = checkpoint_match.first_mismatch(
        stored, checkpoint_match.flat_shapes(abstract_state), partial=partial)
    if mismatch is not None:
      changes = checkpoint_match.config_changes(self.try_meta(step), meta or {})
      raise CheckpointMismatch(checkpoint_match.mismatch_message(mismatch, step, changes))

  def restore_step(self, step: int, abstract_state: Any, *, partial: bool = False,
                   meta: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of `step`; None if damaged; CheckpointMismatch if another model's."""
    stored = self._retrying(step, lambda: checkpoint_match.stored_shapes(self.step_dir(step)))
    if stored is None:
      return None
    self.check_fits(step, stored, abstract_state, partial=partial, meta=meta)
    restored = self._retrying(step, lambda: self.restore(
        step, _restore_args(abstract_state, partial)))
    return None if restored is None else (restored["state"], restored["meta"])

  def restore_latest(self, abstract_state: Any, *, partial: bool = False,
                     meta: Mapping[str, Any] | None = None
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest readable checkpoint; None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings, so
    arrays land directly on the current mesh (which may differ from the mesh
    that saved them). `partial=True` restores only the keys present in it
    (e.g. {'params': ...} without the optimizer state). `meta`: the current
    config's `model_meta`, for the message of a mismatch. Raises
    CheckpointMismatch (nothing moved) for another model's checkpoint, and
    CheckpointError when checkpoints exist but none is readable.
    """
    steps = self.steps()
    for step in reversed(steps):
      restored = self.restore_step(step, abstract_state, partial=partial, meta=meta)
      if restored is not None:
        return step, *restored
      logging.error("Checkpoint %d is damaged; trying an older one.", step)
      self._quarantine(step)
    if steps:
      raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} is readable"
                            f"{'' if self.read_only else ' (moved to checkpoints_corrupt/)'}; "
                            f"not starting over")
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _data_name() -> str:
  return data_state.state_name(jax.process_index(), jax.process_count())


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
  optimizer config. A damaged newest checkpoint falls back to an older one unless a
  step was named; another model's checkpoint raises CheckpointMismatch.
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
  meta = model_meta(model, 0)
  if step is None:  # restore_latest raises when none is readable
    step, state, _ = ckpt.restore_latest(abstract, partial=True, meta=meta)
  else:
    restored = ckpt.restore_step(step, abstract, partial=True, meta=meta)
    if restored is None:
      raise CheckpointError(f"checkpoint {step} in {ckpt.directory} is unreadable")
    state = restored[0]
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

