"""MoeLayer: parameters, sown losses/metrics, upcycling, shared expert, config errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, MoeConfig, MoeLayer,
                         total_aux_loss, upcycle_dense_params)
from moe_jax.nn.mlp import Mlp

B, L, D, F, E = 2, 8, 8, 16, 4
COLLECTIONS = [AUX_LOSS_COLLECTION, METRICS_COLLECTION]


def _x(seed=0, shape=(B, L, D)):
  return jax.random.normal(jax.random.key(seed), shape)


def test_params_shapes_and_logical_axes():
  layer = MoeLayer(config=MoeConfig(num_experts=E, shared_expert_dim=6), hidden_dim=F)
  v = jax.eval_shape(layer.init, jax.random.key(0), _x())
  shapes = jax.tree.map(jnp.shape, nn.unbox(v["params"]))
  assert shapes["router"] == {"kernel": (D, E)}
  assert shapes["experts"] == {"wi_0": {"kernel": (E, D, F)}, "wi_1": {"kernel": (E, D, F)},
                               "wo": {"kernel": (E, F, D)}}
  assert shapes["shared_expert"]["wo"]["kernel"] == (6, D)
  names = jax.tree.map(lambda p: p.names, v["params"],
                       is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))
  assert names["experts"]["wi_0"]["kernel"] == ("expert", "embed", "mlp")
  assert names["experts"]["wo"]["kernel"] == ("expert", "mlp", "embed")
  assert names["router"]["kernel"] == ("embed", "unmodeled")
  plain = MoeLayer(config=MoeConfig(num_experts=E), hidden_dim=F, gated=False)
  assert set(jax.eval_shape(plain.init, jax.random.key(0), _x())["params"]["experts"]) == {
      "wi", "wo"}


def test_sown_losses_and_metrics(init_params):
  cfg = MoeConfig(num_experts=E, num_selected=2, capacity_factor=1.0, min_capacity=1,
                  load_balancing_loss_coef=0.5, z_loss_coef=0.25)
  layer = MoeLayer(config=cfg, hidden_dim=F)
  x = _x()
  params = init_params(layer, x)
  y, state = jax.jit(lambda p, x: layer.apply(p, x, mutable=COLLECTIONS))(params, x)
  assert y.shape == x.shape
  aux, metrics = state[AUX_LOSS_COLLECTION], state[METRICS_COLLECTION]
  assert set(aux) == {"load_balancing_loss", "router_z_loss"}
  assert set(metrics) == {"load_balancing_loss", "router_z_loss", "expert_usage",
                          "dropped_fraction", "dropped_token_fraction", "router_confidence"}
  (lb,), (z,) = metrics["load_balancing_loss"], metrics["router_z_loss"]
  np.testing.assert_allclose(aux["load_balancing_loss"][0], 0.5 * lb, rtol=1e-6)
  np.testing.assert_allclose(aux["router_z_loss"][0], 0.25 * z, rtol=1e-6)
  np.testing.assert_allclose(total_aux_loss(state), 0.5 * lb + 0.25 * z, rtol=1e-6)
  assert metrics["expert_usage"][0].shape == (E,)
  np.testing.assert_allclose(metrics["expert_usage"][0].sum() + metrics["dropped_fraction"][0],
                             1.0, rtol=1e-6)
  assert lb >= 1.0 - 1e-6  # E·Σ f P >= 1 (Cauchy-Schwarz-ish at the optimum)

  # The aux loss is differentiable w.r.t. the router.
  def loss(p):
    _, st = layer.apply(p, x, mutable=COLLECTIONS)
    return total_aux_loss(st)
  g = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(g["params"]["router"]["kernel"]).sum()) > 0


def test_upcycled_identical_experts_equal_dense_ffn(init_params):
  """Experts copied from a dense Mlp, gates summing to 1, nothing dropped: y = dense(x)."""
  x = _x(1)
  dense = Mlp(hidden_dim=F, out_features=D)
  dense_params = init_params(dense, x, seed=2)["params"]
  for dispatch in ("sorted", "ragged", "onehot"):
    cfg = MoeConfig(num_experts=E, num_selected=2, renormalize=True, capacity_factor=None,
                    dispatch=dispatch)
    layer = MoeLayer(config=cfg, hidden_dim=F)
    params = init_params(layer, x, seed=3)["params"]
    params["experts"] = upcycle_dense_params(dense_params, E)
    chex.assert_trees_all_close(jax.jit(layer.apply)({"params": params}, x),
                                dense.apply({"params": dense_params}, x), atol=1e-5)


def test_shared_expert_is_added(init_params):
  x = _x(2)
  cfg = MoeConfig(num_experts=E, shared_expert_dim=12)
  layer = MoeLayer(config=cfg, hidden_dim=F)
  params = init_params(layer, x)["params"]
  routed = MoeLayer(config=cfg.replace(shared_expert_dim=None), hidden_dim=F)
  routed_params = {k: v for k, v in params.items() if k != "shared_expert"}
  shared = jax.jit(Mlp(hidden_dim=12, out_features=D).apply)(
      {"params": params["shared_expert"]}, x)
  chex.assert_trees_all_close(jax.jit(layer.apply)({"params": params}, x),
                              jax.jit(routed.apply)({"params": routed_params}, x) + shared,
                              atol=1e-6)


def test_shared_experts_count_and_sigmoid_gate(init_params):
  """n shared experts fuse into one Mlp of width n·F; Qwen2-MoE's gate scales it by sigmoid(x·w)."""
  x = _x(4)
  cfg = MoeConfig(num_experts=E, shared_expert_dim=6, num_shared_experts=2,
                  shared_expert_gate=True)
  layer = MoeLayer(config=cfg, hidden_dim=F)
  params = jax.tree.map(lambda p: p + 0.3, init_params(layer, x)["params"])  # gate w != 0
  assert params["shared_expert"]["wo"]["kernel"].shape == (12, D)
  assert params["shared_expert_gate"]["kernel"].shape == (D, 1)
  routed = MoeLayer(config=cfg.replace(num_shared_experts=0, shared_expert_gate=False),
                    hidden_dim=F)
  routed_params = {k: v for k, v in params.items() if not k.startswith("shared_expert")}
  assert set(jax.eval_shape(routed.init, jax.random.key(0), x)["params"]) == {"router",
                                                                              "experts"}
  shared = Mlp(hidden_dim=12, out_features=D).apply({"params": params["shared_expert"]}, x)
  gate = jax.nn.sigmoid(x @ params["shared_expert_gate"]["kernel"])
  chex.assert_trees_all_close(jax.jit(layer.apply)({"params": params}, x),
                              jax.jit(routed.apply)({"params": routed_params}, x)
                              + gate * shared, atol=1e-5)
  with pytest.raises(ValueError, match="shared_expert_gate needs a shared expert"):
    MoeConfig(num_experts=E, shared_expert_gate=True)
  with pytest.raises(ValueError, match="num_shared_experts must be >= 0"):
    MoeConfig(num_experts=E, shared_expert_dim=4, num_shared_experts=-1)


def test_jitter_only_with_jitter_rng(init_params):
  x = _x(3)
  layer = MoeLayer(config=MoeConfig(num_experts=E, jitter_noise=0.5, capacity_factor=None),
                   hidden_dim=F)
  params = init_params(layer, x)
  apply = jax.jit(layer.apply)
  base = apply(params, x)
  chex.assert_trees_all_close(apply(params, x, rngs={}), base)
  jit1 = apply(params, x, rngs={"jitter": jax.random.key(1)})
  assert not np.allclose(jit1, base)


def test_groups_and_dtypes(init_params):
  x = _x(4, (4, 6, D))
  cfg = MoeConfig(num_experts=E, num_groups=3, router="experts_choose", capacity_factor=2.0)
  layer = MoeLayer(config=cfg, hidden_dim=F, dtype=jnp.bfloat16)
  params = init_params(layer, x)
  y, st = jax.jit(lambda p, x: layer.apply(p, x, mutable=COLLECTIONS))(params, x)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  assert st[METRICS_COLLECTION]["router_z_loss"][0].dtype == jnp.float32
  with pytest.raises(ValueError, match="num_groups=5"):
    jax.eval_shape(MoeLayer(config=cfg.replace(num_groups=5), hidden_dim=F).init,
                   jax.random.key(0), x)


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=4, num_selected=5), "num_selected"),
    (dict(num_experts=4, router="hash"), "router"),
    (dict(num_experts=4, dispatch="dense"), "dispatch"),
    (dict(num_experts=4, dispatch="ragged", router="experts_choose"), "ragged"),
    (dict(num_experts=4, capacity_factor=-1.0), "capacity_factor"),
    (dict(num_experts=4, jitter_noise=1.5), "jitter_noise"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    MoeConfig(**kw)


def _deepseek_layer_and_hf(dispatch="sorted"):
  torch = pytest.importorskip("torch")
  dsv3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
  from transformers import DeepseekV3Config
  cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=2,
                         norm_topk_prob=True, routed_scaling_factor=2.5)
  torch.manual_seed(0)
  hf = dsv3.DeepseekV3MoE(cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0, 0.5)
    hf.gate.e_score_correction_bias.normal_(0, 0.3)
  moe = MoeConfig(num_experts=8, num_selected=2, renormalize=True, scoring="sigmoid",
                  score_bias=True, num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                  shared_expert_dim=F, num_shared_experts=2, capacity_factor=None,
                  dispatch=dispatch)
  t = lambda a: np.asarray(a.detach().numpy())  # noqa: E731
  gu, down = t(hf.experts.gate_up_proj), t(hf.experts.down_proj)
  params = {"router": {"kernel": t(hf.gate.weight).T},
            "score_bias": t(hf.gate.e_score_correction_bias),
            "experts": {"wi_0": {"kernel": gu[:, :F].transpose(0, 2, 1)},
                        "wi_1": {"kernel": gu[:, F:].transpose(0, 2, 1)},
                        "wo": {"kernel": down.transpose(0, 2, 1)}},
            "shared_expert": {n: {"kernel": t(getattr(hf.shared_experts, hn).weight).T}
                              for n, hn in (("wi_0", "gate_proj"), ("wi_1", "up_proj"),
                                            ("wo", "down_proj"))}}
  return MoeLayer(config=moe, hidden_dim=F), params, hf, torch


@pytest.mark.parametrize("dispatch", ["sorted", "ragged"])
def test_sigmoid_router_with_shared_experts_matches_deepseek_v3(dispatch):
  layer, params, hf, torch = _deepseek_layer_and_hf(dispatch)
  x = _x(3)
  v = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, nn.unbox(v)) == jax.tree.map(jnp.shape, params)
  y = layer.apply({"params": params}, x, mutable=COLLECTIONS)[0]
  with torch.no_grad():
    want = hf(torch.tensor(np.asarray(x))).numpy()
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=1e-5)
  grads = jax.grad(lambda p: layer.apply({"params": p}, x, mutable=COLLECTIONS)[0].sum())(params)
  assert float(jnp.abs(grads["score_bias"]).max()) == 0.0  # the correction bias is not trained
  assert float(jnp.abs(grads["router"]["kernel"]).max()) > 0.0


def test_sigmoid_scoring_config_errors():
  with pytest.raises(ValueError, match="needs scoring='sigmoid'"):
    MoeConfig(num_experts=8, score_bias=True)
  with pytest.raises(ValueError, match="num_expert_groups=3 must divide"):
    MoeConfig(num_experts=8, scoring="sigmoid", num_expert_groups=3)
  with pytest.raises(ValueError, match="exceeds the 2 experts"):
    MoeConfig(num_experts=8, num_selected=3, scoring="sigmoid", num_expert_groups=4)
