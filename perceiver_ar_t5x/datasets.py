"""SeqIO task -> batched model features, as numpy, for the training loop.

The model features are exactly those of `seqio.LMFeatureConverter` (T5X's
decoder-only contract), so any task ending in a `targets` feature plugs in.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf


class DataError(ValueError):
  """Bad task name, bad lengths or empty data: raised with a one-line message."""


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read (mirrors t5x.utils.DatasetConfig)."""

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str
  batch_size: int
  shuffle: bool = True
  seed: int | None = 0
  pack: bool = False
  use_cached: bool = False


def get_task(name: str) -> seqio.Task | seqio.Mixture:
  """Looks a task or mixture up, naming the known ones when it is missing."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise DataError(f"unknown task or mixture {name!r}; known: {', '.join(known)}") from None


def get_dataset(cfg: DatasetConfig, *, shard_index: int = 0, num_shards: int = 1,
                repeat: bool = True) -> tf.data.Dataset:
  """Batched features {decoder_input_tokens, decoder_target_tokens, decoder_loss_weights}.

  Each host reads its own shard (`shard_index` of `num_shards`) and batches
  `batch_size // num_shards` examples.
  """
  if "targets" not in cfg.task_feature_lengths:
    raise DataError(f"task_feature_lengths needs a 'targets' entry, got "
                    f"{dict(cfg.task_feature_lengths)}")
  if cfg.batch_size % num_shards:
    raise DataError(f"batch_size {cfg.batch_size} must divide by the {num_shards} hosts")
  task = get_task(cfg.mixture_or_task_name)
  ds = task.get_dataset(
      sequence_length=dict(cfg.task_feature_lengths), split=cfg.split, use_cached=cfg.use_cached,
      shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=None if repeat else 1,
      shard_info=seqio.ShardInfo(shard_index, num_shards), try_in_mem_cache=False)
  converter = seqio.LMFeatureConverter(pack=cfg.pack)
  ds = converter(ds, {"targets": int(cfg.task_feature_lengths["targets"])})
  return ds.batch(cfg.batch_size // num_shards, drop_remainder=repeat).prefetch(2)


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates numpy batches; raises DataError if the dataset is empty."""
  empty = True
  for batch in ds.as_numpy_iterator():
    empty = False
    yield {k: np.asarray(v) for k, v in batch.items()}
  if empty:
    raise DataError("the dataset yielded no examples (empty split or all examples filtered)")
