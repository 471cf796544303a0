"""Sampling math against NumPy references; generation contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decoding
from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  got = decoding.sample_logits(logits, jax.random.key(1), temperature=0.0, top_k=None,
                               top_p=None)
  np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))


def _empirical(logits, n=4000, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.vmap(lambda k: decoding.sample_logits(logits[None], k, **kw)[0])(keys)
  return np.bincount(np.asarray(draw), minlength=logits.shape[-1]) / n


def test_top_k_keeps_exactly_the_k_best():
  logits = jnp.array([0.1, 2.0, 1.5, -1.0, 1.9, 0.0])
  freq = _empirical(logits, temperature=1.0, top_k=3, top_p=None)
  assert set(np.nonzero(freq)[0]) == {1, 2, 4}
  ref = np.exp(np.array([2.0, 1.5, 1.9]))
  np.testing.assert_allclose(freq[[1, 2, 4]], ref / ref.sum(), atol=0.03)


def test_top_p_keeps_the_smallest_nucleus():
  probs = np.array([0.5, 0.05, 0.3, 0.1, 0.05])
  logits = jnp.log(jnp.asarray(probs))
  # mass before: 0.5 -> 0, 0.3 -> 0.5, 0.1 -> 0.8: with top_p=0.75 keep {0, 2}.
  freq = _empirical(logits, temperature=1.0, top_k=None, top_p=0.75)
  assert set(np.nonzero(freq)[0]) == {0, 2}
  np.testing.assert_allclose(freq[[0, 2]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
  # the most likely token always survives
  freq = _empirical(logits, n=200, temperature=1.0, top_k=None, top_p=0.01)
  assert freq[0] == 1.0


def test_temperature_sharpens():
  logits = jnp.array([1.0, 0.0])
  hot = _empirical(logits, temperature=2.0, top_k=None, top_p=None)[0]
  cold = _empirical(logits, temperature=0.5, top_k=None, top_p=None)[0]
  np.testing.assert_allclose(hot, 1 / (1 + np.exp(-0.5)), atol=0.03)
  np.testing.assert_allclose(cold, 1 / (1 + np.exp(-2.0)), atol=0.03)


@pytest.fixture(scope="module")
def tiny():
  config = DecoderConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                         d_ff=32, max_seq_len=64)
  module = registry.build_module(config)
  return module, registry.init_params(module, "decoder", seed=3)


def test_seed_determinism_and_variation(tiny):
  module, params = tiny
  kw = dict(max_new_tokens=12, temperature=1.0, top_k=20)
  a = decoding.generate(module, params, [[1, 2, 3]], seed=7, **kw).tokens_BN
  b = decoding.generate(module, params, [[1, 2, 3]], seed=7, **kw).tokens_BN
  c = decoding.generate(module, params, [[1, 2, 3]], seed=8, **kw).tokens_BN
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_eos_stops_and_pads(tiny):
  module, params = tiny
  free = decoding.generate(module, params, [[1, 2, 3], [4, 5]], max_new_tokens=10)
  eos = int(free.tokens_BN[0, 3])  # make the 4th greedy token of row 0 the EOS
  out = decoding.generate(module, params, [[1, 2, 3], [4, 5]], max_new_tokens=10, eos_id=eos,
                          pad_id=0)
  row = out.tokens_BN[0]
  first = int(np.argmax(free.tokens_BN[0] == eos))
  np.testing.assert_array_equal(row[:first + 1], free.tokens_BN[0, :first + 1])
  assert (row[first + 1:] == 0).all()
  assert out.lengths_B[0] == first + 1
  assert out.to_lists()[0][-1] == eos


def test_bad_prompts_are_rejected(tiny):
  module, params = tiny
  with pytest.raises(ValueError, match=r"token 40 at \[0, 1\] is outside the vocabulary"):
    decoding.generate(module, params, [[1, 40]], max_new_tokens=2)
  with pytest.raises(ValueError, match="at least one token"):
    decoding.generate(module, params, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    decoding.SamplingConfig(top_p=1.5)
