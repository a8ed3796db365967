"""Subprocess helpers for the binary tests (train/eval/infer on gin/tiny.gin)."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

import gin
from tests.conftest import REPO, binary_env

# Short tiny runs: no mid-run eval, no sample, checkpoints every 5 steps.
FAST = ("--gin.EVAL_PERIOD=0", "--gin.STATS_PERIOD=5", "--gin.CHECKPOINT_PERIOD=5",
        "--gin.train_script.train.sample_at_end=False")


def command(binary: str, *args: str, gin_files: tuple[str, ...] = ("gin/tiny.gin",)
            ) -> list[str]:
  extra = {"train": (), "eval": ("gin/eval.gin",), "infer": ("gin/infer.gin",)}[binary]
  return [sys.executable, "-m", f"perceiver_ar_t5x.{binary}",
          *[f"--gin_file={g}" for g in (*gin_files, *extra)], "--gin_search_paths=gin", *args]


def run(binary: str, *args: str, env: dict[str, str] | None = None,
        gin_files: tuple[str, ...] = ("gin/tiny.gin",)) -> subprocess.CompletedProcess:
  return subprocess.run(command(binary, *args, gin_files=gin_files), cwd=REPO,
                        env={**binary_env(), **(env or {})}, capture_output=True, text=True,
                        timeout=600)


def train(model_dir: pathlib.Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
  return run("train", f"--gin.MODEL_DIR='{model_dir}'", *FAST, *args, **kwargs)


def error_line(proc: subprocess.CompletedProcess, binary: str) -> str:
  """The one error line; fails if the run succeeded or printed a traceback."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{binary}: error: "), proc.stderr[-3000:]
  return last


def checkpoint_files(model_dir: pathlib.Path) -> dict[str, bytes]:
  """Every file under MODEL_DIR/checkpoints with its bytes (to prove nothing changed)."""
  root = model_dir / "checkpoints"
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


@contextlib.contextmanager
def tiny_gin(*bindings: str, files: tuple[str, ...] = ("gin/tiny.gin",)) -> Iterator[None]:
  """tiny.gin (or `files`) parsed in this process as the train binary would (gin cleared
  after)."""
  from perceiver_ar_t5x import gin_utils, trainer
  gin.clear_config()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys.modules["__main__"], "train", trainer.train, raising=False)
    try:
      gin_utils.parse_gin(list(files), list(bindings), [str(REPO / "gin")])
      yield
    finally:
      gin.clear_config()


def train_in_process(model_dir: pathlib.Path, *bindings: str) -> None:
  """Runs the gin-configured trainer on tiny.gin inside the test process (no import cost).

  Used to make checkpoints for the eval/infer/fault tests.
  """
  from perceiver_ar_t5x import trainer
  with tiny_gin(f"MODEL_DIR = '{model_dir}'", "EVAL_PERIOD = 0", *bindings):
    gin.get_configurable(trainer.train)(handle_signals=False, sample_at_end=False)


def tiny_model(**overrides):
  """The model tiny.gin builds (with macro overrides, e.g. vocab_size=259)."""
  with tiny_gin("MODEL_DIR = '/unused'", *[f"{k.upper()} = {v!r}" for k, v in overrides.items()]):
    return gin.query_parameter("%MODEL").scoped_configurable_fn()
