"""How Perceiver AR stacks its blocks: rematerialisation policies, the scan form, layouts.

The block's math is layers/block.py's; this file holds only what wraps it for the
stack: a Block whose `deterministic` flag is a field (so nn.remat / nn.scan never
trace it), the (carry, x) -> (carry, y) form nn.scan needs, and the reader of a
latent block's params under either layout (unrolled `layers_i` or scanned
`latent_layers`).
"""

from __future__ import annotations

import enum
from typing import Any

import jax

from perceiver_ar_t5x.layers.block import Block


class RematPolicy(enum.Enum):
  """What each block keeps for the backward pass (jax.checkpoint policies).

  NONE: keep everything (no recomputation; most memory).
  FULL: keep only the block inputs; recompute the whole block.
  DOTS: keep matmul outputs, recompute elementwise ops.
  DOTS_NO_BATCH: keep only matmuls without batch dims (projections, MLP), recompute
    attention scores (the usual choice for long sequences).
  """

  NONE = "none"
  FULL = "full"
  DOTS = "dots"
  DOTS_NO_BATCH = "dots_no_batch"


POLICIES = {
    RematPolicy.FULL: None,
    RematPolicy.DOTS: jax.checkpoint_policies.dots_saveable,
    RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class FieldBlock(Block):
  """A Block whose `deterministic` is a field, so remat/scan never trace the flag."""

  deterministic: bool = True

  def __call__(self, x: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None,
               kv_x: jax.Array | None = None, k_pos: jax.Array | None = None,
               k_seg: jax.Array | None = None, kv_is_latent: jax.Array | None = None
               ) -> jax.Array:
    return super().__call__(x, q_pos, q_seg, kv_x, k_pos, k_seg, kv_is_latent,
                            deterministic=self.deterministic)


class ScannedBlock(FieldBlock):
  """A latent self-attention block in nn.scan's (carry, x) -> (carry, y) form."""

  def __call__(self, x: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None
               ) -> tuple[jax.Array, None]:
    return super().__call__(x, q_pos, q_seg), None


def latent_layer_params(params: Any, index: int) -> Any:
  """Params of latent block `index` (1..num_layers-1) under either layer layout.

  Unrolled models store `layers_{index}`; scanned models (scan_layers=True) store
  all latent blocks stacked on a leading axis under `latent_layers`.
  """
  if "latent_layers" in params:
    return jax.tree_util.tree_map(lambda p: p[index - 1], params["latent_layers"])
  return params[f"layers_{index}"]
