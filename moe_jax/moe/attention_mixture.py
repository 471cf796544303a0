"""Mixture of attention experts (BAM, arXiv 2408.08274): a router mixes whole attention layers.

Legend: B batch, L query length, S key length (cache slots), D model dim,
E attention experts, H query heads, K kv heads (H = K * G), G query heads per
kv head, Dh head dim.

``AttentionMixture`` is a drop-in replacement for :class:`moe_jax.nn.attention.Attention`
(same call contract: ``(x_BLD, *, mask_BLS, positions_BL, cache, cache_index)
-> (out_BLD, cache)``). Every token's output is ``Σ_e w_e(x) · attn_e(x)``,
where ``w = softmax(x · W_router)`` over the E experts (BAM's *soft* routing,
its best variant), or the renormalised top-k of it (``num_selected``).

Parameters (``E`` leading on every expert tensor, names as in ``Attention``
so the surgery in :mod:`moe_jax.upcycle.bam` is a stack)::

    router/kernel  [D, E]            ("embed", "unmodeled")          float32
    q/kernel       [E, D, H, Dh]     ("expert", "embed", "heads", "kv")
    k/kernel       [E, D, K, Dh]     ("expert", "embed", "kv_heads", "kv")   expert-KV
                   [D, K, Dh]        ("embed", "kv_heads", "kv")             shared-KV
    v/kernel       like k
    o/kernel       [E, H, Dh, D]     ("expert", "heads", "kv", "embed")
    (biases: ``[E, ...out]`` / ``[...out]`` when enabled)

Two variants (``shared_kv``):

* **expert-KV**: each expert owns q, k, v and o -- E full attention layers.
  The KV cache holds E sets of keys/values per layer, stored with the experts
  folded into the kv-head axis: ``KVCache.k`` is ``[B, S, E*K, Dh]`` (expert
  major). Memory and decode bandwidth grow E-fold.
* **shared-KV**: one k and v (the average of the dense models' in BAM), per-
  expert q and o. The cache is exactly the dense one, ``[B, S, K, Dh]``; the E
  experts' queries become extra query heads of the same kv heads (GQA with
  ``E*G`` queries per kv head), so no key or value is ever repeated.

Both variants are computed as *one* grouped-query attention over ``E*H``
query heads: expert-KV folds E into the kv heads (query head ``e*H + h``
reads kv head ``e*K + h // G``), shared-KV folds E into the query groups
(query head ``(k*E + e)*G + g`` reads kv head ``k``). The combine weight is
applied before the output projection, so the E output projections are one
matmul contracting ``(E, H, Dh)``.

Trade-offs:

* **Top-k does not save attention compute here.** With expert-KV, a token
  routed to expert e at step t needs expert e's keys of *every* earlier
  token, whatever those tokens chose -- so all experts' k/v are computed and
  cached anyway; only the query/output side could be sparse, and on
  accelerators at small E a dense ``E*H``-head attention is faster than a
  gather. ``num_selected`` therefore only zeroes the other experts' weights.
* **Function preservation.** The weights of a token sum to one (softmax, or
  renormalised top-k), so E identical experts give exactly the dense
  attention, whatever the router: a BAM model built from copies of one dense
  model starts as that model.
* The router is float32 (as in ``routing``): softmax over E logits in
  bfloat16 is where mixing weights and the z-loss go wrong.

Sown like :class:`moe_jax.moe.layer.MoeLayer`: ``"aux_loss"`` gets
``attention_router_z_loss`` (and ``attention_load_balancing_loss`` with
top-k), already weighted; ``"moe_metrics"`` gets the unweighted losses, the
mean weight of each expert (``attention_expert_weight [E]``) and the mean
largest weight (``attention_router_confidence``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.moe.layer import RouterKernel
from moe_jax.nn.attention import KVCache, dot_product_attention
from moe_jax.nn.embeddings import RopeScaling, apply_rope, rope_inverse_frequencies
from moe_jax.nn.linear import Linear
from moe_jax.nn.router import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, load_balancing_loss,
                               router_confidence, router_logits, router_z_loss, top_k_weights)

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionMixtureConfig:
  """Router and variant of a mixture of attention experts.

  Attributes:
    num_experts: E.
    num_selected: ``None`` for soft routing (every expert, softmax weights;
      BAM's default), else top-k (weights of the other experts are zero).
    shared_kv: one k/v projection shared by all experts (one KV cache per
      layer) instead of one per expert.
    renormalize: with top-k, divide the kept weights by their sum, so the
      weights of a token still sum to one (function preservation).
    z_loss_coef: router z-loss coefficient (ST-MoE, 1e-3).
    load_balancing_loss_coef: Switch balancing loss coefficient, only used
      with top-k (soft routing uses every expert for every token).
  """

  num_experts: int
  num_selected: int | None = None
  shared_kv: bool = False
  renormalize: bool = True
  z_loss_coef: float = 1e-3
  load_balancing_loss_coef: float = 1e-2

  def __post_init__(self):
    if self.num_experts < 1:
      raise ValueError(f"AttentionMixtureConfig.num_experts must be >= 1, got {self.num_experts}")
    if self.num_selected is not None and not 1 <= self.num_selected <= self.num_experts:
      raise ValueError(f"AttentionMixtureConfig.num_selected={self.num_selected} must be None "
                       f"(soft) or in [1, num_experts={self.num_experts}]")
    for name in ("z_loss_coef", "load_balancing_loss_coef"):
      if getattr(self, name) < 0:
        raise ValueError(f"AttentionMixtureConfig.{name} must be >= 0, got {getattr(self, name)}")

  def replace(self, **kw) -> "AttentionMixtureConfig":
    return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- pure functions


def mixture_weights(logits_BLE: Array, num_selected: int | None = None,
                    renormalize: bool = True) -> tuple[Array, Array, Array | None]:
  """``(weights_BLE, probs_BLE, chosen_BLK or None)``, all float32.

  Soft (``num_selected=None``): the weights are the softmax probabilities.
  Top-k: the k largest probabilities (renormalised to sum to one when asked),
  zero elsewhere; ``chosen_BLK`` are the chosen experts, best first.
  """
  probs_BLE = jax.nn.softmax(logits_BLE.astype(jnp.float32), axis=-1)
  if num_selected is None:
    return probs_BLE, probs_BLE, None
  weights_BLE, chosen_BLK = top_k_weights(probs_BLE, num_selected, renormalize=renormalize)
  return weights_BLE, probs_BLE, chosen_BLK


def fold_expert_queries(q_BLEHD: Array, num_kv_heads: int, shared_kv: bool) -> Array:
  """``[B, L, E, H, Dh] -> [B, L, E*H, Dh]`` ordered for grouped-query attention.

  Expert-KV (kv ``[B, S, E*K, Dh]``): expert-major, head ``e*H + h``.
  Shared-KV (kv ``[B, S, K, Dh]``): kv-head-major, head ``(k*E + e)*G + g``.
  """
  b, l, e, h, dh = q_BLEHD.shape
  if not shared_kv:
    return q_BLEHD.reshape(b, l, e * h, dh)
  g = h // num_kv_heads
  q = q_BLEHD.reshape(b, l, e, num_kv_heads, g, dh).transpose(0, 1, 3, 2, 4, 5)
  return q.reshape(b, l, e * h, dh)


def unfold_expert_outputs(out_BLHD: Array, num_experts: int, num_kv_heads: int,
                          shared_kv: bool) -> Array:
  """Inverse of :func:`fold_expert_queries`: ``[B, L, E*H, Dh] -> [B, L, E, H, Dh]``."""
  b, l, eh, dh = out_BLHD.shape
  e = num_experts
  h = eh // e
  if not shared_kv:
    return out_BLHD.reshape(b, l, e, h, dh)
  g = h // num_kv_heads
  out = out_BLHD.reshape(b, l, num_kv_heads, e, g, dh).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, l, e, h, dh)


def combine_expert_outputs(out_BLEHD: Array, weights_BLE: Array, o_kernel_EHDM: Array,
                           o_bias_EM: Array | None = None) -> Array:
  """``Σ_e w_e · (out_e · O_e + b_e)`` as one matmul over ``(E, H, Dh)``: ``[B, L, D]``."""
  dtype = out_BLEHD.dtype
  w = weights_BLE.astype(dtype)
  y = jnp.einsum("blehk,ehkm->blm", out_BLEHD * w[..., None, None], o_kernel_EHDM.astype(dtype))
  if o_bias_EM is not None:
    y = y + jnp.einsum("ble,em->blm", w, o_bias_EM.astype(dtype))
  return y


# ----------------------------------------------------------------------------- module


class ExpertLinear(nn.Module):
  """Per-expert projection: kernel ``[E, *in, *out]``, contracts the trailing ``in`` axes.

  Attributes:
    num_experts: E.
    features: output shape (``(H, Dh)`` or ``D``).
    axes: logical axes of the kernel *without* the leading ``"expert"``.
    in_dims: trailing input axes contracted.
    input_has_experts: the input carries its own expert axis (``[B, L, E, ...]``,
      the output projection) instead of being shared (``[B, L, ...]``).
  """

  num_experts: int
  features: int | tuple[int, ...]
  axes: tuple[str, ...]
  in_dims: int = 1
  input_has_experts: bool = False
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def kernel(self, in_shape: tuple[int, ...]) -> tuple[Array, Array | None]:
    """``(kernel, bias or None)`` for inputs whose contracted trailing shape is ``in_shape``."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = len(in_shape)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(1, 1 + n_in)),
        out_axis=tuple(range(1 + n_in, 1 + n_in + len(features))), batch_axis=(0,))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("expert",) + self.axes),
                        (self.num_experts,) + in_shape + features, jnp.dtype(self.param_dtype))
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("expert",) + self.axes[n_in:]),
          (self.num_experts,) + features, jnp.dtype(self.param_dtype))
    return kernel, bias

  def __call__(self, x: Array) -> Array:
    """``[B, L, *in] -> [B, L, E, *out]`` (or ``[B, L, E, *in] -> same`` per expert)."""
    start = x.ndim - self.in_dims
    kernel, bias = self.kernel(tuple(x.shape[start:]))
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    n_out = kernel.ndim - 1 - self.in_dims
    ins = "ijk"[:self.in_dims]
    outs = "pqr"[:n_out]
    lead = "ab" + ("e" if self.input_has_experts else "")
    y = jnp.einsum(f"{lead}{ins},e{ins}{outs}->abe{outs}", x, kernel)
    if bias is not None:
      y = y + bias.astype(dtype)
    return y


class AttentionMixture(nn.Module):
  """Soft (or top-k) mixture of E attention experts; see the module docstring.

  Attributes:
    config: experts, routing and KV variant.
    num_heads, num_kv_heads, head_dim, out_features: per-expert attention shape
      (as in ``Attention``).
    qkv_bias, out_bias: biases on q/k/v and on the output projection.
    scale: logit scale; ``None``: ``Dh**-0.5``.
    rope_theta, rope_scaling: rotary embeddings (``None`` theta disables).
    dtype, param_dtype: compute and storage dtypes (router math is float32).
  """

  config: AttentionMixtureConfig
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

  def setup(self):
    c = self.config
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"AttentionMixture: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    e, h, k, dh = c.num_experts, self.num_heads, self.num_kv_heads, self.head_dim
    self.router = RouterKernel(num_experts=e)
    self.q = ExpertLinear(num_experts=e, features=(h, dh), axes=("embed", "heads", "kv"),
                          use_bias=self.qkv_bias, **common)
    if c.shared_kv:
      self.k = Linear((k, dh), ("embed", "kv_heads", "kv"), use_bias=self.qkv_bias, **common)
      self.v = Linear((k, dh), ("embed", "kv_heads", "kv"), use_bias=self.qkv_bias, **common)
    else:
      self.k = ExpertLinear(num_experts=e, features=(k, dh), axes=("embed", "kv_heads", "kv"),
                            use_bias=self.qkv_bias, **common)
      self.v = ExpertLinear(num_experts=e, features=(k, dh), axes=("embed", "kv_heads", "kv"),
                            use_bias=self.qkv_bias, **common)
    self.o = ExpertLinear(num_experts=e, features=self.out_features,
                          axes=("heads", "kv", "embed"), in_dims=2, input_has_experts=True,
                          use_bias=self.out_bias, **common)

  @property
  def cache_kv_heads(self) -> int:
    """kv heads of this layer's ``KVCache``: ``E*K`` (expert-KV) or ``K`` (shared-KV)."""
    c = self.config
    return self.num_kv_heads * (1 if c.shared_kv else c.num_experts)

  def _rope(self, x_BLHD: Array, positions_BL: Array | None) -> Array:
    if self.rope_theta is None:
      return x_BLHD
    if positions_BL is None:
      raise ValueError("RoPE attention needs positions_BL")
    inv = rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    return apply_rope(x_BLHD, positions_BL, inv)

  def project_kv(self, x_BSD: Array, positions_BS: Array | None) -> KVCache:
    """Keys (RoPE'd) and values as the cache stores them: ``[B, S, E*K or K, Dh]``."""
    k, v = self.k(x_BSD), self.v(x_BSD)
    if not self.config.shared_kv:  # [B, S, E, K, Dh] -> expert-major heads
      b, s = x_BSD.shape[:2]
      k = k.reshape(b, s, -1, self.head_dim)
      v = v.reshape(b, s, -1, self.head_dim)
    return KVCache(k=self._rope(k, positions_BS), v=v)

  def __call__(self, x_BLD: Array, *, mask_BLS: Array | None, positions_BL: Array | None = None,
               cache: KVCache | None = None, cache_index: Array | None = None,
               context: Any = None) -> tuple[Array, KVCache | None]:
    """Self-attention mixture; with ``cache`` keys/values are written at ``cache_index``.

    ``context`` is accepted for call compatibility with ``Attention`` and ignored.
    """
    del context
    c = self.config
    e, k = c.num_experts, self.num_kv_heads
    b, l, d = x_BLD.shape

    logits_BLE = router_logits(x_BLD, self.router(d))
    weights_BLE, probs_BLE, chosen_BLK = mixture_weights(logits_BLE, c.num_selected,
                                                         c.renormalize)
    self._sow_stats(logits_BLE, weights_BLE, probs_BLE, chosen_BLK)

    q_BLEHD = self.q(x_BLD)
    q = fold_expert_queries(q_BLEHD, k, c.shared_kv)
    q = self._rope(q, positions_BL)
    kv = self.project_kv(x_BLD, positions_BL)
    new_cache = None
    if cache is not None:
      want = (b, cache.k.shape[1], self.cache_kv_heads, self.head_dim)
      if tuple(cache.k.shape) != want:
        raise ValueError(f"AttentionMixture: cache of shape {tuple(cache.k.shape)}, expected "
                         f"{want} ({'shared' if c.shared_kv else 'expert'}-KV, E={e}, K={k})")
      zero = jnp.zeros((), jnp.int32)
      start = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
      new_cache = KVCache(
          k=jax.lax.dynamic_update_slice(cache.k, kv.k.astype(cache.k.dtype), start),
          v=jax.lax.dynamic_update_slice(cache.v, kv.v.astype(cache.v.dtype), start))
      kv = KVCache(k=new_cache.k.astype(q.dtype), v=new_cache.v.astype(q.dtype))
    scale = self.head_dim ** -0.5 if self.scale is None else self.scale
    out = dot_product_attention(q, kv.k, kv.v, mask_BLS=mask_BLS, scale=scale)
    out_BLEHD = unfold_expert_outputs(out, e, k, c.shared_kv)
    out_BLEHD = nn.with_logical_constraint(out_BLEHD, ("batch", "length", None, "heads", "kv"))
    o_kernel, o_bias = self.o.kernel((self.num_heads, self.head_dim))
    y = combine_expert_outputs(out_BLEHD, weights_BLE, o_kernel, o_bias)
    return y.astype(jnp.dtype(self.dtype)), new_cache

  def _sow_stats(self, logits_BLE: Array, weights_BLE: Array, probs_BLE: Array,
                 chosen_BLK: Array | None) -> None:
    c = self.config
    z = router_z_loss(logits_BLE)
    self.sow(AUX_LOSS_COLLECTION, "attention_router_z_loss", c.z_loss_coef * z)
    metrics = {"attention_router_z_loss": z,
               "attention_expert_weight": weights_BLE.reshape(-1, c.num_experts).mean(axis=0),
               "attention_router_confidence": router_confidence(probs_BLE)}
    if chosen_BLK is not None:
      lb = load_balancing_loss(probs_BLE, chosen_BLK)
      self.sow(AUX_LOSS_COLLECTION, "attention_load_balancing_loss",
               c.load_balancing_loss_coef * lb)
      metrics["attention_load_balancing_loss"] = lb
    for name, value in metrics.items():
      self.sow(METRICS_COLLECTION, name, jax.lax.stop_gradient(value))
