"""MIDI <-> performance-event tokens, the piano vocabulary of Perceiver AR's Maestro runs.

The events are those of Oore et al. 2018 ("This Time with Feeling"), used by Music
Transformer (Huang et al. 2018) and Perceiver AR (Hawthorne et al. 2022): NOTE_ON/NOTE_OFF
per pitch, TIME_SHIFT in 10 ms steps up to 1 s, and a VELOCITY bin that holds until changed.
Ids 0/1 are PAD/EOS (SeqIO's); ids 2.. are note_seq's 388 classes, and the events equal
note_seq's performance encoding token for token (tests/golden/note_seq_events.json).
Notes are `Note(start, end, pitch, velocity)` in seconds; non-drum instruments merge.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import io
import itertools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pretty_midi

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.tasks import sustain

PAD_ID, EOS_ID, NUM_SPECIAL = 0, 1, 2
MAX_VELOCITY = 127
DEFAULT_VELOCITY = 64  # for NOTE_ONs decoded before any VELOCITY event, as in Magenta


class Note(NamedTuple):
    """One sounding note; seconds, like pretty_midi. Plain 4-tuples are accepted too."""
    start: float
    end: float
    pitch: int
    velocity: int


class EventType(enum.Enum):
    NOTE_ON = "note_on"  # value = pitch
    NOTE_OFF = "note_off"  # value = pitch
    TIME_SHIFT = "time_shift"  # value = number of steps, 1..max_shift_steps
    VELOCITY = "velocity"  # value = bin, 0..num_velocity_bins - 1


@dataclasses.dataclass(frozen=True)
class EventVocab:
    """Id layout: PAD, EOS, NOTE_ON x128, NOTE_OFF x128, TIME_SHIFT x100, VELOCITY x32."""
    num_pitches: int = 128
    max_shift_steps: int = 100
    num_velocity_bins: int = 32
    steps_per_second: int = 100

    @property
    def step_s(self) -> float:
        return 1 / self.steps_per_second

    def quantize(self, seconds: float) -> int:
        """Seconds -> nearest step, half up, computed as note_seq's quantize_to_step does."""
        return int(seconds * self.steps_per_second + 0.5)

    @property
    def size(self) -> int:
        return NUM_SPECIAL + 2 * self.num_pitches + self.max_shift_steps + self.num_velocity_bins

    @functools.cached_property  # fine when frozen (writes __dict__); decode is per token
    def ranges(self) -> dict[EventType, range]:
        """Ids of each event type, contiguous, in EventType order, tiling [2, size)."""
        counts = [self.num_pitches, self.num_pitches, self.max_shift_steps, self.num_velocity_bins]
        bounds = list(itertools.accumulate(counts, initial=NUM_SPECIAL))
        return {k: range(a, b) for k, a, b in zip(EventType, bounds, bounds[1:], strict=False)}

    def encode(self, kind: EventType, value: int) -> int:
        """Event -> id; TIME_SHIFT values count steps from 1, so they sit one id lower."""
        index, ids = value - (kind is EventType.TIME_SHIFT), self.ranges[kind]
        if not 0 <= index < len(ids):
            raise ValueError(f"{kind.name} value must map into {len(ids)} ids, got {value}")
        return ids[index]

    def decode(self, token: int) -> tuple[EventType, int] | None:
        """Id -> (type, value), or None for PAD, EOS and ids outside the vocabulary."""
        for kind, ids in self.ranges.items():
            if token in ids:
                return kind, token - ids.start + (kind is EventType.TIME_SHIFT)
        return None

    def velocity_to_bin(self, velocity: int) -> int:
        """MIDI velocity 1..127 -> bin (Magenta's binning; 4 velocities a bin for 32)."""
        width = math.ceil(MAX_VELOCITY / self.num_velocity_bins)
        return (min(max(int(velocity), 1), MAX_VELOCITY) - 1) // width

    def bin_to_velocity(self, velocity_bin: int) -> int:
        """Lowest velocity of a bin, so bin -> velocity -> bin is the identity."""
        width = math.ceil(MAX_VELOCITY / self.num_velocity_bins)
        return min(velocity_bin * width + 1, MAX_VELOCITY)


VOCAB = EventVocab()
Tokens = Sequence[int] | np.ndarray  # 1-D integer ids


class CorruptMidiError(Exception):
    """A MIDI file pretty_midi cannot parse; the pipeline can skip it and count it."""
    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # args stay (path, reason), so it pickles
        self.path, self.reason = path, " ".join(reason.split())  # one line for logs

    def __str__(self) -> str:
        return f"corrupt MIDI file {self.path}: {self.reason}"


def _bytes_to_notes(data: bytes, source: str, apply_sustain: bool) -> list[Note]:
    """Notes sorted stably by (start, pitch) from file order, as note_seq's Performance does."""
    try:
        pm = pretty_midi.PrettyMIDI(io.BytesIO(data))
    except Exception as e:  # mido/pretty_midi raise EOFError, OSError, KeyError, ...
        detail = str(e) or ("unexpected end of data" if isinstance(e, EOFError) else "no detail")
        raise CorruptMidiError(source, f"{detail} ({type(e).__name__})") from e
    tracks = [sustain.Track(
        [] if inst.is_drum else [Note(n.start, n.end, n.pitch, n.velocity) for n in inst.notes],
        [sustain.Pedal(c.time, c.value) for c in inst.control_changes
         if c.number == sustain.SUSTAIN_CONTROL]) for inst in pm.instruments]
    # A drum "pitch" is no key; a drum's pedal only moves the final time, as in note_seq.
    notes = sustain.apply_sustain(tracks) if apply_sustain else [t.notes for t in tracks]
    return sorted((n for track in notes for n in track), key=lambda n: (n.start, n.pitch))


def load_midi(path: str | os.PathLike, *, apply_sustain: bool = True) -> list[Note]:
    """Reads a .mid file (local or gs://); CorruptMidiError if unparsable, else fileio.Error."""
    with fileio.gfile.GFile(os.fspath(path), "rb") as f:
        return _bytes_to_notes(f.read(), os.fspath(path), apply_sustain)


def _check_note(n: Note, vocab: EventVocab) -> None:
    if not (0 <= n.pitch < vocab.num_pitches and 0 <= n.velocity <= MAX_VELOCITY
            and 0 <= n.start <= n.end < math.inf):
        raise ValueError("expected 0 <= start <= end < inf, pitch in [0, "
                         f"{vocab.num_pitches}), velocity in [0, {MAX_VELOCITY}]; got {n}")


def notes_to_events(notes: Sequence[Note], *, vocab: EventVocab = VOCAB) -> np.ndarray:
    """Notes -> int32 ids [num_events], from t=0 (leading silence is kept), without EOS.

    note_seq's Performance, rule for rule: times snap half-up to 10 ms steps, notes last
    >= 1 step; notes rank by (start seconds, pitch), stably; within a step events follow
    that rank (in effect all NOTE_OFFs, then NOTE_ONs in onset order). VELOCITY precedes a
    NOTE_ON whose bin differs from the last one. Gaps over 1 s take several TIME_SHIFTs.
    """
    ranked = sorted((Note(*n) for n in notes), key=lambda n: (n.start, n.pitch))
    points = []  # (step, rank, is_off): note_seq's sort key
    for rank, n in enumerate(ranked):
        _check_note(n, vocab)
        start, end = vocab.quantize(n.start), vocab.quantize(n.end)
        points += [(start, rank, False), (end if end > start else start + 1, rank, True)]
    events: list[int] = []
    step, velocity_bin = 0, None
    for at, rank, is_off in sorted(points):
        full, rest = divmod(at - step, vocab.max_shift_steps)
        events += [vocab.encode(EventType.TIME_SHIFT, vocab.max_shift_steps)] * full
        events += [vocab.encode(EventType.TIME_SHIFT, rest)] if rest else []
        step, pitch = at, int(ranked[rank].pitch)
        if not is_off and vocab.velocity_to_bin(ranked[rank].velocity) != velocity_bin:
            velocity_bin = vocab.velocity_to_bin(ranked[rank].velocity)
            events.append(vocab.encode(EventType.VELOCITY, velocity_bin))
        events.append(vocab.encode(EventType.NOTE_OFF if is_off else EventType.NOTE_ON, pitch))
    return np.asarray(events, dtype=np.int32)


def _checked_tokens(events: Tokens) -> np.ndarray:
    tokens = np.asarray(events)
    if tokens.ndim != 1 or not (tokens.size == 0 or np.issubdtype(tokens.dtype, np.integer)):
        raise ValueError(f"expected a 1-D integer token array, got {tokens.dtype}{tokens.shape}")
    return tokens.astype(np.int64)


def events_to_notes(events: Tokens, *, vocab: EventVocab = VOCAB,
                    stop_at_eos: bool = False) -> list[Note]:
    """Ids -> notes sorted by (start, pitch); never fails on any 1-D integer sequence.

    Model samples are arbitrary, so PAD, EOS (unless stop_at_eos) and unknown ids are
    skipped, a NOTE_OFF closes the earliest open note of its pitch (or is ignored if none
    is open), notes open at the end close at the final time, and zero-length notes drop.
    """
    step, velocity = 0, DEFAULT_VELOCITY
    open_notes: dict[int, list[tuple[int, int]]] = {}  # pitch -> [(start_step, velocity)]
    spans: list[tuple[int, int, int, int]] = []
    for token in _checked_tokens(events).tolist():
        if stop_at_eos and token == EOS_ID:
            break
        kind, value = vocab.decode(token) or (None, 0)  # PAD, EOS, unknown: no-op
        if kind is EventType.TIME_SHIFT:
            step += value
        elif kind is EventType.VELOCITY:
            velocity = vocab.bin_to_velocity(value)
        elif kind is EventType.NOTE_ON:
            open_notes.setdefault(value, []).append((step, velocity))
        elif kind is EventType.NOTE_OFF and open_notes.get(value):
            start, note_velocity = open_notes[value].pop(0)
            spans.append((start, step, value, note_velocity))
    spans += [(s, step, p, v) for p, starts in open_notes.items() for s, v in starts]
    notes = [Note(s * vocab.step_s, e * vocab.step_s, p, v) for s, e, p, v in spans if e > s]
    return sorted(notes, key=lambda n: (n.start, n.pitch, n.end))


def notes_to_midi(notes: Sequence[Note], path: str | os.PathLike | None = None, *,
                  program: int = 0) -> pretty_midi.PrettyMIDI:
    """Notes -> PrettyMIDI (program 0 = grand piano), written to a local path if given.

    A MIDI note-off ends every sounding note of its key, so a note starting while one of
    its pitch sounds goes to another instrument (channel): it reads back as the events say.
    """
    pm, busy = pretty_midi.PrettyMIDI(), []  # per instrument: pitch -> end of its last note
    for start, end, pitch, velocity in sorted(notes, key=lambda n: (n[0], n[2], n[1])):
        voice = next((i for i, b in enumerate(busy) if b.get(pitch, -1.0) <= start), len(busy))
        if voice == len(busy):
            busy.append({})
            pm.instruments.append(pretty_midi.Instrument(program=program))
        busy[voice][pitch] = end
        pm.instruments[voice].notes.append(pretty_midi.Note(velocity, pitch, start, end))
    pm.instruments = pm.instruments or [pretty_midi.Instrument(program=program)]
    if path is not None:
        pm.write(os.fspath(path))
    return pm


def events_to_midi(events: Tokens, path: str | os.PathLike | None = None, *,
                   vocab: EventVocab = VOCAB, program: int = 0,
                   stop_at_eos: bool = True) -> pretty_midi.PrettyMIDI:
    """Ids up to EOS -> PrettyMIDI via notes_to_midi (a sample's tail after EOS is no music)."""
    return notes_to_midi(events_to_notes(events, vocab=vocab, stop_at_eos=stop_at_eos), path,
                         program=program)


def transpose(events: Tokens, semitones: int, *, vocab: EventVocab = VOCAB) -> np.ndarray:
    """Shifts NOTE_ON/NOTE_OFF ids by `semitones`; other ids are kept as they are.

    Notes pushed outside [0, num_pitches) are dropped (both ids), not clamped: clamping
    folds distinct pitches onto one key and mispairs NOTE_OFFs. Other notes keep timing.
    """
    tokens = _checked_tokens(events)
    shifted, keep = tokens.copy(), np.ones(tokens.shape, dtype=bool)
    for kind in (EventType.NOTE_ON, EventType.NOTE_OFF):
        ids = vocab.ranges[kind]
        is_kind = (tokens >= ids.start) & (tokens < ids.stop)
        in_range = (tokens + semitones >= ids.start) & (tokens + semitones < ids.stop)
        shifted = np.where(is_kind, tokens + semitones, shifted)
        keep &= ~is_kind | in_range
    return shifted[keep].astype(np.int32)


def transpose_notes(notes: Sequence[Note], semitones: int) -> list[Note]:
    """Note-level `transpose`, with the same rule: notes leaving [0, 127] are dropped."""
    moved = [Note(*n)._replace(pitch=int(n[2]) + semitones) for n in notes]
    return [n for n in moved if 0 <= n.pitch <= 127]


def time_stretch(notes: Sequence[Note], factor: float) -> list[Note]:
    """Scales all times by `factor` (> 1 slows down); apply before quantising to steps."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"time-stretch factor must be finite and > 0, got {factor}")
    return [Note(*n)._replace(start=n[0] * factor, end=n[1] * factor) for n in notes]


def augment(notes: Sequence[Note], rng: np.random.Generator, *,
            transpose_range: tuple[int, int] = (-3, 3),
            stretch_range: tuple[float, float] = (0.95, 1.05)) -> list[Note]:
    """Random integer transposition (inclusive) and uniform stretch, Music Transformer's
    ranges by default (it drew the stretch from five values; here it is continuous)."""
    if transpose_range[0] > transpose_range[1] or stretch_range[0] > stretch_range[1]:
        raise ValueError(f"ranges must be (low, high), got {transpose_range}, {stretch_range}")
    semitones = int(rng.integers(transpose_range[0], transpose_range[1], endpoint=True))
    factor = float(rng.uniform(stretch_range[0], stretch_range[1]))
    return time_stretch(transpose_notes(notes, semitones), factor)


def midi_file_to_events(path: str | os.PathLike, *, apply_sustain: bool = True,
                        vocab: EventVocab = VOCAB) -> np.ndarray:  # [num_events] int32
    return notes_to_events(load_midi(path, apply_sustain=apply_sustain), vocab=vocab)


def midi_bytes_to_events(data: bytes, semitones: int = 0, stretch: float = 1.0, *,
                         apply_sustain: bool = True, empty_on_error: bool = False,
                         vocab: EventVocab = VOCAB) -> np.ndarray:
    """File contents -> int32 ids [num_events], for tf.numpy_function in a SeqIO task.

    Augmentation args are positional so tf can pass sampled tensors: `tf.numpy_function(
    midi_bytes_to_events, [contents, semitones, stretch], tf.int32)`. empty_on_error turns
    a corrupt file into an empty array to filter (and count) instead of a pipeline error.
    """
    try:
        notes = _bytes_to_notes(bytes(data), "<bytes>", apply_sustain)
    except CorruptMidiError:
        if empty_on_error:
            return np.zeros([0], dtype=np.int32)
        raise
    notes = transpose_notes(time_stretch(notes, float(stretch)), int(semitones))
    return notes_to_events(notes, vocab=vocab)
