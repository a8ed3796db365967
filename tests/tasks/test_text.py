"""text_bytes, pg19_* and c4_en_spm over files the tests write and TFDS mock data."""

import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from perceiver_ar_t5x import datasets, tasks
from perceiver_ar_t5x.tasks import files, locations, text


def _corpus(root, count=12):
  os.makedirs(root, exist_ok=True)
  docs = {}
  for i in range(count):
    docs[f"doc{i:02d}.txt"] = f"document {i}: " + "lorem ipsum " * (i + 1)
    (root / f"doc{i:02d}.txt").write_text(docs[f"doc{i:02d}.txt"])
  return docs


def _examples(task, split, length=24, shuffle=False):
  cfg = datasets.DatasetConfig(task, {"targets": length}, split, batch_size=1, shuffle=shuffle)
  batches = datasets.numpy_batches(datasets.get_dataset(cfg, repeat=False))
  return [b["decoder_target_tokens"][0] for b in batches]


def _text(tokens):
  return bytes(int(t) - 3 for t in tokens if t > 2).decode()


def test_text_bytes_hash_split_reads_every_file_once(tmp_path):
  docs = _corpus(tmp_path / "corpus")
  tasks.configure(text_files=str(tmp_path / "corpus"))
  train = text.text_file_paths("train")
  valid = text.text_file_paths("validation")
  assert set(train).isdisjoint(valid) and len(train) + len(valid) == 12 and valid
  assert text.text_file_paths("validation") == valid  # stable
  out = [_text(t) for t in _examples("text_bytes", "train")]
  assert len(out) == len(train)
  for piece in out:
    assert any(piece in doc for doc in docs.values())
  assert all(len(t) <= 24 for t in out)


def test_text_bytes_explicit_validation_glob_and_env(tmp_path, monkeypatch):
  _corpus(tmp_path / "train", 3)
  (tmp_path / "valid").mkdir()
  (tmp_path / "valid" / "v.txt").write_text("held out")
  monkeypatch.setenv("TEXT_FILES", str(tmp_path / "train" / "*.txt"))
  monkeypatch.setenv("TEXT_VALIDATION_FILES", str(tmp_path / "valid"))
  assert [_text(t) for t in _examples("text_bytes", "validation")] == ["held out"]
  assert len(_examples("text_bytes", "train")) == 3


def test_unreadable_files_are_skipped_logged_and_counted(tmp_path, caplog):
  _corpus(tmp_path / "c", 3)
  os.symlink(tmp_path / "gone.txt", tmp_path / "c" / "broken.txt")  # listed, unreadable
  tasks.configure(text_files=str(tmp_path / "c" / "*.txt"),
                  text_validation_files=str(tmp_path / "c" / "doc00.txt"))
  before = files.SKIPPED.count("text_bytes")
  with caplog.at_level(logging.WARNING):
    out = _examples("text_bytes", "train")
  assert len(out) == 3
  assert files.SKIPPED.count("text_bytes") == before + 1
  assert any("broken.txt" in r.getMessage() for r in caplog.records)


def test_empty_split_and_missing_location_are_clear_errors(tmp_path):
  with pytest.raises(datasets.DataError, match="TEXT_FILES"):
    _examples("text_bytes", "train")
  (tmp_path / "empty").mkdir()
  tasks.configure(text_files=str(tmp_path / "empty"))
  with pytest.raises(datasets.DataError, match="has no files"):
    _examples("text_bytes", "train")
  one = tmp_path / "one"
  _corpus(one, 1)
  tasks.configure(text_files=str(one))
  with pytest.raises(datasets.DataError, match="'validation' has no files"):
    _examples("text_bytes", "validation")


def test_all_files_unreadable_ends_instead_of_spinning(tmp_path):
  (tmp_path / "c").mkdir()
  os.symlink(tmp_path / "gone.txt", tmp_path / "c" / "a.txt")
  tasks.configure(text_files=str(tmp_path / "c" / "*.txt"),
                  text_validation_files=str(tmp_path / "c" / "*.txt"))
  cfg = datasets.DatasetConfig("text_bytes", {"targets": 8}, "train", batch_size=1)
  with pytest.raises(datasets.DataError, match="no examples"):
    next(datasets.numpy_batches(datasets.get_dataset(cfg, repeat=True)))


def test_pg19_local_directory_bytes_and_spm(tmp_path, spm_path):
  for split, count in (("train", 3), ("validation", 2), ("test", 1)):
    (tmp_path / split).mkdir()
    for i in range(count):
      (tmp_path / split / f"{i}.txt").write_text(f"{split} book {i}. " * 40)
  tasks.configure(pg19_dir=str(tmp_path), spm_model=spm_path)
  books = [_text(t) for t in _examples("pg19_bytes", "validation", length=32)]
  assert len(books) == 2 and all(len(b) == 32 and "validation book" in b for b in books)
  assert len(_examples("pg19_bytes", "test")) == 1
  spm_books = _examples("pg19_spm", "train", length=16)
  assert len(spm_books) == 3 and all(len(t) == 16 and t.max() < 26 for t in spm_books)


def test_pg19_and_c4_from_tfds_mock_data(spm_path):
  tasks.configure(spm_model=spm_path, tfds_data_dir="/nonexistent/tfds")
  with tfds.testing.mock_data(num_examples=4):
    assert len(_examples("pg19_bytes", "train", length=16)) == 4
    c4 = _examples("c4_en_spm", "validation", length=16)
    assert len(c4) == 4 and all(1 in t for t in c4)  # short docs keep their EOS
    packed = datasets.DatasetConfig("c4_en_spm", {"targets": 64}, "train", batch_size=2,
                                    pack=True)
    batch = next(datasets.numpy_batches(datasets.get_dataset(packed)))
    assert batch["decoder_segment_ids"].max() >= 2  # several documents share a row
  with pytest.raises(datasets.DataError, match="c4/en.*not readable in /nonexistent/tfds"):
    _examples("c4_en_spm", "validation")
  assert locations.get("tfds_data_dir") == "/nonexistent/tfds"
  np.testing.assert_array_equal(c4[0][c4[0] > 0][-1:], [1])
