r"""Eval binary with T5X's interface: score a checkpoint on a task split.

  python -m perceiver_ar_t5x.eval --gin_file=gin/tiny.gin --gin_file=gin/eval.gin \
    --gin.CHECKPOINT_PATH="'/tmp/perceiver_ar_tiny'" --gin_search_paths=gin

Gin configures `eval_script.evaluate` (`evaluation.evaluate_checkpoint`); see
gin/eval.gin for the macros. By default every token of every document of the split is
scored once (WHOLE_SPLIT); LAST_LATENTS scores training-style crops. Process 0 writes
TensorBoard scalars and a JSON file to EVAL_OUTPUT_DIR (default MODEL_DIR/eval); every
process prints the metrics, which are the same on all of them.
"""

from __future__ import annotations

import json
import sys

from perceiver_ar_t5x import startup  # first: TF must not be imported before this

startup.quiet_tensorflow()

import jax  # noqa: E402
from absl import app  # noqa: E402

import gin  # noqa: E402
from perceiver_ar_t5x import evaluation, gin_utils, trainer  # noqa: E402

evaluate = evaluation.evaluate_checkpoint  # `eval_script.evaluate` in gin
train = trainer.train  # run gin files bind `train_script.train`; they parse here too


def main(argv: list[str]) -> None:
  with gin_utils.configured("eval", argv):
    metrics, path = gin.get_configurable(evaluate)()
  print("eval metrics: " + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
  if jax.process_index() == 0:
    print(f"wrote {path}")


if __name__ == "__main__":
  sys.argv = gin_utils.rewrite_gin_args(sys.argv)
  app.run(main)
