"""Cached decoding speed against this machine's memory-bandwidth bound.

Batch-1 decoding is bound by memory bandwidth, not FLOPs: every new token reads
each weight it passes through plus the layer-0 cache (every context position) and
the latent caches (the current window). This script decodes 256 new tokens after
3072- and 16384-token prompts at batch 1 and 8 on the training benchmark's model
(vocab 256, width 512, 8 heads x 64, 6 layers = 1 cross-attention + 5 latent,
1024 latents, gated-GELU MLP with mlp_dim 1365 = the 2.1M parameters of a plain
4x MLP, f32), measures the machine's read bandwidth in the same run
(benchmarks/machine.py: a reduction over 1 GiB on all cores), and reports

  bytes/token  = weights + batch * (layer-0 cache + latent caches) / batch, with the
                 caches at their mean size over the run and a reset cycle;
  bound        = bandwidth / bytes/token;  fraction = steady tokens/s / bound.

Steady tokens/s leaves resets out; each reset (recomputing `fill` latents of one
example from the layer-0 cache) is timed alone and listed, with its cost
amortised over the num_latents - fill steps until the next one. Each case runs in
its own process, so peak RSS is that case's.

  .venv/bin/python benchmarks/decode.py            # all four cases, f32
  .venv/bin/python benchmarks/decode.py --dtype bfloat16 --prompts 3072 --batches 1
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py)

from perceiver_ar_t5x import decoding  # noqa: E402
from perceiver_ar_t5x.decode_cache import CachedDecoder  # noqa: E402
from perceiver_ar_t5x.models import PerceiverARModel  # noqa: E402
from perceiver_ar_t5x.perceiver_ar import PerceiverAR  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def make_module(dtype: str, max_length: int) -> PerceiverAR:
  return PerceiverAR(vocab_size=256, num_latents=1024, embed_dim=512, num_heads=8,
                     head_dim=64, mlp_dim=1365, num_layers=6, max_length=max_length,
                     dtype=jnp.dtype(dtype))


def bytes_per_token(module: PerceiverAR, params, prompt: int, new: int, batch: int,
                    fill: int, itemsize: int) -> dict[str, float]:
  """What each new token must read, in bytes, with caches at their mean size."""
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  table = module.vocab_size * module.embed_dim  # the embedding table: one row is read
  weights = (n_params - table + batch * module.embed_dim) * itemsize
  kv = 2 * module.num_heads * module.head_dim * itemsize  # one position's key + value
  layer0 = (prompt + 1 + new / 2) * kv
  latents = (module.num_layers - 1) * (fill + module.num_latents) / 2 * kv
  return {"weights_mb": weights / 1e6, "layer0_cache_mb": layer0 / 1e6,
          "latent_cache_mb": latents / 1e6,
          "bytes_per_token": (weights + batch * (layer0 + latents)) / batch}


def _best(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def run_case(prompt: int, batch: int, new: int, dtype: str, repeats: int) -> dict:
  """One case, in this process: compile, time, RSS, then the bandwidth bound."""
  module = make_module(dtype, prompt + new + 16)
  model = PerceiverARModel(module)
  params = model.init(jax.random.key(0), 64)
  if dtype != "float32":
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  prompts = np.random.default_rng(0).integers(1, 256, (batch, prompt)).astype(np.int32)
  lengths = np.full((batch,), prompt)
  full = decoding.prepare(prompts, lengths, new)
  decoder = CachedDecoder(module, full[0].shape[1])
  rng = jax.random.key(1)
  start = time.perf_counter()
  run = decoding.compiled_decode(decoder, decoding.SamplingConfig()).lower(
      params, *full, rng).compile()
  compile_s = time.perf_counter() - start
  one = decoding.prepare(prompts, lengths, 1, length=full[0].shape[1])
  t_one = _best(lambda: run(params, *one, rng), repeats)  # prefill + first token
  t_all = _best(lambda: run(params, *full, rng), repeats)  # + new - 1 steps, 1 reset each
  reset_s = _time_reset(decoder, params, full[0], lengths, repeats)
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  steps = new - 1
  steady_s = max(t_all - t_one - reset_s, 1e-9)
  record = {
      "prompt": prompt, "batch": batch, "new_tokens": new, "dtype": dtype,
      "compile_s": compile_s, "prefill_s": t_one, "peak_rss_mb": rss_mb,
      "tokens_per_s": batch * steps / (t_all - t_one),
      "steady_tokens_per_s": batch * steps / steady_s,
      "reset_s": reset_s, "fill": decoder.reset_fill,
      "reset_amortised_ms_per_step": 1e3 * reset_s / (decoder.latents - decoder.reset_fill),
  }
  record.update(bytes_per_token(module, params, prompt, new, batch, decoder.reset_fill,
                                jnp.dtype(dtype).itemsize))
  record["read_bandwidth_gbs"] = machine.read_bandwidth_gbs(repeats=10)
  record["bound_tokens_per_s"] = record["read_bandwidth_gbs"] * 1e9 / record["bytes_per_token"]
  record["fraction_of_bound"] = record["steady_tokens_per_s"] / record["bound_tokens_per_s"]
  if dtype != "float32":
    record["max_abs_logit_diff_vs_f32"] = _logit_diff(prompt, new, params, full, lengths)
  return record


def _time_reset(decoder: CachedDecoder, params, inputs, lengths, repeats: int) -> float:
  """Seconds to reset every example's window once (the decode loop does it per example)."""
  cache, logits = jax.jit(decoder.prefill)(params, inputs, jnp.asarray(lengths))
  full = jnp.ones(lengths.shape, bool)
  reset = jax.jit(lambda p, c, lg: decoder.reset_full(p, c.replace(position=c.position + 1),
                                                      lg, full))
  jax.block_until_ready(reset(params, cache, logits))
  return _best(lambda: reset(params, cache, logits), repeats)


def _logit_diff(prompt: int, new: int, params, buffers, lengths) -> float:
  """Largest |logit| difference of the first predicted token: this dtype vs f32."""
  outs = []
  for dtype in ("float32", str(jax.tree_util.tree_leaves(params)[0].dtype)):
    decoder = CachedDecoder(make_module(dtype, prompt + new + 16), buffers[0].shape[1])
    p = jax.tree_util.tree_map(lambda x, d=dtype: x.astype(d), params)
    outs.append(jax.jit(decoder.prefill)(p, buffers[0], jnp.asarray(lengths))[1])
  return float(jnp.max(jnp.abs(outs[0] - outs[1])))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", default="3072,16384")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--new", type=int, default=256)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child: "prompt,batch"
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.case:
    prompt, batch = map(int, args.case.split(","))
    print(json.dumps(run_case(prompt, batch, args.new, args.dtype, args.repeats)))
    return
  records = []
  for prompt in map(int, args.prompts.split(",")):
    for batch in map(int, args.batches.split(",")):
      cmd = [sys.executable, __file__, f"--case={prompt},{batch}", f"--new={args.new}",
             f"--dtype={args.dtype}", f"--repeats={args.repeats}"]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
      records.append(json.loads(out.strip().splitlines()[-1]))
      _print(records[-1])
  out_path = args.out or RESULTS / f"decode_{args.dtype}.json"
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps({"machine": {"cpu_count": machine.os.cpu_count()},
                                  "runs": records}, indent=2) + "\n")
  print(f"wrote {out_path}")


def _print(r: dict) -> None:
  print(f"prompt {r['prompt']:>6} batch {r['batch']} {r['dtype']}: "
        f"{r['steady_tokens_per_s']:.1f} tok/s steady ({r['tokens_per_s']:.1f} incl. 1 reset), "
        f"bound {r['bound_tokens_per_s']:.1f} tok/s at {r['read_bandwidth_gbs']:.1f} GB/s "
        f"x {r['bytes_per_token'] / 1e6:.1f} MB/token -> {r['fraction_of_bound']:.2f} of bound; "
        f"reset {1e3 * r['reset_s']:.0f} ms ({r['reset_amortised_ms_per_step']:.2f} ms/step "
        f"amortised); compile {r['compile_s']:.1f} s, prefill {r['prefill_s']:.1f} s, "
        f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
  main()
