"""Objective: cropping modes (golden loss masks), cross-entropy, z-loss, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x import models
from perceiver_ar_t5x.models import CroppingMethod


def _batch(weights_row, rows=256):
  length = len(weights_row)
  targets = np.tile(np.arange(1, length + 1), (rows, 1)).astype(np.int32)
  return {"decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], [(0, 0), (1, 0)]),
          "decoder_loss_weights": np.tile(np.asarray(weights_row, np.int32), (rows, 1))}


def _masks(method, weights_row, num_latents=3):
  cropped = models.crop_batch(jax.random.key(0), _batch(weights_row), method, num_latents)
  return {tuple(int(v) for v in row) for row in np.asarray(cropped["decoder_loss_weights"])}


PREFIX_TASK = [0, 0, 1, 1, 1, 1]  # two prompt positions without loss, then four targets
GOLDEN = {
    CroppingMethod.NONE: {(0, 0, 1, 1, 1, 1)},
    CroppingMethod.FULL_LATENTS: {(0, 0, 1, 1, 1, 0), (0, 0, 0, 1, 1, 1)},
    CroppingMethod.FULL_LATENTS_WITH_PREFIX: {
        (0, 0, 1, 0, 0, 0), (0, 0, 1, 1, 0, 0), (0, 0, 1, 1, 1, 0), (0, 0, 0, 1, 1, 1)},
    CroppingMethod.EQUAL_POSITION_LIKELIHOOD: {
        (0, 0, 1, 0, 0, 0), (0, 0, 1, 1, 0, 0), (0, 0, 1, 1, 1, 0), (0, 0, 0, 1, 1, 1),
        (0, 0, 0, 0, 1, 1), (0, 0, 0, 0, 0, 1)},
}


@pytest.mark.parametrize("method", list(CroppingMethod))
def test_cropping_loss_masks_golden(method):
  assert _masks(method, PREFIX_TASK) == GOLDEN[method]


def test_equal_position_likelihood_is_equal():
  cropped = models.crop_batch(jax.random.key(1), _batch([1] * 8, rows=20000),
                              CroppingMethod.EQUAL_POSITION_LIKELIHOOD, 3)
  freq = np.asarray(cropped["decoder_loss_weights"]).mean(axis=0)
  np.testing.assert_allclose(freq, freq.mean(), rtol=0.08)


def test_crop_zeroes_tokens_after_the_window_and_latent_view_follows(tiny_module):
  batch = _batch([1] * 6, rows=64)
  cropped = models.crop_batch(jax.random.key(2), batch, CroppingMethod.FULL_LATENTS, 3)
  model = models.PerceiverARModel(tiny_module.clone(num_latents=3))
  starts, targets, weights = model.latent_view(cropped)
  tgt = np.asarray(cropped["decoder_target_tokens"])
  for row in range(64):
    end = int((tgt[row] != 0).sum())
    assert (tgt[row, end:] == 0).all()
    assert int(starts[row]) == end - 3
    np.testing.assert_array_equal(targets[row], np.arange(end - 2, end + 1))
    np.testing.assert_array_equal(weights[row], [1, 1, 1])


def test_cross_entropy_and_z_loss_values():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
  targets = jnp.array([[0, 2]])
  weights = jnp.array([[1.0, 0.0]])
  ce, z, nll = models.cross_entropy(logits, targets, weights, z_loss=1e-2)
  log_z = np.log(np.exp([2.0, 0.0, -1.0]).sum())
  np.testing.assert_allclose(ce, log_z - 2.0, rtol=1e-6)
  np.testing.assert_allclose(z, 1e-2 * log_z**2, rtol=1e-6)
  np.testing.assert_allclose(nll[0, 1], np.log(3.0), rtol=1e-6)
  smooth, _, _ = models.cross_entropy(logits, targets, weights, label_smoothing=0.1)
  expected = 0.9 * (log_z - 2.0) + 0.1 * np.mean(log_z - np.array([2.0, 0.0, -1.0]))
  np.testing.assert_allclose(smooth, expected, rtol=1e-6)


def test_loss_is_normalised_by_target_tokens(tiny_module):
  model = models.PerceiverARModel(tiny_module, z_loss=0.0, cropping=CroppingMethod.NONE)
  params = model.init(jax.random.key(0), 10)
  batch = {k: v[:2, :10] for k, v in _batch([1] * 10).items()}
  batch["decoder_target_tokens"] = batch["decoder_target_tokens"] % 13
  batch["decoder_target_tokens"][batch["decoder_target_tokens"] == 0] = 1
  loss, sums = model.loss_fn(params, batch, None)
  assert float(sums["weight_sum"]) == 8.0  # 2 examples x 4 latents
  np.testing.assert_allclose(loss, sums["loss_sum"] / 8.0, rtol=1e-6)
  summary = models.summarize_metrics(jax.device_get(sums))
  np.testing.assert_allclose(summary["perplexity"], np.exp(summary["cross_ent_loss"]), rtol=1e-5)
  assert 0.0 <= summary["accuracy"] <= 1.0
