"""`pg19_bytes` and `pg19_spm`: PG-19 books (Rae et al. 2020), one random crop per book.

Data, in order of preference:
  * a local copy of the PG-19 release layout, PG19_DIR (or tasks.configure.pg19_dir):
    `{train,validation,test}/<book id>.txt`, as in gs://deepmind-gutenberg;
  * else TFDS `pg19` under TFDS_DATA_DIR (or tasks.configure.tfds_data_dir).
Books average ~69k words, far longer than a context: the text is cropped before
tokenizing (text.make_text_task), so a 1 MB book costs one context's worth of work.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import seqio
import tensorflow as tf

from perceiver_ar_t5x.tasks import files, locations, text
from perceiver_ar_t5x.tasks.tfds_source import LazyTfdsSource

SPLITS = ("train", "validation", "test")
TFDS_NAME = "pg19:0.1.1"


def local_paths(split: str, *, task: str) -> list[str]:
  root = locations.require("pg19_dir", task)
  paths = files.list_files(os.path.join(root, split), text.TEXT_SUFFIXES)
  files.check_not_empty(paths, task, split, os.path.join(root, split))
  return paths


class PG19Source(seqio.DataSource):
  """The local directory when PG19_DIR is set, else TFDS; decided when data is read."""

  def __init__(self, task: str, utf8: bool) -> None:
    self._local = files.PathsDataSource(
        SPLITS, functools.partial(local_paths, task=task),
        functools.partial(text.read_text_files, task=task, utf8=utf8))
    self._tfds = LazyTfdsSource(TFDS_NAME, splits=SPLITS, text_key="book_text")
    super().__init__(splits=SPLITS, caching_permitted=True)

  def _current(self) -> seqio.DataSource:
    return self._local if locations.get("pg19_dir") else self._tfds

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return self._current().list_shards(split)

  def num_input_examples(self, split: str) -> int | None:
    return None

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
    return self._current().get_dataset(split, shuffle=shuffle, seed=seed,
                                       shard_info=shard_info, **kwargs)


def register_pg19(bytes_name: str = "pg19_bytes", spm_name: str = "pg19_spm") -> None:
  text.byte_text_task(bytes_name, PG19Source(bytes_name, utf8=False))
  text.spm_text_task(spm_name, PG19Source(spm_name, utf8=True))
