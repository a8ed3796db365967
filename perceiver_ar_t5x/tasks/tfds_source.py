"""A SeqIO TFDS source whose data_dir is read when the dataset is built.

seqio.TfdsDataSource fixes its data_dir at registration (import time); this one asks
`locations.get('tfds_data_dir')` (tasks.configure or $TFDS_DATA_DIR) on every use, never
downloads (`read_only`: there may be no internet), and turns a missing dataset into a
one-line DataError that says where it looked.
"""

from __future__ import annotations

from collections.abc import Sequence

import seqio
import tensorflow as tf
from seqio import utils as seqio_utils

from perceiver_ar_t5x.datasets import DataError
from perceiver_ar_t5x.tasks import locations


class LazyTfdsSource(seqio.TfdsDataSource):
  """`tfds_name` (e.g. 'c4/en:3.1.0') restricted to `splits`, mapped to {'targets': key}."""

  def __init__(self, tfds_name: str, splits: Sequence[str], text_key: str) -> None:
    super().__init__(tfds_name=tfds_name, splits=splits, read_only=True)
    self._tfds_name, self._text_key = tfds_name, text_key
    self._loaders: dict[str | None, seqio_utils.LazyTfdsLoader] = {}

  @property
  def tfds_dataset(self) -> seqio_utils.LazyTfdsLoader:
    data_dir = locations.get("tfds_data_dir")
    if data_dir not in self._loaders:
      self._loaders[data_dir] = seqio_utils.LazyTfdsLoader(
          self._tfds_name, data_dir=data_dir, split_map={s: s for s in self.splits},
          read_only=True)
    return self._loaders[data_dir]

  def _missing(self, e: Exception) -> DataError:
    where = locations.get("tfds_data_dir") or "~/tensorflow_datasets (TFDS_DATA_DIR unset)"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    return DataError(f"TFDS dataset {self._tfds_name} is not readable in {where}: {first}. "
                     "Prepare it with `tfds build` and set TFDS_DATA_DIR or "
                     "tasks.configure.tfds_data_dir")

  def list_shards(self, split: str) -> Sequence[str]:
    """The split's files; [split] (shard by example) when TFDS cannot list them.

    Not raising here lets get_dataset report a missing dataset with a clear message,
    and lets tfds.testing.mock_data (which has no file list) work.
    """
    try:
      return super().list_shards(split)
    except Exception:  # noqa: BLE001
      return [split]

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
    try:
      ds = super().get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                               **kwargs)
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001
      raise self._missing(e) from e
    key = self._text_key
    return ds.map(lambda ex: {"targets": ex[key]}, num_parallel_calls=tf.data.AUTOTUNE)
