"""Inference: prompts (a task split, or a text/jsonl file) -> samples -> jsonl (+ .mid).

Every sample goes through `_sample_batch`, the one call into `decoding.sample`,
so the decoder behind it can change without touching the binaries.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import seqio

from perceiver_ar_t5x import checkpoints, datasets, decoding, fileio, slicing
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.models import PerceiverARModel


class InferenceError(ValueError):
  """A bad prompt file or prompt; one-line message."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: token ids, plus the true continuation when it came from a split."""

  tokens: np.ndarray  # [prompt_length] int32
  targets: np.ndarray | None = None  # [continuation_length] int32


def decode_text(vocab: seqio.Vocabulary, ids: Sequence[int]) -> Any:
  """Ids -> the vocabulary's decoding (str for text vocabularies, a list of ids otherwise)."""
  ids = [int(i) for i in ids if int(i) != 0]
  decoded = vocab.decode(ids)
  return decoded if isinstance(decoded, str) else [int(i) for i in decoded]


def encode_text(vocab: seqio.Vocabulary, value: Any) -> np.ndarray:
  """A prompt (str, or a list of ids) -> ids; pass-through vocabularies read ints from text."""
  if isinstance(value, list):
    return np.asarray(value, np.int32)
  if not isinstance(value, str):
    raise InferenceError(f"a prompt must be a string or a list of ids, got {value!r}")
  if isinstance(vocab, seqio.PassThroughVocabulary):
    try:
      return np.asarray([int(t) for t in value.split()], np.int32)
    except ValueError:
      raise InferenceError(f"this task's vocabulary takes token ids; prompt {value[:40]!r} "
                           f"is not whitespace-separated integers") from None
  return np.asarray(vocab.encode(value), np.int32)


def prompts_from_file(path: str, vocab: seqio.Vocabulary) -> list[Prompt]:
  """A `.jsonl` file ({"inputs": str | [ids]} per line) or a text file (a prompt per line)."""
  if not fileio.gfile.exists(path) or fileio.gfile.isdir(path):
    raise InferenceError(f"prompt file {path!r} does not exist")
  prompts = []
  with fileio.gfile.GFile(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      value: Any = line.rstrip("\n")
      if path.endswith(".jsonl"):
        try:
          value = json.loads(line)["inputs"]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise InferenceError(f"{path}:{number}: expected a JSON object with an 'inputs' "
                               f"field") from None
      prompts.append(Prompt(encode_text(vocab, value)))
  if not prompts:
    raise InferenceError(f"prompt file {path!r} has no prompts")
  return prompts


def prompts_from_split(cfg: datasets.DatasetConfig, prompt_length: int | None,
                       max_examples: int | None, num_latents: int) -> Iterator[Prompt]:
  """Splits each example into a prompt and its reference continuation.

  The prompt is the first `prompt_length` tokens; by default the unweighted
  prefix (a prefix-LM task's `inputs`), or, when every token has loss, all but
  the last `num_latents` tokens.
  """
  one = dataclasses.replace(cfg, batch_size=1, shuffle=False, pack=False)
  for count, batch in enumerate(datasets.numpy_batches(datasets.get_dataset(one, repeat=False))):
    if max_examples is not None and count >= max_examples:
      return
    targets = batch["decoder_target_tokens"][0]  # [length]
    n = int(np.asarray(slicing.sequence_lengths(targets[None]))[0])
    cut = prompt_length
    if cut is None:
      first_loss = int(np.argmax(batch["decoder_loss_weights"][0] > 0))
      cut = first_loss if first_loss > 0 else max(n - num_latents, 1)
    cut = min(cut, n)
    yield Prompt(targets[:cut].astype(np.int32), targets[cut:n].astype(np.int32))


def _sample_batch(model: PerceiverARModel, params: Any, prompts: Sequence[Prompt],
                  max_length: int, rng: jax.Array, cfg: decoding.SamplingConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The one call into the decoder: (tokens [batch, max_length], log-probs [batch, max_length])."""
  lengths = np.asarray([len(p.tokens) for p in prompts], np.int32)
  padded = np.zeros((len(prompts), max(int(lengths.max()), 1)), np.int32)
  for row, p in enumerate(prompts):
    padded[row, :len(p.tokens)] = p.tokens
  return decoding.sample(model, params, padded, lengths, max_length, rng, cfg)


def generate(model: PerceiverARModel, params: Any, prompts: Sequence[Prompt], *,
             max_length: int, batch_size: int, rng: jax.Array,
             cfg: decoding.SamplingConfig = decoding.SamplingConfig()
             ) -> Iterator[tuple[Prompt, np.ndarray, float]]:
  """Yields (prompt, continuation ids, summed log-prob of the continuation) per prompt."""
  for p in prompts:
    if len(p.tokens) >= max_length:
      raise InferenceError(f"a prompt has {len(p.tokens)} tokens; max_length is {max_length} "
                           f"(raise INFER_MAX_LENGTH or shorten the prompt)")
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    tokens, logprobs = _sample_batch(model, params, chunk, max_length,
                                     jax.random.fold_in(rng, start), cfg)
    for row, p in enumerate(chunk):
      cont = tokens[row, len(p.tokens):]
      nonzero = np.nonzero(cont)[0]
      cont = cont[:nonzero[-1] + 1] if len(nonzero) else cont[:0]
      yield p, cont, float(logprobs[row, len(p.tokens):].sum())


def midi_writer(task_name: str, vocab: seqio.Vocabulary) -> Any:
  """A function (ids, path) writing a .mid file, for MIDI tasks; None otherwise."""
  if hasattr(vocab, "decode_to_file"):
    return vocab.decode_to_file
  if "midi" in task_name or "maestro" in task_name:
    from perceiver_ar_t5x.tasks import midi
    return lambda ids, path: midi.events_to_midi(np.asarray(ids), path)
  return None


def write_predictions(path: str, records: Sequence[dict[str, Any]]) -> None:
  """Writes jsonl atomically (a killed run leaves no half file)."""
  fileio.write_atomic(fileio.absolute(path), [json.dumps(r) + "\n" for r in records])


def sample_from_split(model: PerceiverARModel, params: Any, cfg: datasets.DatasetConfig,
                      seed: int = 0) -> dict[str, Any]:
  """Greedy-continues the first example's prefix; returns prompt/target/prediction text."""
  length = datasets.model_length(cfg.task_feature_lengths)
  prompt = next(prompts_from_split(cfg, None, 1, model.num_latents))
  _, cont, _ = next(generate(model, params, [prompt], max_length=length, batch_size=1,
                             rng=jax.random.key(seed)))
  vocab = datasets.get_task(cfg.mixture_or_task_name).output_features["targets"].vocabulary

  def text(ids: np.ndarray) -> str:
    decoded = decode_text(vocab, ids)
    return decoded if isinstance(decoded, str) else " ".join(map(str, decoded))

  return {"prompt": text(prompt.tokens), "target": text(prompt.targets), "prediction": text(cont)}


def infer(*, model: PerceiverARModel, checkpoint_path: str, output_dir: str,
          dataset_cfg: datasets.DatasetConfig, prompt_file: str | None = None,
          prompt_length: int | None = None, max_length: int | None = None,
          max_examples: int | None = 16, seed: int = 0,
          sampling_cfg: decoding.SamplingConfig = decoding.SamplingConfig(),
          partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig()) -> str:
  """Samples continuations and writes `<output_dir>/<source>-<step>.jsonl`; returns its path.

  Prompts come from `prompt_file` when given, else from `dataset_cfg`'s split
  (the first `prompt_length` tokens; default: see prompts_from_split). Each line
  has `inputs`, `prediction`, `score` (summed log-prob), and `targets` for split
  prompts; MIDI tasks also get a `.mid` file per line (`midi` field).
  """
  max_length = max_length or datasets.model_length(dataset_cfg.task_feature_lengths)
  vocab = datasets.get_task(dataset_cfg.mixture_or_task_name).output_features["targets"].vocabulary
  params, step, _ = checkpoints.load_params(model, checkpoint_path, max_length, partitioning_cfg)
  if prompt_file:
    prompts, source = prompts_from_file(prompt_file, vocab), os.path.basename(prompt_file)
    prompts = prompts[:max_examples] if max_examples else prompts
  else:
    prompts = list(prompts_from_split(dataset_cfg, prompt_length, max_examples,
                                      model.num_latents))
    source = f"{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}"
  if not prompts:
    raise InferenceError(f"no prompts from {source}")
  source = source.rsplit(".", 1)[0] if prompt_file else source
  stem = os.path.join(output_dir, f"{source}-{step}")
  to_midi = midi_writer(dataset_cfg.mixture_or_task_name, vocab)
  records = []
  for i, (p, cont, score) in enumerate(generate(
      model, params, prompts, max_length=max_length, batch_size=dataset_cfg.batch_size,
      rng=jax.random.key(seed), cfg=sampling_cfg)):
    record = {"inputs": decode_text(vocab, p.tokens), "prediction": decode_text(vocab, cont),
              "score": score}
    if p.targets is not None:
      record["targets"] = decode_text(vocab, p.targets)
    if to_midi is not None:
      fileio.gfile.makedirs(output_dir)
      fileio.write_via_local(f"{stem}-{i}.mid",
                             functools.partial(to_midi, np.concatenate([p.tokens, cont])))
      record["midi"] = os.path.basename(f"{stem}-{i}.mid")
    records.append(record)
  write_predictions(stem + ".jsonl", records)
  return stem + ".jsonl"
