"""Steps/s of the training loop with the host one step behind vs. waiting every step.

The trainer fetches step N's metrics after dispatching step N+1 (trainer._run_steps), so
the device runs N+1 while the host fetches, checks and logs N. The old loop fetched
right after dispatching N, leaving the device idle during the host's work. Both are
timed here in the same process on gin/tiny.gin (the CI smoke config): `lagged` is the
trainer as it is; `synced` wraps its train step so every call waits for its own result
before returning, which restores the old order exactly (dispatch N, wait for N, then
the host's work for N). Rounds alternate the two, each a fresh MODEL_DIR from step 0;
steps/s is measured between recorded steps (compile and the first steps excluded).

  .venv/bin/python benchmarks/loop_overhead.py            # ~1-2 min on 2 CPU cores
  .venv/bin/python benchmarks/loop_overhead.py --steps 400 --rounds 5

Prints a table and writes benchmarks/results/loop_overhead.json. On CPU the device and
the host share the same cores, so the difference is small; on an accelerator the host's
work per step (metrics fetch, NaN check, metrics.jsonl) overlaps the device's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

import gin  # noqa: E402
from perceiver_ar_t5x import gin_utils, trainer  # noqa: E402

train = trainer.train  # gin files bind `train_script.train` (__main__ of the binaries)
WARMUP_STEPS = 20  # compile + first steps, not timed


def _timed_run(model_dir: str, steps: int, synced: bool) -> float:
  """One tiny.gin run of `steps` steps from scratch; returns steady-state steps/s."""
  recorded: dict[int, float] = {}
  real_record, real_setup = trainer._record, trainer._setup  # noqa: SLF001

  def record(loop: Any, stats: Any, step: int, metrics: Any) -> None:
    real_record(loop, stats, step, metrics)
    recorded[step] = time.perf_counter()

  def setup(*args: Any, **kwargs: Any) -> Any:
    loop, start, part = real_setup(*args, **kwargs)
    if synced:
      step_fn: Callable[..., Any] = loop.train_step
      loop.train_step = lambda *a: jax.block_until_ready(step_fn(*a))
    return loop, start, part

  bindings = [f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {steps}", "EVAL_PERIOD = 0",
              f"CHECKPOINT_PERIOD = {steps * 10}", f"STATS_PERIOD = {steps * 10}"]
  gin.clear_config()
  gin_utils.parse_gin(["gin/tiny.gin"], bindings, [str(REPO / "gin")])
  trainer._record, trainer._setup = record, setup  # noqa: SLF001
  try:
    gin.get_configurable(trainer.train)(handle_signals=False, sample_at_end=False)
  finally:
    trainer._record, trainer._setup = real_record, real_setup  # noqa: SLF001
    gin.clear_config()
  return (steps - WARMUP_STEPS) / (recorded[steps] - recorded[WARMUP_STEPS])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300, help="steps per run (> 20)")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both")
  parser.add_argument("--out", default=str(RESULTS_DIR / "loop_overhead.json"))
  args = parser.parse_args()
  if args.steps <= WARMUP_STEPS:
    parser.error(f"--steps must be > {WARMUP_STEPS}")
  os.chdir(REPO)
  # gin first tries includes relative to the working directory (the binaries hide this too)
  logging.getLogger().addFilter(lambda r: not str(r.msg).startswith("Path not found:"))
  load_before = os.getloadavg()[0]
  runs: dict[str, list[float]] = {"synced": [], "lagged": []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for mode in ("synced", "lagged"):
        rate = _timed_run(os.path.join(tmp, f"{mode}{r}"), args.steps, mode == "synced")
        runs[mode].append(rate)
        print(f"round {r} {mode:>6}: {rate:8.1f} steps/s", flush=True)
  median = {mode: statistics.median(rates) for mode, rates in runs.items()}
  print(f"median steps/s: synced (host waits every step) {median['synced']:.1f}, "
        f"lagged (host one step behind) {median['lagged']:.1f}, "
        f"ratio {median['lagged'] / median['synced']:.3f}")
  result = {"config": "gin/tiny.gin", "steps": args.steps, "warmup_steps": WARMUP_STEPS,
            "rounds": args.rounds, "steps_per_s": runs, "median_steps_per_s": median,
            "ratio_lagged_over_synced": median["lagged"] / median["synced"],
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "load_avg_1min_before_after": [load_before, os.getloadavg()[0]]}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
