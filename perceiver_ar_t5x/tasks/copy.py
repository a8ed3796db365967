"""The mirrored-copy task: random tokens, then the same tokens reversed.

Like the official Perceiver AR repo's `random_mirrored_*` tasks: the first half
is unpredictable noise and the second half is exactly predictable from it, so
"accuracy on the mirrored half" measures whether layer 0 really reads the
prefix. Examples are generated from (split seed, index) with stateless random
ops, so every split is deterministic and identical across runs and hosts.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import seqio
import tensorflow as tf

VALIDATION_EXAMPLES = 256
_SPLIT_SEEDS = {"train": 0, "validation": 1}
FIRST_TOKEN = 2  # 0 = padding, 1 = EOS; random tokens are drawn from [2, vocab_size)


def _index_dataset(split: str, shuffle_files: bool = False, seed: int | None = None
                   ) -> tf.data.Dataset:
  del shuffle_files, seed  # examples are a pure function of their index
  if split not in _SPLIT_SEEDS:
    raise ValueError(f"copy task has splits {sorted(_SPLIT_SEEDS)}, got {split!r}")
  count = VALIDATION_EXAMPLES if split == "validation" else 2**31 - 1
  split_seed = _SPLIT_SEEDS[split]
  return tf.data.Dataset.range(count).map(
      lambda i: {"index": tf.stack([tf.constant(split_seed, tf.int64), i])})


def mirrored_sequences(dataset: tf.data.Dataset,
                       sequence_length: Mapping[str, int] | None, *,
                       vocab_size: int) -> tf.data.Dataset:
  """Maps {'index'} -> {'inputs': [L], 'targets': [L]}: L random tokens, then reversed.

  A prefix-LM task: the model reads `inputs` as the prompt and is scored on
  `targets` only (seqio.PrefixLMFeatureConverter), so the loss never asks it to
  predict noise.
  """
  if sequence_length is None or "targets" not in sequence_length:
    raise ValueError("the copy task needs sequence_length={'inputs': L, 'targets': L}")
  length = int(sequence_length["targets"])
  if int(sequence_length.get("inputs", length)) != length or length < 1:
    raise ValueError(f"copy task needs equal inputs and targets lengths >= 1, got "
                     f"{dict(sequence_length)}")

  def make(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    first = tf.random.stateless_uniform([length], seed=ex["index"], minval=FIRST_TOKEN,
                                        maxval=vocab_size, dtype=tf.int32)
    return {"inputs": first, "targets": tf.reverse(first, [0])}

  return dataset.map(make, num_parallel_calls=tf.data.AUTOTUNE)


def register(name: str = "copy_mirrored", vocab_size: int = 32) -> seqio.Task:
  """Registers (idempotently) a copy task with tokens in [2, vocab_size)."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  vocab = seqio.PassThroughVocabulary(size=vocab_size, eos_id=1)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(_index_dataset, splits=list(_SPLIT_SEEDS)),
      preprocessors=[functools.partial(mirrored_sequences, vocab_size=vocab_size)],
      output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                       "targets": seqio.Feature(vocab, add_eos=False)},
      metric_fns=[])
