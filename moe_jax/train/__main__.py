"""Train from gin configs: ``python -m moe_jax.train --gin_file=... --model_dir=...``.

Example (a tiny decoder LM on the shipped corpus, a few minutes on CPU)::

    python -m moe_jax.train --gin_file=experiments/decoder_tiny_lm.gin \\
        --model_dir=/tmp/tiny_lm --gin.TRAIN_STEPS=500

Flags (see :mod:`moe_jax.configurables`): ``--gin_file`` (repeatable),
``--gin.NAME=VALUE``, ``--gin_bindings``, ``--gin_search_paths``,
``--model_dir`` (binds ``MODEL_DIR``), and the multi-host flags
``--coordinator_address``, ``--process_count``, ``--process_id``. Re-running
the same command resumes from the newest checkpoint in ``model_dir``.

:func:`train` is the gin-configured entry (``train.model = ...`` etc. in
``gin_configs/runs/pretrain.gin``); it is also callable from Python with the
config objects directly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

logger = logging.getLogger(__name__)


def _check_vocabulary(model: Any, dataset: Any) -> None:
  from moe_jax.data import pipeline

  provider = pipeline.get_mixture_or_task(dataset.mixture_or_task_name)
  for name, feature in provider.output_features.items():
    size = feature.vocabulary.vocab_size
    if size > model.vocab_size:
      raise ValueError(
          f"{dataset.mixture_or_task_name!r} feature {name!r} has a vocabulary of {size} ids, "
          f"more than the model's vocab_size={model.vocab_size}; raise vocab_size in the "
          "model config")


def train(*, model: Any, train_dataset: Any, model_dir: str, trainer: Any,
          optimizer: Any = None, partitioner: Any = None, checkpoint: Any = None,
          eval_dataset: Any = None, infer_eval: Any = None, init_from: Any = None,
          trainable: Any = None) -> Any:
  """Trains ``model`` on ``train_dataset``; resumes from ``model_dir`` if it has checkpoints.

  Args:
    model: a :class:`~moe_jax.train.wrappers.BaseModel` wrapper.
    train_dataset: a :class:`~moe_jax.train.trainer.DatasetConfig`.
    model_dir: checkpoints, ``model_config.json``, ``config.gin``, ``metrics.jsonl``.
    trainer: a :class:`~moe_jax.train.trainer.TrainerConfig`.
    optimizer: an :class:`~moe_jax.train.optimizers.OptimizerConfig` (default Adafactor).
    partitioner: a :class:`~moe_jax.train.partitioner.PartitionerConfig`.
    checkpoint: a :class:`~moe_jax.checkpoints.orbax.CheckpointConfig`.
    eval_dataset: validation-loss data, evaluated every ``trainer.eval_every``
      steps and at the end.
    infer_eval: an :class:`~moe_jax.eval.InferEvalConfig` (task metric_fns).
    init_from: an :class:`~moe_jax.checkpoints.assignment.InitFromCheckpoint`
      (or a sequence of them, applied in order, each keeping what earlier ones
      loaded where its map says ``None``) applied to a fresh start (ignored
      when resuming).
    trainable: trainable-parameter regexes, a bool pytree, or a callable
      ``params -> mask``; overrides ``optimizer.trainable_regexes``.

  Returns:
    The final :class:`~moe_jax.train.trainer.TrainState`.
  """
  from moe_jax import configurables
  from moe_jax.eval import make_eval_fn
  from moe_jax.checkpoints import assignment, orbax
  from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
  from moe_jax.train.partitioner import Partitioner, PartitionerConfig
  from moe_jax.train.trainer import (MetricsWriter, Trainer, TrainState, make_data_iterator)

  model_dir = Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  configurables.write_operative_config(model_dir)
  orbax.write_model_config(model_dir, model.config)
  _check_vocabulary(model, train_dataset)

  part = Partitioner(partitioner or PartitionerConfig())
  logger.info("%s", part)
  abstract = nn.meta.unbox(model.abstract_boxed_params())
  opt = make_optimizer(optimizer or OptimizerConfig(), abstract, trainable=trainable)
  tr = Trainer(model=model, optimizer=opt, partitioner=part, config=trainer,
               metrics_writer=MetricsWriter(model_dir))
  data = make_data_iterator(train_dataset, model)
  ckpt = orbax.Checkpointer(model_dir, checkpoint or orbax.CheckpointConfig())
  try:
    if ckpt.config.restore and ckpt.latest_step() is not None:
      restored = ckpt.restore(abstract_params=tr.abstract_state.params,
                              abstract_opt_state=tr.abstract_state.opt_state,
                              data_iterator=data)
      state = TrainState(step=jax.device_put(jax.numpy.int32(restored["step"]),
                                             tr.state_shardings.step),
                         params=restored["params"], opt_state=restored["opt_state"])
      logger.info("resumed from %s at step %d", model_dir, restored["step"])
    elif init_from is not None:  # fresh parameters are initialised only if some stay fresh
      params = tr.create_params
      for init in (init_from if isinstance(init_from, (list, tuple)) else [init_from]):
        params, report = assignment.restore_into(params, init, abstract=tr.abstract_state.params)
        tr.writer.write(0, "init", {"source": str(init.path),
                                    "loaded": len(report.loaded), "fresh": len(report.fresh)})
      state = tr.state_from_params(params)
    else:
      state = tr.create_state()
    eval_fn = make_eval_fn(tr, eval_dataset=eval_dataset, infer_eval=infer_eval,
                           eval_steps=trainer.eval_steps)
    state = tr.train(state, data, checkpointer=ckpt, eval_fn=eval_fn)
  finally:
    ckpt.close()
  return state


def main(argv=None) -> int:
  from moe_jax import configurables

  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    args = configurables.parse_flags(argv, prog="python -m moe_jax.train",
                                     description=__doc__)
    configurables.setup(args)
  except configurables.GinConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from moe_jax.train import __main__ as entry  # the registered copy of train()

  configurables.run(entry.train)
  return 0


if __name__ == "__main__":
  sys.exit(main())
