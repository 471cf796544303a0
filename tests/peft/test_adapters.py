"""Adapter and router math against naive per-expert loops; config validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.peft import routers
from moe_jax.peft.adapters import (LoraAdapter, ScaleAdapter, lora_delta, lora_update,
                                   molora_delta, mov_scale)
from moe_jax.peft.config import PeftConfig

B, L, D = 2, 5, 8


def _normal(seed, shape):
  # NumPy, not jax.random: eager jax.random compiles once per shape (seconds each).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _x(seed=0, shape=(B, L, D)):
  return _normal(seed, shape)


def _rand_params(module, *args, seed=0, center=0.0, scale=0.5, **kw):
  """Random parameters of ``module`` (shapes from ``eval_shape``: no init compiled)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kw))["params"]
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(shapes))
  return jax.tree.unflatten(treedef, [center + scale * _normal(seed + i, x.shape)
                                      for i, x in enumerate(leaves)])


# ----------------------------------------------------------------------------- naive references


def naive_molora(x, w_BLE, a_IER, b_ERK, scaling):
  """Σ_e w_e · scaling · (x A_e) B_e, one expert at a time."""
  out = 0.0
  for e in range(a_IER.shape[-2]):
    a = a_IER[..., e, :]
    b = b_ERK[e]
    xa = jnp.tensordot(x, a, axes=a.ndim - 1)
    delta = jnp.tensordot(xa, b, axes=1) * scaling
    out = out + w_BLE[..., e].reshape(w_BLE.shape[:-1] + (1,) * (delta.ndim - 2)) * delta
  return out


def naive_top_k_weights(probs, k):
  """The k largest probabilities of each row, renormalised; the mask carries no gradient."""
  kth = jax.lax.stop_gradient(jnp.sort(probs, -1)[..., -k:-k + 1])
  w = jnp.where(probs >= kth, probs, 0.0)
  return w / w.sum(-1, keepdims=True)


def naive_mov(y, w_BLE, s_EK):
  merged = 0.0
  for e in range(s_EK.shape[0]):
    merged = merged + w_BLE[..., e].reshape(w_BLE.shape[:-1] + (1,) * (s_EK.ndim - 1)) * s_EK[e]
  return y * merged


def test_molora_stacked_product_equals_per_expert_loop():
  e, r = 4, 3
  x = _x(0, (B, L, 3, 4))  # two contracted dims, like the attention output projection
  a = _normal(1, (3, 4, e, r))
  b = _normal(2, (e, r, D))
  w = jax.nn.softmax(_normal(3, (B, L, e)), -1)
  got = molora_delta(x, w, a, b, scaling=2.0)
  np.testing.assert_allclose(got, naive_molora(x, w, a, b, 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("experts", [1, 3])
def test_low_rank_backward_equals_autodiff_of_the_plain_math(experts):
  """The hand-written backward of LoRA / MoLoRA (x, A, B and the router weights)."""
  ks = jax.random.split(jax.random.key(7), 5)
  x = jax.random.normal(ks[0], (2, 5, 3, 4))  # [B, L, H, Dh] in: two input dims
  a = jax.random.normal(ks[1], (3, 4, experts, 2))
  b = jax.random.normal(ks[2], (experts, 2, 6))
  w = jax.nn.softmax(jax.random.normal(ks[3], (2, 5, experts)))
  cot = jax.random.normal(ks[4], (2, 5, 6))

  def plain(x, a, b, w):
    u = jnp.einsum("blhd,hder->bler", x, a) * 0.5 * w[..., None]
    return jnp.einsum("bler,erk->blk", u, b)

  def ours(x, a, b, w):
    if experts == 1:  # LoRA: no router
      return lora_delta(x, a[:, :, 0], b[0], scaling=0.5) * w[..., :1] / w[..., :1]
    return molora_delta(x, w, a, b, scaling=0.5)

  args = (x, a, b, w)
  want = jax.vjp(plain, *args)[1](cot)
  got = jax.vjp(ours, *args)[1](cot)
  np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-5, atol=1e-6)
  for name, g, h in zip("xabw", got, want):
    if experts == 1 and name == "w":
      continue  # LoRA has no router weights
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("sum_to_one", [True, False])
def test_mov_merge_equals_per_expert_loop(sum_to_one):
  e = 5
  y = _x(0, (B, L, 2, 3))
  s = 1.0 + 0.3 * _normal(1, (e, 2, 3))
  w = jax.nn.softmax(_normal(3, (B, L, e)), -1)
  if not sum_to_one:
    w = w * 0.7
  got = mov_scale(y, w, s, weights_sum_to_one=sum_to_one)
  np.testing.assert_allclose(got, naive_mov(y, w, s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sum_to_one", [True, False])
@pytest.mark.parametrize("extra", [(), (3,)])
def test_mov_gradients_equal_autodiff_of_the_loop(sum_to_one, extra):
  """mov_scale's hand-written backward (merge_and_scale): w.r.t. y, w and s.

  ``extra`` dims sit between the tokens and the features (a BAM attention
  expert's queries): one merged vector scales them all.
  """
  e = 5
  y = _x(0, (B, L) + extra + (2, 3))
  s = 1.0 + 0.3 * _normal(1, (e, 2, 3))
  w = jax.nn.softmax(_normal(3, (B, L, e)), -1) * (1.0 if sum_to_one else 0.7)
  g = _normal(4, y.shape)

  def loss(f):
    return lambda y, w, s: jnp.sum(f(y, w, s) * g)

  def reference(y, w, s):  # the same formula as mov_scale, left to autodiff
    merged = jnp.einsum("ble,ehd->blhd", w, s - 1.0 if sum_to_one else s)
    merged = merged.reshape((B, L) + (1,) * len(extra) + (2, 3))
    return y * (1.0 + merged if sum_to_one else merged)

  got = jax.grad(loss(lambda y, w, s: mov_scale(y, w, s, weights_sum_to_one=sum_to_one)),
                 argnums=(0, 1, 2))(y, w, s)
  ref = jax.grad(loss(reference), argnums=(0, 1, 2))(y, w, s)
  for name, a, b in zip("yws", got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")


def test_soft_merged_modules_equal_router_weighted_loop():
  p = PeftConfig(method="molora", num_experts=4, rank=2, alpha=6.0)
  x = _x()
  mod = LoraAdapter(peft=p, in_axes=("embed",), out_features=(3, 4), out_axes=("heads", "kv"))
  params = _rand_params(mod, x, route_x=x, seed=1)
  got = mod.apply({"params": params}, x, route_x=x)
  w = jax.nn.softmax(x @ params["router"]["kernel"], -1)
  ref = naive_molora(x, w, params["lora_a"], params["lora_b"], p.scaling)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

  p = PeftConfig(method="mov", num_experts=4)
  y = _x(5, (B, L, 3, 4))
  mod = ScaleAdapter(peft=p, axes=("heads", "kv"))
  params = _rand_params(mod, y, route_x=x, seed=2, center=1.0, scale=0.3)
  got = mod.apply({"params": params}, y, route_x=x)
  w = jax.nn.softmax(x @ params["router"]["kernel"], -1)
  np.testing.assert_allclose(got, naive_mov(y, w, params["scale"]), rtol=1e-5, atol=1e-6)


def test_single_expert_mixtures_equal_ia3_and_lora_exactly():
  x = _x()
  mix = LoraAdapter(peft=PeftConfig(method="molora", num_experts=1, rank=3), in_axes=("embed",),
                    out_features=(6,), out_axes=("mlp",))
  single = LoraAdapter(peft=PeftConfig(method="lora", rank=3), in_axes=("embed",),
                       out_features=(6,), out_axes=("mlp",))
  mp = _rand_params(mix, x, route_x=x, seed=3)
  sp = {"lora_a": mp["lora_a"][..., 0, :], "lora_b": mp["lora_b"][0]}
  np.testing.assert_array_equal(mix.apply({"params": mp}, x, route_x=x),
                                single.apply({"params": sp}, x))

  y = _x(7, (B, L, 6))
  mix = ScaleAdapter(peft=PeftConfig(method="mov", num_experts=1), axes=("mlp",))
  single = ScaleAdapter(peft=PeftConfig(method="ia3"), axes=("mlp",))
  mp = _rand_params(mix, y, route_x=x, seed=4, center=1.0, scale=2.0)
  np.testing.assert_array_equal(mix.apply({"params": mp}, y, route_x=x),
                                single.apply({"params": {"scale": mp["scale"][0]}}, y))


def test_top_k_masks_the_right_experts():
  logits = jnp.array([[0.1, 2.0, -1.0, 1.5, 0.0],
                      [3.0, -2.0, 2.5, 0.2, 2.9]])
  r = routers.route(logits, top_k=2, renormalize=False)
  keep = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 1]], bool)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  np.testing.assert_allclose(r.weights, np.where(keep, probs, 0.0), rtol=1e-6)
  r = routers.route(logits, top_k=2, renormalize=True)
  ref = np.where(keep, probs, 0.0)
  np.testing.assert_allclose(r.weights, ref / ref.sum(-1, keepdims=True), rtol=1e-6)
  assert np.all(np.asarray(r.weights)[~keep] == 0.0)
  # Through a MoLoRA site: equal to the loop over only the kept experts.
  p = PeftConfig(method="molora", num_experts=5, rank=2, top_k=2)
  x = _x()
  mod = LoraAdapter(peft=p, in_axes=("embed",), out_features=(4,), out_axes=("embed",))
  params = _rand_params(mod, x, route_x=x, seed=5)
  probs = jax.nn.softmax(x @ params["router"]["kernel"], -1)
  w = naive_top_k_weights(probs, 2)
  ref = naive_molora(x, w, params["lora_a"], params["lora_b"], p.scaling)
  np.testing.assert_allclose(mod.apply({"params": params}, x, route_x=x), ref, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("method", ["molora", "mov"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_module_gradients_through_the_router_equal_autodiff_of_the_loop(method, top_k):
  """Every gradient of a whole mixture site (router kernel, adapters, the adapted input
  and the routing input) through the hand-written backward passes, soft and top-k
  (renormalised) routing, against autodiff of the per-expert loop with a plain router."""
  e = 4
  p = PeftConfig(method=method, num_experts=e, rank=2, alpha=4.0, top_k=top_k)
  x = _x(11)
  if method == "molora":
    mod = LoraAdapter(peft=p, in_axes=("embed",), out_features=(3,), out_axes=("mlp",))
    params = _rand_params(mod, x, route_x=x, seed=12)
  else:
    x = _x(11, (B, L, 3))  # the scaled projection's output
    mod = ScaleAdapter(peft=p, axes=("mlp",))
    params = _rand_params(mod, x, route_x=_x(13), seed=12, center=1.0, scale=0.3)
  route_x = _x(13)
  cot = _normal(14, (B, L, 3))

  def plain_weights(kernel, rx):
    probs = jax.nn.softmax(rx @ kernel, -1)
    return probs if top_k is None else naive_top_k_weights(probs, top_k)

  def plain(params, x, rx):
    w = plain_weights(params["router"]["kernel"], rx)
    if method == "molora":
      return naive_molora(x, w, params["lora_a"], params["lora_b"], p.scaling)
    return naive_mov(x, w, params["scale"])

  def ours(params, x, rx):
    return mod.apply({"params": params}, x, route_x=rx)

  want_out, want_vjp = jax.vjp(plain, params, x, route_x)
  got_out, got_vjp = jax.vjp(ours, params, x, route_x)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
  want, got = want_vjp(cot), got_vjp(cot)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_masked_experts_get_no_gradient():
  p = PeftConfig(method="mov", num_experts=4, top_k=1)
  x = _x()
  y = _x(1, (B, L, 3))
  mod = ScaleAdapter(peft=p, axes=("mlp",))
  params = _rand_params(mod, y, route_x=x, seed=6, center=1.0, scale=0.3)
  x1 = x[:1, :1]  # one token: exactly one expert is selected
  g = jax.grad(lambda s: mod.apply({"params": {**params, "scale": s}}, y[:1, :1],
                                   route_x=x1).sum())(params["scale"])
  chosen = int(jnp.argmax(x1[0, 0] @ params["router"]["kernel"]))
  nonzero = np.flatnonzero(np.abs(np.asarray(g)).sum(-1))
  assert nonzero.tolist() == [chosen]


def test_router_losses_and_metrics():
  e = 4
  uniform = routers.route(jnp.zeros((3, 6, e)))
  assert float(routers.router_confidence(uniform)) == pytest.approx(1 / e)
  usage = routers.expert_usage(uniform)
  np.testing.assert_allclose(usage, np.full(e, 1 / e), rtol=1e-6)
  assert float(routers.usage_entropy(usage)) == pytest.approx(np.log(e), rel=1e-6)
  assert float(routers.router_z_loss(uniform.logits)) == pytest.approx(np.log(e) ** 2, rel=1e-6)
  # collapsed routing: everyone on expert 2
  logits = jnp.zeros((3, 6, e)).at[..., 2].set(30.0)
  collapsed = routers.route(logits)
  assert float(routers.usage_entropy(routers.expert_usage(collapsed))) == pytest.approx(0, abs=1e-5)
  assert float(routers.router_confidence(collapsed)) == pytest.approx(1.0, abs=1e-6)
  assert float(routers.load_balancing_loss(collapsed)) == pytest.approx(e, rel=1e-5)
  # padding tokens are ignored
  logits = jnp.zeros((1, 4, e)).at[0, 2:, 0].set(30.0)
  valid = jnp.array([[True, True, False, False]])
  r = routers.route(logits)
  assert float(routers.router_confidence(r, valid)) == pytest.approx(1 / e)


def test_sentence_pooling_over_attended_tokens():
  from moe_jax.models.decoder import attention_mask
  from moe_jax.models.t5 import encoder_mask
  h = _x(0, (1, 4, D))
  valid = jnp.array([[True, True, True, False]])
  enc = routers.self_attention_context(h, encoder_mask(valid, 4), None, sentence=True)
  np.testing.assert_allclose(enc.query_BLD[0, 1], h[0, :3].mean(0), rtol=1e-5)
  np.testing.assert_array_equal(enc.query_valid_BL, valid)
  dec = routers.self_attention_context(h, attention_mask(valid, jnp.arange(4), None), None,
                                       sentence=True)
  np.testing.assert_allclose(dec.query_BLD[0, 1], h[0, :2].mean(0), rtol=1e-5)  # prefix only
  with pytest.raises(ValueError, match="full sequences only"):
    routers.self_attention_context(h[:, :1], attention_mask(valid, jnp.arange(1), None), 0,
                                   sentence=True)


def test_sown_losses_follow_their_coefficients():
  x = _x()
  mod = routers.Router(num_experts=3, load_balance_coef=0.5)
  params = _rand_params(mod, x, seed=7)
  _, state = mod.apply({"params": params}, x, mutable=[routers.AUX_LOSS_COLLECTION,
                                                       routers.METRICS_COLLECTION])
  aux = state[routers.AUX_LOSS_COLLECTION]
  assert set(aux) == {"load_balancing_loss"}  # z_loss_coef = 0: metric only
  metrics = state[routers.METRICS_COLLECTION]
  assert set(metrics) == {"load_balancing_loss", "router_z_loss", "expert_usage",
                          "usage_entropy", "router_confidence"}
  np.testing.assert_allclose(aux["load_balancing_loss"][0],
                             0.5 * metrics["load_balancing_loss"][0], rtol=1e-6)
  assert float(routers.total_aux_loss(state)) == pytest.approx(
      float(aux["load_balancing_loss"][0]))


def test_lora_update_is_the_dense_delta():
  a = _normal(0, (3, 4, 2))
  b = _normal(1, (2, 5))
  x = _x(2, (B, L, 3, 4))
  from moe_jax.peft.adapters import lora_delta
  np.testing.assert_allclose(jnp.einsum("blhd,hdk->blk", x, lora_update(a, b, 1.5)),
                             lora_delta(x, a, b, scaling=1.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(method="adapter"), "method='adapter' is not one of"),
    (dict(method="ia3", sites=("q", "o")), r"sites \['o'\] are not ia3 sites"),
    (dict(method="lora", sites=("ffn",)), r"sites \['ffn'\] are not lora sites"),
    (dict(method="lora", sites="q"), "tuple of site names"),
    (dict(method="lora", num_experts=4), "needs a mixture method"),
    (dict(method="mov", num_experts=4, top_k=5), "top_k=5 must be in"),
    (dict(method="mov", router="expert"), "router='expert'"),
    (dict(method="molora", rank=0), "rank must be >= 1"),
    (dict(method="ia3", router="sentence"), r"ia3 has no router, so \{'router': 'sentence'\}"),
    (dict(method="mov", z_loss_coef=-1.0), "z_loss_coef must be >= 0"),
])
def test_config_errors_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    PeftConfig(**kw)


def test_config_round_trips_and_canonicalises_sites():
  c = PeftConfig(method="molora", sites=("v", "q", "ffn_out"), num_experts=10, top_k=2)
  assert c.sites == ("q", "v", "ffn_out")
  assert PeftConfig.from_dict(c.to_dict()) == c
  assert PeftConfig(method="mov").sites == ("k", "v", "ffn")
  with pytest.raises(ValueError, match=r"unknown PeftConfig field\(s\) \['experts'\]"):
    PeftConfig.from_dict({"method": "mov", "experts": 3})
