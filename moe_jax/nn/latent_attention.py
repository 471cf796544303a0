"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a compressed KV cache.

Legend: B batch, L query length, S key length (cache slots), D model dim,
H heads, R kv latent rank (``kv_lora_rank``), Rq query latent rank
(``q_lora_rank``), N no-RoPE query/key head dim (``qk_nope_head_dim``),
P RoPE head dim (``qk_rope_head_dim``), Q = N + P query/key head dim,
V value head dim (``v_head_dim``).

Keys and values are not projected per head from the token but through a
low-rank bottleneck shared by all heads::

    [latent_BSR ; k_rope_BSP] = x · kv_a           (one projection, D -> R + P)
    latent_BSR               = RMSNorm(latent_BSR)  (kv_a_norm)
    [k_nope_BSHN ; v_BSHV]    = latent · kv_b       (R -> H·(N + V))
    k_BSHQ = [k_nope ; RoPE(k_rope) broadcast over heads]

and the queries either directly (``q``: ``[D, H, Q]``) or through their own
bottleneck (``q_a`` -> RMSNorm ``q_a_norm`` -> ``q``: ``[Rq, H, Q]``, when
``q_lora_rank`` is set). RoPE touches only the last P dims of each query and
key head ("decoupled RoPE"); the first N carry no position. The softmax scale
is ``Q ** -0.5`` unless ``scale`` overrides it (YaRN's ``mscale``).

**The cache holds the compressed stream** (:class:`LatentCache`: the normed
latent ``[B, S, R]`` and the rotated shared key ``[B, S, P]``), as DeepSeek
serves it: ``R + P`` numbers per token and layer (576 for V3) instead of
``H·(Q + V)`` (40960). Decoding with it attends in the latent space
(:func:`mla_attend_absorbed`, DeepSeek-V2's "absorbed" form): the key half of
``kv_b`` is folded into the queries (``q_nope · W_k -> [B, L, H, R]``) and
its value half applied after the softmax, so a step costs ``O(S·H·R)``
rather than re-expanding every cached slot through ``kv_b``
(``O(S·R·H·(N + V))``: some 400x the attention itself at V3's sizes).
Training and uncached prefill expand the keys and values once and use the
attention kernels.

**YaRN** (:class:`YarnRope`, DeepSeek-V3's long-context RoPE): blended
inverse frequencies, the rotated dims multiplied by its ``attention_factor``
and, with ``mscale_all_dim``, the softmax scale by
``(0.1 · mscale_all_dim · ln(factor) + 1)^2`` -- the non-rotary dims too, as
DeepSeek's reference (and transformers' ``yarn_apply_mscale``) do.

``rope_interleave`` (DeepSeek's released weights): the RoPE dims of a head
are rotated in adjacent pairs ``(x0, x1), (x2, x3)...``; that equals the
"rotate-half" rotation of the de-interleaved vector ``[x0, x2, ... ; x1, x3,
...]``, which is how it is computed here (and by transformers), so the
rotated dims come out de-interleaved for queries and keys alike.

Parameters (logical axes; ``latent`` is a replicated axis, see
``moe_jax.train.partitioner.MODEL_RULES``)::

    q/kernel          [D, H, Q] or [Rq, H, Q]   ("embed" | "latent", "heads", "kv")
    q_a/kernel        [D, Rq]                   ("embed", "latent")      q_lora_rank only
    q_a_norm/scale    [Rq]                      ("latent",)
    kv_a/kernel       [D, R + P]                ("embed", "latent")
    kv_a_norm/scale   [R]                       ("latent",)
    kv_b/kernel       [R, H, N + V]             ("latent", "heads", "kv")
    o/kernel          [H, V, D]                 ("heads", "kv", "embed")

``q_a``, ``kv_a`` and ``o`` take biases with ``use_bias`` (HF's
``attention_bias``). PEFT adapters reach the ``q`` and ``o`` projections
(sites ``"q"`` / ``"o"``); MLA has no separate ``k`` / ``v`` projection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.nn.attention_kernels import AttentionMask, as_dense_mask, attention, check_impl
from moe_jax.nn.embeddings import RopeScaling, apply_rope, rope_inverse_frequencies
from moe_jax.nn.linear import Linear
from moe_jax.nn.norms import RMSNorm

Array = jax.Array


@flax.struct.dataclass
class LatentCache:
  """The compressed KV cache of one MLA layer.

  Attributes:
    latent: normed KV latents ``[B, S, R]`` (before ``kv_b``).
    k_rope: the shared RoPE key part ``[B, S, P]``, already rotated.
  """

  latent: Array
  k_rope: Array

  @classmethod
  def zeros(cls, batch: int, slots: int, kv_lora_rank: int, rope_dim: int,
            dtype) -> "LatentCache":
    return cls(latent=jnp.zeros((batch, slots, kv_lora_rank), dtype),
               k_rope=jnp.zeros((batch, slots, rope_dim), dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnRope:
  """YaRN rotary scaling (Peng et al. 2023) with DeepSeek's ``mscale`` options.

  Attributes:
    factor: context extension factor (s).
    original_max_position_embeddings: the pre-extension context length.
    beta_fast, beta_slow: rotations bounding the interpolation ramp.
    mscale, mscale_all_dim: DeepSeek's magnitude scales (see :attr:`rope_factor`,
      :attr:`softmax_factor`).
    attention_factor: explicit factor on the rotated dims (``None``: derived).
    truncate: round the ramp bounds to whole dims (transformers' default).
  """

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool = True

  def __post_init__(self):
    if not self.factor > 0 or self.original_max_position_embeddings < 1:
      raise ValueError(f"YarnRope: factor must be > 0 and original_max_position_embeddings "
                       f">= 1, got {self.factor}, {self.original_max_position_embeddings}")

  @staticmethod
  def _mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

  @property
  def rope_factor(self) -> float:
    """The factor on the rotated dims (transformers' ``attention_factor`` on cos / sin)."""
    if self.attention_factor is not None:
      return self.attention_factor
    if self.mscale and self.mscale_all_dim:
      return self._mscale(self.factor, self.mscale) / self._mscale(self.factor, self.mscale_all_dim)
    return self._mscale(self.factor)

  @property
  def softmax_factor(self) -> float:
    """The factor on the softmax scale: ``mscale(factor, mscale_all_dim)^2`` (1 without it)."""
    return self._mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

  def inverse_frequencies(self, dim: int, theta: float) -> np.ndarray:
    """``[dim / 2]`` float32: extrapolated (high) and interpolated (low) frequencies, ramped."""
    def correction_dim(rotations: float) -> float:
      return (dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))
              / (2 * math.log(theta)))

    low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
    if self.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001
    pos = (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv = (1.0 / (self.factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv.astype(np.float32)


# ----------------------------------------------------------------------------- pure math


def rope_decoupled(x_BLHP: Array, positions_BL: Array, inv_freq: np.ndarray, *,
                   interleave: bool) -> Array:
  """RoPE of the position-carrying dims; ``interleave``: pairs ``(x0, x1), (x2, x3)...``.

  The interleaved rotation is the rotate-half one of ``[x[0::2] ; x[1::2]]``
  (the output stays in that de-interleaved order, for queries and keys alike).
  """
  if interleave:
    x_BLHP = jnp.concatenate([x_BLHP[..., 0::2], x_BLHP[..., 1::2]], axis=-1)
  return apply_rope(x_BLHP, positions_BL, inv_freq)


def expand_latent(kv_BSHX: Array, k_rope_BSP: Array, nope_dim: int) -> tuple[Array, Array]:
  """Keys ``[B, S, H, N + P]`` and values ``[B, S, H, V]`` from ``latent · kv_b``.

  ``kv_BSHX`` is the expanded latent ``[k_nope ; v]`` per head; the shared
  RoPE key part is broadcast over the heads and appended to ``k_nope``.
  """
  k_nope, v = kv_BSHX[..., :nope_dim], kv_BSHX[..., nope_dim:]
  k_rope = jnp.broadcast_to(k_rope_BSP[:, :, None, :].astype(k_nope.dtype),
                            k_nope.shape[:3] + k_rope_BSP.shape[-1:])
  return jnp.concatenate([k_nope, k_rope], axis=-1), v


def mla_attend_absorbed(q_BLHQ: Array, latent_BSR: Array, k_rope_BSP: Array, kv_b_RHX: Array,
                        *, mask_BLS: Array | AttentionMask | None, scale: float) -> Array:
  """Attention ``[B, L, H, V]`` over compressed keys and values, never expanded per slot.

  With ``W_k = kv_b[:, :, :N]`` and ``W_v = kv_b[:, :, N:]``: ``k_nope · q_nope
  = latent · (W_k q_nope)`` and ``probs · v = (probs · latent) · W_v``, so the
  logits are ``(q_nope W_k^T) · latent + q_rope · k_rope`` and the output
  ``(probs · latent) · W_v``. Softmax in float32; xla only (for decoding,
  where L is small).
  """
  p = k_rope_BSP.shape[-1]
  n = q_BLHQ.shape[-1] - p
  q_lat_BLHR = jnp.einsum("blhn,rhn->blhr", q_BLHQ[..., :n], kv_b_RHX[..., :n])
  logits = (jnp.einsum("blhr,bsr->bhls", q_lat_BLHR, latent_BSR,
                       preferred_element_type=jnp.float32)
            + jnp.einsum("blhp,bsp->bhls", q_BLHQ[..., n:], k_rope_BSP,
                         preferred_element_type=jnp.float32)) * scale
  mask = as_dense_mask(mask_BLS, q_BLHQ.shape[1])
  if mask is not None:
    logits = jnp.where(jnp.asarray(mask, bool)[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(latent_BSR.dtype)
  ctx_BLHR = jnp.einsum("bhls,bsr->blhr", probs, latent_BSR)
  return jnp.einsum("blhr,rhv->blhv", ctx_BLHR, kv_b_RHX[..., n:])


def mla_attend(q_BLHQ: Array, k_BSHQ: Array, v_BSHV: Array, *,
               mask: Array | AttentionMask | None, scale: float, impl: str = "xla") -> Array:
  """Softmax attention ``[B, L, H, V]`` whose values may be narrower than the keys (V < Q).

  The kernels take one head dim, so narrower values are zero-padded to Q and
  the padding sliced off the output (exact: the padded dims stay zero).
  """
  q_dim, v_dim = q_BLHQ.shape[-1], v_BSHV.shape[-1]
  if v_dim > q_dim:
    raise ValueError(f"mla_attend: value head dim {v_dim} > query/key head dim {q_dim}")
  if v_dim < q_dim:
    v_BSHV = jnp.pad(v_BSHV, [(0, 0)] * 3 + [(0, q_dim - v_dim)])
  out = attention(q_BLHQ, k_BSHQ, v_BSHV, mask=mask, scale=scale, impl=impl)
  return out[..., :v_dim]


# ----------------------------------------------------------------------------- module


class LatentKernel(nn.Module):
  """The ``kv_b`` kernel ``[R, H, N + V]`` (``kv_b/kernel``, as a ``Linear`` stores it),
  handed to the attention whole: uncached it expands the latents, cached it is absorbed."""

  features: tuple[int, int]
  axes: tuple[str, str, str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, rank: int) -> Array:
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=-1)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        (rank,) + tuple(self.features), jnp.dtype(self.param_dtype))
    return kernel.astype(jnp.dtype(self.dtype))


class LatentAttention(nn.Module):
  """Causal self-attention through compressed keys and values (see module docstring).

  Attributes:
    num_heads: H.
    kv_lora_rank: R.
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim: N, P, V.
    out_features: D of the output projection.
    q_lora_rank: Rq; ``None``: queries projected directly from the token.
    use_bias: biases on ``q_a``, ``kv_a`` and ``o`` (HF ``attention_bias``).
    scale: softmax scale; ``None``: ``(N + P) ** -0.5`` (times YaRN's ``softmax_factor``).
    rope_theta, rope_scaling: RoPE of the P dims.
    yarn: YaRN scaling of the RoPE dims and the softmax (instead of ``rope_scaling``).
    rope_interleave: RoPE pairs adjacent dims (DeepSeek's weights) instead of halves.
    norm_eps: epsilon of the two latent RMSNorms.
    dtype, param_dtype: compute and storage dtypes.
    kernel_init: initializer of every projection (``None``: fan-in scaling).
    attention_impl: as :class:`~moe_jax.nn.attention.Attention`'s; decoding with a
      cache uses ``"xla"``.
  """

  num_heads: int
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  out_features: int
  q_lora_rank: int | None = None
  use_bias: bool = False
  scale: float | None = None
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rope_interleave: bool = True
  yarn: YarnRope | None = None
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = None
  attention_impl: str = "auto"

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  def setup(self):
    check_impl(self.attention_impl, f"{type(self).__name__}.attention_impl")
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                axis_name="latent")
    h, q = self.num_heads, self.qk_head_dim
    if self.q_lora_rank is None:
      self.q = Linear((h, q), ("embed", "heads", "kv"), **common)
    else:
      self.q_a = Linear(self.q_lora_rank, ("embed", "latent"), use_bias=self.use_bias, **common)
      self.q_a_norm = RMSNorm(**norm)
      self.q = Linear((h, q), ("latent", "heads", "kv"), **common)
    self.kv_a = Linear(self.kv_lora_rank + self.qk_rope_head_dim, ("embed", "latent"),
                       use_bias=self.use_bias, **common)
    self.kv_a_norm = RMSNorm(**norm)
    self.kv_b = LatentKernel(features=(h, self.qk_nope_head_dim + self.v_head_dim),
                             axes=("latent", "heads", "kv"), dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    self.o = Linear(self.out_features, ("heads", "kv", "embed"), in_dims=2,
                    use_bias=self.use_bias, **common)

  def _inv_freq(self) -> np.ndarray:
    if self.yarn is not None:
      if self.rope_scaling is not None:
        raise ValueError(f"{type(self).__name__}: yarn and rope_scaling are exclusive")
      return self.yarn.inverse_frequencies(self.qk_rope_head_dim, self.rope_theta)
    return rope_inverse_frequencies(self.qk_rope_head_dim, self.rope_theta, self.rope_scaling)

  def _rope(self, x_BLHP: Array, positions_BL: Array) -> Array:
    y = rope_decoupled(x_BLHP, positions_BL, self._inv_freq(), interleave=self.rope_interleave)
    if self.yarn is not None and self.yarn.rope_factor != 1.0:
      y = y * jnp.asarray(self.yarn.rope_factor, y.dtype)
    return y

  def project_q(self, x_BLD: Array, positions_BL: Array) -> Array:
    """Queries ``[B, L, H, N + P]``, RoPE applied to the last P dims."""
    h = x_BLD if self.q_lora_rank is None else self.q_a_norm(self.q_a(x_BLD))
    q = self.q(h)
    n = self.qk_nope_head_dim
    q_rope = self._rope(q[..., n:], positions_BL)
    return jnp.concatenate([q[..., :n], q_rope], axis=-1)

  def compress_kv(self, x_BSD: Array, positions_BS: Array) -> LatentCache:
    """The cached stream of ``x``: normed latents ``[B, S, R]`` and rotated ``k_rope [B, S, P]``."""
    kv = self.kv_a(x_BSD)
    latent, k_rope = kv[..., :self.kv_lora_rank], kv[..., self.kv_lora_rank:]
    k_rope = self._rope(k_rope[:, :, None, :], positions_BS)[:, :, 0, :]
    return LatentCache(latent=self.kv_a_norm(latent), k_rope=k_rope)

  def __call__(self, x_BLD: Array, *, mask_BLS: Array | AttentionMask | None,
               positions_BL: Array | None = None, cache: LatentCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, LatentCache | None]:
    """Self-attention of ``x``; with ``cache``, its latents are written at ``cache_index``
    and the queries attend every slot (``mask_BLS`` says which).

    Returns:
      ``(out_BLD, updated cache or None)``.
    """
    if positions_BL is None:
      raise ValueError("LatentAttention needs positions_BL (RoPE)")
    if cache is not None and cache_index is None:
      raise ValueError("LatentAttention: a cache needs its cache_index")
    q = self.project_q(x_BLD, positions_BL)
    kv = self.compress_kv(x_BLD, positions_BL)
    scale = self.scale
    if scale is None:
      scale = self.qk_head_dim ** -0.5 * (1.0 if self.yarn is None else self.yarn.softmax_factor)
    kv_b_RHX = self.kv_b(self.kv_lora_rank)
    if cache is None:
      out = self._expanded(q, kv, kv_b_RHX, mask_BLS, scale)
      return self.o(out), None
    start = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    new_cache = LatentCache(
        latent=jax.lax.dynamic_update_slice(cache.latent, kv.latent.astype(cache.latent.dtype),
                                            (zero, start, zero)),
        k_rope=jax.lax.dynamic_update_slice(cache.k_rope, kv.k_rope.astype(cache.k_rope.dtype),
                                            (zero, start, zero)))
    out = mla_attend_absorbed(q, new_cache.latent.astype(q.dtype),
                              new_cache.k_rope.astype(q.dtype), kv_b_RHX, mask_BLS=mask_BLS,
                              scale=scale)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return self.o(out), new_cache

  def _expanded(self, q: Array, kv: LatentCache, kv_b_RHX: Array, mask, scale: float) -> Array:
    """Uncached attention: keys and values expanded once, through the attention kernels."""
    kv_BSHX = jnp.einsum("bsr,rhx->bshx", kv.latent, kv_b_RHX)
    k, v = expand_latent(kv_BSHX, kv.k_rope, self.qk_nope_head_dim)
    out = mla_attend(q, k, v, mask=mask, scale=scale, impl=self.attention_impl)
    return nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
