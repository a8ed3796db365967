"""maestro_midi over MIDI files the tests write: splits, augmentation, corrupt files."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from perceiver_ar_t5x import datasets, tasks
from perceiver_ar_t5x.tasks import files, maestro, midi


def scale(offset: int = 0, count: int = 24):
  """A rising run, 0.1 s apart, 0.3 s long; offset makes each file's pitches distinct."""
  return [(0.1 * i, 0.1 * i + 0.3, 40 + offset + i % 24, 70 + i % 30) for i in range(count)]


HEADER = "canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"


def _maestro_dir(write_midi, root, splits=("train", "train", "train", "validation", "test"),
                 same=False):
  rows = [HEADER]
  for i, split in enumerate(splits):
    name = f"2018/piece{i}.midi"
    write_midi(root / name, scale(offset=0 if same else i))
    rows.append(f"Composer,Title {i},{split},2018,{name},{name[:-5]}.wav,2.7")
  (root / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
  return root


def _examples(split, length=300, shuffle=False):
  cfg = datasets.DatasetConfig("maestro_midi", {"targets": length}, split, batch_size=1,
                               shuffle=shuffle)
  return [b["decoder_target_tokens"][0] for b in
          datasets.numpy_batches(datasets.get_dataset(cfg, repeat=False))]


def test_maestro_layout_uses_the_csv_split(tmp_path, write_midi):
  root = _maestro_dir(write_midi, tmp_path)
  tasks.configure(maestro_dir=str(root))
  assert [os.path.basename(p) for p in maestro.midi_paths("train")] == [
      "piece0.midi", "piece1.midi", "piece2.midi"]
  (valid,) = _examples("validation")
  tokens = valid[valid > 0]
  assert tokens[-1] == midi.EOS_ID  # the whole piece fits: it ends in EOS
  want = midi.notes_to_events(midi.load_midi(root / "2018" / "piece3.midi"))
  np.testing.assert_array_equal(tokens[:-1], want)  # validation is never augmented
  got = midi.events_to_notes(tokens)
  assert [n.pitch for n in got] == [n[2] for n in sorted(scale(offset=3))]


def test_train_examples_are_transposed_and_stretched(tmp_path, write_midi):
  root = _maestro_dir(write_midi, tmp_path, splits=["train"] * 40 + ["validation"],
                      same=True)
  tasks.configure(maestro_dir=str(root))
  shifts, stretched = set(), 0
  original = sorted(scale())
  for tokens in _examples("train"):
    notes = midi.events_to_notes(tokens[tokens > 0])
    assert len(notes) == len(original)
    shift = notes[0].pitch - original[0][2]
    assert -3 <= shift <= 3
    assert [n.pitch - shift for n in notes] == [n[2] for n in original]
    shifts.add(shift)
    last_start = notes[-1].start / original[-1][0]
    assert 0.94 <= last_start <= 1.06
    stretched += abs(last_start - 1.0) > 0.005
  assert len(shifts) >= 4 and stretched >= 10


def test_plain_directory_is_hash_split_and_corrupt_files_are_skipped(tmp_path, write_midi):
  for i in range(6):
    write_midi(tmp_path / "midi" / f"song{i}.mid", scale(offset=i, count=8))
  (tmp_path / "midi" / "song6.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
  tasks.configure(maestro_dir=str(tmp_path / "midi"))
  train = maestro.midi_paths("train")
  valid = maestro.midi_paths("validation")
  assert len(train) + len(valid) == 7 and set(train).isdisjoint(valid)
  with pytest.raises(datasets.DataError, match="'test' has no files"):
    maestro.midi_paths("test")
  before = files.SKIPPED.count("maestro_midi")
  out = _examples("train") + _examples("validation")
  assert len(out) == 6  # the corrupt file is dropped wherever it landed
  assert files.SKIPPED.count("maestro_midi") == before + 1


def test_crops_are_context_sized_windows(tmp_path, write_midi):
  root = _maestro_dir(write_midi, tmp_path)
  tasks.configure(maestro_dir=str(root))
  full = midi.notes_to_events(midi.load_midi(root / "2018" / "piece3.midi")).tolist() + [1]
  (crop,) = _examples("validation", length=16)
  assert len(crop) == 16
  starts = [i for i in range(len(full) - 15) if full[i:i + 16] == crop.tolist()]
  assert starts  # a contiguous window of the piece's events


def test_missing_directory_is_a_clear_error():
  with pytest.raises(datasets.DataError, match="MAESTRO_DIR"):
    _examples("train")


def test_validation_examples_are_note_seq_performance_events(tmp_path):
  """The whole task path (files -> seqio -> batches) yields note_seq's events + EOS."""
  golden = pathlib.Path(__file__).parents[1] / "golden"
  want = json.loads((golden / "note_seq_events.json").read_text())["files"]
  rows = [HEADER]
  for name in sorted(want):
    shutil.copy(golden / "midi" / f"{name}.mid", tmp_path / f"{name}.midi")
    rows.append(f"C,T,validation,2018,{name}.midi,{name}.wav,1.0")
  (tmp_path / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
  tasks.configure(maestro_dir=str(tmp_path))
  got = [tokens[tokens > 0].tolist() for tokens in _examples("validation", length=1400)]
  assert got == [want[name] + [midi.EOS_ID] for name in sorted(want)]


def test_corrupt_files_are_warned_about_once_per_run_with_one_summary(tmp_path, write_midi,
                                                                      caplog):
  """3 corrupt of 9 train files over 3 epochs: 3 warning lines + 1 summary, count = files."""
  rows = [HEADER, "C,T,validation,2018,good0.midi,x.wav,1.0"]
  for i in range(9):
    name = f"bad{i}.midi" if i % 3 == 0 else f"good{i}.midi"
    if i % 3 == 0:
      (tmp_path / name).write_bytes(b"MThd\x00\x00\x00\x06garbage" + bytes([i]))
    else:
      write_midi(tmp_path / name, scale(offset=i, count=6))
    rows.append(f"C,T,train,2018,{name},x.wav,1.0")
  write_midi(tmp_path / "good0.midi", scale(count=6))
  (tmp_path / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
  tasks.configure(maestro_dir=str(tmp_path))
  task = f"maestro_hygiene_{tmp_path.name}"  # a fresh task: its own counter and summary
  maestro.register_maestro(task)
  cfg = datasets.DatasetConfig(task, {"targets": 32}, "train", batch_size=2, shuffle=True)
  with caplog.at_level("WARNING"):
    batches = datasets.numpy_batches(datasets.get_dataset(cfg, repeat=True))
    for _ in range(9):  # 6 good files a pass, 2 a batch: 3 passes
      next(batches)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(task)]
  per_file = sorted(x for x in lines if "skipping unreadable file" in x)
  assert [x.split()[4].rsplit("/", 1)[-1] for x in per_file] == [
      "bad0.midi", "bad3.midi", "bad6.midi"]
  assert [x for x in lines if x not in per_file] == [
      f"{task}: 3 of 9 train files unreadable, skipped: bad0.midi, bad3.midi, bad6.midi"]
  assert files.SKIPPED.count(task) == 3
