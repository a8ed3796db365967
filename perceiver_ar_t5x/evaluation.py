"""Evaluation of a checkpoint on a task split: summed metrics -> loss, accuracy, bits.

Two scoring modes (ScoringMode):
  WHOLE_SPLIT (default): every loss-weighted token of every document of the split,
    each exactly once with up to `context` tokens of left context, sliding the latent
    window by EVAL_STRIDE (whole_split.py). Documents come from the task without its
    crop steps (documents.py). Totals are token- and byte-weighted over the split.
  LAST_LATENTS: the task's examples as training sees them (one crop per document),
    scoring each example's last `num_latents` tokens: one forward pass a batch.

Multi-host: every process enumerates the same windows or examples and feeds its block
of rows of each global batch, so N processes give exactly the sums of one; only
process 0 writes the JSON and TensorBoard files.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import seqio
from clu import metric_writers

from perceiver_ar_t5x import (
  checkpoints,
  datasets,
  documents,
  fileio,
  models,
  slicing,
  training,
  whole_split,
)
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.io_models import PerceiverIOModel

Batch = Mapping[str, np.ndarray]
EvalStep = Callable[[Any, Batch], Mapping[str, Any]]


class ScoringMode(enum.Enum):
  WHOLE_SPLIT = "whole_split"
  LAST_LATENTS = "last_latents"


def evaluate(eval_step: EvalStep, params: Any, batches: Iterable[Batch],
             max_batches: int | None = None, *,
             byte_count: Callable[[Batch], int] | None = None) -> dict[str, float]:
  """Sums per-batch metric sums over (at most `max_batches`) batches, then summarizes.

  Adds bits per token (cross-entropy / ln 2); with `byte_count` (bytes of the
  text each batch scores) also bytes per token and bits per byte.
  """
  totals: dict[str, float] = {}
  count, num_bytes = 0, 0
  for batch in batches:
    if max_batches is not None and count >= max_batches:
      break
    sums = jax.device_get(eval_step(params, batch))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
    if byte_count is not None:
      num_bytes += byte_count(batch)
    count += 1
  if not count:
    raise ValueError("evaluation saw no batches: the eval split is empty")
  summary = models.summarize_metrics(totals)
  summary["bits_per_token"] = summary["cross_ent_loss"] / math.log(2.0)
  summary["num_batches"] = float(count)
  if byte_count is not None and num_bytes > 0:
    summary["num_bytes"] = float(num_bytes)
    summary["bytes_per_token"] = num_bytes / max(summary["num_tokens"], 1e-8)
    summary["bits_per_byte"] = float(totals["nll_sum"]) / math.log(2.0) / num_bytes
  return summary


def scored_mask(batch: Batch, num_latents: int) -> np.ndarray:
  """[batch, length] bool: the target positions LAST_LATENTS scores (for byte counts)."""
  weights = np.asarray(batch["decoder_loss_weights"]) > 0
  targets = np.asarray(batch["decoder_target_tokens"])
  length = targets.shape[-1]
  n = slicing.num_latent_positions(num_latents, length)
  if "decoder_segment_ids" in batch:
    nonpad = np.asarray(batch["decoder_segment_ids"]) > 0
    lengths = np.max(np.where(nonpad, np.arange(1, length + 1), 0), axis=-1)
  else:
    lengths = np.asarray(slicing.sequence_lengths(targets))
  starts = np.clip(lengths - n, 0, length - n)[:, None]
  pos = np.arange(length)[None, :]
  return weights & (pos >= starts) & (pos < starts + n)


def byte_counter(vocab: seqio.Vocabulary, num_latents: int) -> Callable[[Batch], int] | None:
  """batch -> UTF-8 bytes of the LAST_LATENTS-scored targets (byte and SPM vocabularies).

  Byte vocabularies: one byte per scored byte token. Other text vocabularies: for
  each run of scored positions [a, b), bytes of decode(ids[:b]) minus those of
  decode(ids[:a]). None for vocabularies that do not decode to text.
  """
  if isinstance(vocab, seqio.ByteVocabulary):
    offset = getattr(vocab, "_num_special_tokens", 3)

    def count_bytes(batch: Batch) -> int:
      ids = np.asarray(batch["decoder_target_tokens"])
      mask = scored_mask(batch, num_latents)
      return int(np.sum(mask & (ids >= offset) & (ids < offset + 256)))

    return count_bytes
  if not isinstance(vocab.decode([]), str):
    return None

  def size(ids: np.ndarray) -> int:
    return len(vocab.decode([int(i) for i in ids if i != 0]).encode("utf-8"))

  def count_text(batch: Batch) -> int:
    total = 0
    for ids, keep in zip(np.asarray(batch["decoder_target_tokens"]),
                         scored_mask(batch, num_latents)):
      edges = np.diff(np.concatenate([[0], keep.astype(np.int8), [0]]))
      for a, b in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]):
        total += size(ids[:b]) - size(ids[:a])
    return total

  return count_text


def pad_batch(batch: Batch, batch_size: int) -> dict[str, np.ndarray]:
  """Pads the last, short batch with all-zero rows (zero loss weight: scored as nothing)."""
  rows = next(iter(batch.values())).shape[0]
  if rows == batch_size:
    return dict(batch)
  return {k: np.pad(v, [(0, batch_size - rows)] + [(0, 0)] * (v.ndim - 1))
          for k, v in batch.items()}


def process_rows(batch: Batch, layout: pt.DataLayout) -> dict[str, np.ndarray]:
  """This process's block of rows of a global batch (every process saw the same batch)."""
  rows = next(iter(batch.values())).shape[0] // layout.num_shards
  lo = layout.shard_index * rows
  return {k: np.asarray(v)[lo:lo + rows] for k, v in batch.items()}


def last_latents(*, model: models.PerceiverARModel, part: training.Partitioned, params: Any,
                 dataset_cfg: datasets.DatasetConfig, max_batches: int | None = None,
                 vocab: seqio.Vocabulary | None = None) -> dict[str, float]:
  """LAST_LATENTS over the split's examples; each process feeds its rows of each batch."""
  count = byte_counter(vocab, model.num_latents) if vocab is not None else None
  return split_examples(model=model, part=part, params=params, dataset_cfg=dataset_cfg,
                        max_batches=max_batches, count=count)


def split_examples(*, model: Any, part: training.Partitioned, params: Any,
                   dataset_cfg: datasets.DatasetConfig, max_batches: int | None = None,
                   count: Callable[[Batch], int] | None = None) -> dict[str, float]:
  """Every example of the split once (at most `max_batches` batches), the model's loss.

  The model's own feature converter reads the task (Perceiver IO: masked-LM or
  classification features); `count` gives the bytes each global batch scores.
  """
  layout = pt.data_layout(part.mesh)
  converter = model.feature_converter(dict(dataset_cfg.task_feature_lengths), dataset_cfg.pack)
  ds = datasets.get_dataset(dataset_cfg, repeat=False, converter=converter)  # every process
  batches = itertools.islice(datasets.numpy_batches(ds), max_batches)
  num_bytes = 0

  def rows() -> Iterator[dict[str, np.ndarray]]:
    nonlocal num_bytes
    for batch in batches:
      batch = pad_batch(batch, dataset_cfg.batch_size)
      num_bytes += count(batch) if count else 0  # of the global batch: once per split
      yield process_rows(batch, layout)

  summary = evaluate(training.make_eval_step(model, part), params, rows())
  if num_bytes:
    nll_sum = summary["cross_ent_loss"] * summary["num_tokens"]
    summary.update(num_bytes=float(num_bytes), bytes_per_token=num_bytes / summary["num_tokens"],
                   bits_per_byte=nll_sum / math.log(2.0) / num_bytes)
  return summary


def whole_split_metrics(*, params: Any, scorer: whole_split.Scorer) -> dict[str, float]:
  """WHOLE_SPLIT totals of a scorer's documents (bytes for text vocabularies)."""
  return whole_split.summarize(scorer(params), num_documents=len(scorer.docs),
                               num_bytes=scorer.num_bytes, first_bucket=scorer.first_bucket)


def make_scorer(*, model: models.PerceiverARModel, part: training.Partitioned,
                dataset_cfg: datasets.DatasetConfig, stride: int | None = None,
                max_documents: int | None = None, max_tokens: int | None = None,
                max_batches: int | None = None) -> whole_split.Scorer:
  """Loads the split's documents (capped) and plans their windows."""
  vocab = datasets.get_task(dataset_cfg.mixture_or_task_name).output_features["targets"].vocabulary
  docs = documents.load_documents(
      dataset_cfg.mixture_or_task_name, dataset_cfg.split, dataset_cfg.task_feature_lengths,
      max_documents=max_documents, max_tokens=max_tokens)
  return whole_split.Scorer(model=model, part=part, docs=docs,
                            context=datasets.model_length(dataset_cfg.task_feature_lengths),
                            batch_size=dataset_cfg.batch_size, stride=stride,
                            max_batches=max_batches, count_bytes=documents.byte_counter(vocab))


def write_results(summary: Mapping[str, float], *, output_dir: str, name: str, step: int,
                  prefix: str, extra: Mapping[str, Any]) -> str:
  """TensorBoard scalars `<prefix>/<metric>` and `<name>.json`; process 0 only writes."""
  path = os.path.join(output_dir, f"{name}.json")
  if jax.process_index() > 0:
    return path
  fileio.gfile.makedirs(output_dir)
  writer = metric_writers.create_default_writer(output_dir)
  writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in summary.items()})
  writer.close()
  fileio.write_atomic(path, json.dumps({**extra, **summary}, indent=1, sort_keys=True))
  return path


def evaluate_checkpoint(*, model: models.PerceiverARModel, dataset_cfg: datasets.DatasetConfig,
                        checkpoint_path: str, output_dir: str | None = None,
                        mode: ScoringMode = ScoringMode.WHOLE_SPLIT, stride: int | None = None,
                        max_documents: int | None = None, max_tokens: int | None = None,
                        max_batches: int | None = None,
                        partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig()
                        ) -> tuple[dict[str, float], str]:
  """Scores `dataset_cfg`'s split with a checkpoint; writes TensorBoard scalars and JSON.

  Output: `<output_dir>` (default MODEL_DIR/eval) gets scalars tagged
  `<mode>/<metric>` at the checkpoint's step and `<task>-<split>-<mode>-<step>.json`.
  Returns (metrics, json path).
  """
  if isinstance(model, PerceiverIOModel):
    return _evaluate_io(model=model, dataset_cfg=dataset_cfg, checkpoint_path=checkpoint_path,
                        output_dir=output_dir, max_batches=max_batches,
                        partitioning_cfg=partitioning_cfg)
  length = model.check_lengths(dataset_cfg.task_feature_lengths)
  vocab = datasets.get_task(dataset_cfg.mixture_or_task_name).output_features["targets"].vocabulary
  if mode == ScoringMode.WHOLE_SPLIT:
    stride = stride or model.num_latents
    whole_split.window_ends(np.ones([1]), model.num_latents, stride)  # bad stride: fail early
  params, step, part = checkpoints.load_params(model, checkpoint_path, length, partitioning_cfg)
  if mode == ScoringMode.WHOLE_SPLIT:
    scorer = make_scorer(model=model, part=part, dataset_cfg=dataset_cfg, stride=stride,
                         max_documents=max_documents, max_tokens=max_tokens,
                         max_batches=max_batches)
    summary = whole_split_metrics(params=params, scorer=scorer)
  else:
    summary = last_latents(model=model, part=part, params=params, dataset_cfg=dataset_cfg,
                           max_batches=max_batches, vocab=vocab)
  summary["step"] = float(step)
  output_dir = output_dir or os.path.join(checkpoints.resolve_path(checkpoint_path)[0], "eval")
  name = f"{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}-{mode.value}-{step}"
  path = write_results(summary, output_dir=output_dir, name=name, step=step, prefix=mode.value,
                       extra={"checkpoint": checkpoint_path, "mode": mode.value,
                              "stride": stride, "max_documents": max_documents,
                              "max_tokens": max_tokens, "max_batches": max_batches})
  return summary, path


def _evaluate_io(*, model: PerceiverIOModel, dataset_cfg: datasets.DatasetConfig,
                 checkpoint_path: str, output_dir: str | None, max_batches: int | None,
                 partitioning_cfg: pt.PartitioningConfig) -> tuple[dict[str, float], str]:
  """A Perceiver IO checkpoint on every example of the split: masked-token or
  classification accuracy and loss (`examples/<metric>` scalars and JSON)."""
  length = model.check_lengths(dataset_cfg.task_feature_lengths)
  params, step, part = checkpoints.load_params(model, checkpoint_path, length, partitioning_cfg)
  summary = split_examples(model=model, part=part, params=params, dataset_cfg=dataset_cfg,
                           max_batches=max_batches)
  summary["step"] = float(step)
  output_dir = output_dir or os.path.join(checkpoints.resolve_path(checkpoint_path)[0], "eval")
  name = f"{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}-examples-{step}"
  path = write_results(summary, output_dir=output_dir, name=name, step=step, prefix="examples",
                       extra={"checkpoint": checkpoint_path, "mode": "examples",
                              "max_batches": max_batches})
  return summary, path
