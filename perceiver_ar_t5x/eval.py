r"""Eval binary with T5X's interface: score a checkpoint on a task split.

  python -m perceiver_ar_t5x.eval --gin_file=gin/tiny.gin --gin_file=gin/eval.gin \
    --gin.CHECKPOINT_PATH="'/tmp/perceiver_ar_tiny'" --gin_search_paths=gin

Gin configures `eval_script.evaluate` (`evaluation.evaluate_checkpoint`); see
gin/eval.gin for the macros. Writes TensorBoard scalars and a JSON file to
EVAL_OUTPUT_DIR (default MODEL_DIR/eval) and prints the metrics.
"""

from __future__ import annotations

import json
import sys

from absl import app

import gin
from perceiver_ar_t5x import evaluation, launch, trainer

evaluate = evaluation.evaluate_checkpoint  # `eval_script.evaluate` in gin
train = trainer.train  # run gin files bind `train_script.train`; they parse here too


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.setup_logging()
  flags = launch.FLAGS
  with launch.one_line_errors("eval"):
    launch.parse_gin(flags.gin_file, flags.gin_bindings, flags.gin_search_paths)
    launch.init_multiprocess()
    metrics, path = gin.get_configurable(evaluate)()
  print("eval metrics: " + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.argv = launch.rewrite_gin_args(sys.argv)
  app.run(main)
