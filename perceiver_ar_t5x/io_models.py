"""A Perceiver IO model = the PerceiverIO module + its objective (masked LM or classification).

Takes T5X's encoder-only features: `encoder_input_tokens` [batch, length] (0 = padding),
`encoder_target_tokens` and `encoder_loss_weights`, both [batch, length] for masked LM
(seqio.EncoderFeatureConverter: weight 1 where the input is [MASK]) or [batch, 1] for
classification (datasets.ClassificationFeatureConverter: the label id, weight 1).
The loss and the summed metrics are models.py's, so training, checkpoints, eval
summaries and TensorBoard treat both model families alike; `accuracy` is the
masked-token or the classification accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import seqio

from perceiver_ar_t5x import datasets
from perceiver_ar_t5x.models import cross_entropy
from perceiver_ar_t5x.perceiver_io import Head, PerceiverIO

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PerceiverIOModel:
  """The module plus loss settings; pure functions of (params, batch, rng).

  mask_id: the [MASK] id of a masked-LM task (the loss is taken where the input is
    [MASK]); unused by classification.
  unmasked_weight: masked LM only: the training loss also asks the decoder to
    reconstruct every real unmasked byte, at this weight per byte (a masked byte weighs
    1). The bytes must then pass through the latent bottleneck with their positions (the
    paper's autoencoding objective, Sec. 4.4), which is what lets a small model leave
    the byte-frequency plateau on a CPU budget (README, Perceiver IO). The loss is
    normalised by the summed weights; the reported metrics stay on the masked bytes.
  """

  module: PerceiverIO
  mask_id: int | None = None
  unmasked_weight: float = 0.0
  z_loss: float = 0.0
  label_smoothing: float = 0.0

  @property
  def is_mlm(self) -> bool:
    return self.module.head == Head.MLM

  def check_lengths(self, lengths: Mapping[str, int]) -> int:
    """Validates TASK_FEATURE_LENGTHS; returns the input length. Raises ValueError."""
    if "inputs" not in lengths or "targets" not in lengths:
      raise ValueError(f"TASK_FEATURE_LENGTHS of a Perceiver IO task needs 'inputs' and "
                       f"'targets', got {dict(lengths)}")
    length, targets = int(lengths["inputs"]), int(lengths["targets"])
    if self.is_mlm:
      if targets != length:
        raise ValueError(f"masked LM: 'targets' length {targets} must equal 'inputs' {length}")
      if self.mask_id is None:
        raise ValueError("a masked-LM model needs mask_id (the task's [MASK] id)")
      limit = min(self.module.num_outputs, self.module.input_adapter.max_length)
      if length > limit:
        raise ValueError(f"'inputs' length {length} exceeds the model's {limit} positions "
                         f"(num_outputs={self.module.num_outputs}, max_length="
                         f"{self.module.input_adapter.max_length})")
    elif targets != 1:
      raise ValueError(f"classification: 'targets' length must be 1 (one label), got {targets}")
    return length

  def feature_converter(self, lengths: Mapping[str, int], pack: bool) -> seqio.FeatureConverter:
    del lengths
    if pack:
      raise ValueError("Perceiver IO tasks are not packed (set DatasetConfig.pack = False)")
    if self.is_mlm:
      return seqio.EncoderFeatureConverter(mask_id=self.mask_id, pack=False)
    return datasets.ClassificationFeatureConverter(pack=False)

  def init(self, rng: jax.Array, length: int, batch_size: int = 1) -> Any:
    """Boxed (logically partitioned) params for inputs of `length` tokens."""
    tokens = jnp.ones((batch_size, length), jnp.int32)
    return self.module.init({"params": rng}, tokens)["params"]

  def logits(self, params: Any, batch: Batch, dropout_rng: jax.Array | None = None
             ) -> jax.Array:
    """f32 [batch, length, vocab] (masked LM) or [batch, 1, classes]."""
    tokens = batch["encoder_input_tokens"]
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return self.module.apply({"params": params}, tokens, tokens > 0,
                             deterministic=dropout_rng is None, rngs=rngs)

  def loss_fn(self, params: Any, batch: Batch, rng: jax.Array | None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss per weighted target, and summable metrics (models.summarize_metrics)."""
    logits = self.logits(params, batch, rng)
    targets = batch["encoder_target_tokens"]
    weights = batch["encoder_loss_weights"].astype(jnp.float32)
    ce_sum, z_sum, nll = cross_entropy(logits, targets, weights,
                                       label_smoothing=self.label_smoothing, z_loss=self.z_loss)
    weight = jnp.sum(weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {"loss_sum": ce_sum + z_sum, "nll_sum": jnp.sum(nll * weights),
               "z_loss_sum": z_sum, "correct_sum": jnp.sum(correct * weights),
               "weight_sum": weight}
    loss, total = ce_sum + z_sum, weight
    if self.is_mlm and self.unmasked_weight > 0.0:
      real = (batch["encoder_input_tokens"] > 0).astype(jnp.float32)
      extra = self.unmasked_weight * real * (1.0 - weights)
      extra_ce, extra_z, _ = cross_entropy(logits, targets, extra,
                                           label_smoothing=self.label_smoothing,
                                           z_loss=self.z_loss)
      loss, total = loss + extra_ce + extra_z, total + jnp.sum(extra)
    return loss / jnp.maximum(total, 1e-8), metrics

  def predict(self, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(argmax ids, their probabilities), [batch, length] (masked LM) or [batch, 1]."""
    probs = jax.nn.softmax(self.logits(params, batch), axis=-1)
    return jnp.argmax(probs, axis=-1), jnp.max(probs, axis=-1)
