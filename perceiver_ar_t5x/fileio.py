"""File I/O for MODEL_DIR and output dirs that may be local paths or URLs (gs://...).

On a Cloud TPU pod MODEL_DIR is a `gs://bucket/dir`; `os`/`open` would silently
write such a path to the local disk (`./gs:/bucket/dir`). Everything that
touches MODEL_DIR therefore goes through `tf.io.gfile` (local paths and any
registered scheme alike: gs://, ram:// in tests), and paths are made absolute
only when they are local.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable

import tensorflow as tf

gfile = tf.io.gfile

# What a failed gfile call raises: tf.errors.OpError (local or remote) or an OSError.
Error = (OSError, tf.errors.OpError)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
  """True for `scheme://...` paths (gs://, ram://, s3://), False for local paths."""
  return bool(_URL.match(os.fspath(path)))


def absolute(path: str) -> str:
  """`os.path.abspath` for local paths; URLs are returned unchanged (minus a trailing /)."""
  path = os.fspath(path)
  if is_url(path):
    return path.rstrip("/") if not path.endswith("://") else path
  return os.path.abspath(path)


def reason(e: BaseException) -> str:
  """The short cause of an `Error` ("Permission denied"), for one-line messages."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = getattr(e, "message", None) or str(e)
  return text.split(";")[-1].strip() if ";" in text else text


def write_text(path: str, text: str) -> None:
  """Writes `path` whole (not atomic: for files rewritten in full, e.g. config.gin)."""
  with gfile.GFile(path, "w") as f:
    f.write(text)


def write_atomic(path: str, lines: Iterable[str] | str) -> None:
  """Writes `<path>.tmp` then renames it over `path`, so readers never see half a file.

  The parent directory is created. On GCS the rename is a copy + delete, which
  is still all-or-nothing for readers of `path`.
  """
  parent = os.path.dirname(path)
  if parent:
    gfile.makedirs(parent)
  tmp = path + ".tmp"
  with gfile.GFile(tmp, "w") as f:
    f.write(lines if isinstance(lines, str) else "".join(lines))
  gfile.rename(tmp, path, overwrite=True)


def write_via_local(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(local_path)` (a library that only writes local files, e.g. pretty_midi)
  and copies the result to `path` when `path` is a URL."""
  if not is_url(path):
    write(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    write(local)
    gfile.copy(local, path, overwrite=True)
