"""Batches of model features from seqio tasks, and a resumable iterator.

`get_dataset` is t5x's input pipeline in one call: a seqio task or mixture,
shuffled and sharded per host, preprocessed, run through a seqio feature
converter (packing several examples into each row, or padding one per row),
and batched with a static shape. `DataIterator` turns it into NumPy batches
and saves / restores its position, so a restarted trainer sees exactly the
batches an uninterrupted one would have.

Features per converter (seqio's names; B = per-host batch, L = lengths):

============  ============================================================
converter     features, all int32 ``[B, L]``
============  ============================================================
decoder       decoder_input_tokens, decoder_target_tokens,
              decoder_loss_weights, (packed:) decoder_segment_ids,
              decoder_positions. L = targets length. With an ``inputs``
              length too it is prefix_lm (seqio's DecoderFeatureConverter
              picks by the keys of ``task_feature_lengths``).
prefix_lm     the decoder features, plus decoder_causal_attention (1 on the
              inputs and the first target position: the bidirectional
              prefix). L = inputs + targets lengths. Loss on targets only.
enc_dec       encoder_input_tokens, (packed:) encoder_segment_ids,
              encoder_positions [B, inputs length]; decoder_input_tokens,
              decoder_target_tokens, decoder_loss_weights, (packed:)
              decoder_segment_ids, decoder_positions [B, targets length].
============  ============================================================

Segment ids count 1, 2, ... per example in a row, 0 marks padding; positions
restart at 0 for each example; loss weights are 1 on real target tokens. They
feed `moe_jax.models.decoder.Decoder` (``segment_ids_BL``, ``positions_BL``)
and `moe_jax.models.t5.T5` (``enc_segment_ids_BL``, ``dec_segment_ids_BL``).

Multi-host: the trainer has every process build the same *global* batch
stream (``shard_info=None``, the global ``batch_size``) and keep its rows
(`DataIterator` ``rows=``, `global_batch_rows`): the same examples whatever
the process count, and a position that resumes on any process count. The
per-host alternative (t5x's) is `get_dataset` with ``shard_info_for_process()``
and the per-host ``batch_size``: seqio shards the examples before shuffling
and packing, so hosts read disjoint data, packs differ per host, and a resume
needs the same process count. See :mod:`moe_jax.data.iterator`.
"""

import difflib
import logging
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import seqio
import tensorflow as tf

from moe_jax.data import tasks as _tasks  # noqa: F401  (registers tasks)

logger = logging.getLogger(__name__)

FEATURE_CONVERTERS = ("decoder", "prefix_lm", "enc_dec")
# Task features each converter reads: (required, optional).
_CONVERTER_TASK_FEATURES = {
    "decoder": (("targets",), ("inputs",)),
    "prefix_lm": (("inputs", "targets"), ()),
    "enc_dec": (("inputs", "targets"), ()),
}


class UnknownTaskError(ValueError):
  """No seqio task or mixture has the requested name."""


# ----------------------------------------------------------------------------
# Dataset.
# ----------------------------------------------------------------------------


def make_feature_converter(name: str, *,
                           pack: bool = True) -> seqio.FeatureConverter:
  """The seqio feature converter for ``name`` (see the module docstring).

  Raises:
    ValueError: ``name`` is not one of `FEATURE_CONVERTERS`.
  """
  if name == "decoder":
    return seqio.DecoderFeatureConverter(pack=pack)
  if name == "prefix_lm":
    return seqio.PrefixLMFeatureConverter(pack=pack)
  if name == "enc_dec":
    return seqio.EncDecFeatureConverter(pack=pack)
  raise ValueError(
      f"Unknown feature_converter {name!r}; choose from "
      f"{', '.join(map(repr, FEATURE_CONVERTERS))}.")


def get_mixture_or_task(name: str) -> Union[seqio.Task, seqio.Mixture]:
  """`seqio.get_mixture_or_task`, with close matches in the error.

  seqio logs the available names and raises a bare "not found"; this puts the
  closest registered names in the message itself.

  Raises:
    UnknownTaskError: nothing is registered under ``name``.
  """
  if not isinstance(name, str):
    raise TypeError(f"mixture_or_task_name must be a str, got "
                    f"{type(name).__name__}.")
  tasks = set(seqio.TaskRegistry.names())
  mixtures = set(seqio.MixtureRegistry.names())
  if name in tasks or name in mixtures:
    return seqio.get_mixture_or_task(name)
  close = difflib.get_close_matches(name, sorted(tasks | mixtures), n=5,
                                    cutoff=0.5)
  hint = (f"close matches: {', '.join(map(repr, close))}" if close else
          "no close matches")
  raise UnknownTaskError(
      f"No seqio task or mixture named {name!r} ({hint}; {len(tasks)} tasks "
      f"and {len(mixtures)} mixtures are registered). Is the module that "
      "registers it imported (e.g. via gin or an import in your script)?")


def _check_positive_int(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < 1):
    raise ValueError(f"{what} must be an int >= 1, got {value!r}.")
  return int(value)


def _check_feature_lengths(
    name: str, provider: Union[seqio.Task, seqio.Mixture], converter: str,
    task_feature_lengths: Mapping[str, int]) -> Dict[str, int]:
  """Checks lengths against the converter and the task's features."""
  if not isinstance(task_feature_lengths, Mapping) or not task_feature_lengths:
    raise ValueError(f"task_feature_lengths must be a non-empty mapping "
                     f"feature -> length, got {task_feature_lengths!r}.")
  lengths = {
      k: _check_positive_int(v, f"task_feature_lengths[{k!r}]")
      for k, v in task_feature_lengths.items()}
  required, optional = _CONVERTER_TASK_FEATURES[converter]
  missing = [k for k in required if k not in lengths]
  extra = [k for k in lengths if k not in required + optional]
  if missing or extra:
    problem = (f"misses {missing}" if missing else "") + (
        " and " if missing and extra else "") + (
            f"has unexpected {extra}" if extra else "")
    raise ValueError(
        f"task_feature_lengths {lengths} {problem} for feature_converter "
        f"{converter!r}, which reads {list(required)}"
        + (f" (optionally {list(optional)})" if optional else "") + ".")
  features = list(provider.output_features)
  absent = [k for k in lengths if k not in features]
  if absent:
    raise ValueError(
        f"{type(provider).__name__} {name!r} has features {features}, not "
        f"{absent} asked for in task_feature_lengths (feature_converter "
        f"{converter!r}); e.g. an LM task has only 'targets', so use "
        "feature_converter='decoder' with {'targets': length}.")
  unused = [k for k in features if k not in lengths]
  if unused:
    logger.warning(
        "%s %r: feature(s) %s have no length in task_feature_lengths and are "
        "not fed to the model (feature_converter %r).",
        type(provider).__name__, name, unused, converter)
  return lengths


def _check_shard_info(shard_info: Optional[seqio.ShardInfo]) -> None:
  if shard_info is None:
    return
  if not isinstance(shard_info, seqio.ShardInfo):
    raise TypeError(f"shard_info must be a seqio.ShardInfo, got "
                    f"{type(shard_info).__name__}.")
  num = _check_positive_int(shard_info.num_shards, "shard_info.num_shards")
  if not 0 <= shard_info.index < num:
    raise ValueError(f"shard_info.index {shard_info.index} is not in "
                     f"[0, {num}).")


def _check_split(provider: Any, name: str, split: str) -> None:
  if split not in provider.splits:
    raise ValueError(
        f"{type(provider).__name__} {name!r} has no split "
        f"{split!r}; it has {', '.join(map(repr, sorted(provider.splits)))}.")


def get_dataset(
    *,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str = "train",
    batch_size: int,
    feature_converter: str = "decoder",
    pack: bool = True,
    shuffle: bool = True,
    seed: Optional[int] = 0,
    num_epochs: Optional[int] = None,
    shard_info: Optional[seqio.ShardInfo] = None,
    use_cached: bool = False,
) -> tf.data.Dataset:
  """Batched model features of a seqio task or mixture, for one host.

  Order of operations (seqio's): source -> per-host shard -> preprocess ->
  repeat ``num_epochs`` -> trim -> shuffle -> (mix) -> feature converter
  (pack or pad) -> batch, dropping the last partial batch so every batch has
  the static shape ``[batch_size, length]``.

  The pipeline is deterministic for an integer ``seed``: the same arguments
  give the same batches, which `DataIterator.set_state` relies on when it
  replays. ``seed=None`` draws a fresh shuffle each call (fine for
  `DataIterator.save` / ``restore``, which store the iterator's state).

  Args:
    mixture_or_task_name: a registered seqio task or mixture
      (`moe_jax.data.tasks` registers the synthetic ones on import).
    task_feature_lengths: task feature -> length, e.g. ``{"inputs": 256,
      "targets": 128}``; longer examples are truncated (EOS kept), and the
      keys choose the features (see the module docstring).
    split: the split, e.g. "train" or "validation".
    batch_size: rows per batch *on this host*: the global batch divided by
      the number of processes (``jax.process_count()``). With packing a row
      holds several examples, so examples per batch vary.
    feature_converter: "decoder", "prefix_lm" or "enc_dec".
    pack: pack several examples per row (training); False pads one per row
      (evaluation, where examples must stay whole and in order) and drops the
      segment-id and position features. The last partial batch is dropped
      either way, so a finite eval split loses up to ``batch_size - 1``
      examples; `seqio.Evaluator` (see `moe_jax.train.evaluation`) keeps them all.
    shuffle: shuffle examples (seqio's task shuffle buffer) before packing.
    seed: shuffle and mixture-sampling seed; the same on every host.
    num_epochs: passes over the data; None repeats forever (training).
    shard_info: this host's shard (`shard_info_for_process`); None reads all.
    use_cached: read a task's offline cache (seqio ``cache_tasks_main``).

  Returns:
    A `tf.data.Dataset` of dicts of int32 ``[batch_size, length]`` tensors.

  Raises:
    UnknownTaskError: no such task or mixture (close matches named).
    ValueError: unknown ``feature_converter`` or ``split``, lengths missing or
      not matching the converter or the task's features, bad batch size or
      shard_info.
  """
  converter = make_feature_converter(feature_converter, pack=pack)
  batch_size = _check_positive_int(batch_size, "batch_size")
  if num_epochs is not None:
    _check_positive_int(num_epochs, "num_epochs")
  _check_shard_info(shard_info)
  provider = get_mixture_or_task(mixture_or_task_name)
  _check_split(provider, mixture_or_task_name, split)
  lengths = _check_feature_lengths(mixture_or_task_name, provider,
                                   feature_converter, task_feature_lengths)
  ds = provider.get_dataset(
      sequence_length=lengths,
      split=split,
      use_cached=use_cached,
      shuffle=shuffle,
      seed=seed,
      shard_info=shard_info,
      num_epochs=num_epochs,
  )
  ds = converter(ds, task_feature_lengths=lengths)
  ds = ds.batch(batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True  # Resuming by replay needs a fixed order.
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def shard_info_for_process(process_index: Optional[int] = None,
                           process_count: Optional[int] = None
                          ) -> seqio.ShardInfo:
  """This host's input shard: one shard per JAX process.

  Every process reads a disjoint 1/process_count of the examples and builds
  its own per-host batches (t5x's per-host input sharding); the trainer then
  assembles the global batch from the per-host ones
  (`jax.make_array_from_process_local_data`).

  Args:
    process_index: default `jax.process_index()`.
    process_count: default `jax.process_count()`.

  Returns:
    ``seqio.ShardInfo(index=process_index, num_shards=process_count)``.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  count = _check_positive_int(process_count, "process_count")
  if isinstance(process_index, bool) or not isinstance(
      process_index, (int, np.integer)) or not 0 <= process_index < count:
    raise ValueError(f"process_index {process_index!r} is not in "
                     f"[0, {count}).")
  return seqio.ShardInfo(index=int(process_index), num_shards=count)


from moe_jax.data.iterator import (  # noqa: E402,F401  (re-exported)
    GLOBAL_STATE, DataIterator, global_batch_rows)
