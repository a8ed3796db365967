"""Listing, splitting and reading a user's data files, skipping the bad ones.

A long run must not die because one book in ten thousand is unreadable or one MIDI file
is truncated: readers here return None for such a file, the pipeline drops it, logs one
warning line naming it, and counts it in `SKIPPED` (per task). An empty split is
different: that is a configuration mistake, and raises DataError at once.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from perceiver_ar_t5x.datasets import DataError


class SkipCounter:
  """Thread-safe count of skipped files per task (tf.data reads in parallel)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._counts: collections.Counter[str] = collections.Counter()

  def skip(self, task: str, path: str, reason: str) -> None:
    with self._lock:
      self._counts[task] += 1
      count = self._counts[task]
    logging.warning("%s: skipping unreadable file %s (%s); %d skipped so far", task, path,
                    " ".join(str(reason).split()), count)

  def count(self, task: str) -> int:
    with self._lock:
      return self._counts[task]


SKIPPED = SkipCounter()


def list_files(pattern: str, suffixes: Sequence[str]) -> list[str]:
  """Sorted files under a directory (recursively) or matching a glob (gs:// works).

  A directory yields every file whose name ends in one of `suffixes` (case-insensitive).
  """
  if tf.io.gfile.isdir(pattern):
    found = [os.path.join(root, name) for root, _, names in tf.io.gfile.walk(pattern)
             for name in names if name.lower().endswith(tuple(suffixes))]
  else:
    found = [p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p)]
  return sorted(found)


def _bucket(path: str) -> float:
  """Stable position of a file name in [0, 100): independent of the directory it is in."""
  digest = hashlib.md5(os.path.basename(path).encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 * 100


def hash_split(paths: Sequence[str], split: str, validation_percent: float) -> list[str]:
  """Files of `split` ('train' or 'validation') when splitting by a hash of the file name.

  A file is in validation when its name hashes below `validation_percent`; the split is
  stable when files are added. If no name does, the lowest-hash file is validation, so
  a corpus of >= 2 files always has both splits.
  """
  if split not in ("train", "validation"):
    raise DataError(f"a hash-split corpus has splits 'train' and 'validation', got {split!r}")
  if len(paths) < 2:
    return list(paths) if split == "train" else []
  buckets = {p: _bucket(p) for p in paths}
  valid = {p for p in paths if buckets[p] < validation_percent}
  if not valid:
    valid = {min(paths, key=buckets.__getitem__)}
  return sorted(valid if split == "validation" else set(paths) - valid)


def check_not_empty(paths: Sequence[str], task: str, split: str, where: str) -> None:
  if not paths:
    raise DataError(f"task {task!r} split {split!r} has no files (looked in {where})")


def shuffled(paths: Sequence[str], shuffle: bool, seed: int | None) -> list[str]:
  """File order for one pass: sorted, or a permutation drawn from `seed`."""
  paths = list(paths)
  if shuffle:
    np.random.default_rng(seed).shuffle(paths)
  return paths


def read_bytes(path: str) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def read_utf8(path: str) -> bytes:
  """File contents as valid UTF-8 (bad bytes become U+FFFD), for SentencePiece."""
  return read_bytes(path).decode("utf-8", errors="replace").encode("utf-8")


def read_skipping(paths: Sequence[str], parse: Callable[[str], np.ndarray | bytes | None], *,
                  task: str, dtype: tf.DType, shape: Sequence[int | None]) -> tf.data.Dataset:
  """{'path', 'value'} for every file `parse` accepts; unreadable files are skipped.

  `parse(path)` returns the value, or raises (OSError, ValueError, or a parser's own
  error); a raising file is logged, counted in SKIPPED and dropped.
  """
  def safe(path: bytes) -> tuple[np.ndarray | bytes, bool]:
    name = path.decode()
    try:
      value = parse(name)
    except Exception as e:  # noqa: BLE001 - any failure on one file skips that file
      SKIPPED.skip(task, name, f"{type(e).__name__}: {e}")
      dims = [0 if d is None else d for d in shape]
      empty = b"" if dtype == tf.string else np.zeros(dims, dtype.as_numpy_dtype)
      return empty, False
    return value, True

  def read(path: tf.Tensor) -> dict[str, tf.Tensor]:
    value, ok = tf.numpy_function(safe, [path], [dtype, tf.bool], stateful=False)
    return {"path": path, "value": tf.ensure_shape(value, shape), "ok": ok}

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), tf.string))
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.filter(lambda ex: ex["ok"])
  return ds.map(lambda ex: {"path": ex["path"], "value": ex["value"]})


class PathsDataSource(seqio.DataSource):
  """A SeqIO source over files listed when the dataset is built (not at registration).

  `list_paths(split)` names the files (DataError if none); `read(paths, split)` turns
  them into examples. Hosts read disjoint subsets of the files when there are enough of them.
  """

  def __init__(self, splits: Sequence[str], list_paths: Callable[[str], list[str]],
               read: Callable[[list[str], str], tf.data.Dataset]) -> None:
    self._list_paths, self._read = list_paths, read
    super().__init__(splits=splits, caching_permitted=True)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return self._list_paths(split)

  def num_input_examples(self, split: str) -> int | None:
    return None

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # seqio's interface
    if split not in self.splits:
      raise DataError(f"split {split!r} is not one of {list(self.splits)}")
    paths = self._list_paths(split)
    if shard_info is not None and shard_info.num_shards > 1:
      paths = paths[shard_info.index::shard_info.num_shards]
    return self._read(shuffled(paths, shuffle, seed), split)
