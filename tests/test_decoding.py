"""The sampler around the cache: EOS, lengths, rng, filters, num_decodes, buckets, API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x import decoding
from perceiver_ar_t5x.models import PerceiverARModel

PROMPTS = np.array([[5, 6, 7, 8, 9, 10, 11], [3, 4, 0, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([7, 2])


@pytest.fixture(scope="module")
def model_and_params():
  from perceiver_ar_t5x.perceiver_ar import PerceiverAR
  module = PerceiverAR(vocab_size=13, num_latents=4, embed_dim=12, num_heads=3, head_dim=8,
                       mlp_dim=20, num_layers=3, max_length=32)
  model = PerceiverARModel(module)
  return model, model.init(jax.random.key(0), 10)


def test_greedy_returns_prompts_tokens_and_their_log_probs(model_and_params):
  model, params = model_and_params
  out = decoding.decode(model, params, PROMPTS, LENGTHS, 6, jax.random.key(0),
                        record_logits=True)
  assert out.tokens.shape == (2, 1, 13) and out.log_probs.shape == (2, 1, 13)
  np.testing.assert_array_equal(out.tokens[0, 0, :7], PROMPTS[0])
  np.testing.assert_array_equal(out.tokens[1, 0, :2], [3, 4])
  np.testing.assert_array_equal(out.lengths[:, 0], [13, 8])
  assert np.all(out.tokens[1, 0, 8:] == 0) and np.all(out.log_probs[:, 0, :2] == 0)
  for b, n in enumerate(LENGTHS):
    logits = out.logits[b, 0, n:n + 6]
    np.testing.assert_array_equal(out.tokens[b, 0, n:n + 6], np.argmax(logits, -1))
    expected = np.take_along_axis(jax.nn.log_softmax(logits), out.tokens[b, 0, n:n + 6, None],
                                  -1)[:, 0]
    np.testing.assert_allclose(out.log_probs[b, 0, n:n + 6], expected, atol=1e-5)


def test_each_example_stops_at_its_own_eos_and_max_length(model_and_params):
  model, params = model_and_params
  free = decoding.decode(model, params, PROMPTS, LENGTHS, 6, jax.random.key(0))
  eos = int(free.tokens[1, 0, 4])  # example 1's third sampled token
  first = [int(np.argmax(free.tokens[b, 0, n:n + 6] == eos)) if eos in free.tokens[b, 0, n:n + 6]
           else 6 for b, n in enumerate(LENGTHS)]
  out = decoding.decode(model, params, PROMPTS, LENGTHS, np.array([6, 5]), jax.random.key(0),
                        decoding.SamplingConfig(eos_id=eos))
  for b, n in enumerate(LENGTHS):
    stop = n + min(first[b] + 1, [6, 5][b])
    assert out.lengths[b, 0] == stop
    np.testing.assert_array_equal(out.tokens[b, 0, :stop], free.tokens[b, 0, :stop])
    assert np.all(out.tokens[b, 0, stop:] == 0) and np.all(out.log_probs[b, 0, stop:] == 0)


def test_sampling_is_deterministic_given_the_rng_and_num_decodes_differ(model_and_params):
  model, params = model_and_params
  cfg = decoding.SamplingConfig(temperature=1.0, top_k=8, top_p=0.95)
  a = decoding.decode(model, params, PROMPTS, LENGTHS, 8, jax.random.key(7), cfg, num_decodes=3)
  b = decoding.decode(model, params, PROMPTS, LENGTHS, 8, jax.random.key(7), cfg, num_decodes=3)
  c = decoding.decode(model, params, PROMPTS, LENGTHS, 8, jax.random.key(8), cfg, num_decodes=3)
  assert a.tokens.shape == (2, 3, 15)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.log_probs, b.log_probs)
  assert not np.array_equal(a.tokens, c.tokens)
  assert len({a.tokens[0, i].tobytes() for i in range(3)}) > 1  # the 3 samples differ
  for i in range(3):  # every sample keeps its prompt
    np.testing.assert_array_equal(a.tokens[:, i, :2], PROMPTS[:, :2])


def test_top_k_1_is_greedy(model_and_params):
  model, params = model_and_params
  greedy = decoding.decode(model, params, PROMPTS, LENGTHS, 5, jax.random.key(0)).tokens
  cfg = decoding.SamplingConfig(temperature=1.0, top_k=1)
  out = decoding.decode(model, params, PROMPTS, LENGTHS, 5, jax.random.key(3), cfg).tokens
  np.testing.assert_array_equal(out, greedy)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda cfg: np.isfinite(decoding.filter_logits(logits, cfg))[0].tolist()  # noqa: E731
  assert kept(decoding.SamplingConfig(temperature=1.0, top_k=2)) == [True, True, False, False]
  assert kept(decoding.SamplingConfig(temperature=1.0, top_p=0.7)) == [True, True, False, False]
  assert kept(decoding.SamplingConfig(temperature=1.0, top_p=0.5)) == [True, False, False, False]


def test_new_prompt_lengths_in_a_bucket_do_not_recompile(model_and_params):
  model, params = model_and_params
  assert [decoding.bucket_length(n) for n in (1, 16, 17, 33, 3329, 16641)] == [
      16, 16, 17, 34, 3456, 17408]
  decoding.compiled_decode.cache_clear()
  for length in (3, 5, 6):
    decoding.decode(model, params, PROMPTS, np.array([length, 1]), 30 - length,
                    jax.random.key(0))
  assert decoding.compiled_decode.cache_info().currsize == 1
  decoder = decoding.CachedDecoder(model.module, 30)
  assert decoding.compiled_decode(decoder, decoding.SamplingConfig(), False)._cache_size() == 1


def test_sample_api_matches_decode(model_and_params):
  model, params = model_and_params
  tokens, logprobs = decoding.sample(model, params, PROMPTS, LENGTHS, 12, jax.random.key(0))
  out = decoding.decode(model, params, PROMPTS, LENGTHS, 12 - LENGTHS, jax.random.key(0))
  assert tokens.shape == (2, 12) and logprobs.shape == (2, 12)
  np.testing.assert_array_equal(tokens, out.tokens[:, 0])
  np.testing.assert_allclose(logprobs, out.log_probs[:, 0])


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="prompts must be int"):
    decoding.prepare(np.zeros((2,), np.int32), np.array([1, 1]), 3)
  with pytest.raises(ValueError, match="prompt_lengths"):
    decoding.prepare(PROMPTS, np.array([8, 1]), 3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.prepare(PROMPTS, LENGTHS, -1)
  with pytest.raises(ValueError, match="shorter"):
    decoding.prepare(PROMPTS, LENGTHS, 20, length=16)


def test_infer_generate_counts_new_tokens_after_each_prompt_and_stops_before_eos(
    model_and_params):
  """INFER_MAX_NEW_TOKENS: every prompt, short or long, gets that many new tokens (the old
  max_length counted the prompt: a 7-token prompt got 3 of 10); EOS ends the prediction."""
  from perceiver_ar_t5x import inference
  model, params = model_and_params
  prompts = [inference.Prompt(PROMPTS[0]), inference.Prompt(PROMPTS[1, :2])]
  out = list(inference.generate(model, params, prompts, max_new_tokens=5, total_length=10,
                                batch_size=2, rng=jax.random.key(0)))
  free = decoding.decode(model, params, PROMPTS, LENGTHS, 5, jax.random.key(0))
  for b, (_prompt, cont, score) in enumerate(out):
    n = LENGTHS[b]
    np.testing.assert_array_equal(cont, free.tokens[b, 0, n:n + 5])
    assert score == pytest.approx(float(free.log_probs[b, 0, n:n + 5].sum()), abs=1e-5)
  eos = int(out[0][1][2])
  cut = list(inference.generate(model, params, prompts, max_new_tokens=5, total_length=10,
                                batch_size=2, rng=jax.random.key(0),
                                cfg=decoding.SamplingConfig(eos_id=eos)))
  first = out[0][1].tolist().index(eos)
  assert cut[0][1].tolist() == out[0][1][:first].tolist() and eos not in cut[0][1].tolist()
  filled = list(inference.generate(model, params, prompts, max_new_tokens=None,
                                   total_length=10, batch_size=2, rng=jax.random.key(0)))
  assert [len(c) for _, c, _ in filled] == [3, 8]  # None: up to total_length in all


def test_infer_refuses_more_tokens_than_learned_positions():
  from perceiver_ar_t5x import inference
  from perceiver_ar_t5x.layers.embedding import PositionEncoding
  from perceiver_ar_t5x.perceiver_ar import PerceiverAR
  module = PerceiverAR(vocab_size=13, num_latents=4, embed_dim=12, num_heads=3, head_dim=8,
                       mlp_dim=20, num_layers=1, max_length=12,
                       position_encoding=PositionEncoding.LEARNED)
  prompt = inference.Prompt(np.arange(3, 10, dtype=np.int32))  # 7 tokens + 6 new > 12 rows
  with pytest.raises(inference.InferenceError, match="exceed the 12 learned positions"):
    list(inference.generate(PerceiverARModel(module), None, [prompt], max_new_tokens=6,
                            total_length=10, batch_size=1, rng=jax.random.key(0)))


def test_decode_refuses_positions_beyond_the_learned_table():
  """The library call, not only the infer binary: a clipped position would be silent."""
  from perceiver_ar_t5x.layers.embedding import PositionEncoding
  from perceiver_ar_t5x.perceiver_ar import PerceiverAR
  module = PerceiverAR(vocab_size=13, num_latents=4, embed_dim=12, num_heads=3, head_dim=8,
                       mlp_dim=20, num_layers=1, max_length=12,
                       position_encoding=PositionEncoding.LEARNED)
  with pytest.raises(ValueError, match="beyond the learned position table"):
    decoding.decode(PerceiverARModel(module), None, np.ones((1, 8), np.int32), np.array([8]), 5,
                    jax.random.key(0))
