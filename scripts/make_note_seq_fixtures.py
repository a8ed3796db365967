r"""Writes real-style .mid files and Magenta note_seq's performance events for them.

The ground truth for tests/tasks/test_midi.py: our MIDI -> events encoding must equal
note_seq's performance encoding (Music Transformer, the Perceiver AR paper's MAESTRO
runs) token for token. note_seq is not a dependency of the package, so its output is
frozen here. Run it in a separate venv (note-seq drags librosa & co.; they are stubbed):

  python3 -m venv /tmp/nsvenv
  /tmp/nsvenv/bin/pip install --no-deps note-seq==0.0.5
  /tmp/nsvenv/bin/pip install absl-py attrs numpy scipy protobuf intervaltree pretty_midi mido
  /tmp/nsvenv/bin/python scripts/make_note_seq_fixtures.py --out tests/golden

It writes `<out>/midi/<name>.mid` (deterministic: fixed seeds, written with mido so the
ticks, tempo maps and message order are exact) and `<out>/note_seq_events.json`:
{"files": {name: [ids]}} with ids = note_seq's one-hot index + 2 (our PAD=0, EOS=1).
`--num_random N` adds N more random pieces (for a wider check outside the fixture).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from collections.abc import Iterator

import mido
import numpy as np

NUM_SPECIAL = 2  # our PAD and EOS come before note_seq's 388 event classes


class _Stub(types.ModuleType):
  """Stands in for note_seq's audio/notebook imports, unused on the MIDI path."""

  def __getattr__(self, name: str) -> _Stub:
    if name.startswith("__"):
      raise AttributeError(name)
    return _Stub(name)

  def __call__(self, *args, **kwargs) -> None:
    return None


def _import_note_seq() -> types.ModuleType:
  for name in ("librosa", "librosa.core", "pandas", "bokeh", "bokeh.plotting", "bokeh.io",
               "bokeh.models", "IPython", "IPython.display", "pydub"):
    sys.modules.setdefault(name, _Stub(name))
  import note_seq
  return note_seq


# A piece: ppq, tempo map [(tick, bpm)], and per track a list of (tick, order, message).
Track = list[tuple[int, int, mido.Message]]


def _note(track: Track, start: int, length: int, pitch: int, velocity: int,
          off_as_zero_velocity: bool = True) -> None:
  off = (mido.Message("note_on", note=pitch, velocity=0) if off_as_zero_velocity
         else mido.Message("note_off", note=pitch, velocity=64))
  track += [(start, 1, mido.Message("note_on", note=pitch, velocity=velocity)),
            (start + length, 0, off)]


def _cc(track: Track, tick: int, number: int, value: int) -> None:
  track.append((tick, 0, mido.Message("control_change", control=number, value=value)))


def _write(path: str, ppq: int, tempos: list[tuple[int, float]], tracks: list[Track]) -> None:
  """Type-1 file: track 0 holds the tempo map, then one track per part (delta times)."""
  mid = mido.MidiFile(type=1, ticks_per_beat=ppq)
  meta = [(tick, 0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm)))
          for tick, bpm in tempos]
  for events in [meta, *tracks]:
    track, now = mido.MidiTrack(), 0
    for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
      track.append(message.copy(time=tick - now))
      now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    mid.tracks.append(track)
  mid.save(path)


def _chords() -> tuple:
  """Rolled and block chords, legato overlaps, exact 5 ms boundaries (ppq 400 at 120 bpm)."""
  t: Track = []
  tick = 40
  for i, root in enumerate([48, 53, 55, 60, 57, 62, 64, 50]):
    for j, interval in enumerate((0, 4, 7, 12)[: 3 + i % 2]):
      roll = (i % 3) * j * 4  # 0, 4 (= 5 ms), 8 ticks between chord notes
      _note(t, tick + roll, 380 + 20 * j, root + interval, 40 + 11 * ((i + j) % 8))
    tick += 360  # the next chord starts before this one ends
  _note(t, 4, 4, 90, 100)  # a 5 ms note starting at 5 ms: lands on half steps
  return 400, [(0, 120.0)], [t]


def _pedal() -> tuple:
  """Notes released under the pedal, re-struck under it, and a final chord the pedal
  holds past the last note's release (cc64 up long after)."""
  t: Track = []
  _cc(t, 0, 64, 0)
  for k in range(3):
    base = k * 1920
    _cc(t, base + 100, 64, 100)
    _note(t, base, 300, 60 + k, 70)
    _note(t, base + 240, 200, 64 + k, 80)
    _note(t, base + 600, 150, 60 + k, 90)  # re-struck while the pedal is down
    _note(t, base + 900, 1400, 67, 50 + 10 * k)  # held across the pedal lift
    _cc(t, base + 1200, 67, 127)  # soft pedal: ignored
    _cc(t, base + 1500, 64, 30)
    _cc(t, base + 1510, 64, 10)  # a second 'up' while up
  end = 3 * 1920
  _cc(t, end, 64, 127)
  for pitch in (36, 48, 55, 64, 72):
    _note(t, end + 10, 200, pitch, 96)
  _cc(t, end + 1900, 64, 0)
  return 480, [(0, 100.0)], [t]


def _restrike() -> tuple:
  """Same pitch overlapping, re-struck at the same tick, with and without the pedal."""
  t: Track = []
  _note(t, 0, 960, 60, 80)
  _note(t, 480, 960, 60, 60, off_as_zero_velocity=False)  # overlaps the first 60
  _note(t, 100, 50, 62, 70)
  _note(t, 100, 50, 62, 71)  # a double strike at one tick
  _cc(t, 1500, 64, 127)
  _note(t, 1500, 100, 65, 90)
  _note(t, 1700, 100, 65, 91)
  _note(t, 1700, 100, 67, 92)
  _note(t, 1800, 100, 65, 20)
  _cc(t, 2600, 64, 0)
  _note(t, 2600, 100, 65, 110)  # struck at the lift
  return 480, [(0, 120.0)], [t]


def _tempos() -> tuple:
  """Notes across tempo changes (120 -> 90 -> 150 -> 72 bpm), ppq 384."""
  t: Track = []
  rng = np.random.default_rng(3)
  for i in range(48):
    start = i * 150 + int(rng.integers(0, 40))
    _note(t, start, int(rng.integers(30, 500)), int(rng.integers(40, 90)),
          int(rng.integers(1, 128)))
  return 384, [(0, 120.0), (1800, 90.0), (3700, 150.0), (5500, 72.0)], [t]


def _two_hands() -> tuple:
  """Two tracks; the pedal is on the right hand's track only (sustain is per instrument)."""
  left: Track = []
  right: Track = []
  _cc(right, 0, 64, 127)
  for i in range(16):
    _note(left, i * 240, 100, 36 + (i * 5) % 12, 60)
    _note(right, i * 240 + 120, 60, 72 + (i * 7) % 12, 85)
  _cc(right, 16 * 240 + 500, 64, 0)
  return 480, [(0, 110.0)], [left, right]


def _pedal_never_lifted() -> tuple:
  """The pedal goes down and stays; the last event is a cc64 after every note has ended."""
  t: Track = []
  _cc(t, 50, 64, 127)
  for i in range(6):
    _note(t, i * 200, 100, 55 + 2 * i, 40 + 10 * i)
  _cc(t, 2400, 64, 127)
  return 480, [(0, 120.0)], [t]


def _random_piece(seed: int) -> tuple:
  """A dense random performance: two hands, chords, overlaps, pedal, odd tempos."""
  rng = np.random.default_rng(seed)
  ppq = int(rng.choice([220, 384, 480, 960]))
  tracks: list[Track] = [[], []]
  tick = 0
  for _ in range(int(rng.integers(120, 220))):
    tick += int(rng.choice([0, 0, 1, 3, 5, 30, 120, 300]))
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
      hand = int(rng.integers(0, 2))
      _note(tracks[hand], tick + int(rng.integers(0, 6)), int(rng.integers(1, 900)),
            int(rng.integers(24 + 36 * hand, 60 + 36 * hand)), int(rng.integers(1, 128)),
            off_as_zero_velocity=bool(rng.integers(0, 2)))
  for down in sorted(rng.integers(0, tick, size=8)):
    _cc(tracks[1], int(down), 64, int(rng.integers(64, 128)))
    _cc(tracks[1], int(down) + int(rng.integers(1, 2000)), 64, int(rng.integers(0, 64)))
  tempos = [(0, float(rng.uniform(60, 160)))]
  tempos += [(int(x), float(rng.uniform(60, 160))) for x in rng.integers(1, tick + 1, size=3)]
  return ppq, tempos, tracks


PIECES = {"chords": _chords, "pedal": _pedal, "restrike": _restrike, "tempos": _tempos,
          "two_hands": _two_hands, "pedal_never_lifted": _pedal_never_lifted,
          "random_0": lambda: _random_piece(0), "random_1": lambda: _random_piece(1)}


def note_seq_events(note_seq: types.ModuleType, data: bytes) -> list[int]:
  """Music Transformer's path: MIDI -> NoteSequence -> sustain -> 100 steps/s -> events."""
  from note_seq import performance_encoder_decoder as ped
  sequence = note_seq.midi_to_note_sequence(data)
  sequence = note_seq.apply_sustain_control_changes(sequence)
  quantized = note_seq.quantize_note_sequence_absolute(sequence, 100)
  performance = note_seq.Performance(quantized, num_velocity_bins=32, max_shift_steps=100)
  encoding = ped.PerformanceOneHotEncoding(num_velocity_bins=32, max_shift_steps=100)
  return [encoding.encode_event(event) + NUM_SPECIAL for event in performance]


def pieces(num_random: int) -> Iterator[tuple[str, tuple]]:
  yield from ((name, make()) for name, make in PIECES.items())
  for seed in range(100, 100 + num_random):
    yield f"extra_{seed}", _random_piece(seed)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory (tests/golden for the fixture)")
  parser.add_argument("--num_random", type=int, default=0, help="extra random pieces")
  args = parser.parse_args()
  note_seq = _import_note_seq()
  os.makedirs(os.path.join(args.out, "midi"), exist_ok=True)
  events = {}
  for name, (ppq, tempos, tracks) in pieces(args.num_random):
    path = os.path.join(args.out, "midi", f"{name}.mid")
    _write(path, ppq, tempos, tracks)
    with open(path, "rb") as f:
      events[name] = note_seq_events(note_seq, f.read())
  with open(os.path.join(args.out, "note_seq_events.json"), "w") as f:
    json.dump({"note_seq": "0.0.5", "files": events}, f, separators=(",", ":"))
    f.write("\n")
  print(f"wrote {len(events)} files, {sum(map(len, events.values()))} events to {args.out}")


if __name__ == "__main__":
  main()
