"""Autoregressive sampling from a Perceiver AR model.

This is the exact, uncached sampler: every step runs the full forward pass with
the latent window ending at the position being predicted. It is the reference
that a cached decoder must reproduce, and what the binaries use until one lands.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_t5x.models import PerceiverARModel


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 / top_p 1.0 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Applies temperature, top-k and top-p to [batch, vocab] logits."""
  logits = logits / max(cfg.temperature, 1e-6)
  if cfg.top_k > 0:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest set whose mass reaches top_p (always at least one token)
    cutoff_idx = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _next_token_logits(model: PerceiverARModel, params: Any, tokens: jax.Array,
                       index: jax.Array) -> jax.Array:
  """Logits [batch, vocab] predicting position `index` (tokens[:, index] is its input)."""
  length = tokens.shape[1]
  n = min(model.num_latents, length)
  starts = jnp.clip(index + 1 - n, 0, length - n)
  batch = {"decoder_input_tokens": tokens}
  logits = model.logits(params, batch, starts)  # [batch, n, vocab]
  return jnp.take_along_axis(logits, (index - starts)[:, None, None], axis=1)[:, 0]


def sample(model: PerceiverARModel, params: Any, prompts: np.ndarray, prompt_lengths: np.ndarray,
           max_length: int, rng: jax.Array, cfg: SamplingConfig = SamplingConfig()
           ) -> tuple[np.ndarray, np.ndarray]:
  """Continues each prompt up to `max_length` total tokens (or EOS).

  Args:
    prompts: [batch, >=max prompt length] token ids (right-padded with 0).
    prompt_lengths: [batch] true prompt lengths (may differ; 0 = unconditional).
    max_length: total length of prompt + continuation.

  Returns:
    (tokens [batch, max_length] with prompts and samples, zero after EOS;
     log-probs [batch, max_length] of each sampled token, 0 for prompt tokens).
  """
  batch = prompts.shape[0]
  targets = np.zeros((batch, max_length), np.int32)
  width = min(prompts.shape[1], max_length)
  targets[:, :width] = prompts[:, :width]
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  step = jax.jit(lambda p, t, i: _next_token_logits(model, p, t, i))
  targets = jnp.asarray(targets)
  logprobs = jnp.zeros((batch, max_length), jnp.float32)
  done = jnp.zeros((batch,), bool)
  for pos in range(int(np.min(prompt_lengths)), max_length):
    # decoder input = targets shifted right by one (BOS = 0), as LMFeatureConverter does
    inputs = jnp.pad(targets[:, :-1], [(0, 0), (1, 0)])
    logits = step(params, inputs, jnp.full((batch,), pos, jnp.int32))
    log_p = jax.nn.log_softmax(logits, axis=-1)
    if cfg.temperature == 0.0:
      token = jnp.argmax(logits, axis=-1)
    else:
      token = jax.random.categorical(jax.random.fold_in(rng, pos), filter_logits(logits, cfg))
    active = (pos >= lengths) & ~done
    token = jnp.where(active, token, targets[:, pos]).astype(jnp.int32)
    targets = targets.at[:, pos].set(token)
    chosen = jnp.take_along_axis(log_p, token[:, None], axis=-1)[:, 0]
    logprobs = logprobs.at[:, pos].set(jnp.where(active, chosen, 0.0))
    if cfg.eos_id is not None:
      done = done | (active & (token == cfg.eos_id))
    if bool(jnp.all(done)):
      break
  return np.asarray(targets), np.asarray(logprobs)
