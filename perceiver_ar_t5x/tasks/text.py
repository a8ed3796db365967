"""Text tasks: documents -> tokens -> one random context-sized crop per document.

`text_bytes` is "bring your own corpus": any directory or glob of .txt files (one file =
one document), UTF-8 bytes as tokens. Its validation split is a second directory/glob if
given (TEXT_VALIDATION_FILES), else 5% of the files chosen by a hash of the file name.
`make_text_task` is shared with c4.py and pg19.py.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from perceiver_ar_t5x.tasks import files, locations, preprocessors, vocabularies

VALIDATION_PERCENT = 5.0
TEXT_SUFFIXES = (".txt",)
SPM_CHARS_PER_TOKEN = 16  # bounds the characters one SentencePiece piece covers


def make_text_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary, *,
                   units_per_token: int, unit: str) -> seqio.Task:
  """Registers (idempotently) a task over a source of {'targets': text} documents."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  steps = [
      functools.partial(preprocessors.random_crop_text, units_per_token=units_per_token,
                        unit=unit),
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      preprocessors.append_eos,
      preprocessors.random_crop,
      preprocessors.select_targets,
  ]
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=steps, metric_fns=[],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False)})


def byte_text_task(name: str, source: seqio.DataSource) -> seqio.Task:
  return make_text_task(name, source, vocabularies.byte_vocabulary(), units_per_token=1,
                        unit="BYTE")


def spm_text_task(name: str, source: seqio.DataSource) -> seqio.Task:
  return make_text_task(name, source, vocabularies.spm_vocabulary(),
                        units_per_token=SPM_CHARS_PER_TOKEN, unit="UTF8_CHAR")


def read_text_files(paths: list[str], split: str, *, task: str, utf8: bool = False
                    ) -> tf.data.Dataset:
  """{'targets': file contents} per readable, non-empty file; bad files are skipped."""
  ds = files.read_skipping(paths, files.read_utf8 if utf8 else files.read_bytes, task=task,
                           dtype=tf.string, shape=[], split=split)
  ds = ds.map(lambda ex: {"targets": ex["value"]})
  return ds.filter(lambda ex: tf.strings.length(ex["targets"]) > 0)


def text_file_paths(split: str, *, task: str = "text_bytes") -> list[str]:
  """The split's files: TEXT_VALIDATION_FILES for validation if set, else a hash split."""
  pattern = locations.require("text_files", task)
  validation = locations.get("text_validation_files")
  if validation:
    paths = files.list_files(pattern if split == "train" else validation, TEXT_SUFFIXES)
    where = pattern if split == "train" else validation
  else:
    paths = files.hash_split(files.list_files(pattern, TEXT_SUFFIXES), split,
                             VALIDATION_PERCENT)
    where = f"{pattern}, {VALIDATION_PERCENT:g}% by file-name hash"
  files.check_not_empty(paths, task, split, where)
  return paths


def register_text_bytes(name: str = "text_bytes") -> seqio.Task:
  source = files.PathsDataSource(
      ["train", "validation"], functools.partial(text_file_paths, task=name),
      functools.partial(read_text_files, task=name))
  return byte_text_task(name, source)
