"""Where a run's metric rows go: ``metrics.jsonl``, TensorBoard event files, Weights & Biases.

A *row* is ``(step, split, {name: value})``: the trainer writes one per log
line (split ``"train"``), the evaluation one per evaluation (the eval split,
e.g. ``"validation"``, and ``"validation/{task}"`` for each task's inference
metrics), a fresh start from checkpoints one ``"init"`` row per source. Every
writer gets every row, and only process 0 writes anything:

* :class:`JsonlWriter`: one JSON object per row appended to
  ``model_dir/metrics.jsonl`` (and a line printed);
* :class:`TensorBoardWriter`: t5x's layout, ``model_dir/train/`` for the
  training rows and ``model_dir/eval/`` for every evaluation row, so that
  ``tensorboard --logdir model_dir`` overlays the train and eval curves of a
  tag. Numbers become scalars; 1-D values (a router's per-expert usage) become
  histograms over the expert index: bucket ``e`` spans ``[e - 0.5, e + 0.5]``
  and holds ``value[e]``. Inference metrics are tagged ``{task}/{metric}``;
  ``"init"`` rows and strings are skipped. Each row is flushed as it is
  written, and the files are closed at the end of the run (or its crash), so
  a killed run leaves readable files; a resumed run writes new event files
  that start with a ``SessionLog.START`` at the step after its checkpoint,
  which makes TensorBoard drop the killed run's later rows (as
  :meth:`JsonlWriter.drop_rows_after` does for ``metrics.jsonl``);
* :class:`WandbWriter`: ``wandb.log({"{split}/{name}": value}, step=step)``
  (opt-in: ``TrainerConfig.wandb_project``; ``wandb`` is not a dependency).

:func:`make_metric_writer` assembles them from a :class:`TrainerConfig`'s
``tensorboard`` and ``wandb_project``; :func:`moe_jax.train.run.train` and
:func:`~moe_jax.train.run.evaluate` are its only callers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TRAIN_DIR, EVAL_DIR = "train", "eval"
#: Row keys with this prefix (per-layer router metrics) are logged, never printed.
QUIET_PREFIX = "router/"


class MetricWriter:
  """A destination of metric rows (the base does nothing).

  ``bar`` is the tqdm bar a writer that prints goes through while it is set.
  """

  bar: Any = None

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    """Records one row."""

  def drop_rows_after(self, step: int) -> None:
    """Called once a run resumes at ``step``: rows of later steps are stale."""

  def close(self) -> None:
    """Flushes and releases files (the writer may write again afterwards)."""


class JsonlWriter(MetricWriter):
  """Appends JSON lines to ``model_dir/metrics.jsonl`` and prints them (process 0)."""

  def __init__(self, model_dir: str | os.PathLike | None, *, echo: bool = True):
    self.path = None if model_dir is None else Path(model_dir) / METRICS_FILE
    self.echo = echo and jax.process_index() == 0
    self.bar = None  # a tqdm bar to print through, while one is active

  def drop_rows_after(self, step: int) -> None:
    """Removes rows of steps after ``step`` (a resumed run re-runs them: one row per step).

    The file is rewritten atomically; unparsable lines are kept.
    """
    if self.path is None or jax.process_index() != 0 or not self.path.exists():
      return
    from moe_jax.checkpoints.io import write_text_atomic

    lines = self.path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        after = int(json.loads(line).get("step", 0)) > step
      except (ValueError, TypeError, AttributeError):
        after = False
      if not after:
        keep.append(line)
    if len(keep) != len(lines):
      write_text_atomic(self.path, "".join(keep))

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    row = {"step": int(step), "split": split,
           **{k: to_json(v) for k, v in sorted(metrics.items())}}
    if self.path is not None and jax.process_index() == 0:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if self.echo:
      text = f"[{split}] step {step}: " + " ".join(
          f"{k}={_fmt(v)}" for k, v in sorted(metrics.items())
          if not k.startswith(QUIET_PREFIX) and np.ndim(v) == 0)
      if self.bar is not None:
        self.bar.write(text, file=sys.stdout)
      else:
        print(text, flush=True)


def to_json(v):
  """A metric value as JSON: numbers, lists of numbers, strings (non-finite as ``"nan"``)."""
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item() if np.ndim(v) == 0 else v.tolist()
  if isinstance(v, list):
    return [to_json(x) for x in v]
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _fmt(v) -> str:
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.4g}"
  return str(v)


def _numeric(v) -> np.ndarray | None:
  """``v`` as a float64 array of rank 0 or 1, or ``None`` (strings, ``None``, rank > 1)."""
  if isinstance(v, (str, bytes)) or v is None:
    return None
  try:
    a = np.asarray(v, np.float64)
  except (TypeError, ValueError):
    return None
  return a if a.ndim <= 1 and a.size else None


def index_histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(counts [E], edges [E + 1])``: bucket ``e``, ``[e - 0.5, e + 0.5]``, holds ``values[e]``."""
  return np.asarray(values, np.float64), np.arange(len(values) + 1, dtype=np.float64) - 0.5


def _after_existing_event_files(directory: str) -> None:
  """Waits until a new event file's name sorts after every file already in ``directory``.

  TensorBoard reads a directory's event files in name order and names them
  ``events.out.tfevents.<seconds>.<host>.<pid>.<counter>``: two files made in
  the same second (a quick resume) could sort by a counter compared as text, and
  the resumed run's purge would then come first and drop nothing.
  """
  newest = 0
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      parts = name.split(".")
      if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
        newest = max(newest, int(parts[3]))
  while int(time.time()) <= newest:
    time.sleep(0.05)


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files under ``model_dir/train`` and ``model_dir/eval`` (process 0).

  Uses the ``tensorboard`` package's own event writer and protos (no
  TensorFlow needed). Event files are opened at the first row of their
  directory.
  """

  def __init__(self, model_dir: str | os.PathLike):
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as e:
      raise ImportError("TrainerConfig.tensorboard=True needs the tensorboard package "
                        "(pip install tensorboard), or set TrainerConfig.tensorboard=False"
                        ) from e
    self._event_pb2, self._summary_pb2, self._file_writer = event_pb2, summary_pb2, EventFileWriter
    self.model_dir = str(model_dir)
    self.active = jax.process_index() == 0
    self._writers: dict[str, Any] = {}
    self._start_step: int | None = None

  @staticmethod
  def location(split: str) -> tuple[str, str] | None:
    """``(directory, tag prefix)`` of a split's rows; ``None`` for rows TensorBoard skips."""
    if split == "init":
      return None
    if split == "train":
      return TRAIN_DIR, ""
    _, _, task = split.partition("/")
    return EVAL_DIR, f"{task}/" if task else ""

  def drop_rows_after(self, step: int) -> None:
    self._start_step = int(step) + 1

  def _writer(self, subdir: str):
    w = self._writers.get(subdir)
    if w is None:
      directory = os.path.join(self.model_dir, subdir)
      _after_existing_event_files(directory)
      w = self._file_writer(directory)
      if self._start_step is not None:  # TensorBoard purges older events of steps >= this
        pb = self._event_pb2
        w.add_event(pb.Event(wall_time=time.time(), step=self._start_step,
                             session_log=pb.SessionLog(status=pb.SessionLog.START)))
      self._writers[subdir] = w
    return w

  def _value(self, tag: str, v: Any):
    pb = self._summary_pb2
    a = _numeric(v)
    if a is None:
      return None
    if a.ndim == 0:
      return pb.Summary.Value(tag=tag, simple_value=float(a))
    counts, edges = index_histogram(a)
    index = np.arange(len(a), dtype=np.float64)
    histo = pb.HistogramProto(min=float(edges[0]), max=float(edges[-1]), num=float(counts.sum()),
                              sum=float(np.dot(index, counts)),
                              sum_squares=float(np.dot(index * index, counts)),
                              bucket_limit=edges[1:].tolist(), bucket=counts.tolist())
    return pb.Summary.Value(tag=tag, histo=histo)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    where = self.location(split)
    if not self.active or where is None:
      return
    subdir, prefix = where
    values = [v for k, x in sorted(metrics.items())
              if (v := self._value(prefix + k, x)) is not None]
    if not values:
      return
    w = self._writer(subdir)
    w.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=self._summary_pb2.Summary(value=values)))
    w.flush()

  def close(self) -> None:
    writers, self._writers = list(self._writers.values()), {}
    for w in writers:
      w.close()


def import_wandb(project: str) -> Any:
  """The ``wandb`` module, or an ``ImportError`` naming the option and the install command."""
  try:
    import wandb
  except ImportError as e:
    raise ImportError(f"TrainerConfig.wandb_project={project!r} logs to Weights & Biases, "
                      "which needs the wandb package: pip install wandb (or leave "
                      "wandb_project unset)") from e
  return wandb


class WandbWriter(MetricWriter):
  """Rows as ``wandb.log({"{split}/{name}": value}, step=step)`` (process 0).

  ``wandb`` is imported at construction (a clear error before training if it
  is missing); the W&B run starts at the first row and finishes at
  :meth:`close`. 1-D values are logged as ``wandb.Histogram`` over the index.
  """

  def __init__(self, project: str, *, model_dir: str | os.PathLike | None = None,
               config: Mapping[str, Any] | None = None):
    self._wandb = import_wandb(project)
    self.project = project
    self.model_dir = None if model_dir is None else str(model_dir)
    self.config = dict(config or {})
    self.active = jax.process_index() == 0
    self._run = None

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.active or split == "init":
      return
    wandb, data = self._wandb, {}
    for k, v in sorted(metrics.items()):
      a = _numeric(v)
      if a is None:
        continue
      data[f"{split}/{k}"] = (float(a) if a.ndim == 0 else
                              wandb.Histogram(np_histogram=index_histogram(a)))
    if not data:
      return
    if self._run is None:
      if self.model_dir is not None:
        os.makedirs(self.model_dir, exist_ok=True)
      self._run = wandb.init(project=self.project, dir=self.model_dir, config=self.config)
    wandb.log(data, step=int(step))

  def close(self) -> None:
    if self._run is not None:
      self._run = None
      self._wandb.finish()


class MultiWriter(MetricWriter):
  """Every row to each of ``writers`` (in order); ``close`` closes them all."""

  def __init__(self, writers: Iterable[MetricWriter]):
    self.writers = list(writers)

  @property
  def bar(self):
    return self.writers[0].bar if self.writers else None

  @bar.setter
  def bar(self, value):
    for w in self.writers:
      w.bar = value

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write(step, split, metrics)

  def drop_rows_after(self, step: int) -> None:
    for w in self.writers:
      w.drop_rows_after(step)

  def close(self) -> None:
    errors = []
    for w in self.writers:
      try:
        w.close()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
    if errors:
      raise errors[0]


def make_metric_writer(model_dir: str | os.PathLike | None, *, tensorboard: bool = True,
                       wandb_project: str | None = None, base: MetricWriter | None = None,
                       echo: bool = True, wandb_config: Mapping[str, Any] | None = None
                       ) -> MultiWriter:
  """The writers of a run: ``base`` (default a :class:`JsonlWriter`), TensorBoard, W&B.

  Args:
    model_dir: the run's directory (``None``: no files, no TensorBoard).
    tensorboard: write TensorBoard event files (with a ``model_dir``).
    wandb_project: log to this W&B project (``None``: off). ``wandb``
      missing raises ``ImportError`` here, before any training.
    base: the caller's writer, instead of ``JsonlWriter(model_dir, echo=echo)``.
    echo: print the rows (the default ``JsonlWriter`` only).
    wandb_config: the W&B run's ``config``.
  """
  writers = [base if base is not None else JsonlWriter(model_dir, echo=echo)]
  if tensorboard and model_dir is not None:
    writers.append(TensorBoardWriter(model_dir))
  if wandb_project:
    writers.append(WandbWriter(wandb_project, model_dir=model_dir, config=wandb_config))
  return MultiWriter(writers)
