"""Ahead-of-time compilation of the trainer's own train step for a TPU slice, on any machine.

``python -m moe_jax.plan --compile --topology=v5p-128 --gin_file=...``

With the ``libtpu`` wheel that matches jax installed (``pip install
'moe-jax[tpu]'``), ``jax.experimental.topologies.get_topology_desc`` describes
the devices of a TPU slice without owning one. :func:`compile_train_step`
builds the run's :class:`~moe_jax.train.trainer.Trainer` (``run.build_trainer``:
the same model, optimizer, trainable mask, microbatches and frozen dtype) on
a :class:`~moe_jax.train.partitioner.Partitioner` over those devices, and
lowers and compiles **the trainer's jitted train step** with the trainer's
own state and batch shardings -- the program ``python -m moe_jax.train``
would run on that slice. XLA's TPU compiler then reports, per device:

* memory (``compiled.memory_analysis()``): arguments (parameters, optimizer
  state, batch), outputs, the donated outputs that alias arguments, and
  temporaries (activations, gradients, collectives' buffers); the step's
  peak is ``arguments + outputs - aliased + temporaries``;
* HLO FLOPs of one step (``compiled.cost_analysis()``; XLA counts the body
  of a while loop once, so with scanned layers or microbatches the HLO
  figure covers one layer / one microbatch of those loops), compared with the
  model FLOPs ``2·N·T`` forward + ``2·N·T`` input gradients + ``2·N_trainable·T``
  weight gradients (``6·N·T`` when everything trains), plus one more forward
  (``2·N·T``) when the blocks rematerialise everything (``remat_policy="full"``);
  N is the active matmul parameters, T the tokens, divided over the devices;
* compile time.

Topology names are Cloud TPU's: ``v4-32`` and ``v5p-128`` count TensorCores
(two per chip: 16 and 64 chips), ``v5e-16`` and ``v6e-16`` count chips.
``GEN:AxBxC`` (``v5p:2x2x1``) names the chip grid directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Mapping

import jax

GIB = 1024 ** 3

#: HBM per chip, GiB.
HBM_GIB: Mapping[str, float] = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
#: Generations whose slice names count TensorCores (two per chip, megacore).
_CORE_NAMED = ("v4", "v5p")
#: Generations with a 3-D torus (the others are 2-D).
_TORUS_3D = ("v4", "v5p")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Topology:
  """A TPU slice.

  Attributes:
    name: as given (``v5p-128`` or ``v5p:4x4x4``).
    generation: ``v4``, ``v5e``, ``v5p`` or ``v6e``.
    chips: chips (= jax devices) in the slice.
    grid: the chip grid for ``get_topology_desc``, e.g. ``"4x4x4"``.
  """

  name: str
  generation: str
  chips: int
  grid: str

  @property
  def hbm_bytes(self) -> int:
    return int(HBM_GIB[self.generation] * GIB)

  @property
  def desc_name(self) -> str:
    return f"{self.generation}:{self.grid}"


def _grid(generation: str, chips: int) -> str:
  """The usual chip grid of a slice: ``64 -> 4x4x4`` (3-D), ``16 -> 4x4`` (2-D)."""
  if chips & (chips - 1):
    raise ValueError(f"{generation}: {chips} chips is not a power of two; name the grid "
                     f"directly, e.g. '{generation}:2x2x1'")
  if generation in _TORUS_3D:
    dims = [2, 2, 1] if chips >= 4 else [1, 1, 1]
  else:
    dims = [1, 1]
  while math.prod(dims) < chips:
    low = min(dims)
    dims[max(j for j, d in enumerate(dims) if d == low)] *= 2
  return "x".join(str(d) for d in dims)


def parse_topology(name: str) -> Topology:
  """``"v5p-128"`` / ``"v5e-16"`` / ``"v5p:2x2x1"`` -> :class:`Topology`."""
  gens = "|".join(HBM_GIB)
  m = re.fullmatch(rf"({gens}):(\d+(?:x\d+)+)", name.strip())
  if m:
    gen, grid = m.groups()
    return Topology(name=name, generation=gen, chips=math.prod(map(int, grid.split("x"))),
                    grid=grid)
  m = re.fullmatch(rf"({gens})-(\d+)", name.strip())
  if not m:
    raise ValueError(f"--topology {name!r}: expected GEN-N (v5p-128, v4-32, v5e-16, v6e-16) "
                     f"or GEN:AxBxC, with GEN one of {list(HBM_GIB)}")
  gen, n = m.group(1), int(m.group(2))
  chips = n // 2 if gen in _CORE_NAMED else n
  if chips < 1 or (gen in _CORE_NAMED and n % 2):
    raise ValueError(f"--topology {name!r}: {gen} slice names count TensorCores (2 per chip)")
  return Topology(name=name, generation=gen, chips=chips, grid=_grid(gen, chips))


def topology_devices(topology: Topology) -> list[Any]:
  """The slice's devices from ``get_topology_desc`` (needs ``libtpu``, no TPU)."""
  # Without these, libtpu looks for a TPU VM's metadata and logs errors about it.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topology.generation}-{topology.chips}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # No TPU is opened: several planning processes (tests, benchmarks) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kwargs = {"chip_config_name": "megacore"} if topology.generation == "v4" else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.desc_name,
                                        **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (the plugin's errors vary)
    raise RuntimeError(
        f"cannot describe TPU topology {topology.desc_name!r}: {e}. AOT compilation for TPU "
        "needs the libtpu wheel matching jax: pip install 'moe-jax[tpu]'") from e
  return list(desc.devices)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompiledPlan:
  """Per-device figures of the compiled train step (bytes, FLOPs, seconds)."""

  topology: Topology
  mesh: Mapping[str, int]
  batch_per_device: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  hlo_flops: float
  model_flops: float
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def hbm_fraction(self) -> float:
    return self.total_bytes / self.topology.hbm_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.topology.hbm_bytes

  def format(self) -> str:
    t, g = self.topology, _format_bytes
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    ratio = self.hlo_flops / self.model_flops if self.model_flops else float("nan")
    return "\n".join([
        f"compiled for {t.name} ({t.chips} chips {t.desc_name}, {HBM_GIB[t.generation]:g} GiB "
        f"HBM per chip), mesh {mesh}, {self.batch_per_device:g} rows per batch shard",
        f"per device: arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)} "
        f"(aliased {g(self.alias_bytes)}), temporaries {g(self.temp_bytes)}, "
        f"total {g(self.total_bytes)} = {100 * self.hbm_fraction:.1f}% of HBM",
        f"FLOPs per device and step: HLO {self.hlo_flops / 1e12:.2f} TFLOP, model "
        f"{self.model_flops / 1e12:.2f} TFLOP (HLO / model {ratio:.2f}; XLA counts the body "
        "of a loop -- scanned layers, microbatches -- once)",
        f"compile time: {self.compile_seconds:.1f} s",
    ])

  def overflow_message(self) -> str:
    over = self.total_bytes - self.topology.hbm_bytes
    return (f"the train step does not fit {self.topology.name}: {self.total_bytes / GIB:.2f} "
            f"GiB per device (arguments {self.argument_bytes / GIB:.2f}, temporaries "
            f"{self.temp_bytes / GIB:.2f}) exceeds the {HBM_GIB[self.topology.generation]:g} "
            f"GiB of HBM by {over / GIB:.2f} GiB; try PartitionerConfig.fsdp, a remat_policy, "
            "TrainerConfig.num_microbatches or a smaller batch per device")


def _format_bytes(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def remat_recomputes_forward(config: Any) -> bool:
  """Whether the model's blocks recompute their whole forward pass (``"full"`` remat)."""
  return getattr(config, "remat_policy", "none") == "full"


def compile_train_step(model: Any, *, dataset: Any, topology: Topology | str,
                       trainer: Any = None, optimizer: Any = None, partitioner: Any = None,
                       trainable: Any = None) -> CompiledPlan:
  """Compiles ``run.build_trainer(...)``'s train step for ``topology`` (see the module doc).

  Args:
    model: the model wrapper.
    dataset: the training ``DatasetConfig`` (global batch and feature lengths).
    topology: a :class:`Topology` or its name.
    trainer: the ``TrainerConfig`` (microbatches, frozen dtype, seed).
    optimizer: the ``OptimizerConfig``.
    partitioner: the ``PartitionerConfig`` (its ``-1`` axis takes the slice's chips).
    trainable: as ``train(trainable=...)``.
  """
  from moe_jax.plan import _dummy_batch, _matmul_flops
  from moe_jax.train import run
  from moe_jax.train.partitioner import Partitioner, PartitionerConfig
  from moe_jax.train.trainer import TrainerConfig

  topo = parse_topology(topology) if isinstance(topology, str) else topology
  part = Partitioner(partitioner or PartitionerConfig(), devices=topology_devices(topo))
  tr = run.build_trainer(model, trainer=trainer or TrainerConfig(num_train_steps=1),
                         optimizer=optimizer, partitioner=part, trainable=trainable)
  abstract, row_tokens = _dummy_batch(model, dataset, rows=dataset.batch_size)
  shardings = tr._batch_shardings(abstract)  # pylint: disable=protected-access
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
           for k, v in abstract.items()}
  part.check_batch(batch)
  tr._check_microbatches(batch)  # pylint: disable=protected-access
  step = tr._make_train_step(batch)  # pylint: disable=protected-access
  start = time.perf_counter()
  compiled = step.lower(tr.abstract_state, batch).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  tokens = {k: v * dataset.batch_size for k, v in row_tokens.items()}
  boxed = model.abstract_boxed_params()
  flops = _matmul_flops(model, boxed, tr.optimizer.trainable_mask, tokens)
  if remat_recomputes_forward(model.config):
    flops += _matmul_flops(model, boxed, jax.tree.map(lambda _: False,
                                                      tr.optimizer.trainable_mask), tokens) / 2
  n = part.mesh.size
  return CompiledPlan(
      topology=topo, mesh=dict(part.mesh.shape),
      batch_per_device=dataset.batch_size / part.num_batch_shards,
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      hlo_flops=float((cost or {}).get("flops", 0.0)), model_flops=flops / n,
      compile_seconds=seconds)
