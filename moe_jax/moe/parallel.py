"""Expert parallelism: ``shard_map`` + padded ``all_to_all`` over the expert mesh axis.

Legend: G groups (global), g groups on one device, S tokens per group, D
model dim, E experts, e experts on one device, C capacity, F expert ffn dim,
f its slice on one device, n devices along the expert mesh axis.

Layout (all mesh axes come from the logical rules installed by the
partitioner -- ``nn.logical_axis_rules`` and ``jax.set_mesh`` -- never from
this file):

* tokens ``[G, S, D]`` and the routing arrays are split on G over the mesh
  axes of logical ``batch`` plus those of logical ``expert`` (each device owns
  whole groups, so routing and capacity are local and exact);
* expert kernels ``[E, D, F]`` / ``[E, F, D]`` are split on E over the
  ``expert`` axes and on F over the ``mlp`` axes (tensor parallelism);
* tokens are replicated over the ``mlp`` (``model``) axes.

One layer on one device (``expert_parallel_body``)::

    [g, E, C, D]  dispatch local groups into buffers for *all* experts
    [e, n·g, C, D] all_to_all over expert: send expert block j to device j
    [e, n·g, C, D] local experts' FFN on the F slice, psum over model
    [g, E, C, D]  all_to_all back, combine into [g, S, D]

Each ``all_to_all`` moves ``E·C·D = S·K·cf·D`` elements per group (the C
slots are padded): per token ``2·K·cf·D`` elements per forward pass, checked
against the compiled HLO in the tests. The dropless ``"ragged"`` dispatch
moves only real rows with ``jax.lax.ragged_all_to_all`` on TPU / GPU
(:mod:`moe_jax.moe.ragged_parallel`); XLA:CPU has no ragged all-to-all, so
on CPU it stays these padded buffers with C = S.

Without expert axes (a data- and/or tensor-parallel mesh) the same body runs
with no ``all_to_all``: every device routes, dispatches and computes its own
groups with all experts (F split over ``model``). Left to GSPMD instead, the
sort, gathers and slot scatter get all-gathered.

Routing decisions (softmax, top-k, slot assignment) run in their own
communication-free ``shard_map`` over the token axes (``route_local``):
they are per group, and left to GSPMD the sort and the slot scatter get
all-gathered. The router matmul, losses and metrics stay under GSPMD (plain
batch-parallel einsums and means), the same code as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from moe_jax.moe.dispatch import combine, dispatch, moe_ragged
from moe_jax.moe.ragged_parallel import ragged_expert_parallel_body
from moe_jax.moe.experts import Params, expert_ffn
from moe_jax.moe.routing import Routing

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExpertParallelPlan:
  """Mesh axes an expert-parallel layer uses, derived from rules and mesh.

  Only mesh axes of size > 1 are listed (size-1 axes need no collectives).

  Attributes:
    mesh: the (abstract or concrete) mesh in context.
    expert_axes: mesh axes of logical ``expert``.
    token_axes: mesh axes the groups are split over (``batch`` axes, then any
      ``expert`` axes they lack).
    model_axes: mesh axes of logical ``mlp`` (expert FFN tensor parallelism).
  """

  mesh: Any
  expert_axes: tuple[str, ...]
  token_axes: tuple[str, ...]
  model_axes: tuple[str, ...]

  def size(self, axes: tuple[str, ...]) -> int:
    shape = dict(self.mesh.shape)
    return math.prod(shape[a] for a in axes)

  @property
  def is_trivial(self) -> bool:
    """Nothing is split: the plain single-device path is the same program."""
    return not (self.expert_axes or self.token_axes or self.model_axes)

  @property
  def num_expert_shards(self) -> int:
    return self.size(self.expert_axes)

  @property
  def num_token_shards(self) -> int:
    return self.size(self.token_axes)


def _axes(value) -> tuple[str, ...]:
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def _rule(rules, name: str) -> tuple[str, ...]:
  for logical, mesh_axes in rules:
    if logical == name:
      return _axes(mesh_axes)
  raise ValueError(
      f"expert parallelism: the logical axis rules in context have no rule for {name!r}; "
      "add one (e.g. moe_jax.train.partitioning.DEFAULT_RULES maps batch->(data, expert), "
      "expert->expert, mlp->model)")


def plan_from_context(mesh: Any = None, rules: Any = None) -> ExpertParallelPlan | None:
  """The plan for the mesh and rules in context, or ``None`` without both.

  ``mesh`` defaults to ``jax.sharding.get_abstract_mesh()`` (set by
  ``jax.set_mesh``); ``rules`` to ``nn.get_logical_axis_rules()``. Mesh axes
  named by a rule but absent from the mesh are ignored.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", False) or not mesh.axis_names:
    return None
  if rules is None:
    rules = nn.get_logical_axis_rules()
  if not rules:
    return None
  present = lambda axes: tuple(a for a in axes if a in mesh.axis_names)
  expert_axes = present(_rule(rules, "expert"))
  batch_axes = present(_rule(rules, "batch"))
  model_axes = present(_rule(rules, "mlp"))
  overlap = set(model_axes) & (set(expert_axes) | set(batch_axes))
  if overlap:
    raise ValueError(f"expert parallelism: mesh axes {sorted(overlap)} serve both 'mlp' and "
                     "'batch'/'expert' in the rules; the expert FFN cannot be split both ways")
  token_axes = batch_axes + tuple(a for a in expert_axes if a not in batch_axes)
  # Size-1 axes need no collective (XLA would still emit trivial ones).
  big = lambda axes: tuple(a for a in axes if dict(mesh.shape)[a] > 1)
  return ExpertParallelPlan(mesh=mesh, expert_axes=big(expert_axes),
                            token_axes=big(token_axes), model_axes=big(model_axes))


def route_local(route_fn: Callable[[Array], Routing], logits_GSE: Array,
                plan: ExpertParallelPlan) -> Routing:
  """``route_fn(logits_GSE)`` on each device's own groups (no communication)."""
  g = logits_GSE.shape[0]
  if g % plan.num_token_shards:
    raise ValueError(f"expert parallelism: {g} token groups cannot be split over mesh axes "
                     f"{plan.token_axes} of total size {plan.num_token_shards}; use a batch "
                     f"(or num_groups) that is a multiple of {plan.num_token_shards}, or "
                     "MoeConfig(expert_parallel=False)")
  tok = P(plan.token_axes or None)
  return jax.shard_map(route_fn, mesh=plan.mesh, in_specs=tok, out_specs=tok)(logits_GSE)


def expert_parallel_body(x_GSD: Array, routing: Routing, params: Params, *,
                         expert_axes: tuple[str, ...], model_axes: tuple[str, ...],
                         method: str, activation: str, gated: bool, dtype: Any) -> Array:
  """Per-device body of the expert-parallel layer (see module docstring)."""
  s = x_GSD.shape[1]
  x_GECD = dispatch(x_GSD.astype(dtype), routing, method)
  x_EGCD = x_GECD.transpose(1, 0, 2, 3)
  if expert_axes:
    x_EGCD = jax.lax.all_to_all(x_EGCD, expert_axes, 0, 1, tiled=True)
  e, gn, c, d = x_EGCD.shape
  y_END = expert_ffn(params, x_EGCD.reshape(e, gn * c, d), activation=activation, gated=gated,
                     dtype=dtype)
  if model_axes:
    y_END = jax.lax.psum(y_END, model_axes)
  y_EGCD = y_END.reshape(e, gn, c, d)
  if expert_axes:
    y_EGCD = jax.lax.all_to_all(y_EGCD, expert_axes, 1, 0, tiled=True)
  return combine(y_EGCD.transpose(1, 0, 2, 3), routing, s, method)


def local_ragged_body(x_GSD: Array, routing: Routing, params: Params, *,
                      model_axes: tuple[str, ...], **kw) -> Array:
  """Dropless body without expert axes: each device runs all experts on its own tokens."""
  y = moe_ragged(x_GSD.astype(kw["dtype"]), routing, params, **kw)
  return jax.lax.psum(y, model_axes) if model_axes else y


def expert_parallel_apply(x_GSD: Array, routing: Routing, params: Params, *,
                          plan: ExpertParallelPlan, method: str = "sorted",
                          activation: str = "silu", gated: bool = True,
                          dtype: Any = jax.numpy.float32, ragged: dict | None = None,
                          return_exchange_stats: bool = False
                          ) -> Array | tuple[Array, Array, Array]:
  """``moe_apply`` with experts split over ``plan.expert_axes`` (one ``shard_map``).

  ``method`` is ``"sorted"`` or ``"onehot"`` (padded capacity buffers and
  ``all_to_all``), or ``"ragged"``: dropless, tokens moved with a ragged
  all-to-all (:mod:`moe_jax.moe.ragged_parallel`). ``ragged`` holds that
  path's options: ``kernel``, ``interpret``, ``exchange`` (``"ragged"`` or
  ``"emulated"``), ``buffer_factor``.

  ``return_exchange_stats``: return ``(y, dropped, load)``: ``dropped`` the
  int32 number of assignments that did not fit a receive buffer of the ragged
  exchange, summed over the devices, and ``load`` the float32 most
  assignments any device was sent over its balanced share (the smallest
  ``buffer_factor`` that drops nothing). The other paths have no such buffer:
  0 and 0.
  """
  if method not in ("sorted", "onehot", "ragged"):
    raise ValueError(f"expert_parallel_apply: method {method!r}; known: sorted, onehot, ragged")
  g = x_GSD.shape[0]
  e = routing.num_experts
  n_tok, n_exp = plan.num_token_shards, plan.num_expert_shards
  if g % n_tok:
    raise ValueError(f"expert parallelism: {g} token groups cannot be split over mesh axes "
                     f"{plan.token_axes} of total size {n_tok}; use a batch (or num_groups) "
                     f"that is a multiple of {n_tok}, or MoeConfig(expert_parallel=False)")
  if e % n_exp:
    raise ValueError(f"expert parallelism: {e} experts cannot be split over mesh axes "
                     f"{plan.expert_axes} of size {n_exp}")
  f_axis = plan.model_axes or None
  f_size = plan.size(plan.model_axes)
  for name, w in params.items():
    f = w.shape[1] if name == "wo" else w.shape[2]
    if f % f_size:
      raise ValueError(f"expert parallelism: expert kernel {name} has F={f}, not divisible by "
                       f"the {plan.model_axes} mesh size {f_size}")
  tok = P(plan.token_axes or None)
  ex = plan.expert_axes or None
  param_specs = {name: (P(ex, f_axis, None) if name == "wo" else P(ex, None, f_axis))
                 for name in params}
  common = dict(model_axes=plan.model_axes, activation=activation, gated=gated, dtype=dtype)
  if method == "ragged" and plan.expert_axes:
    r = dict(ragged or {})
    body = functools.partial(ragged_expert_parallel_body, expert_axes=plan.expert_axes,
                             num_expert_shards=n_exp, kernel=r.get("kernel", "ragged_dot"),
                             interpret=r.get("interpret", False),
                             exchange=r.get("exchange", "ragged"),
                             buffer_factor=r.get("buffer_factor"), **common)
  elif method == "ragged":
    r = dict(ragged or {})
    body = functools.partial(local_ragged_body, kernel=r.get("kernel", "ragged_dot"),
                             interpret=r.get("interpret", False), **common)
  else:
    body = functools.partial(expert_parallel_body, expert_axes=plan.expert_axes, method=method,
                             **common)
  if method == "ragged" and plan.expert_axes:
    # One drop count per device of the token axes (the same on the model axes,
    # whose devices make the same exchange). Pallas kernels (megablox) declare
    # no varying-manual-axes types: unchecked.
    y, dropped_N, load_N = jax.shard_map(
        body, mesh=plan.mesh, in_specs=(tok, tok, param_specs), out_specs=(tok, tok, tok),
        check_vma=False)(x_GSD, routing, params)
    if return_exchange_stats:
      return y, jax.numpy.sum(dropped_N), jax.numpy.max(load_N)
    return y
  y = jax.shard_map(body, mesh=plan.mesh, in_specs=(tok, tok, param_specs), out_specs=tok,
                    check_vma=method != "ragged")(x_GSD, routing, params)
  if return_exchange_stats:
    return y, jax.numpy.zeros((), jax.numpy.int32), jax.numpy.zeros((), jax.numpy.float32)
  return y
