"""Train step partitioning, learning, and checkpoint resume (in-process)."""

import dataclasses

import jax
import numpy as np
import pytest

import perceiver_ar_t5x.tasks  # noqa: F401  (registers copy_mirrored)
from perceiver_ar_t5x import checkpoints, datasets, models, optimizers, trainer, training
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.perceiver_ar import PerceiverAR


def _model(**kw):
  module = PerceiverAR(vocab_size=32, num_latents=8, embed_dim=16, num_heads=2, head_dim=8,
                       mlp_dim=24, num_layers=2, prefix_dropout=0.25, **kw)
  return models.PerceiverARModel(module, cropping=models.CroppingMethod.FULL_LATENTS_WITH_PREFIX)


def _batch(seed=0, batch=8, length=16):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, 32, (batch, length)).astype(np.int32)
  return {"decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], [(0, 0), (1, 0)]),
          "decoder_loss_weights": np.ones_like(targets)}


def _one_step(num_partitions, devices):
  model = _model()
  opt, sched = optimizers.make_optimizer(optimizers.OptimizerConfig(warmup_steps=1), 10)
  mesh = pt.make_mesh(num_partitions, devices)
  state, part = training.create_state(model, opt, jax.random.key(0), 16, mesh,
                                      pt.logical_axis_rules())
  step = training.make_train_step(model, opt, sched, part)
  state, metrics = step(state, _batch(), jax.random.key(1))
  return jax.device_get(state.params), jax.device_get(metrics)


def test_train_step_on_2x4_mesh_equals_one_device():
  assert jax.device_count() == 8
  p1, m1 = _one_step(1, jax.devices()[:1])
  p8, m8 = _one_step(4, jax.devices())  # mesh (data=2, model=4)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p8, p1)


def _train(tmp_path, steps, **loop):
  lengths = {"inputs": 8, "targets": 8}
  cfg = datasets.DatasetConfig("copy_mirrored", lengths, "train", 8)
  eval_cfg = dataclasses.replace(cfg, split="validation", shuffle=False)
  return trainer.train(
      model=_model(), optimizer_cfg=optimizers.OptimizerConfig(learning_rate=3e-3,
                                                               warmup_steps=5),
      train_dataset_cfg=cfg, train_eval_dataset_cfg=eval_cfg, model_dir=str(tmp_path),
      loop_cfg=trainer.LoopConfig(total_steps=steps, eval_period=0, eval_steps=2,
                                  stats_period=10, **loop),
      checkpoint_cfg=checkpoints.CheckpointConfig(period=10, async_save=False),
      partitioning_cfg=pt.PartitioningConfig(num_partitions=2), handle_signals=False,
      sample_at_end=False)


@pytest.mark.slow
def test_short_run_lowers_loss_and_resumes_at_the_right_step(tmp_path):
  first = _train(tmp_path, 10)
  assert int(first.state.step) == 10
  early_loss = first.metrics["loss"]
  ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(async_save=False))
  assert ckpt.steps() == [10]
  ckpt.close()
  second = _train(tmp_path, 60)  # resumes from step 10, not from scratch
  assert int(second.state.step) == 60
  assert second.metrics["loss"] < early_loss - 0.2
  ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(async_save=False))
  assert ckpt.steps()[-1] == 60 and 10 not in ckpt.steps()[:-3]
  ckpt.close()
