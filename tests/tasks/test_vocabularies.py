"""Vocabularies: bytes round-trip any bytes, SentencePiece is found lazily, MIDI ids."""

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from perceiver_ar_t5x import datasets
from perceiver_ar_t5x.tasks import locations, midi, vocabularies


def test_byte_vocabulary_round_trips_any_bytes():
  vocab = vocabularies.byte_vocabulary()
  assert vocab.vocab_size == vocabularies.BYTE_VOCAB_SIZE == 259
  assert (vocab.pad_id, vocab.eos_id) == (0, 1)
  text = "Perceiver AR — 長い"
  ids = vocab.encode(text)
  assert ids == [b + 3 for b in text.encode("utf-8")]
  assert vocab.decode(ids) == text
  raw = bytes(range(256))  # invalid UTF-8 included: every byte has an id
  tf_ids = vocab.encode_tf(tf.constant(raw)).numpy()
  np.testing.assert_array_equal(tf_ids, np.arange(256) + 3)


def test_spm_vocabulary_reads_its_path_lazily(spm_path, tmp_path):
  vocab = vocabularies.LazySentencePieceVocabulary()
  with pytest.raises(datasets.DataError, match="SPM_MODEL"):
    vocab.encode("hello")
  locations.configure(spm_model=str(tmp_path / "missing.model"))
  with pytest.raises(datasets.DataError, match="not found"):
    vocab.encode("hello")
  locations.configure(spm_model=spm_path)
  ids = vocab.encode("hello world")
  assert vocab.decode(ids) == "hello world"
  assert vocab.vocab_size == 26 and vocab.eos_id == 1


def test_spm_model_trained_in_test(tmp_path, monkeypatch):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50 +
                              ["perceiver ar reads long books and long songs"] * 50))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                 vocab_size=32, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 model_type="unigram")
  monkeypatch.setenv("SPM_MODEL", str(tmp_path / "m.model"))  # the env var works too
  vocab = vocabularies.LazySentencePieceVocabulary()
  assert vocab.vocab_size == 32
  assert vocab.decode(vocab.encode("the lazy fox")) == "the lazy fox"
  assert locations.configure(task="c4_en_spm", model_vocab_size=32) == "c4_en_spm"


def test_configure_checks_the_model_vocab_size(spm_path):
  # The shared vocabulary may already be loaded by another test: same file either way.
  with pytest.raises(datasets.DataError, match="raise VOCAB_SIZE"):
    locations.configure(task="pg19_spm", spm_model=spm_path, model_vocab_size=20)
  with pytest.raises(datasets.DataError, match="unknown data location"):
    locations.configure(task="pg19_spm", pg19_directory="/x")


def test_midi_vocabulary_matches_the_event_codec():
  vocab = vocabularies.midi_vocabulary()
  assert vocab.vocab_size == midi.VOCAB.size == 390
  assert vocab.eos_id == midi.EOS_ID
