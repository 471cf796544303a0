"""Expert parallelism on 8 fake CPU devices: equal to one device, bounded all-to-all traffic."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, MoeConfig, MoeLayer,
                         plan_from_context)
from moe_jax.train.partitioning import DEFAULT_RULES, logical_to_mesh_spec, make_mesh

B, L, D, F, E, K = 8, 16, 8, 16, 8, 2
COLLECTIONS = [AUX_LOSS_COLLECTION, METRICS_COLLECTION]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _layer(cf=1.0, **kw):
  cfg = MoeConfig(num_experts=E, num_selected=K, capacity_factor=cf, min_capacity=1, **kw)
  return MoeLayer(config=cfg, hidden_dim=F)


def _setup(layer, init_params):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  return x, r, init_params(layer, x)


def _value_and_grad(layer):
  def loss(params, x, r):
    y, state = layer.apply(params, x, mutable=COLLECTIONS)
    return jnp.sum(y * r) / y.size + jax.tree.reduce(
        lambda a, b: a + b, state[AUX_LOSS_COLLECTION]), (y, state)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


MESHES = [{"data": 1, "expert": 8}, {"data": 2, "expert": 4},
          {"data": 2, "expert": 2, "model": 2}]


@pytest.mark.parametrize("router,meshes", [("tokens_choose", MESHES),
                                           ("experts_choose", [{"data": 4, "model": 2}])])
def test_expert_parallel_equals_single_device(router, meshes, init_params):
  layer = _layer(router=router)
  x, r, params = _setup(layer, init_params)
  fn = _value_and_grad(layer)
  (l0, (y0, st0)), g0 = fn(params, x, r)
  if router == "tokens_choose":  # capacity really binds: some tokens are dropped
    assert float(st0[METRICS_COLLECTION]["dropped_fraction"][0]) > 0
  for shape in meshes:
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
      plan = plan_from_context()
      assert plan.num_expert_shards == shape.get("expert", 1)
      compiled = _value_and_grad(layer).lower(params, x, r).compile()
    hlo = compiled.as_text()
    assert ("all-to-all" in hlo) == (plan.num_expert_shards > 1), shape
    assert "all-gather" not in hlo, shape  # routing and dispatch stay local
    (l1, (y1, st1)), g1 = compiled(params, x, r)
    msg = f"mesh {shape}"
    chex.assert_trees_all_close(y1, y0, atol=1e-5, rtol=1e-5, custom_message=msg)
    chex.assert_trees_all_close(l1, l0, atol=1e-5, rtol=1e-5, custom_message=msg)
    chex.assert_trees_all_close(st1, st0, atol=1e-5, rtol=1e-5, custom_message=msg)
    chex.assert_trees_all_close(g1, g0, atol=1e-5, rtol=1e-5, custom_message=msg)


_SHAPE = re.compile(r"\b(?:f32|bf16|f16|s32)\[([\d,]*)\]")


def all_to_all_elements(hlo: str) -> list[int]:
  """Elements moved by each all-to-all in a compiled HLO (tuple or array form)."""
  out = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*?) all-to-all(?:-start)?\(", line)
    if m:
      out.append(sum(int(np.prod([int(d) for d in dims.split(",") if d]))
                     for dims in _SHAPE.findall(m.group(1))))
  return out


@pytest.mark.parametrize("shape", [{"data": 2, "expert": 4},
                                   {"data": 2, "expert": 2, "model": 2}])
def test_all_to_all_traffic_per_token(shape, init_params):
  cf = 1.0
  layer = _layer(cf=cf)
  x, _, params = _setup(layer, init_params)
  mesh = make_mesh(shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    hlo = jax.jit(lambda p, x: layer.apply(p, x)).lower(params, x).compile().as_text()
  moved = all_to_all_elements(hlo)
  assert len(moved) == 2, moved  # dispatch and return, nothing else
  tokens_per_device = B * L // (shape["data"] * shape["expert"])
  per_token = sum(moved) / tokens_per_device
  assert per_token <= cf * 2 * K * D, (moved, per_token)
  # And no hidden all-gather of the tokens or the routing in the forward pass.
  assert "all-gather" not in hlo


def test_param_specs_under_default_rules():
  layer = _layer()
  x = jnp.ones((B, L, D))
  abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
  names = jax.tree.map(lambda p: p.names, abstract["params"],
                       is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))
  spec = lambda n: logical_to_mesh_spec(n, DEFAULT_RULES)
  assert spec(names["experts"]["wi_0"]["kernel"]) == jax.P("expert", None, "model")
  assert spec(names["experts"]["wo"]["kernel"]) == jax.P("expert", "model", None)
  assert spec(names["router"]["kernel"]) == jax.P(None, None)


def test_indivisible_groups_raise(init_params):
  layer = _layer()
  x = jnp.ones((4, L, D))  # 4 groups over 8 token shards
  params = init_params(layer, x)
  with jax.set_mesh(make_mesh({"data": 2, "expert": 4})), nn.logical_axis_rules(DEFAULT_RULES):
    with pytest.raises(ValueError, match="4 token groups cannot be split"):
      jax.jit(layer.apply)(params, x)


def test_missing_rule_raises(init_params):
  layer = _layer()
  x = jnp.ones((B, L, D))
  params = init_params(layer, x)
  rules = [r for r in DEFAULT_RULES if r[0] != "expert"]
  with jax.set_mesh(make_mesh({"expert": 8})), nn.logical_axis_rules(rules):
    with pytest.raises(ValueError, match="no rule for 'expert'"):
      jax.jit(layer.apply)(params, x)


def test_sigmoid_router_expert_parallel_equals_single_device(init_params):
  """DeepSeek-V3's router (its correction bias closed over by the local routing)."""
  layer = _layer(scoring="sigmoid", score_bias=True, num_expert_groups=4, topk_groups=2,
                 renormalize=True, routed_scaling_factor=2.5)
  x, r, params = _setup(layer, init_params)
  params["params"]["score_bias"] = jnp.linspace(-0.3, 0.3, E)
  fn = _value_and_grad(layer)
  (l0, (y0, _)), g0 = fn(params, x, r)
  with jax.set_mesh(make_mesh({"data": 2, "expert": 4})), nn.logical_axis_rules(DEFAULT_RULES):
    (l1, (y1, _)), g1 = _value_and_grad(layer)(params, x, r)
  chex.assert_trees_all_close((y1, l1, g1), (y0, l0, g0), atol=1e-5, rtol=1e-5)
