"""TPU programs compiled on this (CPU) machine: shared by the benchmark scripts (not a benchmark).

With the ``libtpu`` wheel that matches jax (``moe-jax[tpu]``),
``jax.experimental.topologies.get_topology_desc`` gives the devices of a TPU
slice; ``jax.jit(f).lower(abstract args with shardings).compile()`` is then
XLA's TPU compile, whose ``cost_analysis()`` / ``memory_analysis()`` are the
figures these scripts report. No TPU is used.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-16")  # quiets libtpu's host probing
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: compiles only

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402


def tpu_devices(topology: str = "v5p:2x2x2") -> list | None:
  """The devices of ``topology`` (``None`` without libtpu)."""
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # noqa: BLE001 -- no libtpu: the caller skips the TPU figures
    print(f"(no TPU AOT figures: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return None


def make_mesh(devices: list, data: int = 1, expert: int = 1, model: int = 1) -> Mesh:
  n = data * expert * model
  return Mesh(np.array(devices[:n]).reshape(data, expert, model), ("data", "expert", "model"))


def abstract_params(module: nn.Module, mesh: Mesh, rules, *args) -> Any:
  """``{"params": ...}`` of ``module`` as sharded ``ShapeDtypeStruct`` s (no allocation)."""
  boxed = {"params": jax.eval_shape(module.init, jax.random.key(0), *args)["params"]}
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def abstract(shape, dtype, mesh: Mesh, spec) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def compile_stats(fn: Callable, args: tuple, mesh: Mesh | None = None, rules=None) -> dict:
  """Compile ``jax.jit(fn)(*args)`` (under ``mesh`` / ``rules`` when given): flops, bytes, HLO."""
  import contextlib
  ctx = contextlib.ExitStack()
  if mesh is not None:
    ctx.enter_context(jax.set_mesh(mesh))
  if rules is not None:
    ctx.enter_context(nn.logical_axis_rules(rules))
  with ctx:
    compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return dict(flops=float(cost.get("flops", math.nan)), temp_bytes=int(mem.temp_size_in_bytes),
              arg_bytes=int(mem.argument_size_in_bytes), hlo=compiled.as_text())
