"""A converted model becomes a MODEL_DIR that eval, infer and train read like our own."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import gin
from perceiver_ar_t5x import checkpoints, metrics_log
from perceiver_ar_t5x.convert import model_dir
from perceiver_ar_t5x.layers.block import BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.models import PerceiverARModel
from tests import binaries

OPTIONS = dict(block=BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                                  activation=Activation.SQUARED_RELU, gated_mlp=False,
                                  cross_kv_norm=CrossKvNorm.SEPARATE),
               latent_query_projection=True, output_bias=True, max_timescale=37.0,
               rotary_layers=2)


def _converted(module, seed=0):
  params = nn.unbox(PerceiverARModel(module).init(jax.random.key(seed), module.num_latents))
  noisy = jax.tree.map(lambda x: np.asarray(x) + 0.1, params)  # biases and scales non-trivial
  return model_dir.Converted(module=module, params=noisy, step=7, source="test",
                             report=["a -> b"])


def test_written_params_and_gin_rebuild_the_model(tmp_path):
  module = binaries.tiny_model().module.clone(**OPTIONS)
  converted = _converted(module)
  gin_path = model_dir.write_model_dir(str(tmp_path), converted)
  model = PerceiverARModel(module)
  params, step, _ = checkpoints.load_params(model, str(tmp_path), module.num_latents)
  assert step == 7
  jax.tree.map(np.testing.assert_array_equal, params, converted.params)
  with binaries.tiny_gin("MODEL_DIR = '/unused'", files=("gin/tiny.gin", gin_path)):
    rebuilt = gin.query_parameter("%MODEL").scoped_configurable_fn()
  assert rebuilt.module == module
  assert "a -> b" in (tmp_path / "convert-report.txt").read_text()


def test_refuses_to_overwrite_and_names_a_wrong_parameter(tmp_path):
  module = binaries.tiny_model().module
  model_dir.write_model_dir(str(tmp_path), _converted(module))
  with pytest.raises(model_dir.ConversionError, match="already has checkpoints"):
    model_dir.write_model_dir(str(tmp_path), _converted(module))
  bad = _converted(module)
  bad.params["layers_1"]["mlp"]["wo"] = np.zeros((3, 3), np.float32)
  with pytest.raises(model_dir.ConversionError, match=r"layers_1/mlp/wo is \(3, 3\)"):
    model_dir.write_model_dir(str(tmp_path / "other"), bad)


def test_training_from_a_converted_model_fine_tunes_from_its_step(tmp_path):
  """Params-only checkpoint: restored, a fresh optimizer state, training goes on from 7."""
  module = binaries.tiny_model().module
  converted = _converted(module)
  model_dir.write_model_dir(str(tmp_path), converted)
  binaries.train_in_process(tmp_path, "TRAIN_STEPS = 10", "CHECKPOINT_PERIOD = 10")
  logged = metrics_log.read(str(tmp_path / "train" / "metrics.jsonl"))
  assert [r["step"] for r in logged] == [8, 9, 10]
  ckpt = checkpoints.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.steps() == [7, 10]
  restored, _, _ = checkpoints.load_params(PerceiverARModel(module), str(tmp_path / "checkpoints"
                                                                         / "7"), 10)
  jax.tree.map(np.testing.assert_array_equal, restored, converted.params)
