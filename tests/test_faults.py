"""Bad input and faults: one `binary: error:` line, non-zero exit, nothing saved is lost."""

import shutil

import pytest

from perceiver_ar_t5x import metrics_log
from tests import binaries


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 10 steps: checkpoints 5 and 10."""
  model_dir = tmp_path_factory.mktemp("trained") / "model"
  proc = binaries.train(model_dir, "--gin.TRAIN_STEPS=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return model_dir


@pytest.mark.slow
@pytest.mark.parametrize("binary,macro", [("train", "MODEL_DIR"), ("eval", "CHECKPOINT_PATH"),
                                          ("infer", "INFER_OUTPUT_DIR")])
def test_missing_required_macro_is_named(binary, macro, tmp_path):
  args = {"train": (), "eval": (), "infer": (f"--gin.CHECKPOINT_PATH='{tmp_path}'",)}[binary]
  line = binaries.error_line(binaries.run(binary, *args), binary)
  assert f"required gin value {macro} is not set" in line and f"--gin.{macro}=" in line


@pytest.mark.slow
def test_configurable_parameter_typo_is_named(tmp_path):
  proc = binaries.train(tmp_path / "m", "--gin.trainer.LoopConfig.total_step=3")
  line = binaries.error_line(proc, "train")
  assert "total_step" in line


@pytest.mark.slow
def test_length_shorter_than_num_latents(tmp_path):
  proc = binaries.train(tmp_path / "m", "--gin.NUM_LATENTS=32")
  line = binaries.error_line(proc, "train")
  assert "num_latents=32" in line and "16 tokens" in line
  assert not (tmp_path / "m" / "checkpoints").exists()


@pytest.mark.slow
def test_model_dir_not_writable(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  line = binaries.error_line(binaries.train(blocker / "model"), "train")
  assert "is not writable" in line and str(blocker / "model") in line


@pytest.mark.slow
def test_empty_dataset(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  for name in ("a.txt", "b.txt"):
    (docs / name).write_text("")
  proc = binaries.train(tmp_path / "m", "--gin.MIXTURE_OR_TASK_NAME='text_bytes'",
                        "--gin.VOCAB_SIZE=259", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
                        env={"TEXT_FILES": str(docs), "TEXT_VALIDATION_FILES": str(docs)})
  assert "yielded no examples" in binaries.error_line(proc, "train")


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_checkpoints(trained, tmp_path):
  model_dir = tmp_path / "model"
  shutil.copytree(trained, model_dir)
  before = binaries.checkpoint_files(model_dir)
  proc = binaries.train(model_dir, "--gin.TRAIN_STEPS=20", "--gin.LEARNING_RATE=1e30")
  line = binaries.error_line(proc, "train")
  assert "loss is nan at step" in line or "loss is inf at step" in line
  step = int(line.split(" at step ")[1].split(";")[0])
  assert 10 < step <= 20 and "Last good checkpoint: step 10" in line
  assert binaries.checkpoint_files(model_dir) == before
  assert max(metrics_log.losses_by_step(str(model_dir / "train" / "metrics.jsonl"))) < step


@pytest.mark.slow
def test_vocab_mismatch_between_checkpoint_and_config(trained):
  before = binaries.checkpoint_files(trained)
  proc = binaries.train(trained, "--gin.TRAIN_STEPS=20", "--gin.VOCAB_SIZE=64")
  line = binaries.error_line(proc, "train")
  assert "vocab_size=32 but the config has vocab_size=64" in line
  assert binaries.checkpoint_files(trained) == before


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(trained, tmp_path):
  model_dir = tmp_path / "model"
  shutil.copytree(trained, model_dir)
  for path in (model_dir / "checkpoints" / "10" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")  # finished (renamed) but unreadable
  proc = binaries.train(model_dir, "--gin.TRAIN_STEPS=12")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Checkpoint at step 10" in proc.stderr and "unreadable" in proc.stderr
  assert "Restored checkpoint for step 5" in proc.stderr
  assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir()) == [5, 10, 12]
  kept = list((model_dir / "checkpoints_corrupt").iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("10-")
  assert sorted(metrics_log.losses_by_step(str(model_dir / "train" / "metrics.jsonl"))) == list(
      range(1, 13))
