"""Evaluation over a finite split: summed metrics -> loss, accuracy, perplexity."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from perceiver_ar_t5x import models


def evaluate(eval_step: Callable[[Any, Mapping[str, Any]], Mapping[str, Any]], params: Any,
             batches: Iterable[Mapping[str, np.ndarray]], max_batches: int | None = None
             ) -> dict[str, float]:
  """Sums per-batch metric sums over (at most `max_batches`) batches, then summarizes.

  Adds bits per token (cross-entropy / ln 2) to the summary.
  """
  totals: dict[str, float] = {}
  count = 0
  for batch in batches:
    if max_batches is not None and count >= max_batches:
      break
    sums = jax.device_get(eval_step(params, batch))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
    count += 1
  if not count:
    raise ValueError("evaluation saw no batches: the eval split is empty")
  summary = models.summarize_metrics(totals)
  summary["bits_per_token"] = summary["cross_ent_loss"] / math.log(2.0)
  summary["num_batches"] = float(count)
  return summary
