"""Packed rows (seqio segment ids) give the same logits as the sequences run alone."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig, positions_from_segments
from moe_jax.models.t5 import T5Config


def test_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_decoder_packed_equals_separate():
  cfg = DecoderConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=32)
  module = registry.build_module(cfg)
  params = registry.init_params(module, "decoder")
  a, b = [3, 4, 5, 6, 7], [8, 9, 10]
  packed = jnp.array([a + b + [0, 0]])
  seg = jnp.array([[1] * 5 + [2] * 3 + [0, 0]])
  got, _ = module.apply({"params": params}, packed, segment_ids_BL=seg)
  ra, _ = module.apply({"params": params}, jnp.array([a]))
  rb, _ = module.apply({"params": params}, jnp.array([b]))
  np.testing.assert_allclose(got[0, :5], ra[0], atol=1e-5)
  np.testing.assert_allclose(got[0, 5:8], rb[0], atol=1e-5)


def test_t5_packed_equals_separate():
  cfg = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                 num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False)
  module = registry.build_module(cfg)
  params = registry.init_params(module, "t5")
  ea, eb = [3, 4, 5, 6], [7, 8, 9]
  da, db = [0, 11, 12], [0, 13, 14, 15]
  enc = jnp.array([ea + eb + [0]])
  enc_seg = jnp.array([[1] * 4 + [2] * 3 + [0]])
  dec = jnp.array([da + db + [0]])
  dec_seg = jnp.array([[1] * 3 + [2] * 4 + [0]])
  got, _ = module.apply({"params": params}, enc, dec, enc_segment_ids_BL=enc_seg,
                        dec_segment_ids_BL=dec_seg)
  ra, _ = module.apply({"params": params}, jnp.array([ea]), jnp.array([da]))
  rb, _ = module.apply({"params": params}, jnp.array([eb]), jnp.array([db]))
  np.testing.assert_allclose(got[0, :3], ra[0], atol=1e-5)
  np.testing.assert_allclose(got[0, 3:7], rb[0], atol=1e-5)
