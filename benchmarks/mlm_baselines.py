r"""The unigram baseline beside a masked-LM score, on exactly the examples eval scores.

  python benchmarks/mlm_baselines.py --data /data/my_corpus [--length 256]

Fits p(byte) on the masked bytes of `--train_batches` training batches of the
text_bytes_mlm task (whole-word masking, as training draws them), then scores the
validation split's examples as the eval binary reads them (every validation document
once, the same masks): accuracy of always guessing the most frequent masked byte, and
the unigram cross-entropy in nats (add-one smoothing). A model's masked-byte accuracy
and loss are "well above unigram" only when they beat these.
Writes benchmarks/results/mlm_baselines.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from perceiver_ar_t5x import startup

startup.quiet_tensorflow()

import seqio  # noqa: E402

from perceiver_ar_t5x import datasets, tasks  # noqa: E402
from perceiver_ar_t5x.tasks import mlm  # noqa: E402


def masked_targets(cfg: datasets.DatasetConfig, batches: int | None) -> np.ndarray:
  """Every masked target byte id of the first `batches` batches (None: the whole split)."""
  converter = seqio.EncoderFeatureConverter(mask_id=mlm.MASK_ID, pack=False)
  ds = datasets.get_dataset(cfg, repeat=batches is not None, converter=converter)
  out = []
  for i, batch in enumerate(datasets.numpy_batches(ds)):
    if batches is not None and i >= batches:
      break
    out.append(batch["encoder_target_tokens"][batch["encoder_loss_weights"] > 0])
  return np.concatenate(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", required=True, help="directory or glob of .txt files")
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--train_batches", type=int, default=300)
  ap.add_argument("--out", default="benchmarks/results/mlm_baselines.json")
  args = ap.parse_args()
  task = tasks.configure(task="text_bytes_mlm", text_files=args.data)
  lengths = {"inputs": args.length, "targets": args.length}

  def cfg(split: str, shuffle: bool) -> datasets.DatasetConfig:
    return datasets.DatasetConfig(task, lengths, split, args.batch_size, shuffle=shuffle, seed=0)

  train = masked_targets(cfg("train", True), args.train_batches)
  valid = masked_targets(cfg("validation", False), None)
  counts = np.bincount(train, minlength=mlm.MLM_VOCAB_SIZE).astype(np.float64) + 1.0
  log_p = np.log(counts / counts.sum())
  top = int(np.argmax(counts))
  result = {
      "data": args.data, "length": args.length, "train_masked_bytes": int(train.size),
      "validation_masked_bytes": int(valid.size),
      "most_frequent_masked_byte": bytes([top - 3]).decode("latin-1") if top >= 3 else top,
      "unigram_accuracy": float(np.mean(valid == top)),
      "unigram_cross_entropy_nats": float(-np.mean(log_p[valid])),
  }
  print(json.dumps(result, indent=1))
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
  main()
