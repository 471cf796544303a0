"""RoPE: the CPU path's materialised cos / sin table is the plain trig, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.nn.attention_kernels import building_for
from moe_jax.nn.embeddings import apply_rope, rope_cos_sin, rope_inverse_frequencies


def test_cpu_table_equals_the_fused_trig_and_rotates_like_numpy():
  inv = rope_inverse_frequencies(16, 10000.0, None)
  # Decoding-like positions far past the length, and a packed (restarting) row.
  positions = jnp.asarray([[0, 1, 2, 3, 4], [3000, 3001, 3002, 3003, 3004], [0, 1, 0, 1, 2]])
  with building_for("cpu"):
    cos_cpu, sin_cpu = jax.jit(lambda p: rope_cos_sin(p, inv))(positions)
  with building_for("tpu"):  # the trig as written, fused by XLA where it is read
    cos_ref, sin_ref = jax.jit(lambda p: rope_cos_sin(p, inv))(positions)
  np.testing.assert_array_equal(cos_cpu, cos_ref)
  np.testing.assert_array_equal(sin_cpu, sin_ref)

  x = jax.random.normal(jax.random.key(0), (3, 5, 2, 16))
  with building_for("cpu"):
    got = jax.jit(lambda x, p: apply_rope(x, p, inv))(x, positions)
  angles = np.asarray(positions, np.float64)[..., None] * np.asarray(inv, np.float64)
  cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
  x64 = np.asarray(x, np.float64)
  want = np.concatenate([x64[..., :8] * cos - x64[..., 8:] * sin,
                         x64[..., 8:] * cos + x64[..., :8] * sin], axis=-1)
  # float32 angles at position ~3000 are off by up to ~1e-4 rad (as in transformers)
  np.testing.assert_allclose(got, want, atol=1e-3)
  np.testing.assert_allclose(got[0], want[0], atol=1e-6)
