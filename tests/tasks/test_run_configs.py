"""gin/runs for the data tasks: paper-sized configs parse and size right; tiny ones train.

The tiny CPU configs run for real: text_bytes_cpu and maestro_cpu through the train
binary (subprocesses, on files this test writes), c4_cpu and pg19_cpu in-process up to
a loss on a real batch (c4 under tfds.testing.mock_data).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import gin
from perceiver_ar_t5x import datasets, gin_utils, trainer, training

GIN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "gin")
REPO = os.path.abspath(os.path.join(GIN_DIR, ".."))


@pytest.fixture
def parse(monkeypatch):
  """parse(run, bindings) -> evaluates gin like the train binary (`__main__.train`)."""
  monkeypatch.setattr(sys.modules["__main__"], "train", trainer.train, raising=False)

  def run(name, bindings=()):
    gin.clear_config()
    gin_utils.parse_gin([f"runs/{name}"], ["MODEL_DIR = '/tmp/unused'", *bindings], [GIN_DIR])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    cfg = gin.query_parameter("train_script.train.train_dataset_cfg").scoped_configurable_fn()
    return model, cfg

  yield run
  gin.clear_config()


@pytest.mark.parametrize("name, length, latents, millions", [
    ("c4_base.gin", 8192, 1024, 216.8), ("pg19_spm.gin", 4096, 2048, 367.8),
    ("maestro_base.gin", 4096, 1024, 151.8)])
def test_paper_sized_configs(parse, spm_path, name, length, latents, millions):
  model, cfg = parse(name, [f"SPM_MODEL = '{spm_path}'"] if "maestro" not in name else [])
  assert dict(cfg.task_feature_lengths) == {"targets": length}
  assert model.num_latents == latents and model.module.embed_dim == 1024
  shapes = jax.eval_shape(lambda r: model.init(r, length), jax.random.key(0))
  assert training.param_count(shapes) / 1e6 == pytest.approx(millions, rel=0.02)



@pytest.mark.parametrize("name, params", [("text_bytes_small.gin", 4_856_064),
                                          ("maestro_small.gin", 4_923_136)])
def test_small_configs_that_learn(parse, name, params):
  """The `*_small.gin` runs README reports: 1024 context, 256 latents, packed rows."""
  model, cfg = parse(name)
  assert dict(cfg.task_feature_lengths) == {"targets": 1024} and cfg.pack
  assert model.num_latents == 256 and model.module.max_length == 1024
  shapes = jax.eval_shape(lambda r: model.init(r, 1024), jax.random.key(0))
  assert training.param_count(shapes) == params


def _loss_on_first_batch(model, cfg):
  batch = next(datasets.numpy_batches(datasets.get_dataset(cfg)))
  length = batch["decoder_target_tokens"].shape[1]
  assert int(batch["decoder_target_tokens"].max()) < model.module.vocab_size
  params = model.init(jax.random.key(0), length)
  loss, metrics = model.loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  assert np.isfinite(float(loss)) and float(metrics["weight_sum"]) > 0
  return batch


def test_tiny_c4_config_on_mock_tfds(parse, spm_path):
  model, cfg = parse("c4_cpu.gin", [f"SPM_MODEL = '{spm_path}'", "TFDS_DATA_DIR = '/no/tfds'"])
  assert cfg.mixture_or_task_name == "c4_en_spm" and cfg.pack
  with tfds.testing.mock_data(num_examples=8):
    batch = _loss_on_first_batch(model, cfg)
  assert "decoder_segment_ids" in batch


def test_tiny_pg19_config_on_local_books(parse, tmp_path):
  for split in ("train", "validation"):
    (tmp_path / split).mkdir()
    for i in range(2):
      (tmp_path / split / f"{i}.txt").write_text(f"{split} book {i} " * 50)
  model, cfg = parse("pg19_cpu.gin", [f"PG19_DIR = '{tmp_path}'"])
  assert cfg.mixture_or_task_name == "pg19_bytes"
  batch = _loss_on_first_batch(model, cfg)
  assert batch["decoder_target_tokens"].shape == (8, 64)


def test_masked_lm_run_readme_reports(parse, tmp_path):
  """text_mlm_io_cpu: the 328,772-parameter Perceiver IO with unmasked-byte reconstruction."""
  model, cfg = parse("text_mlm_io_cpu.gin", [f"TEXT_FILES = '{tmp_path}'"])
  assert model.unmasked_weight == 0.1 and model.mask_id == 259 and not cfg.pack
  assert dict(cfg.task_feature_lengths) == {"inputs": 128, "targets": 128}
  shapes = jax.eval_shape(lambda r: model.init(r, 128), jax.random.key(0))
  assert training.param_count(shapes) == 328_772
