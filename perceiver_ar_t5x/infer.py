r"""Infer binary with T5X's interface: sample continuations from a checkpoint.

  python -m perceiver_ar_t5x.infer --gin_file=gin/tiny.gin --gin_file=gin/infer.gin \
    --gin.CHECKPOINT_PATH="'/tmp/perceiver_ar_tiny'" \
    --gin.INFER_OUTPUT_DIR="'/tmp/perceiver_ar_tiny/infer'" --gin_search_paths=gin

Gin configures `infer_script.infer` (`inference.infer`); see gin/infer.gin.
Writes `<INFER_OUTPUT_DIR>/<source>-<step>.jsonl` (inputs, prediction, score).
"""

from __future__ import annotations

import sys

from absl import app

import gin
from perceiver_ar_t5x import fileio, inference, launch, trainer

infer = inference.infer  # `infer_script.infer` in gin
train = trainer.train  # run gin files bind `train_script.train`; they parse here too


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup_logging()
  flags = launch.FLAGS
  with launch.one_line_errors("infer"):
    launch.parse_gin(flags.gin_file, flags.gin_bindings, flags.gin_search_paths)
    launch.init_multiprocess()
    path = gin.get_configurable(infer)()
  with fileio.gfile.GFile(path) as f:
    lines = f.readlines()
  print(f"wrote {len(lines)} predictions to {path}")
  if lines:
    print("first: " + lines[0].strip()[:300])


if __name__ == "__main__":
  sys.argv = launch.rewrite_gin_args(sys.argv)
  app.run(main)
