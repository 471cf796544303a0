"""Rows past the ragged exchange's receive buffer are counted exactly (``buffer_dropped``),
and so is the load that would have fit (``buffer_load``).

The exchange is the ``"emulated"`` one (``ragged_all_to_all`` semantics over a
padded all_to_all: XLA:CPU has no ragged all-to-all) on 8 fake devices.
The reference: device j of a row of the ``expert`` axis receives, from every
source of that row, the assignments to its experts; what exceeds its buffer
of R rows is dropped.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import METRICS_COLLECTION, MoeConfig, MoeLayer, plan_from_context
from moe_jax.moe.layer import BUFFER_DROPPED, BUFFER_LOAD
from moe_jax.moe.parallel import expert_parallel_apply
from moe_jax.moe.ragged_parallel import receive_rows, worst_case_buffers
from moe_jax.moe.routing import tokens_choose_route
from moe_jax.train.partitioning import DEFAULT_RULES, make_mesh

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

G, S, D, F, E, K = 8, 4, 8, 16, 8, 2
MESH = {"data": 2, "expert": 4}


def _expected_drops(expert_GSK: np.ndarray, rows: int) -> tuple[int, float]:
  """Sum over the receivers of max(0, assignments to its experts - rows), and the
  most assignments one receiver got over a device's balanced share (g·S·K)."""
  n_data, n = MESH["data"], MESH["expert"]
  e = E // n
  per_device = expert_GSK.reshape(n_data, n, -1)  # groups G split as (data, expert)
  dropped, most = 0, 0
  for row in per_device:
    received = np.bincount(row.reshape(-1) // e, minlength=n)
    dropped += int(np.maximum(received - rows, 0).sum())
    most = max(most, int(received.max()))
  return dropped, most / per_device[0, 0].size


def _route(choice_GSK: np.ndarray):
  """Tokens-choose routing that picks exactly ``choice_GSK`` (dropless capacity)."""
  logits = np.zeros((G, S, E), np.float32)
  for k in range(K):
    np.put_along_axis(logits, choice_GSK[..., k:k + 1], 10.0 - k, axis=-1)
  return tokens_choose_route(jnp.asarray(logits), num_selected=K, capacity=S)


def _experts(rng):
  return {n: jnp.asarray(rng.standard_normal(shape), jnp.float32) / 4
          for n, shape in (("wi_0", (E, D, F)), ("wi_1", (E, D, F)), ("wo", (E, F, D)))}


@pytest.mark.parametrize("case", ["skewed", "random"])
@pytest.mark.parametrize("factor", [0.25, 1.0])
def test_drop_count_is_exact(case, factor):
  rng = np.random.default_rng(0)
  if case == "skewed":  # every token picks experts 0 and 1 (both on the first device)
    choice = np.broadcast_to(np.array([0, 1]), (G, S, K)).copy()
  else:
    choice = np.stack([rng.permutation(E)[:K] for _ in range(G * S)]).reshape(G, S, K)
  routing = _route(choice)
  np.testing.assert_array_equal(np.asarray(routing.expert_GSK), choice)
  x = jnp.asarray(rng.standard_normal((G, S, D)), jnp.float32)
  ragged = dict(kernel="ragged_dot", interpret=False, exchange="emulated", buffer_factor=factor)
  with jax.set_mesh(make_mesh(MESH)), nn.logical_axis_rules(DEFAULT_RULES):
    plan = plan_from_context()
    fn = jax.jit(lambda x, r, p, f: expert_parallel_apply(
        x, r, p, plan=plan, method="ragged", ragged=dict(ragged, buffer_factor=f),
        return_exchange_stats=True), static_argnums=3)
    _, dropped, load = fn(x, routing, _experts(rng), factor)
    _, none_dropped, same_load = fn(x, routing, _experts(rng), None)
  g_local = G // 8
  rows = receive_rows(MESH["expert"], g_local * S, K, E // MESH["expert"], factor)
  expected, expected_load = _expected_drops(choice, rows)
  assert int(dropped) == expected
  assert int(none_dropped) == 0
  np.testing.assert_allclose([float(load), float(same_load)], expected_load, rtol=1e-6)
  assert (expected > 0) == (expected_load * g_local * S * K > rows)
  if case == "skewed":  # 4 sources x 4 tokens reach the first device of each row
    assert expected == 2 * max(0, 4 * S * K - rows)
    assert expected > 0
    assert expected_load == 4.0  # all 4 sources' assignments on one device


def test_layer_sows_the_count_and_worst_case_buffers_drop_nothing(init_params):
  cfg = MoeConfig(num_experts=E, num_selected=K, dispatch="ragged", ragged_exchange="emulated",
                  ragged_buffer_factor=0.25, capacity_factor=None)
  layer = MoeLayer(config=cfg, hidden_dim=F)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((G, S, D)), jnp.float32)
  params = init_params(layer, x)
  apply = lambda p, x: layer.apply(p, x, mutable=[METRICS_COLLECTION])
  with jax.set_mesh(make_mesh(MESH)), nn.logical_axis_rules(DEFAULT_RULES):
    y_small, small = jax.jit(apply)(params, x)
    with worst_case_buffers():
      y_full, full = jax.jit(lambda p, x: apply(p, x))(params, x)
  (dropped,), (fraction,) = small[METRICS_COLLECTION][BUFFER_DROPPED], \
      small[METRICS_COLLECTION]["dropped_fraction"]
  assert int(dropped) > 0  # a buffer of 1/4 of the balanced load overflows
  (load,) = small[METRICS_COLLECTION][BUFFER_LOAD]
  assert float(load) > 0.25 and float(load) == float(full[METRICS_COLLECTION][BUFFER_LOAD][0])
  np.testing.assert_allclose(float(fraction), int(dropped) / (G * S * K), rtol=1e-6)
  assert int(full[METRICS_COLLECTION][BUFFER_DROPPED][0]) == 0
  assert float(full[METRICS_COLLECTION]["dropped_fraction"][0]) == 0.0
  assert not np.allclose(np.asarray(y_small), np.asarray(y_full))
