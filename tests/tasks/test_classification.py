"""text_classification over tsv/jsonl files this test writes; the generated keyword task."""

import hashlib
import json

import numpy as np
import pytest
import seqio

from perceiver_ar_t5x import datasets, tasks
from perceiver_ar_t5x.tasks import classification, keywords, locations

LENGTHS = {"inputs": 24, "targets": 1}


@pytest.fixture(autouse=True)
def no_label_env(monkeypatch):
  monkeypatch.delenv(locations.LABELS_ENV_VAR, raising=False)


def _read(task="text_classification", split="train", lengths=LENGTHS, shard=None):
  ds = seqio.get_mixture_or_task(task).get_dataset(
      dict(lengths), split=split, shuffle=False, seed=0, num_epochs=1, shard_info=shard)
  return list(ds.as_numpy_iterator())


def _text(ids) -> str:
  return bytes(int(i) - 3 for i in ids).decode("utf-8", errors="replace")


def _write(root):
  root.mkdir(exist_ok=True)
  (root / "a.tsv").write_text("text\tlabel\ngood film\tpos\n\nbad\tfilm\tneg\n"
                              "a very long review that is longer than the inputs\tpos\r\n"
                              "line\u2028sep\tneg\n")
  (root / "b.jsonl").write_text(json.dumps({"text": "meh", "label": "neutral"}) + "\n" +
                                json.dumps({"text": "caf\u00e9 ok", "label": "pos"}) + "\n")
  return root


def _one_line_error(match, **configure):
  tasks.configure(**configure)
  with pytest.raises(datasets.DataError, match=match) as err:
    _read()
  assert "\n" not in str(err.value)
  return str(err.value)


def test_labels_sorted_from_train_files_and_mapped(tmp_path):
  root = _write(tmp_path / "d")
  tasks.configure(cls_train_files=str(root), cls_validation_files=str(root / "b.jsonl"))
  assert classification.label_list() == ("neg", "neutral", "pos")
  out = {_text(ex["inputs"]): int(ex["targets"][0]) for ex in _read()}
  # The header skipped, a tab inside a text kept, U+2028 no line end, 24 bytes kept.
  assert out == {"good film": 2, "bad\tfilm": 0, "a very long review that ": 2, "meh": 1,
                 "caf\u00e9 ok": 2, "line\u2028sep": 0}
  assert all(ex["targets"].shape == (1,) for ex in _read(split="validation"))
  vocab = seqio.get_mixture_or_task("text_classification").output_features["targets"].vocabulary
  assert vocab.vocab_size == 3


def test_configured_label_order_and_env(tmp_path, monkeypatch):
  root = _write(tmp_path / "d")
  tasks.configure(cls_train_files=str(root / "b.jsonl"), labels=["pos", "neutral", "neg"],
                  cls_validation_files=str(root / "a.tsv"))
  assert {_text(ex["inputs"]): int(ex["targets"][0]) for ex in _read()} == {
      "meh": 1, "caf\u00e9 ok": 0}
  locations.reset()
  monkeypatch.setenv(locations.LABELS_ENV_VAR, "neutral,pos")
  tasks.configure(cls_train_files=str(root / "b.jsonl"))
  assert classification.label_list() == ("neutral", "pos")
  tasks.configure(task="text_classification", num_classes=2)
  with pytest.raises(datasets.DataError, match="has 2 labels but NUM_CLASSES is 3"):
    tasks.configure(task="text_classification", num_classes=3)
  tasks.configure(task="keyword_classification", num_classes=4)


def test_hash_split_holds_out_about_ten_percent_by_text(tmp_path):
  lines = [f"review number {i}\t{'pos' if i % 3 else 'neg'}" for i in range(200)]
  (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
  tasks.configure(cls_train_files=str(tmp_path / "train.txt"))
  train = {_text(ex["inputs"]) for ex in _read(lengths={"inputs": 64, "targets": 1})}
  valid = {_text(ex["inputs"]) for ex in _read(split="validation",
                                               lengths={"inputs": 64, "targets": 1})}
  expected = {f"review number {i}" for i in range(200)
              if int.from_bytes(hashlib.md5(f"review number {i}".encode()).digest()[:8],
                                "little") / 2**64 < 0.1}
  assert valid == expected and train.isdisjoint(valid) and len(train | valid) == 200
  assert 8 <= len(valid) <= 35


def test_shards_split_the_examples(tmp_path):
  lines = [f"text {i}\t{i % 2}" for i in range(30)]
  (tmp_path / "t.tsv").write_text("\n".join(lines))
  tasks.configure(cls_train_files=str(tmp_path / "t.tsv"), cls_validation_files=str(
      tmp_path / "t.tsv"))
  parts = [{_text(ex["inputs"]) for ex in _read(shard=seqio.ShardInfo(i, 3))} for i in range(3)]
  assert sum(map(len, parts)) == 30 and len(set.union(*parts)) == 30


@pytest.mark.parametrize("name, content, match", [
    ("t.tsv", "ok\tpos\nno tab here\n", r"t\.tsv:2: expected 'text<TAB>label', found no tab"),
    ("t.jsonl", '{"text": "a", "label": "pos"}\n{"text": 3}\n', r"t\.jsonl:2: expected"),
    ("t.jsonl", '{"text": "a", "label": "pos"}\n{not json\n', r"t\.jsonl:2: not JSON"),
    ("t.tsv", "ok\tpos\nfine\t \n", r"t\.tsv:2: empty label"),
    ("t.tsv", "", r"t\.tsv has no examples \(empty file\)"),
])
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path, name, content, match):
  (tmp_path / name).write_text(content)
  _one_line_error(match, cls_train_files=str(tmp_path / name))


def test_unknown_labels_and_missing_files(tmp_path):
  (tmp_path / "t.tsv").write_text("a\tpos\nb\tneg\nc\tmaybe\n")
  (tmp_path / "v.tsv").write_text("d\tpos\ne\tother\n")
  message = _one_line_error(r"t\.tsv:3: unknown label 'maybe'", labels=["pos", "neg"],
                            cls_train_files=str(tmp_path / "t.tsv"))
  assert "['pos', 'neg']" in message
  locations.reset()
  tasks.configure(cls_train_files=str(tmp_path / "t.tsv"),
                  cls_validation_files=str(tmp_path / "v.tsv"))
  with pytest.raises(datasets.DataError, match=r"v\.tsv:2: unknown label 'other'"):
    _read(split="validation")
  locations.reset()
  _one_line_error("CLS_TRAIN_FILES")
  _one_line_error("has no files", cls_train_files=str(tmp_path / "none*.tsv"))
  tasks.configure(cls_train_files=str(tmp_path / "t.tsv"), labels=["pos", "neg", "maybe"])
  with pytest.raises(datasets.DataError, match="'inputs'"):
    _read(lengths={"targets": 1})


def test_keyword_task_labels_match_the_inserted_keyword():
  out = _read("keyword_classification", "validation", {"inputs": 40, "targets": 1})
  assert len(out) == keywords.KEYWORD_EXAMPLES["validation"] == 500
  counts = np.zeros(4, int)
  for ex in out:
    text, label = _text(ex["inputs"]), int(ex["targets"][0])
    assert 16 <= len(text) <= 40 and ex["targets"].shape == (1,)
    found = [k for k in keywords.KEYWORDS if k in text]
    assert found == [keywords.KEYWORDS[label]]
    assert text.count(found[0]) == 1
    assert set(text.replace(found[0], "")) <= set(keywords.NOISE.decode())
    counts[label] += 1
  assert counts.min() > 80  # all four classes, roughly balanced
  again = _read("keyword_classification", "validation", {"inputs": 40, "targets": 1})
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(out, again, strict=True))
  train = _read("keyword_classification", "train", {"inputs": 40, "targets": 1})
  assert len(train) == 10_000
  assert not np.array_equal(train[0]["inputs"], out[0]["inputs"])
  with pytest.raises(datasets.DataError, match="inputs' length >= 4"):
    _read("keyword_classification", "validation", {"inputs": 3, "targets": 1})
