"""Multi-head attention with grouped-query heads, RoPE, relative bias and a KV cache.

Legend: B batch, L query length, S key length (cache slots), D model dim,
H query heads, K kv heads (H = K * G), G query heads per kv head, Dh head dim.

Multi-head, grouped-query and multi-query attention are one module: ``K = H``,
``1 < K < H`` and ``K = 1``. Queries are grouped as ``[B, L, K, G, Dh]`` so the
keys and values are never repeated in memory (HF's ``repeat_kv`` materialises
``G`` copies; on an accelerator that is G times the KV bandwidth at decode).

Masks are boolean ``[B, L, S]`` (True = may attend) and built by the model,
which knows about padding and causality; the module stays pure. Masked logits
get the dtype's most negative finite value rather than ``-inf`` so that a
fully-masked row (a padding query) gives a uniform, finite distribution
instead of NaNs that would poison gradients.

Two options of Gemma / Qwen3 attention live here as module fields, never as
model-name branches: logit soft-capping (``cap * tanh(logits / cap)`` on the
scaled logits, before the mask: Gemma 2) and an RMSNorm of every query and key
head over ``Dh`` before RoPE (``qk_norm``: Qwen3, Gemma 3).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# dot_product_attention (the xla path) lives with the kernels; re-exported here.
from moe_jax.nn.attention_kernels import (AttentionMask, attention, check_impl,  # noqa: F401
                                          dot_product_attention)
from moe_jax.nn.embeddings import RopeScaling, apply_rope, rope_inverse_frequencies
from moe_jax.nn.linear import Linear
from moe_jax.nn.norms import RMSNorm

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Keys and values of one attention layer, ``[B, S, K, Dh]`` each."""

  k: Array
  v: Array

  @classmethod
  def zeros(cls, batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
    shape = (batch, slots, kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


class Attention(nn.Module):
  """Self- or cross-attention.

  Attributes:
    num_heads: query heads H.
    num_kv_heads: key/value heads K (H for MHA, 1 for MQA).
    head_dim: Dh.
    out_features: D of the output projection.
    qkv_bias: biases on q, k and v (Qwen2).
    out_bias: bias on the output projection.
    scale: logit scale; ``None`` means ``Dh**-0.5``.
    rope_theta: RoPE base; ``None`` disables RoPE (T5).
    rope_scaling: optional frequency scaling (Llama 3.1 style).
    dtype, param_dtype: compute and storage dtypes.
    kernel_init: initializer of k/v/o kernels (``None``: fan-in scaling).
    q_kernel_init: initializer of the q kernel (defaults to ``kernel_init``).
    o_kernel_init: initializer of the output kernel (defaults to ``kernel_init``;
      zeros make a residual branch start as the identity, e.g. CALM).
    logit_softcap: soft cap of the attention logits (Gemma 2); ``None``: none.
    qk_norm: RMSNorm (``q_norm`` / ``k_norm``, scale ``[Dh]``) on every query
      and key head after projection, before RoPE (Qwen3, Gemma 3).
    qk_norm_eps, qk_norm_offset: that norm's epsilon and scale offset (1 for
      Gemma's ``1 + w``).
    qk_norm_full_width: normalise a token's whole query ``[H·Dh]`` and key
      ``[K·Dh]`` instead of each head (OLMoE); scales ``[H·Dh]`` / ``[K·Dh]``.
    attention_impl: ``"auto"`` | ``"xla"`` | ``"splash"`` | ``"flash"`` |
      ``"cudnn"`` (:mod:`moe_jax.nn.attention_kernels`). Kernels need an
      :class:`AttentionMask` and no KV cache; other calls use ``"xla"``.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  out_bias: bool = False
  scale: float | None = None
  rope_theta: float | None = 10000.0
  rope_scaling: RopeScaling | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = None
  q_kernel_init: Any = None
  o_kernel_init: Any = None
  logit_softcap: float | None = None
  qk_norm: bool = False
  qk_norm_eps: float = 1e-6
  qk_norm_offset: float = 0.0
  qk_norm_full_width: bool = False
  attention_impl: str = "auto"

  def setup(self):
    check_impl(self.attention_impl, f"{type(self).__name__}.attention_impl")
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.q = Linear((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                    use_bias=self.qkv_bias,
                    kernel_init=self.q_kernel_init or self.kernel_init, **common)
    self.k = Linear((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"),
                    use_bias=self.qkv_bias, kernel_init=self.kernel_init, **common)
    self.v = Linear((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"),
                    use_bias=self.qkv_bias, kernel_init=self.kernel_init, **common)
    self.o = Linear(self.out_features, ("heads", "kv", "embed"), in_dims=2,
                    use_bias=self.out_bias, kernel_init=self.o_kernel_init or self.kernel_init,
                    **common)
    if self.qk_norm:
      norm = dict(eps=self.qk_norm_eps, scale_offset=self.qk_norm_offset, **common)
      full = self.qk_norm_full_width  # the flattened [H·Dh] is heads-major: shard by heads
      self.q_norm = RMSNorm(axis_name="heads" if full else "kv", **norm)
      self.k_norm = RMSNorm(axis_name="kv_heads" if full else "kv", **norm)

  def _qk_normed(self, norm: nn.Module, x_BLND: Array) -> Array:
    """``x`` through a q/k norm: per head, or over all heads of a token (full width)."""
    if not self.qk_norm_full_width:
      return norm(x_BLND)
    return norm(x_BLND.reshape(*x_BLND.shape[:-2], -1)).reshape(x_BLND.shape)

  def _inv_freq(self):
    return rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)

  # The projections, one method each. PEFT adapters intercept the ``q/k/v/o``
  # calls (moe_jax.peft.layers); keys are projected *before* RoPE, so a
  # per-feature key scaling folds exactly into the ``k`` kernel.

  def project_q(self, x_BLD: Array) -> Array:
    """Queries ``[B, L, H, Dh]`` before RoPE."""
    return self.q(x_BLD)

  def project_k(self, x_BSD: Array) -> Array:
    """Keys ``[B, S, K, Dh]`` before RoPE."""
    return self.k(x_BSD)

  def project_v(self, x_BSD: Array) -> Array:
    """Values ``[B, S, K, Dh]``."""
    return self.v(x_BSD)

  def project_out(self, out_BLHD: Array) -> Array:
    """Output projection of the attended values, ``[B, L, H, Dh] -> [B, L, D]``."""
    return self.o(out_BLHD)

  def project_kv(self, x_BSD: Array, positions_BS: Array | None = None) -> KVCache:
    """Keys and values of ``x`` (RoPE applied to keys when enabled)."""
    k = self.project_k(x_BSD)
    v = self.project_v(x_BSD)
    if self.qk_norm:
      k = self._qk_normed(self.k_norm, k)
    if self.rope_theta is not None:
      k = apply_rope(k, positions_BS, self._inv_freq())
    return KVCache(k=k, v=v)

  def __call__(self, x_BLD: Array, *, mask_BLS: Array | AttentionMask | None,
               positions_BL: Array | None = None,
               kv_source_BSD: Array | None = None, kv: KVCache | None = None,
               cache: KVCache | None = None, cache_index: Array | None = None,
               bias_BHLS: Array | None = None) -> tuple[Array, KVCache | None]:
    """Attends from ``x`` to keys/values.

    Keys and values come from, in order of precedence: ``kv`` (precomputed, e.g.
    a T5 cross-attention cache), ``kv_source_BSD`` (cross-attention), or ``x``
    itself (self-attention). With ``cache`` the newly projected keys/values
    (of ``x`` or of ``kv_source_BSD``, which must then be slot-aligned with the
    queries) are written at slot ``cache_index`` and attention runs over all
    slots.

    ``mask_BLS`` is a boolean ``[B, L, S]`` or an
    :class:`AttentionMask` (what the fused kernels need; see ``attention_impl``).

    Returns:
      ``(out_BLD, updated cache or None)``.
    """
    q = self.project_q(x_BLD)
    if self.qk_norm:
      q = self._qk_normed(self.q_norm, q)
    if self.rope_theta is not None:
      if positions_BL is None:
        raise ValueError("RoPE attention needs positions_BL")
      q = apply_rope(q, positions_BL, self._inv_freq())
    new_cache = None
    decoding = cache is not None or kv is not None
    if kv is None:
      if kv_source_BSD is not None:  # cross-attention; positions are the source's
        kv = self.project_kv(kv_source_BSD, positions_BL)
      else:
        kv = self.project_kv(x_BLD, positions_BL)
      if cache is not None:
        # Slot-aligned streams (self-attention, or CALM's augmenting states, which
        # advance token by token with the queries): append at ``cache_index``.
        index = jnp.asarray(cache_index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, index, zero, zero)
        new_cache = KVCache(
            k=jax.lax.dynamic_update_slice(cache.k, kv.k.astype(cache.k.dtype), start),
            v=jax.lax.dynamic_update_slice(cache.v, kv.v.astype(cache.v.dtype), start))
        kv = KVCache(k=new_cache.k.astype(q.dtype), v=new_cache.v.astype(q.dtype))
    scale = self.head_dim ** -0.5 if self.scale is None else self.scale
    # KV-cached decoding (a cache, or precomputed keys) keeps its own path.
    impl = "xla" if decoding else self.attention_impl
    out = attention(q, kv.k, kv.v, mask=mask_BLS, bias_BHLS=bias_BHLS, scale=scale,
                    logit_softcap=self.logit_softcap, impl=impl)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return self.project_out(out), new_cache
