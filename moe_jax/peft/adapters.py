"""The adapters of one site: (IA)^3 / MoV scaling vectors and LoRA / MoLoRA low-rank updates.

Legend: B batch, L tokens, E experts, R rank, ``I...`` the input feature
dims of the adapted projection (``D``, or ``H, Dh`` for the attention output),
``K...`` its output feature dims (``H, Dh``, ``D`` or ``F``).

Pure functions do the math (:func:`ia3_scale`, :func:`mov_scale`,
:func:`lora_delta`, :func:`molora_delta`); :class:`ScaleAdapter` and
:class:`LoraAdapter` only create parameters (logical axes on each) and call
them. :data:`ADAPTERS` names the two families (how each is built for a
projection and applied to its input / output); a method's registry entry
(:class:`moe_jax.peft.config.Method`) points at one of them, so a new method
is one entry, plus a family here when its math is new.

**Efficient soft merging.** Merging the experts' *outputs* would cost E
passes. Instead:

* MoV merges the E vectors per token first, ``s_BLK = w_BLE · S_EK``, then
  scales once: ``E · K`` multiply-adds per token, nothing per input dim.
* MoLoRA runs the E experts as one stacked low-rank product: ``A`` is stored
  ``[I..., E, R]`` and ``B`` ``[E, R, K...]`` so that, flattened, they are a
  single rank-``E·R`` LoRA; the router weights scale the ``E·R`` middle
  activations, ``u_BLER * w_BLE[..., None]``, between the two matmuls. Cost:
  one LoRA of rank ``E·R`` plus ``E·R`` multiplies per token.

With E = 1 the router's softmax is exactly 1, so MoV and MoLoRA reduce to
(IA)^3 and LoRA bit for bit (given the same vectors / matrices).

**Initialisation.** Vectors start at one and ``B`` at zero, so an adapted
model starts exactly at its backbone. ``A`` is uniform in
``±1/sqrt(fan_in)`` (PyTorch's and Hugging Face ``peft``'s Kaiming-uniform
with ``a = sqrt(5)``), independently per expert.

**Storage dtype.** Adapters are stored in float32 even on a bfloat16
backbone: an (IA)^3 vector sits at 1.0, where bfloat16's spacing is 2^-7, so
any update smaller than ~0.004 would round away. They are tiny, so this costs
nothing; compute still runs in the backbone's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.peft.config import PeftConfig
from moe_jax.peft.routers import Router

Array = jax.Array

#: Logical axis of the expert dim of adapter parameters: replicated
#: (the adapters are tiny; sharding them would only add communication).
ADAPTER_AXIS = "unmodeled"
#: Logical axis of the LoRA rank dim R, also replicated; distinct from
#: ``ADAPTER_AXIS`` because an array may not repeat a logical axis (MoLoRA's
#: ``A [I..., E, R]`` has both).
ADAPTER_RANK_AXIS = "adapter_rank"


# ----------------------------------------------------------------------------- pure math


def ia3_scale(y: Array, scale_K: Array) -> Array:
  """``y * s`` over the trailing feature dims."""
  return y * scale_K.astype(y.dtype)


def mov_scale(y: Array, weights_BLE: Array, scale_EK: Array, *, weights_sum_to_one: bool = True
              ) -> Array:
  """``y * Σ_e w_e s_e``: the E vectors are merged per token before scaling once.

  When the weights sum to one (soft merging, renormalised top-k) the merged
  vector is computed as ``1 + Σ_e w_e (s_e - 1)``: the same function, but the
  adaptation (a small deviation from 1) is summed directly instead of being
  rounded against 1, and vectors of ones give exactly 1 whatever the
  router's rounding, so an untrained MoV *is* its backbone, bit for bit.
  With one expert the weight is exactly 1 and ``w s`` is used as is.
  """
  e = scale_EK.shape[0]
  s_EK = scale_EK.reshape(e, -1).astype(jnp.float32)
  w_NE = weights_BLE.reshape(-1, e).astype(jnp.float32)
  offset = weights_sum_to_one and e > 1
  y_NXK = y.reshape(w_NE.shape[0], -1, s_EK.shape[1])  # X: dims between tokens and features
  out = merge_and_scale(y_NXK, w_NE, s_EK - 1.0 if offset else s_EK, 1.0 if offset else 0.0)
  return out.reshape(y.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def merge_and_scale(y_NXK: Array, w_NE: Array, d_EK: Array, base: float) -> Array:
  """``y ⊙ (base + w · d)``, the merged vector broadcast over ``X``; MoV's whole site.

  The backward is written out: autodiff's ``dD = wᵀ · (g ⊙ y)`` contracts the
  token axis of two row-major operands, which XLA:CPU runs as a slow matmul
  after a transposed copy of the large factor, and it keeps the merged
  ``[N, K]`` vector alive; here the small ``w`` is transposed and the merged
  vector is recomputed (``N·E·K`` multiply-adds). 2 cores, d 256, 1024
  tokens, E 10, the MoV-10 train step of ``benchmarks/peft.py`` timed side by
  side with the autodiff version in one process: 169.5 -> 149.1 ms (median).
  """
  return _merge_and_scale_fwd(y_NXK, w_NE, d_EK, base)[0]


def _merged(w_NE: Array, d_EK: Array, base: float) -> Array:
  return (base + jnp.dot(w_NE, d_EK))[:, None, :]


def _merge_and_scale_fwd(y_NXK, w_NE, d_EK, base):
  return y_NXK * _merged(w_NE, d_EK, base).astype(y_NXK.dtype), (y_NXK, w_NE, d_EK)


def _merge_and_scale_bwd(base, res, g_NXK):
  y_NXK, w_NE, d_EK = res
  dy = g_NXK * _merged(w_NE, d_EK, base).astype(y_NXK.dtype)
  dm_NK = jnp.sum((g_NXK * y_NXK).astype(jnp.float32), axis=1)
  return dy, jnp.dot(dm_NK, d_EK.T), jnp.dot(w_NE.T, dm_NK)


merge_and_scale.defvjp(_merge_and_scale_fwd, _merge_and_scale_bwd)


def _lead_aligned(t: Array, y: Array, n_feat: int) -> Array:
  """``t [lead..., K...]`` reshaped to broadcast against ``y [lead..., extra..., K...]``.

  ``extra`` dims sit between the tokens and the features when the adapted
  projection has its own expert axis (a BAM attention expert's ``[B, L, E, H, Dh]``
  queries): one adapter serves every expert.
  """
  extra = y.ndim - t.ndim
  if extra:
    t = t.reshape(t.shape[:t.ndim - n_feat] + (1,) * extra + t.shape[t.ndim - n_feat:])
  return t.astype(y.dtype)


@jax.custom_vjp
def low_rank_product(x_NI: Array, a_IQ: Array, b_QK: Array, gate_NE: Array) -> Array:
  """``((x A) ⊙ gate) B``: the gate ``[N or 1, E]`` scales each of E blocks of ``Q = E·R``.

  LoRA is ``E = 1`` with the gate its scaling; MoLoRA's gate is the router
  weights times the scaling. The backward is written out: autodiff of the
  two dots contracts ``x`` over its rows for ``dA``, which XLA:CPU compiles
  to a slow fallback matmul plus a full transposed copy of ``x``; here the
  small ``[N, Q]`` factor is transposed instead (``dA = (dU^T x)^T``), and
  the gate's gradient is one row-wise sum.
  """
  return _low_rank_fwd(x_NI, a_IQ, b_QK, gate_NE)[0]


def _gated(u_NQ: Array, gate_NE: Array) -> Array:
  n, q = u_NQ.shape
  e = gate_NE.shape[1]
  return (u_NQ.reshape(n, e, q // e) * gate_NE[:, :, None]).reshape(n, q)


def _low_rank_fwd(x_NI, a_IQ, b_QK, gate_NE):
  u_NQ = jnp.dot(x_NI, a_IQ)
  return jnp.dot(_gated(u_NQ, gate_NE), b_QK), (x_NI, a_IQ, b_QK, gate_NE, u_NQ)


def _low_rank_bwd(res, g_NK):
  x_NI, a_IQ, b_QK, gate_NE, u_NQ = res
  n, q = u_NQ.shape
  e = gate_NE.shape[1]
  db_QK = jnp.dot(_gated(u_NQ, gate_NE).T, g_NK)
  dug_NQ = jnp.dot(g_NK, b_QK.T)
  dgate_NE = jnp.sum((dug_NQ * u_NQ).reshape(n, e, q // e), axis=-1)
  if gate_NE.shape[0] == 1:
    dgate_NE = jnp.sum(dgate_NE, axis=0, keepdims=True)
  du_NQ = _gated(dug_NQ, gate_NE)
  da_IQ = jnp.dot(du_NQ.T, x_NI).T
  dx_NI = jnp.dot(du_NQ, a_IQ.T)
  return dx_NI, da_IQ.astype(a_IQ.dtype), db_QK.astype(b_QK.dtype), dgate_NE.astype(gate_NE.dtype)


low_rank_product.defvjp(_low_rank_fwd, _low_rank_bwd)


def _flat_in(x: Array, in_dims: int) -> Array:
  return x.reshape((-1, int(math.prod(x.shape[x.ndim - in_dims:]))))


def lora_delta(x: Array, a: Array, b: Array, *, scaling: float, dtype: Any = None) -> Array:
  """``scaling · (x A) B`` with ``A [I..., R]``, ``B [R, K...]``; returns ``[..., K...]``."""
  dtype = dtype or x.dtype
  in_dims = a.ndim - 1
  r = a.shape[-1]
  gate = jnp.full((1, 1), scaling, dtype)
  y = low_rank_product(_flat_in(x.astype(dtype), in_dims), a.reshape(-1, r).astype(dtype),
                       b.reshape(r, -1).astype(dtype), gate)
  return y.reshape(x.shape[:x.ndim - in_dims] + b.shape[1:])


def molora_delta(x: Array, weights_BLE: Array, a: Array, b: Array, *, scaling: float,
                 dtype: Any = None) -> Array:
  """``Σ_e w_e · scaling · (x A_e) B_e`` as one stacked rank-``E·R`` product.

  Args:
    x: ``[B, L, I...]``.
    weights_BLE: router merge weights.
    a: ``[I..., E, R]``.
    b: ``[E, R, K...]``.
  """
  dtype = dtype or x.dtype
  e, r = a.shape[-2:]
  in_dims = a.ndim - 2
  lead = x.shape[:x.ndim - in_dims]
  gate = (weights_BLE.astype(jnp.float32) * scaling).astype(dtype).reshape(-1, e)
  y = low_rank_product(_flat_in(x.astype(dtype), in_dims), a.reshape(-1, e * r).astype(dtype),
                       b.reshape(e * r, -1).astype(dtype), gate)
  return y.reshape(lead + b.shape[2:])


def lora_update(a: Array, b: Array, scaling: float) -> Array:
  """The dense update ``scaling · A B`` ``[I..., K...]`` (float32) that LoRA adds to a kernel."""
  r = a.shape[-1]
  ab = jnp.dot(a.reshape(-1, r).astype(jnp.float32), b.reshape(r, -1).astype(jnp.float32),
               precision=jax.lax.Precision.HIGHEST)
  return (ab * scaling).reshape(a.shape[:-1] + b.shape[1:])


def expert_lora_update(a_EIR: Array, b_ERK: Array, scaling: float) -> Array:
  """Per-expert ``scaling · A_e B_e``: ``[E, I, R] x [E, R, K] -> [E, I, K]`` (float32)."""
  ab = jnp.einsum("eir,erk->eik", a_EIR.astype(jnp.float32), b_ERK.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return ab * scaling


def expert_lora_kernel(kernel_EIK: Array, a_EIR: Array, b_ERK: Array, *, scaling: float
                       ) -> Array:
  """The stacked expert kernel with each expert's LoRA added (float32, see :class:`ExpertLora`)."""
  return kernel_EIK.astype(jnp.float32) + expert_lora_update(a_EIR, b_ERK, scaling)


def expert_scale_kernel(wo_EFD: Array, scale_EF: Array) -> Array:
  """``wo`` with row ``f`` of expert ``e`` times ``s[e, f]``: each expert's hidden scaled."""
  return wo_EFD.astype(jnp.float32) * scale_EF.astype(jnp.float32)[..., None]


# ----------------------------------------------------------------------------- modules


def _router(peft: PeftConfig) -> Router:
  return Router(num_experts=peft.num_experts, top_k=peft.top_k, renormalize=peft.renormalize,
                load_balance_coef=peft.load_balance_coef, z_loss_coef=peft.z_loss_coef,
                name="router")


class ScaleAdapter(nn.Module):
  """(IA)^3 (one vector ``scale [K...]``) or MoV (``scale [E, K...]`` plus ``router``).

  Attributes:
    peft: the method, E and router settings.
    axes: logical axes of the scaled feature dims ``K...``.
    param_dtype: storage dtype of the vectors (keep float32, see the module docstring).
  """

  peft: PeftConfig
  axes: Sequence[str]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: Array, *, route_x: Array | None = None,
               valid: Array | None = None) -> Array:
    feat = tuple(y.shape[y.ndim - len(self.axes):])
    if not self.peft.is_mixture:
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                               tuple(self.axes)),
                         feat, jnp.dtype(self.param_dtype))
      return ia3_scale(y, scale)
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones, (ADAPTER_AXIS,) + tuple(self.axes)),
        (self.peft.num_experts,) + feat, jnp.dtype(self.param_dtype))
    if route_x is None:
      raise ValueError(f"{self.name}: a MoV site needs its router input (route_x)")
    weights = _router(self.peft)(route_x, valid)
    p = self.peft
    sums_to_one = p.top_k is None or p.renormalize or p.top_k >= p.num_experts
    return mov_scale(y, weights, scale, weights_sum_to_one=sums_to_one)


class LoraAdapter(nn.Module):
  """LoRA (``lora_a [I..., R]``, ``lora_b [R, K...]``) or MoLoRA (with an E axis and ``router``).

  Returns the update to add to the projection's output.

  Attributes:
    peft: method, rank, alpha, E and router settings.
    in_axes: logical axes of the contracted input dims ``I...``.
    out_features, out_axes: the projection's output dims ``K...`` and their axes.
    dtype: compute dtype (the backbone's).
    param_dtype: storage dtype (keep float32, see the module docstring).
  """

  peft: PeftConfig
  in_axes: Sequence[str]
  out_features: Sequence[int]
  out_axes: Sequence[str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, route_x: Array | None = None,
               valid: Array | None = None) -> Array:
    p = self.peft
    in_dims = len(self.in_axes)
    in_shape = tuple(x.shape[x.ndim - in_dims:])
    out = tuple(self.out_features)
    expert = (p.num_experts,) if p.is_mixture else ()
    expert_axes = (ADAPTER_AXIS,) if p.is_mixture else ()
    n_lead = len(expert)
    a_init = nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(in_dims)),
        out_axis=tuple(range(in_dims, in_dims + n_lead + 1)))
    a = self.param("lora_a", nn.with_logical_partitioning(
        a_init, tuple(self.in_axes) + expert_axes + (ADAPTER_RANK_AXIS,)),
        in_shape + expert + (p.rank,), jnp.dtype(self.param_dtype))
    b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, expert_axes + (ADAPTER_RANK_AXIS,) + tuple(self.out_axes)),
        expert + (p.rank,) + out, jnp.dtype(self.param_dtype))
    dtype = jnp.dtype(self.dtype)
    if not p.is_mixture:
      return lora_delta(x, a, b, scaling=p.scaling, dtype=dtype)
    if route_x is None:
      raise ValueError(f"{self.name}: a MoLoRA site needs its router input (route_x)")
    weights = _router(p)(route_x, valid)
    return molora_delta(x, weights, a, b, scaling=p.scaling, dtype=dtype)



class ExpertLora(nn.Module):
  """One LoRA per routed expert on a stacked kernel ``[E, I, K]``; returns the adapted kernel.

  ``lora_a [E, I, R]`` and ``lora_b [E, R, K]`` carry the kernel's logical
  axes (``expert`` first), so expert parallelism shards them with the
  kernel. Adapting the kernel, not the activations, keeps every dispatch
  path as it is; the price is one ``E·I·K`` float32 update per step (the
  size of the kernel, ``R/K`` of its matmul FLOPs per token group), which
  is also why the result is float32: a small update added in bfloat16 would
  round away against the weights (the dispatch casts to its compute dtype).

  Attributes:
    peft: rank and alpha.
    axes: the kernel's logical axes ``(expert, in, out)``.
    param_dtype: storage dtype (keep float32, see the module docstring).
  """

  peft: PeftConfig
  axes: Sequence[str]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, kernel_EIK: Array) -> Array:
    e, i, k = kernel_EIK.shape
    r = self.peft.rank
    expert, a_in, a_out = self.axes
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=1,
                                              out_axis=2, batch_axis=(0,))
    a = self.param("lora_a", nn.with_logical_partitioning(
        a_init, (expert, a_in, ADAPTER_RANK_AXIS)), (e, i, r), jnp.dtype(self.param_dtype))
    b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, (expert, ADAPTER_RANK_AXIS, a_out)), (e, r, k),
        jnp.dtype(self.param_dtype))
    return expert_lora_kernel(kernel_EIK, a, b, scaling=self.peft.scaling)


class ExpertScale(nn.Module):
  """One (IA)^3 vector per routed expert, ``scale [E, F]``, folded into ``wo [E, F, D]``.

  Scaling row ``f`` of expert ``e``'s ``wo`` is scaling its hidden ``h[..., f]``
  before ``wo``: (IA)^3's FFN site, per expert, on every dispatch path.
  Returns float32 (see :class:`ExpertLora`).
  """

  axes: Sequence[str]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, wo_EFD: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             tuple(self.axes[:2])),
                       wo_EFD.shape[:2], jnp.dtype(self.param_dtype))
    return expert_scale_kernel(wo_EFD, scale)


# ----------------------------------------------------------------------------- adapter families


@dataclasses.dataclass(frozen=True, kw_only=True)
class Projection:
  """What an adapter needs to know of the projection it adapts.

  Attributes:
    in_axes: logical axes of the contracted input dims ``I...``.
    out_features, out_axes: the output dims ``K...`` and their logical axes.
    dtype: the projection's compute dtype.
  """

  in_axes: tuple[str, ...]
  out_features: tuple[int, ...]
  out_axes: tuple[str, ...]
  dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterFamily:
  """How one kind of adapter is built and applied (a value of :data:`ADAPTERS`).

  Attributes:
    build: ``(peft, projection, parent) -> module``: the adapter, created
      under ``parent`` (the scope it lives in, ``.../attn/peft_q``).
    apply: ``(adapter, x, y, route_x, valid) -> y'``: the projection's output
      ``y`` (from input ``x``) adapted; ``route_x`` and ``valid`` are the
      router's input and the real-token mask (mixtures only).
    expert: ``(peft, kernel_axes, parent) -> module``: the per-expert adapter
      of a stacked expert kernel (``module(kernel) -> adapted kernel``); see
      :class:`ExpertLora`, :class:`ExpertScale`.
  """

  build: Callable[[PeftConfig, Projection, Any], nn.Module]
  apply: Callable[..., Array]
  expert: Callable[[PeftConfig, tuple[str, ...], Any], nn.Module] | None = None


def _apply_scale(adapter: nn.Module, x: Array, y: Array, route_x: Array | None,
                 valid: Array | None) -> Array:
  del x
  return adapter(y, route_x=route_x, valid=valid)


def _apply_lora(adapter: nn.Module, x: Array, y: Array, route_x: Array | None,
                valid: Array | None) -> Array:
  delta = adapter(x, route_x=route_x, valid=valid)
  return y + _lead_aligned(delta, y, len(adapter.out_features))


#: Adapter families by name (``Method.adapter``): the math of every PEFT method.
ADAPTERS: dict[str, AdapterFamily] = {
    "scale": AdapterFamily(
        build=lambda peft, proj, parent: ScaleAdapter(peft=peft, axes=proj.out_axes,
                                                      parent=parent),
        apply=_apply_scale,
        expert=lambda peft, axes, parent: ExpertScale(axes=axes, parent=parent)),
    "lora": AdapterFamily(
        build=lambda peft, proj, parent: LoraAdapter(
            peft=peft, in_axes=proj.in_axes, out_features=proj.out_features,
            out_axes=proj.out_axes, dtype=proj.dtype, parent=parent),
        apply=_apply_lora,
        expert=lambda peft, axes, parent: ExpertLora(peft=peft, axes=axes, parent=parent)),
}
