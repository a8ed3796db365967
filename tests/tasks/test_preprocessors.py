"""Preprocessors: seeded crops, EOS only at a document's true end, prefix sampling."""

import functools

import numpy as np
import seqio
import tensorflow as tf

from perceiver_ar_t5x.tasks import preprocessors, vocabularies


def _seed(i: int) -> tf.Tensor:
  return tf.constant([i, 7], tf.int32)


def test_crop_tokens_is_a_seeded_window():
  tokens = tf.range(100, 130)  # 30 tokens
  starts = set()
  for i in range(200):
    out = preprocessors.crop_tokens(tokens, 8, _seed(i)).numpy()
    assert len(out) == 8
    np.testing.assert_array_equal(out, np.arange(out[0], out[0] + 8))
    starts.add(int(out[0]) - 100)
    again = preprocessors.crop_tokens(tokens, 8, _seed(i)).numpy()
    np.testing.assert_array_equal(out, again)  # pure function of the seed
  assert starts == set(range(23))  # every window is reachable
  short = preprocessors.crop_tokens(tf.range(5), 8, _seed(0)).numpy()
  np.testing.assert_array_equal(short, np.arange(5))


def test_crop_text_bytes_and_characters():
  text = tf.constant("añbñcñdñ")  # 'ñ' is two bytes
  out, at_end = preprocessors.crop_text(text, 3, _seed(1), unit="UTF8_CHAR")
  assert len(out.numpy().decode("utf-8")) == 3  # never splits a character
  ends = {bool(preprocessors.crop_text(text, 3, _seed(i), "UTF8_CHAR")[1]) for i in range(50)}
  assert ends == {True, False}
  out, at_end = preprocessors.crop_text(tf.constant("abc"), 8, _seed(2))
  assert out.numpy() == b"abc" and bool(at_end)
  for i in range(30):
    out, at_end = preprocessors.crop_text(tf.constant("0123456789"), 4, _seed(i))
    assert len(out.numpy()) == 4
    assert bool(at_end) == out.numpy().endswith(b"9")


def _pipeline(docs, length, steps, seed=0):
  vocab = vocabularies.byte_vocabulary()
  features = {"targets": seqio.Feature(vocab, add_eos=False)}
  ds = tf.data.Dataset.from_tensor_slices({"targets": tf.constant(docs)})
  with seqio.utils.map_seed_manager(seed):
    for step in steps:
      ds = seqio.utils.add_kwargs_to_transform(
          step, sequence_length={"targets": length}, output_features=features)(ds)
  return [ex["targets"] for ex in ds.as_numpy_iterator()]


def _text_steps(units_per_token=1):
  return [functools.partial(preprocessors.random_crop_text, units_per_token=units_per_token),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          preprocessors.append_eos, preprocessors.random_crop, preprocessors.select_targets]


def test_eos_only_when_the_crop_reaches_the_end():
  book = "".join(chr(97 + i % 26) for i in range(40))
  out = _pipeline([book] * 200, 10, _text_steps())
  assert all(len(t) == 10 for t in out)
  with_eos = [t for t in out if t[-1] == 1]
  assert 0 < len(with_eos) < len(out)  # some crops reach the end of the book
  for t in with_eos:  # ... and then they are the book's last 9 bytes + EOS
    np.testing.assert_array_equal(t[:-1], np.frombuffer(book[-9:].encode(), np.uint8) + 3)
  for t in out:
    assert (t[:-1] != 1).all()
    text = bytes(int(v) - 3 for v in t if v != 1).decode()
    assert text in book
  short = _pipeline(["hi"], 10, _text_steps())
  np.testing.assert_array_equal(short[0], [ord("h") + 3, ord("i") + 3, 1])


def test_pipeline_is_deterministic_per_seed():
  book = "".join(chr(97 + i % 26) for i in range(300))
  a = _pipeline([book] * 20, 16, _text_steps(4), seed=3)
  b = _pipeline([book] * 20, 16, _text_steps(4), seed=3)
  c = _pipeline([book] * 20, 16, _text_steps(4), seed=4)
  assert all((x == y).all() for x, y in zip(a, b, strict=True))
  assert any(not (x == y).all() for x, y in zip(a, c, strict=True))


def test_random_prefix_length_keeps_the_end():
  tokens = list(range(2, 22))  # 20 tokens
  ds = tf.data.Dataset.from_tensors({"targets": tf.constant(tokens)}).repeat(300)
  with seqio.utils.map_seed_manager(0):
    ds = preprocessors.random_prefix_length(ds, min_length=6)
  lengths = set()
  for ex in ds.as_numpy_iterator():
    t = ex["targets"]
    lengths.add(len(t))
    np.testing.assert_array_equal(t, tokens[len(tokens) - len(t):])  # a suffix
  assert lengths == set(range(6, 21))
