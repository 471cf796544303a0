"""Dropless expert parallelism: tokens move with ``ragged_all_to_all``; grouped-matmul experts.

Legend: g groups on one device, S tokens per group, D model dim, E experts,
e experts on one device, n devices along the expert mesh axes, K choices per
token, A = g·S·K this device's assignments, R rows of the receive buffer.

One layer on one device (``ragged_expert_parallel_body``)::

    [A, D]   this device's assignments, sorted by (global) expert
             -> the rows for device j's experts are one contiguous chunk
    ragged_all_to_all: chunk j goes to device j (sizes exchanged first)
    [R, D]   received rows, by source then local expert; sorted by local expert
    [R, D]   grouped matmul (megablox gmm / ragged_dot), psum over ``model``
    ragged_all_to_all back: each row returns to the slot it came from
    [A, D]   un-sort, weight-sum over K -> [g, S, D]

Only real rows cross the network (the padded path sends ``E·C`` slots per
group: ``cf`` times the real rows, or ``E/K`` times when dropless), and the
grouped matmul does only the real rows' FLOPs on TPU / GPU.

**The receive buffer.** Shapes are static, so R bounds what one device can
receive: ``n · g·S · min(K, e)`` rows when every token of every device picks
this device's experts. That worst case is what makes the layer *truly*
dropless, and it is the default (``buffer_factor=None``). ``buffer_factor=f``
sizes it at ``f·A`` instead (balanced routing receives ``A`` on average):
less memory, and rows past the buffer are dropped (they return zeros, like a
capacity drop), last experts of the last sources first. megablox's cost
estimate counts all R rows, so compiled FLOPs scale with R; the kernel
itself skips row tiles past the real groups: it runs each group's row tiles
(a tile two groups share, once per group), about 1.2x the ideal FLOPs with
random routing (``*_executed_flops_over_ideal`` in benchmarks/moe_layer.py).

**Overflow is counted, and can be made dropless by a fallback.** The body
also returns how many assignments did not fit this device's receive buffer
(what arrived minus what fit: exact, and 0 with the worst-case buffer); the
MoE layer sows the sum over the devices as ``buffer_dropped`` in
``"moe_metrics"`` and adds it to ``dropped_fraction``. It also sows
``buffer_load``: the most any device was sent, over the balanced load ``A``
-- the smallest ``buffer_factor`` that would have held this step's exchange
(logged as ``model/buffer_load``, the maximum over layers: what to set the
factor above). With
``TrainerConfig.dropless_fallback`` the trainer runs each step with the small
buffer and, when any layer overflowed, keeps the old train state inside that
jitted step (nothing applied, the step counter and its RNG do not advance)
and re-runs the same batch with a second program traced under
:func:`worst_case_buffers` (``buffer_factor=None`` in every layer, optionally
with more gradient-accumulation microbatches so its larger buffers fit the
same memory). Training stays exactly dropless at the small buffer's cost on
the steps that fit; each overflowing step pays a second step, counted by the
``moe/fallback_steps`` metric. The price is one host read of one scalar per
step (the host must know before it dispatches the next step).

``exchange`` picks the collective: ``"ragged"`` (``jax.lax.ragged_all_to_all``,
TPU / GPU) or ``"emulated"`` (the same semantics from a padded ``all_to_all``:
XLA:CPU has no ragged all-to-all; the tests use it to check this body).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp

from moe_jax.moe.dispatch import ragged_permutation
from moe_jax.moe.experts import Params, expert_ffn_ragged
from moe_jax.moe.routing import TokensChooseRouting

Array = jax.Array

EXCHANGES = ("auto", "ragged", "padded", "emulated")


def resolve_exchange(exchange: str, platform: str) -> str:
  """``"auto"``: ragged all-to-all on TPU / GPU, padded capacity buffers on CPU."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert-parallel exchange {exchange!r} unknown; known: {EXCHANGES}")
  if exchange == "auto":
    return "ragged" if platform in ("tpu", "gpu") else "padded"
  return exchange


_WORST_CASE = contextvars.ContextVar("worst_case_buffers", default=False)


@contextlib.contextmanager
def worst_case_buffers():
  """Trace MoE layers with the worst-case receive buffer, whatever their ``buffer_factor``.

  The trainer's dropless fallback traces its replay step in this context: the
  same model, every layer truly dropless.
  """
  token = _WORST_CASE.set(True)
  try:
    yield
  finally:
    _WORST_CASE.reset(token)


def effective_buffer_factor(buffer_factor: float | None) -> float | None:
  """``buffer_factor``, or ``None`` (worst case) inside :func:`worst_case_buffers`."""
  return None if _WORST_CASE.get() else buffer_factor


def _exclusive_cumsum(x: Array, axis: int = 0) -> Array:
  return jnp.cumsum(x, axis=axis) - x


def emulated_ragged_all_to_all(operand: Array, output: Array, input_offsets: Array,
                               send_sizes: Array, output_offsets: Array, recv_sizes: Array, *,
                               axis_name) -> Array:
  """``jax.lax.ragged_all_to_all`` semantics from a padded ``all_to_all`` (CPU oracle).

  Chunk j (``send_sizes[j]`` rows from ``input_offsets[j]``) lands on device j
  at ``output_offsets[j]`` (the sender's view, as in ``ragged_all_to_all``).
  """
  del recv_sizes  # implied by the senders' sizes
  a, d = operand.shape
  r = output.shape[0]
  rows = jnp.arange(a)
  idx = input_offsets[:, None] + rows[None, :]
  keep = rows[None, :] < send_sizes[:, None]
  chunks = jnp.where(keep[..., None], jnp.take(operand, jnp.clip(idx, 0, a - 1), axis=0), 0)
  got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
  meta = jax.lax.all_to_all(jnp.stack([output_offsets, send_sizes], 1), axis_name, 0, 0,
                            tiled=True)
  pos = meta[:, :1] + rows[None, :]
  pos = jnp.where(rows[None, :] < meta[:, 1:], pos, r)  # past the chunk: dropped
  return output.at[pos.reshape(-1)].set(got.reshape(-1, d).astype(output.dtype), mode="drop")


def receive_rows(num_shards: int, tokens: int, k: int, experts_per_shard: int,
                 buffer_factor: float | None) -> int:
  """R: the worst case ``n · tokens · min(K, e)`` (dropless), or ``f · tokens · K`` rows."""
  if buffer_factor is None:
    return num_shards * tokens * min(k, experts_per_shard)
  return max(1, int(-(-buffer_factor * tokens * k // 1)))


def _exchange_plan(sizes_NE: Array, axis, rows: int):
  """Sizes and offsets of both exchanges, from every device's per-destination counts.

  Returns ``(send_N, in_off_N, out_off_N, recv_N, recv_NE, back_off_N,
  dropped, arrived)``: chunk sizes (clamped to the receive buffer), where
  chunks start here and on their receivers, what arrives from each source per
  local expert, where returned rows go on their source, how many rows sent to
  this device did not fit its buffer, and how many were sent to it in all.
  """
  n, e = sizes_NE.shape
  me = jax.lax.axis_index(axis)
  send_N = sizes_NE.sum(1)
  all_NN = jax.lax.all_gather(send_N, axis, tiled=False).reshape(n, n)  # [source, dest]
  off_NN = _exclusive_cumsum(all_NN, 0)  # where source i's chunk starts on dest j
  eff_NN = jnp.clip(rows - off_NN, 0, all_NN)  # what fits in the receive buffer
  in_off_N = _exclusive_cumsum(send_N)
  out_off_N = off_NN[me]
  recv_full_NE = jax.lax.all_to_all(sizes_NE, axis, 0, 0, tiled=True)  # [source, e]
  recv_N = jnp.take(eff_NN, me, axis=1)
  recv_NE = jnp.clip(recv_N[:, None] - _exclusive_cumsum(recv_full_NE, 1), 0, recv_full_NE)
  back_off_N = jnp.take(_exclusive_cumsum(all_NN, 1), me, axis=1)  # source i's in_off for me
  arrived = jnp.take(all_NN, me, axis=1).sum()
  return eff_NN[me], in_off_N, out_off_N, recv_N, recv_NE, back_off_N, arrived - recv_N.sum(), \
      arrived


def ragged_expert_parallel_body(x_GSD: Array, routing: TokensChooseRouting, params: Params, *,
                                expert_axes: tuple[str, ...], model_axes: tuple[str, ...],
                                num_expert_shards: int, activation: str, gated: bool,
                                dtype: Any, kernel: str, interpret: bool, exchange: str,
                                buffer_factor: float | None) -> tuple[Array, Array, Array]:
  """Per-device body of the dropless expert-parallel layer (see module docstring).

  Returns ``(y_GSD, dropped_1, load_1)``: the output, the number of
  assignments sent to this device that did not fit its receive buffer
  (``[1]`` int32), and all assignments sent to it over its balanced share
  ``g·S·K`` (``[1]`` float32: the smallest ``buffer_factor`` that holds them).
  """
  g, s, d = x_GSD.shape
  big_e = routing.num_experts
  k = routing.expert_GSK.shape[-1]
  n = num_expert_shards
  e = big_e // n
  axis = expert_axes if len(expert_axes) > 1 else expert_axes[0]
  a2a = (jax.lax.ragged_all_to_all if exchange == "ragged" else
         lambda *xs, axis_name: emulated_ragged_all_to_all(*xs, axis_name=axis_name))

  order_A, inverse_A, e_A = ragged_permutation(routing.expert_GSK)
  sizes_NE = jnp.bincount(e_A, length=big_e).astype(jnp.int32).reshape(n, e)
  x_AD = jnp.take(x_GSD.reshape(g * s, d).astype(dtype), order_A // k, axis=0, mode="clip")
  rows = receive_rows(n, g * s, k, e, buffer_factor)
  send_N, in_off_N, out_off_N, recv_N, recv_NE, back_off_N, dropped, arrived = _exchange_plan(
      sizes_NE, axis, rows)
  x_RD = a2a(x_AD, jnp.zeros((rows, d), x_AD.dtype), in_off_N, send_N, out_off_N, recv_N,
             axis_name=axis)

  # Received rows are by source, then local expert: sort them by local expert.
  bounds = jnp.cumsum(recv_NE.reshape(-1))
  seg_R = jnp.searchsorted(bounds, jnp.arange(rows), side="right")
  local_R = jnp.where(seg_R < n * e, seg_R % e, e)  # past the real rows: after every group
  order_R = jnp.argsort(local_R, stable=True)
  inverse_R = jnp.zeros_like(order_R).at[order_R].set(jnp.arange(rows, dtype=order_R.dtype),
                                                      unique_indices=True)
  y_sorted = expert_ffn_ragged(params, jnp.take(x_RD, order_R, axis=0), recv_NE.sum(0),
                               activation=activation, gated=gated, dtype=dtype, kernel=kernel,
                               interpret=interpret)
  if model_axes:
    y_sorted = jax.lax.psum(y_sorted, model_axes)
  y_RD = jnp.take(y_sorted, inverse_R, axis=0)

  y_AD = a2a(y_RD, jnp.zeros((g * s * k, d), y_RD.dtype), _exclusive_cumsum(recv_N), recv_N,
             back_off_N, send_N, axis_name=axis)
  y_GSKD = jnp.take(y_AD, inverse_A, axis=0, mode="clip").reshape(g, s, k, d)
  y_GSD = jnp.einsum("GSK,GSKD->GSD", routing.weight_GSK.astype(y_GSKD.dtype), y_GSKD)
  load = arrived.astype(jnp.float32) / (g * s * k)
  return y_GSD, dropped.astype(jnp.int32).reshape(1), load.reshape(1)
