"""Memory and step-time plan of a training run, computed from its gin config without allocating.

``python -m moe_jax.plan --gin_file=... [--gin.NAME=VALUE ...] --mesh=data=64 --mesh=data=16,model=4``

Reads the same gin files as ``python -m moe_jax.train`` and builds the same
objects (model wrapper, optimizer, partitioner rules, dataset) but never
initialises a parameter: shapes come from ``jax.eval_shape`` of the model's
``init``, optimizer-state shapes from ``jax.eval_shape`` of the optimizer's
``init``, and activations from tracing (not running) the gradient of the
loss. For each mesh it prints, per device:

* **params**: every parameter's bytes divided by the mesh axes its logical
  axes map to (the trainer's own ``Partitioner.param_specs``; a dimension the
  mesh does not divide is the same error training would give);
* **optimizer**: the optimizer state (AdamW moments, Adafactor's factored
  statistics; frozen parameters have none), sharded like the trainer shards it;
* **grads**: gradients of the trainable parameters, sharded like them;
* **activations**: the most bytes the train step's intermediates hold at
  once, for this device's share of the global batch (``batch`` splits over
  the ``data`` and ``expert`` axes): a liveness walk (:mod:`.liveness`) over
  the traced gradient computation, forward then backward, so remat policies,
  scanned layers, microbatches and the dispatch / attention path that runs on
  the mesh are what is sized. An array with a dimension of a
  ``model``-sharded size (heads, FFN, vocab: the sizes of logical axes the
  rules map to ``model``, other than ``d_model``) is divided by the ``model``
  axis -- an estimate of what GSPMD does with the modules' logical
  constraints, not a measurement. Arrays with a parameter's shape (the
  parameter cast to the compute dtype, a gradient) are sharded like it but
  gathered over ``data``, as FSDP gathers a weight for the matmul that reads
  it; a weight the step reads as it is (frozen, already in the compute dtype)
  holds that gathered copy from its first use to its last;
* **step time**: matmul FLOPs per device divided by ``--peak_tflops`` x
  ``--mfu``. FLOPs are ``2·N·T`` forward, ``2·N·T`` for input gradients and
  ``2·N_trainable·T`` for weight gradients, with N the *active* matmul
  parameters (routed experts count ``k / E`` of their size; embedding lookups
  count nothing, a tied head counts once) and T the tokens each stack sees.
  Attention-score FLOPs (``~ L^2``) are left out.

Parameter counts (total, active, trainable) are printed once. A mesh is
``data=D,expert=E,model=M`` (missing axes are 1, one axis may be -1 with
``--num_devices``); without ``--mesh`` the config's own ``PartitionerConfig``
is planned for ``--num_devices``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from moe_jax.train.partitioner import Partitioner, PartitionerConfig
from moe_jax.train.partitioning import MESH_AXES, mesh_axes_size, mesh_axis_for, validate_rules

GIB = 1024 ** 3



# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParameterCounts:
  """Parameter counts of a model.

  Attributes:
    total: every parameter.
    active: parameters a token uses: routed-expert parameters count ``k / E``
      of their size (``k`` = ``config.moe.num_selected``); soft-merged adapters
      (MoV, MoLoRA without top-k) are all active.
    trainable: parameters the optimizer updates (the trainable mask).
    expert: parameters with an ``expert`` logical axis.
  """

  total: int
  active: int
  trainable: int
  expert: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshPlan:
  """Per-device memory and time of one mesh (bytes, FLOPs, seconds).

  Attributes:
    mesh: axis sizes ``{"data", "expert", "model"}``.
    batch_per_device: rows of the global batch each batch shard holds.
    param_bytes, opt_bytes, grad_bytes, activation_bytes: per device.
    flops_per_device: matmul FLOPs of one train step on one device.
  """

  mesh: Mapping[str, int]
  batch_per_device: float
  param_bytes: int
  opt_bytes: int
  grad_bytes: int
  activation_bytes: int
  flops_per_device: float

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def total_bytes(self) -> int:
    return self.param_bytes + self.opt_bytes + self.grad_bytes + self.activation_bytes

  def step_seconds(self, peak_tflops: float, mfu: float) -> float:
    return self.flops_per_device / (peak_tflops * 1e12 * mfu)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """What :func:`plan_run` computed.

  Attributes:
    model: a short description (config class and sizes).
    counts: parameter counts.
    tokens: tokens per global batch ``{"encoder": ..., "decoder": ...}``.
    meshes: one :class:`MeshPlan` per mesh.
  """

  model: str
  counts: ParameterCounts
  tokens: Mapping[str, int]
  meshes: tuple[MeshPlan, ...]

  def format(self, *, peak_tflops: float = 275.0, mfu: float = 0.4) -> str:
    """A readable report: the counts, then one table row per mesh (GiB per device)."""
    c = self.counts
    tok = ", ".join(f"{k} {v:,}" for k, v in self.tokens.items() if v)
    lines = [
        f"model: {self.model}",
        f"parameters: total {_billions(c.total)}, active per token {_billions(c.active)}, "
        f"trainable {_billions(c.trainable)} ({100.0 * c.trainable / max(c.total, 1):.3g}%), "
        f"in routed experts {_billions(c.expert)}",
        f"tokens per step: {tok}",
        "",
        f"| mesh (data x expert x model) | devices | batch/device | params GiB | "
        f"optimizer GiB | grads GiB | activations GiB | total GiB | TFLOP/device | "
        f"step s @{mfu:.0%} of {peak_tflops:g} TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in self.meshes:
      shape = " x ".join(str(m.mesh[a]) for a in MESH_AXES)
      lines.append(
          f"| {shape} | {m.num_devices} | {m.batch_per_device:g} | {m.param_bytes / GIB:.2f} | "
          f"{m.opt_bytes / GIB:.2f} | {m.grad_bytes / GIB:.2f} | "
          f"{m.activation_bytes / GIB:.2f} | {m.total_bytes / GIB:.2f} | "
          f"{m.flops_per_device / 1e12:.1f} | {m.step_seconds(peak_tflops, mfu):.2f} |")
    return "\n".join(lines)


def _billions(n: int) -> str:
  return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


# ----------------------------------------------------------------------------- partitioning


class AbstractPartitioner(Partitioner):
  """The trainer's :class:`Partitioner` over an abstract mesh: specs, no devices.

  ``param_specs`` / ``derived_specs`` / ``spec_for`` are the trainer's own, so
  the plan shards (and refuses to shard) exactly as training would, for a
  mesh of any size on any machine.
  """

  def __init__(self, config: PartitionerConfig, num_devices: int | None = None):
    # pylint: disable=super-init-not-called  (a real Partitioner needs the devices)
    self.config = config
    sizes = dict(data=config.data, expert=config.expert, model=config.model)
    if -1 in sizes.values():
      if num_devices is None:
        raise ValueError(f"mesh {sizes} has an axis of -1 (all devices left over); give "
                         "--num_devices or a mesh without -1")
      sizes = config.mesh_shape(num_devices)
    self.mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    self.rules = config.all_rules()
    validate_rules(self.rules, self.mesh)

  @property
  def mesh_shape(self) -> dict[str, int]:
    return dict(self.mesh.shape)


def _spec_shards(partitioner: Partitioner, spec: PartitionSpec) -> int:
  return math.prod(mesh_axes_size(partitioner.mesh, axes) for axes in tuple(spec))


def _nbytes(x: Any) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def sharded_bytes(partitioner: Partitioner, tree: Any, specs: Any) -> int:
  """Bytes of ``tree`` (shape leaves) on one device when laid out by ``specs``."""
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  if len(leaves) != len(spec_leaves):
    raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} partition specs")
  return sum(_nbytes(x) // _spec_shards(partitioner, s) for x, s in zip(leaves, spec_leaves))


# ----------------------------------------------------------------------------- counting


def _logical_leaves(boxed: Any) -> list[tuple[str, tuple, Any]]:
  """``(path, logical axes, shape leaf)`` for every parameter."""
  logical = nn.get_partition_spec(boxed)
  shapes = nn.meta.unbox(boxed)
  flat = jax.tree_util.tree_flatten_with_path(
      logical, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  return [(jax.tree_util.keystr(path, simple=True, separator="/"),
           tuple(spec) if isinstance(spec, PartitionSpec) else (), leaf)
          for (path, spec), leaf in zip(flat, jax.tree.leaves(shapes))]


def _top_k_share(config: Any) -> float:
  moe = getattr(config, "moe", None)
  k, e = getattr(moe, "num_selected", None), getattr(moe, "num_experts", None)
  return 1.0 if not k or not e else min(k, e) / e


def parameter_counts(model: Any, trainable_mask: Any = None, *, boxed: Any = None
                     ) -> ParameterCounts:
  """Total, active, trainable and routed-expert parameter counts of a model wrapper.

  Args:
    model: a :class:`~moe_jax.train.wrappers.BaseModel` (nothing is initialised).
    trainable_mask: bool pytree with the parameters' structure (``None``: all).
    boxed: ``model.abstract_boxed_params()`` if already computed.
  """
  boxed = model.abstract_boxed_params() if boxed is None else boxed
  leaves = _logical_leaves(boxed)
  mask = ([True] * len(leaves) if trainable_mask is None
          else [bool(m) for m in jax.tree.leaves(trainable_mask)])
  share = _top_k_share(model.config)
  total = active = trainable = expert = 0.0
  for (_, axes, leaf), m in zip(leaves, mask):
    n = int(np.prod(leaf.shape, dtype=np.int64))
    total += n
    trainable += n if m else 0
    if "expert" in axes:
      expert += n
      active += n * share
    else:
      active += n
  return ParameterCounts(total=int(total), active=int(round(active)), trainable=int(trainable),
                         expert=int(expert))


def _matmul_flops(model: Any, boxed: Any, mask: Any, tokens: Mapping[str, int]) -> float:
  """``2·N·T + 2·N·T + 2·N_trainable·T`` over the active matmul parameters (see module doc)."""
  leaves = _logical_leaves(boxed)
  flags = [bool(m) for m in jax.tree.leaves(mask)]
  share = _top_k_share(model.config)
  has_head = any(axes and axes[-1] == "vocab" and axes[0] != "vocab" for _, axes, _ in leaves)
  fwd = train = 0.0
  for (path, axes, leaf), trainable in zip(leaves, flags):
    if len(axes) < 2 or axes[0] == "relpos_buckets":
      continue  # norms, biases, relative-position tables: no matmul
    if axes[0] == "vocab" and has_head:
      continue  # an embedding lookup; the untied head is counted separately
    n = float(np.prod(leaf.shape)) * (share if "expert" in axes else 1.0)
    t = tokens["encoder"] if path.startswith("encoder/") else tokens["decoder"]
    fwd += 2 * n * t
    train += 2 * n * t if trainable else 0.0
  return 2 * fwd + train


# ----------------------------------------------------------------------------- activations


def _dummy_batch(model: Any, dataset: Any, rows: int = 1) -> tuple[dict, dict[str, int]]:
  """Abstract seqio features of ``rows`` rows, and the per-row lengths per stack."""
  lengths = dict(dataset.task_feature_lengths)
  converter = dataset.feature_converter or model.FEATURE_CONVERTER
  targets = int(lengths["targets"])
  ints = lambda n: jax.ShapeDtypeStruct((rows, n), jnp.int32)
  if converter == "enc_dec":
    enc = int(lengths["inputs"])
    batch = {"encoder_input_tokens": ints(enc), "decoder_input_tokens": ints(targets),
             "decoder_target_tokens": ints(targets), "decoder_loss_weights": ints(targets)}
    if dataset.pack:
      batch |= {"encoder_segment_ids": ints(enc), "encoder_positions": ints(enc),
                "decoder_segment_ids": ints(targets), "decoder_positions": ints(targets)}
    return batch, {"encoder": enc, "decoder": targets}
  length = targets + (int(lengths.get("inputs", 0)) if converter == "prefix_lm" else 0)
  batch = {"decoder_input_tokens": ints(length), "decoder_target_tokens": ints(length),
           "decoder_loss_weights": ints(length)}
  if dataset.pack:
    batch |= {"decoder_segment_ids": ints(length), "decoder_positions": ints(length)}
  return batch, {"encoder": 0, "decoder": length}


def residuals(model: Any, params: Any, mask: Any, batch: Mapping[str, Any]) -> list[Any]:
  """Abstract arrays the backward pass keeps for one ``batch`` (traced, never run).

  ``jax.vjp`` of the loss with respect to the *trainable* parameters (frozen
  ones are closed over, as the trainer's masked optimizer makes them): the
  VJP function's residuals are the activations saved for the backward pass.
  Residuals that are the inputs themselves (parameters, batch) are left out.
  """
  flat, treedef = jax.tree.flatten(params)
  flags = [bool(m) for m in jax.tree.leaves(mask)]

  def vjp_fn(trainable, frozen, b):
    def loss(t):
      it_t, it_f = iter(t), iter(frozen)
      merged = [next(it_t) if f else next(it_f) for f in flags]
      return model.loss_fn(jax.tree.unflatten(treedef, merged), b)[0]
    return jax.vjp(loss, trainable)[1]  # a jax.tree_util.Partial: its leaves are residuals

  trainable = [x for x, f in zip(flat, flags) if f]
  frozen = [x for x, f in zip(flat, flags) if not f]
  closed = jax.make_jaxpr(vjp_fn)(trainable, frozen, dict(batch))
  return _residual_avals(closed)


def _residual_avals(closed: Any) -> list[Any]:
  """Avals of a closed jaxpr's outputs that are not its inputs (a VJP closure's residuals)."""
  inputs = set(closed.jaxpr.invars)
  seen, out = set(), []
  for v in closed.jaxpr.outvars:
    if not hasattr(v, "aval") or type(v).__name__ == "Literal" or v in inputs or v in seen:
      continue
    seen.add(v)
    out.append(v.aval)
  return out


def _model_axis_sizes(partitioner: Partitioner, boxed: Any) -> set[int]:
  """Dimension sizes of the logical axes the rules map to ``model`` (heads, mlp, vocab).

  Activations follow the parameters' logical names, so a residual with a
  dimension of one of these sizes is taken to be split over the ``model``
  axis. The ``embed`` size (``[B, L, D]`` activations stay replicated over
  ``model``) is never one of them.
  """
  sharded, embed = set(), set()
  for _, axes, leaf in _logical_leaves(boxed):
    for name, size in zip(axes, leaf.shape):
      mesh_axes = mesh_axis_for(name, partitioner.rules) if name else None
      names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
      if "model" in names:
        sharded.add(int(size))
      if name == "embed":
        embed.add(int(size))
  return sharded - embed


# ----------------------------------------------------------------------------- planning


def plan_run(model: Any, *, dataset: Any, optimizer: Any = None,
             partitioners: Sequence[PartitionerConfig] = (PartitionerConfig(data=1),),
             num_devices: int | None = None, trainable: Any = None,
             trainer: Any = None, devices: Sequence[Any] | None = None,
             platform: str | None = None) -> Plan:
  """Plans a training run for each mesh; nothing is allocated.

  Args:
    model: the model wrapper (``train.model`` of a gin config).
    dataset: the training :class:`~moe_jax.train.trainer.DatasetConfig`
      (global batch size and feature lengths).
    optimizer: an :class:`~moe_jax.train.optimizers.OptimizerConfig`
      (default Adafactor, as :func:`moe_jax.train.run.train`).
    partitioners: one ``PartitionerConfig`` per mesh to plan.
    num_devices: devices for meshes with a ``-1`` axis.
    trainable: as ``train(trainable=...)``: regexes, a mask, or a callable.
    trainer: the run's :class:`~moe_jax.train.trainer.TrainerConfig`
      (``num_microbatches``: activations of one microbatch, plus a float32
      gradient accumulator; ``frozen_param_dtype``: frozen parameters' bytes).
    devices: the devices the run will use (e.g. a TPU slice's, from
      :func:`moe_jax.plan.compiled.topology_devices`): activations are then
      traced on their mesh, so platform-dependent paths (attention kernels on
      TPU / GPU) are the ones that will run. Default: an abstract mesh.
    platform: ``"tpu"`` / ``"gpu"`` / ``"cpu"``: the kernels (attention
      implementation, MoE dispatch kernel and exchange) are chosen for it, by
      the function the trainer's modules call (``attention_kernels.building_for``).
      Default: the platform of ``devices``, else this machine's backend.

  Raises:
    ValueError: a mesh that does not divide a parameter or the batch (named).
  """
  from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
  from moe_jax.train.trainer import cast_frozen

  micro = getattr(trainer, "num_microbatches", 1)
  boxed = model.abstract_boxed_params()
  opt = make_optimizer(optimizer or OptimizerConfig(), nn.meta.unbox(boxed), trainable=trainable)
  mask = opt.trainable_mask
  abstract = cast_frozen(nn.meta.unbox(boxed), mask, getattr(trainer, "frozen_param_dtype", None))
  abstract_opt = jax.eval_shape(opt.tx.init, abstract)
  counts = parameter_counts(model, mask, boxed=boxed)
  _, row_tokens = _dummy_batch(model, dataset)
  tokens = {k: v * dataset.batch_size for k, v in row_tokens.items()}
  flops = _matmul_flops(model, boxed, mask, tokens)
  trainable_params = jax.tree.map(lambda x, m: x if m else None, abstract, mask)

  meshes = []
  for config in partitioners:
    part = (AbstractPartitioner(config, num_devices) if devices is None
            else Partitioner(config, devices=devices))
    specs = part.param_specs(boxed)
    opt_specs = part.derived_specs(abstract_opt, abstract, specs)
    grad_specs = jax.tree.map(lambda s, m: s if m else None, specs, mask,
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
    shards = mesh_axes_size(part.mesh, mesh_axis_for("batch", part.rules))
    if dataset.batch_size % (shards * micro):
      raise ValueError(f"mesh {dict(part.mesh.shape)}: global batch size {dataset.batch_size} "
                       f"is not divisible by the {shards} batch shards x {micro} microbatches")
    rows = dataset.batch_size / shards
    grad_bytes = sharded_bytes(part, trainable_params, grad_specs)
    meshes.append(MeshPlan(
        mesh=dict(part.mesh.shape), batch_per_device=rows,
        param_bytes=sharded_bytes(part, abstract, specs),
        opt_bytes=sharded_bytes(part, abstract_opt, opt_specs),
        grad_bytes=grad_bytes * (2 if micro > 1 else 1),  # the accumulator and one microbatch's
        activation_bytes=mesh_activation_bytes(part, model, abstract, mask, boxed, specs,
                                               dataset, rows / micro, platform=platform),
        flops_per_device=flops / part.mesh.size))
  return Plan(model=_describe(model.config), counts=counts, tokens=tokens, meshes=tuple(meshes))


def mesh_activation_bytes(part: "AbstractPartitioner", model: Any, abstract: Any, mask: Any,
                          boxed: Any, specs: Any, dataset: Any, rows: float, *,
                          platform: str | None = None) -> int:
  """Peak bytes per device of a train step's intermediates, ``rows`` rows per batch shard.

  The gradient of the loss (with respect to the trainable parameters, the
  frozen ones closed over as the trainer's masked optimizer makes them) is
  traced with one row per batch shard under the mesh and the rules, so layers
  that switch path on a mesh (expert-parallel dispatch, attention kernels on
  the slice's platform) are sized as they will run; :mod:`.liveness` walks it
  for the most bytes alive at once (the gradients themselves are not
  counted: the plan's ``grads``). Sizes per device: :func:`_size_per_device`.
  """
  from moe_jax.nn.attention_kernels import building_for
  from moe_jax.plan.liveness import peak_bytes

  shards = part.num_batch_shards
  batch, _ = _dummy_batch(model, dataset, rows=shards)
  if isinstance(part, AbstractPartitioner):
    context = jax.sharding.use_abstract_mesh(part.mesh)
  else:
    context = jax.set_mesh(part.mesh)
    platform = platform or part.mesh.devices.flat[0].platform  # the kernels of its devices
  chosen = building_for(platform) if platform else contextlib.nullcontext()
  with context, chosen, nn.logical_axis_rules(part.rules):
    closed = _grad_jaxpr(model, abstract, mask, batch)
  size_of, gathered_of = _size_per_device(part, boxed, specs, rows / shards)
  return int(peak_bytes(closed, size_of, skip_outputs=True, gathered_of=gathered_of))


def _grad_jaxpr(model: Any, params: Any, mask: Any, batch: Mapping[str, Any]) -> Any:
  """The jaxpr of the loss's gradient with respect to the trainable parameters."""
  flat, treedef = jax.tree.flatten(params)
  flags = [bool(m) for m in jax.tree.leaves(mask)]

  def grad_fn(trainable, frozen, b):
    def loss(t):
      it_t, it_f = iter(t), iter(frozen)
      merged = [next(it_t) if f else next(it_f) for f in flags]
      return model.loss_fn(jax.tree.unflatten(treedef, merged), b)[0]
    return jax.grad(loss)(trainable)

  trainable = [x for x, f in zip(flat, flags) if f]
  frozen = [x for x, f in zip(flat, flags) if not f]
  return jax.make_jaxpr(grad_fn)(trainable, frozen, dict(batch))


def _size_per_device(part: Partitioner, boxed: Any, specs: Any, factor: float):
  """``size_of(aval, local)`` and ``gathered_of(aval, local)`` for :func:`.liveness.peak_bytes`.

  A parameter-shaped array (a weight cast to the compute dtype, a gradient) is
  counted gathered over ``data``: FSDP all-gathers a weight for the matmul that
  reads it (one layer's slice of a scanned parameter as that layer runs; an
  unscanned weight -- embedding, head -- whole), and a weight's gradient is
  whole until it is reduce-scattered. ``gathered_of`` gives those gathered
  bytes for a weight the program reads as it is (a frozen bfloat16 kernel: an
  input, which ``size_of`` never sees); 0 for anything else. Any
  other array grows with the rows: ``factor`` is the traced row's share of the
  rows per device (global shapes), and it is split over ``model`` when a
  dimension has a model-sharded size (:func:`_model_axis_sizes`). Inside a
  ``shard_map`` (``local``) shapes are per device already, of one row.
  """
  sizes = dict(part.mesh.shape)
  global_div: dict[tuple, int] = {}
  gathered_div: dict[tuple, int] = {}
  local_weights: set[tuple] = set()
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

  def axes_of(entry):
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))

  for (_, axes, leaf), spec in zip(_logical_leaves(boxed), spec_leaves):
    dims = [axes_of(e) for e in tuple(spec)] + [()] * (len(leaf.shape) - len(tuple(spec)))
    shape = tuple(int(d) for d in leaf.shape)
    if axes[:1] == ("layers",):
      variants = [(shape, dims), (shape[1:], [tuple(a for a in d if a != "data")
                                              for d in dims[1:]])]
    else:
      variants = [(shape, dims), (shape, [tuple(a for a in d if a != "data") for d in dims])]
    gathered_div[variants[-1][0]] = math.prod(sizes[a] for d in variants[-1][1] for a in d)
    for shp, dd in variants:
      div = math.prod(sizes[a] for d in dd for a in d)
      global_div[shp] = min(global_div.get(shp, sys.maxsize), div)
      for keep in (dd, [tuple(a for a in d if a != "data") for d in dd]):
        local_weights.add(tuple(n // math.prod(sizes[a] for a in d) for n, d in zip(shp, keep)))
  m = int(sizes["model"])
  split_sizes = _model_axis_sizes(part, boxed) if m > 1 else set()
  rows_per_shard = factor * part.num_batch_shards

  def size_of(aval: Any, local: bool) -> float:
    shape = tuple(getattr(aval, "shape", ()))
    if not hasattr(aval, "dtype") or not shape:
      return 0.0
    n = _nbytes(aval)
    if local:
      return n if shape in local_weights else n * rows_per_shard
    if shape in global_div:
      return n / global_div[shape]
    split = any(d in split_sizes and d % m == 0 for d in shape)
    return n * factor / (m if split else 1)

  def gathered_of(aval: Any, local: bool) -> float:
    shape = tuple(getattr(aval, "shape", ()))
    if local or shape not in gathered_div or not hasattr(aval, "dtype"):
      return 0.0
    return _nbytes(aval) / gathered_div[shape]

  return size_of, gathered_of


def _describe(config: Any) -> str:
  fields = ("d_model", "num_layers", "num_decoder_layers", "num_heads", "num_kv_heads", "d_ff",
            "vocab_size", "param_dtype", "dtype")
  parts = [f"{f}={getattr(config, f)}" for f in fields if hasattr(config, f)]
  moe = getattr(config, "moe", None)
  if moe is not None:
    parts.append(f"experts={moe.num_experts} top-{moe.num_selected}")
  return f"{type(config).__name__}({', '.join(parts)})"


def parse_mesh(text: str) -> PartitionerConfig:
  """``"data=16,expert=8,model=2"`` -> ``PartitionerConfig`` (missing axes are 1)."""
  sizes = {}
  for item in text.split(","):
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                       f"{list(MESH_AXES)}")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh {text!r}: size of {name!r} is not an integer") from None
  return PartitionerConfig(**{a: sizes.get(a, 1) for a in MESH_AXES})

