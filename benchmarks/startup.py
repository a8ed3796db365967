r"""Start-up of the train / eval / infer binaries: time to our first line, to the first step, noise.

  python benchmarks/startup.py                      # this tree
  python benchmarks/startup.py --old /tmp/old_tree  # and an older checkout, interleaved

For each binary on gin/tiny.gin (train: 2 steps, then eval and infer on its checkpoint)
it records, per run: seconds from process start to the first log line of this package,
to the first training step line (train), to exit, and how many lines of output came
from elsewhere (TensorFlow/XLA native lines, library chatter). Rounds interleave the
trees so both see the same machine load. Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

_OWN = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ (\w+)\.py:\d+\]")
_OWN_FILES = {"trainer", "metrics_log", "checkpoints", "evaluation", "whole_split", "inference",
              "train", "eval", "infer", "files", "resume", "data_state", "multihost"}


def _run(tree: pathlib.Path, args: list[str]) -> dict[str, float]:
  env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tree, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  first_own = first_step = None
  noise = 0
  for line in proc.stdout:
    now = time.perf_counter() - t0
    m = _OWN.match(line)
    if m and m.group(1) in _OWN_FILES:
      first_own = first_own if first_own is not None else now
      if first_step is None and re.search(r"\bstep \d+/\d+", line):
        first_step = now
    elif not line.startswith(("final eval", "sample ", "eval metrics", "wrote ", "first:",
                              "[", "mesh ", "  ")):
      noise += 1
  proc.wait()
  if proc.returncode:
    raise RuntimeError(f"{args[0]} failed in {tree}")
  return {"first_own_line_s": first_own, "first_step_s": first_step,
          "total_s": time.perf_counter() - t0, "foreign_lines": noise}


def _commands(model_dir: str) -> dict[str, list[str]]:
  tiny = ["--gin_file=gin/tiny.gin", "--gin_search_paths=gin"]
  ckpt = f"--gin.CHECKPOINT_PATH='{model_dir}'"
  return {
      "train": ["perceiver_ar_t5x.train", *tiny, f"--gin.MODEL_DIR='{model_dir}'",
                "--gin.TRAIN_STEPS=2", "--gin.STATS_PERIOD=1", "--gin.EVAL_PERIOD=0",
                "--gin.train_script.train.sample_at_end=False"],
      "eval": ["perceiver_ar_t5x.eval", *tiny, "--gin_file=gin/eval.gin", ckpt],
      "infer": ["perceiver_ar_t5x.infer", *tiny, "--gin_file=gin/infer.gin", ckpt,
                f"--gin.INFER_OUTPUT_DIR='{model_dir}/infer'"],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--old", type=pathlib.Path, default=None, help="an older checkout")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default="benchmarks/results/startup.json")
  args = parser.parse_args()
  trees = {"this": pathlib.Path(__file__).resolve().parents[1]}
  if args.old:
    trees["old"] = args.old.resolve()
  runs: dict[str, dict[str, list[dict]]] = {t: {} for t in trees}
  for _ in range(args.rounds):
    for name, tree in trees.items():
      model_dir = tempfile.mkdtemp(prefix=f"startup_{name}_")
      for binary, cmd in _commands(model_dir).items():
        runs[name].setdefault(binary, []).append(_run(tree, cmd))
      shutil.rmtree(model_dir, ignore_errors=True)
  summary = {name: {binary: {k: statistics.median([r[k] for r in rs if r[k] is not None])
                             for k in rs[0] if any(r[k] is not None for r in rs)}
                    for binary, rs in per.items()} for name, per in runs.items()}
  print(json.dumps(summary, indent=1))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"median": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
  main()
