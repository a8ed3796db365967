"""Binary start-up: no native TensorFlow noise, the project's gin directory on the search path."""

import subprocess
import sys

import pytest

import gin
from perceiver_ar_t5x import gin_utils, trainer
from tests.conftest import REPO, binary_env

_USE_TF = "import tensorflow as tf; tf.data.Dataset.range(3).reduce(tf.constant(0, tf.int64), " \
          "lambda a, b: a + b)"


def _stderr(code: str) -> str:
  env = {k: v for k, v in binary_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stderr


def test_quiet_tensorflow_leaves_stderr_empty():
  quiet = _stderr("from perceiver_ar_t5x import startup; startup.quiet_tensorflow(); " + _USE_TF)
  assert quiet == ""


def test_plain_tensorflow_import_is_noisy_here():
  """The control: without the quiet import this TensorFlow prints native lines."""
  noisy = _stderr(_USE_TF)
  if not noisy:
    pytest.skip("this TensorFlow build prints nothing at import")
  assert "absl::InitializeLog" in noisy or "cuda" in noisy.lower()


def test_run_config_includes_resolve_without_search_paths(monkeypatch):
  """`--gin_file=gin/runs/x.gin` alone: its `include 'train.gin'` is found in the project's gin/."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys.modules["__main__"], "train", trainer.train, raising=False)
  gin.clear_config()
  try:
    gin_utils.parse_gin(["gin/runs/copy_cpu.gin"], ["MODEL_DIR = '/unused'"], ["."])
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "copy_mirrored"
  finally:
    gin.clear_config()


def test_project_gin_dir_is_searched_last_and_once():
  paths = gin_utils.with_project_gin_dir(["/somewhere", "."])
  assert paths == ["/somewhere", ".", gin_utils.PROJECT_GIN_DIR]
  assert gin_utils.with_project_gin_dir([gin_utils.PROJECT_GIN_DIR]) == [
      gin_utils.PROJECT_GIN_DIR]
