"""Packing: a packed row gives every document the loss it gets when run alone.

Rows come from the real pipeline (seqio.LMFeatureConverter(pack=True), as
DatasetConfig.pack uses), so segment ids and per-document positions are the ones
training sees. The latents are the last num_latents positions of the packed row; a
document fully in the prefix only serves as keys for its own segment (i.e. nothing).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from perceiver_ar_t5x import models, slicing
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

LENGTH, LATENTS, VOCAB = 20, 8, 13


def _convert(docs, pack):
  ds = tf.data.Dataset.from_generator(
      lambda: ({"targets": np.asarray(d, np.int32)} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})
  out = seqio.LMFeatureConverter(pack=pack)(ds, {"targets": LENGTH})
  rows = list(out.as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _model(encoding):
  module = PerceiverAR(vocab_size=VOCAB, num_latents=LATENTS, embed_dim=12, num_heads=3,
                       head_dim=4, mlp_dim=10, num_layers=3, position_encoding=encoding,
                       max_length=32)
  model = models.PerceiverARModel(module, z_loss=0.0, cropping=models.CroppingMethod.NONE)
  return model, model.init(jax.random.key(0), LENGTH)


def _window_nll(model, params, batch, starts=None):
  """Per-token nll [batch, latents] and the window's (segment, position, weight)."""
  if starts is None:
    starts = model.latent_view(batch)[0]
  starts = jnp.asarray(starts, jnp.int32)
  targets = slicing.window(jnp.asarray(batch["decoder_target_tokens"]), starts, LATENTS)
  weights = slicing.window(jnp.asarray(batch["decoder_loss_weights"], jnp.float32), starts,
                           LATENTS)
  logits = model.logits(params, batch, starts)
  _, _, nll = models.cross_entropy(logits, targets, weights)
  seg = batch.get("decoder_segment_ids")
  seg = None if seg is None else np.asarray(slicing.window(jnp.asarray(seg), starts, LATENTS))
  pos = batch.get("decoder_positions")
  pos = None if pos is None else np.asarray(slicing.window(jnp.asarray(pos), starts, LATENTS))
  return np.asarray(nll), np.asarray(weights), seg, pos, np.asarray(starts)


def _docs(rng, lengths):
  return [list(rng.integers(2, VOCAB, size=n)) for n in lengths]


@pytest.mark.parametrize("encoding", [PositionEncoding.ROTARY, PositionEncoding.LEARNED])
def test_packed_loss_equals_documents_alone(encoding):
  model, params = _model(encoding)
  # A (5) lies in the prefix, B (7) spans prefix + latents, C (4) is inside the window.
  docs = _docs(np.random.default_rng(0), [5, 7, 4])
  packed = _convert(docs, pack=True)
  assert packed["decoder_input_tokens"].shape == (1, LENGTH)
  np.testing.assert_array_equal(packed["decoder_segment_ids"][0],
                                [1] * 5 + [2] * 7 + [3] * 4 + [0] * 4)
  np.testing.assert_array_equal(packed["decoder_positions"][0, :16],
                                [*range(5), *range(7), *range(4)])
  nll, weights, seg, pos, starts = _window_nll(model, params, packed)
  assert starts.tolist() == [16 - LATENTS]  # the last LATENTS positions of the packed row
  np.testing.assert_array_equal(seg[0], [2, 2, 2, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(weights[0], [1] * 8)

  alone = _convert(docs, pack=False)  # one unpacked row per document
  # C alone: its latents cover all of it (the default window), as in the packed row.
  c_nll, c_w, *_ = _window_nll(model, params, {k: v[2:3] for k, v in alone.items()})
  np.testing.assert_allclose(nll[0, 4:], c_nll[0, :4], rtol=1e-5, atol=1e-6)
  assert c_w[0].tolist() == [1] * 4 + [0] * 4
  # B alone, with its latent window on the same 4 tokens (B[3:7]) as in the packed row.
  b_nll, *_ = _window_nll(model, params, {k: v[1:2] for k, v in alone.items()}, starts=[3])
  np.testing.assert_allclose(nll[0, :4], b_nll[0, :4], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pos[0, :4], [3, 4, 5, 6])

  # The objective's summed loss is the sum over documents; A contributes nothing.
  _, metrics = model.loss_fn(params, packed, None)
  assert float(metrics["weight_sum"]) == 8
  np.testing.assert_allclose(float(metrics["nll_sum"]), b_nll[0, :4].sum() + c_nll[0, :4].sum(),
                             rtol=1e-5)


def test_documents_inside_the_latent_window():
  model, params = _model(PositionEncoding.ROTARY)
  docs = _docs(np.random.default_rng(1), [3, 4])  # 7 tokens <= 8 latents: one window
  packed = _convert(docs, pack=True)
  nll, weights, seg, _, starts = _window_nll(model, params, packed)
  assert starts.tolist() == [0]
  np.testing.assert_array_equal(seg[0], [1, 1, 1, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(weights[0], [1] * 7 + [0])
  alone = _convert(docs, pack=False)
  per_doc, _, *_ = _window_nll(model, params, alone)
  np.testing.assert_allclose(nll[0, :3], per_doc[0, :3], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nll[0, 3:7], per_doc[1, :4], rtol=1e-5, atol=1e-6)


def test_no_attention_across_documents():
  """Changing the prefix-only document or the other document leaves each doc's logits."""
  model, params = _model(PositionEncoding.ROTARY)
  rng = np.random.default_rng(2)
  docs = _docs(rng, [5, 7, 4])
  base = _window_nll(model, params, _convert(docs, pack=True))[0]
  other_a = _window_nll(model, params, _convert([_docs(rng, [5])[0], *docs[1:]], True))[0]
  np.testing.assert_allclose(base, other_a, rtol=1e-5, atol=1e-6)
  other_b = _window_nll(model, params, _convert([docs[0], _docs(rng, [7])[0], docs[2]],
                                                True))[0]
  np.testing.assert_allclose(base[0, 4:], other_b[0, 4:], rtol=1e-5, atol=1e-6)
  assert not np.allclose(base[0, :4], other_b[0, :4])  # B's own tokens do matter


def test_training_crop_keeps_packed_segments_apart():
  """FULL_LATENTS crops a packed row; the loss still equals the documents' losses."""
  model, params = _model(PositionEncoding.ROTARY)
  model = models.PerceiverARModel(model.module, z_loss=0.0,
                                  cropping=models.CroppingMethod.FULL_LATENTS)
  packed = _convert(_docs(np.random.default_rng(3), [5, 7, 4]), pack=True)
  cropped = models.crop_batch(jax.random.key(4), packed, model.cropping, LATENTS)
  end = int(np.asarray(cropped["decoder_segment_ids"][0] > 0).sum())
  seg = np.asarray(cropped["decoder_segment_ids"][0])
  assert (seg[end:] == 0).all() and (seg[:end] == packed["decoder_segment_ids"][0, :end]).all()
  nll, weights, seg_w, _, starts = _window_nll(model, params, cropped)
  assert int(starts[0]) == end - LATENTS and weights.sum() == LATENTS
  uncropped = _window_nll(model, params, packed, starts=starts)[0]
  np.testing.assert_allclose(nll, uncropped, rtol=1e-5, atol=1e-6)  # later tokens unseen
