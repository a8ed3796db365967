"""The convert binary on Perceiver IO: a Hugging Face PerceiverForMaskedLM -> MODEL_DIR -> eval,
and the official (Haiku) array classifier -> MODEL_DIR -> its model.gin.

Conversions run in this process (the CLI's own main, flags parsed as on the command
line) to keep the file fast; the eval binary runs as a subprocess, as a user runs it:
after a Perceiver IO run file.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

import gin
from perceiver_ar_t5x import checkpoint_match, checkpoints
from perceiver_ar_t5x.convert import __main__ as cli
from perceiver_ar_t5x.convert import hf_io, model_dir, official_io
from perceiver_ar_t5x.io_models import PerceiverIOModel
from tests import binaries

HF = pathlib.Path(__file__).parents[1] / "fixtures" / "convert" / "hf_perceiver_io"
RUN = "gin/runs/text_mlm_io_cpu.gin"
LENGTH = 20  # the fixture's max_position_embeddings
MASK_ID = 259  # the byte MLM task's [MASK]


def _convert(*args: str) -> None:
  """`python -m perceiver_ar_t5x.convert ARGS`, in this process (flags restored after)."""
  with flagsaver.flagsaver():
    argv = flags.FLAGS(["convert", *args])
    try:
      cli.main(argv)
    finally:
      flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory) -> pathlib.Path:
  model = tmp_path_factory.mktemp("io") / "hf"
  _convert("--from=hf_io", str(HF), f"--model_dir={model}", "--vocab=mlm_bytes")
  return model


def _rebuilt(model: pathlib.Path) -> PerceiverIOModel:
  """The model the run file + model.gin configure (as eval/infer/train would build it)."""
  with binaries.tiny_gin("MODEL_DIR = '/unused'", files=(RUN, str(model / "model.gin"))):
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def test_model_gin_and_checkpoint_rebuild_the_importers_logits(converted_dir):
  want = hf_io.remap_to_mlm_vocab(hf_io.load(str(HF)))
  rebuilt = _rebuilt(converted_dir)
  assert rebuilt.mask_id == MASK_ID  # the task's, not reset by model.gin
  fields = checkpoint_match.model_fields(PerceiverIOModel(want.module, mask_id=MASK_ID))
  assert checkpoint_match.model_fields(rebuilt) == fields
  params, step, _ = checkpoints.load_params(rebuilt, str(converted_dir), LENGTH)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), want.params)
  ids = np.random.default_rng(0).integers(3, 260, (2, LENGTH)).astype(np.int32)
  ids[1, 13:] = 0
  ids[0, 4] = MASK_ID
  mask = ids > 0
  got = jax.jit(rebuilt.module.apply)({"params": params}, ids, mask)
  ref = want.module.apply({"params": want.params}, ids, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)  # jit vs eager
  assert "re-indexed to the byte MLM task's (260)" in (
      converted_dir / "convert-report.txt").read_text()


def test_converted_model_is_evaluated_by_the_eval_binary(converted_dir, tmp_path):
  valid = tmp_path / "valid"
  valid.mkdir()
  for i, text in enumerate(["a converted model reads our bytes", "short words here",
                            "x y z " * 10]):
    (valid / f"{i}.txt").write_text(text)
  proc = binaries.run(
      "eval", f"--gin.CHECKPOINT_PATH='{converted_dir}'",
      f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {LENGTH}, 'targets': {LENGTH}}}",
      "--gin.BATCH_SIZE=8", f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
      gin_files=(RUN, str(converted_dir / "model.gin")),
      env={"TEXT_FILES": str(valid), "TEXT_VALIDATION_FILES": str(valid)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads(proc.stdout.split("eval metrics: ")[1].splitlines()[0])
  print(f"eval of the converted model: {metrics}")
  assert metrics["num_tokens"] > 0 and metrics["step"] == 0, metrics
  assert 0 <= metrics["accuracy"] <= 1 and np.isfinite(metrics["loss"]), metrics


def test_refuses_to_overwrite_an_existing_checkpoint(converted_dir):
  before = binaries.checkpoint_files(converted_dir)
  gin_text = (converted_dir / "model.gin").read_text()
  with pytest.raises(model_dir.ConversionError, match="already has checkpoints"):
    model_dir.write_model_dir(str(converted_dir), hf_io.load(str(HF)))
  assert binaries.checkpoint_files(converted_dir) == before
  assert (converted_dir / "model.gin").read_text() == gin_text


def test_official_array_classifier_converts_and_its_gin_rebuilds_it(tmp_path):
  """--from official_io on the pixel + Fourier classifier: the ArrayInput's fields go into
  model.gin as direct bindings, the checkpoint holds every param at its shape."""
  folder = HF.parent / "official_io_classify"
  model = tmp_path / "official"
  _convert("--from=official_io", str(folder), f"--model_dir={model}")
  want = official_io.load(str(folder))
  with binaries.tiny_gin("MODEL_DIR = '/unused'",
                         files=("gin/runs/keyword_io_cpu.gin", str(model / "model.gin"))):
    rebuilt = gin.query_parameter("%MODEL").scoped_configurable_fn()
  fields = checkpoint_match.model_fields(PerceiverIOModel(want.module))
  assert checkpoint_match.model_fields(rebuilt) == fields
  stored = checkpoint_match.stored_shapes(str(model / "checkpoints" / "0"))
  assert stored == {f"params/{k}": np.shape(v)
                    for k, v in model_dir.flatten(want.params).items()} | {"step": ()}
