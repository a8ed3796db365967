"""Sustain pedal folded into note durations, exactly as Magenta note_seq does it.

Music Transformer and Perceiver AR's MAESTRO runs have no pedal events: the pedal
(cc64 >= 64 down, < 64 up) lengthens notes instead (note_seq's
`apply_sustain_control_changes`). Matching note_seq rule for rule keeps our event
sequences identical to the published encoding (tests/golden/note_seq_events.json):

* a note released while its instrument's pedal is down rings until the pedal lifts;
* while the pedal is down, striking a pitch again ends every ringing or held note of that
  pitch at the new onset (one string); a note left with no duration is dropped;
* notes still ringing when the events run out end at the last event of the file (a note
  on/off or cc64 of any instrument), not at the last note's release;
* at one instant: pedal down, pedal up, note on, note off (that order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

SUSTAIN_CONTROL = 64
_DOWN, _UP, _ON, _OFF = range(4)  # note_seq's processing order at one instant


class Pedal(NamedTuple):
  """One cc64 message of an instrument: time in seconds, value 0..127."""
  time: float
  value: int


class Track(NamedTuple):
  """One instrument: its notes (Note-like 4-tuples, file order) and its cc64 messages."""
  notes: Sequence[tuple]
  pedals: Sequence[Pedal]


def _events(tracks: Sequence[Track]) -> list[tuple[float, int, int, int]]:
  """(time, kind, track, note index) sorted stably by (time, kind), as note_seq sorts."""
  events = [(n[0], _ON, t, i) for t, tr in enumerate(tracks) for i, n in enumerate(tr.notes)]
  events += [(n[1], _OFF, t, i) for t, tr in enumerate(tracks) for i, n in enumerate(tr.notes)]
  events += [(p.time, _DOWN if p.value >= 64 else _UP, t, -1)
             for t, tr in enumerate(tracks) for p in tr.pedals]
  return sorted(events, key=lambda e: (e[0], e[1]))


def sustained_ends(tracks: Sequence[Track]) -> list[list[float | None]]:
  """New end time of every note per track (None: the note is dropped); see module doc."""
  ends: list[list[float | None]] = [[n[1] for n in tr.notes] for tr in tracks]
  active: list[list[int]] = [[] for _ in tracks]
  down = [False] * len(tracks)
  time = 0.0
  for time, kind, t, i in _events(tracks):
    notes = tracks[t].notes
    if kind in (_DOWN, _UP):
      down[t] = kind == _DOWN
      if kind == _UP:  # release what only the pedal held (its key is up already)
        ringing = [j for j in active[t] if ends[t][j] < time]
        for j in ringing:
          ends[t][j] = time
        active[t] = [j for j in active[t] if j not in ringing]
    elif kind == _ON:
      if down[t]:
        struck = [j for j in active[t] if notes[j][2] == notes[i][2]]
        for j in struck:
          ends[t][j] = None if notes[j][0] == time else time
        active[t] = [j for j in active[t] if j not in struck]
      active[t].append(i)
    elif not down[t] and i in active[t]:
      active[t].remove(i)
  for t, indices in enumerate(active):
    for j in indices:
      ends[t][j] = time
  return ends


def apply_sustain(tracks: Sequence[Track]) -> list[list]:
  """Each track's notes (NamedTuples with an `end` field) with sustained ends, in order."""
  ends = sustained_ends(tracks)
  return [[n._replace(end=e) for n, e in zip(t.notes, te, strict=True) if e is not None]
          for t, te in zip(tracks, ends, strict=True)]
