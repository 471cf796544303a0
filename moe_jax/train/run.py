"""One way to assemble a training run, without gin: ``build_trainer``, ``train``, ``evaluate``.

Every entry point goes through these functions: ``python -m moe_jax.train``
and ``python -m moe_jax.eval`` (gin binds their arguments, in
:mod:`moe_jax.cli`), the Python API (:func:`moe_jax.api.finetune`,
:func:`moe_jax.api.evaluate`), the experiments (CALM, the PEFT sweep). Each
option is a field of a plain dataclass, with its default in that dataclass:

=====================  ============================================  =====================
option                 dataclass field (default)                     ``api.finetune``
=====================  ============================================  =====================
optimizer              ``OptimizerConfig.name`` (``"adafactor"``)    ``optimizer``
learning rate          ``ScheduleConfig.lr`` (``1e-3``)              ``learning_rate``
schedule               ``ScheduleConfig.kind`` (``"constant"``)      ``schedule``
warm-up                ``ScheduleConfig.warmup_steps`` (0)           ``warmup_steps``
cosine end / length    ``ScheduleConfig.end_lr`` (0), ``decay_steps``  ``end_lr`` (steps)
weight decay           ``OptimizerConfig.weight_decay`` (0.0)        ``weight_decay``
gradient clipping      ``OptimizerConfig.clip_grad_norm`` (None)     ``clip_grad_norm``
trainable subset       ``train(trainable=...)`` / regexes (all)      ``trainable``
checkpoint period      ``CheckpointConfig.save_every`` (1000)        ``checkpoint_every``
checkpoints kept       ``CheckpointConfig.keep`` (3)                 ``keep_checkpoints``
resume from model_dir  ``CheckpointConfig.restore`` (True)           ``resume``
log period             ``TrainerConfig.log_every`` (100)             ``log_every`` (1)
seed                   ``TrainerConfig.seed``, ``DatasetConfig.seed``  ``seed``
mesh                   ``PartitionerConfig`` (data parallel)         ``mesh``
FSDP (ZeRO-3)          ``PartitionerConfig.fsdp`` (False)            ``mesh={"fsdp": True}``
grad accumulation      ``TrainerConfig.num_microbatches`` (1)        ``num_microbatches``
frozen params dtype    ``TrainerConfig.frozen_param_dtype`` (None)   ``frozen_param_dtype``
dropless MoE fallback  ``TrainerConfig.dropless_fallback`` (False)   (gin / TrainerConfig)
TensorBoard events     ``TrainerConfig.tensorboard`` (True)          ``tensorboard``
Weights & Biases       ``TrainerConfig.wandb_project`` (None)        ``wandb_project``
remat / scan layers    model config ``remat_policy``, ``scan_layers``  (the model's config)
=====================  ============================================  =====================

The gin run files bind the same fields through macros (``OPTIMIZER``,
``LEARNING_RATE``, ``SCHEDULE``, ``WARMUP_STEPS``, ``CLIP_GRAD_NORM``,
``CHECKPOINT_EVERY``, ``KEEP_CHECKPOINTS``, ``LOG_EVERY``, ``SEED``,
``MESH_*``; weight decay as ``OptimizerConfig.weight_decay``) and override
some defaults: ``runs/pretrain.gin`` trains with t5x's Adafactor at an rsqrt
0.01 after 1000 warm-up steps, ``runs/finetune.gin`` at a constant 1e-3.
:func:`moe_jax.api.finetune` defaults to AdamW at a constant 1e-3 and logs
every step. With the same settings, ``api.finetune`` and ``python -m
moe_jax.train`` run the very same steps (``tests/train/test_run.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from moe_jax.checkpoints import assignment, orbax
from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.lock import model_dir_lock
from moe_jax.train.evaluation import InferEvalConfig, make_eval_fn
from moe_jax.train.metric_writers import MetricWriter, make_metric_writer
from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
from moe_jax.train.partitioner import Partitioner, PartitionerConfig
from moe_jax.train.trainer import (DatasetConfig, Trainer, TrainerConfig, TrainState,
                                   make_data_iterator)
from moe_jax.train.wrappers import BaseModel, model_from_checkpoint

logger = logging.getLogger(__name__)


def check_vocabulary(model: BaseModel, dataset: DatasetConfig) -> None:
  """Raises ``ValueError`` if a feature's vocabulary has more ids than the model embeds."""
  from moe_jax.data import pipeline

  provider = pipeline.get_mixture_or_task(dataset.mixture_or_task_name)
  for name, feature in provider.output_features.items():
    size = feature.vocabulary.vocab_size
    if size > model.vocab_size:
      raise ValueError(
          f"{dataset.mixture_or_task_name!r} feature {name!r} has a vocabulary of {size} ids, "
          f"more than the model's vocab_size={model.vocab_size}; raise vocab_size in the "
          "model config")


def build_trainer(model: BaseModel, *, trainer: TrainerConfig,
                  optimizer: OptimizerConfig | None = None,
                  partitioner: PartitionerConfig | Partitioner | None = None,
                  trainable: Any = None, metrics_writer: MetricWriter | None = None,
                  eval_only: bool = False) -> Trainer:
  """The :class:`~moe_jax.train.trainer.Trainer` of a run.

  Args:
    model: a model wrapper (:mod:`moe_jax.train.wrappers`).
    trainer: the loop's schedule.
    optimizer: optimizer, schedule, clipping, weight decay (default
      ``OptimizerConfig()``: Adafactor).
    partitioner: a ``PartitionerConfig`` (default: data parallel over every
      device) or a ready ``Partitioner`` (e.g. on a subset of the devices).
    trainable: trainable-parameter regexes, a bool pytree, or a callable
      ``params -> mask``; overrides ``optimizer.trainable_regexes``.
    metrics_writer: where log lines go (default: nowhere).
    eval_only: no optimizer (``eval_step`` / ``score_batch`` only).
  """
  part = partitioner if isinstance(partitioner, Partitioner) else Partitioner(
      partitioner or PartitionerConfig())
  opt = None
  if not eval_only:
    abstract = nn.meta.unbox(model.abstract_boxed_params())
    opt = make_optimizer(optimizer or OptimizerConfig(), abstract, trainable=trainable)
  return Trainer(model=model, optimizer=opt, partitioner=part, config=trainer,
                 metrics_writer=metrics_writer)


def initial_state(tr: Trainer, *, checkpointer: orbax.Checkpointer | None = None,
                  data_iterator: Any = None, init_from: Any = None,
                  params: Any = None) -> TrainState:
  """The state a run starts from, in this order of preference.

  1. the newest checkpoint of ``checkpointer`` (if ``restore`` is on): exact
     resumption, including ``data_iterator``'s position;
  2. ``params`` (host or device arrays), with a fresh optimizer state;
  3. ``init_from`` (an :class:`~moe_jax.checkpoints.assignment.InitFromCheckpoint`
     or a sequence of them, applied in order); parameters are freshly
     initialised only if some stay fresh;
  4. a fresh initialisation.
  """
  if (checkpointer is not None and checkpointer.config.restore
      and checkpointer.latest_step() is not None):
    restored = checkpointer.restore(abstract_params=tr.abstract_state.params,
                                    abstract_opt_state=tr.abstract_state.opt_state,
                                    data_iterator=data_iterator)
    logger.info("resumed from %s at step %d", checkpointer.model_dir, restored["step"])
    step = jax.device_put(jax.numpy.int32(restored["step"]), tr.state_shardings.step)
    return TrainState(step=step, params=restored["params"], opt_state=restored["opt_state"])
  if params is not None:
    return tr.state_from_params(jax.device_put(params, tr.state_shardings.params))
  if init_from is not None:
    params = tr.create_params
    for init in (init_from if isinstance(init_from, (list, tuple)) else [init_from]):
      params, report = assignment.restore_into(params, init, abstract=tr.abstract_state.params)
      tr.writer.write(0, "init", {"source": str(init.path),
                                  "loaded": len(report.loaded), "fresh": len(report.fresh)})
    return tr.state_from_params(params)
  return tr.create_state()


def train(*, model: BaseModel, train_dataset: DatasetConfig, trainer: TrainerConfig,
          model_dir: str | Path | None = None, optimizer: OptimizerConfig | None = None,
          partitioner: PartitionerConfig | Partitioner | None = None,
          checkpoint: orbax.CheckpointConfig | None = None,
          eval_dataset: DatasetConfig | None = None, infer_eval: InferEvalConfig | None = None,
          init_from: Any = None, params: Any = None, trainable: Any = None,
          metrics_writer: MetricWriter | None = None,
          operative_config: str | None = None) -> TrainState:
  """Trains ``model`` on ``train_dataset``; resumes from ``model_dir`` if it has checkpoints.

  ``model_dir`` is locked for the whole run (a second run on it stops with
  an error naming the holder, :mod:`moe_jax.checkpoints.lock`). Nothing in
  it changes until the run is known to fit it: the model config (and the
  operative gin config) must match an existing run's, and the restore
  (optimizer tree, data features) must succeed; only then are
  ``model_config.json`` and ``config.gin`` written, atomically.

  Args:
    model: a model wrapper (:mod:`moe_jax.train.wrappers`).
    train_dataset: the training data.
    trainer: the loop's schedule (steps, log and eval periods, seed).
    model_dir: checkpoints, ``model_config.json``, ``metrics.jsonl`` and the
      TensorBoard event files (``train/``, ``eval/``) go there (``None``:
      nothing is written and nothing resumed).
    optimizer: default ``OptimizerConfig()`` (Adafactor).
    partitioner: a ``PartitionerConfig`` or a ``Partitioner``.
    checkpoint: when to save and whether to resume (default ``CheckpointConfig()``).
    eval_dataset: validation-loss data, evaluated every ``trainer.eval_every``
      steps and at the end.
    infer_eval: the tasks' metric functions, evaluated with ``eval_dataset``.
    init_from: an :class:`~moe_jax.checkpoints.assignment.InitFromCheckpoint`
      (or a sequence of them) applied to a fresh start (ignored when resuming).
    params: starting parameters of a fresh start (ignored when resuming);
      excludes ``init_from``.
    trainable: trainable-parameter regexes, a bool pytree, or a callable
      ``params -> mask``; overrides ``optimizer.trainable_regexes``.
    metrics_writer: default ``JsonlWriter(model_dir)`` (printed and
      appended to ``metrics.jsonl``; rows of steps after the resumed
      checkpoint, left by a killed run, are dropped). The rows also go to
      TensorBoard (``trainer.tensorboard``) and W&B (``trainer.wandb_project``)
      either way (:func:`~moe_jax.train.metric_writers.make_metric_writer`);
      the writers are closed when training ends or fails.
    operative_config: gin's operative config, written to ``config.gin``
      (the CLI passes it).

  Returns:
    The final :class:`~moe_jax.train.trainer.TrainState`.
  """
  if params is not None and init_from is not None:
    raise ValueError("train: give params or init_from, not both")
  check_vocabulary(model, train_dataset)
  model_dir = None if model_dir is None else Path(model_dir)
  writer = make_metric_writer(model_dir, tensorboard=trainer.tensorboard,
                              wandb_project=trainer.wandb_project, base=metrics_writer,
                              wandb_config={"trainer": dataclasses.asdict(trainer)})
  with model_dir_lock(model_dir, "training"):
    if model_dir is not None:
      orbax.check_run_compatible(model_dir, model.config, operative_config)
    tr = build_trainer(model, trainer=trainer, optimizer=optimizer, partitioner=partitioner,
                       trainable=trainable, metrics_writer=writer)
    logger.info("%s", tr.partitioner)
    data = make_data_iterator(train_dataset, model)
    ckpt = None if model_dir is None else orbax.Checkpointer(
        model_dir, checkpoint or orbax.CheckpointConfig())
    try:
      state = initial_state(tr, checkpointer=ckpt, data_iterator=data, init_from=init_from,
                            params=params)
      if model_dir is not None:  # the run fits the directory: now it may change
        orbax.write_run_files(model_dir, model.config, operative_config)
        tr.writer.drop_rows_after(int(jax.device_get(state.step)))
      eval_fn = make_eval_fn(tr, eval_dataset=eval_dataset, infer_eval=infer_eval,
                             eval_steps=trainer.eval_steps)
      state = tr.train(state, data, checkpointer=ckpt, eval_fn=eval_fn)
    finally:
      try:
        if ckpt is not None:
          ckpt.close()
      finally:
        writer.close()
  return state


def _restore_params(tr: Trainer, checkpoint_path: str | Path, step: int | None
                    ) -> tuple[Any, int]:
  """``(sharded params, step)`` of a training directory, HF or ``save_model`` checkpoint."""
  abstract = tr.abstract_state.params
  if orbax.is_training_dir(checkpoint_path):
    ckpt = orbax.Checkpointer(checkpoint_path, orbax.CheckpointConfig())
    try:
      restored = ckpt.restore(abstract_params=abstract, step=step)
    finally:
      ckpt.close()
    return restored["params"], restored["step"]

  def missing():  # every parameter must come from the checkpoint: nothing is initialised
    raise CheckpointError(f"{checkpoint_path}: lacks parameters of "
                          f"{type(tr.model.config).__name__}")

  params, _ = assignment.restore_into(
      missing, assignment.InitFromCheckpoint(path=str(checkpoint_path)), abstract=abstract)
  return params, 0


def evaluate(*, checkpoint_path: str | Path | None = None, model: BaseModel | None = None,
             params: Any = None, model_dir: str | Path | None = None,
             eval_dataset: DatasetConfig | None = None,
             infer_eval: InferEvalConfig | None = None,
             partitioner: PartitionerConfig | Partitioner | None = None,
             eval_steps: int | None = None, step: int | None = None,
             echo: bool = True) -> dict[str, Any]:
  """Evaluates a checkpoint or given parameters; returns ``{"loss": {...}, "tasks": {...}}``.

  Args:
    checkpoint_path: a training ``model_dir`` (newest step unless ``step``), a
      Hugging Face directory, or a ``save_model`` directory.
    model: the model wrapper; default built from the checkpoint's config.
    params: parameters to evaluate instead of a checkpoint's (then ``model``
      is required and ``checkpoint_path`` must be ``None``).
    model_dir: where ``metrics.jsonl`` lines and TensorBoard ``eval/`` events
      go; default ``checkpoint_path`` for a training directory, else nowhere.
    eval_dataset: validation-loss data.
    infer_eval: inference metrics (the tasks' ``metric_fns``).
    partitioner: a ``PartitionerConfig`` (default data parallel over all
      devices) or a ``Partitioner``.
    eval_steps: validation-loss batches (``None``: the whole split).
    step: checkpoint step of a training directory.
    echo: print the metrics lines.
  """
  if eval_dataset is None and infer_eval is None:
    raise ValueError("evaluate: give eval_dataset (validation loss) and/or infer_eval (metrics)")
  if (checkpoint_path is None) == (params is None):
    raise ValueError("evaluate: give either checkpoint_path or params")
  if model is None:
    if checkpoint_path is None:
      raise ValueError("evaluate: params need their model wrapper (model=)")
    model = model_from_checkpoint(str(checkpoint_path))
  if model_dir is None and checkpoint_path is not None and orbax.is_training_dir(checkpoint_path):
    model_dir = checkpoint_path
  config = TrainerConfig(num_train_steps=0, progress_bar=False)
  writer = make_metric_writer(model_dir, tensorboard=config.tensorboard, echo=echo)
  tr = build_trainer(model, trainer=config, partitioner=partitioner, eval_only=True,
                     metrics_writer=writer)
  fn = make_eval_fn(tr, eval_dataset=eval_dataset, infer_eval=infer_eval, eval_steps=eval_steps)
  if fn is None:
    return {}
  if params is not None:
    params, at = jax.device_put(params, tr.state_shardings.params), 0
  else:
    params, at = _restore_params(tr, checkpoint_path, step)
  try:
    return fn(TrainState(step=np.int32(at), params=params, opt_state=None))
  finally:
    writer.close()
