"""The global batch stream: every process keeps its rows; one shared state resumes on any count."""

import numpy as np
import pytest
import tensorflow as tf

from moe_jax.data import pipeline


def _global(n=8, batch=4):
  return tf.data.Dataset.from_tensor_slices(
      {"x": np.arange(n * batch, dtype=np.int32).reshape(n, batch)}).shuffle(8, seed=0)


def test_rows_of_every_process_make_the_global_batch():
  assert pipeline.global_batch_rows(8, 1, 2) == (4, 8)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.global_batch_rows(8, 0, 3)
  whole = pipeline.DataIterator(_global(), process_index=0, process_count=1, rows=(0, 4))
  parts = [pipeline.DataIterator(_global(), process_index=i, process_count=2,
                                 rows=pipeline.global_batch_rows(4, i, 2)) for i in range(2)]
  for _ in range(3):
    expected = next(whole)["x"]
    np.testing.assert_array_equal(np.concatenate([next(p)["x"] for p in parts]), expected)


def test_a_two_process_state_resumes_on_one_process(tmp_path):
  parts = [pipeline.DataIterator(_global(), process_index=i, process_count=2,
                                 rows=pipeline.global_batch_rows(4, i, 2)) for i in range(2)]
  for p in parts:
    next(p), next(p)
  for p in parts:  # process 1 writes nothing: the state is the same everywhere
    p.save(tmp_path)
  assert sorted(f.name for f in tmp_path.iterdir() if f.suffix == ".json") == ["data-global.json"]
  reference = pipeline.DataIterator(_global(), process_index=0, process_count=1, rows=(0, 4))
  for _ in range(2):
    next(reference)
  one = pipeline.DataIterator(_global(), process_index=0, process_count=1, rows=(0, 4))
  one.restore(tmp_path)
  np.testing.assert_array_equal(next(one)["x"], next(reference)["x"])


def test_a_per_host_state_says_how_to_resume(tmp_path):
  for i in range(2):  # t5x-style per-host shards, saved by 2 processes
    it = pipeline.DataIterator(_global(), process_index=i, process_count=2)
    next(it)
    it.save(tmp_path)
  one = pipeline.DataIterator(_global(), process_index=0, process_count=1, rows=(0, 4))
  with pytest.raises(FileNotFoundError, match=r"saved by 2 process\(es\).*resume with 2 "
                                              r"process\(es\), or set CheckpointConfig"):
    one.restore(tmp_path)
