r"""Baselines beside a model's whole-split score: a unigram model and xz, on the same documents.

  python benchmarks/baselines.py --task text_bytes --data /data/my_corpus
  python benchmarks/baselines.py --task maestro_midi --data /data/midi

Documents are the task's own split files, tokenized as the task does (bytes for
text_bytes, note_seq performance events for maestro_midi), each followed by EOS,
which is what whole-split eval scores. Three numbers, all over every token of every
validation document:
  * unigram: -log2 p(token) with p fitted on the train split (add-one smoothing);
  * xz: 8 x compressed size of the validation split alone (`xz -9e`), per byte/event;
  * xz | train: compressed(train + validation) - compressed(train): what a compressor
    that has read the training split needs for the validation split.
Bits per byte for text (unigram and model count EOS bits too; xz compresses the bytes);
bits per event for MIDI (events as 16-bit ids). Writes benchmarks/results/baselines_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import pathlib
import time

import numpy as np

from perceiver_ar_t5x import startup

startup.quiet_tensorflow()

from perceiver_ar_t5x import tasks  # noqa: E402
from perceiver_ar_t5x.tasks import files, maestro, midi, text  # noqa: E402

_XZ = lzma.PRESET_EXTREME | 9


def _documents(task: str, split: str) -> list[np.ndarray]:
  """Token ids of every readable document of `split` (EOS not included)."""
  if task == "text_bytes":
    return [np.frombuffer(files.read_bytes(p), np.uint8).astype(np.int64)
            for p in text.text_file_paths(split, task=task)]
  docs = []
  for path in maestro.midi_paths(split, task=task):
    try:
      docs.append(np.asarray(midi.midi_file_to_events(path), np.int64))
    except midi.CorruptMidiError:
      continue
  return [d for d in docs if d.size]


def _raw(docs: list[np.ndarray], task: str) -> bytes:
  dtype = np.uint8 if task == "text_bytes" else np.uint16
  return b"".join(d.astype(dtype).tobytes() for d in docs)


def _unigram_bits(train: list[np.ndarray], valid: list[np.ndarray]) -> float:
  eos = int(max(d.max() for d in train + valid)) + 1  # an id of its own for EOS
  counts = np.ones(eos + 1)
  for d in train:
    counts += np.bincount(d, minlength=eos + 1)
  counts[eos] += len(train)
  logp = np.log2(counts / counts.sum())
  return float(-sum(logp[d].sum() + logp[eos] for d in valid))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", choices=("text_bytes", "maestro_midi"), required=True)
  parser.add_argument("--data", required=True, help="TEXT_FILES or MAESTRO_DIR")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  key = "text_files" if args.task == "text_bytes" else "maestro_dir"
  tasks.configure(task=args.task, **{key: args.data})
  t0 = time.time()
  train, valid = _documents(args.task, "train"), _documents(args.task, "validation")
  units = sum(d.size for d in valid)  # bytes (text) or events (MIDI)
  raw_train, raw_valid = _raw(train, args.task), _raw(valid, args.task)
  xz_valid = len(lzma.compress(raw_valid, preset=_XZ))
  xz_given = (len(lzma.compress(raw_train + raw_valid, preset=_XZ))
              - len(lzma.compress(raw_train, preset=_XZ)))
  unit = "byte" if args.task == "text_bytes" else "event"
  result = {
      "task": args.task, "data": os.path.abspath(args.data),
      "train_documents": len(train), "validation_documents": len(valid),
      f"validation_{unit}s": units, "validation_tokens_with_eos": units + len(valid),
      f"unigram_bits_per_{unit}": _unigram_bits(train, valid) / units,
      f"xz_bits_per_{unit}": 8 * xz_valid / units,
      f"xz_given_train_bits_per_{unit}": 8 * xz_given / units,
      "seconds": time.time() - t0,
  }
  result["unigram_nll_per_token"] = (result[f"unigram_bits_per_{unit}"] * units * math.log(2)
                                     / result["validation_tokens_with_eos"])
  print(json.dumps(result, indent=1))
  out = pathlib.Path(args.out or f"benchmarks/results/baselines_{args.task}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
