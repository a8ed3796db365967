"""What infer writes for a MIDI sample: prompt and continuation, each as .mid + piano roll.

A listener must know where the model starts: the continuation gets its own .mid (from
time 0) and the prompt its own `-prompt.mid`. A piano-roll PNG next to each lets a user
see stuck notes, silence or out-of-range pitches before listening. matplotlib is
imported on first use (Agg canvas, no display, no pyplot state). Paths may be gs://.
"""

from __future__ import annotations

import os

import numpy as np

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.tasks import midi


def _steps(events: midi.Tokens, vocab: midi.EventVocab) -> int:
  """Time steps the events span (their TIME_SHIFTs, up to EOS)."""
  steps = 0
  for token in np.asarray(events, np.int64).tolist():
    if token == midi.EOS_ID:
      break
    event = vocab.decode(token)
    steps += event[1] if event and event[0] is midi.EventType.TIME_SHIFT else 0
  return steps


def split_sample(prompt: midi.Tokens, continuation: midi.Tokens, *,
                 vocab: midi.EventVocab = midi.VOCAB) -> tuple[list[midi.Note], list[midi.Note]]:
  """(prompt notes, continuation notes from t=0).

  The continuation is decoded after its prompt, so the velocity in force and NOTE_OFFs
  of notes begun in the prompt carry over; a note belongs to the part it starts in
  (prompt notes still sounding at the cut end there).
  """
  prompt, continuation = np.asarray(prompt, np.int64), np.asarray(continuation, np.int64)
  cut = _steps(prompt, vocab)
  if midi.EOS_ID in prompt.tolist():
    return midi.events_to_notes(prompt, vocab=vocab, stop_at_eos=True), []
  full = midi.events_to_notes(np.concatenate([prompt, continuation]), vocab=vocab,
                              stop_at_eos=True)
  steps = [(round(n.start / vocab.step_s) - cut, round(n.end / vocab.step_s) - cut, n)
           for n in full]  # whole steps: times stay exact multiples of 10 ms
  later = [n._replace(start=a * vocab.step_s, end=b * vocab.step_s)
           for a, b, n in steps if a >= 0]
  return midi.events_to_notes(prompt, vocab=vocab), later


def piano_roll(notes: list[midi.Note], path: str, *, title: str) -> None:
  """A PNG of the notes: time across, pitch up, colour by velocity (local path)."""
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if notes:
    start, end, pitch, velocity = (np.asarray(x, np.float64) for x in zip(*notes, strict=True))
    colors = matplotlib.colormaps["viridis"](velocity / midi.MAX_VELOCITY)
    ax.barh(pitch, end - start, left=start, height=0.9, color=colors)
    ax.set_ylim(min(pitch.min(), 21) - 1, max(pitch.max(), 108) + 1)  # the piano's keys
  ax.set(xlabel="seconds", ylabel="MIDI pitch", title=title)
  fig.tight_layout()
  fig.savefig(path, format="png")


def write_sample(stem: str, prompt: midi.Tokens, continuation: midi.Tokens) -> dict[str, str]:
  """Writes `<stem>.mid/.png` (continuation) and `<stem>-prompt.mid/.png`.

  Returns the jsonl fields naming them: midi, piano_roll, prompt_midi, prompt_piano_roll.
  """
  prompt_notes, notes = split_sample(prompt, continuation)
  fields = {}
  for key, suffix, part, label in [("", "", notes, "continuation"),
                                   ("prompt_", "-prompt", prompt_notes, "prompt")]:
    title = f"{os.path.basename(stem)} {label}: {len(part)} notes"
    for field, ext, write in [("midi", ".mid", lambda p, n=part: midi.notes_to_midi(n, p)),
                              ("piano_roll", ".png",
                               lambda p, n=part, t=title: piano_roll(n, p, title=t))]:
      fileio.write_via_local(stem + suffix + ext, write)
      fields[key + field] = os.path.basename(stem + suffix + ext)
  return fields
