"""Perceiver IO inference: fill the masks of a masked-LM split, or predict its labels.

One forward pass per batch (no decoding loop): the argmax at every output row. Records
(jsonl, one per example, process 0 writes):
  masked LM: `inputs` (runs of [MASK] shown as "[MASK]"), `targets` (the original
    text), `prediction` (the input with each masked byte replaced by the model's),
    `masked_accuracy` (of the example's masked bytes);
  classification: `inputs`, `targets` and `prediction` (label names where the task
    has them, else ids) and the predicted label's `probability`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import seqio

from perceiver_ar_t5x import checkpoints, datasets, fileio, training
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.io_models import PerceiverIOModel

MASK_TEXT = "[MASK]"


def _batches(model: PerceiverIOModel, cfg: datasets.DatasetConfig, max_examples: int | None
             ) -> Iterator[dict[str, np.ndarray]]:
  """The split's examples in order as padded batches of cfg.batch_size rows."""
  lengths = dict(cfg.task_feature_lengths)
  ds = datasets.get_dataset(cfg, repeat=False,
                            converter=model.feature_converter(lengths, cfg.pack))
  seen = 0
  for batch in datasets.numpy_batches(ds):
    yield batch
    seen += len(batch["encoder_input_tokens"])
    if max_examples is not None and seen >= max_examples:
      return


def text_with_masks(vocab: seqio.Vocabulary, ids: np.ndarray, mask_id: int | None) -> str:
  """Decodes ids (without padding), each run of mask_id shown as one [MASK]."""
  ids = [int(i) for i in ids if i > 0]
  parts, run = [], []
  for i in ids + [None]:
    if i is None or (i == mask_id) != (run[:1] == [mask_id]):
      if run:
        parts.append(MASK_TEXT if run[0] == mask_id else vocab.decode(run))
      run = []
    if i is not None:
      run.append(i)
  return "".join(parts)


def _label(names: Sequence[str] | None, label: int) -> Any:
  return names[label] if names is not None and 0 <= label < len(names) else label


def records(model: PerceiverIOModel, params: Any, part: training.Partitioned,
            cfg: datasets.DatasetConfig, max_examples: int | None) -> list[dict[str, Any]]:
  """One prediction record per example of cfg's split (at most max_examples)."""
  task = datasets.get_task(cfg.mixture_or_task_name)
  vocab = task.output_features["inputs"].vocabulary
  names = getattr(task.output_features["targets"].vocabulary, "labels", None)
  with part.context():
    predict = jax.jit(model.predict)
  out: list[dict[str, Any]] = []
  for batch in _batches(model, cfg, max_examples):
    with part.context():
      ids, probs = jax.device_get(predict(params, batch))
    for row in range(len(batch["encoder_input_tokens"])):
      inputs = batch["encoder_input_tokens"][row]
      targets, weights = batch["encoder_target_tokens"][row], batch["encoder_loss_weights"][row]
      if model.is_mlm:
        masked = weights > 0
        filled = np.where(masked, ids[row], inputs)
        out.append({"inputs": text_with_masks(vocab, inputs, model.mask_id),
                    "targets": vocab.decode([int(t) for t in targets if t > 0]),
                    "prediction": vocab.decode([int(t) for t in filled if t > 0]),
                    "masked_accuracy": float(np.mean(ids[row][masked] == targets[masked]))
                    if masked.any() else None})
      else:
        out.append({"inputs": vocab.decode([int(t) for t in inputs if t > 0]),
                    "targets": _label(names, int(targets[0])),
                    "prediction": _label(names, int(ids[row][0])),
                    "probability": float(probs[row][0])})
  return out[:max_examples] if max_examples is not None else out


def sample_from_split(model: PerceiverIOModel, params: Any, cfg: datasets.DatasetConfig
                      ) -> dict[str, Any]:
  """The first validation example's record (printed at the end of training)."""
  one = datasets.DatasetConfig(**{**cfg.__dict__, "batch_size": 1})
  part = checkpoints.params_partitioning(model, model.check_lengths(cfg.task_feature_lengths),
                                         pt.PartitioningConfig())
  return records(model, params, part, one, 1)[0]


def infer(*, model: PerceiverIOModel, checkpoint_path: str, output_dir: str,
          dataset_cfg: datasets.DatasetConfig, max_examples: int | None = 16,
          partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig()) -> str:
  """Writes `<output_dir>/<task>-<split>-<step>.jsonl` (see the module docstring)."""
  length = model.check_lengths(dataset_cfg.task_feature_lengths)
  params, step, part = checkpoints.load_params(model, checkpoint_path, length, partitioning_cfg)
  recs = records(model, params, part, dataset_cfg, max_examples)
  if not recs:
    raise datasets.DataError(f"no examples in {dataset_cfg.mixture_or_task_name}-"
                             f"{dataset_cfg.split}")
  path = os.path.join(output_dir, f"{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}-"
                                  f"{step}.jsonl")
  if jax.process_index() == 0:
    fileio.write_atomic(fileio.absolute(path), [json.dumps(r) + "\n" for r in recs])
  return path
