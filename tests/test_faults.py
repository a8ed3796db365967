"""Bad input and faults: one clear message naming the bad value, non-zero exit, nothing lost.

Messages are checked in-process where that is exact and cheap; subprocess tests prove
the binaries turn them into one `binary: error:` line without a traceback.
"""

import shutil
import sys

import pytest

import gin
from perceiver_ar_t5x import checkpoints, datasets, gin_utils, metrics_log, trainer
from perceiver_ar_t5x.models import PerceiverARModel
from tests import binaries
from tests.conftest import REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 10 steps (in-process): checkpoints 5 and 10."""
  model_dir = tmp_path_factory.mktemp("trained") / "model"
  binaries.train_in_process(model_dir, "TRAIN_STEPS = 10", "CHECKPOINT_PERIOD = 5")
  return model_dir


@pytest.fixture
def parse(monkeypatch):
  """parse(files, bindings): gin_utils.parse_gin as the binaries call it; gin cleared after."""
  monkeypatch.setattr(sys.modules["__main__"], "train", trainer.train, raising=False)
  for name in ("evaluate", "infer"):
    monkeypatch.setattr(sys.modules["__main__"], name, lambda **kw: kw, raising=False)
  gin.clear_config()
  yield lambda files, bindings: gin_utils.parse_gin(files, bindings, [str(REPO / "gin")])
  gin.clear_config()


def test_unquoted_string_binding_is_a_config_error_naming_it(parse):
  """`--gin.MODEL_DIR=/tmp/x` (no inner quotes) was a gin SyntaxError traceback."""
  with pytest.raises(gin_utils.ConfigError, match=r"in a --gin\. binding .*inner quotes.*"
                                                   r"'MODEL_DIR = /tmp/x'"):
    parse(["gin/tiny.gin"], ["MODEL_DIR = /tmp/x"])


@pytest.mark.parametrize("files,bindings,macro", [
    (["gin/tiny.gin"], [], "MODEL_DIR"),
    (["gin/tiny.gin", "gin/eval.gin"], [], "CHECKPOINT_PATH"),
    (["gin/tiny.gin", "gin/infer.gin"], ["CHECKPOINT_PATH = '/x'"], "INFER_OUTPUT_DIR"),
])
def test_missing_required_macro_is_named(parse, files, bindings, macro):
  with pytest.raises(gin_utils.ConfigError, match=f"required gin value {macro} is not set; "
                                               f"pass --gin.{macro}="):
    parse([str(REPO / f) for f in files], bindings)


def test_macro_typo_suggests_the_known_name(parse):
  expected = "did you mean TRAIN_STEPS.*known macros: .*BATCH"
  with pytest.raises(gin_utils.ConfigError, match=expected):
    parse([str(REPO / "gin/tiny.gin")], ["MODEL_DIR = '/x'", "TRAIN_STEP = 3"])


def test_configurable_parameter_typo_is_named(parse):
  with pytest.raises(ValueError, match="total_step"):
    parse([str(REPO / "gin/tiny.gin")], ["MODEL_DIR = '/x'", "trainer.LoopConfig.total_step = 3"])


def test_missing_gin_file_is_named(parse):
  with pytest.raises(gin_utils.ConfigError, match="gin file 'gin/nope.gin' not found"):
    parse(["gin/nope.gin"], [])


def test_gin_file_found_with_a_same_named_directory_in_the_working_dir(parse, tmp_path,
                                                                     monkeypatch):
  """`runs/x.gin` from the search path while ./runs exists (the quick start's model dirs):
  gin looked for a Python package `runs`, found the bare directory, and crashed."""
  (tmp_path / "runs" / "copy_cpu").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  parse(["runs/copy_cpu.gin"], ["MODEL_DIR = '/x'"])
  assert gin.query_parameter("%TRAIN_STEPS") > 0


def test_length_shorter_than_num_latents(tiny_module):
  model = PerceiverARModel(module=tiny_module)  # 4 latents
  with pytest.raises(trainer.TrainingError, match="gives sequences of 3 tokens, fewer than "
                                                  "num_latents=4"):
    trainer.check_lengths(model, {"targets": 3})
  assert trainer.check_lengths(model, {"inputs": 2, "targets": 2}) == 4


def test_model_dir_not_writable(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(trainer.TrainingError, match=f"MODEL_DIR '{blocker}/m' is not writable"):
    trainer.check_model_dir(str(blocker / "m"))


def test_empty_dataset(tmp_path):
  from perceiver_ar_t5x import tasks
  for name in ("a.txt", "b.txt"):
    (tmp_path / name).write_text("")
  tasks.configure(text_files=str(tmp_path), text_validation_files=str(tmp_path))
  try:
    cfg = datasets.DatasetConfig("text_bytes", {"targets": 16}, "train", 2)
    with pytest.raises(datasets.DataError, match="yielded no examples"):
      next(datasets.numpy_batches(datasets.get_dataset(cfg)))
  finally:
    tasks.configure(text_files=None, text_validation_files=None)


def test_vocab_mismatch_between_checkpoint_and_config(trained, tiny_module):
  import dataclasses
  model = PerceiverARModel(module=dataclasses.replace(tiny_module, vocab_size=64))
  with pytest.raises(checkpoints.CheckpointError, match="has vocab_size=32 but the config has "
                                                        "vocab_size=64"):
    checkpoints.load_params(model, str(trained), 16)


@pytest.mark.slow
def test_binary_prints_one_line_for_a_config_error(tmp_path):
  line = binaries.error_line(binaries.run("eval"), "eval")
  assert "CHECKPOINT_PATH" in line


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
# through the binary; in process: test_restore_safety's truncated-checkpoint case
@pytest.mark.extended
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
