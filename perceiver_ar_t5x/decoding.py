"""Autoregressive sampling from a Perceiver AR model with the exact cache (decode_cache.py).

The whole loop runs on device (`jax.lax.while_loop`) and is compiled once per
(batch, bucketed length, sampling settings): prompt and output lengths are
runtime values, so a new prompt length does not recompile. Each example has
its own prompt length, its own latent window (reset alone when full), and stops
at EOS or at its own maximum length. Decoder inputs follow seqio's
LMFeatureConverter: position 0 holds the start token 0, then the targets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_t5x.decode_cache import CachedDecoder, DecodeCache
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.models import PerceiverARModel


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 / top_p 1.0 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None


@flax.struct.dataclass
class DecodeResult:
  """tokens/log_probs [batch, num_decodes, length]: prompt then samples, 0 after the end.

  log_probs are the model's (untempered) log-probabilities of each sampled token,
  0 at prompt positions; lengths [batch, num_decodes] count prompt + samples.
  logits [.., length, vocab] and window_starts [.., length] are filled only when
  recorded (tests): the logits each step sampled from, and that step's window start.
  """

  tokens: np.ndarray
  log_probs: np.ndarray
  lengths: np.ndarray
  logits: np.ndarray | None = None
  window_starts: np.ndarray | None = None


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


def bucket_length(n: int, *, minimum: int = 16, steps: int = 16) -> int:
  """Rounds n up to a multiple of 2**floor(log2 n) / steps: at most ~1/steps wasted."""
  if n <= minimum:
    return minimum
  grain = max(1, (1 << (int(n).bit_length() - 1)) // steps)
  return -(-n // grain) * grain


def _choose(logits: jax.Array, keys: jax.Array, position: jax.Array,
            cfg: SamplingConfig) -> jax.Array:
  """[batch] next tokens; row b draws with fold_in(keys[b], position[b])."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  step_keys = jax.vmap(jax.random.fold_in)(keys, position)
  filtered = filter_logits(logits, cfg)
  return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)


def _record(state: dict[str, Any], cfg: SamplingConfig) -> dict[str, Any]:
  """Samples each active example's token at its position and writes it everywhere."""
  cache: DecodeCache = state["cache"]
  p, logits, active = cache.position, state["logits"], ~state["done"]
  rows = jnp.arange(p.shape[0])
  token = _choose(logits, state["keys"], p, cfg)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
  state = dict(state)
  state["targets"] = state["targets"].at[rows, p].set(
      jnp.where(active, token, state["targets"][rows, p]))
  state["log_probs"] = state["log_probs"].at[rows, p].set(
      jnp.where(active, logp, state["log_probs"][rows, p]))
  if "rec_logits" in state:
    state["rec_logits"] = state["rec_logits"].at[rows, p].set(logits)
    state["rec_starts"] = state["rec_starts"].at[rows, p].set(cache.window_start)
  finished = active & (p + 1 >= state["end"])
  if cfg.eos_id is not None:
    finished = finished | (active & (token == cfg.eos_id))
  state["done"] = state["done"] | finished
  state["lengths"] = jnp.where(finished, p + 1, state["lengths"])
  state["cache"] = cache.replace(tokens=cache.tokens.at[rows, p + 1].set(token, mode="drop"))
  return state


def _decode_on_device(decoder: CachedDecoder, cfg: SamplingConfig, record: bool, params: Any,
                      inputs: jax.Array, targets: jax.Array, prompt_lengths: jax.Array,
                      end: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
  """Prefill, then sample/step in a while_loop until every example is done."""
  cache, logits = decoder.prefill(params, inputs, prompt_lengths)
  batch, length = inputs.shape
  state = {"cache": cache, "logits": logits, "targets": targets,
           "log_probs": jnp.zeros((batch, length), jnp.float32),
           "done": end <= prompt_lengths, "end": end, "lengths": prompt_lengths,
           "keys": jax.random.split(rng, batch)}
  if record:
    state["rec_logits"] = jnp.zeros((batch, length, logits.shape[-1]), jnp.float32)
    state["rec_starts"] = jnp.zeros((batch, length), jnp.int32)
  state = _record(state, cfg)
  weights = decoder.step_weights(params)  # laid out once, outside the loop

  def body(state: dict[str, Any]) -> dict[str, Any]:
    cache, logits = decoder.step(params, state["cache"], ~state["done"], weights)
    return _record({**state, "cache": cache, "logits": logits}, cfg)

  state = jax.lax.while_loop(lambda s: jnp.any(~s["done"]), body, state)
  out = {k: state[k] for k in ("targets", "log_probs", "lengths")}
  if record:
    out["logits"], out["window_starts"] = state["rec_logits"], state["rec_starts"]
  return out


@functools.lru_cache(maxsize=32)
def compiled_decode(decoder: CachedDecoder, cfg: SamplingConfig, record: bool = False):
  """The jitted decode for one static setting: (params, inputs, targets, lengths, end, rng)."""
  return jax.jit(functools.partial(_decode_on_device, decoder, cfg, record))


def prepare(prompts: np.ndarray, prompt_lengths: np.ndarray, max_new_tokens: int | np.ndarray,
            num_decodes: int = 1, *, length: int | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Host-side buffers: (inputs, targets [rows, length], lengths, ends [rows]).

  length defaults to the bucketed longest prompt + new tokens; a larger one may be
  given (to reuse a compiled decode).
  """
  prompts = np.asarray(prompts)
  lengths = np.asarray(prompt_lengths, np.int32).reshape(-1)
  if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
    raise ValueError(f"prompts must be int [batch, length], got {prompts.dtype}{prompts.shape}")
  if lengths.shape != prompts.shape[:1] or np.any(lengths < 0) or np.any(
      lengths > prompts.shape[1]):
    raise ValueError(f"prompt_lengths must be [{prompts.shape[0]}] in [0, {prompts.shape[1]}], "
                     f"got {lengths}")
  new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), lengths.shape)
  if np.any(new < 0) or num_decodes < 1:
    raise ValueError(f"need max_new_tokens >= 0 and num_decodes >= 1, got {new}, {num_decodes}")
  ends = lengths + new
  needed = bucket_length(int(max(ends.max(initial=0), lengths.max(initial=0) + 1)))
  length = needed if length is None else length
  if length < needed:
    raise ValueError(f"length {length} is shorter than the {needed} positions needed")
  targets = np.zeros((len(lengths), length), np.int32)
  for b, n in enumerate(lengths):
    targets[b, :n] = prompts[b, :n]
  inputs = np.pad(targets[:, :-1], [(0, 0), (1, 0)])  # shifted right, BOS = 0

  def rep(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, num_decodes, axis=0)

  return rep(inputs), rep(targets), rep(lengths), rep(ends)


def decode(model: PerceiverARModel, params: Any, prompts: np.ndarray,
           prompt_lengths: np.ndarray, max_new_tokens: int | np.ndarray, rng: jax.Array,
           cfg: SamplingConfig = SamplingConfig(), *, num_decodes: int = 1,
           fill: int | None = None, record_logits: bool = False) -> DecodeResult:
  """Samples up to max_new_tokens (int or [batch]) after each prompt, with the cache.

  Args:
    prompts: [batch, width] token ids; row b's prompt is prompts[b, :prompt_lengths[b]]
      (0 = unconditional: decoding starts from the start token 0).
    rng: the only randomness; the same rng gives the same samples.
    num_decodes: samples per prompt (rows b * num_decodes + i share a prompt).
    fill: latents kept after a window reset (default num_latents // 2).
    record_logits: also return every step's logits and window start (for tests).
  """
  inputs, targets, lengths, ends = prepare(prompts, prompt_lengths, max_new_tokens,
                                           num_decodes)
  module = model.module
  if (module.position_encoding == PositionEncoding.LEARNED
      and int(ends.max(initial=0)) > module.max_length):
    raise ValueError(f"prompt + new tokens reach {int(ends.max())} positions, beyond the "
                     f"learned position table (max_length={module.max_length}); use shorter "
                     f"prompts or fewer new tokens")
  decoder = CachedDecoder(model.module, inputs.shape[1], fill)
  out = compiled_decode(decoder, cfg, record_logits)(params, inputs, targets, lengths, ends, rng)
  out = jax.device_get(out)
  width, batch = int(ends.max(initial=0)), len(ends) // num_decodes

  def shape(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else x[:, :width].reshape(batch, num_decodes, width, *x.shape[2:])

  return DecodeResult(tokens=shape(out["targets"]), log_probs=shape(out["log_probs"]),
                      lengths=out["lengths"].reshape(batch, num_decodes),
                      logits=shape(out.get("logits")),
                      window_starts=shape(out.get("window_starts")))


def sample(model: PerceiverARModel, params: Any, prompts: np.ndarray, prompt_lengths: np.ndarray,
           max_length: int, rng: jax.Array, cfg: SamplingConfig = SamplingConfig()
           ) -> tuple[np.ndarray, np.ndarray]:
  """Continues each prompt up to `max_length` total tokens (or EOS), with the cache.

  Returns:
    (tokens [batch, max_length] with prompts and samples, zero after EOS;
     log-probs [batch, max_length] of each sampled token, 0 for prompt tokens).
  """
  lengths = np.minimum(np.asarray(prompt_lengths, np.int32), max_length)
  result = decode(model, params, np.asarray(prompts)[:, :max_length], lengths,
                  max_length - lengths, rng, cfg)
  tokens = np.zeros((len(lengths), max_length), np.int32)
  logprobs = np.zeros((len(lengths), max_length), np.float32)
  width = result.tokens.shape[2]
  tokens[:, :width], logprobs[:, :width] = result.tokens[:, 0], result.log_probs[:, 0]
  return tokens, logprobs
