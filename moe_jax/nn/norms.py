"""Normalisation layers.

RMSNorm is used by both backbones (T5 calls it "T5LayerNorm"): no mean
subtraction, no bias. Statistics are always computed in float32, whatever the
compute dtype, because bfloat16 sums of squares lose the small-variance tail;
the result is cast back before the learned scale, as in the reference
implementations, so logits match bit-for-bit in float32.

Gemma stores the scale as an offset from one and multiplies by ``1 + w``
(``scale_offset=1``); it applies that factor in float32 *before* casting
(``(x * (1 + w)).to(dtype)`` rather than Llama's ``w * x.to(dtype)``), so the
offset variant follows that order, and starts from ``w = 0``.
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
  """``(scale_offset + scale) * x / rms(x)``; logical axis ``axis_name``.

  The factor ``scale_offset + scale`` starts at one: ``scale`` is initialised
  to ``1 - scale_offset`` (ones for Llama / T5, zeros for Gemma's ``1 + w``).
  """

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "embed"
  scale_offset: float = 0.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = (nn.initializers.ones if self.scale_offset == 0.0
            else nn.initializers.constant(1.0 - self.scale_offset))
    scale = self.param(
        "scale", nn.with_logical_partitioning(init, (self.axis_name,)),
        (x.shape[-1],), jnp.dtype(self.param_dtype))
    dtype = jnp.dtype(self.dtype)
    if self.scale_offset != 0.0:  # Gemma: scale in float32, then cast
      factor = self.scale_offset + scale.astype(jnp.float32)
      return (rms_normalize(x, self.eps) * factor).astype(dtype)
    y = rms_normalize(x, self.eps).astype(dtype)
    return y * scale.astype(dtype)
