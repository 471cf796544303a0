"""KV-arithmetic generation: the three views agree, splits are disjoint, keys as documented."""

import re

import pytest

from calm_jax.tasks import HINT_STYLES, LETTER_DIGITS, KVArithmetic


@pytest.fixture(scope="module")
def gen():
  return KVArithmetic(seed=3, num_keys=20, value_range=(1, 40), ops=("+", "-", "x"))


def test_keys_are_unique_strings_with_unique_values(gen):
  keys = list(gen.table)
  assert len(set(keys)) == 20 and all(2 <= len(k) <= 6 and k.isalpha() for k in keys)
  assert len(set(gen.table.values())) == 20
  assert len(gen.composition_keys) == 4 and set(gen.composition_keys) <= set(keys)


def test_views_are_consistent(gen):
  subs = gen.examples("kv_subs", "validation", 50)
  num = gen.examples("num_math", "validation", 50)
  kvm = gen.examples("kv_math", "validation", 50)
  for s in subs:
    operands = re.findall(r"<([a-z]+)>", s["inputs"])
    assert 3 <= len(operands) <= 6
    # substituting the table into the keyed expression gives the numeric one
    assert re.sub(r"<([a-z]+)>", lambda m: str(gen.table[m.group(1)]), s["inputs"]) \
        == s["targets"] + "="
  for n in num:  # python's precedence agrees with ours once x means *
    assert int(n["targets"]) == eval(n["inputs"][:-1].replace("x", "*"))
  for k in kvm:
    numeric = re.sub(r"<([a-z]+)>", lambda m: str(gen.table[m.group(1)]), k["inputs"][:-1])
    assert int(k["targets"]) == eval(numeric.replace("x", "*"))


def test_composition_training_uses_only_its_keys_and_never_eval_expressions(gen):
  train = gen.examples("kv_math", "train", 300)
  used = {k for ex in train for k in re.findall(r"<([a-z]+)>", ex["inputs"])}
  assert used <= set(gen.composition_keys)
  held_out = {ex["inputs"] for s in ("validation", "test") for ex in gen._eval_pool(s)}
  for task in ("kv_subs", "kv_math"):
    assert not {ex["inputs"] for ex in gen.examples(task, "train", 300)} & held_out
  test_keys = {k for ex in gen.examples("kv_math", "test", 100)
               for k in re.findall(r"<([a-z]+)>", ex["inputs"])}
  assert test_keys - set(gen.composition_keys)  # evaluation reaches unseen keys


def test_deterministic_and_validated():
  a = KVArithmetic(seed=1).examples("kv_math", "test", 5)
  assert a == KVArithmetic(seed=1).examples("kv_math", "test", 5)
  assert a != KVArithmetic(seed=2).examples("kv_math", "test", 5)
  with pytest.raises(ValueError, match="fewer than num_keys"):
    KVArithmetic(num_keys=50, value_range=(1, 10))
  with pytest.raises(ValueError, match="unknown KV task"):
    KVArithmetic().examples("kv_div", "train", 1)


def test_kv_task_reregisters_when_other_code_replaced_its_tasks():
  import seqio

  from calm_jax.tasks import kv_task, register_kv_tasks
  kw = dict(num_keys=12, value_range=(1, 12), num_train=8, num_eval=4, prefix="calm_stale_")
  name = kv_task("kv_math", **kw)
  first = seqio.TaskRegistry.get(name)
  assert kv_task("kv_math", **kw) == name and seqio.TaskRegistry.get(name) is first  # cached
  register_kv_tasks(KVArithmetic(seed=9, num_keys=12, value_range=(1, 12)),
                    prefix="calm_stale_", num_train=8, num_eval=4)  # same names, other data
  assert kv_task("kv_math", **kw) == name
  source = seqio.TaskRegistry.get(name).source.get_dataset(split="validation", shuffle=False)
  got = [ex["inputs"].decode() for ex in source.as_numpy_iterator()]
  want = KVArithmetic(num_keys=12, value_range=(1, 12)).examples("kv_math", "validation", 4)
  assert got == [ex["inputs"] for ex in want]  # kv_task's own data again, not seed 9's


@pytest.mark.parametrize("style", HINT_STYLES)
def test_kv_hints_are_kv_subs_with_true_values_after_some_keys(style):
  gen = KVArithmetic(seed=3, num_keys=20, value_range=(1, 40), hint_style=style)
  to_letters = str.maketrans("0123456789", LETTER_DIGITS)
  forwards = backwards = bare = 0
  for ex in gen.examples("kv_hints", "train", 200):
    values = [int(v) for v in re.split(r"[+\-x]", ex["targets"])]
    pieces = re.findall(r"<([a-z]+)>([0-9A-J]*)", ex["inputs"])
    assert [gen.table[k] for k, _ in pieces] == values  # targets: KV-SUBS of the same keys
    for key, hint in pieces:
      value = str(gen.table[key])
      units_first = {"forward": value, "either": value[::-1],
                     "lettered": value[::-1].translate(to_letters)}[style]
      assert hint in ("", value, units_first), (style, key, value, hint)
      bare += hint == ""
      forwards += hint == value and len(value) > 1
      backwards += hint == units_first != value
  assert min(forwards, bare) > 20
  assert backwards > 20 if style != "forward" else backwards == 0


def test_lettered_hints_name_the_place_of_the_first_digit():
  """After a key comes its tens digit (a digit) or its units digit (a letter)."""
  gen = KVArithmetic(seed=3, num_keys=20, value_range=(10, 99))
  assert gen.hint_style == "lettered"
  for ex in gen.examples("kv_hints", "train", 100):
    for key, hint in re.findall(r"<([a-z]+)>([0-9A-J]*)", ex["inputs"]):
      value = gen.table[key]
      if hint:
        first = hint[0]
        assert (int(first) == value // 10) if first.isdigit() else (
            LETTER_DIGITS.index(first) == value % 10)


def test_bad_hint_style_and_negative_values_are_named():
  with pytest.raises(ValueError, match="hint_style='sideways'"):
    KVArithmetic(hint_style="sideways")
  with pytest.raises(ValueError, match=r"value_range \(-5, 100\)"):
    KVArithmetic(value_range=(-5, 100))


def test_composition_keys_show_every_digit_in_every_place():
  covered = KVArithmetic(num_keys=100, value_range=(0, 99))
  values = [covered.table[k] for k in covered.composition_keys]
  assert len(values) == 20
  assert {v % 10 for v in values} == {v // 10 for v in values} == set(range(10))
  assert min(values) < 10  # a one-digit value too: the composition sees values of each length
  plain = KVArithmetic(num_keys=100, value_range=(0, 99), cover_digits=False)
  plain_values = [plain.table[k] for k in plain.composition_keys]
  assert len(plain_values) == 20 and {v % 10 for v in plain_values} != set(range(10))
  # too few keys to cover every digit: the best draw, deterministically
  few = KVArithmetic(num_keys=12, value_range=(1, 12))
  assert len(few.composition_keys) == 2
  assert few.composition_keys == KVArithmetic(num_keys=12, value_range=(1, 12)).composition_keys


def test_kv_tokenizer_keeps_each_key_whole_and_round_trips(gen):
  from calm_jax.tasks import kv_tokenizer, kv_vocabulary

  keyed, chars = kv_vocabulary(kv_tokenizer(gen)), kv_vocabulary(kv_tokenizer())
  assert keyed.vocab_size == chars.vocab_size + len(gen.table)
  ex = gen.examples("kv_math", "test", 1)[0]
  keys = re.findall(r"<[a-z]+>", ex["inputs"])
  ids = keyed.encode(ex["inputs"])
  assert len(ids) == len(chars.encode(ex["inputs"])) - sum(len(k) - 1 for k in keys)
  assert keyed.decode(ids) == chars.decode(chars.encode(ex["inputs"])) == ex["inputs"]
  assert keyed.encode("<qqqqqqq>") == chars.encode("<qqqqqqq>")  # unknown key: characters
  assert keyed.eos_id == 1 and keyed.pad_id == 0


def test_kv_tokenizer_numbers_are_digit_pairs_from_the_right(gen):
  from calm_jax.tasks import kv_tokenizer, kv_vocabulary

  tok = kv_tokenizer(gen, numbers=True)
  key = next(iter(gen.table))
  text = f"<{key}>+7-37=198-105+1005"
  assert tok.encode(text).tokens == [f"<{key}>", "+", "7", "-", "37", "=", "1", "98", "-", "1",
                                     "05", "+", "10", "05"]
  vocab = kv_vocabulary(tok)
  assert vocab.vocab_size == kv_vocabulary(kv_tokenizer(gen)).vocab_size + 100
  for ex in (gen.examples("num_math", "test", 20) + gen.examples("kv_subs", "test", 20)
             + gen.examples("kv_hints", "test", 20)):
    for s in (ex["inputs"], ex["targets"]):
      assert vocab.decode(vocab.encode(s)) == s
      assert 2 not in vocab.encode(s)  # no unk
