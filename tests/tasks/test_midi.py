"""Tests for the MIDI performance-event tokenizer (real .mid files, CPU, no jax)."""

from __future__ import annotations

import json
import pathlib
import pickle

import numpy as np
import pretty_midi
import pytest

from perceiver_ar_t5x.tasks import midi, sustain
from perceiver_ar_t5x.tasks.midi import EventType, Note

V = midi.VOCAB
GOLDEN = pathlib.Path(__file__).parents[1] / "golden"
NOTE_SEQ = json.loads((GOLDEN / "note_seq_events.json").read_text())["files"]


def _write_midi(path, notes, control_changes=(), drums=()) -> None:
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(int(v), int(p), float(s), float(e)) for s, e, p, v in notes]
    piano.control_changes = [pretty_midi.ControlChange(64, v, t) for t, v in control_changes]
    pm.instruments.append(piano)
    if drums:
        kit = pretty_midi.Instrument(program=0, is_drum=True)
        kit.notes = [pretty_midi.Note(int(v), int(p), s, e) for s, e, p, v in drums]
        pm.instruments.append(kit)
    pm.write(str(path))


def _random_notes(rng: np.random.Generator, num_pitches: int = 6) -> list[Note]:
    """Non-overlapping per pitch, >= 50 ms long and apart, so the MIDI is unambiguous."""
    notes = []
    for pitch in rng.choice(np.arange(21, 109), size=num_pitches, replace=False):
        t = float(rng.uniform(0.0, 0.5))
        for _ in range(int(rng.integers(1, 5))):
            end = t + float(rng.uniform(0.05, 1.5))
            notes.append(Note(t, end, int(pitch), int(rng.integers(1, 128))))
            t = end + float(rng.uniform(0.05, 2.5))
    return notes


def _shift(steps: int) -> int:
    return V.encode(EventType.TIME_SHIFT, steps)


def test_vocab_size_and_disjoint_ranges():
    assert V.size == 390
    ranges = [V.ranges[kind] for kind in EventType]
    assert [len(r) for r in ranges] == [128, 128, 100, 32]
    ids = [i for r in ranges for i in r]
    assert sorted(ids) == list(range(2, 390))  # disjoint, contiguous, after PAD=0 and EOS=1
    assert (midi.PAD_ID, midi.EOS_ID) == (0, 1)
    for token in range(-3, 395):
        event = V.decode(token)
        assert (event is None) == (token < 2 or token >= 390)
        if event is not None:
            assert V.encode(*event) == token


def test_golden_two_notes():
    notes = [Note(0.0, 0.5, 60, 80), Note(0.25, 1.0, 64, 100)]
    # vel bin 19, on 60, +250ms, vel bin 24, on 64, +250ms, off 60, +500ms, off 64
    expected = np.array([377, 62, 282, 382, 66, 282, 190, 307, 194], dtype=np.int32)
    events = midi.notes_to_events(notes)
    assert events.dtype == np.int32
    np.testing.assert_array_equal(events, expected)
    decoded = midi.events_to_notes(events)
    assert decoded == [Note(0.0, 0.5, 60, 77), Note(0.25, 1.0, 64, 97)]


def test_round_trip_through_midi_files(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(3):
        notes = _random_notes(rng)
        _write_midi(tmp_path / f"in{trial}.mid", [tuple(n) for n in notes])
        events = midi.midi_file_to_events(tmp_path / f"in{trial}.mid")
        midi.events_to_midi(events, tmp_path / f"out{trial}.mid")
        got = midi.load_midi(tmp_path / f"out{trial}.mid")
        want = sorted(notes, key=lambda n: (n.start, n.pitch))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.pitch == w.pitch
            assert abs(g.start - w.start) <= 0.01
            assert abs(g.end - w.end) <= 0.01
            assert V.velocity_to_bin(g.velocity) == V.velocity_to_bin(w.velocity)


def test_long_gap_splits_into_several_time_shifts():
    events = midi.notes_to_events([Note(0.0, 0.1, 60, 64), Note(2.5, 2.6, 60, 64)])
    off, on = V.encode(EventType.NOTE_OFF, 60), V.encode(EventType.NOTE_ON, 60)
    vel = V.encode(EventType.VELOCITY, V.velocity_to_bin(64))
    want = [vel, on, _shift(10), off, _shift(100), _shift(100), _shift(40), on, _shift(10), off]
    np.testing.assert_array_equal(events, want)


def test_note_off_before_note_on_and_velocity_only_on_change():
    events = midi.notes_to_events([Note(0.0, 0.5, 60, 65), Note(0.5, 1.0, 60, 68)])
    off, on = V.encode(EventType.NOTE_OFF, 60), V.encode(EventType.NOTE_ON, 60)
    vel = V.encode(EventType.VELOCITY, V.velocity_to_bin(65))  # 65 and 68 share a bin
    np.testing.assert_array_equal(events, [vel, on, _shift(50), off, on, _shift(50), off])
    assert len(midi.events_to_notes(events)) == 2


def test_sustain_pedal_extends_notes(tmp_path):
    path = tmp_path / "pedal.mid"
    notes = [(0.0, 0.5, 60, 90), (0.0, 2.0, 72, 90), (1.0, 1.2, 60, 90), (3.0, 3.5, 64, 90)]
    _write_midi(path, notes, control_changes=[(0.2, 127), (1.5, 0)], drums=[(0, 1, 36, 100)])
    plain = midi.load_midi(path, apply_sustain=False)
    held = midi.load_midi(path)
    assert [n.pitch for n in held] == [60, 72, 60, 64]  # the drum note is dropped
    ends = {(round(n.start, 2), n.pitch): round(n.end, 2) for n in held}
    # 60 rings until re-struck at 1.0; the re-strike rings until the pedal lifts at 1.5;
    # 72 is released after the lift and 64 is played after it, so both are unchanged.
    assert ends == {(0.0, 60): 1.0, (0.0, 72): 2.0, (1.0, 60): 1.5, (3.0, 64): 3.5}
    assert [round(n.end, 2) for n in plain] == [0.5, 2.0, 1.2, 3.5]


def test_pedal_never_lifted_holds_to_the_last_event():
    notes = [Note(0.0, 0.5, 60, 90), Note(0.0, 3.0, 67, 90)]
    pedal = [sustain.Pedal(0.1, 127)]
    assert sustain.sustained_ends([sustain.Track(notes, pedal)]) == [[3.0, 3.0]]
    late = [sustain.Track(notes, pedal), sustain.Track([], [sustain.Pedal(4.0, 127)])]
    assert sustain.sustained_ends(late) == [[4.0, 4.0], []]  # any instrument's cc64 counts


def test_pedal_held_past_the_last_release_ends_the_final_chord_at_the_lift(tmp_path):
    """The case that cut the final chord short in about half of the real files."""
    path = tmp_path / "final.mid"
    _write_midi(path, [(0.0, 0.3, 60, 80), (0.0, 0.3, 64, 80)], control_changes=[
        (0.1, 127), (2.0, 0)])
    assert [n.end for n in midi.load_midi(path)] == [2.0, 2.0]


def test_restrike_under_the_pedal_cuts_a_held_note_only_while_the_pedal_is_down():
    notes = [Note(0.0, 2.0, 60, 90), Note(1.0, 1.5, 60, 90), Note(3.0, 5.0, 62, 90),
             Note(4.0, 4.5, 62, 90), Note(6.0, 6.5, 64, 90), Note(6.0, 6.2, 64, 91)]
    pedal = [sustain.Pedal(0.5, 100), sustain.Pedal(2.5, 0), sustain.Pedal(5.9, 64)]
    # 60 held and re-struck under the pedal: cut at 1.0; the re-strike rings to the lift.
    # 62 re-struck with the pedal up: both kept. 64 struck twice at once: one survives.
    assert sustain.sustained_ends([sustain.Track(notes, pedal)]) == [
        [1.0, 2.5, 5.0, 4.5, None, 6.5]]


@pytest.mark.parametrize("name", sorted(NOTE_SEQ))
def test_events_equal_note_seq_performance_encoding(name):
    """Token for token against note_seq 0.0.5 (scripts/make_note_seq_fixtures.py)."""
    got = midi.midi_file_to_events(GOLDEN / "midi" / f"{name}.mid").tolist()
    assert got == NOTE_SEQ[name]


@pytest.mark.parametrize("name", ["chords", "pedal", "restrike", "two_hands", "random_0"])
def test_golden_round_trip_keeps_every_note(tmp_path, name):
    """.mid -> events -> .mid: every (pedalled, overlapping) note within 10 ms and its bin."""
    want = midi.load_midi(GOLDEN / "midi" / f"{name}.mid")
    midi.events_to_midi(midi.midi_file_to_events(GOLDEN / "midi" / f"{name}.mid"),
                        tmp_path / "out.mid")
    got = midi.load_midi(tmp_path / "out.mid", apply_sustain=False)

    def steps(n: Note, quantize) -> tuple:  # what the events can say about a note
        start = quantize(n.start)
        return start, n.pitch, max(quantize(n.end), start + 1), V.velocity_to_bin(n.velocity)

    want = sorted(want, key=lambda n: steps(n, V.quantize))
    got = sorted(got, key=lambda n: steps(n, lambda t: round(t * 100)))
    assert [steps(n, lambda t: round(t * 100)) for n in got] == [
        steps(n, V.quantize) for n in want]
    for g, w in zip(got, want, strict=True):
        assert abs(g.start - w.start) <= 0.01
        assert abs(g.end - w.end) <= 0.01 or (w.end - w.start < 0.01 and
                                              abs(g.end - g.start - 0.01) < 0.003)
        assert V.velocity_to_bin(g.velocity) == V.velocity_to_bin(w.velocity)


def test_decoding_arbitrary_tokens_never_crashes(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(200):
        tokens = rng.integers(-5, V.size + 5, size=int(rng.integers(0, 300)))
        notes = midi.events_to_notes(tokens)
        assert all(n.end > n.start >= 0 and 0 <= n.pitch < 128 for n in notes)
        assert all(1 <= n.velocity <= 127 for n in notes)
        if i < 5:
            midi.events_to_midi(tokens, tmp_path / f"sample{i}.mid")
    assert midi.events_to_notes([]) == []


def test_decoding_edge_cases():
    on, off = V.encode(EventType.NOTE_ON, 60), V.encode(EventType.NOTE_OFF, 60)
    # stray off, then an on left open until the final time; PAD/EOS/out-of-range ignored
    tokens = [off, 0, on, 1, _shift(30), 999, -1, V.encode(EventType.NOTE_ON, 62)]
    assert midi.events_to_notes(tokens) == [Note(0.0, 0.3, 60, midi.DEFAULT_VELOCITY)]
    assert midi.events_to_notes([on, midi.EOS_ID, _shift(30)], stop_at_eos=True) == []
    with pytest.raises(ValueError, match="1-D integer"):
        midi.events_to_notes(np.zeros([2, 3], np.int32))


def test_transpose_shifts_pitches_and_drops_out_of_range():
    notes = [Note(0.0, 0.5, 60, 80), Note(0.2, 1.0, 126, 80), Note(1.5, 2.0, 64, 80)]
    events = midi.notes_to_events(notes)
    up = midi.events_to_notes(midi.transpose(events, 3))
    assert [(n.start, n.end, n.pitch) for n in up] == [(0.0, 0.5, 63), (1.5, 2.0, 67)]
    down = midi.events_to_notes(midi.transpose(events, -2))
    assert [n.pitch for n in down] == [58, 124, 62]
    assert [n.pitch for n in midi.transpose_notes(notes, 3)] == [63, 67]


def test_time_stretch_scales_times():
    notes = [Note(1.0, 2.0, 60, 80), Note(0.5, 0.75, 62, 90)]
    stretched = midi.time_stretch(notes, 1.5)
    assert stretched == [Note(1.5, 3.0, 60, 80), Note(0.75, 1.125, 62, 90)]
    with pytest.raises(ValueError, match="factor"):
        midi.time_stretch(notes, 0.0)


def test_augment_is_deterministic_given_rng():
    notes = [Note(1.0, 2.0, 60, 80), Note(0.5, 0.75, 62, 90)]
    a = midi.augment(notes, np.random.default_rng(7))
    b = midi.augment(notes, np.random.default_rng(7))
    assert a == b
    semitones = a[0].pitch - 60
    assert -3 <= semitones <= 3
    assert a[1].pitch - 62 == semitones
    assert 0.95 <= a[0].start <= 1.05
    assert a[1].end / a[1].start == pytest.approx(1.5)
    fixed = midi.augment(notes, np.random.default_rng(0), transpose_range=(2, 2),
                         stretch_range=(2.0, 2.0))
    assert fixed == [Note(2.0, 4.0, 62, 80), Note(1.0, 1.5, 64, 90)]


def test_notes_to_events_rejects_bad_notes():
    with pytest.raises(ValueError, match="pitch"):
        midi.notes_to_events([Note(0.0, 1.0, 128, 80)])
    with pytest.raises(ValueError, match="start <= end"):
        midi.notes_to_events([Note(1.0, 0.5, 60, 80)])


def _real_midi_bytes(tmp_path) -> bytes:
    path = tmp_path / "real.mid"
    _write_midi(path, [(0.1 * i, 0.1 * i + 0.3, 60 + i, 80) for i in range(20)])
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_corrupt_files_raise_corrupt_midi_error(tmp_path, kind):
    real = _real_midi_bytes(tmp_path)
    data = {"random": np.random.default_rng(0).bytes(200), "empty": b"",
            "truncated": real[: len(real) // 2]}[kind]
    path = tmp_path / f"{kind}.mid"
    path.write_bytes(data)
    with pytest.raises(midi.CorruptMidiError) as info:
        midi.load_midi(path)
    message = str(info.value)
    assert message.startswith(f"corrupt MIDI file {path}: ")
    assert "\n" not in message
    assert info.value.path == str(path)
    assert info.value.reason
    assert str(pickle.loads(pickle.dumps(info.value))) == message
    with pytest.raises(midi.CorruptMidiError, match="<bytes>"):
        midi.midi_bytes_to_events(data)
    empty = midi.midi_bytes_to_events(data, empty_on_error=True)
    assert empty.shape == (0,)
    assert empty.dtype == np.int32


def test_midi_bytes_to_events_matches_file_path(tmp_path):
    data = _real_midi_bytes(tmp_path)
    events = midi.midi_bytes_to_events(np.bytes_(data))  # what tf.numpy_function passes
    np.testing.assert_array_equal(events, midi.midi_file_to_events(tmp_path / "real.mid"))
    shifted = midi.midi_bytes_to_events(data, np.int32(2), np.float32(2.0))
    notes = midi.events_to_notes(shifted)
    assert notes[0].pitch == 62
    assert notes[1].start == pytest.approx(0.2)
