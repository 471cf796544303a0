"""Tests for moe_jax.data.vocabularies: HF tokenizers as seqio vocabularies."""
import copy
import json
import logging
import pickle

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tokenizers = pytest.importorskip("tokenizers")

from moe_jax.data import vocabularies  # noqa: E402

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0, 1, 2, 3 (T5 order).
SENTENCES = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "hello there, the world is quick",
]
TEXT = "hello there, the quick world"


def _train_tokenizer():
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=80, special_tokens=SPECIALS, show_progress=False)
  tok.train_from_iterator(SENTENCES, trainer)
  return tok


def _write_json(path, obj):
  path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def tokenizer():
  return _train_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tokenizer):
  d = tmp_path_factory.mktemp("hf_tokenizer")
  tokenizer.save(str(d / "tokenizer.json"))
  _write_json(d / "tokenizer_config.json", {
      "eos_token": "</s>",
      "pad_token": "<pad>",
      "unk_token": {"content": "<unk>", "special": True,
                    "__type": "AddedToken"},
      "bos_token": "<s>",
  })
  return d


@pytest.fixture(scope="module")
def vocab(tok_dir):
  return vocabularies.HFTokenizerVocabulary(tok_dir)


# -- loading -------------------------------------------------------------------


def test_load_tokenizer_from_dir_and_file(tok_dir, tokenizer):
  for path in (tok_dir, str(tok_dir / "tokenizer.json")):
    loaded = vocabularies.load_tokenizer(path)
    assert loaded.encode(TEXT).ids == tokenizer.encode(TEXT).ids


def test_missing_directory_names_path(tmp_path):
  missing = tmp_path / "nope"
  for fn in (vocabularies.load_tokenizer, vocabularies.HFTokenizerVocabulary):
    with pytest.raises(FileNotFoundError, match="nope"):
      fn(missing)


def test_directory_without_tokenizer_json(tmp_path):
  with pytest.raises(vocabularies.TokenizerNotFoundError,
                     match="has no tokenizer.json"):
    vocabularies.load_tokenizer(tmp_path)


def test_invalid_json_names_path(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  for fn in (vocabularies.load_tokenizer, vocabularies.HFTokenizerVocabulary):
    with pytest.raises(ValueError, match="Invalid JSON.*tokenizer.json"):
      fn(tmp_path)


def test_json_that_is_not_a_tokenizer(tmp_path):
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
  with pytest.raises(vocabularies.InvalidTokenizerError,
                     match="tokenizer.json.*not a valid"):
    vocabularies.load_tokenizer(tmp_path)


def test_invalid_config_json_names_file(tmp_path, tokenizer):
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text("[1, 2")
  with pytest.raises(vocabularies.InvalidTokenizerError,
                     match="tokenizer_config.json"):
    vocabularies.HFTokenizerVocabulary(tmp_path)


def test_unknown_special_token_names_file_and_key(tmp_path, tokenizer):
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  _write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<eos>"})
  with pytest.raises(vocabularies.InvalidTokenizerError,
                     match="'eos_token' in .*tokenizer_config.json.*'<eos>'"):
    vocabularies.HFTokenizerVocabulary(tmp_path)
  # An explicit argument wins over (and so skips) the broken file.
  v = vocabularies.HFTokenizerVocabulary(tmp_path, eos_id="</s>")
  assert v.eos_id == 1


# -- special tokens ------------------------------------------------------------


def test_special_ids_from_tokenizer_config(vocab, tokenizer):
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.bos_id) == (
      0, 1, 2, 3)
  assert vocab.vocab_size == tokenizer.get_vocab_size() == 78
  assert vocab.extra_ids == 0


def test_special_ids_from_other_files(tmp_path, tokenizer, caplog):
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  _write_json(tmp_path / "special_tokens_map.json",
              {"eos_token": {"content": "</s>"}})
  _write_json(tmp_path / "generation_config.json", {"bos_token_id": [3, 1]})
  _write_json(tmp_path / "config.json",
              {"bos_token_id": 1, "pad_token_id": 2, "eos_token_id": 3})
  with caplog.at_level(logging.WARNING):
    v = vocabularies.HFTokenizerVocabulary(tmp_path)
  assert v.eos_id == 1  # special_tokens_map.json beats config.json.
  assert v.bos_id == 3  # generation_config.json beats config.json.
  assert v.pad_id == 2  # config.json; not seqio's 0, so logged.
  assert v.unk_id == 2  # The BPE model's unk_token in tokenizer.json.
  assert "pad id 2" in caplog.text


def test_overrides_and_out_of_range(tok_dir):
  v = vocabularies.HFTokenizerVocabulary(tok_dir, eos_id="<s>", unk_id=0)
  assert (v.eos_id, v.unk_id, v.pad_id) == (3, 0, 0)
  with pytest.raises(vocabularies.InvalidTokenizerError,
                     match=r"eos_id argument is 500.*\[0, 78\)"):
    vocabularies.HFTokenizerVocabulary(tok_dir, eos_id=500)


def test_from_tokenizer_object_has_no_config(tokenizer):
  v = vocabularies.HFTokenizerVocabulary(tokenizer)
  assert v.path is None
  assert (v.pad_id, v.eos_id, v.bos_id, v.unk_id) == (0, None, None, 2)


def test_warns_when_id0_is_a_real_token(caplog):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  with caplog.at_level(logging.WARNING):
    v = vocabularies.HFTokenizerVocabulary(tok)
  assert "id 0 ('a', not a special token)" in caplog.text
  assert v.encode("b a") == [1, 0]


# -- Python encode / decode ----------------------------------------------------


def test_encode_decode_round_trip(vocab, tokenizer):
  ids = vocab.encode(TEXT)
  assert ids == tokenizer.encode(TEXT, add_special_tokens=False).ids
  assert vocab.eos_id not in ids and vocab.pad_id not in ids
  assert vocab.decode(ids) == TEXT
  for s in SENTENCES:
    assert vocab.decode(vocab.encode(s)) == s


def test_decode_stops_at_eos_and_drops_pad_and_bos(vocab):
  ids = vocab.encode(TEXT)
  tail = vocab.encode("hello")
  assert vocab.decode([3] + ids + [1] + tail + [0, 0]) == TEXT
  assert vocab.decode(ids + [0, 0]) == TEXT
  assert vocab.decode(tf.constant(ids + [1], tf.int32)) == TEXT
  # seqio's base class maps ids past the vocabulary to unk.
  assert vocab.decode(ids + [500]) == TEXT + "<unk>"


def test_skip_special_tokens(tok_dir):
  v = vocabularies.HFTokenizerVocabulary(tok_dir, skip_special_tokens=True)
  assert v.decode(v.encode("hello") + [2]) == "hello"


def test_decode_out_of_range_without_unk():
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "a": 1}))
  v = vocabularies.HFTokenizerVocabulary(tok)
  assert v.unk_id is None
  with pytest.raises(ValueError, match="Token id 7 is outside the vocabulary"):
    v.decode([1, 7])


def test_encode_rejects_non_strings(vocab):
  with pytest.raises(TypeError, match="needs a str, got list"):
    vocab.encode([1, 2])


def test_encode_ignores_saved_post_processing(tmp_path, tokenizer):
  tok = _train_tokenizer()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 1)])
  tok.enable_truncation(2)
  tok.enable_padding(length=16, pad_id=0, pad_token="<pad>")
  assert tok.encode(TEXT).ids == [3, 1] + [0] * 14
  tok.save(str(tmp_path / "tokenizer.json"))
  v = vocabularies.HFTokenizerVocabulary(tmp_path)
  assert v.encode(TEXT) == tokenizer.encode(TEXT).ids
  assert v.decode(v.encode(TEXT)) == TEXT


def test_extra_ids_appended_as_sentinels(tok_dir):
  v = vocabularies.HFTokenizerVocabulary(tok_dir, extra_ids=3)
  assert v.vocab_size == 78 + 3
  assert v.tokenizer.token_to_id("<extra_id_0>") == 80  # T5: highest id.
  assert v.tokenizer.token_to_id("<extra_id_2>") == 78
  ids = v.encode("hello <extra_id_0> world")
  assert 80 in ids
  assert v.decode([80] + v.encode("hello")) == "<extra_id_0> hello"
  # Sentinels already in the tokenizer: refuse to add a second set.
  with pytest.raises(ValueError, match="already has sentinel token"):
    vocabularies.HFTokenizerVocabulary(v.tokenizer, extra_ids=3)


def test_matches_transformers_save_pretrained(tmp_path, tokenizer):
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", bos_token="<s>")
  hf.save_pretrained(str(tmp_path))
  v = vocabularies.HFTokenizerVocabulary(tmp_path)
  assert (v.pad_id, v.eos_id, v.unk_id, v.bos_id) == (
      hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.bos_token_id)
  for s in SENTENCES + [TEXT]:
    ids = v.encode(s)
    assert ids == hf(s, add_special_tokens=False)["input_ids"]
    assert v.decode(ids + [1, 0]) == hf.decode(ids, skip_special_tokens=True)


# -- TensorFlow encode / decode ------------------------------------------------


def test_encode_tf_decode_tf_eager(vocab):
  ids = vocab.encode_tf(tf.constant(TEXT))
  assert ids.dtype == tf.int32 and ids.shape.rank == 1
  assert ids.numpy().tolist() == vocab.encode(TEXT)
  padded = tf.constant([3] + vocab.encode(TEXT) + [1, 5, 0, 0], tf.int32)
  out = vocab.decode_tf(padded)
  assert out.dtype == tf.string and out.shape == ()
  assert out.numpy().decode() == vocab.decode(padded) == TEXT


def test_encode_tf_batch_is_ragged(vocab):
  strings = tf.constant([SENTENCES[:2], [TEXT, ""]])
  ids = vocab.encode_tf(strings)
  assert isinstance(ids, tf.RaggedTensor)
  assert ids.shape.as_list() == [2, 2, None]
  expected = [[vocab.encode(s) for s in row] for row in
              (SENTENCES[:2], [TEXT, ""])]
  assert ids.to_list() == expected


def test_decode_tf_batch(vocab):
  rows = [vocab.encode(s) + [1] for s in SENTENCES]
  width = max(map(len, rows)) + 2
  batch = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    batch[i, :len(row)] = row
  out = vocab.decode_tf(tf.constant(batch))
  assert out.shape == (3,)
  assert [t.decode() for t in out.numpy()] == SENTENCES
  ragged = tf.ragged.constant([vocab.encode(s) for s in SENTENCES])
  assert [t.decode() for t in vocab.decode_tf(ragged).numpy()] == SENTENCES


def test_encode_tf_decode_tf_in_dataset_map(vocab):
  ds = tf.data.Dataset.from_tensor_slices(SENTENCES + [TEXT])
  ds = ds.map(lambda s: {"text": s, "ids": vocab.encode_tf(s)},
              num_parallel_calls=4, deterministic=True)
  assert ds.element_spec["ids"] == tf.TensorSpec([None], tf.int32)
  ds = ds.map(lambda ex: dict(ex, back=vocab.decode_tf(ex["ids"])))
  for ex in ds.as_numpy_iterator():
    text = ex["text"].decode()
    assert ex["ids"].tolist() == vocab.encode(text)
    assert ex["back"].decode() == vocab.decode(ex["ids"]) == text


# -- copying and equality ------------------------------------------------------


def test_pickle_and_deepcopy(vocab, tok_dir):
  for clone in (pickle.loads(pickle.dumps(vocab)), copy.deepcopy(vocab)):
    assert clone == vocab and hash(clone) == hash(vocab)
    assert clone.tokenizer is not vocab.tokenizer
    assert clone.encode(TEXT) == vocab.encode(TEXT)
    ds = tf.data.Dataset.from_tensors(TEXT).map(clone.encode_tf)
    assert next(ds.as_numpy_iterator()).tolist() == vocab.encode(TEXT)
  assert vocab != vocabularies.HFTokenizerVocabulary(tok_dir, eos_id=3)
  assert vocab != vocabularies.HFTokenizerVocabulary(tok_dir, extra_ids=1)
  assert "eos_id=1" in str(vocab) and "vocab_size=78" in str(vocab)


# -- seqio ---------------------------------------------------------------------


def test_seqio_task_tokenizes_and_appends_eos(vocab):
  name = "moe_jax_test_hf_tokenizer_vocabulary"
  seqio.TaskRegistry.remove(name)

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(
        {"inputs": SENTENCES, "targets": [TEXT] * len(SENTENCES)})

  feature = seqio.Feature(vocabulary=vocab, add_eos=True)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos],
      output_features={"inputs": feature, "targets": feature})
  try:
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(
        sequence_length={"inputs": 32, "targets": 32}, split="train",
        shuffle=False, use_cached=False)
    examples = list(ds.as_numpy_iterator())
  finally:
    seqio.TaskRegistry.remove(name)
  assert len(examples) == len(SENTENCES)
  for ex, sentence in zip(examples, SENTENCES):
    assert ex["inputs"].dtype == np.int32
    assert ex["inputs"].tolist() == vocab.encode(sentence) + [1]
    assert ex["targets"].tolist() == vocab.encode(TEXT) + [1]
    assert ex["inputs_pretokenized"].decode() == sentence
    assert feature.vocabulary.decode(ex["inputs"]) == sentence
