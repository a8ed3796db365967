"""Evaluation over a finite split: summed metrics -> loss, accuracy, perplexity, bits.

Two scoring modes (ScoringMode):
  LAST_LATENTS: the latents sit on each example's last `num_latents` positions and
    only those are scored: exactly what training sees (with CroppingMethod.NONE),
    one forward pass a batch.
  FULL_SEQUENCE: every target token is scored exactly once. The latent window
    slides over the sequence with a stride s <= num_latents: the first window
    scores positions [0, n); each later window ends s positions further and
    scores only its last s positions, whose latents have the most context
    (layer 0 always sees the whole prefix; the latent stack sees the n - s
    positions before them too). Smaller strides cost more passes and score
    better; s = n is non-overlapping windows.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from clu import metric_writers

from perceiver_ar_t5x import checkpoints, datasets, fileio, models, slicing, training
from perceiver_ar_t5x import partitioning as pt

Batch = Mapping[str, np.ndarray]
EvalStep = Callable[[Any, Batch], Mapping[str, Any]]


class ScoringMode(enum.Enum):
  LAST_LATENTS = "last_latents"
  FULL_SEQUENCE = "full_sequence"


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


def window_plan(length: int, num_latents: int, stride: int) -> list[tuple[int, int]]:
  """[(latent window start, first scored position)] covering [0, length) exactly once."""
  n = slicing.num_latent_positions(num_latents, length)
  if not 1 <= stride <= n:
    raise ValueError(f"stride must be in [1, num_latents={n}], got {stride}")
  plan, end = [(0, 0)], n
  while end < length:
    new_end = min(end + stride, length)
    plan.append((new_end - n, end))
    end = new_end
  return plan


def make_strided_step(model: models.PerceiverARModel, part: training.Partitioned,
                      stride: int | None = None) -> EvalStep:
  """eval_step(params, batch) -> summed metrics over every target (FULL_SEQUENCE mode).

  Stride defaults to num_latents (non-overlapping windows).
  """
  def window_sums(params: Any, batch: Batch, start: jax.Array, first: jax.Array
                  ) -> dict[str, jax.Array]:
    length = batch["decoder_target_tokens"].shape[-1]
    n = slicing.num_latent_positions(model.num_latents, length)
    starts = jnp.full(batch["decoder_target_tokens"].shape[:1], start, jnp.int32)
    logits = model.logits(params, batch, starts)  # [batch, n, vocab]
    targets = slicing.window(batch["decoder_target_tokens"], starts, n)
    weights = slicing.window(batch["decoder_loss_weights"].astype(jnp.float32), starts, n)
    weights = weights * (start + jnp.arange(n) >= first)[None, :]
    ce_sum, z_sum, nll = models.cross_entropy(logits, targets, weights,
                                              label_smoothing=model.label_smoothing,
                                              z_loss=model.z_loss)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": ce_sum + z_sum, "nll_sum": jnp.sum(nll * weights), "z_loss_sum": z_sum,
            "correct_sum": jnp.sum(correct * weights), "weight_sum": jnp.sum(weights)}

  replicated = pt.replicated(part.mesh)
  jitted = jax.jit(window_sums, in_shardings=(part.state_sharding.params, part.batch_sharding,
                                              replicated, replicated), out_shardings=replicated)

  def run(params: Any, batch: Batch) -> dict[str, Any]:
    length = batch["decoder_target_tokens"].shape[-1]
    totals: dict[str, Any] = {}
    with part.context():
      for start, first in window_plan(length, model.num_latents, stride or model.num_latents):
        sums = jitted(params, batch, np.int32(start), np.int32(first))
        totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
    return totals

  return run


def scored_mask(batch: Batch, mode: ScoringMode, num_latents: int) -> np.ndarray:
  """[batch, length] bool: the target positions `mode` scores (host-side, for byte counts)."""
  weights = np.asarray(batch["decoder_loss_weights"]) > 0
  if mode == ScoringMode.FULL_SEQUENCE:
    return weights
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


def byte_counter(vocab: seqio.Vocabulary, mode: ScoringMode, num_latents: int
                 ) -> Callable[[Batch], int] | None:
  """batch -> UTF-8 bytes of the scored targets, for text vocabularies (byte, SPM).

  Byte vocabularies: one byte per scored byte token (exact). Other text
  vocabularies: for each run of scored positions [a, b), the bytes of
  decode(ids[:b]) minus those of decode(ids[:a]), so a piece's leading space and
  a window starting mid-word are counted as in the whole text. None for
  vocabularies that do not decode to text (pass-through ids, MIDI events).
  """
  if isinstance(vocab, seqio.ByteVocabulary):
    offset = getattr(vocab, "_num_special_tokens", 3)

    def count_bytes(batch: Batch) -> int:
      ids = np.asarray(batch["decoder_target_tokens"])
      mask = scored_mask(batch, mode, num_latents)
      return int(np.sum(mask & (ids >= offset) & (ids < offset + 256)))

    return count_bytes
  if not isinstance(vocab.decode([]), str):
    return None

  def size(ids: np.ndarray) -> int:
    return len(vocab.decode([int(i) for i in ids if i != 0]).encode("utf-8"))

  def count_text(batch: Batch) -> int:
    total = 0
    for ids, keep in zip(np.asarray(batch["decoder_target_tokens"]),
                         scored_mask(batch, mode, num_latents)):
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


def evaluate_checkpoint(*, model: models.PerceiverARModel, dataset_cfg: datasets.DatasetConfig,
                        checkpoint_path: str, output_dir: str | None = None,
                        mode: ScoringMode = ScoringMode.LAST_LATENTS, stride: int | None = None,
                        max_batches: int | None = None,
                        partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig()
                        ) -> tuple[dict[str, float], str]:
  """Scores `dataset_cfg`'s split with a checkpoint; writes TensorBoard scalars and JSON.

  Output: `<output_dir>` (default MODEL_DIR/eval) gets scalars tagged
  `<mode>/<metric>` at the checkpoint's step and `<task>-<split>-<mode>-<step>.json`.
  Returns (metrics, json path).
  """
  length = datasets.model_length(dataset_cfg.task_feature_lengths)
  if length < model.num_latents:
    raise ValueError(f"TASK_FEATURE_LENGTHS {dict(dataset_cfg.task_feature_lengths)} gives "
                     f"{length} tokens, fewer than num_latents={model.num_latents}")
  vocab = datasets.get_task(dataset_cfg.mixture_or_task_name).output_features["targets"].vocabulary
  params, step, part = checkpoints.load_params(model, checkpoint_path, length, partitioning_cfg)
  if mode == ScoringMode.FULL_SEQUENCE:
    eval_step = make_strided_step(model, part, stride)
  else:
    eval_step = training.make_eval_step(model, part)
  ds = datasets.get_dataset(dataset_cfg, repeat=False)
  batches = (pad_batch(b, dataset_cfg.batch_size) for b in datasets.numpy_batches(ds))
  summary = evaluate(eval_step, params, batches, max_batches,
                     byte_count=byte_counter(vocab, mode, model.num_latents))
  summary["step"] = float(step)
  output_dir = output_dir or os.path.join(checkpoints.resolve_path(checkpoint_path)[0], "eval")
  fileio.gfile.makedirs(output_dir)
  writer = metric_writers.create_default_writer(output_dir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, {f"{mode.value}/{k}": v for k, v in summary.items()})
  writer.close()
  name = f"{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}-{mode.value}-{step}.json"
  path = os.path.join(output_dir, name)
  fileio.write_atomic(path, json.dumps(
      {"checkpoint": checkpoint_path, "mode": mode.value, "stride": stride, **summary},
      indent=1, sort_keys=True))
  return summary, path
