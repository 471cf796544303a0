"""Routed expert FFNs: stacked parameters and the pure functions that apply them.

Legend: E experts, N tokens per expert (any leading rows), A sorted
assignments, D model dim, F expert ffn dim.

Parameters are the dense ``moe_jax.nn.mlp.Mlp`` kernels stacked over a
leading expert axis, under the same names::

    wi_0/kernel [E, D, F]  ("expert", "embed", "mlp")   gate branch (gated only)
    wi_1/kernel [E, D, F]  ("expert", "embed", "mlp")   linear branch (gated only)
    wi/kernel   [E, D, F]  ("expert", "embed", "mlp")   plain FFN only
    wo/kernel   [E, F, D]  ("expert", "mlp", "embed")

so sparse upcycling is ``jax.tree.map(lambda w: jnp.stack([w] * E), dense_mlp_params)``
(see ``upcycle_dense_params``) and the partitioner shards E over ``expert``
and F over ``model`` with the same rules as the dense FFN.

Two ways to apply them, same math:

* ``expert_ffn``: a batched einsum over padded ``[E, N, D]`` buffers
  (capacity dispatch). Dense MXU/BLAS-friendly matmuls; padding costs
  ``cf - 1`` extra FLOPs.
* ``expert_ffn_ragged``: a grouped matmul over expert-sorted rows and
  per-expert group sizes: no padding, no drops. Two kernels
  (``RAGGED_KERNELS``, picked by backend with ``"auto"``):

  - ``"gmm"``: the Pallas megablox grouped matmul (``gmm``, and ``tgmm`` for
    the weight gradient through its VJP), the TPU path. Tiles are chosen for
    the MXU (:func:`gmm_tiling`: 512 / 256 / 128) and the rows are padded to a
    multiple of the row tile here, so callers pass any row count. On CPU it
    runs in Pallas interpret mode (tests only).
  - ``"ragged_dot"``: ``jax.lax.ragged_dot``, the GPU path (grouped GEMM). On
    CPU XLA lowers it to a dense masked matmul over all E experts (E times the
    FLOPs), which the benchmark shows; on TPU it costs the active FLOPs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.nn.attention_kernels import at_kernel_precision
from moe_jax.nn.mlp import get_activation

Array = jax.Array
Params = Mapping[str, Array]


def expert_kernel_names(gated: bool) -> tuple[str, ...]:
  return ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")


def _hidden(x: Array, params: Params, act: Callable[[Array], Array], gated: bool,
            matmul: Callable[[Array, Array], Array]) -> Array:
  if gated:
    return act(matmul(x, params["wi_0"])) * matmul(x, params["wi_1"])
  return act(matmul(x, params["wi"]))


def expert_ffn(params: Params, x_END: Array, *, activation: str = "silu", gated: bool = True,
               dtype: Any = jnp.float32) -> Array:
  """``[E, N, D] -> [E, N, D]``: expert e's FFN on row block e.

  ``params`` holds raw kernels (``wi_0``/``wi_1``/``wo`` or ``wi``/``wo``).
  With F sharded (tensor parallelism) the result is a partial sum over the
  local F slice; the caller reduces it.
  """
  dtype = jnp.dtype(dtype)
  act = get_activation(activation)
  p = {k: v.astype(dtype) for k, v in params.items()}
  mm = lambda x, w: jnp.einsum("END,EDF->ENF", x, w)
  h_ENF = _hidden(x_END.astype(dtype), p, act, gated, mm)
  return jnp.einsum("ENF,EFD->END", h_ENF, p["wo"])


RAGGED_KERNELS = ("auto", "ragged_dot", "gmm")


def resolve_ragged_kernel(kernel: str, platform: str) -> str:
  """``"auto"``: megablox ``gmm`` on TPU, ``ragged_dot`` elsewhere."""
  if kernel not in RAGGED_KERNELS:
    raise ValueError(f"ragged kernel {kernel!r} unknown; known: {RAGGED_KERNELS}")
  if kernel == "auto":
    return "gmm" if platform == "tpu" else "ragged_dot"
  return kernel


def _tile(n: int) -> int:
  """MXU tile of a contracted / output dim: 512, 256 or 128 dividing ``n`` (small: ``n``)."""
  for t in (512, 256, 128):
    if n % t == 0:
      return t
  return n if n < 128 else 128  # megablox masks an irregular last tile of k / n


def gmm_tiling(m: int, k: int, n: int, groups: int = 1) -> tuple[int, int, int]:
  """``(tm, tk, tn)`` for megablox: MXU-sized tiles, rows by how the groups split them.

  megablox visits every row tile a group touches, so a tile shared by two
  groups is computed twice: ``groups`` groups of ``m / groups`` rows cost about
  ``1 + groups · tm / m`` times their FLOPs. The row tile is the largest of
  512 / 256 / 128 that keeps that overhead at 1/8 or less, else 128 (8
  experts over 4096 rows: 128, ~1.25x; 512-row tiles read ~1.86x).
  """
  tm = next((t for t in (512, 256) if groups * t * 8 <= m), 128)
  return tm, _tile(k), _tile(n)


def grouped_matmul(x_MK: Array, w_EKN: Array, group_sizes_E: Array, *, kernel: str,
                   interpret: bool = False) -> Array:
  """``[M, K] x [E, K, N] -> [M, N]``: rows of group e times ``w[e]`` (rows past the groups: 0).

  ``"gmm"`` pads M to a multiple of the row tile (megablox's constraint) and
  slices the padding off; its ``custom_vjp`` gives ``gmm`` / ``tgmm`` backward.
  """
  if kernel == "ragged_dot":
    return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E)
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
  m, k = x_MK.shape
  tiling = gmm_tiling(m, k, w_EKN.shape[2], groups=w_EKN.shape[0])
  mp = -(-m // tiling[0]) * tiling[0]
  # megablox leaves rows outside every group (and their input gradients)
  # unwritten: select them away on both sides, so neither garbage leaks.
  in_group_M = (jnp.arange(mp) < jnp.sum(group_sizes_E))[:, None]
  x_pad = jnp.pad(x_MK, ((0, mp - m), (0, 0))) if mp != m else x_MK
  x_pad = jnp.where(in_group_M, x_pad, jnp.zeros((), x_pad.dtype))
  gmm = lambda x, w, g: megablox.gmm(x, w, g, x_MK.dtype, tiling, None, None, False, interpret)
  y = at_kernel_precision(gmm, x_MK.dtype, x_pad, w_EKN.astype(x_MK.dtype),
                          group_sizes_E.astype(jnp.int32), interpret=interpret)
  return jnp.where(in_group_M, y, jnp.zeros((), y.dtype))[:m]


def expert_ffn_ragged(params: Params, x_AD: Array, group_sizes_E: Array, *,
                      activation: str = "silu", gated: bool = True,
                      dtype: Any = jnp.float32, kernel: str = "ragged_dot",
                      interpret: bool = False) -> Array:
  """``[A, D] -> [A, D]`` for rows sorted by expert, ``group_sizes_E`` rows each.

  ``kernel``: ``"ragged_dot"`` or ``"gmm"`` (megablox; ``interpret`` on CPU).
  Rows past ``sum(group_sizes_E)`` come out as zeros.
  """
  dtype = jnp.dtype(dtype)
  act = get_activation(activation)
  p = {k: v.astype(dtype) for k, v in params.items()}
  mm = functools.partial(grouped_matmul, group_sizes_E=group_sizes_E, kernel=kernel,
                         interpret=interpret)
  h_AF = _hidden(x_AD.astype(dtype), p, act, gated, mm)
  return mm(h_AF, p["wo"])


def expert_kernel_init(scale: float = 1.0) -> Callable[..., Array]:
  """Fan-in truncated normal per expert: each expert is initialised like a dense FFN."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=-2,
                                          out_axis=-1, batch_axis=(0,))


class _StackedKernel(nn.Module):
  """Holds one ``kernel [E, in, out]`` so the tree reads ``wi_0/kernel`` like ``Mlp``."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: Any = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self) -> Array:
    init = self.kernel_init or expert_kernel_init()
    return self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                      jnp.dtype(self.param_dtype))


class RoutedExperts(nn.Module):
  """Creates the stacked expert kernels and returns them as ``{name: array}``.

  A parameter holder only: dispatch decides how (padded einsum, ragged_dot,
  shard_map) the kernels are applied.

  Attributes:
    num_experts: E.
    hidden_dim: F of one expert.
    gated: SwiGLU / gated-GELU (``wi_0``, ``wi_1``, ``wo``) or plain (``wi``, ``wo``).
    param_dtype: storage dtype.
    kernel_init: initializer for ``[E, in, out]`` kernels; default per-expert fan-in.
  """

  num_experts: int
  hidden_dim: int
  gated: bool = True
  param_dtype: Any = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, d_model: int) -> dict[str, Array]:
    e, f = self.num_experts, self.hidden_dim
    common = dict(param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    out = {}
    for name in expert_kernel_names(self.gated):
      if name == "wo":
        out[name] = _StackedKernel((e, f, d_model), ("expert", "mlp", "embed"), name=name,
                                   **common)()
      else:
        out[name] = _StackedKernel((e, d_model, f), ("expert", "embed", "mlp"), name=name,
                                   **common)()
    return out


def upcycle_dense_params(dense_mlp_params: Mapping[str, Any], num_experts: int) -> dict:
  """Expert params (``RoutedExperts`` tree) made of E copies of a dense ``Mlp``'s params.

  ``dense_mlp_params`` is the ``Mlp`` subtree (``{"wi_0": {"kernel": [D, F]}, ...}``);
  biases are not supported by routed experts and raise.
  """
  out = {}
  for name, sub in dense_mlp_params.items():
    if set(sub) != {"kernel"}:
      raise ValueError(f"upcycle_dense_params: {name} has {sorted(sub)}; routed experts "
                       "hold only 'kernel' (no bias)")
    kernel = nn.unbox(sub["kernel"])
    out[name] = {"kernel": jnp.broadcast_to(kernel, (num_experts,) + kernel.shape)}
  return out
