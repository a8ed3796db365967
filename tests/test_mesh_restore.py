"""A checkpoint written on one mesh restores onto another and continues the same run.

Saved on (data=4, model=2) with model-parallel params and sharded Adam moments;
restored onto (8, 1) and onto a single device (1, 1) with a real orbax
Checkpointer: the restored arrays are bit-identical, land in the new mesh's
shardings, and the next steps produce the same losses as the run that never stopped.
"""

import jax
import numpy as np
import optax
import pytest

from perceiver_ar_t5x import checkpoints, training
from perceiver_ar_t5x import partitioning as pt
from tests.test_partitioning import LENGTH, divisible_model, make_batch

MODEL = divisible_model(dropout_rate=0.1, prefix_dropout=0.3)
OPTIMIZER = optax.adamw(3e-3)
SAVED_AT, CONTINUE_TO = 2, 4
STEP_RNG = jax.random.key(5)


def setup(mesh_shape: tuple[int, int], seed: int):
  data, model_axis = mesh_shape
  mesh = pt.make_mesh(model_axis, jax.devices()[:data * model_axis])
  rules = pt.logical_axis_rules(pt.PartitioningConfig(num_partitions=model_axis))
  state, part = training.create_state(MODEL, OPTIMIZER, jax.random.key(seed), LENGTH, mesh,
                                      rules)
  schedule = optax.constant_schedule(3e-3)
  return state, training.make_train_step(MODEL, OPTIMIZER, schedule, part)


def run_steps(state, step_fn, first: int, last: int):
  losses = []
  for step in range(first, last):
    state, metrics = step_fn(state, make_batch(seed=step), STEP_RNG)
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def saved_on_4x2(tmp_path_factory):
  """(model_dir, host copy of the saved state, losses of the uninterrupted steps 3..4)."""
  model_dir = str(tmp_path_factory.mktemp("mesh_4x2"))
  state, step_fn = setup((4, 2), seed=0)
  state, _ = run_steps(state, step_fn, 0, SAVED_AT)
  ckpt = checkpoints.Checkpointer(model_dir, checkpoints.CheckpointConfig(period=1))
  ckpt.save(SAVED_AT, state, {"step": SAVED_AT}, force=True)
  ckpt.close()
  saved = jax.tree.map(np.asarray, state)
  assert state.params["layers_0"]["attention"]["query"].sharding.spec[1] == "model"
  _, losses = run_steps(state, step_fn, SAVED_AT, CONTINUE_TO)
  return model_dir, saved, losses


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1), (1, 1)])
def test_restore_on_another_mesh_continues_with_the_same_loss(saved_on_4x2, mesh_shape):
  model_dir, saved, expected = saved_on_4x2
  fresh, step_fn = setup(mesh_shape, seed=123)  # different init: only the restore can match
  ckpt = checkpoints.Checkpointer(model_dir, checkpoints.CheckpointConfig(period=1))
  step, state, _ = ckpt.restore_latest(training.abstract_state(fresh))
  ckpt.close()
  assert step == SAVED_AT and int(state.step) == SAVED_AT
  for got, want, target in zip(jax.tree.leaves(state), jax.tree.leaves(saved),
                               jax.tree.leaves(fresh), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)  # bit-exact
    assert got.sharding.is_equivalent_to(target.sharding, got.ndim)
  assert len(jax.tree.leaves(state)[0].sharding.device_set) == mesh_shape[0] * mesh_shape[1]
  _, losses = run_steps(state, step_fn, SAVED_AT, CONTINUE_TO)
  np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-6)
