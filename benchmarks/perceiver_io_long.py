"""Perceiver IO training over long byte inputs with the CHUNKED encoder kernel, against
this machine's limits and Hugging Face's torch model.

Model (HF PerceiverConfig names): byte vocab 260 ([MASK] = 259), d_model 64, 256 latents
x 512 channels, 1 cross-attention head, 2 self-attends of 8 heads, widening 1, batch 1.
Two shapes, because Perceiver IO's cost moves with its output queries:
  mlm:      PerceiverForMaskedLM (hf_io.architecture): one output query per input byte,
            decoder 8 heads x qk 256, tied logits [1, length, 260]; at long lengths the
            decoder and the logits dominate, and the decoder's cross-attention is PLAIN
            (its keys are the 256 latents, its scores [8, length, 256]).
  classify: PerceiverForSequenceClassification: 1 output query, 2 classes; the encoder's
            cross-attention over the bytes is what grows with the length.
A step is jit(value_and_grad(PerceiverIOModel.loss_fn) + optax.adam), params donated;
its time is the minimum over repeats after one warm-up call. Memory is the compiled
step's `memory_analysis()` (XLA's temp buffers + arguments + outputs, nothing run), for
PLAIN vs CHUNKED, also at lengths only compiled (MEMORY_ONLY). bf16 runs at DEFAULT_BF16
only: at 4096 bytes it was no faster than f32 on this 2-core AVX2 host in a trial.

Model FLOPs are counted analytically (every projection, scores, p.v, MLPs, decoder and
head; x3 for forward + backward), the same count for both kernels and for the peer:
CHUNKED's recomputation in the backward pass is not credited. The fraction of peak is
against the matmul peak of the case's dtype measured in this process (machine.py,
before and after the cases, the larger is used). The peer (perceiver_io_peer.py, HF
transformers in torch f32) runs in a child under PEER_PYTHON right after our cases at
the same head and length, so that both see the same load on a shared machine.

  .venv/bin/python benchmarks/perceiver_io_long.py
  .venv/bin/python benchmarks/perceiver_io_long.py --lengths 4096:2 --no-peer --bf16-lengths ''
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import machine, perceiver_io_peer  # noqa: E402
from perceiver_ar_t5x import io_models  # noqa: E402
from perceiver_ar_t5x.convert import hf_io  # noqa: E402
from perceiver_ar_t5x.layers.attention import AttentionKernel  # noqa: E402
from perceiver_ar_t5x.perceiver_io import IO_BLOCK, Head, PerceiverIO, TokenInput  # noqa: E402

CONFIG = dict(num_latents=256, d_latents=512, d_model=64, num_blocks=1,
              num_self_attends_per_block=2, num_self_attention_heads=8,
              num_cross_attention_heads=1, vocab_size=260, num_labels=2)
MASK_RATE, CHUNK = 0.15, 2048
DEFAULT_LENGTHS = "4096:3,16384:2,65536:2"  # length:timed repeats after one warm-up
LONG_MLM_REPEATS = {65536: 1}  # MLM steps at 65536 bytes take ~10 s here (ours and HF's)
DEFAULT_BF16 = 65536  # CHUNKED bf16 (bf16 activations, f32 params) timed at this length only
MEMORY_ONLY = (262144,)  # compiled for memory_analysis only (classify shape)
PEER_PYTHON = "/tmp/krefenv/bin/python"
PEER_EXTRA = {4096: 3, 16384: 2}  # torch's steps swing up to 15x under others' load here


def build(head: str, length: int, kernel: str, dtype: str) -> io_models.PerceiverIOModel:
  """Our model for `head` at `length` bytes, the HF peer's architecture."""
  c, vocab = CONFIG["d_model"], CONFIG["vocab_size"]
  tokens = TokenInput(vocab, c, length, dtype=dtype)
  common = dict(dtype=dtype, attention_kernel=AttentionKernel[kernel],
                attention_chunk_size=CHUNK)
  if head == "mlm":
    cfg = {**hf_io.CONFIG_DEFAULTS, **{k: v for k, v in CONFIG.items() if k != "num_labels"},
           "max_position_embeddings": length}
    module = hf_io.architecture(cfg).clone(input_adapter=tokens, **common)
    return io_models.PerceiverIOModel(module=module, mask_id=vocab - 1)
  module = PerceiverIO(
      input_adapter=tokens, num_latents=CONFIG["num_latents"], latent_dim=CONFIG["d_latents"],
      num_outputs=1, decoder_dim=CONFIG["d_latents"], head=Head.CLASSIFY,
      num_classes=CONFIG["num_labels"], num_blocks=CONFIG["num_blocks"],
      num_self_attends_per_block=CONFIG["num_self_attends_per_block"],
      num_self_attend_heads=CONFIG["num_self_attention_heads"],
      num_cross_attend_heads=CONFIG["num_cross_attention_heads"], num_decoder_heads=1,
      decoder_query_residual=True, block=IO_BLOCK, **common)
  return io_models.PerceiverIOModel(module=module)


def make_batch(head: str, length: int) -> dict[str, jax.Array]:
  """Random bytes; MLM: MASK_RATE of them [MASK]ed and the loss taken there only."""
  vocab = CONFIG["vocab_size"]
  key_t, key_m = jax.random.split(jax.random.PRNGKey(1))
  tokens = jax.random.randint(key_t, (1, length), 3, vocab - 1)
  if head != "mlm":
    return {"encoder_input_tokens": tokens, "encoder_target_tokens": jnp.zeros((1, 1), jnp.int32),
            "encoder_loss_weights": jnp.ones((1, 1), jnp.int32)}
  masked = jax.random.uniform(key_m, (1, length)) < MASK_RATE
  return {"encoder_input_tokens": jnp.where(masked, vocab - 1, tokens),
          "encoder_target_tokens": tokens, "encoder_loss_weights": masked.astype(jnp.int32)}


def _block_flops(q_rows: int, kv_rows: int, width: int, kv_in: int, qk: int, v: int) -> int:
  """Forward matmul FLOPs of one block: q/k/v/o projections, scores, p.v, widening-1 MLP."""
  proj = 2 * q_rows * width * qk + 2 * kv_rows * kv_in * (qk + v) + 2 * q_rows * v * width
  return proj + 2 * q_rows * kv_rows * (qk + v) + 4 * q_rows * width * width


def train_flops(head: str, length: int) -> dict[str, float]:
  """Model FLOPs of one training step (forward x 3), split by part of the model."""
  n, d, c = CONFIG["num_latents"], CONFIG["d_latents"], CONFIG["d_model"]
  parts = {"encoder": _block_flops(n, length, d, c, c, c),
           "latents": CONFIG["num_blocks"] * CONFIG["num_self_attends_per_block"]
           * _block_flops(n, n, d, d, d, d)}
  if head == "mlm":
    parts["decoder"] = _block_flops(length, n, c, d, hf_io.DECODER_QK, c)
    parts["head"] = 2 * length * c * CONFIG["vocab_size"]
  else:
    parts["decoder"] = _block_flops(1, n, d, d, d, d)
    parts["head"] = 2 * d * CONFIG["num_labels"]
  parts = {k: 3.0 * v for k, v in parts.items()}
  return {**parts, "total": sum(parts.values())}


_INIT_CACHE: dict[tuple[str, int], Any] = {}


def compile_step(spec: dict[str, Any]) -> tuple[Any, tuple, float]:
  """The compiled train step and its (params, opt_state, batch) for `spec`."""
  model = build(spec["head"], spec["length"], spec["kernel"], spec["dtype"])
  opt = optax.adam(1e-4)
  batch = make_batch(spec["head"], spec["length"])

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = (spec["head"], spec["length"])
  if key not in _INIT_CACHE:  # the same params for every kernel and dtype: init compiles once
    _INIT_CACHE.clear()
    _INIT_CACHE[key] = nn.meta.unbox(jax.jit(lambda r: model.init(r, spec["length"]))(
        jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map(jnp.copy, _INIT_CACHE[key])  # the step donates its copy
  opt_state = opt.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  return compiled, (params, opt_state, batch), time.perf_counter() - start


def memory(compiled: Any) -> dict[str, int]:
  """XLA's buffer sizes for the compiled step (bytes); peak = temp + arguments + outputs
  - aliased (donated params and optimizer state are reused for the outputs)."""
  mem = compiled.memory_analysis()
  out = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
         ("temp", "argument", "output", "alias", "generated_code")}
  out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
  return out


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
  """Compiles, reads memory, runs one warm-up and `repeats` timed steps."""
  compiled, (params, opt_state, batch), compile_s = compile_step(spec)
  result = {**spec, "compile_s": compile_s, "memory_bytes": memory(compiled)}
  if not spec["repeats"]:
    return result
  times, losses = [], []
  for _ in range(spec["repeats"] + 1):
    start = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, batch)
    losses.append(float(loss))  # blocks
    times.append(time.perf_counter() - start)
  flops = train_flops(spec["head"], spec["length"])
  result.update(step_s=min(times[1:]), step_times_s=times[1:], warmup_s=times[0],
                losses=losses, loss_finite=all(map(math.isfinite, losses)),
                tokens_per_s=spec["length"] / min(times[1:]),
                model_gflop_per_step=flops["total"] / 1e9,
                model_gflop_by_part={k: v / 1e9 for k, v in flops.items() if k != "total"})
  return result


def run_all(args: argparse.Namespace, log: Any) -> tuple[list[dict], list[dict]]:
  """Our cases, each length's peer right after them (same load), then MEMORY_ONLY."""
  results, peers = [], []
  for head in ("mlm", "classify"):
    for length, repeats in args.lengths:
      if head == "mlm":
        repeats = min(repeats, LONG_MLM_REPEATS.get(length, repeats))
      bf16 = [("CHUNKED", "bfloat16")] if length in args.bf16_lengths else []
      for kernel, dtype in [("CHUNKED", "float32"), ("PLAIN", "float32")] + bf16:
        results.append(run_case(dict(head=head, length=length, kernel=kernel, dtype=dtype,
                                     repeats=repeats)))
        log(results[-1])
      if not args.no_peer:
        peers.append(perceiver_io_peer.run(PEER_PYTHON, dict(  # + PEER_EXTRA: noisier
            head=head, length=length, repeats=repeats + PEER_EXTRA.get(length, 0),
            config=CONFIG, mask_rate=MASK_RATE), args.peer_timeout))
        log(peers[-1])
  for length in MEMORY_ONLY:
    for kernel in ("CHUNKED", "PLAIN"):
      results.append(run_case(dict(head="classify", length=length, kernel=kernel,
                                   dtype="float32", repeats=0)))
      log(results[-1])
  return results, peers


def memory_slopes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Temp bytes added per added input byte between consecutive lengths, per kernel:
  linear memory shows as a flat slope; PLAIN's is ~latents x heads x 4 bytes x copies."""
  slopes = []
  for head in ("mlm", "classify"):
    for kernel in ("CHUNKED", "PLAIN"):
      rows = sorted((r["length"], r["memory_bytes"]["temp"]) for r in results
                    if (r["head"], r["kernel"], r["dtype"]) == (head, kernel, "float32"))
      slopes += [dict(head=head, kernel=kernel, lengths=[a[0], b[0]],
                      temp_bytes_per_input_byte=(b[1] - a[1]) / (b[0] - a[0]))
                 for a, b in zip(rows, rows[1:])]
  return slopes


def _finish(results: list[dict[str, Any]], peers: list[dict[str, Any]],
            peaks: dict[str, float]) -> None:
  """Fractions of peak and peer ratios into the records, then the table."""
  print(f"{'head':8} {'length':>6} {'kernel':7} {'dtype':8} {'step s':>7} {'tok/s':>8} "
        f"{'GFLOP':>6} {'peak%':>5} {'temp MiB':>8} {'peak MiB':>8} {'loss':>6}  HF torch")
  for r in results:
    mem = r["memory_bytes"]
    row = f"{r['head']:8} {r['length']:>6} {r['kernel']:7} {r['dtype']:8} "
    if "step_s" not in r:
      print(row + f"{'(compiled only)':>37} {mem['temp'] / 2**20:>8.0f} "
            f"{mem['peak'] / 2**20:>8.0f}")
      continue
    r["fraction_of_peak"] = r["model_gflop_per_step"] / r["step_s"] / peaks[r["dtype"]]
    peer = [p for p in peers if (p["head"], p["length"]) == (r["head"], r["length"])
            and "step_s" in p]
    note = ""
    if peer:
      r["ratio_step_time_ours_over_peer"] = r["step_s"] / peer[0]["step_s"]
      note = f"{peer[0]['step_s']:.3f} s, ours/HF time {r['ratio_step_time_ours_over_peer']:.2f}"
    print(row + f"{r['step_s']:>7.3f} {r['tokens_per_s']:>8.0f} "
          f"{r['model_gflop_per_step']:>6.1f} {100 * r['fraction_of_peak']:>5.1f} "
          f"{mem['temp'] / 2**20:>8.0f} {mem['peak'] / 2**20:>8.0f} {r['losses'][0]:>6.3f}  "
          + note)
  for p in peers:
    if "error" in p:
      print(f"HF torch {p['head']} {p['length']}: {p['error']}")
      continue
    gflop = train_flops(p["head"], p["length"])["total"] / 1e9
    p["fraction_of_xla_peak"] = gflop / p["step_s"] / peaks["float32"]
    p["fraction_of_torch_peak"] = gflop / p["step_s"] / p["torch_matmul_peak_gflops_float32"]
    print(f"HF torch {p['head']:8} {p['length']:>6} f32 {p['step_s']:.3f} s, "
          f"{p['tokens_per_s']:.0f} tok/s, {100 * p['fraction_of_xla_peak']:.1f}% of XLA's "
          f"peak, {100 * p['fraction_of_torch_peak']:.1f}% of torch's "
          f"({p['torch_matmul_peak_gflops_float32']:.0f} GFLOP/s), RSS "
          f"{p['peak_rss_mib']:.0f} MiB")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="length:timed repeats,...")
  parser.add_argument("--bf16-lengths", type=lambda t: [int(x) for x in t.split(",") if x],
                      default=[DEFAULT_BF16],
                      help="lengths that also run CHUNKED bfloat16 ('' for none)")
  parser.add_argument("--no-peer", action="store_true", help="skip HF transformers (torch)")
  parser.add_argument("--peer-timeout", type=float, default=120.0, help="seconds per length")
  parser.add_argument("--out", type=pathlib.Path,
                      default=machine.RESULTS_DIR / "perceiver_io_long.json")
  load_start = os.getloadavg()  # other agents share this machine: the load is recorded
  args = parser.parse_args()
  args.lengths = [tuple(int(x) for x in c.split(":")) for c in args.lengths.split(",")]
  dtypes = ["float32"] + (["bfloat16"] if args.bf16_lengths else [])
  start = time.perf_counter()
  log = lambda r: print(f"  {r['head']} {r['length']} {r.get('kernel', 'HF')} "  # noqa: E731
                        f"{r.get('dtype', '')} at {time.perf_counter() - start:.0f} s", flush=True)
  before = {d: machine.matmul_peak_gflops(d, repeats=2) for d in dtypes}
  results, peers = run_all(args, log)
  after = {d: machine.matmul_peak_gflops(d, repeats=2) for d in dtypes}
  peaks = {d: max(before[d], after[d]) for d in dtypes}
  print("XLA matmul peak GFLOP/s (before, after): "
        + ", ".join(f"{d} {before[d]:.1f}, {after[d]:.1f}" for d in dtypes))
  _finish(results, peers, peaks)
  slopes = memory_slopes(results)
  for m in slopes:
    print(f"temp memory {m['head']:8} {m['kernel']:7} {m['lengths'][0]:>6}->"
          f"{m['lengths'][1]:<6}: {m['temp_bytes_per_input_byte']:.0f} bytes per input byte")
  record = {"command": " ".join(sys.argv), "config": CONFIG, "chunk_size": CHUNK,
            "mask_rate": MASK_RATE, "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
            "matmul_peak_gflops": peaks,
            "matmul_peak_gflops_before_after": {"before": before, "after": after},
            "wall_s": time.perf_counter() - start, "results": results, "peer": peers,
            "loadavg_1_5_15_start_end": [load_start, os.getloadavg()],
            "temp_memory_slopes": slopes}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
