"""Training: partitioner (mesh + logical axis rules), trainer, optimizers, losses, eval.

t5x-style training from gin configs on seqio mixtures::

    python -m moe_jax.train --gin_file=experiments/t5_tiny_mix.gin --model_dir=/tmp/run \\
        --gin.TRAIN_STEPS=500
    python -m moe_jax.eval --gin_file=runs/eval.gin --checkpoint=/tmp/run \\
        --gin.MIXTURE_OR_TASK_NAME="'synthetic_mix'" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 32, 'targets': 24}"

Modules (plain Python; gin names are registered in :mod:`moe_jax.cli.configurables`):

* :mod:`partitioning` -- mesh axes ``(data, expert, model)`` and the default
  logical -> mesh rules.
* :mod:`partitioner` -- ``PartitionerConfig``, ``Partitioner`` (parameter and
  optimizer-state shardings derived from the modules' logical axes, sharded
  ``jit``, per-host batches -> global arrays), ``initialize_distributed``.
* :mod:`optimizers` -- ``OptimizerConfig`` / ``ScheduleConfig`` /
  ``make_optimizer``: Adafactor (t5x defaults), AdamW, constant / rsqrt /
  cosine schedules, clipping, trainable masks (frozen parameters get no state).
* :mod:`losses` -- cross-entropy with z-loss, loss normalisation, and the
  convention for auxiliary losses and metrics sown by models.
* :mod:`wrappers` -- ``DecoderOnlyModel``, ``EncoderDecoderModel``
  (seqio features -> module calls; ``loss_fn``, ``score_batch``,
  ``predict_batch``), ``model_from_checkpoint``.
* :mod:`trainer` -- ``Trainer`` (sharded train step, loop, metrics, NaN stop),
  ``TrainerConfig``, ``DatasetConfig``.
* :mod:`metric_writers` -- where metric rows go: ``metrics.jsonl``,
  TensorBoard event files (``model_dir/train``, ``model_dir/eval``), W&B.
* :mod:`evaluation` -- validation loss and the tasks' seqio metric functions
  (``InferEvalConfig``, ``make_eval_fn``).
* :mod:`run` -- ``build_trainer``, ``train``, ``evaluate``: the one way every
  entry point (the CLIs, :mod:`moe_jax.api`, the experiments) assembles a
  run; its docstring lists the options and their defaults.
* ``__main__`` -- ``python -m moe_jax.train`` (:mod:`moe_jax.cli.train`).
"""
