"""Routers, capacity, slot order, losses and metrics (pure functions)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import routing as R


def test_compute_capacity():
  assert R.compute_capacity(64, 8, num_selected=2, capacity_factor=1.0, min_capacity=1) == 16
  # Rounded up, floored at min_capacity, capped at S.
  assert R.compute_capacity(10, 8, num_selected=1, capacity_factor=1.25, min_capacity=1) == 2
  assert R.compute_capacity(10, 8, num_selected=1, capacity_factor=1.0, min_capacity=4) == 4
  assert R.compute_capacity(3, 2, num_selected=2, capacity_factor=4.0, min_capacity=1) == 3
  assert R.compute_capacity(1, 8, num_selected=2, capacity_factor=1.0, min_capacity=4) == 1
  assert R.compute_capacity(12, 4, num_selected=2, capacity_factor=None) == 12
  with pytest.raises(ValueError, match="top-3 of only 2"):
    R.compute_capacity(8, 2, num_selected=3)
  with pytest.raises(ValueError, match="capacity_factor"):
    R.compute_capacity(8, 2, capacity_factor=0.0)


def test_router_logits_float32_and_jitter():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (8, 4)).astype(jnp.bfloat16)
  plain = R.router_logits(x, w)
  assert plain.dtype == jnp.float32
  chex.assert_trees_all_close(plain, R.router_logits(x, w, jitter_noise=0.1), atol=0)
  j1 = R.router_logits(x, w, jitter_noise=0.1, rng=jax.random.key(2))
  j2 = R.router_logits(x, w, jitter_noise=0.1, rng=jax.random.key(3))
  assert not np.allclose(j1, j2)
  assert np.abs(np.asarray(j1) - np.asarray(plain)).max() < 0.2 * np.abs(plain).max() + 1e-3


def _logits(pref_SE):
  """Logits whose softmax ranks experts as in ``pref_SE`` (higher = preferred)."""
  return jnp.asarray(pref_SE, jnp.float32)[None]


def test_top_k_gates_and_renormalize():
  logits = jax.random.normal(jax.random.key(0), (2, 6, 5))
  r = R.tokens_choose_route(logits, num_selected=2, capacity=6)
  probs = jax.nn.softmax(logits, -1)
  np.testing.assert_array_equal(r.expert_GSK, np.argsort(-np.asarray(probs), -1)[..., :2])
  np.testing.assert_allclose(r.weight_GSK, np.sort(np.asarray(probs), -1)[..., ::-1][..., :2],
                             rtol=1e-6)
  rn = R.tokens_choose_route(logits, num_selected=2, capacity=6, renormalize=True)
  np.testing.assert_allclose(rn.weight_GSK.sum(-1), 1.0, rtol=1e-6)
  assert rn.weight_GSK.dtype == jnp.float32


def test_slot_order_choice_rank_then_token_index():
  # 4 tokens, 3 experts. Every token's 1st choice is expert 0, 2nd choice expert 1
  # (token 3's 2nd choice is expert 2). Capacity 2.
  pref = [[3, 2, 0], [3, 2, 1], [3, 2, 0], [3, 1, 2]]
  r = R.tokens_choose_route(_logits(pref), num_selected=2, capacity=2)
  np.testing.assert_array_equal(r.expert_GSK[0], [[0, 1], [0, 1], [0, 1], [0, 2]])
  # Expert 0: tokens 0, 1 take its slots, 2 and 3 are dropped (position == C).
  # Expert 1: 2nd choices of tokens 0, 1, 2 -> 0, 1 kept, 2 dropped. Expert 2: token 3.
  np.testing.assert_array_equal(r.position_GSK[0], [[0, 0], [1, 1], [2, 2], [2, 0]])
  np.testing.assert_array_equal(r.kept_GSK[0], [[1, 1], [1, 1], [0, 0], [0, 1]])
  np.testing.assert_array_equal(r.token_GEC[0], [[0, 1], [0, 1], [3, 4]])  # 4 = empty
  assert float(r.weight_GSK[0, 2].sum()) == 0.0


def test_first_choices_beat_second_choices():
  # Token 0's 2nd choice and token 1's 1st choice both want expert 1 (capacity 1):
  # the 1st choice wins although token 0 comes first.
  pref = [[3, 2, 0], [0, 3, 2]]
  r = R.tokens_choose_route(_logits(pref), num_selected=2, capacity=1)
  np.testing.assert_array_equal(r.expert_GSK[0], [[0, 1], [1, 2]])
  np.testing.assert_array_equal(r.kept_GSK[0], [[True, False], [True, True]])


def test_batch_prioritized_routing_keeps_confident_tokens():
  # All tokens want expert 0 first; confidence rises with the token index.
  pref = [[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [4.0, 0, 0]]
  plain = R.tokens_choose_route(_logits(pref), num_selected=1, capacity=2)
  bpr = R.tokens_choose_route(_logits(pref), num_selected=1, capacity=2, batch_prioritized=True)
  np.testing.assert_array_equal(plain.kept_GSK[0, :, 0], [1, 1, 0, 0])
  np.testing.assert_array_equal(bpr.kept_GSK[0, :, 0], [0, 0, 1, 1])
  np.testing.assert_array_equal(bpr.position_GSK[0, :, 0], [2, 2, 1, 0])
  np.testing.assert_array_equal(bpr.token_GEC[0, 0], [3, 2])


def test_experts_choose():
  logits = jax.random.normal(jax.random.key(0), (2, 8, 4))
  r = R.experts_choose_route(logits, capacity=3)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  for g in range(2):
    for e in range(4):
      want = np.argsort(-probs[g, :, e], kind="stable")[:3]
      np.testing.assert_array_equal(r.token_GEC[g, e], want)
      np.testing.assert_allclose(r.weight_GEC[g, e], probs[g, want, e], rtol=1e-6)
  with pytest.raises(ValueError, match="capacity 9 > tokens per group 8"):
    R.experts_choose_route(logits, capacity=9)


def test_load_balancing_loss():
  e = 4
  uniform = jnp.full((1, 8, e), 1.0 / e)
  expert = jnp.asarray([[[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]]])
  np.testing.assert_allclose(R.load_balancing_loss(uniform, expert), 1.0, rtol=1e-6)
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 8, e)), -1)
  expert = jax.lax.top_k(probs, 2)[1]
  p = np.asarray(probs)
  want = []
  for g in range(3):
    f = np.bincount(np.asarray(expert[g]).ravel(), minlength=e) / 16
    want.append(e * np.sum(f * p[g].mean(0)))
  np.testing.assert_allclose(R.load_balancing_loss(probs, expert), np.mean(want), rtol=1e-5)
  # All tokens on one expert with full confidence: loss = E.
  collapsed = jax.nn.one_hot(jnp.zeros((1, 8), int), e)
  np.testing.assert_allclose(R.load_balancing_loss(collapsed, jnp.zeros((1, 8, 1), int)), e)


def test_z_loss():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 4)) * 3
  z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  np.testing.assert_allclose(R.router_z_loss(logits), np.mean(z ** 2), rtol=1e-5)


def test_router_stats_tokens_choose():
  pref = [[3, 2, 0], [3, 2, 1], [3, 2, 0], [3, 1, 2]]
  logits = _logits(pref)
  r = R.tokens_choose_route(logits, num_selected=2, capacity=2)
  s = R.router_stats(logits, r)
  # 8 assignments, 3 dropped; token 2 lost both choices.
  np.testing.assert_allclose(s.dropped_fraction, 3 / 8)
  np.testing.assert_allclose(s.dropped_token_fraction, 1 / 4)
  np.testing.assert_allclose(s.expert_usage_E, [2 / 8, 2 / 8, 1 / 8])
  np.testing.assert_allclose(s.router_confidence,
                             np.asarray(jax.nn.softmax(logits, -1)).max(-1).mean(), rtol=1e-6)
  np.testing.assert_allclose(s.z_loss, R.router_z_loss(logits))


def test_router_stats_experts_choose():
  # Both experts prefer token 0 and 1 most: tokens 2, 3 are never picked.
  logits = _logits([[5, 5], [4, 4], [0, 0], [0, 0]])
  r = R.experts_choose_route(logits, capacity=2)
  s = R.router_stats(logits, r)
  np.testing.assert_allclose(s.dropped_token_fraction, 0.5)
  np.testing.assert_allclose(s.load_balancing_loss, 0.0)


def test_sigmoid_scoring_routes_by_biased_groups_and_gates_with_scores():
  from moe_jax.nn.router import group_limited_top_k_gates
  logits = jax.random.normal(jax.random.key(0), (2, 6, 8)) * 2
  bias = jax.random.normal(jax.random.key(1), (8,)) * 0.3
  kw = dict(num_selected=2, renormalize=True, scoring="sigmoid", score_bias_E=bias,
            num_expert_groups=4, topk_groups=2, gate_scale=2.5)
  r = R.tokens_choose_route(logits, capacity=6, **kw)  # C = S: dropless
  gate, expert = group_limited_top_k_gates(jax.nn.sigmoid(logits), 2, bias_E=bias,
                                           num_groups=4, topk_groups=2, renormalize=True,
                                           scaling=2.5)
  np.testing.assert_array_equal(r.expert_GSK, expert)
  np.testing.assert_allclose(r.weight_GSK, gate, rtol=1e-6)
  np.testing.assert_allclose(r.weight_GSK.sum(-1), 2.5, rtol=1e-5)
  np.testing.assert_allclose(r.probs_GSE.sum(-1), 1.0, rtol=1e-5)  # normalised for the losses
  R.router_stats(logits, r)  # losses and metrics are defined
  tight = R.tokens_choose_route(logits, capacity=1, **kw)
  assert bool(jnp.any(~tight.kept_GSK))
  assert float(jnp.where(tight.kept_GSK, 0, tight.weight_GSK).max()) == 0  # dropped: weight 0
  with pytest.raises(ValueError, match="belong to scoring='sigmoid'"):
    R.tokens_choose_route(logits, num_selected=2, capacity=6, score_bias_E=bias)
  with pytest.raises(ValueError, match="scoring 'tanh' unknown"):
    R.tokens_choose_route(logits, num_selected=2, capacity=6, scoring="tanh")
