"""The convert binary end to end: a krasserm hub folder -> MODEL_DIR -> eval and infer binaries."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests import binaries
from tests.conftest import REPO, binary_env

CLM = pathlib.Path(__file__).parents[1] / "fixtures" / "convert" / "krasserm_clm"


def _convert(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "perceiver_ar_t5x.convert", *args], cwd=REPO,
                        env=binary_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_converted_krasserm_model_runs_in_eval_and_infer(tmp_path):
  model = tmp_path / "clm"
  proc = _convert("--from=krasserm", str(CLM), f"--model_dir={model}", "--vocab=bytes")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "re-indexed to bytes" in proc.stdout and (model / "model.gin").exists()

  (tmp_path / "valid").mkdir()
  for i, text in enumerate(["A converted model reads our bytes.", "Short.", "x" * 70]):
    (tmp_path / "valid" / f"{i}.txt").write_text(text)
  run = dict(gin_files=("gin/runs/text_bytes_cpu.gin", str(model / "model.gin")),
             env={"TEXT_FILES": str(tmp_path / "valid"),
                  "TEXT_VALIDATION_FILES": str(tmp_path / "valid")})
  common = (f"--gin.CHECKPOINT_PATH='{model}'", "--gin.TASK_FEATURE_LENGTHS={'targets': 28}",
            "--gin.BATCH_SIZE=8")
  evaluated = binaries.run("eval", *common, f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
                           **run)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  metrics = json.loads(evaluated.stdout.split("eval metrics: ")[1].splitlines()[0])
  assert metrics["num_bytes"] == 34 + 6 + 70 and 0 < metrics["bits_per_byte"] < 20
  inferred = binaries.run("infer", *common, f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'out'}'",
                          "--gin.INFER_MAX_NEW_TOKENS=5", **run)
  assert inferred.returncode == 0, inferred.stderr[-3000:]
  records = [json.loads(line) for path in (tmp_path / "out").glob("*.jsonl")
             for line in path.read_text().splitlines()]
  assert records and all(len(r["prediction"]) <= 5 * 4 for r in records)


def test_unrecognised_source_is_one_error_line(tmp_path):
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  proc = _convert("--from=krasserm", str(tmp_path), f"--model_dir={tmp_path / 'm'}")
  assert binaries.error_line(proc, "convert")
  assert not (tmp_path / "m" / "checkpoints").exists()
