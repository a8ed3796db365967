"""scripts/benchmark.sh: the one command that runs a benchmark from a clean clone."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BASH = shutil.which("bash") or "/bin/bash"


@pytest.mark.parametrize("args", [[], ["nope"], ["decode_peer"]])
def test_unknown_benchmark_is_one_error_line_listing_the_known_ones(args):
  proc = subprocess.run([BASH, str(REPO / "scripts" / "benchmark.sh"), *args],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("benchmark: error: name one of:")
  for name in ("decode", "train_throughput", "machine"):
    assert f" {name} " in lines[0] + " "
  assert "decode_peer" not in lines[0]
