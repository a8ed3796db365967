"""The training input's position, saved with each checkpoint and restored in O(1).

As T5X does, the tf.data iterator itself is checkpointed (`tf.train.Checkpoint`
of the iterator): its state holds every stage's position (file list offset,
shuffle buffer and RNG, packing buffers, prefetched batches), so a resumed run
reads exactly the batches the uninterrupted run would have read, without
replaying the consumed ones (`ds.skip(n)` costs time linear in n).

Each process saves its own iterator as `train_ds-<i>-of-<n>.*` in the `data`
item of the orbax step directory, so it is written atomically with the step and
removed with it (keep-K). The state is captured in memory when the step is
saved (before the loop draws the next batch), so an asynchronous orbax save
writes the position of the step it saves. A checkpoint without a data state
(older runs, or another process count) falls back to replaying with a warning.

The file readers use `tf.numpy_function`, which tf.data refuses to serialise by
default (external state); they are pure functions of the file name, so the
policy is IGNORE.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from etils import epath

from perceiver_ar_t5x.datasets import DataError

DataState = dict[str, bytes]  # file suffix (".index", ".data-00000-of-00001") -> contents
ITEM = "data"  # orbax item name inside the step directory
_PIPELINE = ".pipeline"  # the suffix of the pipeline description saved beside the state


def state_name(process_index: int, process_count: int) -> str:
  """T5X's per-process name: `train_ds-<i>-of-<n>`."""
  return f"train_ds-{process_index}-of-{process_count}"


class TrainBatches(Iterator[dict[str, np.ndarray]]):
  """Numpy batches of a tf.data pipeline whose position can be saved and restored.

  `pipeline` describes how the dataset was built (task, lengths, batch size, shard):
  a saved state is only restored into the same pipeline, else the consumed batches
  are replayed (a state of another batch size would hand back stale buffered rows).
  """

  def __init__(self, ds: tf.data.Dataset, *, pipeline: str = "") -> None:
    self.pipeline = pipeline
    options = tf.data.Options()
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    self._iterator = iter(ds.with_options(options))
    self._yielded = 0

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except StopIteration:
      if self._yielded == 0:
        raise DataError("the dataset yielded no examples (empty split or all examples "
                        "filtered)") from None
      raise
    self._yielded += 1
    return {k: v.numpy() for k, v in batch.items()}

  def skip(self, count: int) -> None:
    """The fallback resume: replays `count` batches (time linear in `count`)."""
    for _ in range(count):
      try:
        next(self._iterator)
      except StopIteration:
        raise DataError(f"the dataset ended after {self._yielded} of the {count} batches "
                        f"consumed before this checkpoint") from None
      self._yielded += 1

  def save(self) -> DataState:
    """The iterator's state now, as file contents (written to a scratch dir and read back)."""
    scratch = tempfile.mkdtemp(prefix="train_ds-")
    try:
      tf.train.Checkpoint(ds=self._iterator).write(os.path.join(scratch, "s"))
      files = {name[len("s"):]: _read_bytes(os.path.join(scratch, name))
               for name in sorted(os.listdir(scratch)) if name.startswith("s.")}
      return {**files, _PIPELINE: self.pipeline.encode()}
    finally:
      shutil.rmtree(scratch, ignore_errors=True)

  def restore(self, state: DataState) -> None:
    """Moves the iterator to the saved position (the pipeline must be built the same way)."""
    scratch = tempfile.mkdtemp(prefix="train_ds-")
    try:
      for suffix, blob in state.items():
        if suffix == _PIPELINE:
          continue
        with open(os.path.join(scratch, "s" + suffix), "wb") as f:
          f.write(blob)
      tf.train.Checkpoint(ds=self._iterator).read(os.path.join(scratch, "s")).assert_consumed()
    finally:
      shutil.rmtree(scratch, ignore_errors=True)


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def resume(batches: TrainBatches, state: DataState | None, start: int) -> None:
  """Restores the saved position, or replays `start` batches when there is none."""
  if start == 0:
    return
  state = state or {}
  saved_pipeline = state.get(_PIPELINE, b"").decode()
  if state and saved_pipeline != batches.pipeline:
    logging.warning("The input pipeline changed since checkpoint %d (%s -> %s): replaying %d "
                    "batches", start, saved_pipeline, batches.pipeline, start)
  elif state:
    batches.restore(state)
    logging.info("Restored the input position of step %d (no batches replayed)", start)
    return
  else:
    logging.warning("Checkpoint %d has no input position for this process (older run or "
                    "another process count): replaying %d batches", start, start)
  batches.skip(start)


def resumed(ds: tf.data.Dataset, pipeline: str, state: DataState | None, start: int
            ) -> TrainBatches:
  """TrainBatches of `ds` (described by `pipeline`) at the position of step `start`."""
  batches = TrainBatches(ds, pipeline=pipeline)
  resume(batches, state, start)
  return batches


class DataStateHandler(ocp.CheckpointHandler):
  """Writes/reads this process's iterator files in the step's `data` item."""

  def save(self, directory: epath.Path, args: DataStateSave) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, blob in args.files.items():
      (directory / f"{args.name}{suffix}").write_bytes(blob)

  def restore(self, directory: epath.Path, args: DataStateRestore) -> DataState:
    if not directory.exists():
      return {}
    prefix = args.name + "."
    return {p.name[len(args.name):]: p.read_bytes() for p in directory.iterdir()
            if p.name.startswith(prefix)}

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  name: str
  files: DataState


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  name: str
