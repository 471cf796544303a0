"""Metrics for seqio tasks, with seqio's ``metric_fn(targets, predictions)``.

seqio's evaluator calls each of a task's ``metric_fns`` with the postprocessed
targets and predictions (decoded strings for the tasks in
`moe_jax.data.tasks`) and logs the returned ``{name: value}`` dict. Values are
percentages, following t5's metrics (``accuracy`` is 0..100), so that they read
the same in TensorBoard next to t5x runs.
"""

from typing import Any, Dict, Sequence

import numpy as np


def _as_text(value: Any) -> Any:
  """Decodes bytes (what tf.data gives for strings) to str; else unchanged."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return value


def exact_match(targets: Sequence[Any],
                predictions: Sequence[Any]) -> Dict[str, float]:
  """Percentage of predictions equal to their target.

  Strings are compared exactly (no lower-casing, no whitespace stripping): the
  synthetic tasks have one right answer, and normalising would hide e.g. a
  model that learned to stop one character early. Postprocess in the task's
  ``postprocess_fn`` if a task needs a looser comparison. Bytes are decoded as
  UTF-8 first, so a ``b"19"`` prediction matches a ``"19"`` target.

  Args:
    targets: the reference answers.
    predictions: the model's answers, in the same order.

  Returns:
    ``{"exact_match": percent}``, 0.0 for empty inputs.

  Raises:
    ValueError: ``targets`` and ``predictions`` differ in length.
  """
  targets, predictions = list(targets), list(predictions)
  if len(targets) != len(predictions):
    raise ValueError(
        f"exact_match got {len(targets)} targets but {len(predictions)} "
        "predictions; they must pair up one to one.")
  if not targets:
    return {"exact_match": 0.0}
  hits = sum(_as_text(t) == _as_text(p) for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * hits / len(targets)}
