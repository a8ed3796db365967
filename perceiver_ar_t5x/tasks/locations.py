"""Where the data-backed tasks find their files, read lazily at dataset-build time.

SeqIO tasks are registered when `perceiver_ar_t5x.tasks` is imported, before gin has
parsed anything, so a task cannot take its data directory as a constructor argument.
Instead every task reads its location from here when its dataset is built. A value set
by `configure(...)` wins; otherwise the environment variable in `ENV_VARS` is used.

Gin calls `configure` as the value of MIXTURE_OR_TASK_NAME (see gin/tasks/*.gin); the
gin macros carry the environment variables' names:

    MIXTURE_OR_TASK_NAME = @tasks.configure()
    tasks.configure.task = 'text_bytes'
    tasks.configure.text_files = %TEXT_FILES   # None: use $TEXT_FILES

so the locations are set when the trainer builds its dataset configs, and the returned
task name is what the configs read. This is process-wide state, on purpose: it mirrors
how TFDS itself reads TFDS_DATA_DIR.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from perceiver_ar_t5x.datasets import DataError

ENV_VARS = {
    "tfds_data_dir": "TFDS_DATA_DIR",  # c4_en_spm, pg19_* (TFDS); the TFDS convention
    "text_files": "TEXT_FILES",  # text_bytes: a directory or glob of .txt files
    "text_validation_files": "TEXT_VALIDATION_FILES",  # optional: else a hash split
    "pg19_dir": "PG19_DIR",  # pg19_*: local {train,validation,test}/*.txt (else TFDS)
    "maestro_dir": "MAESTRO_DIR",  # maestro_midi: MAESTRO layout or any .mid directory
    "spm_model": "SPM_MODEL",  # *_spm: path of a SentencePiece .model file
    "cls_train_files": "CLS_TRAIN_FILES",  # text_classification: text<TAB>label or jsonl
    "cls_validation_files": "CLS_VALIDATION_FILES",  # optional: else 10% of lines by hash
}
LABELS_ENV_VAR = "CLS_LABELS"  # text_classification's label list, comma-separated

_overrides: dict[str, Any] = {}
_labels: list[tuple[str, ...]] = []  # the configured label list, if any (one entry)


def configure(*, task: str | None = None, model_vocab_size: int | None = None,
              labels: Sequence[str] | None = None, num_classes: int | None = None,
              **locations: str | None) -> str | None:
  """Sets data locations (None = fall back to the env var); returns `task` unchanged.

  Args:
    task: the task name to return, so gin can use this call as MIXTURE_OR_TASK_NAME.
    model_vocab_size: if given together with a SentencePiece model, checks here (early,
      with a clear message) that the model's vocabulary fits the task's vocabulary.
    **locations: any of the keys of ENV_VARS.
  """
  unknown = sorted(set(locations) - set(ENV_VARS))
  if unknown:
    raise DataError(f"unknown data location(s) {unknown}; known: {sorted(ENV_VARS)}")
  for key, value in locations.items():
    if value is None:
      _overrides.pop(key, None)
    else:
      _overrides[key] = os.fspath(value)
  if labels is not None:
    _labels[:] = [_label_tuple(labels)]
  if model_vocab_size is not None and task is not None and task.endswith("_spm"):
    from perceiver_ar_t5x.tasks import vocabularies  # avoids a cycle at import time
    size = vocabularies.spm_vocabulary().vocab_size
    if size > model_vocab_size:
      raise DataError(f"SentencePiece model {get('spm_model')} has {size} pieces but the "
                      f"model's VOCAB_SIZE is {model_vocab_size}; raise VOCAB_SIZE")
  if num_classes is not None and task is not None:
    from perceiver_ar_t5x.tasks import classification  # avoids a cycle at import time
    classification.check_num_classes(task, num_classes)
  return task


def _label_tuple(labels: Sequence[str] | str) -> tuple[str, ...]:
  """A label list from gin (a list) or a comma-separated string; empty/duplicates refused."""
  names = tuple(labels.split(",")) if isinstance(labels, str) else tuple(labels)
  names = tuple(str(n).strip() for n in names)
  if not names or "" in names or len(set(names)) != len(names):
    raise DataError(f"labels must be distinct non-empty names, got {list(names)}")
  return names


def label_names() -> tuple[str, ...] | None:
  """The configured label list, else $CLS_LABELS (comma-separated), else None."""
  if _labels:
    return _labels[0]
  env = os.environ.get(LABELS_ENV_VAR)
  return _label_tuple(env) if env else None


def get(key: str) -> str | None:
  """The configured location for `key`, else its environment variable, else None."""
  if key not in ENV_VARS:
    raise KeyError(f"unknown data location {key!r}; known: {sorted(ENV_VARS)}")
  return _overrides.get(key) or os.environ.get(ENV_VARS[key]) or None


def require(key: str, task: str) -> str:
  """`get(key)`, or a DataError that says how to set it."""
  value = get(key)
  if not value:
    raise DataError(f"task {task!r} needs a data location: set the gin macro {ENV_VARS[key]} "
                    f"(--gin.{ENV_VARS[key]}=\"'...'\") or the environment variable "
                    f"{ENV_VARS[key]}")
  return value


def reset() -> None:
  """Forgets every `configure` override (tests)."""
  _overrides.clear()
  _labels.clear()
