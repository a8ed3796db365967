"""A restore refuses a checkpoint of another model and quarantines only what is damaged."""

import jax
import jax.numpy as jnp
import pytest

import gin
from perceiver_ar_t5x import checkpoints, gin_utils, metrics_log, trainer
from tests import binaries

FAST_READS = checkpoints.CheckpointConfig(read_attempts=3, retry_delay_s=0.01)


def _state(value: float, cols: int = 2) -> dict:
  return {"w": jnp.full((3, cols), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(cols: int = 2) -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _state(0.0, cols))


def _saved(tmp_path, steps=(1, 2)) -> checkpoints.Checkpointer:
  ckpt = checkpoints.Checkpointer(str(tmp_path), FAST_READS)
  for step in steps:
    ckpt.save(step, _state(step), {"step": step, "model": {"cols": 2}})
  ckpt.wait()
  return ckpt


def _train_tiny_with_macros(model_dir, *bindings: str) -> None:
  """Trains tiny.gin in-process, passing the gin macros as the train binary does."""
  with binaries.tiny_gin(f"MODEL_DIR = '{model_dir}'", "EVAL_PERIOD = 0", *bindings):
    macros = {m: gin.query_parameter(f"%{m}") for m in gin_utils.defined_macros()}
    gin.get_configurable(trainer.train)(handle_signals=False, sample_at_end=False,
                                        config_values=macros)


@pytest.mark.slow
def test_num_heads_change_refuses_and_changes_nothing(tmp_path):
  model_dir = tmp_path / "m"
  _train_tiny_with_macros(model_dir, "TRAIN_STEPS = 10", "CHECKPOINT_PERIOD = 5")
  (model_dir / "config.gin").write_text("# the run's config\n")
  metrics = model_dir / "train" / "metrics.jsonl"
  before = (binaries.checkpoint_files(model_dir), metrics.read_bytes(),
            (model_dir / "config.gin").read_bytes())
  proc = binaries.train(model_dir, "--gin.TRAIN_STEPS=10", "--gin.NUM_HEADS=4")
  line = binaries.error_line(proc, "train")
  assert line == ("train: error: CheckpointMismatch: layers_0/attention/key is (32, 2, 16) in "
                  "checkpoint 10, the config gives (32, 4, 16): NUM_HEADS 2 -> 4")
  after = (binaries.checkpoint_files(model_dir), metrics.read_bytes(),
           (model_dir / "config.gin").read_bytes())
  assert after == before  # every checkpoint file, the metrics log and config.gin
  assert not (model_dir / "checkpoints_corrupt").exists()
  # eval/infer refuse the same way
  model = binaries.tiny_model(num_heads=4)
  with pytest.raises(checkpoints.CheckpointMismatch,
                     match=r"layers_0/attention/key is \(32, 2, 16\) in checkpoint 10, the "
                           r"config gives \(32, 4, 16\): num_heads 2 -> 4"):
    checkpoints.load_params(model, str(model_dir), 16)


def test_shape_mismatch_is_refused_not_quarantined(tmp_path):
  ckpt = _saved(tmp_path)
  meta = {"model": {"cols": 5}}
  with pytest.raises(checkpoints.CheckpointMismatch,
                     match=r"^w is \(3, 2\) in checkpoint 2, the config gives \(3, 5\): "
                           r"cols 2 -> 5$"):
    ckpt.restore_latest(_abstract(cols=5), meta=meta)
  assert ckpt.steps() == [1, 2] and not (tmp_path / "checkpoints_corrupt").exists()
  extra = {**_abstract(), "v": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with pytest.raises(checkpoints.CheckpointMismatch, match="^v is not in checkpoint 2"):
    ckpt.restore_latest(extra)
  ckpt.close()


def test_truncated_checkpoint_is_quarantined_and_the_previous_used(tmp_path):
  ckpt = _saved(tmp_path)
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  for path in (state_dir / "d").rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:3])  # a write cut short
  step, state, _ = ckpt.restore_latest(_abstract())
  assert step == 1 and float(state["w"][0, 0]) == 1.0
  moved = list((tmp_path / "checkpoints_corrupt").iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["2"] and ckpt.steps() == [1]
  ckpt.close()


def test_transient_read_errors_are_retried_and_nothing_quarantined(tmp_path, monkeypatch):
  ckpt = _saved(tmp_path)
  real_restore, real_shapes = ckpt.restore, checkpoints.checkpoint_match.stored_shapes
  failures = {"restore": 2, "metadata": 1}

  def flaky(name, real):
    def call(*args, **kwargs):
      if failures[name]:
        failures[name] -= 1
        raise OSError(f"UNAVAILABLE: injected transient {name} error")
      return real(*args, **kwargs)
    return call

  monkeypatch.setattr(ckpt, "restore", flaky("restore", real_restore))
  monkeypatch.setattr(checkpoints.checkpoint_match, "stored_shapes",
                      flaky("metadata", real_shapes))
  step, state, meta = ckpt.restore_latest(_abstract())
  assert failures == {"restore": 0, "metadata": 0}
  assert step == 2 and float(state["w"][0, 0]) == 2.0 and meta["step"] == 2
  assert ckpt.steps() == [1, 2] and not (tmp_path / "checkpoints_corrupt").exists()
  ckpt.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  ckpt = _saved(tmp_path)
  for path in (tmp_path / "checkpoints").rglob("_METADATA"):
    path.write_text("{")
  with pytest.raises(checkpoints.CheckpointError, match=r"none of the checkpoints \[1, 2\]"):
    ckpt.restore_latest(_abstract())
  ckpt.close()


def test_metrics_log_only_appends_unless_steps_are_recomputed(tmp_path):
  path = tmp_path / "train" / "metrics.jsonl"
  log = metrics_log.MetricsLog(str(path), 0)
  for step in range(1, 6):
    log.write(step, {"loss": step / 3, "grad_norm": 1.0, "learning_rate": 0.1})
  log.close()
  first = path.read_bytes()
  log = metrics_log.MetricsLog(str(path), 5)  # resumed at the newest step: append only
  log.write(6, {"loss": 2.0})
  log.close()
  assert path.read_bytes().startswith(first)
  with open(path, "a") as f:
    f.write('{"step": 7, "lo')  # killed mid-line
  log = metrics_log.MetricsLog(str(path), 6)
  log.write(7, {"loss": 3.0})
  log.close()
  assert metrics_log.losses_by_step(str(path))[7] == 3.0  # the torn line did not swallow it
  metrics_log.MetricsLog(str(path), 3).close()  # resumed from step 3: 4..7 are recomputed
  assert sorted(metrics_log.losses_by_step(str(path))) == [1, 2, 3]
