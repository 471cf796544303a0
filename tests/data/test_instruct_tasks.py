"""The instruction tasks of the PEFT sweep: deterministic, distinguishable, honest splits."""

import collections
import re

import numpy as np
import pytest
import seqio

from moe_jax.data import instruct


def test_examples_are_deterministic_and_seeded():
  for name in instruct.TASK_NAMES:
    a = instruct.instruct_examples(name, "validation", num_examples=20)
    b = instruct.instruct_examples(name, "validation", num_examples=20)
    assert a == b
    c = instruct.instruct_examples(name, "validation", num_examples=20, seed=1)
    assert a != c, name


def test_labels_and_choices_are_well_formed():
  for name in instruct.TASK_NAMES:
    exs = instruct.instruct_examples(name, "validation")
    assert len({e.inputs for e in exs}) == len(exs), f"{name}: repeated validation inputs"
    counts = collections.Counter(e.label for e in exs)
    for ex in exs:
      assert 2 <= len(ex.choices) <= 3 and len(set(ex.choices)) == len(ex.choices)
      assert all(isinstance(c, str) for c in ex.choices)
      assert ex.targets == ex.choices[ex.label]
    # no answer position is a free win
    assert max(counts.values()) / len(exs) < 0.6, (name, counts)


def _template_words(name):
  sets = [set(re.findall(r"[A-Za-z]+", e.inputs))
          for e in instruct.instruct_examples(name, "train", num_examples=200)]
  return frozenset(set.intersection(*sets))


def test_tasks_are_distinguishable_by_their_template():
  templates = {name: _template_words(name) for name in instruct.TASK_NAMES}
  for a in instruct.TASK_NAMES:
    assert templates[a], f"{a} has no fixed instruction words"
    for b in instruct.TASK_NAMES:
      if a < b:
        assert templates[a] != templates[b], (a, b)
  inputs = collections.Counter(e.inputs for n in instruct.TASK_NAMES
                               for e in instruct.instruct_examples(n, "validation"))
  assert max(inputs.values()) == 1


def test_answers_are_right():
  for ex in instruct.instruct_examples("instruct_parity", "validation", num_examples=50):
    n = int(re.search(r"\d+", ex.inputs).group())
    assert ex.targets == ("odd" if n % 2 else "even")
  for ex in instruct.instruct_examples("instruct_smaller", "validation", num_examples=50):
    a, b = map(int, re.findall(r"\d+", ex.inputs))
    assert ex.targets == str(min(a, b))
  for ex in instruct.instruct_examples("instruct_last", "validation", num_examples=50):
    word = re.search(r"does (\w+) end", ex.inputs).group(1)
    assert ex.targets == word[-1]
  for ex in instruct.instruct_examples("instruct_contains", "validation", num_examples=50):
    word, letter = re.search(r"Does (\w+) contain the letter (\w)", ex.inputs).groups()
    assert ex.targets == ("yes" if letter in word else "no")


def test_validation_entities_never_seen_in_training_or_pretraining():
  def numbers(texts):
    return {int(x) for t in texts for x in re.findall(r"\b\d+\b", t)}

  val = numbers(e.inputs for e in instruct.instruct_examples("instruct_parity", "validation"))
  train = numbers(e.inputs for e in instruct.instruct_examples("instruct_parity", "train"))
  facts = numbers(t for t in instruct.fact_texts("train") if "number." in t)
  assert val and not val & train and not val & facts
  words = lambda texts: {w for t in texts for w in re.findall(r"\b[a-z]{4,6}\b", t)}
  val_words = {re.search(r"does (\w+) end", e.inputs).group(1)
               for e in instruct.instruct_examples("instruct_last", "validation")}
  assert not val_words & words(instruct.fact_texts("train"))


def test_held_out_tasks_share_a_skill_with_held_in_tasks():
  held_in_skills = {instruct.task_spec(n).skill for n in instruct.HELD_IN}
  assert len(instruct.TASK_NAMES) >= 8 and len(instruct.HELD_OUT) >= 3
  for name in instruct.HELD_OUT:
    assert instruct.task_spec(name).skill in held_in_skills, name
  with pytest.raises(ValueError, match="unknown instruction task"):
    instruct.task_spec("instruct_nope")


def test_registered_with_seqio():
  mix = seqio.get_mixture_or_task(instruct.HELD_IN_MIXTURE)
  assert sorted(t.name for t in mix.tasks) == sorted(instruct.HELD_IN)
  task = seqio.get_mixture_or_task("instruct_larger")
  ds = task.get_dataset({"inputs": 80, "targets": 12}, split="validation", shuffle=False)
  exs = instruct.instruct_examples("instruct_larger", "validation")
  vocab = task.output_features["targets"].vocabulary
  for ex, row in zip(exs[:5], ds.take(5).as_numpy_iterator()):
    assert vocab.decode(row["inputs"].tolist()[:-1]) == ex.inputs
    assert vocab.decode(row["targets"].tolist()[:-1]) == ex.targets
  facts = seqio.get_mixture_or_task(instruct.FACTS_TASK)
  row = next(facts.get_dataset({"inputs": 48, "targets": 48}, split="train",
                               shuffle=False).as_numpy_iterator())
  joined = (row["inputs_pretokenized"] + b" " + row["targets_pretokenized"]).decode()
  assert joined == instruct.fact_texts("train")[0]
  assert np.all(row["targets"][-1:] == 1)  # EOS
