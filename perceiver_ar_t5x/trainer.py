"""The training loop: data -> jitted steps -> summaries, evals and checkpoints.

Resumes from the newest good checkpoint in MODEL_DIR: params, optimizer state
and step are restored, the data iterator skips the batches already consumed,
and every step's rng is fold_in(seed, step), so a resumed run continues the
uninterrupted run's trajectory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from perceiver_ar_t5x import checkpoints, datasets, decoding, evaluation, optimizers
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x import training
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.models import PerceiverARModel, summarize_metrics


class TrainingError(RuntimeError):
  """A run that cannot continue (NaN loss, bad configuration); one-line message."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long, how often (mirrors t5x.train's total_steps / eval_period / stats_period)."""

  total_steps: int
  eval_period: int = 1000
  eval_steps: int | None = 20
  stats_period: int = 100
  random_seed: int = 0


def check_lengths(model: PerceiverARModel, lengths: dict[str, int]) -> int:
  """Validates TASK_FEATURE_LENGTHS against the model; returns the targets length."""
  length = int(lengths.get("targets", 0))
  n = model.num_latents
  if length < n:
    raise TrainingError(f"TASK_FEATURE_LENGTHS targets={length} is shorter than num_latents={n}; "
                        f"use a length >= {n} or fewer latents")
  module = model.module
  if module.position_encoding == PositionEncoding.LEARNED and length > module.max_length:
    raise TrainingError(f"targets length {length} exceeds the learned position table "
                        f"(max_length={module.max_length})")
  return length


def check_model_dir(model_dir: str) -> None:
  try:
    os.makedirs(model_dir, exist_ok=True)
    probe = os.path.join(model_dir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f"MODEL_DIR {model_dir!r} is not writable: {e.strerror}") from None


def write_model_info(model_dir: str, state: training.TrainState,
                     part: training.Partitioned) -> None:
  """model-info.txt: parameter count, then each param's shape, logical axes and sharding."""
  shapes = jax.tree_util.tree_flatten_with_path(state.params)[0]
  logical = dict(zip([jax.tree_util.keystr(p) for p, _ in shapes],
                     jax.tree.leaves(part.params_logical,
                                     is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))
  lines = [f"total_params: {training.param_count(state.params):,}",
           f"mesh: {dict(part.mesh.shape)}", ""]
  for path, leaf in shapes:
    key = jax.tree_util.keystr(path)
    lines.append(f"{key}: shape={tuple(leaf.shape)} logical={tuple(logical[key])} "
                 f"sharding={tuple(leaf.sharding.spec)}")
  with open(os.path.join(model_dir, "model-info.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _checkpoint_meta(model: PerceiverARModel, step: int) -> dict[str, Any]:
  m = model.module
  return {"step": step, "vocab_size": m.vocab_size, "num_latents": m.num_latents,
          "embed_dim": m.embed_dim, "num_layers": m.num_layers}


def restore_or_init(model: PerceiverARModel, state: training.TrainState,
                    ckpt: checkpoints.Checkpointer) -> tuple[int, training.TrainState]:
  """Restores the newest good checkpoint into `state`'s shardings (or keeps `state`)."""
  if ckpt.steps():
    try:
      meta = ckpt.read_meta(ckpt.steps()[-1])
    except Exception:  # noqa: BLE001 - a corrupt newest checkpoint is handled below
      meta = {}
    if meta.get("vocab_size", model.module.vocab_size) != model.module.vocab_size:
      raise TrainingError(f"checkpoint in {ckpt.directory} has vocab_size {meta['vocab_size']} "
                          f"but the config has {model.module.vocab_size}")
  restored = ckpt.restore_latest(training.abstract_state(state))
  if restored is None:
    if ckpt.steps():
      raise TrainingError(f"no checkpoint in {ckpt.directory} could be restored")
    return 0, state
  step, restored_state, _ = restored
  logging.info("Restored checkpoint for step %d from %s", step, ckpt.directory)
  return step, restored_state


@dataclasses.dataclass
class TrainResult:
  state: training.TrainState
  metrics: dict[str, float]
  sample: dict[str, str]


def sample_from_split(model: PerceiverARModel, params: Any, cfg: datasets.DatasetConfig,
                      seed: int = 0) -> dict[str, str]:
  """Greedy-continues the first example's prefix; returns prompt/target/prediction text."""
  ds = datasets.get_dataset(dataclasses.replace(cfg, batch_size=1, shuffle=False), repeat=False)
  targets = next(datasets.numpy_batches(ds))["decoder_target_tokens"]  # [1, length]
  length = targets.shape[1]
  prompt_len = max(length - model.num_latents, 1)
  tokens, _ = decoding.sample(model, params, targets[:, :prompt_len], np.array([prompt_len]),
                              length, jax.random.key(seed))
  vocab = datasets.get_task(cfg.mixture_or_task_name).output_features["targets"].vocabulary

  def text(ids: np.ndarray) -> str:
    ids = [int(i) for i in ids if i != 0]
    decoded = vocab.decode(ids)
    return decoded if isinstance(decoded, str) else " ".join(map(str, decoded))

  return {"prompt": text(targets[0, :prompt_len]), "target": text(targets[0, prompt_len:]),
          "prediction": text(tokens[0, prompt_len:])}


class _StopFlag:
  """Set by SIGTERM/SIGINT: the loop finishes the current step, saves and exits."""

  def __init__(self) -> None:
    self.signum: int | None = None

  def install(self) -> None:
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signum = signum


def train(*, model: PerceiverARModel, optimizer_cfg: optimizers.OptimizerConfig,
          train_dataset_cfg: datasets.DatasetConfig,
          train_eval_dataset_cfg: datasets.DatasetConfig | None, model_dir: str,
          loop_cfg: LoopConfig, checkpoint_cfg: checkpoints.CheckpointConfig,
          partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig(),
          handle_signals: bool = True, sample_at_end: bool = True) -> TrainResult:
  """Trains `model`; returns the final state, final eval metrics and a sample."""
  length = check_lengths(model, dict(train_dataset_cfg.task_feature_lengths))
  check_model_dir(model_dir)
  stop = _StopFlag()
  if handle_signals:
    stop.install()
  optimizer, schedule = optimizers.make_optimizer(optimizer_cfg, loop_cfg.total_steps)
  mesh = pt.make_mesh(partitioning_cfg.num_partitions)
  rules = pt.logical_axis_rules(partitioning_cfg)
  seed_rng = jax.random.key(loop_cfg.random_seed)
  state, part = training.create_state(model, optimizer, jax.random.fold_in(seed_rng, 0),
                                      length, mesh, rules)
  logging.info("Mesh %s; %d parameters", dict(mesh.shape), training.param_count(state.params))
  write_model_info(model_dir, state, part)
  ckpt = checkpoints.Checkpointer(model_dir, checkpoint_cfg)
  start, state = restore_or_init(model, state, ckpt)
  train_step = training.make_train_step(model, optimizer, schedule, part)
  eval_step = training.make_eval_step(model, part)
  step_rng = jax.random.fold_in(seed_rng, 1)

  ds = datasets.get_dataset(train_dataset_cfg, shard_index=jax.process_index(),
                            num_shards=jax.process_count())
  batches = datasets.numpy_batches(ds.skip(start))
  writer = metric_writers.create_default_writer(os.path.join(model_dir, "train"),
                                                just_logging=jax.process_index() > 0)
  eval_writer = metric_writers.create_default_writer(os.path.join(model_dir, "eval"),
                                                     just_logging=jax.process_index() > 0)

  def run_eval(step: int) -> dict[str, float]:
    if train_eval_dataset_cfg is None:
      return {}
    eval_ds = datasets.get_dataset(train_eval_dataset_cfg, repeat=False,
                                   shard_index=jax.process_index(),
                                   num_shards=jax.process_count())
    summary = evaluation.evaluate(eval_step, state.params, datasets.numpy_batches(eval_ds),
                                  loop_cfg.eval_steps)
    eval_writer.write_scalars(step, summary)
    eval_writer.flush()
    logging.info("eval step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return summary

  sums: dict[str, float] = {}
  t0, last_step, last_time = time.time(), start, time.time()
  step = start
  final: dict[str, float] = {}
  while step < loop_cfg.total_steps:
    batch = next(batches)
    state, metrics = train_step(state, batch, step_rng)
    step += 1
    metrics = jax.device_get(metrics)
    if not math.isfinite(float(metrics["loss"])):
      ckpt.wait()
      good = ckpt.steps()
      raise TrainingError(f"loss is {float(metrics['loss'])} at step {step}; stopping. Last good "
                          f"checkpoint: {good[-1] if good else 'none'} in {ckpt.directory}")
    for key in ("loss_sum", "nll_sum", "z_loss_sum", "correct_sum", "weight_sum"):
      sums[key] = sums.get(key, 0.0) + float(metrics[key])
    if step % loop_cfg.stats_period == 0 or step == loop_cfg.total_steps:
      now = time.time()
      rate = (step - last_step) / max(now - last_time, 1e-9)
      summary = {f"train/{k}": v for k, v in summarize_metrics(sums).items()}
      summary.update({"train/learning_rate": float(metrics["learning_rate"]),
                      "train/grad_norm": float(metrics["grad_norm"]),
                      "train/steps_per_second": rate,
                      "train/tokens_per_second": rate * train_dataset_cfg.batch_size * length})
      writer.write_scalars(step, summary)
      logging.info("step %d/%d loss=%.4f accuracy=%.4f %.2f steps/s ETA %s", step,
                   loop_cfg.total_steps, summary["train/loss"], summary["train/accuracy"], rate,
                   _format_eta((loop_cfg.total_steps - step) / max(rate, 1e-9)))
      sums, last_step, last_time = {}, step, now
    if loop_cfg.eval_period and step % loop_cfg.eval_period == 0 and step < loop_cfg.total_steps:
      run_eval(step)
    if step % checkpoint_cfg.period == 0:
      ckpt.save(step, state, _checkpoint_meta(model, step))
    if stop.signum is not None:
      ckpt.save(step, state, _checkpoint_meta(model, step), force=True)
      ckpt.close()
      logging.info("Received signal %d: saved checkpoint at step %d, exiting.", stop.signum, step)
      return TrainResult(state, {}, {})
  if step not in ckpt.steps():
    ckpt.save(step, state, _checkpoint_meta(model, step), force=True)
  final = run_eval(step)
  sample = {}
  if sample_at_end and train_eval_dataset_cfg is not None:
    sample = sample_from_split(model, state.params, train_eval_dataset_cfg)
  ckpt.close()
  writer.close()
  eval_writer.close()
  logging.info("Training finished at step %d in %.1fs", step, time.time() - t0)
  return TrainResult(state, final, sample)

