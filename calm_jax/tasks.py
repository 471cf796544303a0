"""KV-arithmetic tasks of the CALM paper (Section 4.1), generated.

Keys are random 2-6 character strings, each mapped to a unique integer.
Three views of the same expressions:

* KV-SUBS:  ``<ab>+<cde>-<f>=``  ->  ``10+22-24``   (what m_A is trained on)
* NUM-MATH: ``10+22-24=``        ->  ``8``          (what m_B is trained on)
* KV-MATH:  ``<ab>+<cde>-<f>=``  ->  ``8``          (the composed skill)

and an optional fourth for m_A, KV-HINTS: KV-SUBS with some keys followed
by their value (``<ab>10+<cde>-<f>42=`` -> ``10+22-24``), written as
``hint_style`` says. Trained with the loss on its inputs too, it makes a
causal LM look every key's value up where the key is read; KV-SUBS alone
lets it look values up only where they are written out. To make it hold
*both* digits there, the token after a key must name either one: with
``"lettered"`` (the default) a hint is the value as written (``37``) or its
units digit first in letters ``A``-``J`` for 0-9 (``HD``), so the next token
is the tens digit, the units digit (as a letter) or an operator, never
ambiguous; ``"either"`` writes the digits forwards or backwards (``37`` or
``73``: the first token no longer says which place it is), ``"forward"``
only forwards (the only choice when a value is one token).

Expressions have ``num_operands`` operands joined by operators from ``ops``
(``x`` is multiplication, with the usual precedence). Composition training
uses KV-MATH over a fraction (20%) of the keys; evaluation uses held-out
KV-MATH expressions over all keys, so most of them contain keys that only
m_A knows. The composition keys are drawn so that their values show every
digit in every place (``cover_digits``): a random 20 of 100 values often
lack a units digit or two, and nothing trained on them can then write it
(nor a value with fewer digits than others: one shorter value is drawn too).

Everything is deterministic in ``seed``. The examples are plain
``{"inputs", "targets"}`` dicts, registered as seqio tasks by
:func:`register_kv_tasks` (byte vocabulary, shared by all models).
"""

from __future__ import annotations

import dataclasses
import json
import string
import zlib
from functools import cached_property

import numpy as np


#: The views :meth:`KVArithmetic.examples` makes (the first three are the paper's).
TASKS = ("kv_subs", "num_math", "kv_math", "kv_hints")
#: How KV-HINTS writes a value after its key (see the module docstring).
HINT_STYLES = ("lettered", "either", "forward")
#: The digits of a ``"lettered"`` hint written units first: 0-9 as A-J.
LETTER_DIGITS = "ABCDEFGHIJ"
_LETTER_DIGITS = str.maketrans("0123456789", LETTER_DIGITS)


def _digits_by_place(values, places: int) -> dict[int, set[str]]:
  """{place (0 = units): the digits values show there, "" where a value is shorter}."""
  out: dict[int, set[str]] = {}
  for v in values:
    digits = str(v)[::-1]
    for place in range(places):
      out.setdefault(place, set()).add(digits[place] if place < len(digits) else "")
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVArithmetic:
  """Generator of the three KV-arithmetic tasks.

  Attributes:
    seed: seeds keys, values and expressions.
    num_keys: how many keys (and distinct values).
    key_length: inclusive range of key lengths.
    value_range: inclusive range the unique values are drawn from.
    num_operands: inclusive range of operands per expression.
    ops: operators to draw from (``+``, ``-``, ``x``).
    composition_key_fraction: share of keys used in composition training.
    hint_style: how KV-HINTS writes a value after its key: ``"lettered"``,
      ``"either"`` or ``"forward"`` (see the module docstring).
    cover_digits: draw the composition keys again (up to 1000 times) until
      their values hold every digit each place has among all values; if no
      draw does, the one that covers most.
  """

  seed: int = 0
  num_keys: int = 100
  key_length: tuple[int, int] = (2, 6)
  value_range: tuple[int, int] = (1, 100)
  num_operands: tuple[int, int] = (3, 6)
  ops: tuple[str, ...] = ("+", "-", "x")
  composition_key_fraction: float = 0.2
  hint_style: str = "lettered"
  cover_digits: bool = True

  def __post_init__(self):
    lo, hi = self.value_range
    if hi - lo + 1 < self.num_keys:
      raise ValueError(f"value_range {self.value_range} has fewer than num_keys="
                       f"{self.num_keys} distinct values")
    if not set(self.ops) <= {"+", "-", "x"} or not self.ops:
      raise ValueError(f"ops must be a non-empty subset of '+', '-', 'x', got {self.ops}")
    if not 0 < self.composition_key_fraction <= 1:
      raise ValueError("composition_key_fraction must be in (0, 1]")
    if self.num_operands[0] < 2 or self.num_operands[0] > self.num_operands[1]:
      raise ValueError(f"bad num_operands range {self.num_operands}")
    if self.hint_style not in HINT_STYLES:
      raise ValueError(f"hint_style={self.hint_style!r}: expected one of {', '.join(HINT_STYLES)}")
    if lo < 0:
      raise ValueError(f"value_range {self.value_range}: values must be >= 0")

  @cached_property
  def table(self) -> dict[str, int]:
    """key -> value."""
    rng = np.random.default_rng([self.seed, 0])
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < self.num_keys:
      n = int(rng.integers(self.key_length[0], self.key_length[1] + 1))
      k = "".join(rng.choice(list(string.ascii_lowercase), n))
      if k not in seen:
        seen.add(k)
        keys.append(k)
    lo, hi = self.value_range
    values = rng.choice(np.arange(lo, hi + 1), self.num_keys, replace=False)
    return dict(zip(keys, map(int, values)))

  @cached_property
  def places(self) -> int:
    """Digit places of the longest value."""
    return len(str(max(self.table.values())))

  @cached_property
  def composition_keys(self) -> tuple[str, ...]:
    keys = list(self.table)
    n = max(1, round(self.composition_key_fraction * len(keys)))
    rng = np.random.default_rng([self.seed, 1])
    want = _digits_by_place(self.table.values(), self.places)
    best, best_score = None, -1
    for _ in range(1000 if self.cover_digits else 1):
      draw = [str(k) for k in rng.choice(keys, n, replace=False)]
      have = _digits_by_place((self.table[k] for k in draw), self.places)
      score = sum(len(have.get(place, set()) & digits) for place, digits in want.items())
      if score > best_score:
        best, best_score = draw, score
      if have == want:
        break
    return tuple(sorted(best))

  def _expressions(self, n: int, keys: tuple[str, ...], stream: int
                   ) -> list[tuple[list[str], list[str]]]:
    rng = np.random.default_rng([self.seed, 2, stream])
    out = []
    for _ in range(n):
      k = int(rng.integers(self.num_operands[0], self.num_operands[1] + 1))
      operands = [str(x) for x in rng.choice(keys, k)]
      ops = [str(x) for x in rng.choice(list(self.ops), k - 1)]
      out.append((operands, ops))
    return out

  @staticmethod
  def _join(operands: list[str], ops: list[str]) -> str:
    s = operands[0]
    for op, x in zip(ops, operands[1:]):
      s += op + x
    return s

  def evaluate(self, operands: list[str], ops: list[str]) -> int:
    """Integer value with ``x`` binding tighter than ``+``/``-``."""
    values = [self.table[k] for k in operands]
    terms, signs = [values[0]], []
    for op, v in zip(ops, values[1:]):
      if op == "x":
        terms[-1] *= v
      else:
        terms.append(v)
        signs.append(1 if op == "+" else -1)
    return terms[0] + sum(s * t for s, t in zip(signs, terms[1:]))

  def _views(self, operands, ops) -> dict[str, dict[str, str]]:
    keyed = self._join([f"<{k}>" for k in operands], ops)
    numeric = self._join([str(self.table[k]) for k in operands], ops)
    result = str(self.evaluate(operands, ops))
    return {"kv_subs": {"inputs": keyed + "=", "targets": numeric},
            "num_math": {"inputs": numeric + "=", "targets": result},
            "kv_math": {"inputs": keyed + "=", "targets": result},
            "kv_hints": {"inputs": self._hinted(operands, ops) + "=", "targets": numeric}}

  def _hinted(self, operands, ops) -> str:
    rng = np.random.default_rng([self.seed, 3, zlib.crc32(self._join(operands, ops).encode())])
    parts = []
    for k in operands:
      digits = str(self.table[k])
      if rng.random() < 0.5:  # hinted: the value, forwards or (units first) backwards
        backwards = self.hint_style != "forward" and rng.random() >= 0.5
        if backwards and self.hint_style == "lettered":
          digits = digits.translate(_LETTER_DIGITS)
        parts.append(f"<{k}>" + (digits[::-1] if backwards else digits))
      else:
        parts.append(f"<{k}>")
    return self._join(parts, ops)

  def examples(self, task: str, split: str, n: int) -> list[dict[str, str]]:
    """``n`` examples of ``task`` (one of :data:`TASKS`) for ``split``.

    All but ``kv_math`` draw operands from all keys; ``kv_math``
    training draws only from :attr:`composition_keys`, its ``validation`` /
    ``test`` splits from all keys. Validation and test expressions never occur
    in any training split.
    """
    if task not in TASKS:
      raise ValueError(f"unknown KV task {task!r}; expected one of {', '.join(TASKS)}")
    streams = {"train": 0, "validation": 1, "test": 2}
    if split not in streams:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(streams)}")
    keys = (self.composition_keys if task == "kv_math" and split == "train"
            else tuple(self.table))
    stream = streams[split] * 10 + TASKS.index(task)
    held_out = set()
    if split == "train":
      held_out = {ex["inputs"] for s in ("validation", "test")
                  for ex in self._eval_pool(s)}
    out = []
    for operands, ops in self._expressions(n * 4 + 64, keys, stream):  # a prefix of one stream
      view = self._views(operands, ops)
      if view["kv_math"]["inputs"] in held_out:
        continue
      out.append(view[task])
      if len(out) == n:
        return out
    raise RuntimeError(f"could not draw {n} distinct {task} examples")  # pragma: no cover

  @cached_property
  def _eval_cache(self) -> dict:
    return {}

  def _eval_pool(self, split: str, n: int = 512) -> list[dict[str, str]]:
    """The held-out KV-MATH expressions of a split (keyed inputs)."""
    if split not in self._eval_cache:
      stream = {"validation": 1, "test": 2}[split] * 10 + 2
      self._eval_cache[split] = [self._views(o, p)["kv_math"]
                                 for o, p in self._expressions(n, tuple(self.table), stream)]
    return self._eval_cache[split]


#: Every character the four views use, in id order after pad, EOS and unk
#: (``x``, the multiplication sign, is one of the letters; ``A``-``J`` are the
#: digits of lettered hints).
KV_ALPHABET = "0123456789+-=<>~" + string.ascii_lowercase + LETTER_DIGITS
#: The special tokens of :func:`kv_tokenizer`, ids 0, 1, 2.
KV_SPECIAL_TOKENS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}


def kv_tokenizer(gen: KVArithmetic | None = None, *, numbers: bool = False):
  """A `tokenizers.Tokenizer` for the KV tasks: one token per character.

  With ``gen``, each of its keys, brackets included (``<abc>``), is also one
  token (an added token, matched before the character model, as a trained
  tokenizer holds frequent strings whole). With ``numbers``, runs of digits
  are split into groups of two from the right (``198`` -> ``1 98``, ``105``
  -> ``1 05``), each group one token, as Llama 3's tokenizer groups digits in
  threes: every value 0-99 is then a single token. Ids: pad 0, EOS 1, unk 2,
  the characters of :data:`KV_ALPHABET`, the digit pairs ``00``-``99`` (with
  ``numbers``), then the keys in table order. Save it with ``.save(path)``;
  `moe_jax.data.vocabularies.HFTokenizerVocabulary` wraps it (see
  :func:`kv_vocabulary`).
  """
  import tokenizers
  from tokenizers import Regex, decoders, models, pre_tokenizers

  vocab = {KV_SPECIAL_TOKENS[name]: i for i, name in enumerate(("pad", "eos", "unk"))}
  for c in KV_ALPHABET:
    vocab[c] = len(vocab)
  pattern = "."
  if numbers:
    for n in range(100):
      vocab[f"{n:02d}"] = len(vocab)
    pattern = r"\d{1,2}(?=(?:\d\d)*(?!\d))|."  # digit pairs aligned to the number's end
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(KV_SPECIAL_TOKENS.values()))
  if gen is not None:
    tok.add_tokens([f"<{k}>" for k in gen.table])
  return tok


def kv_vocabulary(tokenizer):
  """The seqio vocabulary of a :func:`kv_tokenizer` (or its saved file)."""
  from moe_jax.data.vocabularies import HFTokenizerVocabulary
  return HFTokenizerVocabulary(tokenizer, **{f"{k}_id": v for k, v in KV_SPECIAL_TOKENS.items()})


def kv_tokenizer_files(tokenizer) -> dict[str, bytes]:
  """``tokenizer.json`` and ``special_tokens_map.json`` of a :func:`kv_tokenizer`.

  Saved next to a model, they give `moe_jax.api.load` its vocabulary (EOS
  and pad included: the map names them).
  """
  special = {f"{k}_token": v for k, v in KV_SPECIAL_TOKENS.items()}
  return {"tokenizer.json": tokenizer.to_str().encode(),
          "special_tokens_map.json": json.dumps(special).encode()}


def register_kv_tasks(gen: KVArithmetic, *, prefix: str = "calm_", num_train: int = 20000,
                      num_eval: int = 256, overwrite: bool = True, vocabulary=None,
                      tasks: tuple[str, ...] = TASKS[:3]) -> dict[str, str]:
  """Registers seqio tasks ``{prefix}{task}`` for ``tasks``; returns their names.

  ``vocabulary``: default bytes (`moe_jax.data.tasks.default_vocabulary`);
  :func:`kv_vocabulary` for one token per character or per key.
  """
  from moe_jax.data.tasks import register_in_memory_task

  names = {}
  for task in tasks:
    name = f"{prefix}{task}"
    register_in_memory_task(name, {
        "train": gen.examples(task, "train", num_train),
        "validation": gen.examples(task, "validation", num_eval),
        "test": gen.examples(task, "test", num_eval),
    }, vocabulary=vocabulary, overwrite=overwrite)
    names[task] = name
  return names


def kv_task(task: str = "kv_math", *, seed: int = 0, num_keys: int = 100,
            value_range: tuple[int, int] = (1, 100), num_operands: tuple[int, int] = (3, 6),
            ops: tuple[str, ...] = ("+", "-", "x"), composition_key_fraction: float = 0.2,
            num_train: int = 20000, num_eval: int = 256, prefix: str = "calm_") -> str:
  """Registers the three KV tasks of one generator and returns the seqio name of ``task``.

  The gin-facing form of :func:`register_kv_tasks` (``calm.kv_task`` in
  ``gin_configs/experiments/calm_*.gin``): a macro bound to
  ``@calm.kv_task()`` registers the tasks when the run's dataset is built.
  Registering the same generator again replaces the tasks with identical ones.
  """
  gen = KVArithmetic(seed=seed, num_keys=num_keys, value_range=tuple(value_range),
                     num_operands=tuple(num_operands), ops=tuple(ops),
                     composition_key_fraction=composition_key_fraction)
  names = _register_once(gen, prefix, num_train, num_eval)
  if task not in names:
    raise ValueError(f"calm.kv_task: unknown task {task!r}; expected one of {sorted(names)}")
  return names[task]


#: (generator, prefix, num_train, num_eval) -> {view: task name}, {task name: its seqio Task}
_REGISTERED: dict[tuple, tuple[dict[str, str], dict[str, object]]] = {}


def _register_once(gen: KVArithmetic, prefix: str, num_train: int, num_eval: int
                   ) -> dict[str, str]:
  # A gin macro bound to @calm.kv_task() is evaluated once per reference
  # (train data, eval data, metric eval): generate and register only once, but
  # again if other code has since registered other tasks under these names
  # (e.g. experiments.calm_kv_arithmetic with its own generator and the same prefix).
  import seqio

  key = (gen, prefix, num_train, num_eval)
  names, registered = _REGISTERED.get(key, ({}, {}))

  def current(name):
    try:
      return seqio.TaskRegistry.get(name)
    except ValueError:
      return None

  if not registered or any(current(n) is not t for n, t in registered.items()):
    names = register_kv_tasks(gen, prefix=prefix, num_train=num_train, num_eval=num_eval)
    _REGISTERED[key] = names, {n: current(n) for n in names.values()}
  return names
