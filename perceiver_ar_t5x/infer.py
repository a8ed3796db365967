r"""Infer binary with T5X's interface: sample continuations from a checkpoint.

  python -m perceiver_ar_t5x.infer --gin_file=gin/tiny.gin --gin_file=gin/infer.gin \
    --gin.CHECKPOINT_PATH="'/tmp/perceiver_ar_tiny'" \
    --gin.INFER_OUTPUT_DIR="'/tmp/perceiver_ar_tiny/infer'" --gin_search_paths=gin

Gin configures `infer_script.infer` (`inference.infer`); see gin/infer.gin.
Writes `<INFER_OUTPUT_DIR>/<source>-<step>.jsonl` (inputs = prompt, prediction =
continuation, score), plus .mid/.png per sample for MIDI tasks; process 0 writes.
"""

from __future__ import annotations

import sys

from perceiver_ar_t5x import startup  # first: TF must not be imported before this

startup.quiet_tensorflow()

import jax  # noqa: E402
from absl import app  # noqa: E402

import gin  # noqa: E402
from perceiver_ar_t5x import fileio, gin_utils, inference, trainer  # noqa: E402

infer = inference.infer  # `infer_script.infer` in gin
train = trainer.train  # run gin files bind `train_script.train`; they parse here too


def main(argv: list[str]) -> None:
  with gin_utils.configured("infer", argv):
    path = gin.get_configurable(infer)()
  if jax.process_index() != 0:  # only process 0 wrote it
    return
  with fileio.gfile.GFile(path) as f:
    lines = f.readlines()
  print(f"wrote {len(lines)} predictions to {path}")
  if lines:
    print("first: " + lines[0].strip()[:300])


if __name__ == "__main__":
  sys.argv = gin_utils.rewrite_gin_args(sys.argv)
  app.run(main)
