"""Sequence classification tasks for Perceiver IO: UTF-8 bytes in, one label id out.

`text_classification` reads a user's labelled lines: CLS_TRAIN_FILES (a file, directory
or glob) of `text<TAB>label` lines (.tsv/.txt; split at the last tab; a first line
`text<TAB>label` is a header) or .jsonl lines {"text": ..., "label": ...}, one example a
line. Validation is CLS_VALIDATION_FILES if set, else the 10% of the train lines whose
*text* hashes lowest (duplicated texts never straddle the split). Label ids follow the
configured label list (tasks.configure(labels=...) or $CLS_LABELS), else the sorted
labels of all train lines, computed once. Files are parsed whole when a dataset is built
(classification sets are small), so a bad line is one DataError naming file and line.

`keyword_classification` needs no files (tests, the CPU demo): lowercase noise with one
of four uppercase keywords inserted at a random place; the label is the keyword.

Features: 'inputs' = bytes (ByteVocabulary, the first `inputs`-length bytes), 'targets'
= [label id] in [0, num_labels). Id 0 is a class here, not padding: a converter that
weights the loss by targets != 0 would drop class 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from perceiver_ar_t5x.datasets import DataError
from perceiver_ar_t5x.tasks import files, locations

VALIDATION_PERCENT = 10.0
SUFFIXES = (".tsv", ".txt", ".jsonl")
SPLITS = ("train", "validation")
LABEL_COUNTS: dict[str, Callable[[], int]] = {}  # task -> its number of labels
_TRAIN_LABELS: dict[tuple[str, ...], tuple[str, ...]] = {}  # train files -> sorted labels
Example = tuple[str, str, str, int]  # text, label, path, line number


def _parse_line(line: str, path: str, number: int, task: str) -> tuple[str, str] | None:
  """(text, label) of one line; None for a blank line or a `text<TAB>label` header."""
  where = f"task {task!r}: {path}:{number}"
  if not line.strip():
    return None
  if path.lower().endswith(".jsonl"):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: not JSON ({e.msg}): {line[:60]!r}") from None
    if (not isinstance(record, dict) or not isinstance(record.get("text"), str)
        or not isinstance(record.get("label"), (str, int))):
      raise DataError(f'{where}: expected {{"text": str, "label": str}}, got {line[:60]!r}')
    text, label = record["text"], str(record["label"])
  else:
    if "\t" not in line:
      raise DataError(f"{where}: expected 'text<TAB>label', found no tab: {line[:60]!r}")
    text, label = line.rsplit("\t", 1)
    if number == 1 and (text.strip().lower(), label.strip().lower()) == ("text", "label"):
      return None
  if not label.strip():
    raise DataError(f"{where}: empty label: {line[:60]!r}")
  return text, label.strip()


def read_examples(path: str, task: str) -> list[Example]:
  """Every example of one file; DataError (one line) for a bad line or an empty file."""
  try:
    content = files.read_bytes(path).decode("utf-8", errors="replace")
  except (OSError, tf.errors.OpError) as e:
    raise DataError(f"task {task!r}: cannot read {path} ({type(e).__name__})") from None
  out = []
  for number, line in enumerate(content.split("\n"), start=1):  # not splitlines: U+2028
    parsed = _parse_line(line.removesuffix("\r"), path, number, task)
    if parsed is not None:
      out.append((*parsed, path, number))
  if not out:
    raise DataError(f"task {task!r}: {path} has no examples (empty file)")
  return out


def file_paths(key: str, task: str) -> list[str]:
  """The files of location `key` ('cls_train_files' or 'cls_validation_files')."""
  pattern = locations.require(key, task)
  paths = files.list_files(pattern, SUFFIXES)
  files.check_not_empty(paths, task, "train" if key == "cls_train_files" else "validation",
                        pattern)
  return paths


def _bucket(text: str) -> float:
  """Stable position of a text in [0, 100): equal texts always land in the same split."""
  digest = hashlib.md5(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 * 100


def split_examples(split: str, task: str) -> list[Example]:
  """The split's examples: its own files, or the train lines split by a hash of the text.

  When no train text hashes into validation, the lowest-hash text is validation, so a
  file of >= 2 distinct texts always has both splits.
  """
  if split not in SPLITS:
    raise DataError(f"task {task!r} has splits {list(SPLITS)}, got {split!r}")
  if split == "validation" and locations.get("cls_validation_files"):
    return [ex for p in file_paths("cls_validation_files", task) for ex in read_examples(p, task)]
  train = [ex for p in file_paths("cls_train_files", task) for ex in read_examples(p, task)]
  if locations.get("cls_validation_files"):
    return train
  label_ids(train, label_list(task), task)  # a bad label fails both splits alike
  held = {ex[0] for ex in train if _bucket(ex[0]) < VALIDATION_PERCENT}
  if not held and len({ex[0] for ex in train}) >= 2:
    held = {min((ex[0] for ex in train), key=_bucket)}
  out = [ex for ex in train if (ex[0] in held) == (split == "validation")]
  if not out:
    raise DataError(f"task {task!r} split {split!r} has no examples ({VALIDATION_PERCENT:g}% "
                    f"of the lines of {locations.get('cls_train_files')} by text hash)")
  return out


def label_list(task: str = "text_classification") -> tuple[str, ...]:
  """The labels in id order: the configured list, else the sorted train labels (cached)."""
  configured = locations.label_names()
  if configured is not None:
    return configured
  paths = tuple(file_paths("cls_train_files", task))
  if paths not in _TRAIN_LABELS:
    _TRAIN_LABELS[paths] = tuple(sorted({ex[1] for p in paths for ex in read_examples(p, task)}))
  return _TRAIN_LABELS[paths]


def label_ids(examples: Sequence[Example], labels: Sequence[str], task: str) -> np.ndarray:
  """Each example's label id; an unknown label is a DataError naming its file and line."""
  index = {name: i for i, name in enumerate(labels)}
  for _, label, path, number in examples:
    if label not in index:
      raise DataError(f"task {task!r}: {path}:{number}: unknown label {label!r}; the "
                      f"{len(labels)} labels are {list(labels)}")
  return np.array([index[ex[1]] for ex in examples], np.int32)


class LabelVocabulary(seqio.PassThroughVocabulary):
  """Label ids pass through; the size is the label count, looked up on first use.

  Tasks register at import, before gin sets the files or the label list.
  """

  def __init__(self, task: str, labels: Sequence[str] | None = None) -> None:
    self._task, self._labels = task, None if labels is None else tuple(labels)
    super().__init__(size=0, eos_id=None)

  @property
  def labels(self) -> tuple[str, ...]:
    """Label names in id order (infer writes these, not ids)."""
    return self._labels if self._labels is not None else label_list(self._task)

  @property
  def _base_vocab_size(self) -> int:
    return len(self.labels)

  @property
  def size(self) -> int:
    return self._base_vocab_size

  def __eq__(self, other: object) -> bool:
    return other is self

  __hash__ = object.__hash__


class LabelledLinesSource(seqio.DataSource):
  """{'text', 'label'} examples of a split, sharded by example (every host parses all)."""

  def __init__(self, task: str) -> None:
    self._task = task
    super().__init__(splits=SPLITS, caching_permitted=True)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [self._task]

  def num_input_examples(self, split: str) -> int | None:
    return None

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
    del kwargs  # seqio's interface
    examples = split_examples(split, self._task)
    ids = label_ids(examples, label_list(self._task), self._task)
    order = np.arange(len(examples))
    if shuffle:
      np.random.default_rng(seed).shuffle(order)
    if shard_info is not None and shard_info.num_shards > 1:
      order = order[shard_info.index::shard_info.num_shards]
    texts = np.array([examples[i][0].encode("utf-8") for i in order], dtype=object)
    return tf.data.Dataset.from_tensor_slices(
        {"text": tf.constant(texts, tf.string, shape=[len(order)]),
         "label": tf.constant(ids[order], tf.int32, shape=[len(order)])})


def inputs_length(sequence_length: Mapping[str, int] | None) -> int:
  """The `inputs` length, checked before any traced map so its error is a plain one."""
  if not sequence_length or "inputs" not in sequence_length:
    raise DataError(f"classification tasks need task_feature_lengths with 'inputs' (and "
                    f"'targets': 1), got {dict(sequence_length or {})}")
  return int(sequence_length["inputs"])


def encode_examples(ds: tf.data.Dataset, sequence_length: Mapping[str, int] | None
                    ) -> tf.data.Dataset:
  """{'text', 'label'} -> {'inputs': the first `inputs`-length bytes, 'targets': [label]}.

  Truncated, not cropped at random: the head of a text is the usual evidence (BERT), and
  train and eval then see the same bytes of an example.
  """
  length, vocab = inputs_length(sequence_length), seqio.ByteVocabulary()

  def encode(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {"inputs": vocab.encode_tf(tf.strings.substr(ex["text"], 0, length)),
            "targets": tf.reshape(ex["label"], [1])}

  return ds.map(encode, num_parallel_calls=tf.data.AUTOTUNE)


def register_text_classification(name: str = "text_classification") -> seqio.Task:
  """Registers (idempotently) the labelled-lines task (files from tasks.configure)."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  LABEL_COUNTS[name] = lambda: len(label_list(name))
  return seqio.TaskRegistry.add(
      name, source=LabelledLinesSource(name), preprocessors=[encode_examples], metric_fns=[],
      output_features={"inputs": seqio.Feature(seqio.ByteVocabulary(), add_eos=False),
                       "targets": seqio.Feature(LabelVocabulary(name), add_eos=False)})


def check_num_classes(task: str, num_classes: int) -> None:
  """DataError unless a classification task has exactly `num_classes` labels."""
  if task in LABEL_COUNTS and LABEL_COUNTS[task]() != num_classes:
    raise DataError(f"task {task!r} has {LABEL_COUNTS[task]()} labels but NUM_CLASSES is "
                    f"{num_classes}; set NUM_CLASSES to the label count")
