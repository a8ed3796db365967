"""Checkpoint lifecycle: keep-K, fallback, SIGTERM save, kill -9 bit-identical resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x import checkpoints, metrics_log, multihost
from tests import binaries
from tests.conftest import REPO, binary_env


def _state(value: float) -> dict:
  return {"w": jnp.full((3, 2), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def _abstract() -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _state(0.0))


def _corrupt(step_dir) -> None:
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")


def test_keeps_the_newest_k(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), checkpoints.CheckpointConfig(keep=2))
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 4]


def test_corrupt_newest_falls_back_and_is_moved_aside(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.wait()
  _corrupt(tmp_path / "checkpoints" / "2")
  reader = checkpoints.Checkpointer(str(tmp_path), read_only=True)
  assert reader.restore_latest(_abstract())[0] == 1
  assert (tmp_path / "checkpoints" / "2").exists()  # read-only: nothing moved
  step, state, meta = ckpt.restore_latest(_abstract())
  assert (step, meta) == (1, {"step": 1}) and float(state["w"][0, 0]) == 1.0
  moved = list((tmp_path / "checkpoints_corrupt").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("2-")
  assert ckpt.steps() == [1]
  ckpt.save(2, _state(2.5), {"step": 2})  # the step can be saved again
  assert ckpt.restore_latest(_abstract())[0] == 2
  ckpt.close()


def test_resolve_path(tmp_path):
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  root = str(tmp_path)
  assert checkpoints.resolve_path(root) == (root, None)
  assert checkpoints.resolve_path(root + "/checkpoints") == (root, None)
  assert checkpoints.resolve_path(root + "/checkpoints/7/") == (root, 7)
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint at"):
    checkpoints.resolve_path(root + "/nothing")


def test_metrics_log_drops_steps_past_the_restored_one_and_torn_lines(tmp_path):
  path = str(tmp_path / "train" / "metrics.jsonl")
  log = metrics_log.MetricsLog(path, 0)
  for step in range(1, 6):
    log.write(step, {"loss": np.float32(step / 3), "grad_norm": 1.0, "learning_rate": 0.1})
  log.close()
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')  # killed mid-line
  assert sorted(metrics_log.losses_by_step(path)) == [1, 2, 3, 4, 5]
  assert metrics_log.losses_by_step(path)[2] == float(np.float32(2 / 3))  # exact round trip
  metrics_log.MetricsLog(path, 3).close()  # resumed from step 3
  assert sorted(metrics_log.losses_by_step(path)) == [1, 2, 3]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_flag_catches_both_signals(sig):
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  flag = multihost.StopFlag()
  try:
    flag.install()
    os.kill(os.getpid(), sig)
    time.sleep(0.05)
    assert flag.signum == sig
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)


def _start(model_dir, *args, gin_file="gin/tiny.gin", env=None):
  cmd = binaries.command("train", f"--gin.MODEL_DIR='{model_dir}'", *binaries.FAST, *args,
                         gin_files=(gin_file,))
  return subprocess.Popen(cmd, cwd=REPO, env={**binary_env(), **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, metrics: str, count: int) -> None:
  deadline = time.time() + 500
  while len(metrics_log.read(metrics)) < count:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
  model_dir = tmp_path / "m"
  proc = _start(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000")
  _wait_for_steps(proc, str(model_dir / "train" / "metrics.jsonl"), 3)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  steps = [int(p.name) for p in (model_dir / "checkpoints").iterdir()]
  assert len(steps) == 1 and steps[0] >= 3
  assert f"Stopped by SIGTERM: saved checkpoint at step {steps[0]}" in stderr
  assert f"stopped by SIGTERM at step {steps[0]}" in stdout
  logged = [json.loads(line)["step"] for line in
            (model_dir / "train" / "metrics.jsonl").read_text().splitlines()]
  assert logged == list(range(1, steps[0] + 1))


def _text_corpus(root) -> dict[str, str]:
  """Documents of different lengths (some longer than a row, so packing and crops both act)."""
  env = {}
  for split, count in (("train", 9), ("valid", 2)):
    (root / split).mkdir(parents=True)
    for i in range(count):
      words = " ".join(f"{split}{i}-word{j}" for j in range(3 + 4 * i))
      (root / split / f"doc{i}.txt").write_text(words)
  env["TEXT_FILES"], env["TEXT_VALIDATION_FILES"] = str(root / "train"), str(root / "valid")
  return env


def _maestro(root) -> dict[str, str]:
  """A MAESTRO-layout folder of short piano pieces written with pretty_midi."""
  import pretty_midi
  rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
  for i, split in enumerate(["train"] * 6 + ["validation"]):
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(60 + j % 20, 40 + i + j % 12, 0.1 * j, 0.1 * j + 0.25)
                   for j in range(10 + 5 * i)]
    pm.instruments.append(piano)
    (root / "2018").mkdir(parents=True, exist_ok=True)
    pm.write(str(root / "2018" / f"piece{i}.midi"))
    rows.append(f"C,T{i},{split},2018,2018/piece{i}.midi,x.wav,1.0")
  (root / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
  return {"MAESTRO_DIR": str(root)}


def test_input_position_is_restored_without_replay(tmp_path, caplog):
  from perceiver_ar_t5x import data_state, datasets, tasks
  env = _text_corpus(tmp_path / "corpus")
  tasks.configure(text_files=env["TEXT_FILES"])
  try:
    cfg = datasets.DatasetConfig("text_bytes", {"targets": 24}, "train", 4, pack=True)
    batches = data_state.TrainBatches(datasets.get_dataset(cfg), pipeline="packed 24")
    head = [next(batches) for _ in range(3)]
    ckpt = checkpoints.Checkpointer(str(tmp_path / "m"))
    ckpt.save(3, _state(3), {"step": 3}, data=batches.save())
    ckpt.close()
    want = [next(batches) for _ in range(4)]
    saved = checkpoints.Checkpointer(str(tmp_path / "m"), read_only=True).read_data(3)
    assert sorted(saved) == [".data-00000-of-00001", ".index", ".pipeline"]
    assert (tmp_path / "m" / "checkpoints" / "3" / "data" / "train_ds-0-of-1.index").exists()
    # {}: a checkpoint of an older run; another pipeline description: a changed config
    for position, pipeline, replays in ((saved, "packed 24", False), ({}, "packed 24", True),
                                        (saved, "other", True)):
      caplog.clear()
      resumed = data_state.resumed(datasets.get_dataset(cfg), pipeline, position, 3)
      assert ("replaying 3 batches" in caplog.text) == replays
      for got, expected in zip([next(resumed) for _ in range(4)], want, strict=True):
        assert got.keys() == expected.keys() and "decoder_segment_ids" in got
        for key in got:
          np.testing.assert_array_equal(got[key], expected[key])
    assert any(not np.array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
               for a, b in zip(head, want[:3], strict=True))
  finally:
    tasks.configure(text_files=None)


def _run_config_baseline(model_dir, gin_file, env, steps):
  """An uninterrupted run of a gin/runs config, ending as users see it: final eval + sample."""
  proc = binaries.train(model_dir, f"--gin.TRAIN_STEPS={steps}",
                        "--gin.train_script.train.sample_at_end=True",
                        gin_files=(gin_file,), env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final eval metrics" in proc.stdout and "sample" in proc.stdout, proc.stdout[-2000:]
  assert "tasks.configure" in (model_dir / "config.gin").read_text()
  expected = metrics_log.read(str(model_dir / "train" / "metrics.jsonl"))
  assert [r["step"] for r in expected] == list(range(1, steps + 1))
  return expected


def _assert_resumed(proc, step):
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Restored checkpoint for step {step}" in proc.stderr, proc.stderr[-3000:]
  assert f"Restored the input position of step {step} (no batches replayed)" in proc.stderr


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_bit_identical_loss_curve(tmp_path):
  """A real kill -9 of a packed file-task run (text_bytes); the resumed run reads the
  batches the uninterrupted run read, from the saved iterator state, to every bit."""
  env = _text_corpus(tmp_path / "data")
  gin_file = "gin/runs/text_bytes_cpu.gin"
  expected = _run_config_baseline(tmp_path / "a", gin_file, env, 24)
  metrics = str(tmp_path / "b" / "train" / "metrics.jsonl")
  proc = _start(tmp_path / "b", "--gin.TRAIN_STEPS=24", gin_file=gin_file, env=env)
  _wait_for_steps(proc, metrics, 7)  # past checkpoint 5 ...
  deadline = time.time() + 300
  while not (tmp_path / "b" / "checkpoints" / "5").exists():  # ... once orbax finalized it
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = binaries.train(tmp_path / "b", "--gin.TRAIN_STEPS=24", gin_files=(gin_file,),
                           env=env)
  restored = re.search(r"Restored checkpoint for step (\d+)", resumed.stderr)
  assert restored and 5 <= int(restored.group(1)) < 24, resumed.stderr[-3000:]
  _assert_resumed(resumed, int(restored.group(1)))
  got = metrics_log.read(metrics)
  assert [r["step"] for r in got] == list(range(1, 25))
  assert got == expected  # loss, grad norm, learning rate: every bit


@pytest.mark.slow
def test_maestro_resume_restores_the_input_position_bit_identically(tmp_path):
  """The disk a kill -9 after step 12 leaves when checkpoints 10 and 12 were not yet written:
  checkpoint 5 and metrics up to 12. The resumed run must read the batches the
  uninterrupted run read at steps 6..12, from the saved iterator state (no replay)."""
  env = _maestro(tmp_path / "data")
  gin_file = "gin/runs/maestro_cpu.gin"
  expected = _run_config_baseline(tmp_path / "a", gin_file, env, 12)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  for step in (10, 12):
    shutil.rmtree(tmp_path / "b" / "checkpoints" / str(step))
  resumed = binaries.train(tmp_path / "b", "--gin.TRAIN_STEPS=12", gin_files=(gin_file,),
                           env=env)
  _assert_resumed(resumed, 5)
  assert metrics_log.read(str(tmp_path / "b" / "train" / "metrics.jsonl")) == expected


@pytest.mark.slow
# 2 x 2 processes; the mechanism is test_input_position_is_restored_without_replay's
@pytest.mark.extended
def test_each_process_saves_and_restores_its_own_input_position(tmp_path):
  from tests import test_multihost as mh
  model_dir = tmp_path / "m"
  mh.train_two_processes(model_dir)  # 6 steps, checkpoints 5 and 6
  expected = metrics_log.read(str(model_dir / "train" / "metrics.jsonl"))
  data = model_dir / "checkpoints" / "5" / "data"
  assert sorted(p.name for p in data.iterdir() if p.name.endswith(".index")) == [
      "train_ds-0-of-2.index", "train_ds-1-of-2.index"]
  shutil.rmtree(model_dir / "checkpoints" / "6")  # as if killed before saving step 6
  results = mh.finish(mh.spawn_two(model_dir, *mh.ARGS), timeout=600)
  for i, result in enumerate(results):
    assert result.returncode == 0, f"process {i}:\n{result.stderr[-3000:]}"
    assert "Restored the input position of step 5 (no batches replayed)" in result.stderr
  assert metrics_log.read(str(model_dir / "train" / "metrics.jsonl")) == expected
