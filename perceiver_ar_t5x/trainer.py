"""The training loop: data -> jitted steps -> summaries, evals and checkpoints.

Resumes from the newest good checkpoint in MODEL_DIR: params, optimizer state
and step are restored, the data iterator skips the batches already consumed,
and every step's rng is fold_in(seed, step), so a resumed run continues the
uninterrupted run's trajectory bit for bit (tests/test_resume.py kills a run
with SIGKILL and compares MODEL_DIR/train/metrics.jsonl with an uninterrupted
run's). SIGTERM/SIGINT finish the current step, save and return. A non-finite
loss stops the run before anything is saved, so the last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from perceiver_ar_t5x import (
  checkpoints,
  datasets,
  evaluation,
  fileio,
  inference,
  optimizers,
  training,
)
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.metrics_log import MetricsLog, StepStats
from perceiver_ar_t5x.models import PerceiverARModel


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


def check_lengths(model: PerceiverARModel, lengths: Mapping[str, int]) -> int:
  """Validates TASK_FEATURE_LENGTHS against the model; returns the decoder length.

  The decoder length is `targets` (+ `inputs` for prefix-LM tasks).
  """
  if "targets" not in lengths:
    raise TrainingError(f"TASK_FEATURE_LENGTHS needs a 'targets' entry, got {dict(lengths)}")
  length = datasets.model_length(lengths)
  n = model.num_latents
  if length < n:
    raise TrainingError(f"TASK_FEATURE_LENGTHS {dict(lengths)} gives sequences of {length} "
                        f"tokens, fewer than num_latents={n}; use a length >= {n} or fewer latents")
  module = model.module
  if module.position_encoding == PositionEncoding.LEARNED and length > module.max_length:
    raise TrainingError(f"targets length {length} exceeds the learned position table "
                        f"(max_length={module.max_length})")
  return length


def check_model_dir(model_dir: str) -> None:
  """Creates MODEL_DIR (a local path or a URL such as gs://...) and checks it is writable."""
  try:
    fileio.gfile.makedirs(model_dir)
    # a name of its own: every host of a multi-process job probes the same directory
    probe = os.path.join(model_dir, f".write_test-{uuid.uuid4().hex}")
    fileio.write_text(probe, "ok")
    fileio.gfile.remove(probe)
  except fileio.Error as e:
    raise TrainingError(f"MODEL_DIR {model_dir!r} is not writable: {fileio.reason(e)}") from None


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
  fileio.write_text(os.path.join(model_dir, "model-info.txt"), "\n".join(lines) + "\n")


def restore_or_init(model: PerceiverARModel, state: training.TrainState,
                    ckpt: checkpoints.Checkpointer) -> tuple[int, training.TrainState]:
  """Restores the newest good checkpoint into `state`'s shardings (or keeps `state`)."""
  if ckpt.steps():
    newest = ckpt.steps()[-1]
    checkpoints.check_meta(ckpt.try_meta(newest), model, f"{ckpt.directory}/{newest}")
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
  stopped_by_signal: int | None = None


class _StopFlag:
  """Set by SIGTERM/SIGINT: the loop finishes the current step, saves and exits."""

  def __init__(self) -> None:
    self.signum: int | None = None

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is None:
      logging.warning("Received %s: finishing the current step, then saving.",
                      signal.Signals(signum).name)
    self.signum = signum


@dataclasses.dataclass
class _Loop:
  """Everything the step loop touches."""

  model: PerceiverARModel
  loop_cfg: LoopConfig
  period: int
  state: training.TrainState
  ckpt: checkpoints.Checkpointer
  train_step: Callable[..., Any]
  step_rng: jax.Array
  batches: Iterator[dict[str, np.ndarray]]
  run_eval: Callable[[int, Any], dict[str, float]]
  writer: metric_writers.MetricWriter
  log: MetricsLog
  stop: _StopFlag
  tokens_per_step: int

  def save(self, step: int, force: bool = False) -> None:
    if force and step in self.ckpt.steps():
      return
    self.ckpt.save(step, self.state, checkpoints.model_meta(self.model, step), force=force)


def _eval_fn(model: PerceiverARModel, part: training.Partitioned,
             cfg: datasets.DatasetConfig | None, max_batches: int | None,
             writer: metric_writers.MetricWriter) -> Callable[[int, Any], dict[str, float]]:
  """run_eval(step, params): last-latents eval of `cfg`'s split, logged and written."""
  eval_step = training.make_eval_step(model, part)

  def run_eval(step: int, params: Any) -> dict[str, float]:
    if cfg is None:
      return {}
    layout = pt.data_layout(part.mesh)
    ds = datasets.get_dataset(cfg, repeat=False, shard_index=layout.shard_index,
                              num_shards=layout.num_shards)
    rows = cfg.batch_size // layout.num_shards
    batches = (evaluation.pad_batch(b, rows) for b in datasets.numpy_batches(ds))
    summary = evaluation.evaluate(eval_step, params, batches, max_batches)
    writer.write_scalars(step, summary)
    writer.flush()
    logging.info("eval step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return summary

  return run_eval


def _setup(model: PerceiverARModel, optimizer_cfg: optimizers.OptimizerConfig,
           train_cfg: datasets.DatasetConfig, eval_cfg: datasets.DatasetConfig | None,
           model_dir: str, loop_cfg: LoopConfig, checkpoint_cfg: checkpoints.CheckpointConfig,
           partitioning_cfg: pt.PartitioningConfig) -> tuple[_Loop, int, training.Partitioned]:
  """Builds state (restored when MODEL_DIR has a checkpoint), steps, data and writers."""
  length = check_lengths(model, dict(train_cfg.task_feature_lengths))
  check_model_dir(model_dir)
  datasets.get_task(train_cfg.mixture_or_task_name)  # unknown task: fail before compiling
  optimizer, schedule = optimizers.make_optimizer(optimizer_cfg, loop_cfg.total_steps)
  mesh = pt.make_mesh(partitioning_cfg.num_partitions)
  seed_rng = jax.random.key(loop_cfg.random_seed)
  state, part = training.create_state(model, optimizer, jax.random.fold_in(seed_rng, 0),
                                      length, mesh, pt.logical_axis_rules(partitioning_cfg))
  logging.info("%d parameters; partitioning:\n%s", training.param_count(state.params),
               "\n".join(pt.describe(mesh, part.params_logical, part.state_sharding.params)))
  write_model_info(model_dir, state, part)
  ckpt = checkpoints.Checkpointer(model_dir, checkpoint_cfg)
  start, state = restore_or_init(model, state, ckpt)
  layout = pt.data_layout(mesh)  # processes holding the same batch rows read the same data
  ds = datasets.get_dataset(train_cfg, shard_index=layout.shard_index,
                            num_shards=layout.num_shards)
  just_log = jax.process_index() > 0
  eval_writer = metric_writers.create_default_writer(os.path.join(model_dir, "eval"),
                                                     just_logging=just_log)
  loop = _Loop(
      model=model, loop_cfg=loop_cfg, period=checkpoint_cfg.period, state=state, ckpt=ckpt,
      train_step=training.make_train_step(model, optimizer, schedule, part),
      step_rng=jax.random.fold_in(seed_rng, 1),
      batches=datasets.numpy_batches(ds.skip(start)),
      run_eval=_eval_fn(model, part, eval_cfg, loop_cfg.eval_steps, eval_writer),
      writer=metric_writers.create_default_writer(os.path.join(model_dir, "train"),
                                                  just_logging=just_log),
      log=MetricsLog(os.path.join(model_dir, "train", "metrics.jsonl"), start,
                     enabled=not just_log),
      stop=_StopFlag(), tokens_per_step=train_cfg.batch_size * length)
  return loop, start, part


def _check_finite(loop: _Loop, step: int, metrics: dict[str, Any]) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    loop.ckpt.wait()
    good = loop.ckpt.steps()
    raise TrainingError(f"loss is {loss} at step {step}; stopping without saving. Last good "
                        f"checkpoint: step {good[-1] if good else 'none'} in {loop.ckpt.directory}")


def _run_steps(loop: _Loop, start: int) -> int:
  """Steps until total_steps or a stop signal; returns the step reached."""
  cfg, step = loop.loop_cfg, start
  stats = StepStats(start, loop.writer, loop.tokens_per_step, cfg.total_steps)
  while step < cfg.total_steps and loop.stop.signum is None:
    loop.state, metrics = loop.train_step(loop.state, next(loop.batches), loop.step_rng)
    step += 1
    metrics = jax.device_get(metrics)
    _check_finite(loop, step, metrics)
    loop.log.write(step, metrics)
    stats.add(metrics)
    if step % cfg.stats_period == 0 or step == cfg.total_steps:
      stats.flush(step, metrics)
    if cfg.eval_period and step % cfg.eval_period == 0 and step < cfg.total_steps:
      loop.run_eval(step, loop.state.params)
    if step % loop.period == 0:
      loop.save(step)
  return step


def train(*, model: PerceiverARModel, optimizer_cfg: optimizers.OptimizerConfig,
          train_dataset_cfg: datasets.DatasetConfig,
          train_eval_dataset_cfg: datasets.DatasetConfig | None, model_dir: str,
          loop_cfg: LoopConfig, checkpoint_cfg: checkpoints.CheckpointConfig,
          partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig(),
          handle_signals: bool = True, sample_at_end: bool = True) -> TrainResult:
  """Trains `model`; returns the final state, final eval metrics and a sample."""
  t0 = time.time()
  loop, start, _ = _setup(model, optimizer_cfg, train_dataset_cfg, train_eval_dataset_cfg,
                          model_dir, loop_cfg, checkpoint_cfg, partitioning_cfg)
  if handle_signals:
    loop.stop.install()
  try:
    step = _run_steps(loop, start)
    loop.save(step, force=True)
  finally:
    loop.log.close()
    loop.ckpt.wait()
  if loop.stop.signum is not None:
    loop.ckpt.close()
    logging.info("Stopped by %s: saved checkpoint at step %d in %s; rerun the same command to "
                 "resume.", signal.Signals(loop.stop.signum).name, step, loop.ckpt.directory)
    return TrainResult(loop.state, {}, {}, loop.stop.signum)
  final = loop.run_eval(step, loop.state.params)
  sample = {}
  if sample_at_end and train_eval_dataset_cfg is not None:
    sample = inference.sample_from_split(model, loop.state.params, train_eval_dataset_cfg)
  loop.ckpt.close()
  loop.writer.close()
  logging.info("Training finished at step %d in %.1fs", step, time.time() - t0)
  return TrainResult(loop.state, final, sample)
