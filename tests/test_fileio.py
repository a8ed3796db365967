"""MODEL_DIR as a URL: nothing lands on the local disk; TF's in-memory ram:// stands in for gs://."""

import io
import json
import os
import threading
import uuid

import jax
import numpy as np
import pytest

from perceiver_ar_t5x import checkpoints, fileio, metrics_log, train, trainer

gfile = fileio.gfile


@pytest.fixture
def ram_dir(tmp_path, monkeypatch):
  """A fresh ram:// dir, with the cwd in an empty tmp dir to catch stray local writes."""
  monkeypatch.chdir(tmp_path)
  path = f"ram://test-{uuid.uuid4().hex[:8]}/run"
  yield path
  assert os.listdir(tmp_path) == [], "a URL path was written to the local disk"


@pytest.mark.parametrize("path,url", [
    ("gs://b/m", True), ("ram://x/y/", True), ("/tmp/m", False), ("m/gs:/b", False),
    ("gs:/b/m", False)])
def test_is_url(path, url):
  assert fileio.is_url(path) is url


def test_absolute_leaves_urls_alone(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.absolute("gs://b/m") == "gs://b/m"
  assert fileio.absolute("gs://b/m/") == "gs://b/m"
  assert fileio.absolute("m") == str(tmp_path / "m")
  assert not (tmp_path / "gs:").exists()


def test_check_model_dir_and_config_on_url(ram_dir):
  trainer.check_model_dir(ram_dir)
  train._write_config(ram_dir, "a = 1\n")
  assert gfile.isdir(ram_dir)
  assert gfile.listdir(ram_dir) == ["config.gin"]  # the write probe is gone
  with gfile.GFile(f"{ram_dir}/config.gin") as f:
    assert f.read() == "a = 1\n"


def test_check_model_dir_reports_unwritable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(trainer.TrainingError, match=f"MODEL_DIR '{blocker}/m' is not writable: "):
    trainer.check_model_dir(f"{blocker}/m")


def test_check_model_dir_from_many_hosts_at_once(tmp_path):
  """Every process of a multi-host job probes MODEL_DIR at start-up: probes must not collide
  (a shared probe name let one process delete another's probe, failing its start-up)."""
  model_dir = str(tmp_path / "m")
  errors = []

  def probe() -> None:
    try:
      for _ in range(25):
        trainer.check_model_dir(model_dir)
    except trainer.TrainingError as e:
      errors.append(str(e))

  threads = [threading.Thread(target=probe) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert os.listdir(model_dir) == []  # every probe removed itself


def test_write_atomic_on_url(ram_dir):
  path = f"{ram_dir}/eval/out.json"
  fileio.write_atomic(path, json.dumps({"a": 1}))
  fileio.write_atomic(path, ["x\n", "y\n"])  # overwrites
  assert gfile.listdir(f"{ram_dir}/eval") == ["out.json"]  # no .tmp left behind
  with gfile.GFile(path) as f:
    assert f.read() == "x\ny\n"


def test_metrics_log_on_url_resumes(ram_dir):
  path = f"{ram_dir}/train/metrics.jsonl"
  log = metrics_log.MetricsLog(path, 0)
  for step in range(1, 6):
    log.write(step, {"loss": 1.0 / step, "grad_norm": 0.5, "learning_rate": 0.1})
  log.close()
  assert metrics_log.losses_by_step(path) == {s: 1.0 / s for s in range(1, 6)}
  log = metrics_log.MetricsLog(path, 3)  # resumed from step 3: steps 4, 5 are recomputed
  log.write(4, {"loss": 7.0})
  log.close()
  assert metrics_log.losses_by_step(path) == {1: 1.0, 2: 0.5, 3: 1.0 / 3, 4: 7.0}
  assert sorted(gfile.listdir(f"{ram_dir}/train")) == ["metrics.jsonl"]


def test_write_via_local_copies_to_url(ram_dir):
  def write(local: str) -> None:
    assert not fileio.is_url(local)
    with open(local, "wb") as f:
      f.write(b"MThd")

  fileio.write_via_local(f"{ram_dir}/a.mid", write)
  with gfile.GFile(f"{ram_dir}/a.mid", "rb") as f:
    assert f.read() == b"MThd"


def _corrupt_run(model_dir) -> tuple[checkpoints.Checkpointer, dict]:
  """Real orbax checkpoints at steps 1 and 2 of a tiny pytree; step 2's files overwritten."""
  ckpt = checkpoints.Checkpointer(str(model_dir), checkpoints.CheckpointConfig(async_save=False))
  for step in (1, 2):
    ckpt.save(step, {"w": np.full((2, 3), step, np.float32)}, {"step": step})
  ckpt.wait()
  for path in (model_dir / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return ckpt, {"w": jax.ShapeDtypeStruct((2, 3), np.float32, sharding=sharding)}


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_zero_quarantines(tmp_path, monkeypatch, process):
  model_dir = tmp_path / "model"
  ckpt, abstract = _corrupt_run(model_dir)
  monkeypatch.setattr(jax, "process_index", lambda: process)
  step, state, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 1 and float(state["w"][0, 0]) == 1.0
  moved = (model_dir / "checkpoints_corrupt").exists()
  left = sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
  if process == 0:
    assert moved and left == ["1"]
  else:  # other processes skip the bad step and leave the move to process 0
    assert not moved and left == ["1", "2"]


def test_maestro_midi_reads_from_url(ram_dir):
  """MAESTRO_DIR on gs:// (ram:// here): the CSV, the listing and every .midi via gfile."""
  import pretty_midi

  from perceiver_ar_t5x import datasets
  from perceiver_ar_t5x.tasks import locations, midi

  def piece(i: int) -> bytes:
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(80, 50 + i + k, 0.2 * k, 0.2 * k + 0.3) for k in range(5)]
    pm.instruments.append(piano)
    out = io.BytesIO()
    pm.write(out)
    return out.getvalue()

  rows = ["split,midi_filename"] + [f"validation,2018/p{i}.midi" for i in range(2)]
  fileio.write_text(f"{ram_dir}/maestro-v3.0.0.csv", "\n".join(rows) + "\n")
  for i in range(2):
    with gfile.GFile(f"{ram_dir}/2018/p{i}.midi", "wb") as f:
      f.write(piece(i))
  locations.configure(maestro_dir=ram_dir)
  try:
    cfg = datasets.DatasetConfig("maestro_midi", {"targets": 64}, "validation", batch_size=1,
                                 shuffle=False)
    got = [b["decoder_target_tokens"][0] for b in
           datasets.numpy_batches(datasets.get_dataset(cfg, repeat=False))]
  finally:
    locations.reset()
  want = [midi.notes_to_events(midi.load_midi(f"{ram_dir}/2018/p{i}.midi")) for i in range(2)]
  assert [g[g > 0].tolist() for g in got] == [w.tolist() + [midi.EOS_ID] for w in want]
  assert [n.pitch for n in midi.events_to_notes(got[1])] == [51, 52, 53, 54, 55]
