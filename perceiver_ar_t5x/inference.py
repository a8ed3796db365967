"""Inference: prompts (a task split, or a text/jsonl file) -> samples -> jsonl (+ .mid, .png).

Every sample goes through `_sample_batch`, the one call into `decoding.decode`, so the
decoder behind it can change without touching the binaries. Defaults are per kind of
task (DEFAULTS): a MIDI or text model is judged by a sampled continuation of useful
length, not by greedy decoding, which loops.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import seqio

from perceiver_ar_t5x import checkpoints, datasets, decoding, fileio, io_inference, slicing
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.io_models import PerceiverIOModel
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.models import PerceiverARModel
from perceiver_ar_t5x.tasks import files, midi_outputs


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


class TaskKind(enum.Enum):
  """What a task's samples are, which picks infer's defaults and extra outputs."""
  MIDI = "midi"  # performance events: sampled, ~20 s of music, .mid + piano roll
  TEXT = "text"  # bytes or SentencePiece: sampled, a few hundred bytes
  TOKENS = "tokens"  # anything else (the copy task): greedy up to the model's length


@dataclasses.dataclass(frozen=True)
class TaskDefaults:
  """Defaults a user can judge a model by; None max_new_tokens fills the model's length."""
  max_new_tokens: int | None
  temperature: float
  top_p: float
  stop_at_eos: bool


DEFAULTS = {
    # MAESTRO piano is ~40-100 events/s: 1500 events are ~15-35 s of music.
    TaskKind.MIDI: TaskDefaults(1500, temperature=1.0, top_p=0.95, stop_at_eos=True),
    TaskKind.TEXT: TaskDefaults(400, temperature=1.0, top_p=0.95, stop_at_eos=True),
    TaskKind.TOKENS: TaskDefaults(None, temperature=0.0, top_p=1.0, stop_at_eos=False),
}
SPM_BYTES_PER_TOKEN = 4  # a text task's new-token default is ~400 bytes either way


def task_kind(task_name: str, vocab: seqio.Vocabulary) -> TaskKind:
  if "midi" in task_name or "maestro" in task_name:
    return TaskKind.MIDI
  if isinstance(vocab, (seqio.ByteVocabulary, seqio.SentencePieceVocabulary)):
    return TaskKind.TEXT
  return TaskKind.TOKENS


def resolve_defaults(kind: TaskKind, vocab: seqio.Vocabulary, *, max_new_tokens: int | None,
                     temperature: float | None, top_k: int, top_p: float | None,
                     eos_id: int | None) -> tuple[int | None, decoding.SamplingConfig]:
  """(new tokens, sampling) with the task's default wherever the caller passed None."""
  d = DEFAULTS[kind]
  if max_new_tokens is None and d.max_new_tokens is not None:
    spm = isinstance(vocab, seqio.SentencePieceVocabulary)
    max_new_tokens = d.max_new_tokens // (SPM_BYTES_PER_TOKEN if spm else 1)
  if max_new_tokens is not None and max_new_tokens < 1:
    raise InferenceError(f"INFER_MAX_NEW_TOKENS must be >= 1, got {max_new_tokens}")
  if eos_id is None and d.stop_at_eos:
    eos_id = vocab.eos_id
  return max_new_tokens, decoding.SamplingConfig(
      temperature=d.temperature if temperature is None else temperature, top_k=top_k,
      top_p=d.top_p if top_p is None else top_p, eos_id=eos_id)


def _sample_batch(model: PerceiverARModel, params: Any, prompts: Sequence[Prompt],
                  new_tokens: np.ndarray, rng: jax.Array, cfg: decoding.SamplingConfig
                  ) -> decoding.DecodeResult:
  """The one call into the decoder; tokens [batch, 1, width] = prompt then samples."""
  lengths = np.asarray([len(p.tokens) for p in prompts], np.int32)
  padded = np.zeros((len(prompts), max(int(lengths.max()), 1)), np.int32)
  for row, p in enumerate(prompts):
    padded[row, :len(p.tokens)] = p.tokens
  return decoding.decode(model, params, padded, lengths, new_tokens, rng, cfg)


def generate(model: PerceiverARModel, params: Any, prompts: Sequence[Prompt], *,
             max_new_tokens: int | None, total_length: int, batch_size: int, rng: jax.Array,
             cfg: decoding.SamplingConfig = decoding.SamplingConfig()
             ) -> Iterator[tuple[Prompt, np.ndarray, float]]:
  """Yields (prompt, continuation ids, summed log-prob of the continuation) per prompt.

  Each prompt gets `max_new_tokens` new tokens, or (None) up to `total_length` in all.
  The continuation stops before the first EOS when cfg.eos_id is set.
  """
  new = [max_new_tokens if max_new_tokens is not None else total_length - len(p.tokens)
         for p in prompts]
  module = model.module  # a learned position table has no rows past max_length
  limit = module.max_length if module.position_encoding is PositionEncoding.LEARNED else None
  for p, n in zip(prompts, new, strict=True):
    if n < 1:
      raise InferenceError(f"a prompt has {len(p.tokens)} tokens, no room for new ones in "
                           f"{total_length} (set INFER_MAX_NEW_TOKENS or shorten the prompt)")
    if limit is not None and len(p.tokens) + n > limit:
      raise InferenceError(f"prompt ({len(p.tokens)}) + new tokens ({n}) exceed the {limit} "
                           f"learned positions (lower INFER_MAX_NEW_TOKENS)")
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    out = _sample_batch(model, params, chunk, np.asarray(new[start:start + batch_size]),
                        jax.random.fold_in(rng, start), cfg)
    for row, p in enumerate(chunk):
      end = int(out.lengths[row, 0])
      cont, logprobs = out.tokens[row, 0, len(p.tokens):end], out.log_probs[row, 0]
      score = float(logprobs[len(p.tokens):end].sum())
      if cfg.eos_id is not None and cfg.eos_id in cont.tolist():
        cont = cont[:cont.tolist().index(cfg.eos_id)]
      yield p, cont.astype(np.int32), score


def write_predictions(path: str, records: Sequence[dict[str, Any]]) -> None:
  """Writes jsonl atomically (a killed run leaves no half file)."""
  fileio.write_atomic(fileio.absolute(path), [json.dumps(r) + "\n" for r in records])


def sample_from_split(model: PerceiverARModel | PerceiverIOModel, params: Any,
                      cfg: datasets.DatasetConfig, seed: int = 0) -> dict[str, Any]:
  """Greedy-continues the first example's prefix; returns prompt/target/prediction text
  (a Perceiver IO model: its first example's filled masks or predicted label)."""
  if isinstance(model, PerceiverIOModel):
    return io_inference.sample_from_split(model, params, cfg)
  length = datasets.model_length(cfg.task_feature_lengths)
  prompt = next(prompts_from_split(cfg, None, 1, model.num_latents))
  _, cont, _ = next(generate(model, params, [prompt], max_new_tokens=None, total_length=length,
                             batch_size=1, rng=jax.random.key(seed)))
  vocab = datasets.get_task(cfg.mixture_or_task_name).output_features["targets"].vocabulary

  def text(ids: np.ndarray) -> str:
    decoded = decode_text(vocab, ids)
    return decoded if isinstance(decoded, str) else " ".join(map(str, decoded))

  return {"prompt": text(prompt.tokens), "target": text(prompt.targets), "prediction": text(cont)}


def _prompts(dataset_cfg: datasets.DatasetConfig, vocab: seqio.Vocabulary,
             prompt_file: str | None, prompt_length: int | None, max_examples: int | None,
             num_latents: int) -> tuple[list[Prompt], str]:
  """(prompts, source name for the output file)."""
  if prompt_file:
    prompts = prompts_from_file(prompt_file, vocab)
    prompts = prompts[:max_examples] if max_examples else prompts
    return prompts, os.path.basename(prompt_file).rsplit(".", 1)[0]
  task, split = dataset_cfg.mixture_or_task_name, dataset_cfg.split
  prompts = list(prompts_from_split(dataset_cfg, prompt_length, max_examples, num_latents))
  files.SKIPPED.summarize(task, split)  # a pass that stopped early says what it skipped
  if not prompts:
    raise InferenceError(f"no prompts from {task}-{split}")
  return prompts, f"{task}-{split}"


def infer(*, model: PerceiverARModel | PerceiverIOModel, checkpoint_path: str, output_dir: str,
          dataset_cfg: datasets.DatasetConfig, prompt_file: str | None = None,
          prompt_length: int | None = None, max_new_tokens: int | None = None,
          max_examples: int | None = 16, seed: int = 0, temperature: float | None = None,
          top_k: int = 0, top_p: float | None = None, eos_id: int | None = None,
          partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig()) -> str:
  """Samples continuations and writes `<output_dir>/<source>-<step>.jsonl`; returns its path.

  Prompts come from `prompt_file` when given, else from `dataset_cfg`'s split (the
  first `prompt_length` tokens; default: see prompts_from_split). None for
  max_new_tokens / temperature / top_p / eos_id takes the task's default (DEFAULTS).
  Each line has `inputs` (the prompt), `prediction` (the continuation only), `score`
  (its summed log-prob), `targets` for split prompts; MIDI tasks also get the
  continuation and the prompt as .mid + piano-roll .png (write_sample's fields).
  Every process samples; only process 0 writes (multi-host: the outputs of one).
  """
  if isinstance(model, PerceiverIOModel):  # one pass per batch: fill masks / predict labels
    return io_inference.infer(model=model, checkpoint_path=checkpoint_path,
                              output_dir=output_dir, dataset_cfg=dataset_cfg,
                              max_examples=max_examples, partitioning_cfg=partitioning_cfg)
  task = dataset_cfg.mixture_or_task_name
  vocab = datasets.get_task(task).output_features["targets"].vocabulary
  kind = task_kind(task, vocab)
  max_new_tokens, sampling = resolve_defaults(
      kind, vocab, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_id=eos_id)
  length = datasets.model_length(dataset_cfg.task_feature_lengths)
  params, step, _ = checkpoints.load_params(model, checkpoint_path, length, partitioning_cfg)
  prompts, source = _prompts(dataset_cfg, vocab, prompt_file, prompt_length, max_examples,
                             model.num_latents)
  stem = os.path.join(output_dir, f"{source}-{step}")
  records = []
  for i, (p, cont, score) in enumerate(generate(
      model, params, prompts, max_new_tokens=max_new_tokens, total_length=length,
      batch_size=dataset_cfg.batch_size, rng=jax.random.key(seed), cfg=sampling)):
    record = {"inputs": decode_text(vocab, p.tokens), "prediction": decode_text(vocab, cont),
              "score": score}
    if p.targets is not None:
      record["targets"] = decode_text(vocab, p.targets)
    if kind is TaskKind.MIDI and jax.process_index() == 0:
      fileio.gfile.makedirs(output_dir)
      record.update(midi_outputs.write_sample(f"{stem}-{i}", p.tokens, cont))
    records.append(record)
  if jax.process_index() == 0:
    write_predictions(stem + ".jsonl", records)
  return stem + ".jsonl"
