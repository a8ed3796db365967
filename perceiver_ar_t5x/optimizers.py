"""Optimizers and learning-rate schedules, selected by enum from gin."""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp
import optax


class OptimizerName(enum.Enum):
  ADAMW = "adamw"
  ADAFACTOR = "adafactor"


class ScheduleName(enum.Enum):
  """Warmup then: CONSTANT, RSQRT (T5's 1/sqrt(step)) or COSINE decay to 0."""

  CONSTANT = "constant"
  RSQRT = "rsqrt"
  COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Everything the optimizer needs; `decay_steps` defaults to the run length."""

  name: OptimizerName = OptimizerName.ADAMW
  learning_rate: float = 1e-3
  schedule: ScheduleName = ScheduleName.COSINE
  warmup_steps: int = 100
  decay_steps: int | None = None
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.98
  grad_clip_norm: float | None = 1.0


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then the chosen decay."""
  warmup = max(cfg.warmup_steps, 1)
  peak = cfg.learning_rate
  decay_steps = max((cfg.decay_steps or total_steps) - warmup, 1)

  def schedule(step: jnp.ndarray) -> jnp.ndarray:
    step = jnp.asarray(step, jnp.float32)
    ramp = peak * jnp.minimum(step / warmup, 1.0)
    if cfg.schedule == ScheduleName.CONSTANT:
      return ramp
    if cfg.schedule == ScheduleName.RSQRT:
      return jnp.where(step < warmup, ramp, peak * jnp.sqrt(warmup / jnp.maximum(step, 1.0)))
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    return jnp.where(step < warmup, ramp, peak * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))

  return schedule


def make_optimizer(cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule); gradient clipping by global norm comes first."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.name == OptimizerName.ADAMW:
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  elif cfg.name == OptimizerName.ADAFACTOR:
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                          weight_decay_rate=cfg.weight_decay or None)
  else:
    raise ValueError(f"unknown optimizer {cfg.name}")
  if cfg.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt, schedule
