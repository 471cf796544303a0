"""The shared router math against naive loops; MoE, attention mixture and PEFT routers use it."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.nn import router as R


def _probs(seed, shape):
  logits = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return logits, (p / p.sum(-1, keepdims=True)).astype(np.float32)


def test_top_k_gates_and_weights_match_a_loop():
  _, probs = _probs(0, (2, 5, 6))
  probs[0, 0, :] = [0.1, 0.3, 0.3, 0.1, 0.1, 0.1]  # a tie: the lower index wins
  for k in (1, 2, 3):
    for renormalize in (False, True):
      gate, expert = R.top_k_gates(jnp.asarray(probs), k, renormalize=renormalize)
      dense, expert_dense = R.top_k_weights(jnp.asarray(probs), k, renormalize=renormalize)
      np.testing.assert_array_equal(expert, expert_dense)
      for g in range(2):
        for s in range(5):
          row = probs[g, s]
          order = sorted(range(6), key=lambda e: (-row[e], e))[:k]
          want = np.array([row[e] for e in order])
          if renormalize:
            want = want / want.sum()
          assert list(np.asarray(expert[g, s])) == order
          np.testing.assert_allclose(gate[g, s], want, rtol=1e-6)
          want_dense = np.zeros(6, np.float32)
          want_dense[order] = want
          np.testing.assert_allclose(dense[g, s], want_dense, rtol=1e-6)
  assert list(np.asarray(R.top_k_gates(jnp.asarray(probs), 2)[1][0, 0])) == [1, 2]


def _naive_lb(probs, expert, valid):
  """Per group: E * sum_e f_e P_e over real tokens; mean over groups."""
  g_n, s_n, e_n = probs.shape
  out = []
  for g in range(g_n):
    tokens = [s for s in range(s_n) if valid[g, s]]
    f = np.zeros(e_n)
    p = np.zeros(e_n)
    for s in tokens:
      for e in expert[g, s]:
        f[e] += 1.0 / (len(tokens) * expert.shape[-1])
      p += probs[g, s] / len(tokens)
    out.append(e_n * np.sum(f * p))
  return np.mean(out)


def test_load_balancing_loss_matches_a_loop():
  _, probs = _probs(1, (3, 7, 5))
  expert = np.asarray(jax.lax.top_k(jnp.asarray(probs), 2)[1])
  all_valid = np.ones((3, 7), bool)
  np.testing.assert_allclose(R.load_balancing_loss(probs, expert), _naive_lb(probs, expert,
                                                                           all_valid), rtol=1e-5)
  valid = np.random.default_rng(2).random((3, 7)) > 0.4
  valid[:, 0] = True
  np.testing.assert_allclose(R.load_balancing_loss(probs, expert, valid),
                             _naive_lb(probs, expert, valid), rtol=1e-5)
  # 1 when uniform, E when collapsed; only P carries gradient.
  uniform = np.full((1, 4, 5), 0.2, np.float32)
  np.testing.assert_allclose(R.load_balancing_loss(uniform, expert[:1, :4]), 1.0, rtol=1e-6)
  collapsed = np.zeros((1, 4, 5), np.float32)
  collapsed[..., 3] = 1.0
  np.testing.assert_allclose(R.load_balancing_loss(collapsed, np.full((1, 4, 1), 3)), 5.0)
  grad = jax.grad(lambda p: R.load_balancing_loss(p, expert))(jnp.asarray(probs))
  f = np.asarray(jax.nn.one_hot(expert, 5)).mean(axis=(1, 2))  # [G, E]
  np.testing.assert_allclose(grad, np.broadcast_to(5 * f[:, None, :] / (3 * 7), grad.shape),
                             rtol=1e-5)


def test_z_loss_and_confidence_over_real_tokens():
  logits, probs = _probs(3, (2, 4, 3))
  valid = np.array([[True, True, False, True], [False, True, True, True]])
  z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(R.router_z_loss(logits), np.mean(z ** 2), rtol=1e-5)
  np.testing.assert_allclose(R.router_z_loss(logits, valid), np.mean(z[valid] ** 2), rtol=1e-5)
  np.testing.assert_allclose(R.router_confidence(probs), probs.max(-1).mean(), rtol=1e-6)
  np.testing.assert_allclose(R.router_confidence(probs, valid), probs.max(-1)[valid].mean(),
                             rtol=1e-6)


def test_total_aux_loss_sums_every_sown_entry_in_float32():
  state = {R.AUX_LOSS_COLLECTION: {"layer_0": {"lb": (jnp.float32(0.5), jnp.float32(0.25))},
                                   "z": (jnp.asarray(0.125, jnp.bfloat16),)},
           R.METRICS_COLLECTION: {"lb": (jnp.float32(100.0),)}}
  total = R.total_aux_loss(state)
  assert total.dtype == jnp.float32
  np.testing.assert_allclose(total, 0.875)
  assert [name for name, _ in R.aux_loss_terms(state)] == ["lb", "lb", "z"]
  assert float(R.total_aux_loss({})) == 0.0


def test_every_router_uses_the_shared_math():
  from moe_jax.moe import attention_mixture, layer, routing
  from moe_jax.peft import routers
  from moe_jax.train import losses
  for mod in (layer, routers, losses, attention_mixture):
    assert mod.AUX_LOSS_COLLECTION is R.AUX_LOSS_COLLECTION
  assert layer.METRICS_COLLECTION is routers.METRICS_COLLECTION is R.METRICS_COLLECTION
  assert layer.total_aux_loss is routers.total_aux_loss is R.total_aux_loss
  assert routing.load_balancing_loss is R.load_balancing_loss
  assert routing.router_z_loss is R.router_z_loss


def test_group_limited_top_k_matches_deepseek_v3_router():
  """DeepSeek-V3's sigmoid router (bias for the choice only, group-limited top-k, renormalised
  and scaled gates) against transformers' own DeepseekV3TopkRouter."""
  import pytest
  torch = pytest.importorskip("torch")
  dsv3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
  from transformers import DeepseekV3Config
  for norm, groups, topk_groups, k in ((True, 4, 2, 2), (False, 4, 1, 2), (True, 1, 1, 3)):
    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=k,
                           n_group=groups, topk_group=topk_groups, norm_topk_prob=norm,
                           routed_scaling_factor=2.5)
    torch.manual_seed(0)
    router = dsv3.DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
      router.weight.normal_(0, 1.0)
      router.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
      logits, w_ref, idx_ref = router(x)
    gate, expert = R.group_limited_top_k_gates(
        jax.nn.sigmoid(jnp.asarray(logits.numpy())), k,
        bias_E=jnp.asarray(router.e_score_correction_bias.numpy()), num_groups=groups,
        topk_groups=topk_groups, renormalize=norm, scaling=2.5)
    # transformers returns its top-k unsorted: compare as sets of (expert, weight)
    for s in range(10):
      want = dict(zip(idx_ref[s].tolist(), w_ref[s].tolist()))
      got = dict(zip(np.asarray(expert[s]).tolist(), np.asarray(gate[s]).tolist()))
      assert set(got) == set(want)
      np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=1e-5)


def test_group_limited_top_k_keeps_to_the_best_groups_and_ignores_bias_in_gates():
  scores = jnp.asarray([[0.9, 0.1, 0.8, 0.7, 0.2, 0.3]])  # 3 groups of 2: sums 1.0, 1.5, 0.5
  gate, expert = R.group_limited_top_k_gates(scores, 2, num_groups=3, topk_groups=1)
  assert np.asarray(expert).tolist() == [[2, 3]]  # expert 0 (0.9) is outside the best group
  bias = jnp.asarray([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # lifts group 2 (0.5 + 1 = 1.5; tie -> 1)
  gate, expert = R.group_limited_top_k_gates(scores, 1, bias_E=bias, renormalize=True)
  assert np.asarray(expert).tolist() == [[5]]
  np.testing.assert_allclose(gate, [[1.0]])  # renormalised unbiased score 0.3 / 0.3
  with np.testing.assert_raises(ValueError):
    R.group_limited_top_k_gates(scores, 2, num_groups=4)
