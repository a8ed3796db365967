"""Re-indexing a converted model's vocabulary onto one of this project's tasks.

A checkpoint keeps its tokenizer's ids: krasserm's text models use HF's
PerceiverTokenizer (0 [PAD], 1 [BOS], 2 [EOS], 3 [MASK], 4 [CLS], 5 [SEP], then byte b
as b + 6; 262 ids), where our byte tasks use ByT5's layout (0 PAD, 1 EOS, 2 UNK, byte b
as b + 3; 259 ids). Re-indexing the embedding rows and the output columns (and bias)
makes the converted model read and predict our ids, so the text_bytes / pg19_bytes
tasks, eval and infer use it as they are; the logit of every kept id is unchanged
(the softmax then runs over our 259 ids instead of their 262).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from perceiver_ar_t5x.convert.model_dir import ConversionError, Converted
from perceiver_ar_t5x.tasks.vocabularies import BYTE_VOCAB_SIZE, MIDI_VOCAB_SIZE

# our id -> the source id it takes its rows from. Bytes: PAD, EOS, UNK <- [PAD], [EOS],
# [MASK] (never a target). MIDI: krasserm's 388 events are in note_seq's type order
# (128 note-on, 128 note-off, 100 shifts, 32 velocities), ours too after PAD and EOS,
# which both take their pad id 388; their velocity bin is velocity // 4 where ours (and
# note_seq's) is (velocity - 1) // 4, so velocities that are multiples of 4 land one bin
# apart.
TABLES = {
    ("perceiver_bytes", "bytes"): np.concatenate(
        [[0, 2, 3], 6 + np.arange(BYTE_VOCAB_SIZE - 3)]).astype(np.int64),
    ("perceiver_midi", "midi"): np.concatenate(
        [[388, 388], np.arange(MIDI_VOCAB_SIZE - 2)]).astype(np.int64),
}


def remap(converted: Converted, source_vocab: str, target_vocab: str) -> Converted:
  """The model with its vocabulary re-indexed from `source_vocab` ids to `target_vocab` ids."""
  table = TABLES.get((source_vocab, target_vocab))
  if table is None:
    raise ConversionError(f"no id mapping from {source_vocab!r} to {target_vocab!r}; known: "
                          f"{sorted(f'{a} -> {b}' for a, b in TABLES)}")
  module = converted.module
  if module.vocab_size <= int(table.max()):
    raise ConversionError(f"the model has {module.vocab_size} ids; {source_vocab!r} needs "
                          f"{int(table.max()) + 1}")
  params = dict(converted.params)
  params["token_embedder"] = {"embedding": np.asarray(
      params["token_embedder"]["embedding"])[table]}
  if "logits_dense" in params:
    params["logits_dense"] = {"kernel": np.asarray(params["logits_dense"]["kernel"])[:, table]}
  if "logits_bias" in params:
    params["logits_bias"] = np.asarray(params["logits_bias"])[table]
  note = (f"vocabulary: {source_vocab} ({module.vocab_size} ids) re-indexed to {target_vocab} "
          f"({len(table)} ids)")
  return dataclasses.replace(converted, module=module.clone(vocab_size=len(table)),
                             params=params, report=[*converted.report, note])


KRASSERM_VOCABS = {262: "perceiver_bytes", 389: "perceiver_midi"}


def remap_krasserm(converted: Converted, target_vocab: str) -> Converted:
  """krasserm text (262 ids) or symbolic audio (389 ids) models onto our bytes / midi ids."""
  source = KRASSERM_VOCABS.get(converted.module.vocab_size)
  if source is None:
    raise ConversionError(f"a krasserm model with {converted.module.vocab_size} ids is neither "
                          f"the text (262) nor the symbolic audio (389) vocabulary")
  return remap(converted, source, target_vocab)
