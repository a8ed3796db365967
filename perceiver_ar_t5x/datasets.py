"""SeqIO task -> batched model features, as numpy, for the training loop.

The model features are exactly those of `seqio.LMFeatureConverter` (T5X's
decoder-only contract), so any task ending in a `targets` feature plugs in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

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
  # False (T5X): seqio shards the source; each host reads 1/num_shards of the data,
  # but which examples make a global batch depends on the host count. True: every
  # host runs the whole pipeline and keeps its block of rows of each global batch,
  # so global batches are identical for any host count (num_shards x input work).
  shard_global_batches: bool = False


def get_task(name: str) -> seqio.Task | seqio.Mixture:
  """Looks a task or mixture up, naming the known ones when it is missing."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise DataError(f"unknown task or mixture {name!r}; known: {', '.join(known)}") from None


def model_length(task_feature_lengths: Mapping[str, int]) -> int:
  """Decoder length: `targets`, plus `inputs` for prefix-LM tasks (inputs are the prompt)."""
  return int(task_feature_lengths["targets"]) + int(task_feature_lengths.get("inputs", 0))


def feature_converter(task_feature_lengths: Mapping[str, int], pack: bool
                      ) -> seqio.FeatureConverter:
  """LMFeatureConverter for `targets`-only tasks; PrefixLMFeatureConverter when the task
  also has `inputs` (loss on the targets only), exactly as T5X's decoder-only models."""
  if "inputs" in task_feature_lengths:
    return seqio.PrefixLMFeatureConverter(pack=pack, loss_on_targets_only=True)
  return seqio.LMFeatureConverter(pack=pack)


class ClassificationFeatureConverter(seqio.FeatureConverter):
  """Sequence classification for encoder-only models (Perceiver IO's classifier).

  Task features `inputs` [length] and `targets` [1] (the label id) become
  `encoder_input_tokens` (padded with 0), `encoder_target_tokens` [1] and
  `encoder_loss_weights` [1] = 1, so a padded batch row (all zeros) carries no loss.
  """

  TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                   "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  MODEL_FEATURES = {"encoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                    "encoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                    "encoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  PACKING_FEATURE_DTYPES: dict[str, tf.DType] = {}

  def _convert_features(self, ds: tf.data.Dataset, input_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    if self.pack:
      raise DataError("classification examples are not packed")

    def convert(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      label = ex["targets"][:1]
      return {"encoder_input_tokens": ex["inputs"], "encoder_target_tokens": label,
              "encoder_loss_weights": tf.ones_like(label)}

    return self._pack_or_pad(ds, input_lengths).map(
        convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    return {"encoder_input_tokens": task_feature_lengths["inputs"],
            "encoder_target_tokens": 1, "encoder_loss_weights": 1}


def get_dataset(cfg: DatasetConfig, *, shard_index: int = 0, num_shards: int = 1,
                repeat: bool = True, converter: seqio.FeatureConverter | None = None
                ) -> tf.data.Dataset:
  """Batched features {decoder_input_tokens, decoder_target_tokens, decoder_loss_weights}.

  Prefix-LM tasks (with `inputs`) also get `decoder_causal_attention`, which the
  model ignores: Perceiver AR is causal everywhere.

  Each host reads its own shard (`shard_index` of `num_shards`) and batches
  `batch_size // num_shards` examples. `converter`: the model's feature converter
  (default: the decoder-only one above; a Perceiver IO model passes its own).
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
      shard_info=seqio.ShardInfo(0, 1) if cfg.shard_global_batches else seqio.ShardInfo(
          shard_index, num_shards), try_in_mem_cache=False)
  lengths = {k: int(v) for k, v in cfg.task_feature_lengths.items()}
  ds = (converter or feature_converter(lengths, cfg.pack))(ds, lengths)
  ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=repeat)
  if cfg.shard_global_batches and num_shards > 1:
    ds = ds.shard(num_shards, shard_index)  # host i: rows [i*b/n, (i+1)*b/n) of each batch
  return ds.prefetch(2)


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates numpy batches; raises DataError if the dataset is empty."""
  empty = True
  for batch in ds.as_numpy_iterator():
    empty = False
    yield {k: np.asarray(v) for k, v in batch.items()}
  if empty:
    raise DataError("the dataset yielded no examples (empty split or all examples filtered)")
