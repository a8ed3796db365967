"""Train state, the jitted (partitioned) train step, and the state initialiser."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.models import PerceiverARModel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class Partitioned:
  """Everything that knows where arrays live: mesh, rules, shardings."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  params_logical: Any  # pytree of PartitionSpec with logical names
  state_sharding: Any
  batch_sharding: Any

  def context(self):
    """Mesh + logical rules context for tracing the model."""
    return _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))


class _Both:
  def __init__(self, *ctxs: Any):
    self._ctxs = ctxs

  def __enter__(self) -> None:
    for c in self._ctxs:
      c.__enter__()

  def __exit__(self, *exc: Any) -> None:
    for c in reversed(self._ctxs):
      c.__exit__(*exc)


def abstract_params(model: PerceiverARModel, length: int) -> Any:
  """Boxed (LogicallyPartitioned) parameter shapes, without computing anything."""
  return jax.eval_shape(lambda r: model.init(r, length), jax.random.key(0))


def state_layout(model: PerceiverARModel, optimizer: optax.GradientTransformation,
                 length: int, mesh: Mesh, rules: tuple[tuple[str, Any], ...]
                 ) -> tuple[TrainState, Partitioned]:
  """(abstract TrainState of ShapeDtypeStructs with shardings, Partitioned); computes nothing.

  The restore target for a checkpoint, and the layout `create_state` initialises into.
  """
  boxed = abstract_params(model, length)
  logical = nn.get_partition_spec(boxed)
  params_sharding = pt.fitted_shardings(logical, nn.unbox(boxed), mesh, rules)
  replicated = pt.replicated(mesh)
  shapes = nn.unbox(boxed)
  opt_shapes = jax.eval_shape(optimizer.init, shapes)

  def like_param(leaf: Any, sharding: Any, shape: Any) -> Any:
    # Param-shaped optimizer slots (Adam moments) follow the param; factored or
    # scalar slots (Adafactor rows/cols, counts) are replicated.
    return sharding if leaf.shape == shape.shape else replicated

  opt_sharding = optax.tree_map_params(optimizer, like_param, opt_shapes, params_sharding,
                                       shapes, transform_non_params=lambda _: replicated)
  state_sharding = TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding)
  shapes_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes,
                            opt_state=opt_shapes)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes_state, state_sharding)
  return abstract, Partitioned(mesh, tuple(rules), logical, state_sharding,
                               pt.batch_sharding(mesh))


def create_state(model: PerceiverARModel, optimizer: optax.GradientTransformation,
                 rng: jax.Array, length: int, mesh: Mesh,
                 rules: tuple[tuple[str, Any], ...]) -> tuple[TrainState, Partitioned]:
  """Initialises params directly sharded on `mesh`, and the optimizer state."""
  _, part = state_layout(model, optimizer, length, mesh, rules)
  sharding = part.state_sharding

  def init(r: jax.Array) -> Any:
    return nn.unbox(model.init(r, length))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(init, out_shardings=sharding.params)(rng)
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.opt_state)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  return jax.device_put(state, sharding), part


def with_optimizer(params: Any, step: int, optimizer: optax.GradientTransformation,
                   part: Partitioned) -> TrainState:
  """A TrainState at `step` from restored params and a fresh optimizer state (fine-tuning)."""
  sharding = part.state_sharding
  with jax.set_mesh(part.mesh), nn.logical_axis_rules(part.rules):
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.opt_state)(params)
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
  return jax.device_put(state, sharding)


def abstract_state(state: TrainState) -> Any:
  """ShapeDtypeStructs with shardings, the restore target for orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def make_train_step(model: PerceiverARModel, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, part: Partitioned
                    ) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Jitted step(state, batch, base_rng) -> (state, summed metrics).

  The step's rng is fold_in(base_rng, step): a restarted run draws exactly the
  same dropout/cropping randomness as an uninterrupted one.
  """
  def step_fn(state: TrainState, batch: Mapping[str, jax.Array], base_rng: jax.Array
              ) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   learning_rate=schedule(state.step))
    return TrainState(state.step + 1, params, opt_state), metrics

  replicated = pt.replicated(part.mesh)
  jitted = jax.jit(step_fn, in_shardings=(part.state_sharding, part.batch_sharding, replicated),
                   out_shardings=(part.state_sharding, replicated), donate_argnums=(0,))

  def run(state: TrainState, batch: Mapping[str, Any], rng: jax.Array):
    # Host-local numpy rows -> global arrays: the same call on one or many processes.
    batch = pt.global_batch(batch, part.mesh)
    with part.context():
      return jitted(state, batch, pt.replicate(rng, part.mesh))

  return run


def make_eval_step(model: PerceiverARModel, part: Partitioned
                   ) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """Jitted eval(params, batch) -> summed metrics (no cropping, no dropout)."""
  def eval_fn(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return model.loss_fn(params, batch, None)[1]

  jitted = jax.jit(eval_fn, in_shardings=(part.state_sharding.params, part.batch_sharding),
                   out_shardings=pt.replicated(part.mesh))

  def run(params: Any, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    batch = pt.global_batch(batch, part.mesh)
    with part.context():
      return jitted(params, batch)

  return run


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
