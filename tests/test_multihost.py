"""Multi-host training on one machine: 2 processes x 4 CPU devices == 1 process x 8 devices.

The real train binary runs twice on gin/tiny.gin: once as a single process with 8
fake devices, once as 2 processes (jax.distributed over loopback, gloo CPU
collectives) with 4 fake devices each. With `shard_global_batches` every global
batch is the same in both runs, so the per-step losses, the final eval and the
orbax checkpoints (written by both processes) must agree.
"""

import json
import os
import pathlib
import socket
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from perceiver_ar_t5x import datasets
from perceiver_ar_t5x.tasks import copy
from tests import binaries
from tests.conftest import REPO, binary_env

STEPS = 6
SAME_BATCHES = ("--gin.train/datasets.DatasetConfig.shard_global_batches=True",
                "--gin.train_eval/datasets.DatasetConfig.shard_global_batches=True")
ARGS = (*binaries.FAST, f"--gin.TRAIN_STEPS={STEPS}", "--gin.EVAL_STEPS=2", *SAME_BATCHES)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_two_processes(model_dir: pathlib.Path) -> list[subprocess.CompletedProcess]:
  env = {**binary_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(
      binaries.command("train", f"--gin.MODEL_DIR='{model_dir}'", *ARGS,
                       f"--coordinator_address={address}", "--process_count=2",
                       f"--process_index={i}"),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  results = []
  for i, proc in enumerate(procs):
    try:
      out, err = proc.communicate(timeout=600)
    finally:
      if proc.poll() is None:
        os.kill(proc.pid, 9)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"
  return results


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
