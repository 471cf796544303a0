"""Normalisation layers.

RMSNorm is used by both backbones (T5 calls it "T5LayerNorm"): no mean
subtraction, no bias. Statistics are always computed in float32, whatever the
compute dtype, because bfloat16 sums of squares lose the small-variance tail;
the result is cast back before the learned scale, as in the reference
implementations, so logits match bit-for-bit in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def rms_normalize(x: Array, eps: float) -> Array:
  """Pure RMS normalisation over the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return x32 * jax.lax.rsqrt(var + eps)


class RMSNorm(nn.Module):
  """``scale * x / rms(x)``; scale initialised to ones, logical axis ``embed``."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
        (x.shape[-1],), jnp.dtype(self.param_dtype))
    dtype = jnp.dtype(self.dtype)
    y = rms_normalize(x, self.eps).astype(dtype)
    return y * scale.astype(dtype)
