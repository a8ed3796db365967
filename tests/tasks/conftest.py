"""Fixtures for the task tests: clean data locations, a SentencePiece model, MIDI files."""

import os

import pretty_midi
import pytest
import seqio

from perceiver_ar_t5x.tasks import locations

SEQIO_SPM = os.path.join(os.path.dirname(seqio.__file__),
                         "test_data", "sentencepiece", "sentencepiece.model")


@pytest.fixture(autouse=True)
def clean_locations(monkeypatch):
  """Every test starts with no configured location and none in the environment."""
  for var in locations.ENV_VARS.values():
    monkeypatch.delenv(var, raising=False)
  locations.reset()
  yield
  locations.reset()


@pytest.fixture
def spm_path() -> str:
  return SEQIO_SPM


def _write_midi(path, notes) -> None:
  pm = pretty_midi.PrettyMIDI()
  piano = pretty_midi.Instrument(program=0)
  piano.notes = [pretty_midi.Note(int(v), int(p), float(s), float(e)) for s, e, p, v in notes]
  pm.instruments.append(piano)
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  pm.write(str(path))


@pytest.fixture
def write_midi():
  """write_midi(path, notes): notes are (start_s, end_s, pitch, velocity), one piano."""
  return _write_midi
