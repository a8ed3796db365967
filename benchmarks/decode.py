"""Cached decoding speed against this machine's memory-bandwidth bound.

Batch-1 decoding is bound by memory bandwidth, not FLOPs: every new token reads
each weight plus the layer-0 cache (every context position) and the latent caches
(the current window). This script decodes 256 new tokens after 3072- and
16384-token prompts at batch 1 and 8 on the training benchmark's model (vocab 256,
width 512, 8 heads x 64, 6 layers = 1 cross-attention + 5 latent, 1024 latents,
gated-GELU mlp_dim 1365, f32), measures the read bandwidth in the same run
(benchmarks/machine.py: a 1 GiB reduction on all cores) and reports

  bytes/token = (weights + batch * valid layer-0 and latent cache entries) / batch,
                at their mean over the steps timed (`bytes_read_per_token`: what the
                step actually reads, whole bucketed buffers);
  bound       = bandwidth / bytes/token;  fraction = steady tokens/s / bound.

Steady rate is timed directly in the one compiled loop: runs of 1, split + 1 and
256 tokens, where steps 1..split hold every reset of the run (the first step after
a long prompt resets), so (t(256) - t(split + 1)) covers only reset-free steps.
The reset's cost is what the middle run takes beyond prefill and its steps. Each
case runs in its own process, so peak RSS is that case's.

  .venv/bin/python benchmarks/decode.py            # all four cases, f32
  .venv/bin/python benchmarks/decode.py --dtype bfloat16 --prompts 3072 --batches 1
  .venv/bin/python benchmarks/decode.py --compare-torch --prompts 3072 --batches 1 \
      --out benchmarks/results/decode_compare_torch.json   # + krasserm perceiver-io peer

--compare-torch also runs krasserm's cached generation (perceiver-io 0.11.0, HF
`generate(num_latents=1024, use_cache=True)`, greedy) in a child process when it is
installed (never a dependency: ENVIRONMENT.md) and reports ours / theirs.
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
import decode_peer  # noqa: E402  (benchmarks/decode_peer.py)
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


def case_decoder(dtype: str, prompt: int, new: int) -> CachedDecoder:
  """The decoder a case times: cache length bucketed as decoding.prepare buckets it."""
  length = decoding.bucket_length(max(prompt + new, prompt + 1))
  return CachedDecoder(make_module(dtype, prompt + new + 16), length)


def window_sizes(prompt: int, steps: int, latents: int, fill: int) -> tuple[list[int], list[int]]:
  """Latent-window size at each step 1..steps and the steps that reset (decode_cache.py's rule).

  Prefill leaves the window at positions max(prompt + 1 - latents, 0)..prompt; step i
  predicts position prompt + i and resets when the window would exceed `latents`.
  """
  start, sizes, resets = max(prompt + 1 - latents, 0), [], []
  for i in range(1, steps + 1):
    p = prompt + i
    if p - start >= latents:
      start = p + 1 - fill
      resets.append(i)
    sizes.append(p - start + 1)
  return sizes, resets


def bytes_per_token(module: PerceiverAR, params, prompt: int, steps: range, batch: int,
                    fill: int, itemsize: int, length: int) -> dict[str, float]:
  """What each token of `steps` must read (valid cache entries), and what the step reads.

  Must: all weights but the embedding table (one row per example), each example's
  layer-0 keys/values up to its position and latent keys/values of its window, at
  their mean over `steps`. Read: the step reads the whole bucketed layer-0 buffer
  (`length`) and every latent slot.
  """
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  table = module.vocab_size * module.embed_dim  # the embedding table: one row is read
  weights = (n_params - table + batch * module.embed_dim) * itemsize
  kv = 2 * module.num_heads * module.head_dim * itemsize  # one position's key + value
  sizes = window_sizes(prompt, steps.stop - 1, module.num_latents, fill)[0]
  window = float(np.mean([sizes[i - 1] for i in steps]))
  layer0 = (prompt + 1 + float(np.mean(list(steps)))) * kv
  latents = (module.num_layers - 1) * window * kv
  read = (length + (module.num_layers - 1) * min(module.num_latents, length)) * kv
  return {"weights_mb": weights / 1e6, "layer0_cache_mb": layer0 / 1e6,
          "latent_cache_mb": latents / 1e6, "mean_window": window,
          "bytes_per_token": (weights + batch * (layer0 + latents)) / batch,
          "bytes_read_per_token": (weights + batch * read) / batch}


def _best(fn, repeats: int) -> float:
  return machine.best_seconds(fn, repeats, warmup=False)


def steady_split(prompt: int, new: int, latents: int, fill: int) -> int:
  """Last step before the steady stretch: the run's last reset (+ 1), so steps after it
  contain no reset; raises if fewer than 64 steps would remain."""
  resets = window_sizes(prompt, new - 1, latents, fill)[1]
  split = resets[-1] + 1 if resets else 1
  if new - 1 - split < 64:
    raise ValueError(f"only {new - 1 - split} reset-free steps after step {split}: "
                     f"use more --new tokens")
  return split


def run_case(prompt: int, batch: int, new: int, dtype: str, repeats: int) -> dict:
  """One case, in this process: compile, time, RSS, then the bandwidth bound.

  One compiled loop, three runs: 1 token (prefill + first token), split + 1 tokens
  (+ steps 1..split, which hold every reset of the run) and `new` tokens. Steady
  rate = the steps after `split` over the difference of the last two: no reset,
  no prefill, same compiled loop.
  """
  decoder = case_decoder(dtype, prompt, new)
  module = decoder.module
  params = PerceiverARModel(module).init(jax.random.key(0), 64)
  if dtype != "float32":
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  prompts = np.random.default_rng(0).integers(1, 256, (batch, prompt)).astype(np.int32)
  lengths = np.full((batch,), prompt)
  full = decoding.prepare(prompts, lengths, new, length=decoder.length)
  split = steady_split(prompt, new, decoder.latents, decoder.reset_fill)
  rng = jax.random.key(1)
  start = time.perf_counter()
  run = decoding.compiled_decode(decoder, decoding.SamplingConfig()).lower(
      params, *full, rng).compile()
  compile_s = time.perf_counter() - start
  times = {}
  for tokens in (1, split + 1, new):
    buffers = decoding.prepare(prompts, lengths, tokens, length=full[0].shape[1])
    times[tokens] = _best(lambda b=buffers: run(params, *b, rng), repeats)
  t_one, t_split, t_all = times[1], times[split + 1], times[new]
  steady_s = (t_all - t_split) / (new - 1 - split)  # seconds per step, no reset in it
  record = {
      "prompt": prompt, "batch": batch, "new_tokens": new, "dtype": dtype,
      "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
      "compile_s": compile_s, "prefill_s": t_one,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "steady_steps": f"{split + 1}..{new - 1}", "steady_ms_per_step": 1e3 * steady_s,
      "steady_tokens_per_s": batch / steady_s,
      "tokens_per_s": batch * (new - 1) / (t_all - t_one),  # every step, resets included
      "resets_in_run": len(window_sizes(prompt, new - 1, decoder.latents,
                                        decoder.reset_fill)[1]),
      "reset_s": (t_split - t_one) - split * steady_s, "fill": decoder.reset_fill,
  }
  record["reset_amortised_ms_per_step"] = 1e3 * record["reset_s"] / (
      decoder.latents - decoder.reset_fill)
  record.update(bytes_per_token(module, params, prompt, range(split + 1, new), batch,
                                decoder.reset_fill, jnp.dtype(dtype).itemsize, decoder.length))
  record["read_bandwidth_gbs"] = machine.read_bandwidth_gbs(repeats=10)
  record["bound_tokens_per_s"] = record["read_bandwidth_gbs"] * 1e9 / record["bytes_per_token"]
  record["fraction_of_bound"] = record["steady_tokens_per_s"] / record["bound_tokens_per_s"]
  if dtype != "float32":
    record["max_abs_logit_diff_vs_f32"] = _logit_diff(prompt, new, params, full, lengths)
  return record


def _logit_diff(prompt: int, new: int, params, buffers, lengths) -> float:
  """Largest |logit| difference of the first predicted token: this dtype vs f32."""
  outs = []
  for dtype in ("float32", str(jax.tree_util.tree_leaves(params)[0].dtype)):
    decoder = case_decoder(dtype, prompt, new)
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
  parser.add_argument("--compare-torch", action="store_true",
                      help="also run krasserm perceiver-io's cached generation (if installed)")
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child: "prompt,batch"
  parser.add_argument("--torch-case", default=None, help=argparse.SUPPRESS)  # child, peer
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.case or args.torch_case:
    prompt, batch = map(int, (args.case or args.torch_case).split(","))
    run = run_case if args.case else decode_peer.run_torch_case
    extra = (args.dtype,) if args.case else ()
    print(json.dumps(run(prompt, batch, args.new, *extra, repeats=args.repeats)))
    return
  for prompt in map(int, args.prompts.split(",")):
    decoder = case_decoder(args.dtype, prompt, args.new)
    try:
      steady_split(prompt, args.new, decoder.latents, decoder.reset_fill)
    except ValueError as err:
      parser.error(f"--new {args.new} after a {prompt}-token prompt: {err}")
  compare = args.compare_torch and decode_peer.available()
  if args.compare_torch and not compare:
    print("--compare-torch: perceiver-io/torch/transformers not installed; skipping the peer")
  records = []
  for prompt in map(int, args.prompts.split(",")):
    for batch in map(int, args.batches.split(",")):
      records.append(_child(args, f"--case={prompt},{batch}"))
      if compare:
        _add_peer(records[-1], _child(args, f"--torch-case={prompt},{batch}"))
      _print(records[-1])
  out_path = args.out or RESULTS / f"decode_{args.dtype}.json"
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out = {"machine": {"cpu_count": machine.os.cpu_count()}, "command": " ".join(sys.argv),
         "runs": records, "batch_ratios": batch_ratios(records)}
  for line in out["batch_ratios"]:
    print(f"prompt {line['prompt']}: batch {line['batch']} / batch 1 steady tok/s = "
          f"{line['measured']:.2f}x (the bandwidth model allows {line['bound']:.2f}x)")
  out_path.write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {out_path}")


def batch_ratios(records: list[dict]) -> list[dict]:
  """Steady tok/s of each larger batch over batch 1 at the same prompt, and the bound's ratio
  at equal bandwidth (bytes/token of batch 1 over that batch's)."""
  ones = {r["prompt"]: r for r in records if r["batch"] == 1}
  return [{"prompt": r["prompt"], "batch": r["batch"],
           "measured": r["steady_tokens_per_s"] / ones[r["prompt"]]["steady_tokens_per_s"],
           "bound": ones[r["prompt"]]["bytes_per_token"] / r["bytes_per_token"]}
          for r in records if r["batch"] > 1 and r["prompt"] in ones]


def _child(args: argparse.Namespace, case: str) -> dict:
  """Runs one case in its own process (its own peak RSS); an error becomes a record."""
  cmd = [sys.executable, __file__, case, f"--new={args.new}", f"--dtype={args.dtype}",
         f"--repeats={args.repeats}"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    if case.startswith("--case"):
      sys.exit(f"decode.py: error: {case} failed:\n{proc.stderr[-2000:]}")
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _add_peer(record: dict, peer: dict) -> None:
  record["torch_peer"] = peer
  if "error" not in peer:
    record["ratio_vs_torch"] = record["tokens_per_s"] / peer["tokens_per_s"]
    record["steady_ratio_vs_torch"] = record["steady_tokens_per_s"] / peer["tokens_per_s"]
    record["torch_fraction_of_our_bound"] = peer["tokens_per_s"] / record["bound_tokens_per_s"]


def _print(r: dict) -> None:
  print(f"prompt {r['prompt']:>6} batch {r['batch']} {r['dtype']}: "
        f"{r['steady_tokens_per_s']:.1f} tok/s steady (steps {r['steady_steps']}, "
        f"{r['steady_ms_per_step']:.2f} ms/step), {r['tokens_per_s']:.1f} incl. "
        f"{r['resets_in_run']} reset; bound {r['bound_tokens_per_s']:.1f} tok/s at "
        f"{r['read_bandwidth_gbs']:.1f} GB/s x {r['bytes_per_token'] / 1e6:.1f} MB/token "
        f"(step reads {r['bytes_read_per_token'] / 1e6:.1f}) -> "
        f"{r['fraction_of_bound']:.2f} of bound; reset {1e3 * r['reset_s']:.0f} ms "
        f"({r['reset_amortised_ms_per_step']:.2f} ms/step amortised); "
        f"compile {r['compile_s']:.1f} s, prefill {r['prefill_s']:.1f} s, "
        f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
  peer = r.get("torch_peer")
  if peer and "error" in peer:
    print(f"  krasserm peer failed: {peer['error']}", flush=True)
  elif peer:
    print(f"  krasserm {peer['impl']} (torch {peer['torch']}, {peer['threads']} threads, "
          f"{peer['params'] / 1e6:.2f}M params vs ours {r['params'] / 1e6:.2f}M): "
          f"{peer['tokens_per_s']:.1f} tok/s after its first token "
          f"(prefill {peer['prefill_s']:.1f} s, peak RSS {peer['peak_rss_mb']:.0f} MB) -> "
          f"ours/theirs {r['ratio_vs_torch']:.2f}x ({r['steady_ratio_vs_torch']:.2f}x steady)",
          flush=True)
    for line in peer["approximations"]:
      print(f"    approximation: {line}", flush=True)


if __name__ == "__main__":
  main()
