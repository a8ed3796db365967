"""Per-device memory of a Perceiver AR train step with layer-0 length sharding on/off.

Compiles (does not run) the real partitioned train step on 8 fake CPU devices for
one long context and reads XLA's memory analysis: what one device must hold.
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python benchmarks/length_sharding_memory.py --length 32768
"""

import argparse
import json
import os
import pathlib

import jax
import numpy as np
import optax

from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x import training
from perceiver_ar_t5x.models import CroppingMethod, PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR


def per_device_bytes(length: int, batch: int, mesh_shape: tuple[int, int],
                     shard_length: bool) -> dict[str, float]:
  module = PerceiverAR(vocab_size=256, num_latents=512, embed_dim=256, num_heads=8,
                       head_dim=32, mlp_dim=683, num_layers=4, max_length=length)
  model = PerceiverARModel(module, cropping=CroppingMethod.NONE)
  mesh = pt.make_mesh(mesh_shape[1], jax.devices()[:mesh_shape[0] * mesh_shape[1]])
  cfg = pt.PartitioningConfig(num_partitions=mesh_shape[1], shard_length=shard_length)
  opt = optax.adamw(1e-3)
  state, part = training.create_state(model, opt, jax.random.key(0), length, mesh,
                                      pt.logical_axis_rules(cfg))
  step = jax.jit(lambda s, b, r: jax.value_and_grad(
      lambda p: model.loss_fn(p, b, r)[0])(s.params),
      in_shardings=(part.state_sharding, part.batch_sharding, pt.replicated(mesh)))
  tokens = np.ones((batch, length), np.int32)
  b = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
       "decoder_loss_weights": tokens}
  with part.context():
    mem = step.lower(state, pt.global_batch(b, mesh),
                     pt.replicate(jax.random.key(1), mesh)).compile().memory_analysis()
  return {"temp_mib": mem.temp_size_in_bytes / 2**20,
          "argument_mib": mem.argument_size_in_bytes / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  rows = []
  for mesh_shape, shard in (((2, 4), False), ((2, 4), True), ((1, 8), False), ((1, 8), True)):
    r = per_device_bytes(args.length, args.batch, mesh_shape, shard)
    rows.append({"mesh": list(mesh_shape), "shard_length": shard, **r})
    print(f"mesh {mesh_shape} shard_length={shard}: temp {r['temp_mib']:.1f} MiB/device, "
          f"arguments {r['argument_mib']:.1f} MiB/device", flush=True)
  out = pathlib.Path(__file__).parent / "results" / "length_sharding_memory.json"
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps({"length": args.length, "batch": args.batch, "rows": rows,
                             "devices": jax.device_count(), "backend": jax.default_backend()},
                            indent=1))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
