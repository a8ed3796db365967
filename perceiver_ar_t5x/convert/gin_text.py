"""Reads gin files of other code bases (T5X's operative `config.gin`) as text, without gin.

Library code never imports gin, and a foreign config names modules (flaxformer, t5x) that
are not installed, so it could not be parsed by gin here anyway. An operative config is
`name = value` lines, values wrapped inside brackets when long; hand-written gin files
also use `Class:` blocks of indented `param = value` lines. Includes are not followed.
"""

from __future__ import annotations

import ast
from typing import Any

from perceiver_ar_t5x import fileio


def read_bindings(path: str) -> dict[str, str]:
  """parse_bindings of the file at `path` (local or gs://)."""
  with fileio.gfile.GFile(path) as f:
    return parse_bindings(f.read())


def parse_bindings(text: str) -> dict[str, str]:
  """{'scope/module.Class.param' or 'MACRO': value text} of a gin file (no includes): an
  operative config's `name = value` lines (wrapped inside brackets) or `Class:` blocks."""
  bindings: dict[str, str] = {}
  block, pending = None, ""
  for raw in text.splitlines():
    line = _strip_comment(raw)
    if pending:
      pending += " " + line.strip()
    elif not line.strip() or line.startswith(("from ", "import ", "include ")):
      continue
    elif line[0].isspace() and block:
      pending = f"{block}.{line.strip()}"
    elif line.rstrip().endswith(":") and "=" not in line:
      block = line.strip()[:-1]
      continue
    else:
      block, pending = None, line.strip()
    if sum(map(pending.count, "([{")) > sum(map(pending.count, ")]}")):
      continue
    name, sep, text_value = pending.partition("=")
    if sep:
      bindings[name.strip()] = text_value.strip()
    pending = ""
  return bindings


def _strip_comment(line: str) -> str:
  quote = None  # the open quote character
  for i, ch in enumerate(line):
    if quote or ch in "'\"":
      quote = None if ch == quote else (quote or ch)
    elif ch == "#":
      return line[:i]
  return line


def value(bindings: dict[str, str], text: str, seen: tuple[str, ...] = ()) -> Any:
  """A binding's value: %MACROs resolved, Python literals parsed, else the text itself."""
  text = text.strip()
  if text.startswith("%") and text[1:] in bindings and text[1:] not in seen:
    return value(bindings, bindings[text[1:]], seen + (text[1:],))
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
