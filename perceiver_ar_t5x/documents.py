"""A split's documents, whole: the task's own pipeline minus its crop steps.

Whole-split evaluation must score what the task means by a document, so the task
(SeqIO) stays the source of truth: its source and preprocessors run as in training,
except the steps marked as crops (`tasks.preprocessors.crop_step`), with no shuffle
and one epoch. Augmentation is already off outside `train` (maestro's `augment`).
Prefix-LM tasks (`inputs` + `targets`) give one document `inputs + targets` whose
inputs carry loss weight 0: context, never scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import seqio

from perceiver_ar_t5x import datasets
from perceiver_ar_t5x.tasks import preprocessors


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: tokens [length] int32, loss weights [length] float32 (0 on inputs)."""

  tokens: np.ndarray
  weights: np.ndarray

  @property
  def length(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_scored(self) -> int:
    return int(np.count_nonzero(self.weights))

  def truncated(self, length: int) -> Document:
    return Document(self.tokens[:length], self.weights[:length])


def document_task(task: seqio.Task) -> seqio.Task:
  """An unregistered copy of `task` without its crop steps."""
  steps = [s for s in task.preprocessors if not preprocessors.is_crop_step(s)]
  return seqio.Task(f"{task.name}__documents", source=task.source,
                    output_features=task.output_features, preprocessors=steps, metric_fns=[],
                    shuffle_buffer_size=None)


def _as_document(example: Mapping[str, np.ndarray]) -> Document:
  targets = np.asarray(example["targets"], np.int32).reshape(-1)
  inputs = np.asarray(example.get("inputs", np.zeros([0], np.int32)), np.int32).reshape(-1)
  weights = np.concatenate([np.zeros(inputs.shape, np.float32),
                            (targets != 0).astype(np.float32)])
  return Document(np.concatenate([inputs, targets]), weights)


def iter_documents(task_name: str, split: str, task_feature_lengths: Mapping[str, int]
                   ) -> Iterator[Document]:
  """Every non-empty document of the split, in the source's order (same on every host).

  `task_feature_lengths` only feeds preprocessors that need it (the copy task's
  length); nothing is cut to it.
  """
  task = datasets.get_task(task_name)
  if not isinstance(task, seqio.Task):
    raise datasets.DataError(f"whole-split evaluation needs a task, {task_name!r} is a mixture")
  ds = document_task(task).get_dataset(
      sequence_length=dict(task_feature_lengths), split=split, shuffle=False, seed=0,
      num_epochs=1, trim_output_features=False, try_in_mem_cache=False)
  for example in ds.as_numpy_iterator():
    doc = _as_document(example)
    if doc.num_scored:
      yield doc


def load_documents(task_name: str, split: str, task_feature_lengths: Mapping[str, int], *,
                   max_documents: int | None = None, max_tokens: int | None = None
                   ) -> list[Document]:
  """The split's first documents, capped at `max_documents` and `max_tokens` scored tokens.

  The token cap cuts the last document where the count is reached, so the cap is
  exact and the bytes of a cut document are those of its kept part.
  """
  docs: list[Document] = []
  total = 0
  for doc in iter_documents(task_name, split, task_feature_lengths):
    if max_documents is not None and len(docs) >= max_documents:
      break
    if max_tokens is not None and total + doc.num_scored >= max_tokens:
      cut = int(np.searchsorted(np.cumsum(doc.weights > 0), max_tokens - total)) + 1
      docs.append(doc.truncated(cut))
      break
    docs.append(doc)
    total += doc.num_scored
  if not docs:
    raise datasets.DataError(f"{task_name}: the {split} split has no documents to score")
  return docs


def byte_counter(vocab: seqio.Vocabulary):
  """Document -> UTF-8 bytes of its scored text, or None for non-text vocabularies.

  Byte vocabularies: one byte per byte token (EOS and padding have none). Other
  text vocabularies (SentencePiece): the bytes of the decoded scored tokens, so a
  whole document counts the bytes of its text as the vocabulary reproduces it.
  """
  if isinstance(vocab, seqio.ByteVocabulary):
    offset = getattr(vocab, "_num_special_tokens", 3)

    def count_bytes(doc: Document) -> int:
      ids = doc.tokens[doc.weights > 0]
      return int(np.count_nonzero((ids >= offset) & (ids < offset + 256)))

    return count_bytes
  if not isinstance(vocab.decode([]), str):
    return None

  def count_text(doc: Document) -> int:
    ids = [int(i) for i in doc.tokens[doc.weights > 0] if i not in (0, vocab.eos_id)]
    return len(vocab.decode(ids).encode("utf-8"))

  return count_text
