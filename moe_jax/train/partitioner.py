"""The trainer's partitioner: mesh from config, logical rules, sharded jit, multi-host.

Builds on :mod:`moe_jax.train.partitioning` (mesh axes ``data``, ``expert``,
``model`` and the default logical rules). What this file adds:

* :class:`PartitionerConfig`: the mesh shape (``data=-1`` takes every device
  left over) and extra logical rules, merged into the defaults with
  ``merge_rules`` -- a rule that contradicts a default is an error naming both.
* parameter shardings **derived from the modules' own logical annotations**
  (``nn.with_logical_partitioning``): ``nn.get_partition_spec`` gives the
  logical names, the rules give mesh axes. A parameter dimension that its
  mesh axes do not divide is an error naming the parameter (jax would only
  say "not divisible" about an anonymous array).
* optimizer-state shardings derived from the parameters': a state leaf whose
  path ends with a parameter's path (Adam's moments, Adafactor's factored
  statistics, which drop one dimension) takes that parameter's spec, minus the
  dropped dimension; everything else (step counts) is replicated.
* batch sharding: the leading dimension over the ``batch`` rule's mesh axes;
  per-host numpy batches become global arrays with
  ``jax.make_array_from_process_local_data`` (multi-host ready).
* :meth:`Partitioner.jit`: ``jax.jit`` with in/out shardings whose calls run
  inside the mesh and the logical-rules context, so ``with_logical_constraint``
  in the modules resolves with the same rules as the parameters.
* :func:`initialize_distributed`: ``jax.distributed.initialize`` from flags
  (coordinator address, process count and id) or auto-detected on TPU pods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax.train.partitioning import (DEFAULT_RULES, MESH_AXES, logical_to_mesh_spec,
                                        make_mesh, merge_rules, mesh_axes_size, mesh_axis_for,
                                        validate_rules)

logger = logging.getLogger(__name__)

#: Logical names our models use beyond ``DEFAULT_RULES`` (T5's relative-position table,
#: the input dim of CALM's projection from an augmenting model, the leading axis of
#: scanned layers' stacked parameters: every device holds all layers of its shard; the
#: low-rank bottleneck of multi-head latent attention, small and replicated).
MODEL_RULES: tuple[tuple[str, Any], ...] = (("relpos_buckets", None), ("embed_aug", None),
                                            ("layers", None), ("latent", None))

#: FSDP / ZeRO-3 (``PartitionerConfig.fsdp``): every parameter's ``embed``
#: dimension -- and so its gradient and optimizer state -- is split over the
#: data axis. jit's partitioner all-gathers a layer's weights where the layer
#: runs and reduce-scatters their gradients (MaxText's ``fsdp`` axis). Expert
#: and tensor parallelism compose: ``[expert, embed, mlp]`` kernels become
#: ``P("expert", "data", "model")``.
FSDP_RULES: tuple[tuple[str, Any], ...] = (("embed", "data"),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartitionerConfig:
  """Mesh shape and logical-axis rules.

  Attributes:
    data, expert, model: mesh axis sizes; exactly one may be ``-1`` (the
      devices left over; by default ``data``).
    rules: extra ``(logical_name, mesh_axes)`` rules, added after the defaults
      (``partitioning.DEFAULT_RULES`` plus ``MODEL_RULES``). Contradicting a
      default is an error; sharding a name the defaults replicate is not
      (``partitioning.merge_rules``).
    fsdp: shard parameters, gradients and optimizer state over the ``data``
      axis (``FSDP_RULES``: ZeRO-3). Memory for parameter state drops by the
      data-axis size; each layer's weights are all-gathered for its forward
      and backward pass (and its gradients reduce-scattered), which costs
      interconnect bandwidth but no extra FLOPs. Use it when the replicated
      state does not fit (models in the billions on 16-95 GiB chips).
  """

  data: int = -1
  expert: int = 1
  model: int = 1
  rules: tuple[tuple[str, Any], ...] = ()
  fsdp: bool = False

  def __post_init__(self):
    sizes = dict(data=self.data, expert=self.expert, model=self.model)
    if sum(v == -1 for v in sizes.values()) > 1:
      raise ValueError(f"PartitionerConfig: at most one mesh axis may be -1, got {sizes}")
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad:
      raise ValueError(f"PartitionerConfig: mesh axis sizes must be >= 1 or -1, got {bad}")
    rules = tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in self.rules)
    object.__setattr__(self, "rules", rules)

  def all_rules(self) -> tuple[tuple[str, Any], ...]:
    """Defaults, model rules, ``FSDP_RULES`` if ``fsdp``, then ``rules`` (merged)."""
    merged = merge_rules(merge_rules(DEFAULT_RULES, MODEL_RULES),
                         FSDP_RULES if self.fsdp else ())
    return merge_rules(merged, self.rules)

  def mesh_shape(self, num_devices: int) -> dict[str, int]:
    sizes = dict(data=self.data, expert=self.expert, model=self.model)
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if -1 in sizes.values():
      if num_devices % fixed:
        raise ValueError(f"PartitionerConfig {sizes}: {num_devices} devices are not divisible "
                         f"by the fixed axes' product {fixed}")
      sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    return sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
  """Multi-host set-up for ``jax.distributed.initialize``.

  Attributes:
    coordinator_address: ``host:port`` of process 0; set it (with
      ``process_count`` and ``process_id``) on GPU clusters.
    process_count, process_id: this job's size and this process's rank.
    auto_detect: on TPU pods (several hosts in ``TPU_WORKER_HOSTNAMES``) call
      ``jax.distributed.initialize()`` with no arguments, letting jax find the
      coordinator.
    heartbeat_timeout_s: a process that sends no heartbeat for this long is
      declared dead and the others stop with an error naming it (jax's
      default, 100 s, leaves the survivors hanging in a collective). Heartbeats
      come from a background thread, so long compilations do not trip it.
  """

  coordinator_address: str | None = None
  process_count: int | None = None
  process_id: int | None = None
  auto_detect: bool = True
  heartbeat_timeout_s: int = 10


def _on_tpu_pod() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_distributed(config: DistributedConfig = DistributedConfig()) -> bool:
  """Initialises jax's multi-host runtime when configured; returns whether it did.

  Must run before anything touches jax devices. Single-host runs need nothing.
  """
  c = config
  if c.coordinator_address:
    if c.process_count is None or c.process_id is None:
      raise ValueError("multi-host: --coordinator_address needs --process_count and "
                       "--process_id as well")
    if not 0 <= c.process_id < c.process_count:
      raise ValueError(f"multi-host: process_id={c.process_id} is outside "
                       f"[0, process_count={c.process_count})")
    jax.distributed.initialize(coordinator_address=c.coordinator_address,
                               num_processes=c.process_count, process_id=c.process_id,
                               heartbeat_timeout_seconds=c.heartbeat_timeout_s)
    return True
  if c.process_count not in (None, 1) or c.process_id not in (None, 0):
    raise ValueError("multi-host: process_count/process_id given without a "
                     "coordinator_address")
  if c.auto_detect and _on_tpu_pod():
    jax.distributed.initialize(heartbeat_timeout_seconds=c.heartbeat_timeout_s)
    return True
  return False


def _shape_of(x) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Partitioner:
  """Mesh, rules and sharded jit for one training job (see the module docstring)."""

  def __init__(self, config: PartitionerConfig = PartitionerConfig(), *,
               devices: Sequence[Any] | None = None):
    self.config = config
    devices = list(jax.devices() if devices is None else devices)
    self.mesh = make_mesh(config.mesh_shape(len(devices)), devices)
    self.rules = config.all_rules()
    validate_rules(self.rules, self.mesh)

  def __repr__(self) -> str:
    return f"Partitioner(mesh={dict(self.mesh.shape)}, rules={self.rules})"

  # -- context and jit ---------------------------------------------------------

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Mesh and logical rules in context (for tracing modules outside :meth:`jit`)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def jit(self, fn: Callable, *, in_shardings: Any = None, out_shardings: Any = None,
          donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = (),
          in_context: bool = True) -> Callable:
    """``jax.jit`` whose calls (and so its tracing) run in :meth:`activate`.

    ``in_context=False`` traces outside the mesh and rules (the explicit
    shardings still place inputs and outputs): parameter initialisation runs
    the model on a dummy ``[1, 1]`` batch, which layers that switch to
    ``shard_map`` under a mesh (expert parallelism) could not split.
    """
    kwargs = {}
    if in_shardings is not None:
      kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
      kwargs["out_shardings"] = out_shardings
    jitted = jax.jit(fn, donate_argnums=tuple(donate_argnums),
                     static_argnums=tuple(static_argnums), **kwargs)

    def call(*args, **kw):
      if not in_context:
        return jitted(*args, **kw)
      with self.activate():
        return jitted(*args, **kw)

    call.jitted = jitted
    call.lower = lambda *a, **k: _lower_in(self, jitted, *a, **k)
    return call

  # -- specs -------------------------------------------------------------------

  def sharding(self, spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def shardings(self, specs: Any) -> Any:
    """Tree of ``NamedSharding`` for a tree of ``PartitionSpec``."""
    return jax.tree.map(self.sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

  @property
  def replicated(self) -> NamedSharding:
    return self.sharding(PartitionSpec())

  def spec_for(self, logical_axes: Sequence[str | None], shape: Sequence[int],
               name: str = "array") -> PartitionSpec:
    """Mesh spec of an array with ``logical_axes``, checking divisibility."""
    spec = logical_to_mesh_spec(tuple(logical_axes), self.rules)
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
      n = mesh_axes_size(self.mesh, axes)
      if size % n:
        raise ValueError(
            f"{name}: dimension {dim} (logical {logical_axes[dim]!r}, size {size}) is not "
            f"divisible by mesh axes {axes!r} of size {n}; change the model size, the mesh "
            f"{dict(self.mesh.shape)}, or add a rule such as ({logical_axes[dim]!r}, None)")
    return spec

  def param_specs(self, boxed_params: Any) -> Any:
    """``PartitionSpec`` tree of a (possibly abstract) boxed parameter tree.

    Leaves annotated with ``nn.with_logical_partitioning`` are sharded by the
    rules; unannotated leaves are replicated.
    """
    logical = nn.get_partition_spec(boxed_params)
    shapes = nn.meta.unbox(boxed_params)

    def one(path, lspec, shape_leaf):
      shape = _shape_of(shape_leaf)
      axes = tuple(lspec) if isinstance(lspec, PartitionSpec) else ()
      if not axes:
        return PartitionSpec()
      if len(axes) != len(shape):
        raise ValueError(f"{_path_name(path)}: {len(axes)} logical axes {axes} for a parameter "
                         f"of shape {shape}")
      return self.spec_for(axes, shape, _path_name(path))

    return jax.tree_util.tree_map_with_path(
        one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))

  def derived_specs(self, tree: Any, params: Any, param_specs: Any) -> Any:
    """Specs for a tree whose leaves follow parameters (optimizer states).

    A leaf whose key path ends with a parameter's path gets that parameter's
    spec if it has the parameter's shape, or the spec without the one
    dimension it lacks (Adafactor's row/column statistics); anything else is
    replicated.
    """
    table: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
    flat_specs = jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    for (path, spec), leaf in zip(flat_specs, jax.tree.leaves(params)):
      table[tuple(str(k.key) for k in path)] = (_shape_of(leaf), spec)

    def one(path, leaf):
      keys = []
      for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
          break
        keys.insert(0, str(k.key))
      for start in range(len(keys)):
        hit = table.get(tuple(keys[start:]))
        if hit is not None:
          return _spec_for_derived(_shape_of(leaf), *hit)
      return PartitionSpec()

    return jax.tree_util.tree_map_with_path(one, tree)

  # -- batches -----------------------------------------------------------------

  @property
  def batch_axes(self) -> Any:
    return mesh_axis_for("batch", self.rules)

  @property
  def num_batch_shards(self) -> int:
    return mesh_axes_size(self.mesh, self.batch_axes)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return self.sharding(PartitionSpec(self.batch_axes, *([None] * (ndim - 1))))

  def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    return {k: self.batch_sharding(np.ndim(v) if not hasattr(v, "ndim") else v.ndim)
            for k, v in batch.items()}

  def check_batch(self, batch: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` if a per-process batch cannot be split over the batch shards."""
    for key, value in batch.items():
      global_b = np.shape(value)[0] * jax.process_count()
      if global_b % self.num_batch_shards:
        raise ValueError(
            f"batch feature {key!r}: global batch size {global_b} is not divisible by the "
            f"{self.num_batch_shards} batch shards (mesh axes {self.batch_axes!r} of "
            f"{dict(self.mesh.shape)})")

  def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over the batch axes."""
    self.check_batch(batch)
    return {key: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(value)),
                                                        np.asarray(value))
            for key, value in batch.items()}


def _lower_in(partitioner: Partitioner, jitted, *args, **kwargs):
  with partitioner.activate():
    return jitted.lower(*args, **kwargs)


def _spec_for_derived(shape: tuple[int, ...], param_shape: tuple[int, ...],
                      spec: PartitionSpec) -> PartitionSpec:
  full = tuple(spec) + (None,) * (len(param_shape) - len(spec))
  if shape == param_shape:
    return spec
  if len(shape) == len(param_shape) - 1:
    for i in range(len(param_shape)):
      if param_shape[:i] + param_shape[i + 1:] == shape:
        return PartitionSpec(*(full[:i] + full[i + 1:]))
  return PartitionSpec()


__all__ = ["DistributedConfig", "FSDP_RULES", "MESH_AXES", "MODEL_RULES", "Partitioner",
           "PartitionerConfig", "initialize_distributed"]
