"""Whole-word masked byte LM (tasks/mlm.py) on documents this test writes."""

import re

import numpy as np
import pytest
import seqio
import tensorflow as tf

from perceiver_ar_t5x import datasets, tasks
from perceiver_ar_t5x.tasks import locations, mlm

LENGTH = 96
SPACE_IDS = [b + 3 for b in mlm.WHITESPACE]


def _docs() -> dict[str, bytes]:
  """Very different lengths and separators; one whitespace-only document."""
  rng = np.random.default_rng(0)
  words = [bytes(rng.integers(97, 123, size=rng.integers(1, 9))) for _ in range(3000)]
  seps = [b" ", b"  ", b"\t", b"\n", b"\r\n", b"\f", b"\v"]
  long_doc = b"".join(w + seps[i % len(seps)] for i, w in enumerate(words))
  return {"tiny.txt": b"hi", "short.txt": b"  one two\tthree\n", "blank.txt": b" \n\t \n",
          "utf8.txt": "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e text ".encode() * 5,
          "long.txt": long_doc, "medium.txt": b"lorem ipsum dolor sit amet " * 20}


def _read(task: str, split: str, seed: int = 0, epochs: int = 1) -> list[dict[str, np.ndarray]]:
  ds = seqio.get_mixture_or_task(task).get_dataset(
      {"inputs": LENGTH, "targets": LENGTH}, split=split, shuffle=False, seed=seed,
      num_epochs=epochs)
  return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("mlm")
  (root / "train").mkdir()
  docs = _docs()
  for name, data in docs.items():
    (root / "train" / name).write_bytes(data)
  (root / "valid.txt").write_bytes(b"held out words only")
  tasks.configure(text_files=str(root / "train"), text_validation_files=str(root / "valid.txt"))
  try:
    examples = _read("text_bytes_mlm", "train", epochs=20)
    again = _read("text_bytes_mlm", "train", epochs=20)
    other_seed = _read("text_bytes_mlm", "train", seed=1, epochs=20)
    valid = _read("text_bytes_mlm", "validation")
  finally:
    locations.reset()
  return {"docs": docs, "examples": examples, "again": again, "other_seed": other_seed,
          "valid": valid, "root": root}


def _words(targets: np.ndarray) -> list[tuple[int, int]]:
  """(start, end) of each maximal run of non-whitespace ids."""
  text = bytes(int(t) - 3 for t in targets)
  return [m.span() for m in re.finditer(rb"[^ \t\n\r\f\v]+", text)]


def test_vocabulary_layout():
  vocab = mlm.mlm_vocabulary()
  assert vocab.vocab_size == mlm.MLM_VOCAB_SIZE == 260 and mlm.MASK_ID == 259
  ids = vocab.encode_tf(tf.constant(bytes(range(256)))).numpy()
  np.testing.assert_array_equal(ids, np.arange(3, 259))  # no byte encodes to MASK_ID


def test_examples_mask_whole_words_only(corpus):
  examples = corpus["examples"]
  assert len(examples) == 20 * 5  # blank.txt has no word: dropped every epoch
  for ex in examples:
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs.shape == targets.shape and 0 < targets.size <= LENGTH
    assert any(bytes(int(t) - 3 for t in targets) in d for d in corpus["docs"].values())
    masked = inputs == mlm.MASK_ID
    np.testing.assert_array_equal(inputs[~masked], targets[~masked])
    assert masked.any(), "every example has at least one masked word"
    assert not np.isin(targets[masked], SPACE_IDS).any(), "whitespace is never masked"
    for start, end in _words(targets):
      assert masked[start:end].all() or not masked[start:end].any(), "a word is whole"


def test_tiny_document_gets_its_one_word_masked(corpus):
  tiny = [ex for ex in corpus["examples"] if bytes(int(t) - 3 for t in ex["targets"]) == b"hi"]
  assert len(tiny) == 20
  assert all((ex["inputs"] == mlm.MASK_ID).all() for ex in tiny)


def test_reads_are_deterministic_for_a_seed(corpus):
  for a, b in zip(corpus["examples"], corpus["again"], strict=True):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  assert any(not np.array_equal(a["inputs"], b["inputs"])
             for a, b in zip(corpus["examples"], corpus["other_seed"], strict=True))


def test_pipeline_word_rate_near_fifteen_percent(corpus):
  """Long crops only (the one-word fallback inflates tiny ones); fixed seed, loose bound."""
  chosen = total = 0
  for ex in corpus["examples"]:
    spans = _words(ex["targets"])
    if len(spans) >= 15:
      total += len(spans)
      chosen += sum(bool(ex["inputs"][s] == mlm.MASK_ID) for s, _ in spans)
  assert total > 400
  assert 0.08 < chosen / total < 0.22


def test_mask_rate_over_many_words():
  """20k words, fixed seeds: sd of the rate ~0.0025, bound 0.012 (~5 sd); cannot flake."""
  rng = np.random.default_rng(1)
  pieces = [bytes(rng.integers(97, 123, size=rng.integers(1, 6))) + b" \t\n"[i % 3:i % 3 + 1]
            for i in range(20_000)]
  tokens = tf.constant([b + 3 for b in b"".join(pieces)], tf.int32)
  rates = []
  for seed in range(3):
    mask = mlm.whole_word_mask(tokens, 0.15, tf.constant([seed, 7], tf.int64)).numpy()
    starts = np.flatnonzero(np.diff(np.concatenate([[0], ~np.isin(tokens.numpy(), SPACE_IDS)])
                                    .astype(np.int8)) == 1)
    assert len(starts) == 20_000
    rates.append(mask[starts].mean())
  assert all(abs(r - 0.15) < 0.012 for r in rates), rates
  assert len({round(r, 6) for r in rates}) > 1  # the seed matters


def test_whitespace_only_tokens_mask_nothing():
  tokens = tf.constant([b + 3 for b in b" \t\n  \r\f\v"], tf.int32)
  assert not mlm.whole_word_mask(tokens, 1.0, tf.constant([0, 0], tf.int64)).numpy().any()
  assert mlm.whole_word_mask(tf.zeros([0], tf.int32), 0.15,
                             tf.constant([0, 0], tf.int64)).numpy().shape == (0,)


def test_encoder_feature_converter_weights_the_masked_positions(corpus):
  examples = corpus["examples"][:12]
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={
          k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")})
  out = seqio.EncoderFeatureConverter(mask_id=mlm.MASK_ID, pack=False)(
      ds, {"inputs": LENGTH, "targets": LENGTH})
  for ex, conv in zip(examples, out.as_numpy_iterator(), strict=True):
    n = ex["inputs"].size
    expected = np.zeros(LENGTH, np.int32)
    expected[:n] = ex["inputs"] != ex["targets"]
    np.testing.assert_array_equal(conv["encoder_loss_weights"], expected)
    np.testing.assert_array_equal(conv["encoder_target_tokens"][:n], ex["targets"])
    assert conv["encoder_loss_weights"].sum() > 0


def test_validation_split_and_errors(corpus):
  valid = corpus["valid"]
  assert [bytes(int(t) - 3 for t in ex["targets"]) for ex in valid] == [b"held out words only"]
  with pytest.raises(datasets.DataError, match="TEXT_FILES") as err:
    _read("text_bytes_mlm", "train")
  assert "\n" not in str(err.value)
  tasks.configure(text_files=str(corpus["root"] / "train"))
  with pytest.raises(datasets.DataError, match="'inputs'"):
    seqio.get_mixture_or_task("text_bytes_mlm").get_dataset({"targets": 8}, split="train")


def test_pg19_bytes_mlm_reads_the_local_layout(tmp_path):
  for split in ("train", "validation", "test"):
    (tmp_path / split).mkdir()
    (tmp_path / split / "1.txt").write_text(f"the {split} book text")
  tasks.configure(pg19_dir=str(tmp_path))
  out = _read("pg19_bytes_mlm", "test")
  assert [bytes(int(t) - 3 for t in ex["targets"]) for ex in out] == [b"the test book text"]
  assert (out[0]["inputs"] == mlm.MASK_ID).any()
