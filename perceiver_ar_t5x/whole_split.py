"""Whole-split scoring: every loss-weighted token of every document, exactly once.

A document of any length becomes windows. Window k ends at e_k and scores the
positions [e_{k-1}, e_k) with the latents on its last `num_latents` positions and up
to `context` tokens of left context (layer 0 reads them all, paper Sec. 3.1):
  e_0 = min(L, max(num_latents, f + stride))   (f = first loss position; scores [0, e_0))
  e_k = min(L, e_{k-1} + stride)
so with stride s <= num_latents each later window scores its last s latents, the ones
with the most context. A document shorter than the latents is one window. Windows of
many documents are packed into fixed [batch, context] rows (right-padded), so one
compiled function scores them all at about one forward pass per window.

Multi-host: every process enumerates the same windows and feeds its block of rows of
each global batch; sums are reduced on device and replicated, so N processes give the
metrics of one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from perceiver_ar_t5x import models, slicing, training
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.documents import Document

FIRST_BUCKET = 64  # position buckets [0, 64), [64, 128), [128, 256), ... (doubling)
PROGRESS_SECONDS = 5.0
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Window:
  """Scores document `doc`'s positions [first, end) (weighted ones) in one row."""

  doc: int
  first: int
  end: int


def window_ends(weights: np.ndarray, num_latents: int, stride: int) -> list[tuple[int, int]]:
  """[(first scored position, end)] covering every weighted position once (see module doc)."""
  if not 1 <= stride <= num_latents:
    raise ValueError(f"EVAL_STRIDE must be in [1, num_latents={num_latents}], got {stride}")
  on = np.nonzero(weights > 0)[0]
  if not on.size:
    return []
  first, length = int(on[0]), int(on[-1]) + 1
  end = min(length, max(num_latents, first + stride))
  plan = [(0, end)]
  while end < length:
    plan.append((end, min(length, end + stride)))
    end = plan[-1][1]
  return plan


def plan_windows(docs: Sequence[Document], num_latents: int, stride: int) -> list[Window]:
  return [Window(i, a, e) for i, doc in enumerate(docs)
          for a, e in window_ends(doc.weights, num_latents, stride)]


def position_bucket(positions: np.ndarray, first_bucket: int = FIRST_BUCKET) -> np.ndarray:
  """Bucket id of each distance from the document start: [0, f) -> 0, [f*2^(k-1), f*2^k) -> k."""
  positions = np.asarray(positions, np.int64)
  ratio = np.maximum(positions, 1) / first_bucket
  return np.where(positions < first_bucket, 0, np.floor(np.log2(ratio)).astype(np.int64) + 1)


def bucket_edges(num_buckets: int, first_bucket: int = FIRST_BUCKET) -> list[tuple[int, int]]:
  return [(0 if k == 0 else first_bucket * 2 ** (k - 1), first_bucket * 2 ** k)
          for k in range(num_buckets)]


def window_row(doc: Document, window: Window, context: int, num_latents: int,
               first_bucket: int = FIRST_BUCKET) -> dict[str, np.ndarray]:
  """One row: the context ending at window.end, right-padded to `context` tokens."""
  offset = max(0, window.end - context)
  size = window.end - offset
  targets = doc.tokens[offset:window.end]
  inputs = doc.tokens[max(offset - 1, 0):window.end - 1]
  if offset == 0:
    inputs = np.concatenate([[0], inputs])
  pos = np.arange(offset, window.end)
  weights = doc.weights[offset:window.end] * (pos >= window.first)
  pad = [(0, context - size)]
  return {
      "decoder_input_tokens": np.pad(inputs.astype(np.int32), pad),
      "decoder_target_tokens": np.pad(targets.astype(np.int32), pad),
      "decoder_loss_weights": np.pad(weights.astype(np.float32), pad),
      "position_buckets": np.pad(position_bucket(pos, first_bucket).astype(np.int32), pad),
      "latent_starts": np.asarray(max(window.end - num_latents, 0) - offset, np.int32),
  }


def empty_row(context: int) -> dict[str, np.ndarray]:
  zeros = np.zeros([context], np.int32)
  return {"decoder_input_tokens": zeros, "decoder_target_tokens": zeros,
          "decoder_loss_weights": np.zeros([context], np.float32), "position_buckets": zeros,
          "latent_starts": np.asarray(0, np.int32)}


def process_batches(docs: Sequence[Document], windows: Sequence[Window], *, context: int,
                    num_latents: int, batch_size: int, layout: pt.DataLayout,
                    first_bucket: int = FIRST_BUCKET) -> Iterator[Batch]:
  """This process's rows of each global batch of windows (the last batch zero-padded).

  Yields {decoder_*_tokens, decoder_loss_weights, position_buckets: [rows, context],
  latent_starts: [rows]} with rows = batch_size / num_shards.
  """
  rows = batch_size // layout.num_shards
  for start in range(0, len(windows), batch_size):
    lo = start + layout.shard_index * rows
    mine = [window_row(docs[w.doc], w, context, num_latents, first_bucket)
            for w in windows[lo:min(lo + rows, start + batch_size)]]
    mine += [empty_row(context)] * (rows - len(mine))
    yield {k: np.stack([r[k] for r in mine]) for k in mine[0]}


SUM_KEYS = ("loss_sum", "nll_sum", "z_loss_sum", "correct_sum", "weight_sum")


def zero_totals(num_buckets: int) -> dict[str, np.ndarray]:
  totals = {k: np.zeros([], np.float32) for k in SUM_KEYS}
  totals.update(bucket_nll=np.zeros([num_buckets], np.float32),
                bucket_count=np.zeros([num_buckets], np.float32))
  return totals


def make_window_step(model: models.PerceiverARModel, part: training.Partitioned,
                     num_buckets: int) -> Callable[[Any, Batch, Any], dict[str, jax.Array]]:
  """step(params, rows, totals) -> totals + this batch's sums (replicated, on device)."""
  def step(params: Any, batch: dict[str, jax.Array], totals: dict[str, jax.Array]
           ) -> dict[str, jax.Array]:
    n = slicing.num_latent_positions(model.num_latents, batch["decoder_target_tokens"].shape[1])
    starts = batch["latent_starts"]  # [batch]
    logits = model.logits(params, batch, starts)  # [batch, n, vocab]
    targets = slicing.window(batch["decoder_target_tokens"], starts, n)
    weights = slicing.window(batch["decoder_loss_weights"], starts, n)  # [batch, n]
    buckets = slicing.window(batch["position_buckets"], starts, n)
    ce_sum, z_sum, nll = models.cross_entropy(logits, targets, weights,
                                              label_smoothing=model.label_smoothing,
                                              z_loss=model.z_loss)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    in_bucket = jax.nn.one_hot(buckets, num_buckets) * weights[..., None]  # [batch, n, K]
    sums = {"loss_sum": ce_sum + z_sum, "nll_sum": jnp.sum(nll * weights), "z_loss_sum": z_sum,
            "correct_sum": jnp.sum(correct * weights), "weight_sum": jnp.sum(weights),
            "bucket_nll": jnp.einsum("bn,bnk->k", nll, in_bucket),
            "bucket_count": jnp.sum(in_bucket, axis=(0, 1))}
    return {k: totals[k] + sums[k] for k in totals}

  replicated = pt.replicated(part.mesh)
  jitted = jax.jit(step, in_shardings=(part.state_sharding.params, part.batch_sharding,
                                       replicated),
                   out_shardings=replicated, donate_argnums=(2,))

  def run(params: Any, batch: Batch, totals: Any) -> dict[str, jax.Array]:
    batch = pt.global_batch(batch, part.mesh)
    with part.context():
      return jitted(params, batch, totals)

  return run


class Progress:
  """A log line every few seconds: windows and documents done, tokens/s, ETA."""

  def __init__(self, windows: Sequence[Window], docs: Sequence[Document],
               batch_size: int) -> None:
    self.windows, self.batch_size = windows, batch_size
    self.num_docs = len(docs)
    self.tokens_done = np.cumsum([int(np.count_nonzero(
        docs[w.doc].weights[w.first:w.end])) for w in windows])
    self.t0 = self.last = time.monotonic()

  def update(self, batches_done: int, totals: Any) -> None:
    now = time.monotonic()
    if now - self.last < PROGRESS_SECONDS:
      return
    jax.block_until_ready(totals)  # the figure is of work done, not dispatched
    now, self.last = time.monotonic(), time.monotonic()
    done = min(batches_done * self.batch_size, len(self.windows))
    tokens = int(self.tokens_done[done - 1])
    rate = tokens / max(now - self.t0, 1e-9)
    eta = (int(self.tokens_done[-1]) - tokens) / max(rate, 1e-9)
    logging.info("whole-split eval: %d/%d windows, %d/%d documents, %d tokens, %.0f tokens/s, "
                 "ETA %.0fs", done, len(self.windows), self.windows[done - 1].doc + 1,
                 self.num_docs, tokens, rate, eta)


def cap_windows(docs: Sequence[Document], windows: Sequence[Window], max_windows: int
                ) -> tuple[list[Document], list[Window]]:
  """The first `max_windows` windows; the last kept document ends where its last window does.

  Cutting documents (not only windows) keeps token and byte counts exact under a cap.
  """
  kept = list(windows[:max_windows])
  if len(kept) == len(windows):
    return list(docs), kept
  last = kept[-1]
  docs = [*docs[:last.doc], docs[last.doc].truncated(last.end)]
  return docs, kept


class Scorer:
  """Scores fixed documents again and again (the in-training eval compiles once)."""

  def __init__(self, *, model: models.PerceiverARModel, part: training.Partitioned,
               docs: Sequence[Document], context: int, batch_size: int,
               stride: int | None = None, max_batches: int | None = None,
               count_bytes: Callable[[Document], int] | None = None,
               first_bucket: int = FIRST_BUCKET) -> None:
    self.layout = pt.data_layout(part.mesh)
    if batch_size % self.layout.num_shards:
      raise ValueError(f"eval batch size {batch_size} must divide by the "
                       f"{self.layout.num_shards} data shards")
    if context < model.num_latents:
      raise ValueError(f"context {context} is shorter than num_latents={model.num_latents}")
    windows = plan_windows(docs, model.num_latents, stride or model.num_latents)
    if max_batches is not None:
      docs, windows = cap_windows(docs, windows, max_batches * batch_size)
    self.docs, self.windows = list(docs), windows
    self.model, self.part, self.context, self.batch_size = model, part, context, batch_size
    self.first_bucket = first_bucket
    self.num_bytes = sum(count_bytes(d) for d in self.docs) if count_bytes else None
    longest = max(doc.length for doc in self.docs)
    self.num_buckets = int(position_bucket(np.asarray([longest - 1]), first_bucket)[0]) + 1
    self.step = make_window_step(model, part, self.num_buckets)

  def __call__(self, params: Any) -> dict[str, Any]:
    """Summed metrics over every weighted token of the documents (same on every host)."""
    totals = pt.replicate(zero_totals(self.num_buckets), self.part.mesh)
    progress = Progress(self.windows, self.docs, self.batch_size)
    batches = process_batches(self.docs, self.windows, context=self.context,
                              num_latents=self.model.num_latents, batch_size=self.batch_size,
                              layout=self.layout, first_bucket=self.first_bucket)
    for i, batch in enumerate(batches):
      totals = self.step(params, batch, totals)
      progress.update(i + 1, totals)
    sums = {k: np.asarray(v) for k, v in jax.device_get(totals).items()}
    return dict(sums, num_windows=len(self.windows), num_buckets=self.num_buckets)


def summarize(sums: dict[str, Any], *, num_documents: int, num_bytes: int | None,
              first_bucket: int = FIRST_BUCKET) -> dict[str, float]:
  """Split totals -> loss, bits_per_token, bits_per_byte, perplexity, NLL by position."""
  summary = models.summarize_metrics({k: float(sums[k]) for k in SUM_KEYS})
  summary["bits_per_token"] = summary["cross_ent_loss"] / math.log(2.0)
  summary["num_documents"] = float(num_documents)
  summary["num_windows"] = float(sums["num_windows"])
  if num_bytes:
    summary["num_bytes"] = float(num_bytes)
    summary["bytes_per_token"] = num_bytes / max(summary["num_tokens"], 1e-8)
    summary["bits_per_byte"] = float(sums["nll_sum"]) / math.log(2.0) / num_bytes
  edges = bucket_edges(int(sums["num_buckets"]), first_bucket)
  for (lo, hi), nll, count in zip(edges, sums["bucket_nll"], sums["bucket_count"]):
    if count > 0:
      summary[f"nll_by_position/{lo}-{hi}"] = float(nll) / float(count)
  return summary
