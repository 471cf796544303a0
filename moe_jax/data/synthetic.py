"""Synthetic seq2seq examples and the shipped text corpus, in plain NumPy.

The four synthetic kinds (copy, reverse, sort, arithmetic) are a pure function
of ``(kind, split, seed, size)`` (`synthetic_examples`); held-out inputs never
occur in train. The corpus is ``corpus/*.txt`` (self-written by
``corpus/generate_corpus.py``), one paragraph per line, split by the CRC32 of a
line's text (0 mod 10 goes to validation), so edits never move other lines
between splits. :mod:`moe_jax.data.tasks` registers seqio tasks over both.
"""

import functools
import os
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

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
  files = sorted(str(f) for f in Path(CORPUS_DIR).glob("*.txt"))
  if not files:
    raise FileNotFoundError(
        f"No corpus/*.txt files in {CORPUS_DIR!r}; the package was installed "
        "without its data files (package-data of moe_jax.data).")
  return files


@functools.lru_cache(maxsize=4)
def _corpus_splits(modulus: int) -> Dict[str, Tuple[str, ...]]:
  splits = {"train": [], "validation": []}
  for file in corpus_files():
    with open(file, encoding="utf-8") as f:
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
