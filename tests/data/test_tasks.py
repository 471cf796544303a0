"""Tests for moe_jax.data.tasks and moe_jax.data.metrics."""
import importlib

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tokenizers = pytest.importorskip("tokenizers")

from moe_jax.data import metrics  # noqa: E402
from moe_jax.data import tasks  # noqa: E402
from moe_jax.data import vocabularies  # noqa: E402

SEQ2SEQ = {"inputs": 64, "targets": 32}


def _examples(task_or_name, split="validation", lengths=None, n=None):
  provider = (seqio.get_mixture_or_task(task_or_name)
              if isinstance(task_or_name, str) else task_or_name)
  if lengths is None:
    lengths = (SEQ2SEQ if "inputs" in provider.output_features
               else {"targets": 64})
  ds = provider.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
  if n is not None:
    ds = ds.take(n)
  return [{k: v.numpy() for k, v in ex.items()} for ex in ds]


def _text(ex, key, vocab=None):
  vocab = vocab or seqio.ByteVocabulary()
  return vocab.decode(ex[key].tolist())


# -- registered tasks ----------------------------------------------------------


@pytest.mark.parametrize("name", tasks.SYNTHETIC_TASK_NAMES)
def test_every_task_yields_tokenized_examples(name):
  # The validation splits are read by the tests below.
  exs = _examples(name, "train", n=8)
  assert len(exs) == 8
  task = seqio.get_mixture_or_task(name)
  eos = task.output_features["targets"].vocabulary.eos_id
  seq2seq = "inputs" in task.output_features
  for ex in exs:
    for key in task.output_features:
      assert ex[key].dtype == np.int32 and ex[key].ndim == 1
      assert 1 <= len(ex[key]) <= (SEQ2SEQ[key] if seq2seq else 64)
    if seq2seq:  # LM pieces end in EOS only at a document's end.
      assert ex["inputs"][-1] == ex["targets"][-1] == eos
      # Pretokenized text is kept for seqio's evaluator.
      assert _text(ex, "targets") == ex["targets_pretokenized"].decode()
      assert _text(ex, "inputs") == ex["inputs_pretokenized"].decode()


def test_task_definitions():
  for name in tasks.SYNTHETIC_TASK_NAMES:
    task = seqio.TaskRegistry.get(name)
    assert set(task.splits) == {"train", "validation"}
    assert isinstance(task.source, seqio.FunctionDataSource)
    assert isinstance(task.output_features["targets"].vocabulary,
                      seqio.ByteVocabulary)
    assert task.supports_caching  # CacheDatasetPlaceholder is there.
  for kind in tasks.SYNTHETIC_KINDS:
    task = seqio.TaskRegistry.get(f"synthetic_{kind}")
    assert list(task.output_features) == ["inputs", "targets"]
    assert task.metric_fns == [metrics.exact_match]
  lm = seqio.TaskRegistry.get("synthetic_lm_text")
  assert list(lm.output_features) == ["targets"]
  mix = seqio.MixtureRegistry.get(tasks.SYNTHETIC_MIXTURE_NAME)
  assert sorted(t.name for t in mix.tasks) == sorted(
      f"synthetic_{k}" for k in tasks.SYNTHETIC_KINDS)
  assert mix.get_rate(seqio.TaskRegistry.get("synthetic_arithmetic")) == 2.0


def test_mixture_yields_examples_of_all_tasks():
  mix = seqio.get_mixture_or_task("synthetic_mix")
  ds = mix.get_dataset(SEQ2SEQ, split="train", shuffle=True, seed=3,
                       num_epochs=None, copy_pretokenized=True)
  prefixes = set()
  for ex in ds.take(60):
    text = ex["inputs_pretokenized"].numpy().decode()
    prefixes.add(text.split(":")[0] if ":" in text else "arithmetic")
  assert prefixes == {"copy", "reverse", "sort", "arithmetic"}


def test_synthetic_examples_are_correct_and_deterministic():
  for kind in tasks.SYNTHETIC_KINDS:
    a = tasks.synthetic_examples(kind, "validation", num_examples=50)
    assert a == tasks.synthetic_examples(kind, "validation", num_examples=50)
    assert a != tasks.synthetic_examples(kind, "validation", num_examples=50,
                                         seed=1)
    for ex in a:
      x, y = ex["inputs"], ex["targets"]
      if kind == "arithmetic":
        lhs, op, rhs = x[:-1].partition("+" if "+" in x else "-")
        assert x.endswith("=") and op and y == str(
            int(lhs) + int(rhs) if op == "+" else int(lhs) - int(rhs))
        assert int(y) >= 0
      else:
        assert x.startswith(kind + ": ")
        letters = x[len(kind) + 2:]
        want = {"copy": letters, "reverse": letters[::-1],
                "sort": "".join(sorted(letters))}[kind]
        assert y == want and letters.isalpha()


def test_validation_inputs_are_distinct_and_unseen_in_train():
  for kind in tasks.SYNTHETIC_KINDS:
    train = {ex["inputs"] for ex in tasks.synthetic_examples(kind, "train")}
    val = [ex["inputs"] for ex in tasks.synthetic_examples(kind, "validation")]
    assert len(val) == tasks.SYNTHETIC_SIZES["validation"]
    assert len(set(val)) == len(val)
    assert not train & set(val)


def test_unknown_kind_and_split_are_named():
  with pytest.raises(ValueError, match="'copyy'.*'copy'"):
    tasks.synthetic_examples("copyy", "train")
  task = seqio.TaskRegistry.get("synthetic_copy")
  with pytest.raises(ValueError, match="'synthetic_copy' has no split 'test'"):
    task.source.get_dataset(split="test")


def test_lm_text_task_uses_shipped_corpus_and_keeps_every_token():
  files = tasks.corpus_files()
  assert len(files) >= 3
  total = sum(tf.io.gfile.stat(f).length for f in files)
  assert 50_000 <= total <= 150_000
  train, val = tasks.corpus_texts("train"), tasks.corpus_texts("validation")
  assert len(val) > 10 and len(train) > 10 * len(val) // 2
  assert not set(train) & set(val)
  # Long paragraphs are split into length-16 pieces, only the last with EOS.
  pieces = _examples("synthetic_lm_text", "validation", {"targets": 16})
  vocab = seqio.ByteVocabulary()
  ids = np.concatenate([p["targets"] for p in pieces]).tolist()
  assert all(len(p["targets"]) <= 16 for p in pieces)
  docs = vocab.decode  # Split the id stream at EOS back into documents.
  joined, start = [], 0
  for i, t in enumerate(ids):
    if t == vocab.eos_id:
      joined.append(docs(ids[start:i]))
      start = i + 1
  assert joined == val


# -- idempotence ---------------------------------------------------------------


def test_reimport_and_reregistration_do_not_raise():
  before = sorted(seqio.TaskRegistry.names())
  importlib.reload(tasks)  # Registers everything again.
  tasks.register_synthetic_tasks()
  assert sorted(seqio.TaskRegistry.names()) == before
  mix = seqio.MixtureRegistry.get("synthetic_mix")
  # The mixture holds the re-registered tasks, not stale ones.
  for task in mix.tasks:
    assert task is seqio.TaskRegistry.get(task.name)
  assert len(_examples("synthetic_copy", n=2)) == 2


def test_names_registered_by_other_code_are_protected():
  name = "test_tasks_foreign_task"
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(
          lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(
              {"targets": ["a"]}), splits=["train"]),
      output_features=tasks.output_features(seqio.ByteVocabulary(),
                                            inputs=False))
  try:
    with pytest.raises(ValueError, match=f"'{name}' is already registered"):
      tasks.register_in_memory_task(name, [{"targets": "x"}])
    task = tasks.register_in_memory_task(name, [{"targets": "x"}],
                                         overwrite=True)
    assert seqio.TaskRegistry.get(name) is task
  finally:
    seqio.TaskRegistry.remove(name)


# -- user data -----------------------------------------------------------------


def test_register_in_memory_task():
  name = "test_tasks_in_memory"
  examples = {
      "train": [{"inputs": f"q{i}", "targets": f"a{i}"} for i in range(5)],
      "validation": [{"inputs": "hello", "targets": "world"}],
  }
  task = tasks.register_in_memory_task(name, examples)
  assert seqio.get_mixture_or_task(name) is task
  assert set(task.splits) == {"train", "validation"}
  assert task.metric_fns == [metrics.exact_match]
  got = _examples(name, "train")
  assert [_text(ex, "inputs") for ex in got] == [f"q{i}" for i in range(5)]
  assert [_text(ex, "targets") for ex in got] == [f"a{i}" for i in range(5)]
  # Re-registering (a re-run notebook cell) replaces the task.
  task2 = tasks.register_in_memory_task(name, [{"targets": "only"}])
  assert seqio.TaskRegistry.get(name) is task2
  assert list(task2.output_features) == ["targets"]
  assert task2.metric_fns == [] and task2.splits == ("train",)
  seqio.TaskRegistry.remove(name)


@pytest.mark.parametrize("examples, error, match", [
    ([], ValueError, r"examples\['train'\] is empty"),
    ("abc", TypeError, "must be a list of dicts"),
    ([{"inputs": "a"}], ValueError, r"\[0\] has no 'targets'"),
    ([{"targets": "a"}, {"targets": "b", "extra": "c"}], ValueError,
     r"\[1\] has key\(s\) \['extra'\]"),
    ([{"inputs": "a", "targets": "b"}, {"targets": "c"}], ValueError,
     r"\[1\] has keys \['targets'\] but the first"),
    ([{"targets": 3}], TypeError, r"\['targets'\] is a int"),
    ([["a", "b"]], TypeError, r"\[0\] is a list"),
])
def test_in_memory_task_errors_name_the_example(examples, error, match):
  with pytest.raises(error, match=match):
    tasks.register_in_memory_task("test_tasks_bad", examples)
  assert "test_tasks_bad" not in seqio.TaskRegistry.names()


def test_register_text_task_forms():
  name = "test_tasks_text"
  docs = ["short doc", "", "a much longer document " * 3]
  task = tasks.register_text_task(name, docs)
  assert task.splits == ("train",)
  pieces = _examples(name, "train", {"targets": 8})
  vocab = seqio.ByteVocabulary()
  assert [len(p["targets"]) for p in pieces] == [8, 2] + [8] * 8 + [6]
  assert vocab.decode(np.concatenate([p["targets"] for p in pieces[2:]])
                      .tolist()) == docs[2]
  # A function of the split, without splitting (seqio truncates instead).
  task = tasks.register_text_task(
      name, lambda split: [f"{split} text"] * 2, split_to_length=False)
  assert set(task.splits) == {"train", "validation"}
  got = _examples(name, "validation", {"targets": 6})
  assert [_text(ex, "targets") for ex in got] == ["valid"] * 2
  assert got[0]["targets_pretokenized"] == b"validation text"
  with pytest.raises(TypeError, match="single string"):
    tasks.register_text_task(name, "just one string")
  with pytest.raises(ValueError, match="splits is only for a function"):
    tasks.register_text_task(name, ["a"], splits=["train"])
  seqio.TaskRegistry.remove(name)


def test_register_mixture_errors():
  with pytest.raises(ValueError, match="close matches: 'synthetic_copy'"):
    tasks.register_mixture("test_tasks_mix", {"synthetic_cpy": 1.0})
  with pytest.raises(ValueError, match="must be a positive number"):
    tasks.register_mixture("test_tasks_mix", {"synthetic_copy": 0})


def test_synthetic_tasks_with_a_hugging_face_tokenizer(tmp_path):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(
      [ex["inputs"] + " " + ex["targets"]
       for ex in tasks.synthetic_examples("copy", "validation")], trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="has no EOS id"):
    tasks.register_synthetic_tasks(tokenizer_path=tmp_path,
                                   prefix="test_tasks_hf")
  assert "test_tasks_hf_copy" not in seqio.TaskRegistry.names()
  (tmp_path / "tokenizer_config.json").write_text(
      '{"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}')
  names = tasks.register_synthetic_tasks(
      tokenizer_path=tmp_path, prefix="test_tasks_hf")
  assert names[-1] == "test_tasks_hf_mix"
  try:
    vocab = seqio.get_mixture_or_task("test_tasks_hf_copy").output_features[
        "targets"].vocabulary
    assert isinstance(vocab, vocabularies.HFTokenizerVocabulary)
    ex = _examples("test_tasks_hf_copy", n=1)[0]
    assert ex["targets"][-1] == vocab.eos_id == 1
    assert _text(ex, "targets", vocab) == ex["targets_pretokenized"].decode()
  finally:
    seqio.MixtureRegistry.remove("test_tasks_hf_mix")
    for name in names[:-1]:
      seqio.TaskRegistry.remove(name)


# -- metrics -------------------------------------------------------------------


def test_exact_match():
  assert metrics.exact_match(["19", "abc"], ["19", "abd"]) == {
      "exact_match": 50.0}
  assert metrics.exact_match([b"19"], ["19"]) == {"exact_match": 100.0}
  assert metrics.exact_match([], []) == {"exact_match": 0.0}
  assert metrics.exact_match(["a "], ["a"]) == {"exact_match": 0.0}
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.exact_match(["a", "b"], ["a"])
