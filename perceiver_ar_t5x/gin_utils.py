"""What the train/eval/infer binaries share: T5X flags, gin parsing, quiet logs, one-line errors.

This is binary-side code (it imports gin); library modules never do.
"""

from __future__ import annotations

import contextlib
import difflib
import logging as py_logging
import os
import re
import sys
from collections.abc import Iterator, Sequence

from absl import flags, logging

import gin

FLAGS = flags.FLAGS

flags.DEFINE_multi_string("gin_file", [], "Gin files to parse, in order (T5X --gin_file).")
flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings, e.g. 'TRAIN_STEPS=10'.")
flags.DEFINE_list("gin_search_paths", ["."], "Directories searched for gin files and includes.")
flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize() (TPU pods/multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host off TPU).")
flags.DEFINE_integer("process_count", None, "Number of processes (multi-host off TPU).")
flags.DEFINE_integer("process_index", None, "This process's index (multi-host off TPU).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "Multi-host: a process that sends no "
                     "heartbeat for this long counts as dead and every other process exits "
                     "non-zero (jax.distributed heartbeat timeout; JAX's default).", lower_bound=1)
flags.DEFINE_bool("library_logs", False, "Show INFO logs of libraries (orbax, seqio, clu, jax); "
                  "by default only this package's INFO lines and everyone's warnings show.")

_GIN_FLAG = re.compile(r"^--gin\.([A-Za-z_][\w./]*)=(.*)$", re.DOTALL)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """T5X shorthand: `--gin.NAME=VALUE` becomes `--gin_bindings=NAME = VALUE`."""
  out = []
  for arg in argv:
    m = _GIN_FLAG.match(arg)
    out.append(f"--gin_bindings={m.group(1)} = {m.group(2)}" if m else arg)
  return out


# Library messages that look alarming but are expected: gin probing include paths
# relative to the working directory first; orbax opening a checkpoint dir read-only.
_EXPECTED = ("Path not found:", "Given directory is read only",
             "CheckpointManagerOptions.read_only=True")


class _OwnInfoOnly(py_logging.Filter):
  """Passes warnings and errors from anyone, INFO only from perceiver_ar_t5x."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if str(record.msg).startswith(_EXPECTED):
      return False
    if record.levelno >= py_logging.WARNING:
      return True
    return "perceiver_ar_t5x" in record.pathname.replace(os.sep, "/")


def setup_logging() -> None:
  """Hides library INFO chatter (orbax, seqio, clu, absl) unless --library_logs."""
  if FLAGS.library_logs:
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


def register_enum_constants() -> None:
  """Lets gin files say `%models.CroppingMethod.FULL_LATENTS` (enums, not strings)."""
  from perceiver_ar_t5x import evaluation, models, optimizers, perceiver_ar, perceiver_io
  from perceiver_ar_t5x.layers import attention, block, embedding, mlp, norms
  for module_name, enum_cls in (("models", models.CroppingMethod),
                                ("norms", norms.NormKind),
                                ("mlp", mlp.Activation),
                                ("block", block.CrossKvNorm),
                                ("evaluation", evaluation.ScoringMode),
                                ("optimizers", optimizers.OptimizerName),
                                ("optimizers", optimizers.ScheduleName),
                                ("embedding", embedding.PositionEncoding),
                                ("attention", attention.AttentionKernel),
                                ("perceiver_ar", perceiver_ar.RematPolicy),
                                ("perceiver_io", perceiver_io.Head)):
    for member in enum_cls:
      name = f"{module_name}.{enum_cls.__name__}.{member.name}"
      with contextlib.suppress(ValueError):  # already registered
        gin.constant(name, member)


# The project's own configs (`include 'train.gin'`, 'models/...', 'tasks/...'), searched
# last, as T5X puts its bundled configs on the path: `--gin_file=gin/runs/x.gin` works
# without --gin_search_paths.
PROJECT_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def with_project_gin_dir(search_paths: Sequence[str]) -> list[str]:
  """`search_paths` plus the project's gin/ directory (when present and not listed yet)."""
  paths = list(search_paths)
  listed = {os.path.abspath(p) for p in paths}
  if os.path.isdir(PROJECT_GIN_DIR) and PROJECT_GIN_DIR not in listed:
    paths.append(PROJECT_GIN_DIR)
  return paths


@contextlib.contextmanager
def _syntax_errors(where: str) -> Iterator[None]:
  """gin's SyntaxError (a traceback otherwise) as a ConfigError naming the text."""
  try:
    yield
  except SyntaxError as e:
    text = (e.text or "").strip()
    place = f" ({e.filename}, line {e.lineno})" if e.filename not in (None, "<string>") else ""
    raise ConfigError(f"{e.msg} {where}: {text!r}{place}") from None


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str]) -> None:
  """Parses gin files then bindings; search paths resolve files and includes."""
  register_enum_constants()
  search_paths = with_project_gin_dir(search_paths)
  for path in search_paths:
    gin.add_config_file_search_path(os.path.abspath(path))
  if not gin_files:
    raise ConfigError("no --gin_file given (e.g. --gin_file=gin/tiny.gin)")
  resolved = []
  for path in gin_files:
    found = [os.path.join(d, path) for d in ["", *search_paths]
             if os.path.isfile(os.path.join(d, path))]
    if not found:
      raise ConfigError(f"gin file {path!r} not found (searched . and {search_paths})")
    # absolute, so gin opens it directly: for a relative "runs/x.gin" it would also look
    # for a Python package "runs", and a ./runs directory (the quick start's model dirs)
    # is one without a file, which crashes gin's lookup
    resolved.append(os.path.abspath(found[0]))
  with _syntax_errors("in a gin file"):
    gin.parse_config_files_and_bindings(resolved, [], finalize_config=False)
  check_macro_bindings(bindings)
  with _syntax_errors("in a --gin. binding (strings need inner quotes: "
                      "--gin.MODEL_DIR=\"'/path'\")"):
    gin.parse_config_files_and_bindings([], list(bindings), finalize_config=False)
  try:
    gin.finalize()
  except ValueError as e:
    m = re.match(r"^'?([\w./]+?)(?:/macro\.value)?'? set to `%gin\.REQUIRED`", str(e))
    if not m:
      raise
    raise ConfigError(f"required gin value {m.group(1)} is not set; pass "
                      f"--gin.{m.group(1)}=... (see the gin file's header)") from None


def defined_macros() -> list[str]:
  return sorted(k[0] for k in gin.config._CONFIG if k[1] == "gin.macro")  # noqa: SLF001


def check_macro_bindings(bindings: Sequence[str]) -> None:
  """A binding of a macro that no gin file defines is a typo (gin would accept it silently)."""
  known = defined_macros()
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name) or name in known:
      continue
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"--gin.{name}: no gin file defines macro {name}; {hint}"
                      f"known macros: {', '.join(known)}")


class ConfigError(ValueError):
  """A configuration mistake, reported as one line."""


def init_multiprocess(binary: str = "train") -> None:
  """jax.distributed.initialize from flags (or TPU auto-detection), then the peer watchdog.

  A process that dies ends the others with one `binary: error: PeerFailure: ...` line
  within --heartbeat_timeout_seconds (half of it: before JAX's own timeout aborts them).
  """
  if not FLAGS.multiprocess and FLAGS.coordinator_address is None:
    return
  import jax

  from perceiver_ar_t5x import multihost
  kwargs = {}
  if FLAGS.coordinator_address is not None:
    kwargs = dict(coordinator_address=FLAGS.coordinator_address,
                  num_processes=FLAGS.process_count, process_id=FLAGS.process_index)
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
  logging.info("process %d of %d", jax.process_index(), jax.process_count())

  def die(message: str) -> None:  # from the watchdog thread: the main thread may be stuck
    sys.stderr.write(f"{binary}: error: PeerFailure: {message}\n")
    sys.stderr.flush()
    os._exit(1)

  multihost.PeerWatchdog(timeout_s=FLAGS.heartbeat_timeout_seconds / 2, on_failure=die).start()


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  first = text[0] if text else type(e).__name__
  # gin appends "In call to configurable ..." context lines; keep the cause only.
  return f"{type(e).__name__}: {first}"


@contextlib.contextmanager
def one_line_errors(binary: str) -> Iterator[None]:
  """Known failure kinds exit 1 with `binary: error: <one line>`; nothing else is printed."""
  from perceiver_ar_t5x import checkpoints, datasets, inference, trainer
  known = (ConfigError, datasets.DataError, trainer.TrainingError, checkpoints.CheckpointError,
           inference.InferenceError,
           ValueError, TypeError, FileNotFoundError, OSError, KeyError, NameError,
           AttributeError)
  try:
    yield
  except known as e:
    if os.environ.get("PERCEIVER_AR_TRACEBACK"):
      raise
    sys.stderr.write(f"{binary}: error: {_one_line(e)}\n")
    sys.stderr.flush()
    os._exit(1)  # skip atexit hooks that may print more (tf/orbax threads)



@contextlib.contextmanager
def configured(binary: str, argv: Sequence[str]) -> Iterator[None]:
  """The common start of every binary: flags checked, logs set up, gin parsed, hosts joined.

  Everything inside runs under `one_line_errors(binary)`.
  """
  if len(argv) > 1:
    from absl import app
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  setup_logging()
  with one_line_errors(binary):
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    init_multiprocess(binary)
    yield
