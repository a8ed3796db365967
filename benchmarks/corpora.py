r"""Builds the two real-data corpora the README's `*_small.gin` figures were measured on.

Neither is shipped or downloaded: both come from files already on a developer machine.

  # English prose: the text of mdBook HTML pages (e.g. the Rust books rustup installs),
  # one .txt per page, so documents range from a few hundred bytes to ~100 kB
  python benchmarks/corpora.py text --html ~/.rustup/toolchains/*/share/doc/rust/html \
      --out /tmp/data/text
  # Music: every Bach chorale music21 bundles, written as .mid (needs `pip install music21`,
  # in any Python; this project does not depend on it)
  python benchmarks/corpora.py midi --out /tmp/data/midi

Any folder of .txt files or of .mid files works the same way with `text_bytes` / `maestro_midi`.
"""

from __future__ import annotations

import argparse
import html.parser
import pathlib
import re

# mdBook pages keep the chapter in <main>; navigation, sidebars and scripts lie outside it.
_SKIP_TAGS = {"script", "style", "nav"}
_BOOKS = ("book", "nomicon", "reference", "edition-guide", "embedded-book", "cargo", "rustc",
          "rustdoc", "style-guide")


class _MainText(html.parser.HTMLParser):
  """Collects the text inside <main>, with paragraph breaks at block elements."""

  _BLOCKS = {"p", "pre", "li", "h1", "h2", "h3", "h4", "h5", "tr", "div", "br", "blockquote"}

  def __init__(self) -> None:
    super().__init__(convert_charrefs=True)
    self.depth_main, self.depth_skip, self.parts = 0, 0, []

  def handle_starttag(self, tag: str, attrs) -> None:
    self.depth_main += tag == "main"
    self.depth_skip += tag in _SKIP_TAGS
    if tag in self._BLOCKS and self.depth_main:
      self.parts.append("\n")

  def handle_endtag(self, tag: str) -> None:
    self.depth_main -= tag == "main" and self.depth_main > 0
    self.depth_skip -= tag in _SKIP_TAGS and self.depth_skip > 0

  def handle_data(self, data: str) -> None:
    if self.depth_main and not self.depth_skip:
      self.parts.append(data)

  def text(self) -> str:
    text = "".join(self.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def build_text(html_root: pathlib.Path, out: pathlib.Path, min_bytes: int = 200) -> None:
  out.mkdir(parents=True, exist_ok=True)
  count, total = 0, 0
  for book in _BOOKS:
    for page in sorted((html_root / book).rglob("*.html")):
      if page.name in ("print.html", "toc.html", "404.html") or "2018-edition" in page.parts:
        continue
      parser = _MainText()
      parser.feed(page.read_text(errors="replace"))
      text = parser.text()
      if len(text.encode()) < min_bytes:
        continue
      name = f"{book}__{'__'.join(page.relative_to(html_root / book).with_suffix('').parts)}.txt"
      (out / name).write_text(text)
      count, total = count + 1, total + len(text.encode())
  print(f"wrote {count} documents, {total:,} bytes to {out}")


def build_midi(out: pathlib.Path) -> None:
  from music21 import corpus  # optional: only this corpus builder needs it
  out.mkdir(parents=True, exist_ok=True)
  count = 0
  for path in corpus.getComposer("bach"):
    if path.suffix not in (".mxl", ".xml", ".krn"):
      continue
    try:
      score = corpus.parse(path)
      score.write("midi", fp=str(out / f"{path.stem}.mid"))
      count += 1
    except Exception as e:  # noqa: BLE001 - a score music21 cannot write is left out
      print(f"skipped {path.name}: {type(e).__name__}")
  print(f"wrote {count} MIDI files to {out}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="kind", required=True)
  text = sub.add_parser("text")
  text.add_argument("--html", type=pathlib.Path, required=True)
  text.add_argument("--out", type=pathlib.Path, required=True)
  midi = sub.add_parser("midi")
  midi.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  if args.kind == "text":
    build_text(args.html, args.out)
  else:
    build_midi(args.out)


if __name__ == "__main__":
  main()
