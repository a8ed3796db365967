"""Whole-split eval speed: scored tokens/s vs. a training forward pass at the same shapes.

Whole-split evaluation (perceiver_ar_t5x/whole_split.py) packs windows of many documents
into fixed [batch, context] rows and runs one compiled function over them, so scoring a
split should cost about one forward pass per window. This measures, in the same process:
  * eval: `whole_split.Scorer` over synthetic byte documents of mixed lengths (one far
    longer than the context, some shorter than the latents), stride = num_latents, after
    one untimed call that compiles; scored tokens/s (loss-weighted tokens of the split),
    host row building and the final fetch included;
  * forward: the jitted eval loss (`model.loss_fn`, no dropout, no gradient) on random
    [batch, context] rows, i.e. what training runs forward; tokens/s counted as the
    batch x num_latents positions it scores, the same unit as the eval figure.
With stride = num_latents every window scores at most num_latents tokens, so the ratio
eval/forward is the fraction of latent rows that carry a scored token (short documents
and document ends fill fewer) times the host's row-building overhead. The two alternate
for --repeats rounds and the best round of each counts (the machine's load drifts).

  .venv/bin/python benchmarks/eval_throughput.py                 # ~2-4 min on 2 CPU cores
  .venv/bin/python benchmarks/eval_throughput.py --context 2048 --latents 512 --tokens 200000

Prints the figures and writes benchmarks/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from perceiver_ar_t5x import checkpoints, training, whole_split  # noqa: E402
from perceiver_ar_t5x import partitioning as pt  # noqa: E402
from perceiver_ar_t5x.documents import Document  # noqa: E402
from perceiver_ar_t5x.models import CroppingMethod, PerceiverARModel  # noqa: E402
from perceiver_ar_t5x.perceiver_ar import PerceiverAR  # noqa: E402


def make_model(args: argparse.Namespace) -> PerceiverARModel:
  module = PerceiverAR(vocab_size=259, num_latents=args.latents, embed_dim=args.width,
                       num_heads=args.width // 64, head_dim=64, mlp_dim=args.width * 2,
                       num_layers=args.layers, max_length=args.context)
  return PerceiverARModel(module=module, cropping=CroppingMethod.NONE)


def make_documents(total: int, context: int, latents: int, seed: int = 0) -> list[Document]:
  """Mixed lengths: one document of half the tokens, the rest from latents/4 to 2*context."""
  rng = np.random.default_rng(seed)
  lengths = [total // 2]
  while sum(lengths) < total:
    lengths.append(int(rng.integers(max(latents // 4, 1), 2 * context)))
  return [Document(rng.integers(3, 259, n).astype(np.int32), np.ones(n, np.float32))
          for n in lengths]


def eval_runner(model, part, params, docs, args):
  """(one timed pass -> seconds, info): whole-split scoring; the first call compiles."""
  scorer = whole_split.Scorer(model=model, part=part, docs=docs, context=args.context,
                              batch_size=args.batch, stride=args.stride or args.latents)
  t0 = time.perf_counter()
  sums = scorer(params)  # compile + first pass
  info = {"scored_tokens": float(sums["weight_sum"]), "windows": len(scorer.windows),
          "first_call_s": time.perf_counter() - t0,
          "batches": -(-len(scorer.windows) // args.batch)}

  def once() -> float:
    t0 = time.perf_counter()
    scorer(params)  # returns host numpy: waits for the device
    return time.perf_counter() - t0

  return once, info


def forward_runner(model, part, params, args, batches: int):
  """(one timed pass -> seconds, info): `batches` jitted eval-loss forwards of [batch, context]."""
  rng = np.random.default_rng(1)
  step = training.make_eval_step(model, part)
  tokens = rng.integers(3, 259, (args.batch, args.context)).astype(np.int32)
  batch = {"decoder_target_tokens": tokens,
           "decoder_input_tokens": np.pad(tokens[:, :-1], [(0, 0), (1, 0)]),
           "decoder_loss_weights": np.ones(tokens.shape, np.float32)}
  jax.block_until_ready(step(params, batch))  # compile

  def once() -> float:
    t0 = time.perf_counter()
    jax.block_until_ready([step(params, batch) for _ in range(batches)])
    return time.perf_counter() - t0

  return once, {"batches": batches, "scored_positions": batches * args.batch * args.latents,
                "input_tokens": batches * args.batch * args.context}


def interleaved(eval_once, forward_once, rounds: int) -> tuple[list[float], list[float]]:
  """Alternates the two (the machine's load drifts); every round's seconds of each."""
  evals, forwards = [], []
  for _ in range(rounds):
    evals.append(eval_once())
    forwards.append(forward_once())
  return evals, forwards


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--context", type=int, default=1024)
  parser.add_argument("--latents", type=int, default=256)
  parser.add_argument("--stride", type=int, default=None, help="default: --latents")
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=40000, help="tokens in the split")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=REPO / "benchmarks" / "results" / "eval_throughput.json")
  args = parser.parse_args()
  model = make_model(args)
  part = checkpoints.params_partitioning(model, args.context, pt.PartitioningConfig())
  params = jax.device_put(model.init(jax.random.key(0), args.context),
                          part.state_sharding.params)
  docs = make_documents(args.tokens, args.context, args.latents)
  eval_once, evaluation = eval_runner(model, part, params, docs, args)
  forward_once, forward = forward_runner(model, part, params, args, evaluation["batches"])
  eval_s, forward_s = interleaved(eval_once, forward_once, args.repeats)
  evaluation.update(round_seconds=eval_s, seconds=min(eval_s),
                    tokens_per_s=evaluation["scored_tokens"] / min(eval_s))
  forward.update(round_seconds=forward_s, seconds=min(forward_s),
                 tokens_per_s=forward["scored_positions"] / min(forward_s),
                 input_tokens_per_s=forward["input_tokens"] / min(forward_s))
  record = {"config": vars(args) | {"out": str(args.out)}, "documents": len(docs),
            "eval": evaluation, "forward": forward,
            "eval_over_forward": evaluation["tokens_per_s"] / forward["tokens_per_s"],
            "machine": {"platform": platform.platform(), "devices": jax.device_count(),
                        "backend": jax.default_backend()}}
  print(f"whole-split eval: {evaluation['scored_tokens']:.0f} tokens of {len(docs)} documents "
        f"in {evaluation['windows']} windows, {evaluation['seconds']:.2f} s, "
        f"{evaluation['tokens_per_s']:.0f} scored tokens/s")
  print(f"training forward: {forward['batches']} batches of {args.batch}x{args.context}, "
        f"{forward['seconds']:.2f} s, {forward['tokens_per_s']:.0f} latent positions/s "
        f"({forward['input_tokens_per_s']:.0f} input tokens/s)")
  print(f"eval / forward: {record['eval_over_forward']:.2f}")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
