"""Evaluation during and after training: validation loss and the tasks' seqio metrics.

Two kinds of evaluation, both run periodically by the trainer (``eval_fn``)
and by :func:`moe_jax.train.run.evaluate`:

* **validation loss**: the training loss metrics (cross-entropy, accuracy,
  z-loss, auxiliary losses) over batches of a split
  (:class:`~moe_jax.train.trainer.DatasetConfig`);
* **inference metrics** (:class:`InferEvalConfig`): the tasks' own seqio
  ``metric_fns``. ``seqio.Evaluator`` feeds unpacked examples; predictions are
  generated with :func:`moe_jax.decoding.generate` (greedy, up to the targets
  length) and decoded with each task's vocabulary (and ``postprocess_fn``) by
  seqio before the metric functions see them; score metrics get per-example
  target log-likelihoods (:meth:`BaseModel.score_batch`).

Decoder-only models are evaluated on seq2seq tasks through seqio's prefix-LM
features: the prompt is the inputs, the prediction the continuation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferEvalConfig:
  """Inference evaluation with the tasks' seqio metric functions.

  Attributes:
    mixture_or_task_name: task or mixture (its sub-tasks with metric_fns are evaluated).
    task_feature_lengths: lengths of ``inputs`` / ``targets`` (longer examples
      are truncated).
    split: the split to evaluate.
    batch_size: global examples per generation batch.
    num_examples: evaluate only the first examples of each task (``None``: all).
    max_new_tokens: generation length; default the ``targets`` length.
    feature_converter: default ``enc_dec`` for encoder-decoders, ``prefix_lm``
      for decoder-only models (``decoder`` for targets-only tasks).
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "validation"
  batch_size: int = 32
  num_examples: int | None = None
  max_new_tokens: int | None = None
  feature_converter: str | None = None
  use_cached: bool = False


class InferenceEvaluator:
  """``seqio.Evaluator`` driven by a model wrapper and a (possibly eval-only) trainer."""

  def __init__(self, config: InferEvalConfig, trainer: Any):
    import seqio

    from moe_jax.data import pipeline

    self.config = config
    self.trainer = trainer
    model = trainer.model
    lengths = dict(config.task_feature_lengths)
    name = config.feature_converter
    if name is None:
      if model.FEATURE_CONVERTER == "enc_dec":
        name = "enc_dec"
      else:
        name = "prefix_lm" if "inputs" in lengths else "decoder"
    self.max_new_tokens = config.max_new_tokens or int(lengths["targets"])
    pipeline.get_mixture_or_task(config.mixture_or_task_name)  # a clear error for typos
    n = trainer.partitioner.num_batch_shards
    if config.batch_size % n:
      raise ValueError(f"InferEvalConfig.batch_size={config.batch_size} is not divisible by the "
                       f"{n} batch shards of the mesh")
    self.evaluator = seqio.Evaluator(
        mixture_or_task_name=config.mixture_or_task_name,
        feature_converter=pipeline.make_feature_converter(name, pack=False),
        eval_split=config.split, use_cached=config.use_cached, sequence_length=lengths,
        num_examples=config.num_examples, async_compute_metrics=False)
    self.eos_id = None
    for task in self.evaluator.eval_tasks:
      self.eos_id = task.output_features["targets"].vocabulary.eos_id
      vocab = task.output_features["targets"].vocabulary.vocab_size
      if vocab > model.vocab_size:
        raise ValueError(f"task {task.name!r} has a vocabulary of {vocab} ids but the model's "
                         f"vocab_size is {model.vocab_size}")

  @property
  def has_tasks(self) -> bool:
    return bool(self.evaluator.eval_tasks)

  def _batches(self, ds):
    """``(indices, numpy features, real rows)`` padded to the full batch size."""
    bs = self.config.batch_size
    for index, feats in ds.batch(bs).as_numpy_iterator():
      real = len(index)
      if real < bs:
        feats = {k: np.concatenate([v, np.repeat(v[:1], bs - real, axis=0)])
                 for k, v in feats.items()}
      yield index, feats, real

  def evaluate(self, params: Any, step: int | None = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every task with metric functions."""
    if not self.has_tasks:
      return {}
    trainer = self.trainer

    def predict_fn(ds):
      out = []
      with trainer.partitioner.activate():
        for index, feats, real in self._batches(ds):
          tokens = trainer.model.predict_batch(params, feats, max_new_tokens=self.max_new_tokens,
                                               eos_id=self.eos_id)
          out.extend((int(i), t.tolist()) for i, t in zip(index[:real], tokens[:real]))
      return out

    def score_fn(ds):
      out = []
      for index, feats, real in self._batches(ds):
        scores = trainer.score_batch(params, feats)
        out.extend((int(i), float(s)) for i, s in zip(index[:real], scores[:real]))
      return out

    metrics, _ = self.evaluator.evaluate(compute_metrics=True, step=step,
                                         predict_fn=predict_fn, score_fn=score_fn)
    result = metrics.result() or {}
    return {task: {k: _scalar(v) for k, v in m.items()} for task, m in result.items()}


def _scalar(v):
  v = getattr(v, "value", v)  # seqio metric objects (clu Scalar) -> float
  try:
    return float(np.asarray(v))
  except (TypeError, ValueError):
    return str(v)


def make_eval_fn(trainer: Any, *, eval_dataset: Any = None, infer_eval: InferEvalConfig | None,
                 eval_steps: int | None = None):
  """A ``fn(state)`` logging validation loss and inference metrics (``None`` if nothing to do)."""
  from moe_jax.train.trainer import make_data_iterator

  inference = InferenceEvaluator(infer_eval, trainer) if infer_eval is not None else None
  if inference is not None and not inference.has_tasks:
    logger.warning("%s: no task with metric_fns on split %r; inference eval skipped",
                   infer_eval.mixture_or_task_name, infer_eval.split)
    inference = None
  if eval_dataset is None and inference is None:
    return None

  dataset = None  # the tf.data pipeline is built once; each evaluation restarts it

  def eval_fn(state) -> dict[str, Any]:
    nonlocal dataset
    from moe_jax.data.pipeline import DataIterator

    step = int(jax.device_get(state.step))
    results: dict[str, Any] = {}
    if eval_dataset is not None:
      if dataset is None:
        dataset = make_data_iterator(eval_dataset, trainer.model, num_epochs=1).dataset
      results["loss"] = trainer.evaluate_loss(state.params, DataIterator(dataset), eval_steps)
      trainer.writer.write(step, f"{eval_dataset.split}", results["loss"])
    if inference is not None:
      results["tasks"] = inference.evaluate(state.params, step)
      for task, m in results["tasks"].items():
        trainer.writer.write(step, f"{infer_eval.split}/{task}", m)
    return results

  return eval_fn
