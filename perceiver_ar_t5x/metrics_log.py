"""Training metrics: MODEL_DIR/train/metrics.jsonl (every step) and StepStats (summaries).

TensorBoard keeps only what `stats_period` summarises; this file keeps every
step's loss, learning rate and gradient norm exactly (float32 values round-trip
through JSON), so an interrupted-and-resumed run can be compared bit for bit
with an uninterrupted one, and scripts can plot a run without TensorBoard.
StepStats sums metrics between `stats_period` lines and writes the TensorBoard
scalars and the progress line (loss, accuracy, steps/s, ETA).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from clu import metric_writers

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.models import summarize_metrics

_KEYS = ("loss", "grad_norm", "learning_rate")
_SUM_KEYS = ("loss_sum", "nll_sum", "z_loss_sum", "correct_sum", "weight_sum")


def read(path: str) -> list[dict[str, Any]]:
  """The records in `path`, skipping a torn last line (the writer was killed mid-line)."""
  if not fileio.gfile.exists(path):
    return []
  records = []
  with fileio.gfile.GFile(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _torn(path: str) -> bool:
  """Whether the file ends inside a line (its writer was killed mid-write)."""
  if not fileio.gfile.exists(path):
    return False
  with fileio.gfile.GFile(path, "rb") as f:
    data = f.read()
  return bool(data) and not data.endswith(b"\n")


def losses_by_step(path: str) -> dict[int, float]:
  """{step: loss}; a step written twice (recomputed after a resume) keeps its last value."""
  return {int(r["step"]): float(r["loss"]) for r in read(path)}


class MetricsLog:
  """Appends step records; on resume first removes the records past the restored step.

  The file is only appended to, except when it holds records of steps after the
  restored checkpoint (the resumed run recomputes those, bit for bit) or ends in a
  line torn by a kill: then it is rewritten atomically (write + rename) with the
  records up to the restored step. Records at or below that step are never removed.
  """

  def __init__(self, path: str, start_step: int, *, enabled: bool = True):
    self.path = path
    self._file = None
    if not enabled:
      return
    records = read(path)
    if any(int(r.get("step", 0)) > start_step for r in records) or _torn(path):
      kept = [r for r in records if int(r.get("step", 0)) <= start_step]
      fileio.write_atomic(path, [json.dumps(r) + "\n" for r in kept])
    else:
      fileio.gfile.makedirs(os.path.dirname(path) or ".")
    self._file = fileio.gfile.GFile(path, "a")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self._file is None:
      return
    record = {"step": step, **{k: float(metrics[k]) for k in _KEYS if k in metrics}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepStats:
  """Running metric sums between two stats lines -> TensorBoard scalars + a progress line."""

  def __init__(self, step: int, writer: metric_writers.MetricWriter, tokens_per_step: int,
               total_steps: int) -> None:
    self.writer, self.tokens_per_step, self.total_steps = writer, tokens_per_step, total_steps
    self.sums: dict[str, float] = {}
    self.last_step, self.last_time = step, time.time()

  def add(self, metrics: Mapping[str, Any]) -> None:
    for key in _SUM_KEYS:
      self.sums[key] = self.sums.get(key, 0.0) + float(metrics[key])

  def flush(self, step: int, metrics: Mapping[str, Any]) -> None:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    summary = {f"train/{k}": v for k, v in summarize_metrics(self.sums).items()}
    summary.update({"train/learning_rate": float(metrics["learning_rate"]),
                    "train/grad_norm": float(metrics["grad_norm"]),
                    "train/steps_per_second": rate,
                    "train/tokens_per_second": rate * self.tokens_per_step})
    self.writer.write_scalars(step, summary)
    logging.info("step %d/%d loss=%.4f accuracy=%.4f %.2f steps/s ETA %s", step,
                 self.total_steps, summary["train/loss"], summary["train/accuracy"], rate,
                 format_eta((self.total_steps - step) / max(rate, 1e-9)))
    self.sums, self.last_step, self.last_time = {}, step, now
