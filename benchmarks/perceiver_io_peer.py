"""Hugging Face Perceiver IO training steps in torch on CPU: the side-by-side peer of
benchmarks/perceiver_io_long.py.

The model runs under a python that has torch and transformers (4.30 was checked); the
jax benchmark imports only `run` from here (stdlib), which starts this file as a child:

  /tmp/krefenv/bin/python benchmarks/perceiver_io_peer.py '<spec json>'

The spec gives the sizes (`config`: PerceiverConfig fields), the head (`mlm`:
PerceiverForMaskedLM, the paper's byte MLM with one output query per input byte;
`classify`: PerceiverForSequenceClassification, one output query), one length and its
repeats; the child prints `PEAK {json}` (torch's own f32 matmul peak) and `RESULT {json}`.
One child per length, started right after our cases at that length, so that both sides
see the same load on a shared machine. Each step is a full forward + backward +
torch.optim.Adam update (f32, all cores); its time is the minimum over the repeats after
one warm-up step, as on our side.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any


def _peak_rss_mib() -> float:
  """VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def run(python: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  """Runs one spec under `python` in a child; its RESULT and PEAK, or an `error`."""
  base = {"head": spec["head"], "length": spec["length"]}
  if not pathlib.Path(python).exists():
    return {**base, "error": f"{python} not found"}
  try:
    proc = subprocess.run([python, __file__, json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**base, "error": f"timeout after {timeout_s:.0f} s"}
  record = dict(base)
  for line in proc.stdout.splitlines():
    tag, _, body = line.partition(" ")
    if tag in ("PEAK", "RESULT"):
      record.update(json.loads(body))
  if "step_s" not in record:
    record["error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
  return record


def _model(head: str, config: dict[str, Any], length: int):
  """The HF model for `head` at `length` positions (the MLM decoder needs one per byte)."""
  from transformers import PerceiverConfig, PerceiverForMaskedLM, PerceiverForSequenceClassification
  cfg = PerceiverConfig(**config, max_position_embeddings=length, attention_probs_dropout_prob=0.0)
  if head == "mlm":
    return PerceiverForMaskedLM(cfg)
  return PerceiverForSequenceClassification(cfg)


def _batch(head: str, config: dict[str, Any], length: int, mask_rate: float):
  """(input ids, labels) like the jax side's: random bytes, `mask_rate` of them [MASK]ed."""
  import torch
  gen = torch.Generator().manual_seed(0)
  vocab = config["vocab_size"]
  tokens = torch.randint(3, vocab - 1, (1, length), generator=gen)
  if head != "mlm":
    return tokens, torch.zeros((1,), dtype=torch.long)
  masked = torch.rand((1, length), generator=gen) < mask_rate
  inputs = torch.where(masked, torch.full_like(tokens, vocab - 1), tokens)
  return inputs, torch.where(masked, tokens, torch.full_like(tokens, -100))


def run_length(head: str, config: dict[str, Any], length: int, repeats: int,
               mask_rate: float) -> dict[str, Any]:
  """Warm-up step, then the best of `repeats` timed steps at one input length."""
  import torch
  torch.manual_seed(0)
  model = _model(head, config, length).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  inputs, labels = _batch(head, config, length, mask_rate)
  times, loss = [], float("nan")
  for _ in range(repeats + 1):
    start = time.perf_counter()
    out = model(inputs=inputs, attention_mask=torch.ones_like(inputs), labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    loss = float(out.loss.detach())
  step_s = min(times[1:])
  return {"head": head, "length": length, "step_s": step_s, "step_times_s": times[1:],
          "warmup_s": times[0], "tokens_per_s": length / step_s, "loss": loss,
          "loss_finite": math.isfinite(loss),
          "params": sum(p.numel() for p in model.parameters()),
          "peak_rss_mib": _peak_rss_mib()}


def matmul_peak_gflops(size: int = 2048, chain: int = 4, repeats: int = 2) -> float:
  """torch's own f32 matmul peak here (best of `repeats` chains of `chain` products): the
  peer's fraction of peak is quoted against its own BLAS as well as against XLA's."""
  import torch
  a = torch.randn(size, size)
  b = torch.randn(size, size) / size**0.5
  best = float("inf")
  for _ in range(repeats + 1):
    start = time.perf_counter()
    x = a
    for _ in range(chain):
      x = x @ b
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 * chain / best / 1e9


def main() -> None:
  import torch
  import transformers
  spec = json.loads(sys.argv[1])
  torch.set_num_threads(os.cpu_count() or 1)
  print("PEAK " + json.dumps({"torch_matmul_peak_gflops_float32": matmul_peak_gflops()}),
        flush=True)
  result = run_length(spec["head"], spec["config"], spec["length"], spec["repeats"],
                      spec["mask_rate"])
  result.update(torch=torch.__version__, transformers=transformers.__version__,
                threads=torch.get_num_threads(), dtype="float32")
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
