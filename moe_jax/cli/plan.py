"""``python -m moe_jax.plan``: a training run's memory and step-time plan from its gin config.

``python -m moe_jax.plan --gin_file=... [--gin.NAME=VALUE ...] --mesh=data=64
--mesh=data=16,model=4``

Reads the same gin files as ``python -m moe_jax.train``, evaluates the
bindings of ``train`` (model, dataset, optimizer, partitioner, trainable)
and hands them to :func:`moe_jax.plan.plan_run`, which never initialises a
parameter (see :mod:`moe_jax.plan` for what is counted and how).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from moe_jax.plan import Plan, parse_mesh, plan_run
from moe_jax.train.partitioner import PartitionerConfig

#: Macros a run needs at training time but the plan never reads; bound to a
#: placeholder when the command line leaves them unbound.
_RUNTIME_MACROS = ("MODEL_DIR", "INIT_CHECKPOINT")


def plan_from_gin(files: Sequence[str], bindings: Sequence[str] = (), *,
                  meshes: Sequence[PartitionerConfig] = (), num_devices: int | None = None,
                  search_paths: Sequence[str] = (), topology: str | None = None,
                  compile: bool = True,  # pylint: disable=redefined-builtin
                  platform: str | None = None) -> Any:
  """:func:`plan_run` for the objects a ``python -m moe_jax.train`` config builds.

  The bindings of ``train`` (``train.model``, ``train.train_dataset``,
  ``train.trainer``, ``train.optimizer``, ``train.partitioner``,
  ``train.trainable``) are evaluated exactly as the train entry point would
  receive them. ``meshes`` defaults to the config's own partitioner. With a
  ``topology`` (``"v5p-128"``), the trainer's train step is compiled for that
  TPU slice instead (:func:`moe_jax.plan.compiled.compile_train_step`, on the
  first of ``meshes`` or the config's partitioner) and a ``CompiledPlan``
  returned; with ``compile=False``, the eval_shape plan is traced on that
  slice's devices (its platform's attention kernels and dispatch paths).
  ``platform`` picks the kernels of an eval_shape plan without a topology
  (:func:`plan_run`).
  """
  devices = None
  if topology is not None and not compile:
    from moe_jax.plan.compiled import parse_topology, topology_devices

    devices = topology_devices(parse_topology(topology))
    num_devices = len(devices)
  import gin

  from moe_jax.cli import configurables
  from moe_jax.train import run

  configurables.parse_gin(files, bindings, search_paths, finalize=False)
  extra = []
  for macro in _RUNTIME_MACROS:
    try:
      gin.query_parameter(f"{macro}/gin.macro.value")
    except ValueError:
      extra.append(f"{macro} = None")
  configurables.parse_gin(files, extra + list(bindings), search_paths,
                          allow_unused=_RUNTIME_MACROS)
  b = gin.get_bindings(configurables.configured(run.train))
  for name in ("model", "train_dataset"):
    if name not in b:
      raise configurables.GinConfigError(f"the gin config binds no train.{name}; plan a config "
                                         "that python -m moe_jax.train would run")
  base = b.get("partitioner") or PartitionerConfig()
  # A --mesh gives axis sizes; the config's rules and fsdp stay as training would use them.
  meshes = [dataclasses.replace(base, data=m.data, expert=m.expert, model=m.model)
            for m in meshes]
  if topology is not None and compile:
    from moe_jax.plan.compiled import compile_train_step

    return compile_train_step(b["model"], dataset=b["train_dataset"], topology=topology,
                              trainer=b.get("trainer"), optimizer=b.get("optimizer"),
                              partitioner=meshes[0] if meshes else base,
                              trainable=b.get("trainable"))
  return plan_run(b["model"], dataset=b["train_dataset"], optimizer=b.get("optimizer"),
                  partitioners=tuple(meshes) or (base,),
                  num_devices=num_devices, trainable=b.get("trainable"),
                  trainer=b.get("trainer"), devices=devices, platform=platform)


def main(argv: Sequence[str] | None = None) -> int:
  from moe_jax import plan as plan_lib
  from moe_jax.cli import configurables

  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--mesh", action="append", default=[])
  p.add_argument("--num_devices", type=int, default=None)
  p.add_argument("--peak_tflops", type=float, default=275.0)
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("--compile", action="store_true")
  p.add_argument("--topology", default=None)
  p.add_argument("--platform", choices=("tpu", "gpu", "cpu"), default=None)
  own, rest = p.parse_known_args(argv)
  if "-h" in rest or "--help" in rest:
    print(plan_lib.__doc__ + "\nPlan flags: --mesh=data=D,expert=E,model=M (repeatable), "
          "--num_devices=N, --peak_tflops=F (per device, default 275: TPU v4 bf16), "
          "--mfu=F (default 0.4); --compile --topology=v5p-128 (v4-N, v5e-N, v6e-N, "
          "GEN:AxBxC) compiles the trainer's train step for that TPU slice (needs "
          "moe-jax[tpu]); --platform=tpu|gpu|cpu sizes that platform's kernels "
          "(attention, MoE dispatch) without a topology (default: this machine's); gin "
          "flags as python -m moe_jax.train.")
    return 0
  try:
    args = configurables.parse_flags(rest, prog="python -m moe_jax.plan",
                                     description=plan_lib.__doc__)
    meshes = [parse_mesh(m) for m in own.mesh]
    if own.compile and own.topology is None:
      raise ValueError("--compile needs --topology=NAME (the TPU slice to compile for)")
    if own.compile and len(meshes) > 1:
      raise ValueError("--compile compiles one mesh: give at most one --mesh")
    plan = plan_from_gin(args.gin_file, args.bindings, meshes=meshes,
                         num_devices=own.num_devices, search_paths=args.search_paths,
                         topology=own.topology, compile=own.compile,
                         platform=own.platform)
  except (configurables.GinConfigError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if own.compile:
    print(plan.format())
    if not plan.fits:
      print(f"error: {plan.overflow_message()}", file=sys.stderr)
      return 1
    return 0
  print(plan.format(peak_tflops=own.peak_tflops, mfu=own.mfu))
  return 0

