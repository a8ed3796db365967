r"""Time to the first resumed step: saved input position vs replaying the pipeline.

On a generated corpus of .txt files, `gin/runs/text_bytes_cpu.gin` (packed byte
rows) is trained to step 20 and to step --far (5000); each run's checkpoint is then
resumed for one step by the train binary, twice:
  * `restore`: the iterator state saved in the checkpoint (this change);
  * `replay`: the same checkpoint with its `data` item removed, so the binary falls
    back to replaying the consumed batches (what every resume did before).
Reported per case: seconds from process start to the first resumed step's line in
metrics.jsonl (imports, compilation and restore included), and, measured in this
process, the input position alone: building the pipeline and moving it to step N by
restoring the saved state vs the old `ds.skip(N)` + first batch.

  .venv/bin/python benchmarks/resume_time.py            # ~10 min on 2 cores
  .venv/bin/python benchmarks/resume_time.py --far 500  # quicker look

Writes benchmarks/results/resume_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "resume_time.json"
GIN = "gin/runs/text_bytes_cpu.gin"
WORDS = ("the", "latent", "array", "attends", "to", "a", "long", "context", "of", "bytes",
         "and", "each", "query", "sees", "only", "earlier", "positions", "in", "order")


def write_corpus(root: pathlib.Path, docs: int, seed: int = 0) -> dict[str, str]:
  """`docs` train documents of 40..4000 bytes and a small validation set."""
  rng = random.Random(seed)
  for split, count in (("train", docs), ("valid", 8)):
    (root / split).mkdir(parents=True)
    for i in range(count):
      words = [rng.choice(WORDS) for _ in range(rng.randint(8, 800))]
      (root / split / f"doc{i:05d}.txt").write_text(" ".join(words))
  return {"TEXT_FILES": str(root / "train"), "TEXT_VALIDATION_FILES": str(root / "valid")}


def _command(model_dir: pathlib.Path, steps: int, period: int) -> list[str]:
  return [sys.executable, "-m", "perceiver_ar_t5x.train", f"--gin_file={GIN}",
          "--gin_search_paths=gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={steps}", f"--gin.CHECKPOINT_PERIOD={period}",
          "--gin.EVAL_PERIOD=0", "--gin.STATS_PERIOD=1000",
          "--gin.train_script.train.sample_at_end=False"]


def _env(data_env: dict[str, str]) -> dict[str, str]:
  env = {**os.environ, **data_env, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def train_to(model_dir: pathlib.Path, step: int, data_env: dict[str, str]) -> None:
  proc = subprocess.run(_command(model_dir, step, step), cwd=REPO, env=_env(data_env),
                        capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"training to step {step} failed:\n{proc.stderr[-3000:]}")


def time_resume(model_dir: pathlib.Path, step: int, data_env: dict[str, str]) -> float:
  """Seconds from launching the binary until step+1 is in metrics.jsonl."""
  metrics = model_dir / "train" / "metrics.jsonl"
  start = time.perf_counter()
  proc = subprocess.Popen(_command(model_dir, step + 1, step + 1), cwd=REPO,
                          env=_env(data_env), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  while True:
    if metrics.exists() and f'"step": {step + 1},' in metrics.read_text():
      elapsed = time.perf_counter() - start
      break
    if proc.poll() is not None:
      raise SystemExit(f"resume at {step} failed:\n{proc.stderr.read()[-3000:]}")
    time.sleep(0.02)
  _, stderr = proc.communicate()
  if proc.returncode != 0:
    raise SystemExit(f"resume at {step} failed:\n{stderr[-3000:]}")
  return elapsed


def position_only(step: int, saved_dir: pathlib.Path, data_env: dict[str, str],
                  repeats: int = 2) -> dict[str, float]:
  """The input position alone, best of `repeats` after a warm-up: building the pipeline and
  restoring the saved state vs `ds.skip(step)`, each up to its first batch."""
  os.environ.update(data_env)
  import perceiver_ar_t5x.tasks  # noqa: F401 - registers text_bytes
  from perceiver_ar_t5x import checkpoints, data_state, datasets
  cfg = datasets.DatasetConfig("text_bytes", {"targets": 48}, "train", 8, pack=True)
  state = checkpoints.Checkpointer(str(saved_dir), read_only=True).read_data(step)
  next(data_state.TrainBatches(datasets.get_dataset(cfg)))  # warm-up: TF, task registry

  pipeline = state[".pipeline"].decode()  # as the trainer described it: restore, not replay

  def restored() -> None:
    next(data_state.resumed(datasets.get_dataset(cfg), pipeline, state, step))

  def skipped() -> None:
    next(datasets.numpy_batches(datasets.get_dataset(cfg).skip(step)))

  times = {}
  for name, fn in (("restore_s", restored), ("skip_s", skipped)):
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t0)
    times[name] = best
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--near", type=int, default=20)
  parser.add_argument("--far", type=int, default=5000)
  parser.add_argument("--docs", type=int, default=2000)
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix="resume_time-"))
  data_env = write_corpus(root / "corpus", args.docs)
  results = {"gin_file": GIN, "docs": args.docs, "cases": {}}
  for step in (args.near, args.far):
    trained = root / f"trained_{step}"
    t0 = time.perf_counter()
    train_to(trained, step, data_env)
    print(f"trained to step {step} in {time.perf_counter() - t0:.1f}s", flush=True)
    case = position_only(step, trained, data_env)
    for mode in ("restore", "replay"):
      run_dir = root / f"{mode}_{step}"
      shutil.copytree(trained, run_dir)
      if mode == "replay":
        shutil.rmtree(run_dir / "checkpoints" / str(step) / "data")
      case[f"{mode}_to_first_step_s"] = time_resume(run_dir, step, data_env)
    results["cases"][str(step)] = case
    print(f"step {step}: start -> first resumed step {case['restore_to_first_step_s']:.1f}s "
          f"with the saved position, {case['replay_to_first_step_s']:.1f}s replaying; "
          f"input position alone {case['restore_s']:.2f}s restored vs "
          f"{case['skip_s']:.2f}s ds.skip()", flush=True)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {args.out}")
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
