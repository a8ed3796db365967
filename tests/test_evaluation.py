"""Evaluation: LAST_LATENTS byte counts and sums, row blocks per process, whole-split rows."""

import math
import os

import jax
import numpy as np
import pytest
import seqio

from perceiver_ar_t5x import checkpoints, documents, evaluation, training, whole_split
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.documents import Document
from perceiver_ar_t5x.models import CroppingMethod, PerceiverARModel

LENGTH = 10  # tiny_module: 4 latents, vocab 13
SPM = os.path.join(os.path.dirname(seqio.__file__), "test_data", "sentencepiece",
                   "sentencepiece.model")


@pytest.fixture
def setup(tiny_module):
  model = PerceiverARModel(module=tiny_module, cropping=CroppingMethod.NONE)
  part = checkpoints.params_partitioning(model, LENGTH, checkpoints.pt.PartitioningConfig())
  params = jax.device_put(model.init(jax.random.key(3), LENGTH), part.state_sharding.params)
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 13, size=(8, LENGTH)).astype(np.int32)
  targets[1, 7:] = 0  # a shorter example
  targets[5, 3:] = 0  # shorter than num_latents
  batch = {"decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], [(0, 0), (1, 0)]),
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  return model, part, params, batch


def test_whole_split_of_examples_no_longer_than_the_latents_is_last_latents(setup):
  """One window per document ending at its end: the same sums as LAST_LATENTS."""
  model, part, params, batch = setup
  short = {k: v[:, :4] for k, v in batch.items()}
  docs = [Document(t[:int((w > 0).sum())], w[:int((w > 0).sum())])
          for t, w in zip(short["decoder_target_tokens"], short["decoder_loss_weights"])]
  full = whole_split.Scorer(model=model, part=part, docs=docs, context=LENGTH,
                            batch_size=8)(params)
  last = jax.device_get(training.make_eval_step(model, part)(params, short))
  for key in ("nll_sum", "correct_sum", "weight_sum", "loss_sum"):
    np.testing.assert_allclose(float(full[key]), float(last[key]), rtol=1e-5)


def test_window_rows_are_right_padded_contexts():
  doc = Document(np.arange(2, 22, dtype=np.int32), np.ones(20, np.float32))
  row = whole_split.window_row(doc, whole_split.Window(0, 12, 14), context=10, num_latents=4)
  np.testing.assert_array_equal(row["decoder_target_tokens"], np.arange(6, 16))  # [4, 14)
  np.testing.assert_array_equal(row["decoder_input_tokens"], np.arange(5, 15))
  assert int(row["latent_starts"]) == 6  # latents [10, 14) of the document
  np.testing.assert_array_equal(row["decoder_loss_weights"], [0] * 8 + [1, 1])
  first = whole_split.window_row(doc, whole_split.Window(0, 0, 3), context=10, num_latents=4)
  np.testing.assert_array_equal(first["decoder_input_tokens"], [0, 2, 3] + [0] * 7)
  assert int(first["latent_starts"]) == 0 and first["decoder_loss_weights"].sum() == 3


def test_process_rows_split_every_global_batch_into_blocks():
  docs = [Document(np.arange(2, 2 + n, dtype=np.int32), np.ones(n, np.float32))
          for n in (3, 9, 5)]
  windows = whole_split.plan_windows(docs, 4, 2)  # 1 + 4 + 2 windows
  assert len(windows) == 7
  one = list(whole_split.process_batches(docs, windows, context=6, num_latents=4,
                                         batch_size=4, layout=pt.DataLayout(0, 1)))
  halves = [list(whole_split.process_batches(docs, windows, context=6, num_latents=4,
                                             batch_size=4, layout=pt.DataLayout(i, 2)))
            for i in range(2)]
  assert len(one) == 2 and one[1]["decoder_loss_weights"][3:].sum() == 0  # padded row
  for b, batch in enumerate(one):
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([halves[0][b][key], halves[1][b][key]]),
                                    value)
  blocks = evaluation.process_rows(one[0], pt.DataLayout(1, 2))
  np.testing.assert_array_equal(blocks["latent_starts"], one[0]["latent_starts"][2:])


def test_scored_mask_last_latents_is_each_examples_window(setup):
  _, _, _, batch = setup
  mask = evaluation.scored_mask(batch, 4)
  np.testing.assert_array_equal(mask[0], [0] * 6 + [1] * 4)
  np.testing.assert_array_equal(mask[1], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(mask[5], [1, 1, 1] + [0] * 7)


def test_byte_counters_count_utf8_bytes():
  vocab = seqio.ByteVocabulary()
  text = "héllo wörld"  # 11 characters, 13 bytes
  ids = np.asarray([vocab.encode(text)], np.int32)
  batch = {"decoder_target_tokens": ids, "decoder_loss_weights": np.ones_like(ids, np.float32)}
  assert evaluation.byte_counter(vocab, 4)(batch) == 4
  assert evaluation.byte_counter(seqio.PassThroughVocabulary(32), 4) is None
  doc = Document(np.asarray(vocab.encode(text) + [vocab.eos_id], np.int32), np.ones(14))
  assert documents.byte_counter(vocab)(doc) == 13
  assert documents.byte_counter(seqio.PassThroughVocabulary(32)) is None


def test_document_bytes_for_sentencepiece_are_the_texts():
  vocab = seqio.SentencePieceVocabulary(SPM)
  text = "the quick brown fox jumps over the lazy dog"
  ids = vocab.encode(text)
  doc = Document(np.asarray(ids + [vocab.eos_id], np.int32), np.ones(len(ids) + 1))
  assert documents.byte_counter(vocab)(doc) == len(vocab.decode(ids).encode("utf-8"))


def test_byte_counter_for_sentencepiece_adds_up_to_the_text():
  vocab = seqio.SentencePieceVocabulary(SPM)
  text = "the quick brown fox jumps over the lazy dog"
  ids = np.asarray([vocab.encode(text)], np.int32)
  weights = np.ones_like(ids, np.float32)
  count = evaluation.byte_counter(vocab, 4)  # the last 4 tokens: the latent window
  assert count({"decoder_target_tokens": ids, "decoder_loss_weights": weights}) == (
      len(vocab.decode(ids[0].tolist()).encode("utf-8"))
      - len(vocab.decode(ids[0, :-4].tolist()).encode("utf-8")))


def test_evaluate_reports_bits_per_byte_from_nll_and_bytes():
  sums = {"loss_sum": 9.0, "nll_sum": 8.0, "z_loss_sum": 1.0, "correct_sum": 3.0,
          "weight_sum": 4.0}
  summary = evaluation.evaluate(lambda p, b: sums, None, [{}, {}, {}], max_batches=2,
                                byte_count=lambda b: 10)
  assert summary["num_batches"] == 2 and summary["num_tokens"] == 8
  assert summary["bits_per_token"] == pytest.approx(2.0 / math.log(2))
  assert summary["bytes_per_token"] == pytest.approx(20 / 8)
  assert summary["bits_per_byte"] == pytest.approx(16.0 / math.log(2) / 20)
  with pytest.raises(ValueError, match="empty"):
    evaluation.evaluate(lambda p, b: sums, None, [])


def test_summarize_is_token_weighted_over_the_split():
  sums = {"loss_sum": 9.0, "nll_sum": 8.0, "z_loss_sum": 1.0, "correct_sum": 3.0,
          "weight_sum": 4.0, "num_windows": 2, "num_buckets": 2,
          "bucket_nll": np.asarray([6.0, 2.0]), "bucket_count": np.asarray([3.0, 1.0])}
  summary = whole_split.summarize(sums, num_documents=2, num_bytes=5)
  assert summary["cross_ent_loss"] == 2.0 and summary["num_documents"] == 2
  assert summary["bits_per_byte"] == pytest.approx(8.0 / math.log(2) / 5)
  assert summary["nll_by_position/0-64"] == 2.0 and summary["nll_by_position/64-128"] == 2.0


def test_pad_batch_adds_zero_weight_rows():
  batch = {"decoder_target_tokens": np.ones((3, 5), np.int32),
           "decoder_loss_weights": np.ones((3, 5), np.float32)}
  padded = evaluation.pad_batch(batch, 8)
  assert padded["decoder_target_tokens"].shape == (8, 5)
  assert padded["decoder_loss_weights"][3:].sum() == 0
