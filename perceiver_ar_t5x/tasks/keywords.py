"""A generated sequence-classification task for tests and the CPU demo (no files).

keyword_classification: a string of random lowercase letters and spaces with exactly
one of four uppercase keywords inserted at a random place; the label is the keyword.
Every example is a pure function of its split and index (stateless TF random ops), so
reads are deterministic and a tiny Perceiver IO learns it in a couple of minutes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import seqio
import tensorflow as tf

from perceiver_ar_t5x.datasets import DataError
from perceiver_ar_t5x.tasks import classification

KEYWORDS = ("CAT", "DOG", "FISH", "BIRD")  # uppercase: the lowercase noise never spells one
NOISE = b"abcdefghijklmnopqrstuvwxyz "
KEYWORD_TEXT_LENGTHS = (16, 64)  # text lengths drawn from here (capped by 'inputs')
KEYWORD_EXAMPLES = {"train": 10_000, "validation": 500}
_KEYWORD_SPLIT_SEEDS = {"train": 0, "validation": 1}


def _keyword_indices(split: str, shuffle_files: bool = False, seed: int | None = None
                     ) -> tf.data.Dataset:
  """{'index': [split seed, i]}: an example is a pure function of its split and index."""
  del shuffle_files, seed  # seqio shuffles the examples; their content never changes
  if split not in _KEYWORD_SPLIT_SEEDS:
    raise DataError(f"keyword_classification has splits {list(classification.SPLITS)}, "
                    f"got {split!r}")
  split_seed = tf.constant(_KEYWORD_SPLIT_SEEDS[split], tf.int64)

  def index(i: tf.Tensor) -> dict[str, tf.Tensor]:
    return {"index": tf.stack([split_seed, i])}

  return tf.data.Dataset.range(KEYWORD_EXAMPLES[split]).map(index)


def keyword_example(index: tf.Tensor, low: int, high: int) -> dict[str, tf.Tensor]:
  """Noise of length in [low, high] with one random keyword at a random place."""
  longest = max(len(k) for k in KEYWORDS)
  ids = [[b + 3 for b in k.encode()] + [0] * (longest - len(k)) for k in KEYWORDS]
  seeds = tf.unstack(tf.random.experimental.stateless_split(index, 4))
  label = tf.random.stateless_uniform([], seeds[0], maxval=len(KEYWORDS), dtype=tf.int32)
  size = tf.gather(tf.constant([len(k) for k in KEYWORDS]), label)
  keyword = tf.gather(tf.constant(ids, tf.int32), label)[:size]
  length = tf.random.stateless_uniform([], seeds[1], minval=low, maxval=high + 1,
                                       dtype=tf.int32)
  noise = tf.random.stateless_uniform([length - size], seeds[2], maxval=len(NOISE),
                                      dtype=tf.int32)
  noise = tf.gather(tf.constant([b + 3 for b in NOISE], tf.int32), noise)
  at = tf.random.stateless_uniform([], seeds[3], maxval=length - size + 1, dtype=tf.int32)
  return {"inputs": tf.concat([noise[:at], keyword, noise[at:]], axis=0),
          "targets": tf.reshape(label, [1])}


def keyword_examples(ds: tf.data.Dataset, sequence_length: Mapping[str, int] | None
                     ) -> tf.data.Dataset:
  """{'index'} -> {'inputs', 'targets'}; texts fit the `inputs` length uncut."""
  high = min(KEYWORD_TEXT_LENGTHS[1], classification.inputs_length(sequence_length))
  if high < max(len(k) for k in KEYWORDS):
    raise DataError(f"keyword_classification needs an 'inputs' length >= "
                    f"{max(len(k) for k in KEYWORDS)}, got {sequence_length['inputs']}")
  low = min(KEYWORD_TEXT_LENGTHS[0], high)

  def example(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return keyword_example(ex["index"], low, high)

  return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def register_keyword_classification(name: str = "keyword_classification") -> seqio.Task:
  """Registers (idempotently) the generated task: 4 classes, no files needed."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  classification.LABEL_COUNTS[name] = functools.partial(len, KEYWORDS)
  vocab = classification.LabelVocabulary(name, labels=KEYWORDS)
  return seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(_keyword_indices, splits=list(classification.SPLITS)),
      preprocessors=[keyword_examples], metric_fns=[],
      output_features={"inputs": seqio.Feature(seqio.ByteVocabulary(), add_eos=False),
                       "targets": seqio.Feature(vocab, add_eos=False)})
