"""Token embeddings (with a tied-head ``attend``) and rotary position embeddings.

Legend: B batch, L length, H heads, Dh head dim, V vocab, D model dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.nn.attention_kernels import target_platform

Array = jax.Array


class Embed(nn.Module):
  """Token embedding table ``[V, D]`` with logical axes ``(vocab, embed)``.

  ``attend`` computes logits against the same table, for tied output heads.
  """

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.dtype(self.param_dtype))

  def __call__(self, tokens: Array) -> Array:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"token ids must be integers, got {tokens.dtype}")
    return jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.dtype))

  def attend(self, x_BLD: Array) -> Array:
    dtype = jnp.dtype(self.dtype)
    return jnp.einsum("bld,vd->blv", x_BLD.astype(dtype), self.embedding.astype(dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Rotary frequency scaling.

  ``kind="linear"`` divides every frequency by ``factor`` (position
  interpolation). ``kind="llama3"`` keeps high frequencies, divides low ones by
  ``factor`` and interpolates smoothly in between, as in Llama 3.1.
  """

  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"unsupported rope scaling kind {self.kind!r}; expected 'linear' or 'llama3'")


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: RopeScaling | None = None) -> np.ndarray:
  """Inverse frequencies ``theta ** (-2i / Dh)`` for ``i < Dh/2``, float64 NumPy."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv = inv.astype(np.float32)
  if scaling is None:
    return inv
  if scaling.kind == "linear":
    return (inv / scaling.factor).astype(np.float32)
  old = scaling.original_max_position_embeddings
  low_wavelen = old / scaling.low_freq_factor
  high_wavelen = old / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = (old / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BL: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """cos and sin ``[B, L, Dh/2]`` (float32) of the rotation angles ``position * frequency``.

  Only the Dh/2 distinct angles (half the trig of a table over the duplicated
  ``[Dh]`` angles). On CPU the table is made the output of a matmul by the
  identity (exact: one product by 1 and zeros per entry) so that it is
  computed once: XLA:CPU otherwise fuses the trig (and the positions' cumsum)
  into every reader, re-evaluating it per element of every head, forward and
  backward, in every layer (~7 ms of the 113 ms LoRA step of
  ``benchmarks/peft.py``); as a matmul output it is one buffer, and the layers'
  identical tables are one computation.
  """
  angles_BLF = positions_BL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos, sin = jnp.cos(angles_BLF), jnp.sin(angles_BLF)
  if target_platform() == "cpu":
    f = angles_BLF.shape[-1]
    both = jnp.matmul(jnp.concatenate([cos, sin], axis=-1), jnp.eye(2 * f, dtype=jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    cos, sin = both[..., :f], both[..., f:]
  return cos, sin


def apply_rope(x_BLHD: Array, positions_BL: Array, inv_freq: np.ndarray) -> Array:
  """Rotates ``x`` by position, "rotate-half" layout (first half / second half).

  The angles are computed in float32 and the rotation is applied in float32,
  then cast back to ``x``'s dtype: position * frequency in bfloat16 is badly
  wrong past a few hundred tokens.
  """
  cos, sin = rope_cos_sin(positions_BL, inv_freq)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x = x_BLHD.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x_BLHD.dtype)
