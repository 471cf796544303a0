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
  temporaries. The step's **total** is what the program allocates in HBM:
  the allocations of memory space 0 in XLA's buffer assignment (arguments,
  outputs not aliased, the heap of temporaries: :func:`hbm_allocation_bytes`
  reads them from the compile's dump), the figure the TPU compiler checks
  against the chip's HBM ("total memory required for HLO temporaries" when
  it does not fit). ``arguments + outputs - aliased + temporaries`` is only
  the fallback: on TPU ``temp_size_in_bytes`` exceeds the HBM heap by bytes
  no allocation holds (Llama-3-8B LoRA on v5e-16: 6.09 GiB against a 5.07
  GiB heap, and the step compiles for 6.15 GiB of HBM; README, "Fitting a
  pod");
* HLO FLOPs (``compiled.cost_analysis()``) compared with the model FLOPs
  ``2·N·T`` forward + ``2·N·T`` input gradients + ``2·N_trainable·T`` weight
  gradients (``6·N·T`` when everything trains), plus one more forward
  (``2·N·T``) when the blocks rematerialise everything (``remat_policy="full"``);
  N is the active matmul parameters, T the tokens, divided over the devices.
  XLA's cost analysis counts the body of a while loop once, whatever its trip
  count, so the compiled step's own figure covers one layer of a scanned
  stack and one microbatch. The **per-step HLO FLOPs** (:func:`step_hlo_flops`)
  count every layer and microbatch: the same train step is compiled again,
  for the same slice and mesh, with the layers unrolled (``scan_layers=False``,
  so each layer is in the program once) at 1 layer per stack and at 2 layers
  in one stack at a time, and with the whole global batch in one microbatch
  (the accumulation loop's FLOPs are its microbatches' sum, the optimizer
  update runs once either way), and without windowed einsums (XLA's TPU
  compiler otherwise splits a matmul over an all-gathered FSDP weight into a
  loop over the shards: the same FLOPs, counted once). A stack's FLOPs are affine in its depth,
  ``F(n) = F(1) + (n - 1)·(F(2) - F(1))``, exactly so when its layers are
  identical; a stack whose layers alternate (``moe_layout="every_other"``)
  is measured at 2 and 4 layers (one period and two). Attention kernels
  (Pallas custom calls) count what their cost estimate says, and any loop that
  remains in those small programs (``loops_left``) is still counted once;
* compile time.

Topology names are Cloud TPU's: ``v4-32`` and ``v5p-128`` count TensorCores
(two per chip: 16 and 64 chips), ``v5e-16`` and ``v6e-16`` count chips.
``GEN:AxBxC`` (``v5p:2x2x1``) names the chip grid directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import tempfile
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
  """Per-device figures of the compiled train step (bytes, FLOPs, seconds).

  ``hbm_bytes``: the program's HBM allocations (:func:`hbm_allocation_bytes`;
  ``None``: not read), the step's total; ``temp_bytes``: XLA's
  ``temp_size_in_bytes`` (on TPU more than the heap it allocates: module doc).
  """

  topology: Topology
  mesh: Mapping[str, int]
  batch_per_device: float
  microbatches: int = 1
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  hlo_flops: float
  model_flops: float
  compile_seconds: float
  step_hlo_flops: float | None = None
  loops_left: int = 0
  hbm_bytes: int | None = None
  kernels: Mapping[str, int] = dataclasses.field(default_factory=dict)
  fallback: "CompiledPlan | None" = None

  @property
  def total_bytes(self) -> int:
    """HBM per device: ``hbm_bytes``, else arguments + outputs - aliased + temporaries."""
    if self.hbm_bytes:
      return self.hbm_bytes
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def hbm_fraction(self) -> float:
    return self.total_bytes / self.topology.hbm_bytes

  @property
  def fits(self) -> bool:
    """The step fits the chip's HBM (and so does its dropless fallback program, if any)."""
    return (self.total_bytes <= self.topology.hbm_bytes
            and (self.fallback is None or self.fallback.fits))

  def format(self) -> str:
    t, g = self.topology, _format_bytes
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    if self.step_hlo_flops is None:
      flops = (f"FLOPs per device and step: HLO {_format_flops(self.hlo_flops)} (loop bodies "
               f"counted once), model {_format_flops(self.model_flops)}")
    else:
      ratio = self.step_hlo_flops / self.model_flops if self.model_flops else float("nan")
      left = f"; {self.loops_left} loops left, counted once" if self.loops_left else ""
      flops = (f"FLOPs per device and step: HLO {_format_flops(self.step_hlo_flops)} (every "
               f"layer and microbatch{left}), model {_format_flops(self.model_flops)} (HLO / "
               f"model {ratio:.2f}); the compiled step's own figure, loop bodies counted "
               f"once: {_format_flops(self.hlo_flops)}")
    return "\n".join([
        f"compiled for {t.name} ({t.chips} chips {t.desc_name}, {HBM_GIB[t.generation]:g} GiB "
        f"HBM per chip), mesh {mesh}, {self.batch_per_device:g} rows per batch shard",
        f"per device: arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)} "
        f"(aliased {g(self.alias_bytes)}), temporaries {g(self.temp_bytes)}, total "
        f"{g(self.total_bytes)}{' (HBM allocations)' if self.hbm_bytes else ''} = "
        f"{100 * self.hbm_fraction:.1f}% of HBM",
        flops,
        f"kernels and exchanges: {format_kernels(self.kernels)}",
        f"compile time: {self.compile_seconds:.1f} s",
        *([] if self.fallback is None else [
            f"dropless fallback step (worst-case MoE buffers, {self.fallback.microbatches} "
            f"microbatches): total {g(self.fallback.total_bytes)} = "
            f"{100 * self.fallback.hbm_fraction:.1f}% of HBM, compile time "
            f"{self.fallback.compile_seconds:.1f} s"]),
    ])

  def overflow_message(self) -> str:
    if self.total_bytes <= self.topology.hbm_bytes and self.fallback is not None:
      return ("the dropless fallback step (TrainerConfig.dropless_fallback: worst-case MoE "
              "buffers) does not fit: " + self.fallback.overflow_message().split(": ", 1)[1]
              + "; or raise TrainerConfig.fallback_microbatches")
    over = self.total_bytes - self.topology.hbm_bytes
    return (f"the train step does not fit {self.topology.name}: {self.total_bytes / GIB:.2f} "
            f"GiB per device (arguments {self.argument_bytes / GIB:.2f}, temporaries "
            f"{self.temp_bytes / GIB:.2f}) exceeds the {HBM_GIB[self.topology.generation]:g} "
            f"GiB of HBM by {over / GIB:.2f} GiB; try PartitionerConfig.fsdp, a remat_policy, "
            "TrainerConfig.num_microbatches or a smaller batch per device")


def _format_flops(n: float) -> str:
  return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


def _format_bytes(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def remat_recomputes_forward(config: Any) -> bool:
  """Whether the model's blocks recompute their whole forward pass (``"full"`` remat)."""
  return getattr(config, "remat_policy", "none") == "full"


def _compile(model: Any, *, dataset: Any, devices: list[Any], trainer: Any, optimizer: Any,
             partitioner: Any, trainable: Any, options: Mapping[str, Any] | None = None,
             fallback: bool = False) -> tuple[Any, float, Any]:
  """``(compiled train step, compile seconds, trainer)`` of ``run.build_trainer``'s step.

  ``fallback``: the step ``TrainerConfig.dropless_fallback`` replays an
  overflowing batch with (worst-case MoE buffers, ``fallback_microbatches``).
  """
  from moe_jax.moe.ragged_parallel import worst_case_buffers
  from moe_jax.plan import _dummy_batch
  from moe_jax.train import run
  from moe_jax.train.partitioner import Partitioner, PartitionerConfig

  part = Partitioner(partitioner or PartitionerConfig(), devices=devices)
  tr = run.build_trainer(model, trainer=trainer, optimizer=optimizer, partitioner=part,
                         trainable=trainable)
  abstract, _ = _dummy_batch(model, dataset, rows=dataset.batch_size)
  shardings = tr._batch_shardings(abstract)  # pylint: disable=protected-access
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
           for k, v in abstract.items()}
  part.check_batch(batch)
  # pylint: disable=protected-access
  tr._check_microbatches(batch, *([tr._fallback_microbatches()] if fallback else []))
  step = tr._make_train_step(batch, fallback=fallback)
  start = time.perf_counter()
  with worst_case_buffers() if fallback else contextlib.nullcontext():
    compiled = step.lower(tr.abstract_state, batch).compile(compiler_options=options)
  return compiled, time.perf_counter() - start, tr


#: A Pallas TPU kernel in compiled HLO: ``%splash_mha_fwd.2 = ... custom-call(...),
#: custom_call_target="tpu_custom_call", ... op_name=".../jit(gmm)/pallas_call"``.
_TPU_KERNEL = re.compile(r'^\s*%([A-Za-z_][\w-]*?)(?:\.\d+)* = ([^\n]*'
                         r'custom_call_target="tpu_custom_call"[^\n]*)$', re.M)
_PALLAS_OP = re.compile(r'op_name="[^"]*?([\w.]+)\)*/pallas_call"')
#: The token exchanges of expert parallelism.
_EXCHANGES = {"ragged-all-to-all": re.compile(r"\sragged-all-to-all\("),
              "all-to-all": re.compile(r"\s(?<!ragged-)all-to-all\(")}


def kernels_used(hlo_text: str) -> dict[str, int]:
  """Pallas kernels (splash / flash attention, megablox ``gmm`` / ``tgmm``) and
  all-to-all exchanges in a compiled program's HLO text, with their counts.

  A kernel is named by the function that made its ``pallas_call`` (megablox's
  ``jit(gmm)``, ``jvp(jit(gmm))``), else by its instruction (splash names its calls).
  """
  counts: dict[str, int] = {}
  for name, rest in _TPU_KERNEL.findall(hlo_text):
    op = _PALLAS_OP.search(rest)
    name = op.group(1) if op else name
    counts[name] = counts.get(name, 0) + 1
  for name, pattern in _EXCHANGES.items():
    if n := len(pattern.findall(hlo_text)):
      counts[name] = n
  return counts


def format_kernels(kernels: Mapping[str, int]) -> str:
  """``gmm x6, splash_mha_fwd x1, ...``, or a word when XLA's own ops do everything."""
  if not kernels:
    return "none (XLA's own ops: no Pallas kernel, no all-to-all)"
  return ", ".join(f"{k} x{v}" for k, v in sorted(kernels.items()))


#: An allocation line of XLA's buffer-assignment dump: ``allocation 7: size 65536, color 1, ...``.
_ALLOCATION = re.compile(r"^allocation \d+: size (\d+)(.*)$", re.M)


def hbm_allocation_bytes(dump_dir: str) -> int | None:
  """Bytes of a compiled program's allocations in memory space 0 (HBM on TPU).

  Read from the ``*after_optimizations-buffer-assignment.txt`` that XLA dumps
  (``xla_dump_to``): every allocation without a ``color`` (parameters, outputs
  not aliased, constants, the heap of temporaries), none of another memory
  space (on-chip VMEM / CMEM, SMEM, host). With several device programs in the
  dump, the largest. ``None`` when the dump has none.
  """
  totals = []
  for path in glob.glob(os.path.join(dump_dir, "*after_optimizations-buffer-assignment.txt")):
    if ".cpu_after_optimizations" in os.path.basename(path):
      continue  # host-side helper programs (seeding), compiled for the CPU
    with open(path, encoding="utf-8") as f:
      text = f.read()
    totals.append(sum(int(size) for size, rest in _ALLOCATION.findall(text)
                      if not re.search(r"\bcolor [1-9]", rest)))
  return max(totals, default=None)


def _hlo_flops(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _while_loops(compiled: Any) -> int:
  """While loops in the compiled program (each counted once by the cost analysis)."""
  return len(re.findall(r"\swhile\(", compiled.as_text()))


#: XLA's TPU compiler splits a matmul whose operand is all-gathered (FSDP) or whose
#: result is reduce-scattered into a loop over the shards (a "windowed einsum",
#: overlapping the collective with the matmul: the same FLOPs, counted once per
#: loop); for counting FLOPs the matmul is compiled whole.
_WHOLE_COLLECTIVE_MATMULS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                              "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def layer_counts(config: Any) -> dict[str, int]:
  """``{config field: layers}`` of each stack (``num_decoder_layers=None`` resolved)."""
  counts = {}
  if isinstance(getattr(config, "num_layers", None), int):
    counts["num_layers"] = config.num_layers
  if dataclasses.is_dataclass(config) and "num_decoder_layers" in {
      f.name for f in dataclasses.fields(config)}:
    counts["num_decoder_layers"] = config.num_decoder_layers or config.num_layers
  return counts


def _layer_period(config: Any) -> int | None:
  """Layers per repeating unit of a stack (``None``: the layers follow no period)."""
  layout = getattr(config, "moe_layout", "every")
  return {"every": 1, "every_other": 2}.get(layout) if isinstance(layout, str) else None


def _with_layers(model: Any, counts: Mapping[str, int]) -> Any:
  """A copy of the model wrapper with ``counts`` layers per stack, unrolled."""
  import copy

  config = dataclasses.replace(model.config, scan_layers=False, **counts)
  if getattr(model.module, "config", None) != model.config:
    raise ValueError(f"{type(model.module).__name__} does not hold the wrapper's config")
  new = copy.copy(model)
  new.config, new.module = config, model.module.clone(config=config)
  return new


def step_hlo_flops(model: Any, *, dataset: Any, devices: list[Any], trainer: Any,
                   optimizer: Any, partitioner: Any, trainable: Any
                   ) -> tuple[float | None, int]:
  """HLO FLOPs of one train step counting every layer and microbatch (module doc).

  Returns ``(FLOPs per device, while loops left in the small programs)``;
  ``(None, 0)`` when the stacks' layers follow no period (a tuple
  ``moe_layout``), the config has no ``scan_layers`` switch, or the module
  is not built from the wrapper's config alone.
  """
  config = model.config
  counts, period = layer_counts(config), _layer_period(config)
  if (period is None or not dataclasses.is_dataclass(config)
      or not hasattr(config, "scan_layers") or getattr(model.module, "config", None) != config
      or any(n % period for n in counts.values())):
    return None, 0
  one = dataclasses.replace(trainer, num_microbatches=1)
  kw = dict(dataset=dataset, devices=devices, trainer=one, optimizer=optimizer,
            partitioner=partitioner, trainable=trainable)

  def flops(c):
    compiled, _, _ = _compile(_with_layers(model, c), options=_WHOLE_COLLECTIVE_MATMULS, **kw)
    return _hlo_flops(compiled), _while_loops(compiled)

  base_counts = {k: period for k in counts}
  base, loops = flops(base_counts)
  total = base
  for k, n in counts.items():
    if n > period:
      more, _ = flops({**base_counts, k: 2 * period})
      total += (n // period - 1) * (more - base)
  return total, loops


def compile_train_step(model: Any, *, dataset: Any, topology: Topology | str,
                       trainer: Any = None, optimizer: Any = None, partitioner: Any = None,
                       trainable: Any = None, count_steps: bool = True) -> CompiledPlan:
  """Compiles ``run.build_trainer(...)``'s train step for ``topology`` (see the module doc).

  Args:
    model: the model wrapper.
    dataset: the training ``DatasetConfig`` (global batch and feature lengths).
    topology: a :class:`Topology` or its name.
    trainer: the ``TrainerConfig`` (microbatches, frozen dtype, seed).
    optimizer: the ``OptimizerConfig``.
    partitioner: the ``PartitionerConfig`` (its ``-1`` axis takes the slice's chips).
    trainable: as ``train(trainable=...)``.
    count_steps: also compute :func:`step_hlo_flops` (small extra compiles)
      when the step has loops (scanned layers, microbatches).
  """
  from moe_jax.plan import _dummy_batch, _matmul_flops
  from moe_jax.train.trainer import TrainerConfig

  topo = parse_topology(topology) if isinstance(topology, str) else topology
  devices = topology_devices(topo)
  trainer = trainer or TrainerConfig(num_train_steps=1)
  kw = dict(dataset=dataset, devices=devices, trainer=trainer, optimizer=optimizer,
            partitioner=partitioner, trainable=trainable)
  compiled, seconds, tr, hbm = _compile_with_hbm(model, kw)
  fallback = None
  if trainer.dropless_fallback and _has_ragged_buffer(model.config):
    # The replay of an overflowing step (worst-case buffers) must fit as well.
    fb = _compile_with_hbm(model, kw, fallback=True)
    n = tr._fallback_microbatches()  # pylint: disable=protected-access
    fallback = _program_plan(*fb, topo=topo, dataset=dataset, model_flops=0.0, microbatches=n)
  hlo = _hlo_flops(compiled)
  step_flops, loops = hlo, 0
  if count_steps and (getattr(model.config, "scan_layers", False)
                      or trainer.num_microbatches > 1):
    step_flops, loops = step_hlo_flops(model, **kw)
  _, row_tokens = _dummy_batch(model, dataset)
  tokens = {k: v * dataset.batch_size for k, v in row_tokens.items()}
  boxed = model.abstract_boxed_params()
  flops = _matmul_flops(model, boxed, tr.optimizer.trainable_mask, tokens)
  if remat_recomputes_forward(model.config):
    flops += _matmul_flops(model, boxed, jax.tree.map(lambda _: False,
                                                      tr.optimizer.trainable_mask), tokens) / 2
  return _program_plan(compiled, seconds, tr, hbm, topo=topo, dataset=dataset,
                       model_flops=flops / tr.partitioner.mesh.size, step_hlo_flops=step_flops,
                       loops_left=loops, microbatches=trainer.num_microbatches,
                       fallback=fallback)


def _program_plan(compiled: Any, seconds: float, tr: Any, hbm: int | None, *, topo: Topology,
                  dataset: Any, **figures: Any) -> CompiledPlan:
  """A compiled program's per-device figures (memory, HLO FLOPs, kernels) and ``figures``."""
  mem, part = compiled.memory_analysis(), tr.partitioner
  return CompiledPlan(
      topology=topo, mesh=dict(part.mesh.shape),
      batch_per_device=dataset.batch_size / part.num_batch_shards,
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      hlo_flops=_hlo_flops(compiled), compile_seconds=seconds, hbm_bytes=hbm,
      kernels=kernels_used(compiled.as_text()), **figures)


def _compile_with_hbm(model: Any, kw: Mapping[str, Any], fallback: bool = False):
  """``_compile`` with XLA's dump read for the program's HBM allocations."""
  with tempfile.TemporaryDirectory(prefix="moe_jax_plan_") as dump:
    compiled, seconds, tr = _compile(model, options={"xla_dump_to": dump}, fallback=fallback,
                                     **kw)
    return compiled, seconds, tr, hbm_allocation_bytes(dump)


def _has_ragged_buffer(config: Any) -> bool:
  """A bounded ragged receive buffer (``MoeConfig.ragged_buffer_factor``): it can overflow."""
  moe = getattr(config, "moe", None)
  return getattr(moe, "ragged_buffer_factor", None) is not None
