"""seqio preprocessors of the tasks: the seq2seq chain and document splitting for LMs."""

from typing import Callable, List, Mapping, Optional

import seqio
import tensorflow as tf


def seq2seq_preprocessors() -> List[Callable[..., tf.data.Dataset]]:
  """tokenize, cache placeholder, EOS after trimming (seqio's standard).

  The tokenizer keeps ``inputs_pretokenized`` / ``targets_pretokenized``,
  which seqio's evaluator scores against. `append_eos_after_trim` trims to
  length - 1 before the EOS, so a trimmed example still ends with one.
  """
  return [
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      seqio.preprocessors.append_eos_after_trim,
  ]


def split_tokens_to_length(
    dataset: tf.data.Dataset,
    sequence_length: Optional[Mapping[str, int]],
    output_features: Mapping[str, seqio.Feature],
    feature_key: str = "targets",
) -> tf.data.Dataset:
  """Appends EOS to each document, then splits it into length-sized pieces.

  For language modelling on documents longer than the sequence: seqio's
  default (``append_eos_after_trim``) keeps the first ``length - 1`` tokens
  of a document and drops the rest; this keeps every token, at the cost of
  pieces that start mid-sentence. Only the last piece ends with EOS (the
  document's end), and the feature converter packs short pieces together.
  With ``sequence_length`` None (e.g. scoring whole documents) it only
  appends EOS. Empty documents are dropped, and so is every other feature (a
  piece has no pretokenized text of its own).

  Args:
    dataset: tokenized examples with a 1-D int ``feature_key``.
    sequence_length: feature -> length, from seqio.
    output_features: the task's features; EOS is appended when the feature
      has ``add_eos``.
    feature_key: the feature to split.

  Returns:
    A dataset of ``{feature_key: int32[<= length]}`` pieces, in order.
  """
  feature = output_features[feature_key]
  length = (sequence_length or {}).get(feature_key)
  eos_id = feature.vocabulary.eos_id if feature.add_eos else None

  def with_eos(ex):
    tokens = tf.cast(ex[feature_key], tf.int32)
    if eos_id is not None:
      tokens = tf.concat([tokens, tf.constant([eos_id], tf.int32)], axis=0)
    return {feature_key: tokens}

  dataset = dataset.filter(lambda ex: tf.size(ex[feature_key]) > 0)
  dataset = dataset.map(with_eos, num_parallel_calls=tf.data.AUTOTUNE)
  if length is None:
    return dataset
  if isinstance(length, bool) or not isinstance(length, int) or length < 1:
    raise ValueError(f"sequence_length[{feature_key!r}] must be an int >= 1, "
                     f"got {length!r}.")

  def split(ex):
    tokens = ex[feature_key]
    n = tf.size(tokens, out_type=tf.int64)
    num_pieces = (n + length - 1) // length
    row_lengths = tf.minimum(
        tf.constant(length, tf.int64),
        n - tf.range(num_pieces, dtype=tf.int64) * length)
    return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, row_lengths)}

  dataset = dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return dataset.map(lambda ex: {feature_key: tf.ensure_shape(
      ex[feature_key], [None])})
