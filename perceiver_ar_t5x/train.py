r"""Train binary with T5X's interface.

  python -m perceiver_ar_t5x.train \
    --gin_file=gin/runs/copy_cpu.gin \
    --gin.MODEL_DIR="'/tmp/copy'" --gin.TRAIN_STEPS=1000 \
    --gin_search_paths=gin

Gin files configure `train_script.train` (this module's `train`, i.e.
`perceiver_ar_t5x.trainer.train`) with `import __main__ as train_script`, as in T5X.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from perceiver_ar_t5x import startup  # first: TF must not be imported before this

startup.quiet_tensorflow()

import jax  # noqa: E402
from absl import app, logging  # noqa: E402

import gin  # noqa: E402
from perceiver_ar_t5x import fileio, gin_utils, trainer  # noqa: E402

train = trainer.train  # the gin-configured entry point, `train_script.train` in gin


def _write_config(model_dir: str, text: str) -> None:
  """config.gin: process 0 writes it (as T5X); every process parsed the same flags."""
  if jax.process_index() != 0:
    return
  fileio.gfile.makedirs(model_dir)
  fileio.write_text(os.path.join(model_dir, "config.gin"), text)


def main(argv: list[str]) -> None:
  with gin_utils.configured("train", argv):
    model_dir = gin.query_parameter("%MODEL_DIR")
    trainer.check_model_dir(model_dir)
    if not fileio.gfile.exists(os.path.join(model_dir, "config.gin")):
      _write_config(model_dir, gin.config_str())  # a resumed run's file stays until it ends
    macros = {name: gin.query_parameter(f"%{name}") for name in gin_utils.defined_macros()}
    result = gin.get_configurable(train)(config_values=macros)
    _write_config(model_dir, gin.operative_config_str())
  if result.stopped_by_signal is not None:
    print(f"stopped by {signal.Signals(result.stopped_by_signal).name} at step "
          f"{int(result.state.step)}; checkpoint saved, rerun the same command to resume")
    return
  if result.metrics:
    print("final eval metrics: " + json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
  if result.sample:
    for key, value in result.sample.items():
      print(f"sample {key}: {value}")
  logging.info("done")


if __name__ == "__main__":
  sys.argv = gin_utils.rewrite_gin_args(sys.argv)
  app.run(main)
