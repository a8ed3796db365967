"""Training throughput of Perceiver AR on this host, against the machine's own limits.

Model (issue 8): vocab 256, width 512, 8 heads x 64, 6 layers (1 cross-attention +
5 latent self-attention), 1024 latents, gated-GELU MLP 1365 wide (3 x 512 x 1365 =
the FLOPs and params of a plain 4x MLP), AdamW, no dropout. Each case runs in its own
subprocess so its peak RSS (VmHWM) is its own; the f32/bf16 matmul peak is measured
in this process (benchmarks/machine.py) before and after the cases, and the best
(the larger) peak is used for MFU.

MFU counts the matmul FLOPs of the model as both implementations compute it
(dense attention scores, no credit for causal masking), x3 for forward + backward,
against the peak of the case's own dtype (bf16 cases: the bf16 matmul peak). Our
latent self-attention skips key blocks that are wholly masked, so it does less
work than this count; the count stays the same for both implementations.

Both dtypes run by default: bfloat16 = bf16 operands with f32 accumulation in every
matmul of both passes (layers/matmul.py), f32 params and optimizer. The torch peer
runs in f32 (lucidrains 0.0.10 fails under torch.autocast(bfloat16): its mask fill
value -finfo(f32).max overflows bf16).

  .venv/bin/python benchmarks/train_throughput.py                 # 4096, 16384, 131072
  .venv/bin/python benchmarks/train_throughput.py --compare-torch # + lucidrains peer
  .venv/bin/python benchmarks/train_throughput.py --compare-torch --cases 4096:2,16384:1 \
      --repeats 3   # three interleaved rounds: the torch peer's speed swings between runs
  .venv/bin/python benchmarks/train_throughput.py --cases 4096:2 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import machine  # noqa: E402

VOCAB, WIDTH, HEADS, HEAD_DIM, MLP, LAYERS, LATENTS = 256, 512, 8, 64, 1365, 6, 1024
DEFAULT_CASES = "4096:2,16384:1,131072:1"
LONG = 32768  # from this context on: one timed step, no torch peer


def train_flops(context: int, batch: int) -> float:
  """Matmul FLOPs of one training step (forward x 3)."""
  n, d, inner = LATENTS, WIDTH, HEADS * HEAD_DIM
  mlp = 2 * n * 3 * d * MLP
  layer0 = 2 * context * d * 2 * inner + 2 * n * d * 2 * inner + 4 * n * context * inner + mlp
  latent = 2 * n * d * 4 * inner + 4 * n * n * inner + mlp
  head = 2 * n * d * VOCAB
  return 3.0 * batch * (layer0 + (LAYERS - 1) * latent + head)


def _peak_rss_mib() -> float:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def _jax_case(context: int, batch: int, dtype: str, steps: int, kernel: str, remat: str,
              scan: bool) -> dict[str, Any]:
  """Builds the model + AdamW step, compiles, times `steps` steps (runs in a child)."""
  import jax
  import jax.numpy as jnp

  from perceiver_ar_t5x import models, optimizers, perceiver_ar
  from perceiver_ar_t5x.layers.attention import AttentionKernel

  module = perceiver_ar.PerceiverAR(
      vocab_size=VOCAB, num_latents=LATENTS, embed_dim=WIDTH, num_heads=HEADS,
      head_dim=HEAD_DIM, mlp_dim=MLP, num_layers=LAYERS, max_length=context, dtype=dtype,
      attention_kernel=AttentionKernel[kernel], attention_chunk_size=2048,
      remat_policy=perceiver_ar.RematPolicy[remat], scan_layers=scan)
  model = models.PerceiverARModel(module=module, z_loss=0.0,
                                  cropping=models.CroppingMethod.NONE)
  opt, _ = optimizers.make_optimizer(optimizers.OptimizerConfig(grad_clip_norm=None), 1000)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, context), 1, VOCAB)
  data = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
          "decoder_loss_weights": jnp.ones_like(tokens)}

  def step(params, opt_state, data, rng):
    (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, data, rng)
    updates, opt_state = opt.update(grads, opt_state, params)
    return jax.tree_util.tree_map(jnp.add, params, updates), opt_state, loss

  params = jax.jit(lambda r: model.init(r, LATENTS + 1))(jax.random.PRNGKey(0))
  opt_state = opt.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, data, jax.random.PRNGKey(2)).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(steps + 1):  # the first run is a warm-up
    start = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, data, jax.random.PRNGKey(i))
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
  return {"compile_s": compile_s, "step_s": statistics.median(times[1:]),
          "step_times_s": times[1:], "loss": float(loss)}


def _torch_case(context: int, batch: int, steps: int) -> dict[str, Any]:
  """lucidrains perceiver-ar-pytorch 0.0.10 on the identical config (runs in a child)."""
  import torch
  from perceiver_ar_pytorch import PerceiverAR

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  model = PerceiverAR(num_tokens=VOCAB, dim=WIDTH, depth=LAYERS - 1, heads=HEADS,
                      dim_head=HEAD_DIM, ff_mult=4, max_seq_len=context,
                      cross_attn_seq_len=context - LATENTS)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tokens = torch.randint(1, VOCAB, (batch, context))
  times = []
  for _ in range(steps + 1):
    start = time.perf_counter()
    loss = model(tokens, labels=tokens)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
  return {"compile_s": 0.0, "step_s": statistics.median(times[1:]), "step_times_s": times[1:],
          "loss": float(loss)}


def _child(spec: dict[str, Any]) -> None:
  if spec["impl"] == "torch":
    result = _torch_case(spec["context"], spec["batch"], spec["steps"])
  else:
    result = _jax_case(spec["context"], spec["batch"], spec["dtype"], spec["steps"],
                       spec["kernel"], spec["remat"], spec["scan"])
  result["peak_rss_mib"] = _peak_rss_mib()
  print("RESULT " + json.dumps(result), flush=True)


def run_case(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  """Runs one case in a fresh interpreter; its own peak RSS comes back with the timings."""
  cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**spec, "error": f"timeout after {timeout_s:.0f} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
    return {**spec, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
  result = {**spec, **json.loads(lines[-1][len("RESULT "):])}
  tokens = spec["context"] * spec["batch"]
  result["tokens_per_s"] = tokens / result["step_s"]
  result["model_tflop_per_step"] = train_flops(spec["context"], spec["batch"]) / 1e12
  return result


def run_rounds(specs: list[dict[str, Any]], repeats: int, timeout_s: float
               ) -> list[dict[str, Any]]:
  """Runs every case `repeats` times, interleaved (round by round, so that drift in the
  machine's speed hits the peer and us alike); each case reports its median round."""
  rounds = [[run_case(spec, timeout_s) for spec in specs] for _ in range(repeats)]
  results = []
  for runs in zip(*rounds):
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r["step_s"])
    if not good:
      results.append(runs[0])
      continue
    result = dict(good[(len(good) - 1) // 2])  # the median round (the lower one if even)
    result["rounds_step_s"] = [r["step_s"] for r in runs if "error" not in r]
    results.append(result)
  return results


def _specs(args: argparse.Namespace) -> list[dict[str, Any]]:
  specs = []
  for case in args.cases.split(","):
    context, batch = (int(x) for x in case.split(":"))
    long = context >= LONG
    for dtype in args.dtypes.split(","):
      specs.append({"impl": "jax", "context": context, "batch": batch, "dtype": dtype,
                    "steps": 1 if long else args.steps,
                    "kernel": args.kernel or "CHUNKED",
                    "remat": args.remat or "NONE", "scan": args.scan})
    if args.compare_torch and not long:
      specs.append({"impl": "torch", "context": context, "batch": batch, "dtype": "float32",
                    "steps": args.steps})
  return specs


def _report(results: list[dict[str, Any]], peaks: dict[str, float]) -> None:
  print(f"{'impl':6} {'dtype':9} {'context':>7} {'batch':>5} {'tok/s':>8} {'MFU':>5} "
        f"{'step s':>7} {'compile s':>9} {'RSS GiB':>7}  kernel/remat")
  for r in results:
    if "error" in r:
      print(f"{r['impl']:6} {r['dtype']:9} {r['context']:>7} {r['batch']:>5}  {r['error']}")
      continue
    r["mfu"] = r["model_tflop_per_step"] * 1e3 / r["step_s"] / peaks[r["dtype"]]
    torch_peer = [t for t in results if t["impl"] == "torch" and "error" not in t
                  and t["context"] == r["context"] and t["batch"] == r["batch"]]
    if r["impl"] == "jax" and torch_peer:
      r["speedup_vs_torch"] = r["tokens_per_s"] / torch_peer[0]["tokens_per_s"]
    extra = f"{r.get('kernel', '')}/{r.get('remat', '')}"
    if "speedup_vs_torch" in r:
      extra += f"  {r['speedup_vs_torch']:.2f}x torch"
    print(f"{r['impl']:6} {r['dtype']:9} {r['context']:>7} {r['batch']:>5} "
          f"{r['tokens_per_s']:>8.0f} {r['mfu']:>5.2f} {r['step_s']:>7.2f} "
          f"{r['compile_s']:>9.1f} {r['peak_rss_mib'] / 1024:>7.2f}  {extra}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=DEFAULT_CASES, help="context:batch,...")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="activation dtypes, comma-separated")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
  parser.add_argument("--kernel", choices=["PLAIN", "CHUNKED"], default=None,
                      help="attention kernel (default: CHUNKED, the faster one here)")
  parser.add_argument("--remat", choices=["NONE", "FULL", "DOTS", "DOTS_NO_BATCH"],
                      default=None, help="remat policy (default: NONE)")
  parser.add_argument("--scan", action="store_true", help="nn.scan over the latent layers")
  parser.add_argument("--compare-torch", action="store_true",
                      help="also run lucidrains perceiver-ar-pytorch (if installed)")
  parser.add_argument("--repeats", type=int, default=1,
                      help="rounds over all cases, interleaved; each case reports its median")
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
  parser.add_argument("--out", type=pathlib.Path,
                      default=machine.RESULTS_DIR / "train_throughput.json")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return _child(json.loads(args.child))

  dtypes = set(args.dtypes.split(",")) | {"float32"}
  before = {d: machine.matmul_peak_gflops(d) for d in dtypes}
  results = run_rounds(_specs(args), args.repeats, args.timeout)
  after = {d: machine.matmul_peak_gflops(d) for d in dtypes}
  peaks = {d: max(before[d], after[d]) for d in dtypes}
  print("matmul peak GFLOP/s (before, after): "
        + ", ".join(f"{d} {before[d]:.0f}, {after[d]:.0f}" for d in sorted(dtypes)))
  _report(results, peaks)
  record = {"command": " ".join(sys.argv), "matmul_peak_gflops": peaks,
            "matmul_peak_gflops_before_after": {"before": before, "after": after},
            "cpu_count": os.cpu_count(), "results": results}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
