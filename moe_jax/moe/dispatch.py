"""Dispatch and combine: moving tokens to experts and back, three ways, one interface.

Legend: G groups, S tokens per group, D model dim, E experts, K choices per
token, C capacity, A assignments (G·S·K).

``moe_apply(x_GSD, routing, expert_params, method=...)`` returns
``y_GSD = Σ_choices weight · expert(x)`` for any of:

* ``"sorted"`` (default; the fast path on CPU and the expert-parallel path):
  *gather* each slot's token into ``[G, E, C, D]`` buffers using the router's
  slot -> token map (``token_GEC``, from a sort), run one batched einsum per
  kernel, *gather* each (token, choice)'s result back from (expert, slot) and
  weight-sum over K. Memory and data movement are O(G·E·C·D + A·D); no
  ``[S, E, C]`` tensor exists. The backward pass turns the gathers into
  scatter-adds of the same sizes.
* ``"ragged"`` (dropless; the GPU/TPU path): sort all A assignments by
  expert, a grouped matmul (megablox ``gmm`` on TPU, ``ragged_dot`` on GPU;
  ``experts.RAGGED_KERNELS``) over the sorted rows with per-expert group sizes,
  un-sort by the inverse permutation and weight-sum. Ignores capacity: no
  token is ever dropped and no slot is padded. On CPU ``ragged_dot`` is a
  dense masked matmul (E times the FLOPs), so it is the slow path here.
* ``"onehot"`` (GShard baseline, kept for comparison and as an oracle):
  build ``dispatch_GSEC`` / ``combine_GSEC`` one-hot tensors and contract them
  with einsums. O(G·S·E·C·D) FLOPs -- quadratic in group size, which is why
  the sorted path exists.

With tokens-choose routing the three agree exactly when nothing is dropped;
``"sorted"`` and ``"onehot"`` also agree when something is (same slots).
Experts-choose routing supports ``"sorted"`` and ``"onehot"`` (its buffers
are full by construction, so ``"ragged"`` would be the same padded einsum).

The buffer-level functions (``dispatch`` / ``combine``) are what the
expert-parallel ``shard_map`` body calls around its ``all_to_all``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moe_jax.moe.experts import Params, expert_ffn, expert_ffn_ragged
from moe_jax.moe.routing import ExpertsChooseRouting, Routing, TokensChooseRouting

Array = jax.Array

DISPATCH_METHODS = ("sorted", "ragged", "onehot")


def check_method(method: str, routing: Routing | None = None) -> None:
  if method not in DISPATCH_METHODS:
    raise ValueError(f"unknown dispatch method {method!r}; known: {DISPATCH_METHODS}")
  if method == "ragged" and isinstance(routing, ExpertsChooseRouting):
    raise ValueError("dispatch 'ragged' needs tokens-choose routing; experts-choose buffers "
                     "are full by construction: use 'sorted'")


# ---------------------------------------------------------------- sorted (gather) path


def dispatch_sorted(x_GSD: Array, token_GEC: Array) -> Array:
  """``[G, E, C, D]`` buffers; slot (e, c) gets token ``token_GEC`` (``S``: zeros)."""
  g, s, d = x_GSD.shape
  _, e, c = token_GEC.shape
  x_pad = jnp.concatenate([x_GSD, jnp.zeros((g, 1, d), x_GSD.dtype)], axis=1)
  out = jnp.take_along_axis(x_pad, token_GEC.reshape(g, e * c, 1), axis=1,
                            mode="promise_in_bounds")
  return out.reshape(g, e, c, d)


def combine_sorted(y_GECD: Array, routing: Routing, num_tokens: int) -> Array:
  """``[G, S, D]``: each token's weighted sum of its experts' outputs."""
  g, e, c, d = y_GECD.shape
  if isinstance(routing, TokensChooseRouting):
    k = routing.expert_GSK.shape[-1]
    # Dropped choices read slot 0 of their expert with weight 0.
    slot_GSK = routing.expert_GSK * c + jnp.where(routing.kept_GSK, routing.position_GSK, 0)
    got = jnp.take_along_axis(y_GECD.reshape(g, e * c, d),
                              slot_GSK.reshape(g, num_tokens * k, 1), axis=1,
                              mode="promise_in_bounds")
    got_GSKD = got.reshape(g, num_tokens, k, d)
    return jnp.einsum("GSK,GSKD->GSD", routing.weight_GSK.astype(y_GECD.dtype), got_GSKD)
  # Experts choose: a token may sit in several slots; scatter-add.
  w_GECD = routing.weight_GEC.astype(y_GECD.dtype)[..., None] * y_GECD
  return jax.vmap(lambda t, y: jnp.zeros((num_tokens, d), y.dtype).at[t].add(y))(
      routing.token_GEC.reshape(g, e * c), w_GECD.reshape(g, e * c, d))


# ---------------------------------------------------------------- GShard one-hot path


def onehot_masks(routing: Routing, num_tokens: int, dtype: Any = jnp.float32
                 ) -> tuple[Array, Array]:
  """GShard ``dispatch_GSEC`` (0/1) and ``combine_GSEC`` (weights) tensors."""
  c = routing.capacity
  e = routing.num_experts
  if isinstance(routing, TokensChooseRouting):
    k = routing.expert_GSK.shape[-1]
    dispatch = jnp.zeros(routing.expert_GSK.shape[:2] + (e, c), dtype)
    combine = jnp.zeros(routing.expert_GSK.shape[:2] + (e, c), jnp.float32)
    for i in range(k):  # K is small and static: never materialise [G, S, K, E, C]
      # one_hot of position == C (dropped) is all zeros.
      m = (jax.nn.one_hot(routing.expert_GSK[..., i], e, dtype=dtype)[..., None]
           * jax.nn.one_hot(routing.position_GSK[..., i], c, dtype=dtype)[..., None, :])
      dispatch = dispatch + m
      combine = combine + m.astype(jnp.float32) * routing.weight_GSK[..., i, None, None]
    return dispatch, combine.astype(dtype)
  m_GECS = jax.nn.one_hot(routing.token_GEC, num_tokens, dtype=dtype)
  dispatch = m_GECS.transpose(0, 3, 1, 2)
  combine = (m_GECS * routing.weight_GEC[..., None].astype(dtype)).transpose(0, 3, 1, 2)
  return dispatch, combine


def dispatch_onehot(x_GSD: Array, dispatch_GSEC: Array) -> Array:
  return jnp.einsum("GSEC,GSD->GECD", dispatch_GSEC.astype(x_GSD.dtype), x_GSD)


def combine_onehot(y_GECD: Array, combine_GSEC: Array) -> Array:
  return jnp.einsum("GSEC,GECD->GSD", combine_GSEC.astype(y_GECD.dtype), y_GECD)


# ---------------------------------------------------------------- buffer interface


def dispatch(x_GSD: Array, routing: Routing, method: str = "sorted") -> Array:
  """Token buffers ``[G, E, C, D]`` for ``"sorted"`` or ``"onehot"``."""
  if method == "onehot":
    d, _ = onehot_masks(routing, x_GSD.shape[1], x_GSD.dtype)
    return dispatch_onehot(x_GSD, d)
  return dispatch_sorted(x_GSD, routing.token_GEC)


def combine(y_GECD: Array, routing: Routing, num_tokens: int, method: str = "sorted") -> Array:
  """Inverse of ``dispatch``, weighted: ``[G, E, C, D] -> [G, S, D]``."""
  if method == "onehot":
    _, cmb = onehot_masks(routing, num_tokens, y_GECD.dtype)
    return combine_onehot(y_GECD, cmb)
  return combine_sorted(y_GECD, routing, num_tokens)


# ---------------------------------------------------------------- ragged (dropless) path


def ragged_permutation(expert_GSK: Array) -> tuple[Array, Array, Array]:
  """Sort all A = G·S·K assignments by expert.

  Returns ``(order_A, inverse_A, group_sizes_E)``: assignment ``order_A[i]``
  (flat index into ``[G, S, K]``) is the i-th sorted row; ``inverse_A`` undoes it.
  """
  e_A = expert_GSK.reshape(-1).astype(jnp.int32)
  order_A = jnp.argsort(e_A, stable=True)
  inverse_A = jnp.zeros_like(order_A).at[order_A].set(
      jnp.arange(order_A.shape[0], dtype=order_A.dtype), unique_indices=True)
  return order_A, inverse_A, e_A


def moe_ragged(x_GSD: Array, routing: TokensChooseRouting, params: Params, *,
               activation: str, gated: bool, dtype: Any, kernel: str = "ragged_dot",
               interpret: bool = False) -> Array:
  """Tokens-choose MoE with ``ragged_dot``: every choice is computed, none padded.

  Dropless when the routing was made dropless (``capacity_factor=None``, which
  the MoE layer does for this method). Choices the router did drop keep their
  zero weight, so with the same routing this equals ``"sorted"``.
  """
  g, s, d = x_GSD.shape
  e = routing.num_experts
  k = routing.expert_GSK.shape[-1]
  order_A, inverse_A, e_A = ragged_permutation(routing.expert_GSK)
  group_sizes_E = jnp.bincount(e_A, length=e).astype(jnp.int32)
  x_AD = jnp.take(x_GSD.reshape(g * s, d), order_A // k, axis=0, mode="clip")
  y_AD = expert_ffn_ragged(params, x_AD, group_sizes_E, activation=activation, gated=gated,
                           dtype=dtype, kernel=kernel, interpret=interpret)
  y_GSKD = jnp.take(y_AD, inverse_A, axis=0, mode="clip").reshape(g, s, k, d)
  return jnp.einsum("GSK,GSKD->GSD", routing.weight_GSK.astype(y_GSKD.dtype), y_GSKD)


# ---------------------------------------------------------------- front


def moe_apply(x_GSD: Array, routing: Routing, params: Params, *, method: str = "sorted",
              activation: str = "silu", gated: bool = True, dtype: Any = jnp.float32,
              ragged_kernel: str = "ragged_dot", interpret: bool = False) -> Array:
  """``[G, S, D] -> [G, S, D]``: route, run experts, combine (single device / GSPMD).

  ``ragged_kernel`` (``"ragged_dot"`` | ``"gmm"``) is the grouped matmul of
  ``"ragged"``; ``interpret`` runs ``gmm`` in Pallas interpret mode (CPU).
  """
  check_method(method, routing)
  s = x_GSD.shape[1]
  x_GSD = x_GSD.astype(dtype)
  if method == "ragged":
    return moe_ragged(x_GSD, routing, params, activation=activation, gated=gated, dtype=dtype,
                      kernel=ragged_kernel, interpret=interpret)
  x_GECD = dispatch(x_GSD, routing, method)
  g, e, c, d = x_GECD.shape
  y_END = expert_ffn(params, x_GECD.transpose(1, 0, 2, 3).reshape(e, g * c, d),
                     activation=activation, gated=gated, dtype=dtype)
  y_GECD = y_END.reshape(e, g, c, d).transpose(1, 0, 2, 3)
  return combine(y_GECD, routing, s, method)
