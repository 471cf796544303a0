"""Decoder internals: parallel block, grouped-query attention, config validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig, init_cache
from moe_jax.nn.attention import dot_product_attention


def test_grouped_query_attention_equals_repeated_kv():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, 5, 6, 4))
  k = jax.random.normal(k2, (2, 7, 2, 4))
  v = jax.random.normal(k3, (2, 7, 2, 4))
  mask = jnp.tril(jnp.ones((5, 7), bool), 2)[None]
  got = dot_product_attention(q, k, v, mask_BLS=mask, scale=0.5)
  kr, vr = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
  logits = jnp.einsum("blhd,bshd->bhls", q, kr) * 0.5
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  ref = jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(logits, -1), vr)
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_parallel_block_matches_formula():
  cfg = DecoderConfig(vocab_size=30, d_model=16, num_layers=1, num_heads=2, d_ff=24,
                      parallel_block=True)
  module = registry.build_module(cfg)
  params = registry.init_params(module, "decoder")
  assert "post_attn_norm" not in params["layers_0"]
  tokens = jnp.array([[3, 4, 5, 6]])
  logits, _ = module.apply({"params": params}, tokens)
  # Recompute by hand: x + attn(norm(x)) + mlp(norm(x)).
  from moe_jax.models.decoder import DecoderBlock, attention_mask
  x = params["embed"]["embedding"][tokens]
  block = DecoderBlock(config=cfg)
  lp = params["layers_0"]
  h = block.apply({"params": lp}, x, method=lambda m, x: m.input_norm(x))
  a, _ = block.apply({"params": lp}, h, method=lambda m, h: m.attn(
      h, mask_BLS=attention_mask(jnp.ones((1, 4), bool), jnp.arange(4), None),
      positions_BL=jnp.arange(4)[None]))
  f = block.apply({"params": lp}, h, method=lambda m, h: m.mlp(h))
  y = x + a + f
  from moe_jax.nn.norms import rms_normalize
  y = rms_normalize(y, cfg.norm_eps) * params["final_norm"]["scale"]
  ref = y @ params["lm_head"]["kernel"]
  np.testing.assert_allclose(logits, ref, atol=1e-5)


def test_parallel_block_cache_matches_full():
  cfg = DecoderConfig(vocab_size=30, d_model=16, num_layers=2, num_heads=4, num_kv_heads=1,
                      d_ff=24, parallel_block=True, tie_embeddings=True)
  module = registry.build_module(cfg)
  params = registry.init_params(module, "decoder")
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 30)
  full, _ = module.apply({"params": params}, tokens)
  cache = init_cache(cfg, 2, 8)
  outs = []
  for t in range(6):
    logits, cache = module.apply({"params": params}, tokens[:, t:t + 1], cache=cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_bfloat16_compute_runs_and_is_close():
  cfg = DecoderConfig(vocab_size=30, d_model=32, num_layers=2, num_heads=4, d_ff=48)
  module = registry.build_module(cfg)
  params = registry.init_params(module, "decoder")
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 30)
  f32, _ = module.apply({"params": params}, tokens)
  bf = registry.build_module(cfg.replace(dtype="bfloat16"))
  b16, _ = bf.apply({"params": params}, tokens)
  assert b16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(b16, np.float32), f32, atol=0.1)


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=3, num_kv_heads=2), "num_heads=3 is not a multiple of num_kv_heads=2"),
    (dict(d_model=30, num_heads=4), "d_model=30 not divisible by num_heads=4"),
    (dict(d_ff=0), "d_ff must be positive"),
    (dict(embed_init_std=0.0), "embed_init_std must be positive"),
])
def test_config_errors_name_the_field(kw, match):
  base = dict(vocab_size=10, d_model=16, num_layers=1, num_heads=2, d_ff=8)
  with pytest.raises(ValueError, match=match):
    DecoderConfig(**{**base, **kw})


def test_every_parameter_has_logical_axes():
  cfg = DecoderConfig(vocab_size=30, d_model=16, num_layers=1, num_heads=2, d_ff=24,
                      qkv_bias=True)
  module = registry.build_module(cfg)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape)


@pytest.mark.parametrize("std", [1.0, 0.02])
def test_embed_init_std_sets_the_embedding_scale(std):
  cfg = DecoderConfig(vocab_size=512, d_model=64, num_layers=1, num_heads=2, d_ff=32,
                      embed_init_std=std, tie_embeddings=True)
  params = registry.build_module(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  table = np.asarray(nn.meta.unbox(params)["params"]["embed"]["embedding"])
  assert table.std() == pytest.approx(std, rel=0.05)
