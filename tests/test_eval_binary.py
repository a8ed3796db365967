"""The eval binary on gin/tiny.gin checkpoints, and evaluate_checkpoint on a byte task."""

import json
import math

import pytest

from perceiver_ar_t5x import datasets, evaluation
from perceiver_ar_t5x.evaluation import ScoringMode
from tests import binaries

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny copy-task run of 4 steps: checkpoints 2 and 4."""
  model_dir = tmp_path_factory.mktemp("eval") / "model"
  binaries.train_in_process(model_dir, "TRAIN_STEPS = 4", "CHECKPOINT_PERIOD = 2")
  return model_dir


def _printed_metrics(stdout: str) -> dict:
  line = next(x for x in stdout.splitlines() if x.startswith("eval metrics: "))
  return json.loads(line.split(": ", 1)[1])


def test_eval_latest_writes_json_and_tensorboard(trained):
  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}'")
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = trained / "eval" / "copy_mirrored-validation-last_latents-4.json"
  assert f"wrote {path}" in proc.stdout
  result = json.loads(path.read_text())
  assert result["step"] == 4 and result["mode"] == "last_latents"
  assert result["num_tokens"] == 256 * 8  # 256 validation examples, 8 target tokens each
  assert result["perplexity"] == pytest.approx(math.exp(result["cross_ent_loss"]), rel=1e-5)
  assert result["bits_per_token"] == pytest.approx(result["cross_ent_loss"] / math.log(2))
  assert "bits_per_byte" not in result  # token ids, not text
  assert _printed_metrics(proc.stdout)["loss"] == pytest.approx(result["loss"], abs=1e-4)
  assert list((trained / "eval").glob("events.out.tfevents.*"))
  assert "orbax" not in proc.stderr.lower()  # library INFO chatter is hidden


def test_eval_full_sequence_at_a_named_step(trained, tmp_path):
  out = tmp_path / "out"
  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}/checkpoints/2'",
                      "--gin.EVAL_MODE=%evaluation.ScoringMode.FULL_SEQUENCE",
                      "--gin.EVAL_STRIDE=4", "--gin.EVAL_MAX_BATCHES=3",
                      f"--gin.EVAL_OUTPUT_DIR='{out}'")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "copy_mirrored-validation-full_sequence-2.json").read_text())
  assert result["step"] == 2 and result["stride"] == 4 and result["num_batches"] == 3
  assert result["num_tokens"] == 3 * 8 * 8


def test_eval_vocab_mismatch_is_one_line(trained):
  before = binaries.checkpoint_files(trained)
  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}'", "--gin.VOCAB_SIZE=40")
  line = binaries.error_line(proc, "eval")
  assert "vocab_size=32 but the config has vocab_size=40" in line
  assert binaries.checkpoint_files(trained) == before


def test_bits_per_byte_on_a_byte_task(tmp_path):
  from perceiver_ar_t5x import tasks
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(6):
    (docs / f"{i}.txt").write_text(f"document {i}: " + "perceiver ar reads bytes. " * 3)
  tasks.configure(text_files=str(docs), text_validation_files=str(docs))
  lengths = "{'targets': 16}"
  try:
    binaries.train_in_process(tmp_path / "m", "MIXTURE_OR_TASK_NAME = 'text_bytes'",
                              "VOCAB_SIZE = 259", f"TASK_FEATURE_LENGTHS = {lengths}",
                              "TRAIN_STEPS = 2")
    model = binaries.tiny_model(vocab_size=259)
    cfg = datasets.DatasetConfig("text_bytes", {"targets": 16}, "validation", 8, shuffle=False)
    summary, path = evaluation.evaluate_checkpoint(
        model=model, dataset_cfg=cfg, checkpoint_path=str(tmp_path / "m"),
        mode=ScoringMode.FULL_SEQUENCE, stride=4)
  finally:
    tasks.configure(text_files=None, text_validation_files=None)
  # one byte per byte token; the EOS token scores but has no bytes
  assert 0 < summary["num_bytes"] <= summary["num_tokens"] == 6 * 16
  assert summary["bits_per_byte"] == pytest.approx(
      summary["bits_per_token"] * summary["num_tokens"] / summary["num_bytes"])
  assert json.loads(open(path).read())["bits_per_byte"] == pytest.approx(summary["bits_per_byte"])
