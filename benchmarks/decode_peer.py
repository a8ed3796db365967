"""krasserm perceiver-io's cached generation on decode.py's config: the side-by-side peer.

perceiver-io 0.11.0 (HF `generate(num_latents=1024, use_cache=True)`, greedy) is never a
dependency (see ENVIRONMENT.md); benchmarks/decode.py --compare-torch runs
`run_torch_case` in a child process when `available()`.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import time

import numpy as np

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


def available() -> bool:
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
