"""Minimal partitioner: a device mesh and the logical -> mesh axis rules.

Modules only ever name *logical* axes (``batch``, ``embed``, ``mlp``,
``expert``, ...). This file is the one place that says which *mesh* axes
(``data``, ``expert``, ``model``) they live on. The trainer extends it
(multi-host, parameter sharding of a whole train state); the MoE layer reads
the rules installed here to derive its ``shard_map`` specs.

Usage::

    mesh = make_mesh({"data": 2, "expert": 4})           # model axis filled with 1
    rules = merge_rules(DEFAULT_RULES, [("vocab", None)])  # ValueError: conflicts
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      jax.jit(model.apply)(...)

Default layout (see ``DEFAULT_RULES``):

* Tokens (``batch``) are split over ``data`` *and* ``expert``: the expert axis
  is a data-parallel axis for everything but the routed experts, so expert
  parallelism costs no extra replicas of the dense part of the model. Inside
  the MoE layer, the ``all_to_all`` over ``expert`` trades token shards for
  expert shards.
* ``expert`` (the E dim of routed-expert params) is split over ``expert``.
* ``mlp``, ``heads``, ``kv_heads``, ``vocab`` are split over ``model``
  (Megatron-style tensor parallelism, including the expert FFN dimension F).
* ``embed``, ``length``, ``kv``, ``unmodeled`` (router kernels, adapter
  experts) and ``adapter_rank`` (the LoRA rank) are replicated.

Rule semantics are flax's (``nn.logical_axis_rules``): rules are tried in
order and a mesh axis is used at most once per array; a dimension whose rule's
mesh axes are already taken stays unsharded. Unlike flax, ``merge_rules``
and ``logical_to_mesh_spec`` refuse conflicting or unknown names instead of
silently replicating.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

#: The mesh axes this library knows, outermost (slowest interconnect) first.
MESH_AXES: tuple[str, ...] = ("data", "expert", "model")

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "expert")),
    ("expert", "expert"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("length", None),
    ("kv", None),
    ("unmodeled", None),
    ("adapter_rank", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes ``("data", "expert", "model")``; missing axes get size 1.

  Args:
    shape: axis name -> size, e.g. ``{"data": 2, "expert": 4, "model": 1}``.
      Only names in ``MESH_AXES`` are accepted.
    devices: devices to lay out; default ``jax.devices()``. The first
      ``prod(shape)`` of them are used.

  The axes are ``AxisType.Auto`` (GSPMD propagation, pjit style): modules
  place activations with ``nn.with_logical_constraint`` and the MoE layer
  switches to manual partitioning inside its own ``shard_map``.
  """
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"make_mesh: unknown mesh axes {unknown}; known: {list(MESH_AXES)}")
  sizes = tuple(int(shape.get(name, 1)) for name in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise ValueError(f"make_mesh: axis sizes must be >= 1, got {dict(shape)}")
  devices = list(jax.devices() if devices is None else devices)
  n = math.prod(sizes)
  if n > len(devices):
    raise ValueError(f"make_mesh: mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, "
                     f"only {len(devices)} available")
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices[:n])
  except (ValueError, NotImplementedError):
    # A TPU slice whose physical axes do not factor into the mesh (data=8 x expert=8
    # on a 4x4x4 v5p-128): let mesh_utils split a physical axis across two mesh axes.
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(sizes, devices[:n], allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  return tuple(mesh_axes)


def _canonical(mesh_axes: MeshAxes) -> MeshAxes:
  t = _as_tuple(mesh_axes)
  if not t:
    return None
  return t[0] if len(t) == 1 else t


def merge_rules(defaults: Rules, additions: Rules = ()) -> tuple[tuple[str, MeshAxes], ...]:
  """``defaults`` followed by the new rules of ``additions``.

  A rule in ``additions`` that repeats one in ``defaults`` (same logical name,
  same mesh axes) is accepted once. A default that *replicates* a name
  (``(name, None)``) is a default, not a decision: an addition may shard that
  name, and takes the default's place in the priority order. That is how FSDP
  is spelled: ``("embed", "data")`` shards every parameter's model dimension
  over the data axis (activations keep it whole: their ``batch`` dimension,
  earlier in the rules, already uses ``data``). Every other disagreement -- a
  sharded default re-mapped or un-sharded, or two rules for one name within
  either list -- raises ``ValueError`` naming both rules. Order is kept (rule
  order is priority order).
  """
  merged: dict[str, MeshAxes] = {}
  from_defaults: set[str] = set()
  for source, rules in (("defaults", defaults), ("additions", additions)):
    seen: set[str] = set()
    for rule in rules:
      if len(rule) != 2 or not isinstance(rule[0], str):
        raise ValueError(f"merge_rules: malformed rule {rule!r} in {source}; "
                         "expected (logical_name, mesh_axes)")
      name, axes = rule[0], _canonical(rule[1])
      refines = (source == "additions" and name in from_defaults and name not in seen
                 and merged[name] is None)
      if name in merged and merged[name] != axes and not refines:
        raise ValueError(f"merge_rules: conflicting rules for logical axis {name!r}: "
                         f"({name!r}, {merged[name]!r}) vs ({name!r}, {axes!r}) in {source}")
      merged[name] = axes
      seen.add(name)
      if source == "defaults":
        from_defaults.add(name)
  return tuple(merged.items())


def validate_rules(rules: Rules, mesh: Mesh | Any) -> None:
  """Raises ``ValueError`` if a rule names a mesh axis that ``mesh`` lacks."""
  names = set(mesh.axis_names)
  for name, axes in rules:
    missing = [a for a in _as_tuple(axes) if a not in names]
    if missing:
      raise ValueError(f"rule ({name!r}, {axes!r}) names mesh axes {missing} that the mesh "
                       f"{tuple(mesh.axis_names)} does not have")


def logical_to_mesh_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """The ``PartitionSpec`` of an array whose dims have ``logical_axes``.

  Same resolution as flax (rules in order, each mesh axis used at most once),
  but a logical name with no rule raises ``ValueError`` instead of being
  silently replicated. ``None`` entries stay unsharded.
  """
  table = dict(merge_rules(rules))
  names = [n for n in logical_axes if n is not None]
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    raise ValueError(f"logical axes {tuple(logical_axes)} repeat {dups}")
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"no partitioning rule for logical axes {unknown} (of "
                     f"{tuple(logical_axes)}); known: {sorted(table)}")
  result: list[MeshAxes] = [None] * len(logical_axes)
  used: set[str] = set()
  for name, axes in table.items():  # rule order is priority order
    if name not in names:
      continue
    t = _as_tuple(axes)
    if t and not used & set(t):
      result[list(logical_axes).index(name)] = _canonical(axes)
      used |= set(t)
  return PartitionSpec(*result)


def mesh_axis_for(logical_name: str, rules: Rules) -> MeshAxes:
  """Mesh axes (``None``, a name, or a tuple) that ``logical_name`` maps to.

  Raises ``ValueError`` when no rule names ``logical_name``.
  """
  table = dict(merge_rules(rules))
  if logical_name not in table:
    raise ValueError(f"no partitioning rule for logical axis {logical_name!r}; "
                     f"known: {sorted(table)}")
  return table[logical_name]


def mesh_axes_size(mesh: Mesh | Any, mesh_axes: MeshAxes) -> int:
  """Product of the sizes of ``mesh_axes`` in ``mesh`` (1 for ``None``)."""
  shape = dict(mesh.shape)
  return int(np.prod([shape[a] for a in _as_tuple(mesh_axes)], dtype=np.int64))
