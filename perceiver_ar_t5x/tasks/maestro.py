"""`maestro_midi`: piano performances as MIDI events (tasks/midi.py), one crop per piece.

Data: MAESTRO_DIR (or tasks.configure.maestro_dir), either
  * the MAESTRO release layout: a `*.csv` at the root with `split` and `midi_filename`
    columns (maestro-v3.0.0.csv), and the .midi files at those relative paths; or
  * any directory of .mid/.midi files, split by a hash of the file name (train/validation).
Train examples are augmented as in Music Transformer / Perceiver AR (Sec. 5.4): a random
transposition of up to 3 semitones and a time stretch in [0.95, 1.05], drawn per example
from its seqio seed. Corrupt MIDI files are skipped, logged and counted (files.SKIPPED).
"""

from __future__ import annotations

import csv
import functools
import os

import numpy as np
import seqio
import tensorflow as tf

from perceiver_ar_t5x.tasks import files, locations, midi, preprocessors, vocabularies

SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi")
VALIDATION_PERCENT = 5.0
TRANSPOSE_SEMITONES = 3  # uniform integer in [-3, 3]
STRETCH_RANGE = (0.95, 1.05)


def _metadata_csv(root: str) -> str | None:
  """The root's MAESTRO metadata CSV (one with 'split' and 'midi_filename'), if any."""
  for path in sorted(tf.io.gfile.glob(os.path.join(root, "*.csv"))):
    with tf.io.gfile.GFile(path) as f:
      header = next(csv.reader(f), [])
    if {"split", "midi_filename"} <= set(header):
      return path
  return None


def midi_paths(split: str, *, task: str = "maestro_midi") -> list[str]:
  """The split's MIDI files: from the MAESTRO CSV if present, else a file-name hash split."""
  root = locations.require("maestro_dir", task)
  table = _metadata_csv(root)
  if table is not None:
    with tf.io.gfile.GFile(table) as f:
      rows = list(csv.DictReader(f))
    paths = sorted(os.path.join(root, r["midi_filename"]) for r in rows if r["split"] == split)
    where = f"{table}, rows with split={split}"
  elif split == "test":
    paths, where = [], f"{root} (no metadata CSV: only train/validation, by hash)"
  else:
    paths = files.hash_split(files.list_files(root, MIDI_SUFFIXES), split, VALIDATION_PERCENT)
    where = f"{root}, {VALIDATION_PERCENT:g}% of .mid files by name hash"
  files.check_not_empty(paths, task, split, where)
  return paths


def _parse_notes(path: str) -> np.ndarray:
  """[num_notes, 4] float64 (start, end, pitch, velocity); CorruptMidiError if unparsable.

  float64, in load_midi's order: float32 seconds move notes across 10 ms boundaries and
  reorder near-simultaneous onsets, and the events would no longer be note_seq's.
  """
  notes = midi.load_midi(path)
  return np.asarray(notes, np.float64).reshape(-1, 4)


def read_midi_files(paths: list[str], split: str, *, task: str) -> tf.data.Dataset:
  """{'notes': [n, 4], 'augment': split == train} per parsable file with notes.

  Corrupt files are skipped (and counted); files without notes are dropped silently.
  """
  augment = split == "train"
  ds = files.read_skipping(paths, _parse_notes, task=task, dtype=tf.float64, shape=[None, 4],
                          split=split)
  ds = ds.filter(lambda ex: tf.shape(ex["value"])[0] > 0)
  return ds.map(lambda ex: {"notes": ex["value"], "augment": tf.constant(augment)})


def _notes_to_events(notes: np.ndarray, semitones: np.ndarray, stretch: np.ndarray
                     ) -> np.ndarray:
  moved = midi.transpose_notes([midi.Note(*map(float, n)) for n in notes], int(semitones))
  moved = [n._replace(pitch=int(n.pitch), velocity=int(n.velocity)) for n in moved]
  return midi.notes_to_events(midi.time_stretch(moved, float(stretch)))


@seqio.map_over_dataset(num_seeds=1)
def notes_to_events(ex: dict[str, tf.Tensor], *, seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """Notes -> event ids in 'targets', transposed/stretched when ex['augment']."""
  draws = tf.random.stateless_uniform([2], seed=seed)
  span = 2 * TRANSPOSE_SEMITONES + 1
  semitones = tf.cast(tf.floor(draws[0] * span), tf.int32) - TRANSPOSE_SEMITONES
  stretch = STRETCH_RANGE[0] + draws[1] * (STRETCH_RANGE[1] - STRETCH_RANGE[0])
  semitones = tf.where(ex["augment"], semitones, 0)
  stretch = tf.where(ex["augment"], stretch, 1.0)
  events = tf.numpy_function(_notes_to_events, [ex["notes"], semitones, stretch], tf.int32,
                             stateful=False)
  return {"targets": tf.ensure_shape(events, [None])}


def register_maestro(name: str = "maestro_midi") -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)

  source = files.PathsDataSource(SPLITS, functools.partial(midi_paths, task=name),
                                 functools.partial(read_midi_files, task=name))
  steps = [notes_to_events, preprocessors.append_eos, preprocessors.random_crop,
           preprocessors.select_targets]
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=steps, metric_fns=[],
      output_features={"targets": seqio.Feature(vocabularies.midi_vocabulary(),
                                                add_eos=False)})
