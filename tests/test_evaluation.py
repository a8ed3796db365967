"""Evaluation: strided full-sequence scoring, byte counts, bits per byte, padding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from perceiver_ar_t5x import checkpoints, evaluation, training
from perceiver_ar_t5x.evaluation import ScoringMode
from perceiver_ar_t5x.models import CroppingMethod, PerceiverARModel, cross_entropy

LENGTH = 10  # tiny_module: 4 latents, vocab 13


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


def test_window_plan_covers_each_position_once():
  assert evaluation.window_plan(10, 4, 3) == [(0, 0), (3, 4), (6, 7)]
  assert evaluation.window_plan(10, 4, 4) == [(0, 0), (4, 4), (6, 8)]
  assert evaluation.window_plan(4, 4, 2) == [(0, 0)]
  assert evaluation.window_plan(3, 4, 3) == [(0, 0)]  # shorter than the latents
  for stride in (1, 2, 3, 4):
    covered = []
    for start, first in evaluation.window_plan(11, 4, stride):
      covered += [p for p in range(start, start + 4) if p >= first]
    assert covered == list(range(11)), stride
  with pytest.raises(ValueError, match="stride must be in"):
    evaluation.window_plan(10, 4, 5)


def test_stride_one_scores_each_token_with_its_own_window(setup):
  """Reference: position p is the last latent of the window [p-3, p] (or in [0, 4))."""
  model, part, params, batch = setup
  sums = jax.device_get(evaluation.make_strided_step(model, part, stride=1)(params, batch))
  nll_sum = 0.0
  for p in range(LENGTH):
    start = max(p - 3, 0)
    logits = model.logits(params, batch, jnp.full((8,), start, jnp.int32))[:, p - start]
    _, _, nll = cross_entropy(logits[:, None], batch["decoder_target_tokens"][:, p:p + 1],
                              batch["decoder_loss_weights"][:, p:p + 1])
    nll_sum += float(jnp.sum(nll[:, 0] * batch["decoder_loss_weights"][:, p]))
  np.testing.assert_allclose(float(sums["nll_sum"]), nll_sum, rtol=1e-5)
  assert float(sums["weight_sum"]) == batch["decoder_loss_weights"].sum()


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_every_stride_scores_every_weighted_token_once(setup, stride):
  model, part, params, batch = setup
  sums = evaluation.make_strided_step(model, part, stride=stride)(params, batch)
  assert float(sums["weight_sum"]) == batch["decoder_loss_weights"].sum() == 70.0


def test_full_sequence_equals_last_latents_when_length_is_num_latents(setup):
  model, part, params, batch = setup
  short = {k: v[:, :4] for k, v in batch.items()}
  short["decoder_target_tokens"] = np.where(short["decoder_target_tokens"] == 0, 5,
                                            short["decoder_target_tokens"])
  short["decoder_loss_weights"] = np.ones_like(short["decoder_loss_weights"])
  full = jax.device_get(evaluation.make_strided_step(model, part)(params, short))
  last = jax.device_get(training.make_eval_step(model, part)(params, short))
  for key in ("nll_sum", "correct_sum", "weight_sum", "loss_sum"):
    np.testing.assert_allclose(float(full[key]), float(last[key]), rtol=1e-6)


def test_scored_mask_last_latents_is_each_examples_window(setup):
  _, _, _, batch = setup
  mask = evaluation.scored_mask(batch, ScoringMode.LAST_LATENTS, 4)
  np.testing.assert_array_equal(mask[0], [0] * 6 + [1] * 4)
  np.testing.assert_array_equal(mask[1], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(mask[5], [1, 1, 1] + [0] * 7)
  full = evaluation.scored_mask(batch, ScoringMode.FULL_SEQUENCE, 4)
  np.testing.assert_array_equal(full, batch["decoder_loss_weights"] > 0)


def test_byte_counter_counts_utf8_bytes_of_scored_tokens():
  vocab = seqio.ByteVocabulary()
  text = "héllo wörld"  # 11 characters, 13 bytes
  ids = np.asarray([vocab.encode(text)], np.int32)
  batch = {"decoder_target_tokens": ids, "decoder_loss_weights": np.ones_like(ids, np.float32)}
  assert evaluation.byte_counter(vocab, ScoringMode.FULL_SEQUENCE, 4)(batch) == 13
  assert evaluation.byte_counter(vocab, ScoringMode.LAST_LATENTS, 4)(batch) == 4
  assert evaluation.byte_counter(seqio.PassThroughVocabulary(32), ScoringMode.FULL_SEQUENCE,
                                 4) is None


def test_byte_counter_for_sentencepiece_adds_up_to_the_text():
  import os
  path = os.path.join(os.path.dirname(seqio.__file__), "test_data", "sentencepiece",
                      "sentencepiece.model")
  vocab = seqio.SentencePieceVocabulary(path)
  text = "the quick brown fox jumps over the lazy dog"
  ids = np.asarray([vocab.encode(text)], np.int32)
  weights = np.ones_like(ids, np.float32)
  count = evaluation.byte_counter(vocab, ScoringMode.FULL_SEQUENCE, 4)
  total = len(vocab.decode(ids[0].tolist()).encode("utf-8"))  # the tiny model has unk pieces
  assert count({"decoder_target_tokens": ids, "decoder_loss_weights": weights}) == total
  halves = weights.copy()
  halves[0, : ids.shape[1] // 2] = 0  # the second half only ...
  second = count({"decoder_target_tokens": ids, "decoder_loss_weights": halves})
  first = count({"decoder_target_tokens": ids, "decoder_loss_weights": 1 - halves})
  assert 0 < second < total and first + second == total  # ... adds up exactly


def test_evaluate_reports_bits_per_byte_from_nll_and_bytes():
  sums = {"loss_sum": 9.0, "nll_sum": 8.0, "z_loss_sum": 1.0, "correct_sum": 3.0,
          "weight_sum": 4.0}
  summary = evaluation.evaluate(lambda p, b: sums, None, [{}, {}, {}], max_batches=2,
                                byte_count=lambda b: 10)
  assert summary["num_batches"] == 2 and summary["num_tokens"] == 8
  assert summary["bits_per_token"] == pytest.approx(2.0 / math.log(2))
  assert summary["bytes_per_token"] == pytest.approx(20 / 8)
  assert summary["bits_per_byte"] == pytest.approx(16.0 / math.log(2) / 20)
  plain = evaluation.evaluate(lambda p, b: sums, None, [{}])  # old positional signature
  assert "bits_per_byte" not in plain
  with pytest.raises(ValueError, match="empty"):
    evaluation.evaluate(lambda p, b: sums, None, [])


def test_pad_batch_adds_zero_weight_rows():
  batch = {"decoder_target_tokens": np.ones((3, 5), np.int32),
           "decoder_loss_weights": np.ones((3, 5), np.float32)}
  padded = evaluation.pad_batch(batch, 8)
  assert padded["decoder_target_tokens"].shape == (8, 5)
  assert padded["decoder_loss_weights"][3:].sum() == 0
