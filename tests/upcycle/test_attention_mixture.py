"""Mixture of attention experts vs a naive per-expert loop; BAM decoding with both KV variants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decoding
from moe_jax.models.bam_decoder import BamDecoder
from moe_jax.models.decoder import attention_mask
from moe_jax.moe.attention_mixture import (AttentionMixture, AttentionMixtureConfig,
                                           mixture_weights)
from moe_jax.nn.attention import Attention
from moe_jax.upcycle import bam_merge

from upcycle_helpers import make_branch, make_config, make_params

B, L, D, H, K, DH, E = 2, 7, 24, 4, 2, 6, 3


def _random_params(module, x, mask, pos, seed=0):
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x, mask_BLS=mask,
                                   positions_BL=pos)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.4).astype(s.dtype), shapes)


@pytest.mark.parametrize("shared_kv,top_k,bias", [(False, None, False), (True, None, True),
                                                  (False, 2, True), (True, 1, False)])
def test_mixture_equals_weighted_sum_of_dense_attentions(shared_kv, top_k, bias):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  valid = np.ones((B, L), bool)
  valid[1, :2] = False
  pos = jnp.asarray(np.maximum(np.cumsum(valid, 1) - 1, 0))
  mask = attention_mask(jnp.asarray(valid), jnp.arange(L), None)
  cfg = AttentionMixtureConfig(num_experts=E, num_selected=top_k, shared_kv=shared_kv)
  common = dict(num_heads=H, num_kv_heads=K, head_dim=DH, out_features=D, qkv_bias=bias,
                out_bias=bias)
  mix = AttentionMixture(config=cfg, **common)
  p = _random_params(mix, x, mask, pos)
  got, _ = mix.apply({"params": p}, x, mask_BLS=mask, positions_BL=pos)

  # Reference: E dense attentions, weighted by the router's (top-k renormalised) softmax.
  logits = np.einsum("bld,de->ble", np.asarray(x), p["router"]["kernel"])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if top_k is not None:
    keep = np.argsort(-probs, axis=-1)[..., :top_k]
    w = np.zeros_like(probs)
    np.put_along_axis(w, keep, np.take_along_axis(probs, keep, -1), -1)
    w /= w.sum(-1, keepdims=True)
  else:
    w = probs
  dense = Attention(**common)
  want = 0.0
  for e in range(E):
    pe = {name: {k: (v if shared_kv and name in ("k", "v") else v[e]) for k, v in p[name].items()}
          for name in ("q", "k", "v", "o")}
    out_e, _ = dense.apply({"params": pe}, x, mask_BLS=mask, positions_BL=pos)
    want = want + w[..., e:e + 1] * np.asarray(out_e)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_mixture_weights_topk_and_soft():
  logits = jnp.asarray([[[2.0, 0.0, 1.0]]])
  soft, probs, chosen = mixture_weights(logits)
  assert chosen is None
  np.testing.assert_allclose(soft, probs)
  top, _, chosen = mixture_weights(logits, 2)
  np.testing.assert_array_equal(np.asarray(chosen)[0, 0], [0, 2])
  e2, e1 = np.exp(2.0), np.exp(1.0)
  np.testing.assert_allclose(np.asarray(top)[0, 0], [e2 / (e2 + e1), 0, e1 / (e2 + e1)],
                             rtol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _step(module, params, ids, valid, cache):
  return module.apply({"params": params}, ids, valid_BL=valid, cache=cache)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_bam_cached_decoding_equals_full_recompute(shared_kv):
  cfg = make_config(parallel_block=True, num_layers=2)
  seed = make_params(cfg)
  bam_cfg, params = bam_merge([cfg] * 3, [make_branch(seed, s, 0.3) for s in range(3)],
                              shared_kv=shared_kv, moe_layout=(1,))
  model = BamDecoder(config=bam_cfg)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
  valid = np.ones((2, 8), bool)
  valid[0, :2] = False
  valid = jnp.asarray(valid)
  full, _ = _step(model, params, ids, valid, None)

  cache = model.init_cache(2, 12)
  # dense layer 0: one k/v set; mixture layer 1: E sets (expert-KV) or one (shared-KV)
  assert cache.layers[0].k.shape == (2, 12, 2, 8)
  assert cache.layers[1].k.shape == ((2, 12, 2, 8) if shared_kv else (2, 12, 3 * 2, 8))
  assert cache.layers[1].v.shape == cache.layers[1].k.shape
  logits, cache = _step(model, params, ids[:, :5], valid[:, :5], cache)
  steps = [logits]
  for t in range(5, 8):
    logits, cache = _step(model, params, ids[:, t:t + 1], valid[:, t:t + 1], cache)
    steps.append(logits)
  assert cache.layers[1].k.shape == ((2, 12, 2, 8) if shared_kv else (2, 12, 6, 8))
  inc = np.concatenate([np.asarray(s) for s in steps], axis=1)
  v = np.asarray(valid)
  np.testing.assert_allclose(inc[v], np.asarray(full)[v], atol=2e-5, rtol=0)

  if not shared_kv:  # generation builds E k/v sets via BamDecoder.init_cache (shared-KV: CLI)
    out = decoding.generate(model, params, ids, prompt_valid_BP=valid, max_new_tokens=3)
    assert out.tokens_BN.shape == (2, 3)
    np.testing.assert_allclose(out.prefill_logits_BV, np.asarray(full)[:, -1], atol=2e-5)
    np.testing.assert_array_equal(out.tokens_BN[:, 0], np.asarray(full)[:, -1].argmax(-1))


def test_mixture_sows_losses_and_trains():
  cfg = make_config(parallel_block=True, num_layers=1)
  seed = make_params(cfg)
  bam_cfg, params = bam_merge([cfg] * 2, [make_branch(seed, s, 0.3) for s in range(2)],
                              attention_top_k=1)
  model = BamDecoder(config=bam_cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 6)), jnp.int32)

  def loss(p):
    (logits, _), state = model.apply({"params": p}, ids, mutable=["aux_loss", "moe_metrics"])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1))
    aux = sum(jnp.sum(x) for x in jax.tree.leaves(state["aux_loss"]))
    return ce + aux, state

  (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(float(value))
  assert set(state["aux_loss"]["layers_0"]["attn"]) == {"attention_router_z_loss",
                                                        "attention_load_balancing_loss"}
  assert state["moe_metrics"]["layers_0"]["attn"]["attention_expert_weight"][0].shape == (2,)
  g = grads["layers_0"]["attn"]
  assert float(jnp.abs(g["router"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["q"]["kernel"]).sum()) > 0
