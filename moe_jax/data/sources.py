"""seqio sources over in-memory examples, one fixed order per split."""

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

Example = Mapping[str, str]


def _columns(examples: Sequence[Example],
             keys: Sequence[str]) -> Dict[str, List[str]]:
  return {k: [ex[k] for ex in examples] for k in keys}


class _FixedOrderSource(seqio.FunctionDataSource):
  """A `seqio.FunctionDataSource` whose splits have one fixed order.

  The only change: the function is always called with
  ``shuffle_files=False``, which also silences seqio's warning that an
  uncached FunctionDataSource reshuffles poorly on restarts. That warning does
  not apply here: the data is in memory (nothing to cache), seqio's
  task-level shuffle does the shuffling, and restarts resume from a
  checkpointed iterator instead of reshuffling.
  """

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None,
                  **kwargs) -> tf.data.Dataset:
    del shuffle  # One fixed order per split.
    return super().get_dataset(split, shuffle=False, seed=seed,
                               shard_info=shard_info, **kwargs)


def examples_source(
    name: str,
    get_examples: Callable[[str], Sequence[Example]],
    splits: Sequence[str],
    keys: Sequence[str],
) -> seqio.FunctionDataSource:
  """A FunctionDataSource over ``get_examples(split)``, in a fixed order.

  ``shuffle_files`` and ``seed`` are ignored (one fixed order per split), so
  per-host shards taken by seqio are disjoint whatever the seed; seqio
  shuffles after sharding.

  The source declares no ``num_input_examples``: seqio would then wrap small
  splits in an in-memory ``Dataset.cache()``, which copies data that is
  already in memory and, worse, is written into every iterator checkpoint
  (about 0.4 MB per 1000 synthetic examples). The price is that
  ``task.num_input_examples(split)`` is None, so mixtures over these tasks
  take explicit rates.
  """

  def dataset_fn(split: str, shuffle_files: bool,
                 seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # See the docstring.
    if split not in splits:
      raise ValueError(f"Task {name!r} has no split {split!r}; it has "
                       f"{', '.join(map(repr, splits))}.")
    examples = get_examples(split)
    if not examples:  # from_tensor_slices cannot type an empty list.
      return tf.data.Dataset.from_tensor_slices(
          {k: tf.constant([], tf.string) for k in keys})
    return tf.data.Dataset.from_tensor_slices(_columns(examples, keys))

  return _FixedOrderSource(dataset_fn, splits=tuple(splits))


def as_split_mapping(value: Any, what: str) -> Dict[str, Any]:
  """A list -> {"train": list}; a mapping of split -> list is kept."""
  if isinstance(value, Mapping):
    if not value:
      raise ValueError(f"{what} is an empty mapping; give split -> data.")
    for split in value:
      if not isinstance(split, str):
        raise ValueError(f"{what}: split names must be str, got {split!r}.")
    return dict(value)
  return {"train": value}
