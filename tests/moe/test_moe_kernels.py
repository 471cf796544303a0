"""Dropless kernels: megablox ``gmm`` (Pallas interpret mode) and the ragged expert exchange.

* ``grouped_matmul(kernel="gmm")`` equals ``ragged_dot`` and a per-group loop,
  with row padding to the tile handled inside (outputs and gradients).
* ``MoeLayer(dispatch="ragged", ragged_kernel="gmm")`` equals the sorted
  capacity path with no drops and a naive per-token loop (outputs, gradients).
* The ragged all-to-all body (``ragged_exchange="emulated"``: its exact
  semantics over a padded all_to_all, since XLA:CPU has no ragged
  all-to-all) on 8 fake devices equals one device, dropless.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import MoeConfig, MoeLayer
from moe_jax.moe.experts import gmm_tiling, grouped_matmul
from moe_jax.moe.ragged_parallel import receive_rows
from moe_jax.train.partitioning import DEFAULT_RULES, make_mesh

B, L, D, F, E, K = 8, 16, 8, 16, 4, 2


@pytest.mark.parametrize("m", [40, 128])
def test_gmm_equals_ragged_dot_and_loop(m):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((E, D, F)), jnp.float32)
  sizes = np.array([m // 4, 0, m // 2, m // 8], np.int32)  # an empty group; rows left over
  gs = jnp.asarray(sizes)
  r = jnp.asarray(rng.standard_normal((m, F)), jnp.float32)

  def loss(kernel, x, w):
    y = grouped_matmul(x, w, gs, kernel=kernel, interpret=True)
    return jnp.sum(y * r), y

  (_, y_gmm), g_gmm = jax.value_and_grad(lambda *a: loss("gmm", *a), (0, 1), has_aux=True)(x, w)
  (_, y_rd), g_rd = jax.value_and_grad(lambda *a: loss("ragged_dot", *a), (0, 1),
                                       has_aux=True)(x, w)
  ends = np.cumsum(sizes)
  y_loop = np.zeros((m, F), np.float32)
  for e in range(E):
    y_loop[ends[e] - sizes[e]:ends[e]] = np.asarray(x[ends[e] - sizes[e]:ends[e]] @ w[e])
  np.testing.assert_allclose(np.asarray(y_gmm), y_loop, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y_rd), y_loop, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g_gmm, g_rd, atol=1e-4, rtol=1e-5)


def test_gmm_tiling_is_mxu_sized():
  assert gmm_tiling(65536, 4096, 14336, groups=8) == (512, 512, 512)
  # 8 groups of ~512 rows: 128-row tiles, so few rows are computed twice
  assert gmm_tiling(4096, 4096, 14336, groups=8) == (128, 512, 512)
  assert gmm_tiling(32768, 4096, 14336, groups=8) == (512, 512, 512)
  assert gmm_tiling(16384, 4096, 14336, groups=8) == (256, 512, 512)
  assert gmm_tiling(1000, 2048, 768) == (128, 512, 256)
  assert gmm_tiling(64, 8, 16) == (128, 8, 16)  # tiny test dims: whole-dim tiles


def _layer(dispatch, cf=None, **kw):
  cfg = MoeConfig(num_experts=E, num_selected=K, capacity_factor=cf, min_capacity=1,
                  dispatch=dispatch, **kw)
  return MoeLayer(config=cfg, hidden_dim=F)


def _naive(params, x_BLD):
  """Token by token: top-k softmax gates, each chosen expert's SwiGLU, weighted sum."""
  p = params["params"]
  w = {n: p["experts"][n]["kernel"] for n in ("wi_0", "wi_1", "wo")}
  x_TD = x_BLD.reshape(-1, D)

  def one(x_D):
    probs = jax.nn.softmax(x_D @ p["router"]["kernel"])
    gate, idx = jax.lax.top_k(probs, K)
    ys = [(jax.nn.silu(x_D @ w["wi_0"][i]) * (x_D @ w["wi_1"][i])) @ w["wo"][i] for i in idx]
    return sum(g * y for g, y in zip(gate, ys))

  return jax.lax.map(one, x_TD).reshape(x_BLD.shape)


def _grads(fn, params, x, r):
  return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x) * r), (0, 1)))(params, x)


def test_layer_gmm_equals_sorted_without_drops_and_naive(init_params):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, L, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((2, L, D)), jnp.float32)
  gmm, srt = _layer("ragged", ragged_kernel="gmm"), _layer("sorted", cf=None)
  params = init_params(gmm, x)
  out = {name: _grads(lambda p, x, m=m: m.apply(p, x), params, x, r)
         for name, m in (("gmm", gmm), ("sorted", srt))}
  out["naive"] = _grads(_naive, params, x, r)
  for name in ("sorted", "naive"):
    chex.assert_trees_all_close(out["gmm"], out[name], atol=1e-5, rtol=1e-5,
                                custom_message=f"gmm vs {name}")


needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@needs_8
@pytest.mark.parametrize("shape,kernel", [({"data": 2, "expert": 4}, "ragged_dot"),
                                          ({"data": 2, "expert": 2, "model": 2}, "ragged_dot"),
                                          ({"data": 4, "expert": 2}, "gmm")])
def test_ragged_exchange_equals_single_device(shape, kernel, init_params):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  layer = _layer("ragged", ragged_kernel=kernel, ragged_exchange="emulated")
  params = init_params(layer, x)
  ref = _grads(lambda p, x: layer.apply(p, x), params, x, r)
  with jax.set_mesh(make_mesh(shape)), nn.logical_axis_rules(DEFAULT_RULES):
    fn = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(layer.apply(p, x) * r), (0, 1)))
    hlo = fn.lower(params, x).compile().as_text()
    got = fn(params, x)
  assert "all-to-all" in hlo
  chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5, custom_message=str(shape))


def test_receive_buffer_rows():
  # Dropless worst case: every token of every device sends min(K, e) rows here.
  assert receive_rows(8, 1024, 2, 1, None) == 8 * 1024
  assert receive_rows(4, 1024, 2, 4, None) == 4 * 1024 * 2
  assert receive_rows(8, 1024, 2, 1, 1.25) == 2560


@needs_8
def test_small_receive_buffer_drops_but_stays_finite(init_params):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((B, L, D)), jnp.float32)
  full = _layer("ragged", ragged_exchange="emulated")
  tight = _layer("ragged", ragged_exchange="emulated", ragged_buffer_factor=0.25)
  params = init_params(full, x)
  with jax.set_mesh(make_mesh({"data": 2, "expert": 4})), nn.logical_axis_rules(DEFAULT_RULES):
    y_full = jax.jit(full.apply)(params, x)
    y_tight = jax.jit(tight.apply)(params, x)
  assert np.isfinite(np.asarray(y_tight)).all()
  assert not np.allclose(np.asarray(y_tight), np.asarray(y_full))  # rows past the buffer: 0


@needs_8
def test_traced_for_tpu_is_the_ragged_path(init_params):
  """A plan traced for a TPU job (``building_for``) sees gmm and ragged_all_to_all, not padding."""
  from moe_jax.nn.attention_kernels import building_for
  x = jnp.ones((B, L, D), jnp.float32)
  layer = _layer("ragged")
  params = init_params(layer, x)
  with jax.set_mesh(make_mesh({"data": 2, "expert": 4})), nn.logical_axis_rules(DEFAULT_RULES):
    cpu_jaxpr = str(jax.make_jaxpr(layer.apply)(params, x))
    with building_for("tpu"):
      tpu_jaxpr = str(jax.make_jaxpr(layer.apply)(params, x))
  assert "ragged_all_to_all" in tpu_jaxpr and "pallas_call" in tpu_jaxpr
  assert "ragged_all_to_all" not in cpu_jaxpr and "all_to_all" in cpu_jaxpr
