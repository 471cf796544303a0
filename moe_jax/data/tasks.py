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

The examples themselves come from `moe_jax.data.synthetic` (plain NumPy); the
in-memory sources and the preprocessors live in `moe_jax.data.sources` and
`moe_jax.data.preprocessors`.

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
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple, Union)

import seqio

from moe_jax.data import metrics as metrics_lib
from moe_jax.data import vocabularies
from moe_jax.data.preprocessors import seq2seq_preprocessors, split_tokens_to_length
from moe_jax.data.sources import as_split_mapping, examples_source
from moe_jax.data.synthetic import (SYNTHETIC_KINDS, SYNTHETIC_MIX_RATES, SYNTHETIC_SEED,
                                    SYNTHETIC_SIZES, corpus_files, corpus_texts,  # noqa: F401
                                    synthetic_examples)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Example = Mapping[str, str]
MetricFn = Callable[..., Mapping[str, Any]]

DEFAULT_SPLITS = ("train", "validation")
# seqio's default shuffle buffer (examples); part of every iterator checkpoint.
SHUFFLE_BUFFER_SIZE = 1000

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
      return synthetic_examples(kind, split, num_examples=SYNTHETIC_SIZES[split], seed=seed)

    _add_task(
        name,
        overwrite=overwrite,
        source=examples_source(name, get_examples, DEFAULT_SPLITS,
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
        for split, texts in as_split_mapping(texts_or_fn,
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
      source=examples_source(name, get_examples, splits, ("targets",)),
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
  for split, split_examples in as_split_mapping(
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
      source=examples_source(name, by_split.__getitem__, tuple(by_split),
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
