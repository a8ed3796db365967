"""Multi-host training on one machine: 2 processes x 4 CPU devices == 1 process x 8 devices.

The real train binary runs twice on gin/tiny.gin: once as a single process with 8
fake devices, once as 2 processes (jax.distributed over loopback, gloo CPU
collectives) with 4 fake devices each. With `shard_global_batches` every global
batch is the same in both runs, so the per-step losses, the final eval and the
orbax checkpoints (written by both processes) must agree.

Control that must agree across processes: SIGTERM to one process stops both at the
same step with one checkpoint; kill -9 of one ends the other with one error line; only
process 0 writes config.gin and model-info.txt (each process records the files it
writes through `fileio.write_text`, see LAUNCH).
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from perceiver_ar_t5x import datasets
from perceiver_ar_t5x.tasks import copy
from tests import binaries
from tests.conftest import FAST_COMPILE, REPO, binary_env

STEPS = 6
SAME_BATCHES = ("--gin.train/datasets.DatasetConfig.shard_global_batches=True",
                "--gin.train_eval/datasets.DatasetConfig.shard_global_batches=True")
ARGS = (*binaries.FAST, f"--gin.TRAIN_STEPS={STEPS}", "--gin.EVAL_STEPS=2", *SAME_BATCHES)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The train binary, with every fileio.write_text call logged as "<process> <file name>".
LAUNCH = """
import os, runpy
from perceiver_ar_t5x import fileio
write_text = fileio.write_text
def logged(path, text):
  with open(os.environ["WRITES_LOG"], "a") as f:
    f.write(os.environ["PROCESS"] + " " + os.path.basename(path) + "\\n")
  write_text(path, text)
fileio.write_text = logged
runpy.run_module("perceiver_ar_t5x.train", run_name="__main__", alter_sys=True)
"""


def spawn_two(model_dir: pathlib.Path, *args: str) -> list[subprocess.Popen]:
  """Starts the train binary as processes 0 and 1 of one run (output in model_dir's parent)."""
  address = f"127.0.0.1:{free_port()}"
  command = binaries.command("train", f"--gin.MODEL_DIR='{model_dir}'", *args,
                             f"--coordinator_address={address}", "--process_count=2")
  procs = []
  for i in range(2):
    env = {**binary_env(),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}",
           "JAX_PLATFORMS": "cpu", "PROCESS": str(i),
           "WRITES_LOG": str(model_dir.parent / "writes.log")}
    procs.append(subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *command[3:], f"--process_index={i}"], cwd=REPO,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
  """Waits for every process (kill -9 what is still running after `timeout` seconds)."""
  deadline, results = time.monotonic() + timeout, []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
      err += f"\n[test] still running after {timeout} s: killed"
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
  return results


def train_two_processes(model_dir: pathlib.Path) -> list[subprocess.CompletedProcess]:
  results = finish(spawn_two(model_dir, *ARGS), timeout=600)
  for i, result in enumerate(results):
    assert result.returncode == 0, f"process {i}:\n{result.stderr[-3000:]}"
  return results


def writers(model_dir: pathlib.Path) -> dict[str, set[str]]:
  """config.gin / model-info.txt -> the processes that wrote it."""
  found: dict[str, set[str]] = {}
  for line in (model_dir.parent / "writes.log").read_text().splitlines():
    process, name = line.split(" ", 1)
    if name in ("config.gin", "model-info.txt"):
      found.setdefault(name, set()).add(process)
  return found


def wait_for_steps(model_dir: pathlib.Path, procs: list[subprocess.Popen], steps: int) -> None:
  """Returns once process 0 has logged `steps` steps (both are then past compiling)."""
  log = model_dir / "train" / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (log.exists() and len(log.read_text().splitlines()) >= steps):
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      results = finish(procs, timeout=5)
      pytest.fail("training did not start:\n" + "\n".join(r.stderr[-2000:] for r in results))
    time.sleep(0.2)


def step_losses(model_dir: pathlib.Path) -> list[float]:
  lines = (model_dir / "train" / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["loss"] for line in lines]


def final_eval(proc: subprocess.CompletedProcess) -> dict[str, float]:
  line = next(x for x in proc.stdout.splitlines() if x.startswith("final eval metrics: "))
  return json.loads(line.removeprefix("final eval metrics: "))


def load_state(step_dir: pathlib.Path):
  """The saved train state as numpy arrays, whatever mesh and process count wrote it."""
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(step_dir / "state").item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(step_dir / "state", restore_args=args)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = binaries.train(tmp_path / "single", f"--gin.TRAIN_STEPS={STEPS}",
                          "--gin.EVAL_STEPS=2", *SAME_BATCHES)
  assert single.returncode == 0, single.stderr[-3000:]
  multi = train_two_processes(tmp_path / "multi")

  expected = step_losses(tmp_path / "single")
  assert len(expected) == STEPS
  np.testing.assert_allclose(step_losses(tmp_path / "multi"), expected, rtol=1e-6)
  for proc in multi:  # every process computes the same global eval
    got, want = final_eval(proc), final_eval(single)
    assert got.keys() == want.keys()
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-4)

  assert writers(tmp_path / "multi") == {"config.gin": {"0"}, "model-info.txt": {"0"}}
  ckpt = tmp_path / "multi" / "checkpoints"
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [5, STEPS]
  state_dir = ckpt / str(STEPS) / "state"
  for i in range(2):  # both processes wrote their shards (orbax OCDBT, then merged)
    assert any((state_dir / f"ocdbt.process_{i}" / "d").iterdir())
  assert (ckpt / str(STEPS) / "commit_success.txt").exists()
  saved_multi = jax.tree.leaves(load_state(ckpt / str(STEPS)))
  saved_single = jax.tree.leaves(load_state(tmp_path / "single" / "checkpoints" / str(STEPS)))
  assert len(saved_multi) == len(saved_single) > 10
  for a, b in zip(saved_multi, saved_single, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pack", [False, True])
def test_host_shards_assemble_into_the_single_process_batch(pack):
  """Rows of host i = rows [i*b/n, (i+1)*b/n) of the global batch the 1-host run reads."""
  copy.register("copy_multihost", vocab_size=20)
  cfg = datasets.DatasetConfig("copy_multihost", {"targets": 12}, "train", batch_size=8,
                               pack=pack, shard_global_batches=True)

  def batches(index: int, count: int) -> list[dict[str, np.ndarray]]:
    ds = datasets.get_dataset(cfg, shard_index=index, num_shards=count)
    return [b for b, _ in zip(datasets.numpy_batches(ds), range(3), strict=False)]

  whole = batches(0, 1)
  hosts = [batches(i, 4) for i in range(4)]
  for step, expected in enumerate(whole):
    for key, value in expected.items():
      assert value.shape[0] == 8
      joined = np.concatenate([host[step][key] for host in hosts])
      np.testing.assert_array_equal(joined, value)


LONG_RUN = (*binaries.FAST, "--gin.TRAIN_STEPS=5000", "--gin.CHECKPOINT_PERIOD=100000",
            *SAME_BATCHES)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step(tmp_path):
  model_dir = tmp_path / "run"
  procs = spawn_two(model_dir, *LONG_RUN)
  wait_for_steps(model_dir, procs, 3)
  os.kill(procs[1].pid, signal.SIGTERM)  # the process that writes no metrics
  results = finish(procs, timeout=300)
  for i, result in enumerate(results):
    assert result.returncode == 0, f"process {i}:\n{result.stderr[-3000:]}"
  stops = [re.findall(r"^stopped by SIGTERM at step (\d+);", r.stdout, re.M) for r in results]
  assert stops[0] == stops[1] and len(stops[0]) == 1, [r.stdout for r in results]
  step = int(stops[0][0])
  ckpt = model_dir / "checkpoints"
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == [str(step)]
  assert (ckpt / str(step) / "commit_success.txt").exists()
  assert len(step_losses(model_dir)) == step
  assert writers(model_dir) == {"config.gin": {"0"}, "model-info.txt": {"0"}}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(
    signal.SIGSTOP, marks=pytest.mark.extended)], ids=["kill_9", "frozen"])
def test_a_dead_process_ends_the_other_with_one_error_line(tmp_path, sig):
  """kill -9: the survivor's collective fails at once (gloo) or it sees no heartbeat.

  SIGSTOP freezes process 1 with its sockets open, as a hung host would: the survivor
  blocks inside a collective and only its watchdog can end it (5 s here; before the fix,
  JAX's heartbeat timeout aborted it with a crash report).
  """
  model_dir = tmp_path / "run"
  procs = spawn_two(model_dir, *LONG_RUN, "--heartbeat_timeout_seconds=10")
  wait_for_steps(model_dir, procs, 3)
  os.kill(procs[1].pid, sig)
  try:
    survivor = finish(procs[:1], timeout=120)[0]  # bounded: no hang in a collective
  finally:
    procs[1].kill()
    procs[1].communicate()
  line = binaries.error_line(survivor, "train")
  assert survivor.returncode == 1
  assert line.startswith("train: error: PeerFailure: "), line
