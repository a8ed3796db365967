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
import functools
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging
from clu import metric_writers

from perceiver_ar_t5x import (
  checkpoints,
  data_state,
  datasets,
  evaluation,
  fileio,
  inference,
  multihost,
  optimizers,
  resume,
  training,
)
from perceiver_ar_t5x import partitioning as pt
from perceiver_ar_t5x.io_models import PerceiverIOModel
from perceiver_ar_t5x.metrics_log import MetricsLog, StepStats
from perceiver_ar_t5x.models import PerceiverARModel


class TrainingError(RuntimeError):
  """A run that cannot continue (NaN loss, bad configuration); one-line message."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long, how often (mirrors t5x.train's total_steps / eval_period / stats_period)."""

  total_steps: int
  eval_period: int = 1000
  eval_steps: int | None = 20  # eval caps (None = none): batches, documents, tokens
  stats_period: int = 100
  random_seed: int = 0
  eval_stride: int | None = None  # whole-split eval window stride (None = num_latents)
  eval_max_documents: int | None = None
  eval_max_tokens: int | None = None


def check_lengths(model: PerceiverARModel | PerceiverIOModel, lengths: Mapping[str, int]
                  ) -> int:
  """Validates TASK_FEATURE_LENGTHS against the model (its own check); returns its length."""
  try:
    return model.check_lengths(lengths)
  except ValueError as e:
    raise TrainingError(str(e)) from None


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
  """model-info.txt (process 0 only, as T5X): param count, each param's shape/axes/sharding."""
  if jax.process_index() != 0:
    return
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


@dataclasses.dataclass
class TrainResult:
  state: training.TrainState
  metrics: dict[str, float]
  sample: dict[str, str]
  stopped_by_signal: int | None = None


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
  batches: data_state.TrainBatches
  run_eval: Callable[[int, Any], dict[str, float]]
  writer: metric_writers.MetricWriter
  log: MetricsLog
  stop: multihost.StopFlag
  tokens_per_step: int
  meta: dict[str, Any]  # checkpoints.model_meta: model fields and config values

  def save(self, step: int, force: bool = False) -> None:
    """Saves the state and this process's input position, captured now (before the next
    batch is drawn), so even an asynchronous save stores the position of `step`."""
    if not (force and step in self.ckpt.steps()):
      self.ckpt.save(step, self.state, dict(self.meta, step=step), force=force,
                     data=self.batches.save())


def _eval_fn(model: PerceiverARModel, part: training.Partitioned,
             cfg: datasets.DatasetConfig | None, loop_cfg: LoopConfig,
             writer: metric_writers.MetricWriter) -> Callable[[int, Any], dict[str, float]]:
  """run_eval(step, params): whole-split eval of `cfg`'s split (capped), logged, written."""
  scorers: list[Any] = []  # documents read and windows planned once: one compile

  def run_eval(step: int, params: Any) -> dict[str, float]:
    if cfg is None:
      return {}
    if isinstance(model, PerceiverIOModel):  # every example of the split, capped
      summary = evaluation.split_examples(model=model, part=part, params=params,
                                          dataset_cfg=cfg, max_batches=loop_cfg.eval_steps)
      return _log_eval(writer, step, summary)
    if not scorers:
      scorers.append(evaluation.make_scorer(
          model=model, part=part, dataset_cfg=cfg, stride=loop_cfg.eval_stride,
          max_documents=loop_cfg.eval_max_documents, max_tokens=loop_cfg.eval_max_tokens,
          max_batches=loop_cfg.eval_steps))
    return _log_eval(writer, step, evaluation.whole_split_metrics(params=params,
                                                                  scorer=scorers[0]))

  return run_eval


def _log_eval(writer: metric_writers.MetricWriter, step: int, summary: dict[str, float]
              ) -> dict[str, float]:
  writer.write_scalars(step, summary)
  writer.flush()
  logging.info("eval step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
  return summary


def _setup(model: PerceiverARModel, optimizer_cfg: optimizers.OptimizerConfig,
           train_cfg: datasets.DatasetConfig, eval_cfg: datasets.DatasetConfig | None,
           model_dir: str, loop_cfg: LoopConfig, checkpoint_cfg: checkpoints.CheckpointConfig,
           partitioning_cfg: pt.PartitioningConfig, config_values: Mapping[str, Any] | None
           ) -> tuple[_Loop, int, training.Partitioned]:
  """Builds state (restored when MODEL_DIR has a checkpoint), steps, data and writers."""
  length = check_lengths(model, dict(train_cfg.task_feature_lengths))
  check_model_dir(model_dir)
  datasets.get_task(train_cfg.mixture_or_task_name)  # unknown task: fail before compiling
  optimizer, schedule = optimizers.make_optimizer(optimizer_cfg, loop_cfg.total_steps)
  mesh = pt.make_mesh(partitioning_cfg.num_partitions)
  seed_rng = jax.random.key(loop_cfg.random_seed)
  rules = pt.logical_axis_rules(partitioning_cfg)
  abstract, part = training.state_layout(model, optimizer, length, mesh, rules)
  logging.info("%s parameters, %s; per-parameter sharding in %s/model-info.txt",
               f"{training.param_count(abstract.params):,}", pt.mesh_summary(mesh), model_dir)
  ckpt = checkpoints.Checkpointer(model_dir, checkpoint_cfg)
  meta = checkpoints.model_meta(model, 0, config_values)
  start, state, position = resume.restore_or_init(
      model, ckpt, abstract, meta, lambda: training.create_state(
          model, optimizer, jax.random.fold_in(seed_rng, 0), length, mesh, rules)[0],
      functools.partial(training.with_optimizer, optimizer=optimizer, part=part))
  write_model_info(model_dir, state, part)
  layout = pt.data_layout(mesh)  # processes holding the same batch rows read the same data
  ds = datasets.get_dataset(train_cfg, shard_index=layout.shard_index,
                            num_shards=layout.num_shards, converter=model.feature_converter(
                                dict(train_cfg.task_feature_lengths), train_cfg.pack))
  batches = data_state.resumed(ds, f"{train_cfg!r} {layout}", position, start)
  just_log = jax.process_index() > 0
  eval_writer = metric_writers.create_default_writer(os.path.join(model_dir, "eval"),
                                                     just_logging=just_log)
  loop = _Loop(
      model=model, loop_cfg=loop_cfg, period=checkpoint_cfg.period, state=state, ckpt=ckpt,
      train_step=training.make_train_step(model, optimizer, schedule, part),
      step_rng=jax.random.fold_in(seed_rng, 1),
      batches=batches,
      run_eval=_eval_fn(model, part, eval_cfg, loop_cfg, eval_writer),
      writer=metric_writers.create_default_writer(os.path.join(model_dir, "train"),
                                                  just_logging=just_log),
      log=MetricsLog(os.path.join(model_dir, "train", "metrics.jsonl"), start,
                     enabled=not just_log),
      stop=multihost.StopFlag(), tokens_per_step=train_cfg.batch_size * length,
      meta=meta)
  return loop, start, part


def _check_finite(loop: _Loop, step: int, metrics: dict[str, Any]) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    loop.ckpt.wait()
    good = loop.ckpt.steps()
    raise TrainingError(f"loss is {loss} at step {step}; stopping without saving. Last good "
                        f"checkpoint: step {good[-1] if good else 'none'} in {loop.ckpt.directory}")


def _record(loop: _Loop, stats: StepStats, step: int, metrics: Mapping[str, Any]) -> None:
  """Fetches step `step`'s metrics (waits for that step only), checks the loss, logs."""
  metrics = jax.device_get(metrics)
  _check_finite(loop, step, metrics)
  loop.log.write(step, metrics)
  stats.add(metrics)
  if step % loop.loop_cfg.stats_period == 0 or step == loop.loop_cfg.total_steps:
    stats.flush(step, metrics)


def _run_steps(loop: _Loop, start: int) -> tuple[int, int | None]:
  """Steps until total_steps or an agreed stop; returns (step reached, signal stopped by).

  The host stays a step behind: N's metrics are fetched while N+1 runs. Eval and save
  steps fetch their own first (the step donates its input state), so a checkpoint is
  written only once its step's loss is known finite: a NaN keeps the last good one.
  """
  cfg, step, pending = loop.loop_cfg, start, None
  stats = StepStats(start, loop.writer, loop.tokens_per_step, cfg.total_steps)
  agreement, stopped = multihost.StopAgreement(loop.stop), None
  while step < cfg.total_steps and (stopped := agreement.agreed_stop(step)) is None:
    loop.state, metrics = loop.train_step(loop.state, next(loop.batches), loop.step_rng)
    step += 1
    if pending is not None:
      _record(loop, stats, *pending)
    pending = (step, metrics)
    evals = cfg.eval_period and step % cfg.eval_period == 0 and step < cfg.total_steps
    if evals or step % loop.period == 0:
      _record(loop, stats, *pending)
      pending = None
      if evals:
        loop.run_eval(step, loop.state.params)
      if step % loop.period == 0:
        loop.save(step)
  if pending is not None:
    _record(loop, stats, *pending)
  return step, stopped


def train(*, model: PerceiverARModel, optimizer_cfg: optimizers.OptimizerConfig,
          train_dataset_cfg: datasets.DatasetConfig,
          train_eval_dataset_cfg: datasets.DatasetConfig | None, model_dir: str,
          loop_cfg: LoopConfig, checkpoint_cfg: checkpoints.CheckpointConfig,
          partitioning_cfg: pt.PartitioningConfig = pt.PartitioningConfig(),
          handle_signals: bool = True, sample_at_end: bool = True,
          config_values: Mapping[str, Any] | None = None) -> TrainResult:
  """Trains `model`; returns the final state, final eval metrics and a sample.

  `config_values` (the binary's gin macros) are stored with each checkpoint, so a
  mismatching restore can name the values that changed.
  """
  t0 = time.time()
  loop, start, _ = _setup(model, optimizer_cfg, train_dataset_cfg, train_eval_dataset_cfg,
                          model_dir, loop_cfg, checkpoint_cfg, partitioning_cfg, config_values)
  if handle_signals:
    loop.stop.install()
  with multihost.peer_failures_end_the_run():
    try:
      step, stopped = _run_steps(loop, start)
      loop.save(step, force=True)
    finally:
      loop.log.close()
      loop.ckpt.wait()
    if stopped is not None:  # every process stops at this step with the same signal
      loop.ckpt.close()
      logging.info("Stopped by %s: saved checkpoint at step %d in %s; rerun the same command "
                   "to resume.", signal.Signals(stopped).name, step, loop.ckpt.directory)
      return TrainResult(loop.state, {}, {}, stopped)
    final = loop.run_eval(step, loop.state.params)
    sample = {}
    if sample_at_end and train_eval_dataset_cfg is not None:
      sample = inference.sample_from_split(model, loop.state.params, train_eval_dataset_cfg)
    loop.ckpt.close()
  loop.writer.close()
  logging.info("Training finished at step %d in %.1fs", step, time.time() - t0)
  return TrainResult(loop.state, final, sample)
