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
  .venv/bin/python benchmarks/decode.py --compare-torch --prompts 3072 --batches 1 \
      --out benchmarks/results/decode_compare_torch.json   # + krasserm perceiver-io peer

--compare-torch also runs krasserm's cached generation (perceiver-io 0.11.0, HF
`generate(num_latents=1024, use_cache=True)`, greedy) on the same config in its own
child process, when perceiver-io is installed (never a dependency: see
ENVIRONMENT.md), and reports its tokens/s after its first token and ours / theirs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
  return machine.best_seconds(fn, repeats, warmup=False)


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
  # Steady = whole run - prefill - the separately timed reset; when the run is so short
  # that this is not positive, the split is meaningless and reported as NaN.
  steady_s = t_all - t_one - reset_s
  steady_s = steady_s if steady_s > 0 else float("nan")
  record = {
      "prompt": prompt, "batch": batch, "new_tokens": new, "dtype": dtype,
      "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
      "compile_s": compile_s, "prefill_s": t_one, "peak_rss_mb": rss_mb,
      "tokens_per_s": batch * steps / (t_all - t_one) if t_all > t_one else float("nan"),
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


PEER_APPROXIMATIONS = (
    "krasserm perceiver-io 0.11.0 CausalLanguageModel via HF generate(num_latents=1024, "
    "use_cache=True), greedy, eos disabled, eval mode (dropout off), torch f32 on all cores",
    "same vocab 256, width 512, 8 heads x 64 channels, 1 cross-attention + 5 latent "
    "self-attention layers, 1024 latents, max_seq_len = prompt + new",
    "MLP: theirs plain GELU 512->2048->512 (widening 4); ours gated GELU mlp_dim 1365, "
    "the same ~2.1M parameters per layer",
    "positions: theirs learned absolute embedding + rotary on half of each head's channels "
    "in the cross-attention and first self-attention layer; ours rotary on half of each "
    "head's channels in every layer, no absolute embedding",
    "window: theirs slides (1024 latents every step once full, prefix grows by one); ours "
    "resets each example to `fill` latents, so its latent caches average (fill + 1024) / 2",
    "norms/output: theirs LayerNorm, no final norm, tied embedding + bias; ours RMSNorm, "
    "final RMSNorm, untied output head (256 x 512 more parameters)",
)


def torch_peer_available() -> bool:
  return all(importlib.util.find_spec(m) for m in ("torch", "perceiver", "transformers"))


def _torch_generate(model, tokens, new: int):
  import torch
  with torch.inference_mode():
    return model.generate(input_ids=tokens, num_latents=1024, max_new_tokens=new,
                          min_new_tokens=new, use_cache=True, do_sample=False,
                          pad_token_id=0, eos_token_id=None)


def run_torch_case(prompt: int, batch: int, new: int, repeats: int) -> dict:
  """krasserm's cached generation on the same config, in this (child) process."""
  import perceiver
  import torch
  from perceiver.model.text import clm
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  config = clm.CausalLanguageModelConfig(
      vocab_size=256, max_seq_len=prompt + new, max_latents=1024, num_channels=512,
      num_heads=8, num_self_attention_layers=5, self_attention_widening_factor=4,
      cross_attention_widening_factor=4, cross_attention_dropout=0.0,
      post_attention_dropout=0.0, residual_dropout=0.0)
  hf_config = clm.PerceiverCausalLanguageModelConfig(config)
  hf_config.is_decoder = True
  model = clm.PerceiverCausalLanguageModel(hf_config).eval()
  prompts = np.random.default_rng(0).integers(1, 256, (batch, prompt))
  tokens = torch.from_numpy(prompts).long()
  out = _torch_generate(model, tokens, new)  # warm-up; also checks the length
  assert out.shape == (batch, prompt + new), out.shape
  t_one = min(_wall(lambda: _torch_generate(model, tokens, 1)) for _ in range(repeats))
  t_all = min(_wall(lambda: _torch_generate(model, tokens, new)) for _ in range(repeats))
  return {
      "impl": f"krasserm perceiver-io {getattr(perceiver, '__version__', '0.11.0')}",
      "torch": torch.__version__, "threads": torch.get_num_threads(),
      "params": sum(p.numel() for p in model.parameters()),
      "prompt": prompt, "batch": batch, "new_tokens": new, "dtype": "float32",
      "prefill_s": t_one, "tokens_per_s": batch * (new - 1) / (t_all - t_one),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "approximations": list(PEER_APPROXIMATIONS),
  }


def _wall(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


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
    run = run_case if args.case else run_torch_case
    extra = (args.dtype,) if args.case else ()
    print(json.dumps(run(prompt, batch, args.new, *extra, repeats=args.repeats)))
    return
  compare = args.compare_torch and torch_peer_available()
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
  out_path.write_text(json.dumps({"machine": {"cpu_count": machine.os.cpu_count()},
                                  "runs": records}, indent=2) + "\n")
  print(f"wrote {out_path}")


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
        f"{r['steady_tokens_per_s']:.1f} tok/s steady ({r['tokens_per_s']:.1f} incl. 1 reset), "
        f"bound {r['bound_tokens_per_s']:.1f} tok/s at {r['read_bandwidth_gbs']:.1f} GB/s "
        f"x {r['bytes_per_token'] / 1e6:.1f} MB/token -> {r['fraction_of_bound']:.2f} of bound; "
        f"reset {1e3 * r['reset_s']:.0f} ms ({r['reset_amortised_ms_per_step']:.2f} ms/step "
        f"amortised); compile {r['compile_s']:.1f} s, prefill {r['prefill_s']:.1f} s, "
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
