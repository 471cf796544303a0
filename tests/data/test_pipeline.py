"""Tests for moe_jax.data.pipeline: features, packing, sharding, resuming."""
import json
import os

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from moe_jax.data import pipeline  # noqa: E402
from moe_jax.data import tasks  # noqa: E402
from moe_jax.models.decoder import positions_from_segments  # noqa: E402

VOCAB = seqio.ByteVocabulary()
LM_FEATURES = {"decoder_input_tokens", "decoder_target_tokens",
               "decoder_loss_weights", "decoder_segment_ids",
               "decoder_positions"}
ENC_DEC_FEATURES = {"encoder_input_tokens", "encoder_segment_ids",
                    "encoder_positions", "decoder_input_tokens",
                    "decoder_target_tokens", "decoder_loss_weights",
                    "decoder_segment_ids", "decoder_positions"}


def _batches(ds, n):
  it = pipeline.DataIterator(ds)
  return [next(it) for _ in range(n)]


def _check_shapes(batch, names, shapes):
  assert set(batch) == set(names)
  for name, array in batch.items():
    assert array.dtype == np.int32, name
    assert array.shape == shapes[name.split("_")[0]], name


def _segments(segment_ids_L):
  """[(start, stop)] of each packed example in a row."""
  out = []
  for seg in range(1, segment_ids_L.max() + 1):
    idx = np.flatnonzero(segment_ids_L == seg)
    assert len(idx) and np.all(np.diff(idx) == 1), "segments are contiguous"
    out.append((idx[0], idx[-1] + 1))
  return out


def _check_packing(segment_ids_BL, positions_BL, *, tokens_BL=None):
  """Segments 1, 2, ... then padding 0; positions restart at each segment."""
  for segs, pos in zip(segment_ids_BL, positions_BL):
    n = int((segs > 0).sum())
    assert np.all(segs[n:] == 0) and np.all(pos[n:] == 0)
    assert segs[0] == 1 and np.all(np.diff(segs[:n]) >= 0)
    assert np.all(np.diff(segs[:n]) <= 1)
    for start, stop in _segments(segs):
      assert list(pos[start:stop]) == list(range(stop - start))
  # The same positions the models derive from segment ids.
  np.testing.assert_array_equal(
      np.asarray(positions_from_segments(segment_ids_BL)) * (
          segment_ids_BL > 0), positions_BL)
  if tokens_BL is not None:  # Padding is exactly where the segments end.
    np.testing.assert_array_equal(tokens_BL > 0, segment_ids_BL > 0)


def _check_shifted(targets_BL, inputs_BL, segment_ids_BL):
  """decoder_input_tokens are the targets shifted right, per segment."""
  for tgt, inp, segs in zip(targets_BL, inputs_BL, segment_ids_BL):
    for start, stop in _segments(segs):
      assert inp[start] == 0  # BOS
      np.testing.assert_array_equal(inp[start + 1:stop], tgt[start:stop - 1])


# -- feature converters --------------------------------------------------------


def test_decoder_packed_lm_features():
  ds = pipeline.get_dataset(
      mixture_or_task_name="synthetic_lm_text",
      task_feature_lengths={"targets": 64}, batch_size=4, seed=1)
  assert ds.element_spec["decoder_target_tokens"].shape == [4, 64]
  batches = _batches(ds, 4)
  per_row = []
  for b in batches:
    _check_shapes(b, LM_FEATURES, {"decoder": (4, 64)})
    segs = b["decoder_segment_ids"]
    _check_packing(segs, b["decoder_positions"],
                   tokens_BL=b["decoder_target_tokens"])
    _check_shifted(b["decoder_target_tokens"], b["decoder_input_tokens"], segs)
    # LM: the loss is on every real token.
    np.testing.assert_array_equal(b["decoder_loss_weights"], segs > 0)
    per_row += list(segs.max(axis=1))
  assert max(per_row) >= 2  # Several pieces share a row.
  text = VOCAB.decode(batches[0]["decoder_target_tokens"][0].tolist())
  assert text.isprintable() and " " in text


def test_decoder_unpacked_has_no_segments():
  ds = pipeline.get_dataset(
      mixture_or_task_name="synthetic_copy", split="validation",
      task_feature_lengths={"targets": 24}, batch_size=3, pack=False,
      shuffle=False, num_epochs=1)
  b = _batches(ds, 1)[0]
  _check_shapes(b, {"decoder_input_tokens", "decoder_target_tokens",
                    "decoder_loss_weights"}, {"decoder": (3, 24)})
  first = tasks.synthetic_examples("copy", "validation", num_examples=3)
  for row, ex in zip(b["decoder_target_tokens"], first):
    assert VOCAB.decode(row.tolist()) == ex["targets"]  # In order, one each.
  np.testing.assert_array_equal(b["decoder_loss_weights"],
                                b["decoder_target_tokens"] > 0)


def test_prefix_lm_puts_loss_on_targets_only():
  ds = pipeline.get_dataset(
      mixture_or_task_name="synthetic_reverse",
      task_feature_lengths={"inputs": 32, "targets": 32}, batch_size=4,
      feature_converter="prefix_lm")
  b = _batches(ds, 1)[0]
  _check_shapes(b, LM_FEATURES | {"decoder_causal_attention"},
                {"decoder": (4, 64)})
  segs = b["decoder_segment_ids"]
  _check_packing(segs, b["decoder_positions"],
                 tokens_BL=b["decoder_target_tokens"])
  _check_shifted(b["decoder_target_tokens"], b["decoder_input_tokens"], segs)
  assert segs.max() >= 2
  for r in range(4):
    for start, stop in _segments(segs[r]):
      tokens = b["decoder_target_tokens"][r, start:stop]
      weights = b["decoder_loss_weights"][r, start:stop]
      causal = b["decoder_causal_attention"][r, start:stop]
      n_in = int((weights == 0).sum())
      assert np.all(weights[:n_in] == 0) and np.all(weights[n_in:] == 1)
      prompt = VOCAB.decode(tokens[:n_in].tolist())
      answer = VOCAB.decode(tokens[n_in:].tolist())
      assert prompt.startswith("reverse: ")
      assert answer == prompt[len("reverse: "):][::-1]
      # The prefix (inputs + first target position) attends bidirectionally.
      assert np.all(causal[:n_in + 1] == 1) and np.all(causal[n_in + 1:] == 0)


def test_enc_dec_packed_features():
  ds = pipeline.get_dataset(
      mixture_or_task_name="synthetic_mix",
      task_feature_lengths={"inputs": 48, "targets": 24}, batch_size=2,
      feature_converter="enc_dec", seed=5)
  for b in _batches(ds, 3):
    _check_shapes(b, ENC_DEC_FEATURES, {"encoder": (2, 48),
                                        "decoder": (2, 24)})
    _check_packing(b["encoder_segment_ids"], b["encoder_positions"],
                   tokens_BL=b["encoder_input_tokens"])
    _check_packing(b["decoder_segment_ids"], b["decoder_positions"],
                   tokens_BL=b["decoder_target_tokens"])
    _check_shifted(b["decoder_target_tokens"], b["decoder_input_tokens"],
                   b["decoder_segment_ids"])
    # Example k of a row is segment k on both sides.
    np.testing.assert_array_equal(b["encoder_segment_ids"].max(axis=1),
                                  b["decoder_segment_ids"].max(axis=1))
    np.testing.assert_array_equal(b["decoder_loss_weights"],
                                  b["decoder_segment_ids"] > 0)


# -- per-host sharding ---------------------------------------------------------


def _inputs_of(shard_info):
  ds = pipeline.get_dataset(
      mixture_or_task_name="synthetic_arithmetic", split="validation",
      task_feature_lengths={"inputs": 16, "targets": 8}, batch_size=50,
      feature_converter="enc_dec", pack=False, shuffle=True, seed=7,
      num_epochs=1, shard_info=shard_info)
  return [VOCAB.decode(row.tolist()) for b in pipeline.DataIterator(ds)
          for row in b["encoder_input_tokens"]]


def test_two_shards_are_disjoint_and_cover_the_split():
  whole = _inputs_of(None)
  shards = [_inputs_of(pipeline.shard_info_for_process(i, 2))
            for i in range(2)]
  n = tasks.SYNTHETIC_SIZES["validation"]
  assert len(whole) == n and [len(s) for s in shards] == [n // 2] * 2
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(whole)


def test_shard_info_for_process():
  assert pipeline.shard_info_for_process() == seqio.ShardInfo(0, 1)
  assert pipeline.shard_info_for_process(3, 4) == seqio.ShardInfo(3, 4)
  with pytest.raises(ValueError, match="process_index 4 is not in"):
    pipeline.shard_info_for_process(4, 4)
  with pytest.raises(ValueError, match="process_count must be an int >= 1"):
    pipeline.shard_info_for_process(0, 0)


# -- resuming ------------------------------------------------------------------

RESUME = dict(mixture_or_task_name="test_pipeline_mix",
              task_feature_lengths={"inputs": 32, "targets": 16},
              batch_size=4, feature_converter="enc_dec", shuffle=True,
              pack=True)


@pytest.fixture(scope="module", autouse=True)
def resume_mixture():
  """Two small tasks mixed: shuffle + mixture sampling + packing to resume.

  Smaller (and quicker to build) than synthetic_mix, with the same moving
  parts.
  """
  names = []
  for kind in ("copy", "arithmetic"):
    name = f"test_pipeline_{kind}"
    tasks.register_in_memory_task(
        name, tasks.synthetic_examples(kind, "validation", num_examples=300),
        shuffle_buffer_size=64)
    names.append(name)
  tasks.register_mixture("test_pipeline_mix", {names[0]: 1, names[1]: 2})
  yield
  seqio.MixtureRegistry.remove("test_pipeline_mix")
  for name in names:
    seqio.TaskRegistry.remove(name)


def _assert_same(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_save_restore_resumes_exactly(tmp_path):
  # seed=None: a different shuffle each build, so only the saved state
  # (shuffle buffers, packer, mixture sampler) can resume it.
  it = pipeline.DataIterator(pipeline.get_dataset(seed=None, **RESUME))
  for _ in range(3):
    next(it)
  path = it.save(tmp_path)
  assert os.path.basename(path).startswith("data-00000-of-00001")
  state = json.dumps(it.get_state())  # JSON-serialisable as is.
  want = [next(it) for _ in range(5)]
  assert it.consumed_batches == 8

  restored = pipeline.DataIterator(pipeline.get_dataset(seed=None, **RESUME))
  restored.restore(tmp_path)
  assert restored.consumed_batches == 3
  _assert_same([next(restored) for _ in range(5)], want)
  assert restored.consumed_batches == 8

  it.set_state(state)  # Rewinds in place, from the in-memory state.
  assert it.consumed_batches == 3
  _assert_same([next(it) for _ in range(5)], want)


def test_replay_state_resumes_exactly():
  it = pipeline.DataIterator(pipeline.get_dataset(seed=0, **RESUME))
  for _ in range(3):
    next(it)
  state = it.get_state(replay_only=True)
  assert state["iterator"] is None and state["consumed_batches"] == 3
  want = [next(it) for _ in range(4)]
  fresh = pipeline.DataIterator(pipeline.get_dataset(seed=0, **RESUME))
  fresh.set_state(state)
  _assert_same([next(fresh) for _ in range(4)], want)
  with pytest.raises(ValueError, match="has not started"):
    it.set_state(state)


def _tiny(n=6):
  return tf.data.Dataset.from_tensor_slices(
      {"x": np.arange(2 * n, dtype=np.int32).reshape(n, 2)})


def test_iterator_state_errors(tmp_path):
  it = pipeline.DataIterator(_tiny(), process_index=1, process_count=2)
  assert next(it)["x"].tolist() == [0, 1]
  it.save(tmp_path)
  assert (tmp_path / "data-00001-of-00002.json").exists()
  other = pipeline.DataIterator(_tiny(), process_index=0, process_count=2)
  with pytest.raises(FileNotFoundError, match="data-00000-of-00002.json.*"
                     "data-00001-of-00002.json"):
    other.restore(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    other.restore(tmp_path / "missing")
  same = pipeline.DataIterator(_tiny(), process_index=1, process_count=2)
  same.restore(tmp_path)
  assert next(same)["x"].tolist() == [2, 3]

  wider = pipeline.DataIterator(
      tf.data.Dataset.from_tensor_slices({"x": np.zeros((3, 5), np.int32)}))
  with pytest.raises(ValueError, match=r"features 'x:int32\[2\]'.*"
                     r"'x:int32\[5\]'"):
    wider.set_state(it.get_state())
  with pytest.raises(ValueError, match="not a DataIterator state"):
    wider.set_state({"consumed_batches": 1})
  with pytest.raises(ValueError, match="ended after 6 batches"):
    replay = pipeline.DataIterator(_tiny())
    replay.set_state(dict(it.get_state(replay_only=True), consumed_batches=9))
  with pytest.raises(TypeError, match="needs a tf.data.Dataset"):
    pipeline.DataIterator([1, 2])


# -- errors --------------------------------------------------------------------

ARGS = dict(mixture_or_task_name="synthetic_copy",
            task_feature_lengths={"inputs": 16, "targets": 16}, batch_size=2,
            feature_converter="enc_dec")


@pytest.mark.parametrize("override, error, match", [
    (dict(feature_converter="encdec"), ValueError,
     r"Unknown feature_converter 'encdec'; choose from 'decoder', "
     r"'prefix_lm', 'enc_dec'"),
    (dict(mixture_or_task_name="synthetic_cpy"), pipeline.UnknownTaskError,
     r"No seqio task or mixture named 'synthetic_cpy' \(close matches: "
     r"'synthetic_copy'"),
    (dict(mixture_or_task_name="synthetic_lm_text"), ValueError,
     r"Task 'synthetic_lm_text' has features \['targets'\], not \['inputs'\]"),
    (dict(feature_converter="prefix_lm",
          task_feature_lengths={"targets": 16}), ValueError,
     r"misses \['inputs'\] for feature_converter 'prefix_lm'"),
    (dict(task_feature_lengths={"inputs": 16, "targets": 16, "x": 3}),
     ValueError, r"has unexpected \['x'\]"),
    (dict(task_feature_lengths={"inputs": 16, "targets": 0}), ValueError,
     r"task_feature_lengths\['targets'\] must be an int >= 1, got 0"),
    (dict(split="test"), ValueError,
     r"'synthetic_copy' has no split 'test'; it has 'train', 'validation'"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
    (dict(shard_info=seqio.ShardInfo(2, 2)), ValueError,
     r"shard_info.index 2 is not in \[0, 2\)"),
])
def test_bad_arguments_are_named(override, error, match):
  with pytest.raises(error, match=match):
    pipeline.get_dataset(**dict(ARGS, **override))
