"""Measures this machine's limits, so benchmarks can report the fraction they reach.

Two numbers, both on all cores the process may use and in the same process as the
benchmark that quotes them:
  * `matmul_peak_gflops`: best-of-N square matmul throughput through jax/XLA (the same
    kernels the model's einsums use), counting 2*n^3 FLOPs per product.
  * `read_bandwidth_gbs`: streaming read bandwidth, from a reduction over a large
    array that does not fit in cache (bytes read / second).

Run `.venv/bin/python benchmarks/machine.py` to print both and write
benchmarks/results/machine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def best_seconds(fn: Callable[[], jax.Array], repeats: int, *, warmup: bool = True) -> float:
  """Best wall time of `fn()` (blocked), after one warm-up call that compiles (if `warmup`)."""
  if warmup:
    jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_gflops(dtype: str = "float32", *, size: int = 2048, chain: int = 4,
                       repeats: int = 5) -> float:
  """Peak matmul GFLOP/s for `dtype` on this host (best of `repeats`).

  A chain of `chain` dependent [size, size] products runs inside one jit call so
  dispatch overhead is amortised; the best run is reported (a peak, not an average).
  """
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
  b = (jax.random.normal(key_b, (size, size), jnp.float32) / size**0.5).astype(dtype)

  @jax.jit
  def products(x: jax.Array, y: jax.Array) -> jax.Array:
    for _ in range(chain):
      x = jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype)
    return x

  seconds = best_seconds(lambda: products(a, b), repeats)
  return 2.0 * size**3 * chain / seconds / 1e9


def read_bandwidth_gbs(nbytes: int = 1 << 30, *, repeats: int = 5) -> float:
  """Streaming read bandwidth in GB/s (1e9 bytes/s) over an f32 array of `nbytes`."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  seconds = best_seconds(lambda: total(x), repeats)
  return x.size * 4 / seconds / 1e9


def measure(*, bandwidth_bytes: int = 1 << 30) -> dict[str, object]:
  """All limits as one JSON-able record."""
  return {
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "matmul_peak_gflops_float32": matmul_peak_gflops("float32"),
      "matmul_peak_gflops_bfloat16": matmul_peak_gflops("bfloat16"),
      "read_bandwidth_gbs": read_bandwidth_gbs(bandwidth_bytes),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bandwidth_bytes", type=int, default=1 << 30)
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR / "machine.json")
  args = parser.parse_args()
  record = measure(bandwidth_bytes=args.bandwidth_bytes)
  print(json.dumps(record, indent=2))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
  main()
