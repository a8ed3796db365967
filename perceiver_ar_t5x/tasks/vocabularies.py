"""The tasks' vocabularies: UTF-8 bytes, SentencePiece (any .model), MIDI events.

Every vocabulary keeps SeqIO's conventions, 0 = PAD and 1 = EOS, so LMFeatureConverter,
the loss weights and decoding treat all tasks alike.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from perceiver_ar_t5x.datasets import DataError
from perceiver_ar_t5x.tasks import locations, midi

BYTE_VOCAB_SIZE = 259  # 0 PAD, 1 EOS, 2 UNK, then the 256 byte values (ByT5's layout)
MIDI_VOCAB_SIZE = midi.VOCAB.size  # 390: PAD, EOS, 128 on, 128 off, 100 shifts, 32 velocities


def byte_vocabulary() -> seqio.Vocabulary:
  """Raw UTF-8 bytes + 3 (ByT5); any byte string encodes, invalid UTF-8 included."""
  return seqio.ByteVocabulary()


class LazySentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary whose .model path is looked up on first use.

  Tasks are registered at import, before gin runs; the path comes from
  `locations.get('spm_model')` (gin's tasks.configure.spm_model or $SPM_MODEL) when the
  model is first needed, and a missing file is a one-line DataError.
  """

  def __init__(self, location_key: str = "spm_model") -> None:
    self._location_key = location_key
    super().__init__(sentencepiece_model_file="")

  @property
  def sentencepiece_model_file(self) -> str:
    if self._model is None:  # frozen once loaded: one task, one model
      path = locations.require(self._location_key, "c4_en_spm/pg19_spm")
      if not tf.io.gfile.exists(path):
        raise DataError(f"SentencePiece model file not found: {path}")
      self._sentencepiece_model_file = path
    return self._sentencepiece_model_file

  def _model_context(self):
    _ = self.sentencepiece_model_file  # resolves the path before seqio loads it
    return super()._model_context()

  def __eq__(self, other: object) -> bool:
    return isinstance(other, LazySentencePieceVocabulary) and other is self

  __hash__ = object.__hash__


_SPM = LazySentencePieceVocabulary()


def spm_vocabulary() -> LazySentencePieceVocabulary:
  """The one SentencePiece vocabulary shared by c4_en_spm and pg19_spm."""
  return _SPM


def midi_vocabulary() -> seqio.Vocabulary:
  """Performance events (tasks/midi.py): ids are the tokens, 390 of them, EOS = 1."""
  return seqio.PassThroughVocabulary(size=MIDI_VOCAB_SIZE, eos_id=midi.EOS_ID)
