"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny models."""

import os

# The tests' models are tiny, so XLA's LLVM optimisation is most of their CPU time and
# buys nothing: it is off for the suite (and the binaries it starts, which inherit this
# environment); HLO passes, sharding and numerics relations are unchanged. ~30 % less CPU.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_module():
  """Distinct sizes so a transposed axis fails loudly: heads 3, latents 4, length 10."""
  from perceiver_ar_t5x.perceiver_ar import PerceiverAR
  return PerceiverAR(vocab_size=13, num_latents=4, embed_dim=12, num_heads=3, head_dim=8,
                     mlp_dim=20, num_layers=3, max_length=32)


@pytest.fixture
def repo_root() -> pathlib.Path:
  return REPO


def binary_env() -> dict[str, str]:
  """Environment for subprocess runs of the binaries (8 fake devices, CPU only)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env
