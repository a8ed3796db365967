"""A model = the Perceiver AR module + its training objective.

Takes the T5X decoder-only features produced by `seqio.LMFeatureConverter`:
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` and,
when packed, `decoder_segment_ids` / `decoder_positions`. Cropping to the latent
window happens here (flaxformer's CroppingMethod), not in the task.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import seqio

from perceiver_ar_t5x import datasets, slicing
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

Batch = Mapping[str, jax.Array]
Params = Any


class CroppingMethod(enum.Enum):
  """Where the latent window falls during training (paper, Appendix on cropping).

  NONE: the latents are the last num_latents positions; loss on those.
  FULL_LATENTS: a random crop ending inside the loss region so that all
    num_latents latents have loss; random window, always full.
  FULL_LATENTS_WITH_PREFIX: like FULL_LATENTS, but the window may start before
    the first loss position (a prefix without loss), down to one loss position;
    matches how a prompt is followed at inference.
  EQUAL_POSITION_LIKELIHOOD: the window may hang over both ends of the loss
    region, so every target position is trained equally often.
  """

  NONE = "none"
  FULL_LATENTS = "full_latents"
  FULL_LATENTS_WITH_PREFIX = "full_latents_with_prefix"
  EQUAL_POSITION_LIKELIHOOD = "equal_position_likelihood"


def _first_last_loss(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  on = weights > 0
  first = jnp.argmax(on, axis=-1)
  last = weights.shape[-1] - 1 - jnp.argmax(jnp.flip(on, axis=-1), axis=-1)
  return first, last


def crop_batch(rng: jax.Array | None, batch: Batch, method: CroppingMethod,
               num_latents: int) -> dict[str, jax.Array]:
  """Randomly crops each example so its latent window lands per `method`.

  Positions at or after the crop end become padding (0), and loss weights
  before the window's first loss position become 0.
  """
  batch = dict(batch)
  if method == CroppingMethod.NONE:
    return batch
  if rng is None:
    raise ValueError(f"cropping method {method} needs an rng")
  first, last = _first_last_loss(batch["decoder_loss_weights"])
  if method == CroppingMethod.FULL_LATENTS:
    lo, hi = first, last - num_latents + 1
  elif method == CroppingMethod.FULL_LATENTS_WITH_PREFIX:
    lo, hi = jnp.maximum(first - num_latents + 1, 0), last - num_latents + 1
  elif method == CroppingMethod.EQUAL_POSITION_LIKELIHOOD:
    lo, hi = first - num_latents + 1, last
  else:
    raise ValueError(f"unknown cropping method {method}")
  hi = jnp.maximum(hi, lo)  # sequences shorter than num_latents: one choice
  window_first = jax.random.randint(rng, first.shape, lo, hi + 1)
  end = jnp.minimum(window_first + num_latents, last + 1)  # [batch]
  start = jnp.maximum(window_first, 0)
  pos = jnp.arange(batch["decoder_loss_weights"].shape[-1])[None, :]
  keep = pos < end[:, None]
  for key, value in batch.items():
    batch[key] = jnp.where(keep, value, 0)
  batch["decoder_loss_weights"] = jnp.where(pos >= start[:, None],
                                            batch["decoder_loss_weights"], 0)
  return batch


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed, weighted cross-entropy and z-loss (PaLM, Sec. 5: z_loss * log(Z)^2).

  Args:
    logits: [batch, latents, vocab] float32.
    targets: [batch, latents] int.
    weights: [batch, latents] float.

  Returns:
    (cross-entropy sum incl. label smoothing, z-loss sum, per-token cross-entropy
    without smoothing [batch, latents]).
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, latents]
  log_probs = logits - log_z[..., None]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing > 0.0:
    confidence = 1.0 - label_smoothing
    smooth = -jnp.mean(log_probs, axis=-1)
    loss = confidence * nll + label_smoothing * smooth
  else:
    loss = nll
  zl = z_loss * jnp.square(log_z)
  return jnp.sum(loss * weights), jnp.sum(zl * weights), nll


@dataclasses.dataclass(frozen=True)
class PerceiverARModel:
  """The module plus loss settings; pure functions of (params, batch, rng)."""

  module: PerceiverAR
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  cropping: CroppingMethod = CroppingMethod.FULL_LATENTS

  @property
  def num_latents(self) -> int:
    return self.module.num_latents

  def check_lengths(self, lengths: Mapping[str, int]) -> int:
    """Validates TASK_FEATURE_LENGTHS; returns the decoder length (`targets` + `inputs`
    for prefix-LM tasks). Raises ValueError naming the fix."""
    if "targets" not in lengths:
      raise ValueError(f"TASK_FEATURE_LENGTHS needs a 'targets' entry, got {dict(lengths)}")
    length, n = datasets.model_length(lengths), self.num_latents
    if length < n:
      raise ValueError(f"TASK_FEATURE_LENGTHS {dict(lengths)} gives sequences of {length} "
                       f"tokens, fewer than num_latents={n}; use a length >= {n} or fewer "
                       f"latents")
    m = self.module
    if m.position_encoding == PositionEncoding.LEARNED and length > m.max_length:
      raise ValueError(f"targets length {length} exceeds the learned position table "
                       f"(max_length={m.max_length})")
    return length

  def feature_converter(self, lengths: Mapping[str, int], pack: bool) -> seqio.FeatureConverter:
    """T5X's decoder-only features (prefix LM when the task has `inputs`)."""
    return datasets.feature_converter(lengths, pack)

  def init(self, rng: jax.Array, length: int, batch_size: int = 1) -> Params:
    tokens = jnp.zeros((batch_size, length), jnp.int32)
    return self.module.init({"params": rng}, tokens)["params"]

  def latent_view(self, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(latent_starts [batch], targets [batch, n], weights [batch, n]) for a batch."""
    targets = batch["decoder_target_tokens"]
    length = targets.shape[-1]
    n = slicing.num_latent_positions(self.num_latents, length)
    if "decoder_segment_ids" in batch:
      nonpad = batch["decoder_segment_ids"] > 0
      lengths = jnp.max(jnp.where(nonpad, jnp.arange(1, length + 1), 0), axis=-1)
    else:
      lengths = slicing.sequence_lengths(targets)
    starts = slicing.latent_starts(lengths, self.num_latents, length)
    return (starts, slicing.window(targets, starts, n),
            slicing.window(batch["decoder_loss_weights"].astype(jnp.float32), starts, n))

  def logits(self, params: Params, batch: Batch, latent_starts: jax.Array,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """[batch, latents, vocab] logits at the latent window."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return self.module.apply(
        {"params": params}, batch["decoder_input_tokens"],
        positions=batch.get("decoder_positions"), segment_ids=batch.get("decoder_segment_ids"),
        latent_starts=latent_starts, deterministic=dropout_rng is None, rngs=rngs)

  def loss_fn(self, params: Params, batch: Batch, rng: jax.Array | None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss per target token, and summable metrics.

    With rng=None (evaluation) there is no cropping and no dropout: the latents
    are the last positions, as at inference.
    """
    if rng is not None:
      crop_rng, rng = jax.random.split(rng)
      batch = crop_batch(crop_rng, batch, self.cropping, self.num_latents)
    starts, targets, weights = self.latent_view(batch)
    logits = self.logits(params, batch, starts, rng)
    ce_sum, z_sum, nll = cross_entropy(logits, targets, weights,
                                       label_smoothing=self.label_smoothing, z_loss=self.z_loss)
    weight = jnp.sum(weights)
    loss = (ce_sum + z_sum) / jnp.maximum(weight, 1e-8)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "loss_sum": ce_sum + z_sum,
        "nll_sum": jnp.sum(nll * weights),
        "z_loss_sum": z_sum,
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": weight,
    }
    return loss, metrics

  def score_batch(self, params: Params, batch: Batch) -> jax.Array:
    """[batch] summed log-likelihood of the weighted targets in the latent window."""
    starts, targets, weights = self.latent_view(batch)
    logits = self.logits(params, batch, starts)
    _, _, nll = cross_entropy(logits, targets, weights)
    return -jnp.sum(nll * weights, axis=-1)


def summarize_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
  """Summed metrics -> loss, cross_ent_loss, z_loss, accuracy, perplexity."""
  w = max(float(sums["weight_sum"]), 1e-8)
  nll = float(sums["nll_sum"]) / w
  return {
      "loss": float(sums["loss_sum"]) / w,
      "cross_ent_loss": nll,
      "z_loss": float(sums["z_loss_sum"]) / w,
      "accuracy": float(sums["correct_sum"]) / w,
      "perplexity": float(jnp.exp(jnp.minimum(nll, 80.0))),
      "num_tokens": float(sums["weight_sum"]),
  }
