"""seqio tasks and mixtures: synthetic tasks, a shipped corpus, in-memory data.

Importing this module registers, with the byte-level vocabulary
(`seqio.ByteVocabulary`: no files, no downloads):

==========================  ==================================  ===============
task / mixture              example                             features
==========================  ==================================  ===============
``synthetic_copy``          ``copy: qwe`` -> ``qwe``            inputs, targets
``synthetic_reverse``       ``reverse: qwe`` -> ``ewq``         inputs, targets
``synthetic_arithmetic``    ``12+7=`` -> ``19``                 inputs, targets
``synthetic_sort``          ``sort: qwe`` -> ``eqw``            inputs, targets
``synthetic_lm_text``       a paragraph of the shipped corpus   targets
``synthetic_mix``           the four seq2seq tasks, rates 1:1:2:1
==========================  ==================================  ===============

Every task has ``train`` and ``validation`` splits and scores with
`moe_jax.data.metrics.exact_match` (the seq2seq ones). The copy, reverse and
sort inputs carry a task prefix: without it a model trained on
``synthetic_mix`` could not tell which of the three answers is wanted.

Synthetic examples are a pure function of ``(kind, split, seed, size)``
(`synthetic_examples`), generated in NumPy when a dataset is first asked for
and held in memory; validation inputs never occur in train. The
``synthetic_lm_text`` corpus is ``moe_jax/data/corpus/*.txt`` (self-written by
``corpus/generate_corpus.py``), one paragraph per line; a line goes to
``validation`` when the CRC32 of its text is 0 mod 10, so edits to the corpus
never move other lines between splits.

Sources are `seqio.FunctionDataSource`s over
`tf.data.Dataset.from_tensor_slices` (pure TensorFlow ops, never
``from_generator``), so `tf.data` iterators over
these tasks can be checkpointed (`moe_jax.data.pipeline.DataIterator`). Each
split has one fixed order: ``shuffle_files`` and the seed are ignored at the
source. seqio then shards the examples per host (``ds.shard``) *before* its
task-level shuffle, which keeps per-host shards disjoint for any seed.

Registration is idempotent. A name this module registered (in this import or
an earlier one, e.g. after `importlib.reload`) is replaced, together with the
mixtures built on it when they are registered again, so re-running a notebook
cell that calls `register_in_memory_task` just works. A name registered by
other code is left alone and raises unless ``overwrite=True``.

Other vocabularies: `register_synthetic_tasks` (``tokenizer_path=`` for a
Hugging Face tokenizer, see `moe_jax.data.vocabularies`) registers the same
tasks under another prefix; `register_text_task` and
`register_in_memory_task` turn Python strings or ``{"inputs", "targets"}``
dicts into tasks.
"""

import difflib
import functools
import logging
import os
import zlib
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple, Union)

import numpy as np
import seqio
import tensorflow as tf

from moe_jax.data import metrics as metrics_lib
from moe_jax.data import vocabularies

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Example = Mapping[str, str]
MetricFn = Callable[..., Mapping[str, Any]]

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DEFAULT_SPLITS = ("train", "validation")
# seqio's default shuffle buffer (examples); part of every iterator checkpoint.
SHUFFLE_BUFFER_SIZE = 1000

SYNTHETIC_SEED = 0
SYNTHETIC_SIZES = {"train": 20_000, "validation": 1_000}
SYNTHETIC_KINDS = ("copy", "reverse", "arithmetic", "sort")
# Arithmetic is the hardest of the four (carries), so it is sampled twice as
# often; the rates are relative (seqio normalises them).
SYNTHETIC_MIX_RATES = {"copy": 1.0, "reverse": 1.0, "arithmetic": 2.0,
                       "sort": 1.0}
# Letters per example for copy / reverse / sort.
SYNTHETIC_MIN_LETTERS = 3
SYNTHETIC_MAX_LETTERS = 20
# Digits per arithmetic operand.
SYNTHETIC_MAX_DIGITS = 3
TEXT_VALIDATION_MODULUS = 10

# Marks the seqio Tasks / Mixtures this module created (so they may be
# replaced on re-registration). An attribute on the provider, not a module
# global, so it survives `importlib.reload` of this module.
_OWNER_ATTR = "_moe_jax_data_tasks"

_INPUT_FEATURES = ("inputs", "targets")

# ----------------------------------------------------------------------------
# Vocabulary and features.
# ----------------------------------------------------------------------------


def default_vocabulary(tokenizer_path: Optional[PathLike] = None
                      ) -> seqio.Vocabulary:
  """The vocabulary tasks get when none is given.

  Args:
    tokenizer_path: a Hugging Face tokenizer directory or ``tokenizer.json``;
      None for bytes.

  Returns:
    `seqio.ByteVocabulary` (259 ids: pad 0, EOS 1, UNK 2, then the UTF-8
    bytes; needs no files, which is why it is the default), or a
    `vocabularies.HFTokenizerVocabulary` for ``tokenizer_path``.
  """
  if tokenizer_path is None:
    return seqio.ByteVocabulary()
  return vocabularies.HFTokenizerVocabulary(tokenizer_path)


def output_features(vocabulary: seqio.Vocabulary, *,
                    inputs: bool = True) -> Dict[str, seqio.Feature]:
  """``{"inputs"?, "targets"}`` seqio features, EOS appended to both.

  Raises:
    ValueError: the vocabulary has no EOS id (seqio appends it to every
      example, and decoding stops at it).
  """
  if vocabulary.eos_id is None:
    raise ValueError(
        f"Vocabulary {vocabulary} has no EOS id, which seqio appends to every "
        "example; name one (e.g. HFTokenizerVocabulary(path, eos_id='</s>')).")
  features = {"targets": seqio.Feature(vocabulary=vocabulary, add_eos=True)}
  if inputs:
    features = {"inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
                **features}
  return features


# ----------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------


def _make_room(registry, kind: str, name: str, overwrite: bool) -> None:
  """Removes ``name`` from ``registry`` if allowed, else raises."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"A seqio {kind} name must be a non-empty str, got "
                     f"{name!r}.")
  if name not in registry.names():
    return
  existing = registry.get(name)
  if not (overwrite or getattr(existing, _OWNER_ATTR, False)):
    raise ValueError(
        f"A seqio {kind} named {name!r} is already registered by other code "
        f"({type(existing).__name__}); pass overwrite=True to replace it or "
        "pick another name.")
  logger.info("Replacing seqio %s %r.", kind, name)
  registry.remove(name)


def _add_task(name: str, *, overwrite: bool, **task_kwargs) -> seqio.Task:
  _make_room(seqio.TaskRegistry, "task", name, overwrite)
  if name in seqio.MixtureRegistry.names():
    logger.warning("Task %r shares its name with a registered mixture; "
                   "seqio.get_mixture_or_task returns the mixture.", name)
  task = seqio.TaskRegistry.add(name, **task_kwargs)
  setattr(task, _OWNER_ATTR, True)
  return task


def register_mixture(name: str,
                     tasks_and_rates: Union[Mapping[str, float],
                                            Sequence[Tuple[str, float]]],
                     *, overwrite: bool = False) -> seqio.Mixture:
  """Registers (or re-registers) a seqio Mixture of registered tasks.

  A mixture keeps the Task objects it was built with, so after replacing one
  of its tasks, register the mixture again to pick the new one up.

  Args:
    name: the mixture name.
    tasks_and_rates: task (or mixture) name -> relative sampling rate.
    overwrite: replace a mixture of that name registered by other code.

  Returns:
    The registered `seqio.Mixture`.

  Raises:
    ValueError: a task is not registered (close matches named), a rate is not
      positive, the tasks' features differ, or ``name`` is taken.
  """
  pairs = list(tasks_and_rates.items() if isinstance(tasks_and_rates, Mapping)
               else tasks_and_rates)
  if not pairs:
    raise ValueError(f"Mixture {name!r} needs at least one task.")
  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  for task_name, rate in pairs:
    if task_name not in known:
      raise ValueError(
          f"Mixture {name!r}: no seqio task or mixture named {task_name!r}"
          f"{_close_matches_hint(task_name, known)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or (
        not rate > 0):
      raise ValueError(f"Mixture {name!r}: rate of {task_name!r} must be a "
                       f"positive number, got {rate!r}.")
  _make_room(seqio.MixtureRegistry, "mixture", name, overwrite)
  mixture = seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in pairs])
  setattr(mixture, _OWNER_ATTR, True)
  return mixture


def _close_matches_hint(name: str, names: Iterable[str]) -> str:
  close = difflib.get_close_matches(name, sorted(names), n=5, cutoff=0.5)
  if close:
    return f"; close matches: {', '.join(map(repr, close))}."
  return "."


# ----------------------------------------------------------------------------
# Sources over in-memory examples.
# ----------------------------------------------------------------------------


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


def _examples_source(
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


def _as_split_mapping(value: Any, what: str) -> Dict[str, Any]:
  """A list -> {"train": list}; a mapping of split -> list is kept."""
  if isinstance(value, Mapping):
    if not value:
      raise ValueError(f"{what} is an empty mapping; give split -> data.")
    for split in value:
      if not isinstance(split, str):
        raise ValueError(f"{what}: split names must be str, got {split!r}.")
    return dict(value)
  return {"train": value}


# ----------------------------------------------------------------------------
# Synthetic tasks.
# ----------------------------------------------------------------------------

_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


def _letters(rng: np.random.Generator) -> str:
  n = rng.integers(SYNTHETIC_MIN_LETTERS, SYNTHETIC_MAX_LETTERS + 1)
  return _LETTERS[rng.integers(0, len(_LETTERS), n)].tobytes().decode("ascii")


def _number(rng: np.random.Generator) -> int:
  digits = rng.integers(1, SYNTHETIC_MAX_DIGITS + 1)
  return int(rng.integers(0, 10**digits))


def _copy(rng):
  s = _letters(rng)
  return {"inputs": f"copy: {s}", "targets": s}


def _reverse(rng):
  s = _letters(rng)
  return {"inputs": f"reverse: {s}", "targets": s[::-1]}


def _sort(rng):
  s = _letters(rng)
  return {"inputs": f"sort: {s}", "targets": "".join(sorted(s))}


def _arithmetic(rng):
  a, b = _number(rng), _number(rng)
  if rng.integers(0, 2):
    return {"inputs": f"{a}+{b}=", "targets": str(a + b)}
  a, b = max(a, b), min(a, b)  # Keep results non-negative.
  return {"inputs": f"{a}-{b}=", "targets": str(a - b)}


_GENERATORS = {"copy": _copy, "reverse": _reverse, "arithmetic": _arithmetic,
               "sort": _sort}


def _crc(text: str) -> int:
  return zlib.crc32(text.encode("utf-8"))


@functools.lru_cache(maxsize=64)
def _synthetic_examples_cached(kind: str, split: str, num_examples: int,
                               seed: int) -> Tuple[Dict[str, str], ...]:
  rng = np.random.default_rng([seed, _crc(kind), _crc(split)])
  exclude = set()
  if split != "train":  # Held-out inputs are never training inputs.
    train = _synthetic_examples_cached(kind, "train", SYNTHETIC_SIZES["train"],
                                       seed)
    exclude = {ex["inputs"] for ex in train}
  generate = _GENERATORS[kind]
  examples, seen = [], set()
  for _ in range(100 * num_examples):
    if len(examples) == num_examples:
      break
    ex = generate(rng)
    if ex["inputs"] in exclude:
      continue
    if split != "train":  # Distinct held-out examples; train may repeat.
      if ex["inputs"] in seen:
        continue
      seen.add(ex["inputs"])
    examples.append(ex)
  if len(examples) < num_examples:
    raise RuntimeError(f"Could not draw {num_examples} distinct held-out "
                       f"{kind!r} examples; ask for fewer.")
  return tuple(examples)


def synthetic_examples(kind: str, split: str, *,
                       num_examples: Optional[int] = None,
                       seed: int = SYNTHETIC_SEED) -> List[Dict[str, str]]:
  """The ``{"inputs", "targets"}`` examples of a synthetic task split.

  Deterministic in ``(kind, split, num_examples, seed)`` (NumPy's PCG64 seeded
  from those), and cached. Non-train inputs are distinct and never occur in
  the train split drawn with the same seed and default size.

  Args:
    kind: one of `SYNTHETIC_KINDS`.
    split: any split name; ``SYNTHETIC_SIZES`` gives the default sizes.
    num_examples: how many; default ``SYNTHETIC_SIZES[split]`` (1000 for
      other splits).
    seed: generation seed.

  Returns:
    A new list of new dicts (safe to mutate).
  """
  if kind not in _GENERATORS:
    raise ValueError(f"Unknown synthetic task kind {kind!r}; choose from "
                     f"{', '.join(map(repr, SYNTHETIC_KINDS))}.")
  if num_examples is None:
    num_examples = SYNTHETIC_SIZES.get(split, SYNTHETIC_SIZES["validation"])
  if isinstance(num_examples, bool) or not isinstance(num_examples, int) or (
      num_examples < 0):
    raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}.")
  return [dict(ex) for ex in
          _synthetic_examples_cached(kind, split, num_examples, int(seed))]


def corpus_files() -> List[str]:
  """The shipped ``corpus/*.txt`` files, sorted."""
  files = sorted(tf.io.gfile.glob(os.path.join(CORPUS_DIR, "*.txt")))
  if not files:
    raise FileNotFoundError(
        f"No corpus/*.txt files in {CORPUS_DIR!r}; the package was installed "
        "without its data files (package-data of moe_jax.data).")
  return files


@functools.lru_cache(maxsize=4)
def _corpus_splits(modulus: int) -> Dict[str, Tuple[str, ...]]:
  splits = {"train": [], "validation": []}
  for file in corpus_files():
    with tf.io.gfile.GFile(file, "r") as f:
      for line in f.read().splitlines():
        line = line.strip()
        if line:
          split = "validation" if _crc(line) % modulus == 0 else "train"
          splits[split].append(line)
  return {k: tuple(v) for k, v in splits.items()}


def corpus_texts(split: str) -> List[str]:
  """Paragraphs of the shipped corpus in ``split`` (train / validation)."""
  splits = _corpus_splits(TEXT_VALIDATION_MODULUS)
  if split not in splits:
    raise ValueError(f"The corpus has no split {split!r}; it has "
                     f"{', '.join(map(repr, splits))}.")
  return list(splits[split])


def register_synthetic_tasks(
    *,
    vocabulary: Optional[seqio.Vocabulary] = None,
    tokenizer_path: Optional[PathLike] = None,
    prefix: str = "synthetic",
    seed: int = SYNTHETIC_SEED,
    overwrite: bool = False,
) -> List[str]:
  """Registers the synthetic tasks and ``{prefix}_mix`` with a vocabulary.

  Importing this module calls it with the defaults. Call it again with another
  prefix for another vocabulary, e.g.
  ``register_synthetic_tasks(tokenizer_path="/ckpt/llama", prefix="llama")``
  gives ``llama_copy`` ... ``llama_mix``; a mixture needs one vocabulary.

  Args:
    vocabulary: the vocabulary of every feature.
    tokenizer_path: or a Hugging Face tokenizer to build it from; default
      (neither) `seqio.ByteVocabulary`.
    prefix: task names are ``{prefix}_{kind}``, ``{prefix}_lm_text``,
      ``{prefix}_mix``.
    seed: synthetic example seed (`synthetic_examples`).
    overwrite: replace same-named tasks registered by other code.

  Returns:
    The registered names, mixture last.
  """
  if vocabulary is not None and tokenizer_path is not None:
    raise ValueError("Give vocabulary or tokenizer_path, not both.")
  if vocabulary is None:
    vocabulary = default_vocabulary(tokenizer_path)
  names = []
  for kind in SYNTHETIC_KINDS:
    name = f"{prefix}_{kind}"

    def get_examples(split, kind=kind):
      return _synthetic_examples_cached(kind, split, SYNTHETIC_SIZES[split],
                                        seed)

    _add_task(
        name,
        overwrite=overwrite,
        source=_examples_source(name, get_examples, DEFAULT_SPLITS,
                                _INPUT_FEATURES),
        output_features=output_features(vocabulary),
        preprocessors=seq2seq_preprocessors(),
        metric_fns=[metrics_lib.exact_match],
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
    )
    names.append(name)
  lm_name = f"{prefix}_lm_text"
  register_text_task(lm_name, corpus_texts, vocabulary,
                     splits=DEFAULT_SPLITS, overwrite=overwrite)
  names.append(lm_name)
  mix_name = f"{prefix}_mix"
  register_mixture(
      mix_name, [(f"{prefix}_{k}", r) for k, r in SYNTHETIC_MIX_RATES.items()],
      overwrite=overwrite)
  names.append(mix_name)
  return names


# ----------------------------------------------------------------------------
# Preprocessors.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Tasks from user data.
# ----------------------------------------------------------------------------


def _check_texts(texts: Any, where: str) -> Tuple[str, ...]:
  if isinstance(texts, (str, bytes)):
    raise TypeError(f"{where} is a single string; give a list of documents "
                    "(e.g. wrap it in [...]).")
  try:
    texts = tuple(texts)
  except TypeError as err:
    raise TypeError(f"{where} must be an iterable of str, got "
                    f"{type(texts).__name__}.") from err
  for i, text in enumerate(texts):
    if isinstance(text, bytes):
      continue
    if not isinstance(text, str):
      raise TypeError(f"{where}[{i}] is a {type(text).__name__}, not a str.")
  texts = (t.decode("utf-8") if isinstance(t, bytes) else t for t in texts)
  return tuple(t for t in texts if t)  # An empty document has no tokens.


def register_text_task(
    name: str,
    texts_or_fn: Union[Sequence[str], Mapping[str, Sequence[str]],
                       Callable[[str], Iterable[str]]],
    vocabulary: Optional[seqio.Vocabulary] = None,
    *,
    splits: Optional[Sequence[str]] = None,
    split_to_length: bool = True,
    metric_fns: Sequence[MetricFn] = (),
    shuffle_buffer_size: Optional[int] = SHUFFLE_BUFFER_SIZE,
    overwrite: bool = False,
) -> seqio.Task:
  """Registers a language-modelling task (``targets`` only) over texts.

  The texts are held in memory (`tf.data.Dataset.from_tensor_slices`, so
  iterators over it checkpoint). For corpora that do not fit, register a
  `seqio.Task` over `seqio.TextLineDataSource` files instead.

  Args:
    name: the task name.
    texts_or_fn: documents, as a list (the ``train`` split), a mapping
      split -> list, or a function ``fn(split) -> iterable of str`` (called
      once per split, on first use). Empty strings are dropped.
    vocabulary: default `default_vocabulary()` (bytes).
    splits: the splits ``texts_or_fn`` serves when it is a function; default
      train and validation. Not allowed with a list or mapping.
    split_to_length: split long documents into sequence-length pieces
      (`split_tokens_to_length`) instead of truncating them.
    metric_fns: seqio metric functions (none by default: there is no right
      answer to score an LM against).
    shuffle_buffer_size: examples buffered by seqio's task-level shuffle.
    overwrite: replace a task of that name registered by other code.

  Returns:
    The registered `seqio.Task`.
  """
  if callable(texts_or_fn) and not isinstance(texts_or_fn, Mapping):
    fn = texts_or_fn
    splits = tuple(splits) if splits is not None else DEFAULT_SPLITS
    cache: Dict[str, Tuple[str, ...]] = {}

    def get_texts(split):
      if split not in cache:
        cache[split] = _check_texts(fn(split),
                                    f"{name}: texts_or_fn({split!r})")
      return cache[split]
  else:
    if splits is not None:
      raise ValueError(f"{name}: splits is only for a function texts_or_fn; "
                       "a list is the train split, a mapping names its own.")
    by_split = {
        split: _check_texts(texts, f"{name}: texts[{split!r}]")
        for split, texts in _as_split_mapping(texts_or_fn,
                                              f"{name}: texts").items()}
    splits = tuple(by_split)
    get_texts = by_split.__getitem__

  def get_examples(split):
    return [{"targets": t} for t in get_texts(split)]

  if vocabulary is None:
    vocabulary = default_vocabulary()
  tokenize = functools.partial(seqio.preprocessors.tokenize,
                               copy_pretokenized=not split_to_length)
  last = (split_tokens_to_length if split_to_length
          else seqio.preprocessors.append_eos_after_trim)
  return _add_task(
      name,
      overwrite=overwrite,
      source=_examples_source(name, get_examples, splits, ("targets",)),
      output_features=output_features(vocabulary, inputs=False),
      preprocessors=[tokenize, seqio.CacheDatasetPlaceholder(), last],
      metric_fns=list(metric_fns),
      shuffle_buffer_size=shuffle_buffer_size,
  )


def _check_examples(
    name: str, split: str, examples: Any
) -> Tuple[Tuple[str, ...], Tuple[Dict[str, str], ...]]:
  """Validates one split's examples; returns (feature keys, examples)."""
  where = f"{name}: examples[{split!r}]"
  if isinstance(examples, (str, bytes, Mapping)):
    raise TypeError(f"{where} must be a list of dicts, got a "
                    f"{type(examples).__name__}.")
  examples = tuple(examples)
  if not examples:
    raise ValueError(f"{where} is empty.")
  keys = None
  checked = []
  for i, ex in enumerate(examples):
    if not isinstance(ex, Mapping):
      raise TypeError(f"{where}[{i}] is a {type(ex).__name__}, expected a dict "
                      "with 'targets' (and 'inputs').")
    unknown = sorted(set(ex) - set(_INPUT_FEATURES))
    if unknown:
      raise ValueError(f"{where}[{i}] has key(s) {unknown}; only 'inputs' and "
                       "'targets' are features.")
    if "targets" not in ex:
      raise ValueError(f"{where}[{i}] has no 'targets'.")
    ex_keys = tuple(k for k in _INPUT_FEATURES if k in ex)
    if keys is None:
      keys = ex_keys
    elif ex_keys != keys:
      raise ValueError(f"{where}[{i}] has keys {list(ex_keys)} but the first "
                       f"example has {list(keys)}; all must match.")
    row = {}
    for k in keys:
      value = ex[k]
      if isinstance(value, bytes):
        value = value.decode("utf-8")
      if not isinstance(value, str):
        raise TypeError(f"{where}[{i}][{k!r}] is a {type(value).__name__}, "
                        "not a str.")
      row[k] = value
    checked.append(row)
  return keys, tuple(checked)


def register_in_memory_task(
    name: str,
    examples: Union[Sequence[Example], Mapping[str, Sequence[Example]]],
    vocabulary: Optional[seqio.Vocabulary] = None,
    metric_fns: Optional[Sequence[MetricFn]] = None,
    *,
    postprocess_fn: Optional[Callable[..., Any]] = None,
    shuffle_buffer_size: Optional[int] = SHUFFLE_BUFFER_SIZE,
    overwrite: bool = False,
) -> seqio.Task:
  """Registers a task over a list of ``{"inputs", "targets"}`` string dicts.

  Examples with ``inputs`` make a seq2seq task (train with the ``enc_dec`` or
  ``prefix_lm`` / ``decoder`` converters); ``targets`` alone make an LM task.
  Preprocessing is `seq2seq_preprocessors` (documents longer than the
  sequence are truncated; use `register_text_task` for long LM documents).

  Args:
    name: the task name.
    examples: a list (the ``train`` split) or a mapping split -> list, e.g.
      ``{"train": [...], "validation": [...]}``. Every example of a task has
      the same keys.
    vocabulary: default `default_vocabulary()` (bytes).
    metric_fns: seqio metric functions; default `metrics.exact_match` for
      seq2seq examples, none for targets-only.
    postprocess_fn: seqio postprocessing of decoded outputs and targets.
    shuffle_buffer_size: examples buffered by seqio's task-level shuffle.
    overwrite: replace a task of that name registered by other code.

  Returns:
    The registered `seqio.Task`.

  Raises:
    TypeError / ValueError: an example is not a dict of str, has keys other
      than inputs/targets, lacks targets, or differs in keys from the others
      (the message names the split and index).
  """
  by_split = {}
  keys = None
  for split, split_examples in _as_split_mapping(
      examples, f"{name}: examples").items():
    split_keys, by_split[split] = _check_examples(name, split, split_examples)
    if keys is not None and split_keys != keys:
      raise ValueError(f"{name}: split {split!r} has features "
                       f"{list(split_keys)}, other splits have {list(keys)}.")
    keys = split_keys
  has_inputs = "inputs" in keys
  if metric_fns is None:
    metric_fns = [metrics_lib.exact_match] if has_inputs else []
  if vocabulary is None:
    vocabulary = default_vocabulary()
  return _add_task(
      name,
      overwrite=overwrite,
      source=_examples_source(name, by_split.__getitem__, tuple(by_split),
                              keys),
      output_features=output_features(vocabulary, inputs=has_inputs),
      preprocessors=seq2seq_preprocessors(),
      postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns),
      shuffle_buffer_size=shuffle_buffer_size,
  )


SYNTHETIC_TASK_NAMES = tuple(f"synthetic_{k}" for k in SYNTHETIC_KINDS) + (
    "synthetic_lm_text",)
SYNTHETIC_MIXTURE_NAME = "synthetic_mix"

register_synthetic_tasks()
