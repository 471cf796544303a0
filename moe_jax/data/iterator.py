"""A resumable iterator of NumPy batches over a `tf.data.Dataset` (`DataIterator`).

Split from :mod:`moe_jax.data.pipeline` (which re-exports every name here).

Two ways to feed several processes:

* **the global stream** (what the trainer does, ``rows=``): every process
  builds the same *global* batch stream (same task, seed, global batch size,
  no per-host shard) and keeps only its rows of each batch. The global batch
  is the same examples whatever the process count (2 processes x 4 devices
  train exactly as 1 x 8), and the iterator's position is identical on every
  process, so one shared state (``data-global``) resumes a run on any number
  of processes. The cost: each host runs the whole input pipeline
  (reading, preprocessing, packing) for the global batch, then drops
  ``(n - 1) / n`` of it -- cheap for this library's seqio tasks and
  tokenised text; for a pod of many hosts on a heavy pipeline use the
  per-host mode below.
* **per-host shards** (``rows=None`` over `get_dataset(shard_info=...)`):
  t5x's layout; each host reads a disjoint 1/n of the examples, so the
  global batch depends on the process count, and each process saves its own
  ``data-IIIII-of-NNNNN`` state: a resume needs the same process count (the
  error says so).
"""

import base64
import json
import logging
import os
import re
import uuid
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)


_STATE_FORMAT = "moe_jax.data.DataIterator"
_STATE_VERSION = 1
# In-memory checkpoints for get_state / set_state go through TensorFlow's RAM
# filesystem, so both paths share tf.train.Checkpoint's format and code.
_RAM_ROOT = "ram://moe_jax_data_iterator"


def _spec_signature(element_spec: Any) -> str:
  """A readable, comparable summary of a dataset's element spec."""
  if isinstance(element_spec, Mapping):
    return ";".join(f"{k}:{_spec_signature(v)}"
                    for k, v in sorted(element_spec.items()))
  if isinstance(element_spec, tf.TensorSpec):
    return f"{element_spec.dtype.name}{element_spec.shape.as_list()}"
  return repr(element_spec)


def _remove_quietly(directory: str) -> None:
  try:
    tf.io.gfile.rmtree(directory)
  except (tf.errors.OpError, OSError):
    pass


GLOBAL_STATE = "data-global"


def global_batch_rows(global_batch: int, process_index: int,
                      process_count: int) -> Tuple[int, int]:
  """Rows ``(start, stop)`` of a global batch that process ``process_index`` keeps.

  Process ``i`` of ``n`` keeps the ``i``-th contiguous block of
  ``global_batch / n`` rows: the block `jax.make_array_from_process_local_data`
  places it at when the batch axis is sharded over processes in order (the
  default device order of `jax.devices()`).
  """
  if global_batch % process_count:
    raise ValueError(f"the global batch of {global_batch} is not divisible by the "
                     f"{process_count} processes")
  per = global_batch // process_count
  return process_index * per, (process_index + 1) * per


def _resharding_hint(there: Optional[list]) -> str:
  counts = sorted({int(m.group(1)) for f in there or ()
                   for m in [re.fullmatch(r"data-\d{5}-of-(\d{5})\.json", f)] if m})
  if not counts:
    return ""
  return (f" It was saved by {counts[0]} process(es), each reading its own shard of the data "
          f"(per-host input sharding), so it cannot be re-sharded: resume with "
          f"{counts[0]} process(es), or set CheckpointConfig.save_data_iterator = False to "
          "restart the data from its beginning. Runs that read the global batch stream "
          f"('{GLOBAL_STATE}') resume with any process count.")


class DataIterator:
  """NumPy batches from a `tf.data.Dataset`, with resumable position.

  Two ways to resume, both exact:

  * ``save(directory)`` / ``restore(directory)``: a `tf.train.Checkpoint`
    of the tf.data iterator (shuffle buffers, packing buffers, mixture
    sampler state) and the consumed-batch count, one file set per process
    so hosts can share the directory. This is what t5x does, and it does not
    need a deterministic pipeline.
  * ``get_state()`` / ``set_state(state)``: the same checkpoint as a
    JSON-serialisable dict (base64 file contents), for trainers that keep
    the data position inside their own checkpoint. With
    ``replay_only=True`` the state is just the batch count (a few bytes) and
    ``set_state`` re-reads that many batches from the start. Replay is exact
    only if the pipeline is deterministic (`get_dataset` with an int seed)
    and the DataIterator is new, over a freshly built dataset (tf.data
    reshuffles each new pass over one dataset object); it also costs a pass
    over the consumed data.

  A full state holds the shuffle buffers, so it grows with buffer and example
  size (about 3 MB for ``synthetic_mix``: four tasks x 1000 examples).
  Restoring into a pipeline built differently fails with an error naming
  both feature specs when shapes differ (other batch size, lengths or
  converter); other differences (another seed or task with the same shapes)
  go unnoticed, as in t5x.
  """

  def __init__(self, dataset: tf.data.Dataset, *,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None,
               rows: Optional[Tuple[int, int]] = None):
    """Wraps ``dataset``; iteration starts on the first batch asked for.

    Args:
      dataset: e.g. from `get_dataset`.
      process_index: names this host's files in ``save``; default
        `jax.process_index()`.
      process_count: likewise; default `jax.process_count()`.
      rows: ``(start, stop)``: ``dataset`` is the *global* batch stream,
        the same on every process, and this process keeps rows
        ``start:stop`` of each batch (see `global_batch_rows`). Its position
        is then the same on every process: ``save`` writes one shared
        ``data-global`` state (process 0) and ``restore`` reads it whatever
        the process count, so a run resumes on more or fewer hosts.
    """
    if not isinstance(dataset, tf.data.Dataset):
      raise TypeError(f"DataIterator needs a tf.data.Dataset, got "
                      f"{type(dataset).__name__}.")
    self._dataset = dataset
    # Made on first use: a replay-only set_state must run on the dataset's
    # first iterator (see the class docstring).
    self._iterator: Optional[tf.data.Iterator] = None
    self._consumed = 0
    self._process_index = process_index
    self._process_count = process_count
    if rows is not None:
      start, stop = (int(r) for r in rows)
      if not 0 <= start < stop:
        raise ValueError(f"rows must be (start, stop) with 0 <= start < stop, got {rows!r}")
      rows = (start, stop)
    self._rows = rows

  # -- iteration -------------------------------------------------------------

  def __iter__(self) -> "DataIterator":
    return self

  def _get_iterator(self) -> tf.data.Iterator:
    if self._iterator is None:
      self._iterator = iter(self._dataset)
    return self._iterator

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._get_iterator())  # StopIteration at the end.
    self._consumed += 1
    if self._rows is None:
      return tf.nest.map_structure(lambda t: t.numpy(), batch)
    start, stop = self._rows
    return tf.nest.map_structure(lambda t: t.numpy()[start:stop], batch)

  @property
  def consumed_batches(self) -> int:
    """Batches returned by ``__next__`` since the start of the data."""
    return self._consumed

  @property
  def dataset(self) -> tf.data.Dataset:
    return self._dataset

  @property
  def element_spec(self) -> Any:
    return self._dataset.element_spec

  # -- shared ----------------------------------------------------------------

  def _metadata(self) -> Dict[str, Any]:
    return {
        "format": _STATE_FORMAT,
        "version": _STATE_VERSION,
        "consumed_batches": self._consumed,
        "element_spec": _spec_signature(self.element_spec),
    }

  def _write(self, prefix: str) -> str:
    checkpoint = tf.train.Checkpoint(
        iterator=self._get_iterator(),
        consumed_batches=tf.Variable(self._consumed, dtype=tf.int64))
    return checkpoint.write(prefix)

  def _read(self, prefix: str, expected: int, source: str) -> None:
    counter = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(iterator=self._get_iterator(),
                                     consumed_batches=counter)
    checkpoint.read(prefix).assert_existing_objects_matched()
    self._consumed = int(counter.numpy())
    if self._consumed != expected:
      logger.warning("%s says %d batches, its checkpoint %d; using the "
                     "checkpoint.", source, expected, self._consumed)

  def _check_state(self, state: Any, source: str) -> Dict[str, Any]:
    if isinstance(state, (str, bytes)):
      try:
        state = json.loads(state)
      except ValueError as err:
        raise ValueError(f"{source} is not JSON: {err}") from err
    if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
      raise ValueError(f"{source} is not a DataIterator state (no "
                       f"format={_STATE_FORMAT!r}).")
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"{source} has version {state.get('version')!r}; this "
                       f"code reads version {_STATE_VERSION}.")
    consumed = state.get("consumed_batches")
    if isinstance(consumed, bool) or not isinstance(consumed, int) or (
        consumed < 0):
      raise ValueError(f"{source}: consumed_batches must be an int >= 0, got "
                       f"{consumed!r}.")
    ours = _spec_signature(self.element_spec)
    if state.get("element_spec") != ours:
      raise ValueError(
          f"{source} was saved for a dataset with features "
          f"{state.get('element_spec')!r}, but this one has {ours!r}; build "
          "the dataset with the same task, lengths, batch size and converter.")
    return dict(state)

  # -- in-memory state -------------------------------------------------------

  def get_state(self, *, replay_only: bool = False) -> Dict[str, Any]:
    """The position, as a JSON-serialisable dict (see the class docstring).

    Args:
      replay_only: keep only the batch count (tiny; resume by replay).

    Returns:
      ``{"format", "version", "consumed_batches", "element_spec",
      "iterator"}``; ``iterator`` maps checkpoint file suffixes to their
      base64 contents, or is None for a replay-only state.
    """
    state = self._metadata()
    state["iterator"] = None
    if not replay_only:
      directory = f"{_RAM_ROOT}/{uuid.uuid4().hex}"
      prefix = f"{directory}/state"
      try:
        self._write(prefix)
        files = {}
        for file in sorted(tf.io.gfile.glob(prefix + "*")):
          with tf.io.gfile.GFile(file, "rb") as f:
            files[file[len(prefix):]] = base64.b64encode(f.read()).decode(
                "ascii")
      finally:
        _remove_quietly(directory)
      state["iterator"] = files
    return state

  def set_state(self, state: Union[Mapping[str, Any], str, bytes]) -> None:
    """Moves to the position ``state`` (from `get_state`) recorded.

    Args:
      state: the dict, or its JSON text.

    Raises:
      ValueError: not a DataIterator state; for a dataset with other
        features or shapes; replay-only on a started iterator; replay past
        the end of the data.
    """
    state = self._check_state(state, "state")
    consumed = state["consumed_batches"]
    files = state.get("iterator")
    if files:
      if not isinstance(files, Mapping):
        raise ValueError("state['iterator'] must map checkpoint file "
                         f"suffixes to base64 text, got {type(files).__name__}.")
      directory = f"{_RAM_ROOT}/{uuid.uuid4().hex}"
      prefix = f"{directory}/state"
      try:
        for suffix, text in files.items():
          with tf.io.gfile.GFile(prefix + suffix, "wb") as f:
            f.write(base64.b64decode(text))
        self._read(prefix, consumed, "state")
      finally:
        _remove_quietly(directory)
      return
    if self._iterator is not None:
      raise ValueError(
          "A replay-only state (iterator=None) can only be set on a "
          "DataIterator that has not started: tf.data reshuffles each new "
          "pass over the same dataset object, so replaying on it would not "
          "give the same batches. Wrap a freshly built dataset in a new "
          "DataIterator, or use a full state (replay_only=False).")
    iterator = self._get_iterator()
    for i in range(consumed):
      try:
        next(iterator)
      except StopIteration:
        raise ValueError(
            f"Replaying the data state: the dataset ended after {i} "
            f"batches, but the state is at batch {consumed}.") from None
    self._consumed = consumed

  # -- on disk ---------------------------------------------------------------

  def _index_count(self) -> Tuple[int, int]:
    index, count = self._process_index, self._process_count
    if index is None or count is None:
      import jax  # pylint: disable=g-import-not-at-top
      index = jax.process_index() if index is None else index
      count = jax.process_count() if count is None else count
    return index, count

  def _prefix(self, directory: Union[str, os.PathLike],
              shared: Optional[bool] = None) -> str:
    if self._rows is not None if shared is None else shared:
      return os.path.join(os.fspath(directory), GLOBAL_STATE)
    index, count = self._index_count()
    return os.path.join(os.fspath(directory),
                        f"data-{index:05d}-of-{count:05d}")

  def save(self, directory: Union[str, os.PathLike]) -> str:
    """Writes this process's iterator state into ``directory``.

    Files: ``data-IIIII-of-NNNNN.index`` / ``.data-*`` (a
    `tf.train.Checkpoint` of the iterator and the batch count) and
    ``data-IIIII-of-NNNNN.json`` (metadata, written last, so its presence
    marks a complete save). Use a directory per training step, as orbax
    does: saving over an earlier save is not atomic.

    Returns:
      The checkpoint prefix written.
    """
    prefix = self._prefix(directory)
    tf.io.gfile.makedirs(os.path.dirname(prefix))
    if self._rows is not None and self._index_count()[0] != 0:
      return prefix  # the global stream's state is the same everywhere: process 0 writes it
    path = self._write(prefix)
    meta = self._metadata()
    meta["checkpoint"] = os.path.basename(path)
    tmp = prefix + ".json.tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
      json.dump(meta, f, indent=1)
    tf.io.gfile.rename(tmp, prefix + ".json", overwrite=True)
    return path

  def restore(self, directory: Union[str, os.PathLike]) -> None:
    """Restores the position ``save(directory)`` wrote for this process.

    Raises:
      FileNotFoundError: no save for this process in ``directory`` (e.g. the
        process count changed; the message lists what is there).
      ValueError: the save is for a dataset with other features or shapes.
    """
    prefix = self._prefix(directory)
    meta_file = prefix + ".json"
    if not tf.io.gfile.exists(meta_file) and self._rows is not None:
      own = self._prefix(directory, shared=False)  # one process, saved per process
      if self._index_count()[1] == 1 and tf.io.gfile.exists(own + ".json"):
        prefix, meta_file = own, own + ".json"
    if not tf.io.gfile.exists(meta_file):
      directory = os.fspath(directory)
      there = (sorted(tf.io.gfile.listdir(directory))
               if tf.io.gfile.isdir(directory) else None)
      raise FileNotFoundError(
          f"No data iterator state {meta_file!r}"
          + (f"; the directory holds {there}." if there is not None else
             "; the directory does not exist.") + _resharding_hint(there))
    with tf.io.gfile.GFile(meta_file, "r") as f:
      meta = self._check_state(f.read(), meta_file)
    self._read(prefix, meta["consumed_batches"], meta_file)
