"""Listing, splitting and reading a user's data files, skipping the bad ones.

A long run must not die because one book in ten thousand is unreadable or one MIDI file
is truncated: the pipeline drops such a file, logs one warning line naming it the first
time it fails in this run (not on every epoch), counts it in `SKIPPED` (per task, in
files), and logs one summary line per split when the first pass over its files ends
(`maestro_midi: 3 of 51 train files unreadable, skipped: a.midi, ...`). An empty split
is different: that is a configuration mistake, and raises DataError at once.
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
  """Unreadable files per task, each warned about once per run (tf.data reads in parallel).

  Epochs re-read the same files; warning (and counting) every re-read buried real logs
  under a thousand identical lines and made "N skipped" count reads instead of files.
  """

  MAX_NAMES = 20  # a summary line names at most this many files

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._bad: dict[str, dict[str, str]] = collections.defaultdict(dict)  # task -> path -> why
    self._summarized: set[tuple[str, str]] = set()

  def skip(self, task: str, path: str, reason: str) -> None:
    """Records an unreadable file; warns the first time this run sees it fail."""
    reason = " ".join(str(reason).split())
    with self._lock:
      new = path not in self._bad[task]
      self._bad[task].setdefault(path, reason)
    if new:
      logging.warning("%s: skipping unreadable file %s (%s)", task, path, reason)

  def count(self, task: str) -> int:
    """Distinct unreadable files of `task` seen so far in this run."""
    with self._lock:
      return len(self._bad[task])

  def skipped(self, task: str) -> list[str]:
    with self._lock:
      return sorted(self._bad[task])

  def summarize(self, task: str, split: str | None, paths: Sequence[str] | None = None) -> None:
    """Logs `task: K of N <split> files unreadable, skipped: ...` once per (task, split).

    `paths` are the files of the pass just finished; without them (infer stops early),
    every unreadable file of the task seen so far is summarised, without a total.
    """
    with self._lock:
      if (task, split or "") in self._summarized:
        return
      self._summarized.add((task, split or ""))
      bad = sorted(p for p in (paths if paths is not None else self._bad[task])
                   if p in self._bad[task])
    if not bad:
      return
    names = [os.path.basename(p) for p in bad[:self.MAX_NAMES]]
    more = f" and {len(bad) - len(names)} more" if len(bad) > len(names) else ""
    total = f" of {len(paths)}" if paths is not None else ""
    kind = f"{split} files" if split else "files"
    logging.warning("%s: %d%s %s unreadable, skipped: %s%s", task, len(bad), total, kind,
                    ", ".join(names), more)


SKIPPED = SkipCounter()
_END = ""  # the end-of-pass marker among the paths (no file has an empty name)


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
                  task: str, dtype: tf.DType, shape: Sequence[int | None],
                  split: str | None = None) -> tf.data.Dataset:
  """{'path', 'value'} for every file `parse` accepts; unreadable files are skipped.

  `parse(path)` returns the value, or raises (OSError, ValueError, or a parser's own
  error); a raising file is logged once, counted in SKIPPED and dropped. An end marker
  after the last path triggers SKIPPED.summarize once every file of the pass is parsed.
  """
  def safe(path: bytes) -> tuple[np.ndarray | bytes, bool]:
    name = path.decode()
    try:
      value = None if name == _END else parse(name)
    except Exception as e:  # noqa: BLE001 - any failure on one file skips that file
      SKIPPED.skip(task, name, f"{type(e).__name__}: {e}")
      value = None
    if value is None:
      dims = [0 if d is None else d for d in shape]
      return (b"" if dtype == tf.string else np.zeros(dims, dtype.as_numpy_dtype)), False
    return value, True

  def read(path: tf.Tensor) -> dict[str, tf.Tensor]:
    value, ok = tf.numpy_function(safe, [path], [dtype, tf.bool], stateful=False)
    return {"path": path, "value": tf.ensure_shape(value, shape), "ok": ok}

  def end_of_pass() -> bool:
    SKIPPED.summarize(task, split, list(paths))
    return False

  def at_end(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    # Runs in file order after the in-order parallel map: every skip is recorded by now.
    ok = tf.cond(tf.equal(ex["path"], _END),
                 lambda: tf.numpy_function(end_of_pass, [], tf.bool, stateful=True),
                 lambda: ex["ok"])
    return {**ex, "ok": tf.ensure_shape(ok, [])}

  ds = tf.data.Dataset.from_tensor_slices(tf.constant([*paths, _END], tf.string))
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(at_end).filter(lambda ex: ex["ok"])
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
