"""Perceiver IO through the T5X binaries: train, eval and infer on real files.

Classification (the generated keyword task): the gin-configured trainer (in-process) ends
with eval metrics and a sample, the eval binary (a subprocess) scores every one of the 500
validation examples, infer (in-process) writes label names. Masked LM
trains in-process on text files this test writes (documents of very different lengths),
then infer fills masks.
"""

import json

import gin
from tests import binaries

KEYWORD = ("gin/runs/keyword_io_cpu.gin",)
KEYWORDS = ("CAT", "DOG", "FISH", "BIRD")
SMALL_IO = ("INPUT_DIM = 16", "LATENT_DIM = 16", "NUM_LATENTS = 4", "NUM_SELF_ATTEND_HEADS = 2",
            "NUM_SELF_ATTENDS_PER_BLOCK = 1", "NUM_DECODER_HEADS = 2", "DECODER_QK_CHANNELS = 8",
            "TRAIN_STEPS = 3", "BATCH_SIZE = 8", "CHECKPOINT_PERIOD = 3", "STATS_PERIOD = 1")


def _infer(tmp_path, model_dir, run_gin, task, length, *bindings) -> str:
  """The infer binary's function for a Perceiver IO model, in-process (no second start-up
  and compile); the binary's own flags and output are tested with Perceiver AR."""
  from perceiver_ar_t5x import datasets, io_inference, io_models
  with binaries.tiny_gin(*bindings, files=run_gin):
    model = gin.get_configurable(io_models.PerceiverIOModel)()
  cfg = datasets.DatasetConfig(task, length, "validation", 8, shuffle=False)
  return io_inference.infer(model=model, checkpoint_path=str(model_dir),
                            output_dir=str(tmp_path / "infer"), dataset_cfg=cfg, max_examples=5)


def test_classification_train_eval_infer(tmp_path):
  from perceiver_ar_t5x import trainer
  model_dir = tmp_path / "kw"
  with binaries.tiny_gin(f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 40", "BATCH_SIZE = 16",
                         "EVAL_STEPS = 2", files=KEYWORD):
    result = gin.get_configurable(trainer.train)(handle_signals=False)
  assert result.metrics["num_tokens"] == 32 and result.sample["prediction"] in KEYWORDS
  assert (model_dir / "model-info.txt").exists()
  assert list((model_dir / "train").glob("events.out.tfevents.*"))

  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{model_dir}'", "--gin.EVAL_BATCH_SIZE=64",
                      gin_files=KEYWORD)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads(proc.stdout.split("eval metrics: ")[1].splitlines()[0])
  assert metrics["num_tokens"] == 500  # every validation example, once
  assert metrics["accuracy"] > 0.5  # 4 classes: chance is 0.25

  path = _infer(tmp_path, model_dir, KEYWORD, "keyword_classification",
                {"inputs": 64, "targets": 1}, f"MODEL_DIR = '{model_dir}'")
  rows = [json.loads(x) for x in open(path).read().splitlines()]
  assert len(rows) == 5
  for row in rows:
    assert row["targets"] in KEYWORDS and row["targets"] in row["inputs"]
    assert row["prediction"] in KEYWORDS and 0 < row["probability"] <= 1


def test_masked_lm_trains_and_fills_masks(tmp_path):
  from perceiver_ar_t5x import trainer
  docs = tmp_path / "docs"
  docs.mkdir()
  for i, n in enumerate([3, 40, 400, 2]):  # words per document: very different lengths
    (docs / f"d{i}.txt").write_text(" ".join(f"word{j % 7}" for j in range(n)))
  model_dir = tmp_path / "mlm"
  bindings = (f"MODEL_DIR = '{model_dir}'", f"TEXT_FILES = '{docs}'",
              f"TEXT_VALIDATION_FILES = '{docs}/d2.txt'", "EVAL_PERIOD = 0",
              "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}", "MAX_LENGTH = 32",
              *SMALL_IO)
  with binaries.tiny_gin(*bindings, files=("gin/runs/text_mlm_io_cpu.gin",)):
    result = gin.get_configurable(trainer.train)(handle_signals=False)
  assert result.metrics["num_tokens"] > 0 and 0 <= result.metrics["accuracy"] <= 1
  assert "[MASK]" in result.sample["inputs"]
  path = _infer(tmp_path, model_dir, ("gin/runs/text_mlm_io_cpu.gin",), "text_bytes_mlm",
                {"inputs": 32, "targets": 32}, *bindings)
  row = json.loads(open(path).read().splitlines()[0])
  assert "[MASK]" in row["inputs"] and "[MASK]" not in row["prediction"]
  # each masked byte replaced by the model's (an untrained model may pick non-byte ids)
  assert len(row["prediction"]) <= len(row["targets"]) and row["masked_accuracy"] is not None
