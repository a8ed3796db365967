"""A quiet start for the binaries: TensorFlow imported without its native log lines.

TensorFlow is only the input pipeline here (SeqIO), yet importing it prints a
banner twice (cudart stub, CPU feature guard) and its first op prints
`failed call to cuInit ... (303)` on machines without a GPU; those lines come
from C++ before absl logging is initialised, so no log level hides them. The
binaries call `quiet_tensorflow()` before anything else imports TensorFlow:
the import and TF's device set-up run with file descriptor 2 pointed at
/dev/null, and TF is kept off accelerators (T5X does the same: JAX owns them).
Python exceptions still surface (they are raised after stderr is restored).
Set PERCEIVER_AR_VERBOSE_STARTUP=1 to see everything.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
  """Points fd 2 at /dev/null inside the block (native libraries write there directly)."""
  sys.stderr.flush()
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(null)
    os.close(saved)


def quiet_tensorflow() -> None:
  """Imports TensorFlow silently and hides accelerators from it (idempotent)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "tensorflow" in sys.modules or os.environ.get("PERCEIVER_AR_VERBOSE_STARTUP"):
    return
  with native_stderr_silenced():
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
