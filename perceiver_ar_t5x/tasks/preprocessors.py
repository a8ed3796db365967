"""SeqIO preprocessors for long documents: crop, EOS, random prefix length.

Each is a pure function of (example, seed): `seqio.map_over_dataset(num_seeds=1)` hands
every example its own stateless seed derived from the task seed, so a pipeline is
deterministic for a given seed and no preprocessor holds random state.

Books are far longer than any context, so the order is
  (crop_text ->) tokenize -> append_eos -> random_crop -> select_targets
and the EOS is appended *before* cropping: a crop carries EOS only if it reaches the true
end of its document, instead of every mid-book crop ending in a false EOS.
Packing short documents is seqio.LMFeatureConverter(pack=True) (DatasetConfig.pack).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import seqio
import tensorflow as tf

Features = dict[str, tf.Tensor]
CROP_MARK = "_perceiver_ar_crop_step"


def crop_step(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Marks a preprocessor as a crop: whole-document evaluation (documents.py) drops it.

  A mark on the function, not a name match, so a renamed or new crop stays known.
  """
  setattr(fn, CROP_MARK, True)
  return fn


def is_crop_step(step: Callable[..., Any]) -> bool:
  """Whether a task preprocessor (possibly a functools.partial of one) is a crop step."""
  while isinstance(step, functools.partial):
    step = step.func
  return bool(getattr(step, CROP_MARK, False))


def crop_tokens(tokens: tf.Tensor, length: int, seed: tf.Tensor) -> tf.Tensor:
  """A uniformly random window of `length` tokens (all of them if shorter); [<= length]."""
  extra = tf.maximum(tf.size(tokens) - length, 0)
  start = tf.random.stateless_uniform([], seed=seed, maxval=extra + 1, dtype=tf.int32)
  return tokens[start:start + length]


def crop_text(text: tf.Tensor, max_len: int, seed: tf.Tensor, unit: str = "BYTE"
              ) -> tuple[tf.Tensor, tf.Tensor]:
  """(random window of at most `max_len` units of a string, whether it reaches the end).

  unit is 'BYTE' (byte vocabularies) or 'UTF8_CHAR' (never splits a character, for
  SentencePiece). Cropping text before tokenizing keeps a 1 MB book from being
  tokenized whole to keep 8k tokens of it.
  """
  size = tf.strings.length(text, unit=unit)
  extra = tf.maximum(size - max_len, 0)
  start = tf.random.stateless_uniform([], seed=seed, maxval=extra + 1, dtype=tf.int32)
  return tf.strings.substr(text, start, max_len, unit=unit), start + max_len >= size


@crop_step
@seqio.map_over_dataset(num_seeds=1)
def random_crop_text(ex: Mapping[str, tf.Tensor], sequence_length: Mapping[str, int], *,
                     units_per_token: int, unit: str = "BYTE", seed: tf.Tensor) -> Features:
  """Crops 'targets' text to sequence_length * units_per_token units; sets 'at_end'.

  units_per_token must bound the units one token can cover (1 for bytes; SentencePiece
  pieces are rarely over 16 characters), or the token crop after it sees fewer tokens.
  """
  max_len = int(sequence_length["targets"]) * units_per_token
  text, at_end = crop_text(ex["targets"], max_len, seed, unit)
  return {**ex, "targets": text, "at_end": at_end}


@seqio.map_over_dataset
def append_eos(ex: Mapping[str, tf.Tensor], output_features: Mapping[str, seqio.Feature]
               ) -> Features:
  """Appends the vocabulary's EOS to 'targets' unless a text crop cut the document's end."""
  eos = tf.constant([output_features["targets"].vocabulary.eos_id], ex["targets"].dtype)
  with_eos = tf.concat([ex["targets"], eos], axis=0)
  at_end = ex.get("at_end", tf.constant(True))
  return {**ex, "targets": tf.cond(at_end, lambda: with_eos, lambda: ex["targets"])}


@crop_step
@seqio.map_over_dataset(num_seeds=1)
def random_crop(ex: Mapping[str, tf.Tensor], sequence_length: Mapping[str, int], *,
                seed: tf.Tensor) -> Features:
  """Crops 'targets' to a random window of sequence_length['targets'] tokens."""
  return {**ex, "targets": crop_tokens(ex["targets"], int(sequence_length["targets"]), seed)}


@crop_step
@seqio.map_over_dataset(num_seeds=1)
def random_prefix_length(ex: Mapping[str, tf.Tensor], *, min_length: int,
                         seed: tf.Tensor) -> Features:
  """Drops a random number of leading tokens, keeping at least `min_length` (or all).

  The kept length is uniform in [min(min_length, n), n]: the model trains on contexts of
  every length, as it meets short prompts at inference (the latents always sit on an
  example's last positions, so a shorter example is a shorter prefix).
  """
  n = tf.size(ex["targets"])
  low = tf.minimum(min_length, n)
  keep = tf.random.stateless_uniform([], seed=seed, minval=low, maxval=n + 1, dtype=tf.int32)
  return {**ex, "targets": ex["targets"][n - keep:]}


def select_targets(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Keeps only 'targets' (drops 'path', 'at_end', ...) and non-empty examples."""
  ds = ds.map(lambda ex: {"targets": ex["targets"]}, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.filter(lambda ex: tf.size(ex["targets"]) > 0)


def rename(ds: tf.data.Dataset, *, key: str) -> tf.data.Dataset:
  """{key: text, ...} -> {'targets': text}: the one feature every task ends in."""
  return ds.map(lambda ex: {"targets": ex[key]}, num_parallel_calls=tf.data.AUTOTUNE)
