"""Byte-level masked language modelling for Perceiver IO (encoder-only) models.

Perceiver IO (Jaegle et al. 2021, arXiv:2107.14795, Sec. 4.1) pretrains on UTF-8 bytes
with whole-word masking: 15% of the *words* are masked, and every byte of a masked word
is replaced, so the model cannot fill a word in from its own neighbouring bytes.

Each example is one random crop of a document (at most the `inputs` length):
  targets = the crop's bytes; inputs = the same bytes, each chosen word -> MASK_ID.
A word is a maximal run of non-whitespace bytes inside the crop (a word cut by the crop
edge counts as the word it shows); whitespace is never masked. Every crop with a word
gets at least one masked word, and whitespace-only crops are dropped, so no example
has zero loss weight. The model side uses seqio.EncoderFeatureConverter(mask_id=MASK_ID),
which puts the loss exactly where inputs == MASK_ID: the tasks add no other feature.
Randomness comes from seqio's per-example stateless seeds (deterministic for a seed).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import seqio
import tensorflow as tf

from perceiver_ar_t5x.datasets import DataError
from perceiver_ar_t5x.tasks import files, pg19, preprocessors, text

MLM_VOCAB_SIZE = 260  # ByteVocabulary(extra_ids=1): PAD, EOS, UNK, 256 bytes, [MASK]
MASK_ID = 259  # the one extra id, used as [MASK]
MASK_RATE = 0.15  # fraction of words masked (Perceiver IO Sec. 4.1, as BERT)
WHITESPACE = b" \t\n\r\f\v"  # the bytes that separate words (Python's bytes.split())
_BYTE_OFFSET = 3  # ByteVocabulary: id = byte + 3


def mlm_vocabulary() -> seqio.ByteVocabulary:
  """UTF-8 bytes (ByT5 layout) plus one extra id, MASK_ID, that no text encodes to."""
  return seqio.ByteVocabulary(extra_ids=1)


def crop_length(sequence_length: Mapping[str, int] | None) -> int:
  """The crop length: the `inputs` length (and `targets`, if smaller: they must align)."""
  if not sequence_length or "inputs" not in sequence_length:
    raise DataError(f"masked-LM tasks need task_feature_lengths with 'inputs' (and equal "
                    f"'targets'), got {dict(sequence_length or {})}")
  return min(int(v) for k, v in sequence_length.items() if k in ("inputs", "targets"))


@preprocessors.crop_step
def crop_document(ds: tf.data.Dataset, sequence_length: Mapping[str, int] | None
                  ) -> tf.data.Dataset:
  """{'targets': document} -> {'targets': a random window of crop_length bytes}.

  Cropping the string before tokenizing keeps a whole book from being tokenized to use
  one context of it (the same crop as the text tasks, preprocessors.crop_text). The
  length is checked here, outside the traced map, so a bad one is a plain DataError.
  """
  return _crop(ds, length=crop_length(sequence_length))


@seqio.map_over_dataset(num_seeds=1)
def _crop(ex: Mapping[str, tf.Tensor], *, length: int, seed: tf.Tensor
          ) -> dict[str, tf.Tensor]:
  cropped, _ = preprocessors.crop_text(ex["targets"], length, seed)
  return {"targets": cropped}


def whole_word_mask(tokens: tf.Tensor, mask_rate: float, seed: tf.Tensor) -> tf.Tensor:
  """Which positions of byte ids `tokens` [n] to mask: whole words, never whitespace; [n].

  Each word is chosen independently with probability `mask_rate`; when none is chosen
  and the crop has a word, one word is chosen uniformly instead.
  """
  space_ids = tf.constant([b + _BYTE_OFFSET for b in WHITESPACE], tokens.dtype)
  in_word = tf.logical_not(tf.reduce_any(tokens[:, None] == space_ids[None, :], axis=1))
  after_word = tf.concat([[False], in_word[:-1]], axis=0)
  starts = tf.logical_and(in_word, tf.logical_not(after_word))
  num_words = tf.reduce_sum(tf.cast(starts, tf.int32))
  draw_seed, fallback_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  chosen = tf.random.stateless_uniform([num_words], seed=draw_seed) < mask_rate
  fallback = tf.random.stateless_uniform([], seed=fallback_seed,
                                         maxval=tf.maximum(num_words, 1), dtype=tf.int32)
  chosen = tf.logical_or(chosen, tf.logical_and(tf.logical_not(tf.reduce_any(chosen)),
                                                tf.range(num_words) == fallback))
  # Whitespace looks up the appended False, so an all-whitespace crop gathers in range.
  word_index = tf.where(in_word, tf.cumsum(tf.cast(starts, tf.int32)) - 1, num_words)
  return tf.gather(tf.concat([chosen, [False]], axis=0), word_index)


@seqio.map_over_dataset(num_seeds=1)
def mask_words(ex: Mapping[str, tf.Tensor], *, mask_rate: float,
               seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """{'targets': byte ids} -> {'inputs': with chosen words masked, 'targets': unchanged}."""
  targets = ex["targets"]
  masked = whole_word_mask(targets, mask_rate, seed)
  inputs = tf.where(masked, tf.constant(MASK_ID, targets.dtype), targets)
  return {"inputs": inputs, "targets": targets}


def drop_unmasked(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Drops whitespace-only crops: they have no word to mask, hence no loss."""
  return ds.filter(lambda ex: tf.reduce_any(ex["inputs"] == MASK_ID))


def make_mlm_task(name: str, source: seqio.DataSource, *,
                  mask_rate: float = MASK_RATE) -> seqio.Task:
  """Registers (idempotently) a whole-word-masked byte task over {'targets': text} docs."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  if not 0.0 < mask_rate <= 1.0:
    raise DataError(f"mask_rate must be in (0, 1], got {mask_rate}")
  vocab = mlm_vocabulary()
  steps = [
      crop_document,
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      functools.partial(mask_words, mask_rate=mask_rate),
      drop_unmasked,
  ]
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=steps, metric_fns=[],
      output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                       "targets": seqio.Feature(vocab, add_eos=False)})


def register_text_bytes_mlm(name: str = "text_bytes_mlm") -> seqio.Task:
  """Over text_bytes' files (TEXT_FILES / TEXT_VALIDATION_FILES, the same hash split)."""
  source = files.PathsDataSource(
      ["train", "validation"], functools.partial(text.text_file_paths, task=name),
      functools.partial(text.read_text_files, task=name))
  return make_mlm_task(name, source)


def register_pg19_bytes_mlm(name: str = "pg19_bytes_mlm") -> seqio.Task:
  """Over PG-19 books: PG19_DIR if set, else TFDS pg19 (as pg19_bytes)."""
  return make_mlm_task(name, pg19.PG19Source(name, utf8=False))
