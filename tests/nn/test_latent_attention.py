"""Multi-head latent attention: against transformers' DeepseekV3Attention (q latent or not,
interleaved or half RoPE), and cached decoding step by step equal to the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models.decoder import attention_mask
from moe_jax.nn.latent_attention import LatentAttention, LatentCache, mla_attend

H, R, N, P, V, D = 4, 16, 12, 8, 10, 32


def make_module(q_lora_rank, interleave, **kw):
  return LatentAttention(num_heads=H, kv_lora_rank=R, qk_nope_head_dim=N, qk_rope_head_dim=P,
                         v_head_dim=V, out_features=D, q_lora_rank=q_lora_rank,
                         rope_interleave=interleave, **kw)


def causal(b, length):
  valid = jnp.ones((b, length), bool)
  return attention_mask(valid, jnp.arange(length), None)


def naive_mla(x, p, positions, *, q_lora_rank, interleave):
  """Per-head loop reference, written from the paper's equations (numpy, float64)."""
  x = np.asarray(x, np.float64)
  rms = lambda a, w: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-6) * w  # noqa: E731
  if q_lora_rank is None:
    q = np.einsum("bld,dhq->blhq", x, p["q"]["kernel"])
  else:
    qa = rms(x @ p["q_a"]["kernel"], p["q_a_norm"]["scale"])
    q = np.einsum("blr,rhq->blhq", qa, p["q"]["kernel"])
  kv = x @ p["kv_a"]["kernel"]
  lat, kr = rms(kv[..., :R], p["kv_a_norm"]["scale"]), kv[..., R:]
  kvb = np.einsum("bsr,rhx->bshx", lat, p["kv_b"]["kernel"])
  inv = 1.0 / (10000.0 ** (np.arange(0, P, 2) / P))
  ang = positions[..., None] * inv  # [B, L, P/2]

  def rot(a):  # a [..., P], pairs rotated by angle
    if interleave:
      a1, a2 = a[..., 0::2], a[..., 1::2]
    else:
      a1, a2 = a[..., :P // 2], a[..., P // 2:]
    c, s = np.cos(ang), np.sin(ang)
    c, s = (c[:, :, None], s[:, :, None]) if a.ndim == 4 else (c, s)
    return np.concatenate([a1 * c - a2 * s, a2 * c + a1 * s], -1)

  qn, qr = q[..., :N], rot(q[..., N:])
  kr = rot(kr)
  b, l = x.shape[:2]
  out = np.zeros((b, l, H, V))
  for h in range(H):
    logits = (np.einsum("bln,bsn->bls", qn[:, :, h], kvb[:, :, h, :N])
              + np.einsum("blp,bsp->bls", qr[:, :, h], kr)) / np.sqrt(N + P)
    logits = np.where(np.tril(np.ones((l, l), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out[:, :, h] = np.einsum("bls,bsv->blv", w, kvb[:, :, h, N:])
  return np.einsum("blhv,hvd->bld", out, p["o"]["kernel"])


@pytest.mark.parametrize("q_lora_rank,interleave", [(None, True), (24, True), (24, False)])
def test_matches_naive_reference(q_lora_rank, interleave):
  m = make_module(q_lora_rank, interleave)
  b, length = 2, 7
  x = jax.random.normal(jax.random.key(0), (b, length, D))
  pos = jnp.broadcast_to(jnp.arange(length), (b, length))
  params = nn_unbox(m.init(jax.random.key(1), x, mask_BLS=causal(b, length), positions_BL=pos))
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  out, cache = m.apply({"params": params}, x, mask_BLS=causal(b, length), positions_BL=pos)
  assert cache is None and out.shape == (b, length, D)
  ref = naive_mla(x, jax.tree.map(np.asarray, params), np.asarray(pos, np.float64),
                  q_lora_rank=q_lora_rank, interleave=interleave)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def nn_unbox(variables):
  import flax.linen as nn
  return nn.meta.unbox(variables["params"])


def test_cached_decoding_equals_full_pass():
  m = make_module(24, True, use_bias=True)
  b, length, slots = 2, 6, 9
  x = jax.random.normal(jax.random.key(0), (b, length, D))
  pos = jnp.broadcast_to(jnp.arange(length), (b, length))
  params = nn_unbox(m.init(jax.random.key(1), x, mask_BLS=causal(b, length), positions_BL=pos))
  full, _ = m.apply({"params": params}, x, mask_BLS=causal(b, length), positions_BL=pos)
  cache = LatentCache.zeros(b, slots, R, P, jnp.float32)
  valid = jnp.zeros((b, slots), bool)
  outs, index = [], 0
  for chunk in (3, 1, 2):  # a prompt, then single tokens and a pair
    sl = slice(index, index + chunk)
    valid = valid.at[:, sl].set(True)
    mask = attention_mask(valid, index + jnp.arange(chunk), None)
    y, cache = m.apply({"params": params}, x[:, sl], mask_BLS=mask, positions_BL=pos[:, sl],
                       cache=cache, cache_index=jnp.asarray(index))
    outs.append(y)
    index += chunk
  assert cache.latent.shape == (b, slots, R) and cache.k_rope.shape == (b, slots, P)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_params_carry_logical_axes():
  import flax.linen as nn
  m = make_module(24, True)
  x = jnp.zeros((1, 3, D))
  v = m.init(jax.random.key(0), x, mask_BLS=causal(1, 3),
             positions_BL=jnp.arange(3)[None])["params"]
  axes = {"/".join(str(k.key) for k in path): leaf.names for path, leaf in
          jax.tree_util.tree_flatten_with_path(
              v, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))[0]}
  assert axes["q_a/kernel"] == ("embed", "latent")
  assert axes["kv_b/kernel"] == ("latent", "heads", "kv")
  assert axes["o/kernel"] == ("heads", "kv", "embed")
  assert len(axes) == 7


def test_narrow_values_padding_is_exact():
  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 6))
  k = jax.random.normal(jax.random.key(1), (1, 4, 2, 6))
  v = jax.random.normal(jax.random.key(2), (1, 4, 2, 3))
  out = mla_attend(q, k, v, mask=causal(1, 4), scale=0.4)
  logits = jnp.einsum("blhq,bshq->bhls", q, k) * 0.4
  logits = jnp.where(jnp.tril(jnp.ones((4, 4), bool)), logits, -jnp.inf)
  ref = jnp.einsum("bhls,bshv->blhv", jax.nn.softmax(logits, -1), v)
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_yarn_matches_transformers():
  """YaRN's frequencies, rotated-dim factor and DeepSeek's softmax mscale, as transformers."""
  pytest.importorskip("torch")
  from transformers import DeepseekV3Config
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

  from moe_jax.nn.latent_attention import YarnRope
  rope = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
              original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
              mscale=0.707, mscale_all_dim=1.0)
  cfg = DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=rope)
  inv, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
  y = YarnRope(factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
               mscale_all_dim=1.0)
  np.testing.assert_allclose(y.inverse_frequencies(64, 10000.0), inv.numpy(), rtol=1e-6)
  np.testing.assert_allclose(y.rope_factor, factor, rtol=1e-7)
  np.testing.assert_allclose(y.softmax_factor, yarn_apply_mscale(cfg.rope_parameters, 1.0),
                             rtol=1e-7)


def test_absorbed_attention_equals_expanded():
  """The decoding form (kv_b folded into queries and outputs) against explicit keys / values."""
  from moe_jax.nn.latent_attention import expand_latent, mla_attend_absorbed
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, 3, H, N + P))
  latent = jax.random.normal(ks[1], (2, 5, R))
  k_rope = jax.random.normal(ks[2], (2, 5, P))
  kv_b = jax.random.normal(ks[3], (R, H, N + V)) * 0.3
  valid = jnp.asarray([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
  mask = attention_mask(valid, jnp.arange(2, 5), None)
  k, v = expand_latent(jnp.einsum("bsr,rhx->bshx", latent, kv_b), k_rope, N)
  want = mla_attend(q, k, v, mask=mask, scale=0.3)
  got = mla_attend_absorbed(q, latent, k_rope, kv_b, mask_BLS=mask, scale=0.3)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
