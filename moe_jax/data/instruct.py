"""A small instruction mixture with answer choices, in the spirit of P3 / T0.

Ten generated tasks over five *skills*; each task is an instruction template
plus answer choices, so it can be scored by rank classification (pick the
choice the model gives the highest log-likelihood, see
``experiments.peft_sweep.analysis``). Six tasks are **held in** (multi-task training),
four are **held out** (evaluated zero-shot). Every held-out task needs a skill
some held-in task trains *and* an answer format some held-in task uses, in a
template no training example has; the knowledge itself is in the backbone's
pretraining corpus (:func:`fact_texts`), which states facts about the same
skills in plain sentences. That is T0's setting in miniature: a pretrained LM,
instruction-tuned on some task clusters, asked to do unseen ones.

Tasks (``instruct_`` + name; held in / out; example input -> choices):

=============== ==== ========================================================= ==============
name            held example input                                             choices
=============== ==== ========================================================= ==============
parity          in   ``Is 37 even or odd?``                                    even / odd
sentiment       in   ``Review: the food was awful. Positive or negative?``     positive / ...
contains        in   ``Does qwert contain the letter e? Yes or no?``           yes / no
is_larger       in   ``Is 41 larger than 17? Yes or no?``                      yes / no
larger          in   ``Which number is larger, 41 or 17?``                     41 / 17
first           in   ``Which letter does qwert start with: m, q or x?``        m / q / x
parity_yn       out  ``Is 37 an odd number? Yes or no?``                       yes / no
sentiment_yn    out  ``Review: the food was awful. Did they like it? Yes...``  yes / no
smaller         out  ``Which number is smaller, 41 or 17?``                    41 / 17
last            out  ``Which letter does qwert end with: m, t or x?``          m / t / x
=============== ==== ========================================================= ==============

Mixtures: ``instruct_held_in`` (the six, equal rates), ``instruct_held_out``
(the four) and ``instruct_all``. Pretraining tasks over the facts corpus:
``instruct_facts`` (seq2seq: a fact split at a random word into prefix and
continuation, T5's prefix-LM objective) and ``instruct_facts_lm`` (targets
only, for decoder LMs).

**Determinism and splits.** Examples are a pure function of ``(task, split,
num_examples, seed)`` (NumPy PCG64 seeded from them), cached. Every example
is about an *entity* (a number, a pair of numbers, a word, a review); an
entity belongs to ``validation`` iff the CRC32 of its key is 0 mod 5, so no
validation entity occurs in any training example or in the facts corpus:
validation measures a skill, not memory.

Vocabulary: `moe_jax.data.tasks.default_vocabulary` (bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Callable, Sequence

import numpy as np

from moe_jax.data import tasks as tasks_lib

Rng = np.random.Generator

INSTRUCT_SEED = 0
#: Default examples per task and split.
SIZES = {"train": 2000, "validation": 200}
#: An entity is a validation entity iff crc32(key) % VALIDATION_MODULUS == 0.
VALIDATION_MODULUS = 5
FACTS_SIZES = {"train": 20_000, "validation": 1_000}

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SUBJECTS = ("the food", "the service", "the movie", "the room", "the staff", "the music",
            "the book", "the game", "the hotel", "the show", "the trip", "the class")
POSITIVE = ("great", "lovely", "excellent", "wonderful", "superb", "amazing", "pleasant",
            "perfect", "fantastic", "charming")
NEGATIVE = ("awful", "terrible", "bad", "boring", "dreadful", "poor", "rude", "horrible",
            "dull", "broken")
ADVERBS = ("", "very ", "really ", "quite ", "truly ", "so ", "rather ", "a bit ")
#: Parity questions draw numbers below this.
MAX_NUMBER = 5000


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstructExample:
  """One instruction with its answer choices.

  Attributes:
    inputs: the instruction text (the prompt).
    choices: the answer choices, in the order rank classification scores them.
    label: index of the right choice.
  """

  inputs: str
  choices: tuple[str, ...]
  label: int

  @property
  def targets(self) -> str:
    return self.choices[self.label]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
  """A generated task.

  Attributes:
    name: seqio task name.
    skill: the skill it needs (``parity``, ``sentiment``, ``contains``,
      ``compare``, ``letter``).
    held_out: evaluated zero-shot, never trained on.
    make: ``make(rng, split) -> InstructExample | None`` (``None``: the drawn
      entity belongs to the other split; draw again).
  """

  name: str
  skill: str
  held_out: bool
  make: Callable[[Rng, str], "InstructExample | None"]


def _crc(text: str) -> int:
  return zlib.crc32(text.encode("utf-8"))


def entity_split(key: str) -> str:
  """``"validation"`` or ``"train"``: the split every example about this entity is in."""
  return "validation" if _crc(key) % VALIDATION_MODULUS == 0 else "train"


def _in_split(key: str, split: str) -> bool:
  return entity_split(key) == ("validation" if split != "train" else "train")


# ----------------------------------------------------------------------------- entities


def _word(rng: Rng) -> str:
  n = int(rng.integers(4, 7))
  return "".join(rng.choice(list(LETTERS), size=n, replace=False))


def _other_letters(rng: Rng, word: str, k: int) -> list[str]:
  pool = [c for c in LETTERS if c not in word]
  return [str(c) for c in rng.choice(pool, size=k, replace=False)]


def _pair(rng: Rng) -> tuple[int, int]:
  a, b = rng.choice(np.arange(10, 100), size=2, replace=False)
  return int(a), int(b)


def _review(rng: Rng) -> tuple[str, bool]:
  positive = bool(rng.integers(2))
  adj = str(rng.choice(POSITIVE if positive else NEGATIVE))
  adverb = ADVERBS[int(rng.integers(len(ADVERBS)))]
  return f"{rng.choice(SUBJECTS)} was {adverb}{adj}", positive


# ----------------------------------------------------------------------------- templates


def _parity(rng, split, *, yes_no: bool):
  n = int(rng.integers(0, MAX_NUMBER))
  if not _in_split(f"n{n}", split):
    return None
  if yes_no:
    return InstructExample(inputs=f"Is {n} an odd number? Yes or no?", choices=("yes", "no"),
                           label=0 if n % 2 else 1)
  return InstructExample(inputs=f"Is {n} even or odd?", choices=("even", "odd"), label=n % 2)


def _sentiment(rng, split, *, yes_no: bool):
  text, positive = _review(rng)
  if not _in_split(f"r{text}", split):
    return None
  question, choices = (("Did they like it? Yes or no?", ("yes", "no")) if yes_no
                       else ("Positive or negative?", ("positive", "negative")))
  return InstructExample(inputs=f"Review: {text}. {question}", choices=choices,
                         label=0 if positive else 1)


def _contains(rng, split):
  w = _word(rng)
  if not _in_split(f"w{w}", split):
    return None
  yes = bool(rng.integers(2))
  c = str(rng.choice(list(w))) if yes else _other_letters(rng, w, 1)[0]
  return InstructExample(inputs=f"Does {w} contain the letter {c}? Yes or no?",
                         choices=("yes", "no"), label=0 if yes else 1)


def _is_larger(rng, split):
  a, b = _pair(rng)
  if not _in_split(f"p{min(a, b)},{max(a, b)}", split):
    return None
  return InstructExample(inputs=f"Is {a} larger than {b}? Yes or no?", choices=("yes", "no"),
                         label=0 if a > b else 1)


def _which(rng, split, *, smaller: bool):
  a, b = _pair(rng)
  if not _in_split(f"p{min(a, b)},{max(a, b)}", split):
    return None
  word = "smaller" if smaller else "larger"
  return InstructExample(inputs=f"Which number is {word}, {a} or {b}?",
                         choices=(str(a), str(b)), label=0 if (a < b) == smaller else 1)


def _letter_choice(rng, split, *, last: bool):
  w = _word(rng)
  if not _in_split(f"w{w}", split):
    return None
  answer = w[-1] if last else w[0]
  choices = sorted([answer] + _other_letters(rng, w, 2))
  verb = "end with" if last else "start with"
  return InstructExample(
      inputs=f"Which letter does {w} {verb}: {choices[0]}, {choices[1]} or {choices[2]}?",
      choices=tuple(choices), label=choices.index(answer))


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(name="instruct_parity", skill="parity", held_out=False,
             make=functools.partial(_parity, yes_no=False)),
    TaskSpec(name="instruct_sentiment", skill="sentiment", held_out=False,
             make=functools.partial(_sentiment, yes_no=False)),
    TaskSpec(name="instruct_contains", skill="contains", held_out=False, make=_contains),
    TaskSpec(name="instruct_is_larger", skill="compare", held_out=False, make=_is_larger),
    TaskSpec(name="instruct_larger", skill="compare", held_out=False,
             make=functools.partial(_which, smaller=False)),
    TaskSpec(name="instruct_first", skill="letter", held_out=False,
             make=functools.partial(_letter_choice, last=False)),
    TaskSpec(name="instruct_parity_yn", skill="parity", held_out=True,
             make=functools.partial(_parity, yes_no=True)),
    TaskSpec(name="instruct_sentiment_yn", skill="sentiment", held_out=True,
             make=functools.partial(_sentiment, yes_no=True)),
    TaskSpec(name="instruct_smaller", skill="compare", held_out=True,
             make=functools.partial(_which, smaller=True)),
    TaskSpec(name="instruct_last", skill="letter", held_out=True,
             make=functools.partial(_letter_choice, last=True)),
)
TASK_NAMES = tuple(t.name for t in TASKS)
HELD_IN = tuple(t.name for t in TASKS if not t.held_out)
HELD_OUT = tuple(t.name for t in TASKS if t.held_out)
HELD_IN_MIXTURE = "instruct_held_in"
HELD_OUT_MIXTURE = "instruct_held_out"
ALL_MIXTURE = "instruct_all"
FACTS_TASK = "instruct_facts"
FACTS_LM_TASK = "instruct_facts_lm"


def task_spec(name: str) -> TaskSpec:
  for t in TASKS:
    if t.name == name:
      return t
  raise ValueError(f"unknown instruction task {name!r}; choose from {TASK_NAMES}")


@functools.lru_cache(maxsize=64)
def _examples_cached(name: str, split: str, num_examples: int, seed: int
                     ) -> tuple[InstructExample, ...]:
  spec = task_spec(name)
  rng = np.random.default_rng([seed, _crc(name), _crc(split)])
  out: list[InstructExample] = []
  seen: set[str] = set()
  for _ in range(200 * max(num_examples, 1)):
    if len(out) == num_examples:
      break
    ex = spec.make(rng, split)
    if ex is None:
      continue
    if split != "train":  # distinct evaluation examples; train may repeat
      if ex.inputs in seen:
        continue
      seen.add(ex.inputs)
    out.append(ex)
  if len(out) < num_examples:
    raise RuntimeError(f"{name}: could not draw {num_examples} distinct {split} examples; "
                       "ask for fewer")
  return tuple(out)


def instruct_examples(name: str, split: str, *, num_examples: int | None = None,
                      seed: int = INSTRUCT_SEED) -> list[InstructExample]:
  """The examples of one task split (deterministic, see the module docstring).

  Args:
    name: a task of :data:`TASK_NAMES`.
    split: ``"train"`` or ``"validation"`` (any other name draws validation entities).
    num_examples: default ``SIZES[split]`` (200 for other splits).
    seed: generation seed.
  """
  if num_examples is None:
    num_examples = SIZES.get(split, SIZES["validation"])
  if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
    raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
  return list(_examples_cached(name, split, num_examples, int(seed)))


# ----------------------------------------------------------------------------- facts corpus


def _fact(rng: Rng, split: str) -> str | None:
  kind = int(rng.integers(5))
  if kind == 0:
    n = int(rng.integers(0, MAX_NUMBER))
    ok = _in_split(f"n{n}", split)
    return f"{n} is an {'odd' if n % 2 else 'even'} number." if ok else None
  if kind == 1:
    text, positive = _review(rng)
    ok = _in_split(f"r{text}", split)
    return (f"The review {text} is {'positive' if positive else 'negative'}; they "
            f"{'liked' if positive else 'did not like'} it." if ok else None)
  if kind == 2:
    w = _word(rng)
    if not _in_split(f"w{w}", split):
      return None
    if rng.integers(2):
      return f"The word {w} contains the letter {str(rng.choice(list(w)))}."
    return f"The word {w} does not contain the letter {_other_letters(rng, w, 1)[0]}."
  if kind == 3:
    a, b = _pair(rng)
    if not _in_split(f"p{min(a, b)},{max(a, b)}", split):
      return None
    hi, lo = max(a, b), min(a, b)
    return f"{hi} is larger than {lo}." if rng.integers(2) else f"{lo} is smaller than {hi}."
  w = _word(rng)
  if not _in_split(f"w{w}", split):
    return None
  return f"The word {w} starts with {w[0]} and ends with {w[-1]}."


@functools.lru_cache(maxsize=8)
def _facts_cached(split: str, num: int, seed: int) -> tuple[str, ...]:
  rng = np.random.default_rng([seed, _crc("facts"), _crc(split)])
  out: list[str] = []
  while len(out) < num:
    f = _fact(rng, split)
    if f is not None:
      out.append(f)
  return tuple(out)


def fact_texts(split: str, *, num_examples: int | None = None,
               seed: int = INSTRUCT_SEED) -> list[str]:
  """Plain-sentence facts about the five skills (the backbones' pretraining corpus)."""
  num = FACTS_SIZES.get(split, FACTS_SIZES["validation"]) if num_examples is None \
      else num_examples
  return list(_facts_cached(split, int(num), int(seed)))


def _prefix_split(text: str, rng: Rng) -> dict[str, str]:
  words = text.split(" ")
  k = int(rng.integers(1, len(words)))
  return {"inputs": " ".join(words[:k]), "targets": " ".join(words[k:])}


def fact_prefix_examples(split: str, *, seed: int = INSTRUCT_SEED) -> list[dict[str, str]]:
  """``instruct_facts``: each fact split at a random word into inputs and targets."""
  rng = np.random.default_rng([seed, _crc("facts-prefix"), _crc(split)])
  return [_prefix_split(t, rng) for t in fact_texts(split, seed=seed)]


# ----------------------------------------------------------------------------- registration


def register_instruct_tasks() -> tuple[str, ...]:
  """Registers the ten tasks, the three mixtures and the two facts tasks (idempotent)."""
  for spec in TASKS:
    tasks_lib.register_in_memory_task(spec.name, {
        split: [{"inputs": e.inputs, "targets": e.targets}
                for e in instruct_examples(spec.name, split)]
        for split in ("train", "validation")})
  tasks_lib.register_mixture(HELD_IN_MIXTURE, [(n, 1.0) for n in HELD_IN])
  tasks_lib.register_mixture(HELD_OUT_MIXTURE, [(n, 1.0) for n in HELD_OUT])
  tasks_lib.register_mixture(ALL_MIXTURE, [(n, 1.0) for n in TASK_NAMES])
  tasks_lib.register_in_memory_task(
      FACTS_TASK, {s: fact_prefix_examples(s) for s in ("train", "validation")})
  tasks_lib.register_text_task(FACTS_LM_TASK, {s: fact_texts(s) for s in ("train", "validation")},
                               split_to_length=False)
  return TASK_NAMES + (HELD_IN_MIXTURE, HELD_OUT_MIXTURE, ALL_MIXTURE, FACTS_TASK,
                       FACTS_LM_TASK)


def by_task(names: Sequence[str], split: str, num_examples: int | None = None
            ) -> dict[str, list[InstructExample]]:
  """``{task: examples}`` for several tasks."""
  return {n: instruct_examples(n, split, num_examples=num_examples) for n in names}


register_instruct_tasks()
