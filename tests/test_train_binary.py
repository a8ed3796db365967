"""The train binary end to end on gin/tiny.gin, as a user runs it."""

import json
import pathlib

import pytest

from tests import binaries


def run_train(model_dir: pathlib.Path, *extra: str):
  """The train binary on gin/tiny.gin with its own eval/sample settings (not binaries.FAST)."""
  return binaries.run("train", f"--gin.MODEL_DIR='{model_dir}'", *extra)


@pytest.mark.slow
def test_tiny_run_writes_a_t5x_model_dir(tmp_path):
  model_dir = tmp_path / "model"
  proc = run_train(model_dir, "--gin.TRAIN_STEPS=12", "--gin.EVAL_PERIOD=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = [line for line in proc.stdout.splitlines() if line.startswith("final eval metrics:")]
  metrics = json.loads(final[0].split(":", 1)[1])
  assert {"loss", "accuracy", "perplexity"} <= set(metrics)
  assert "sample prediction:" in proc.stdout
  config = (model_dir / "config.gin").read_text()
  assert "train_script.train" in config and "TRAIN_STEPS = 12" in config
  info = (model_dir / "model-info.txt").read_text()
  assert "total_params:" in info and "logical=('embed', 'heads', 'kv')" in info
  assert sorted(p.name for p in (model_dir / "checkpoints").iterdir()) == ["10", "12"]
  for sub in ("train", "eval"):
    assert list((model_dir / sub).glob("events.out.tfevents.*")), sub


def test_gin_typo_is_one_line_and_nonzero(tmp_path):
  proc = run_train(tmp_path / "m", "--gin.NUM_LATENS=3", "--gin.TRAIN_STEPS=1")
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.strip().splitlines() if "error" in line.lower()]
  assert lines and lines[-1].startswith("train: error:") and "NUM_LATENS" in lines[-1]
  assert "Traceback" not in proc.stderr


def test_unknown_task_names_the_known_ones(tmp_path):
  proc = run_train(tmp_path / "m", "--gin.MIXTURE_OR_TASK_NAME='nope'", "--gin.TRAIN_STEPS=1")
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("train: error:") and "'nope'" in last and "copy_mirrored" in last
