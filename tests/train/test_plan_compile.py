"""AOT compilation for TPU slices on CPU: the trainer's train step compiled for v5p:2x2x1.

Needs the libtpu wheel (``pip install 'moe-jax[tpu]'``, part of the test extra);
no TPU is used. The figures are XLA's TPU compiler's, checked against the
eval_shape plan so that neither rots.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from moe_jax import plan
from moe_jax.cli import plan as plan_cli
from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoderConfig
from moe_jax.moe.layer import MoeConfig
from moe_jax.plan import compiled as compiled_lib
from moe_jax.train.optimizers import OptimizerConfig
from moe_jax.train.partitioner import PartitionerConfig
from moe_jax.train.trainer import DatasetConfig, TrainerConfig
from moe_jax.train.wrappers import DecoderOnlyModel

pytest.importorskip("libtpu", reason="AOT compilation for TPU needs moe-jax[tpu]")

ROOT = Path(__file__).resolve().parents[2]
MOE = MoeDecoderConfig(vocab_size=512, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       d_ff=512, moe=MoeConfig(num_experts=4, num_selected=2),
                       dtype="bfloat16", attention_impl="xla")  # the path the plan traces on CPU
DATA = DatasetConfig(mixture_or_task_name="unused", task_feature_lengths={"targets": 64},
                     batch_size=8)


def test_topology_names():
  t = compiled_lib.parse_topology("v5p-128")
  assert (t.chips, t.desc_name, t.hbm_bytes) == (64, "v5p:4x4x4", 95 * 2**30)
  assert compiled_lib.parse_topology("v4-32").desc_name == "v4:2x2x4"
  assert compiled_lib.parse_topology("v5e-16").desc_name == "v5e:4x4"
  assert compiled_lib.parse_topology("v6e-16").chips == 16
  assert compiled_lib.parse_topology("v5p:2x2x1").chips == 4
  with pytest.raises(ValueError, match="GEN-N"):
    compiled_lib.parse_topology("tpu-8")
  with pytest.raises(ValueError, match="power of two"):
    compiled_lib.parse_topology("v5e-12")


def test_compiled_train_step_agrees_with_the_plan():
  """FSDP x expert parallelism, 2 microbatches: XLA's figures against the eval_shape plan."""
  mesh = PartitionerConfig(data=2, expert=2, fsdp=True)
  trainer = TrainerConfig(num_train_steps=1, num_microbatches=2)
  opt = OptimizerConfig(name="adamw")
  c = compiled_lib.compile_train_step(DecoderOnlyModel(MOE), dataset=DATA,
                                      topology="v5p:2x2x1", trainer=trainer, optimizer=opt,
                                      partitioner=mesh)
  (p,) = plan.plan_run(DecoderOnlyModel(MOE), dataset=DATA, optimizer=opt, partitioners=[mesh],
                       num_devices=4, trainer=trainer).meshes
  assert dict(c.mesh) == {"data": 2, "expert": 2, "model": 1} and c.batch_per_device == 2
  assert c.fits and 0 < c.hbm_fraction < 0.01
  # The state (parameters + AdamW moments, sharded over data and expert; plus the batch) is
  # what both count exactly; the donated state aliases the outputs.
  state = p.param_bytes + p.opt_bytes
  assert c.argument_bytes == pytest.approx(state, rel=0.15)
  assert c.alias_bytes == pytest.approx(state, rel=0.15)
  # The step's HBM (the state plus XLA's heap of temporaries: activations, gradients,
  # collective buffers, its own scratch) against the plan's liveness walk -- same order,
  # not 15% on a model this small, where fixed scratch weighs more (measured 1.20x here,
  # 1.67x when XLA's temp_size was the temporaries; README "Fitting a pod" lists the pod
  # configs' ratios).
  assert 0.5 < c.total_bytes / p.total_bytes < 2.5
  # The total is the program's HBM allocations (read from the compile's buffer assignment):
  # the state and the heap of temporaries, not XLA's temp_size (on TPU more than the heap).
  assert c.hbm_bytes and c.total_bytes == c.hbm_bytes > c.argument_bytes
  assert c.hlo_flops == pytest.approx(c.model_flops, rel=0.5)
  assert "temporaries" in c.format()


def test_kernels_and_the_dropless_fallback_step_are_compiled():
  """Ragged dispatch under expert parallelism on TPU: megablox gmm, ragged all-to-all and
  splash attention in the compiled step (no XLA attention); with a bounded receive buffer
  and ``dropless_fallback`` the worst-case replay step is compiled and sized too."""
  moe = dataclasses.replace(MOE, num_layers=1, attention_impl="auto",
                            moe=MoeConfig(num_experts=4, num_selected=2, dispatch="ragged",
                                          ragged_buffer_factor=1.25))
  data = dataclasses.replace(DATA, task_feature_lengths={"targets": 128})
  trainer = TrainerConfig(num_train_steps=1, dropless_fallback=True, fallback_microbatches=2)
  c = compiled_lib.compile_train_step(
      DecoderOnlyModel(moe), dataset=data, topology="v5p:2x2x1", trainer=trainer,
      partitioner=PartitionerConfig(data=2, expert=2), count_steps=False)
  assert c.kernels.get("ragged-all-to-all", 0) >= 2  # tokens out and back (and backward)
  assert any(k.startswith("gmm") for k in c.kernels), c.kernels
  assert any(k.startswith("tgmm") for k in c.kernels), c.kernels  # the weight gradients
  assert any(k.startswith("splash") for k in c.kernels), c.kernels
  fb = c.fallback
  assert fb is not None and fb.microbatches == 2 and c.microbatches == 1
  assert fb.hbm_bytes and fb.fits and c.fits
  assert "ragged-all-to-all" in fb.kernels
  out = c.format()
  assert "dropless fallback step (worst-case MoE buffers, 2 microbatches)" in out
  assert "kernels and exchanges: " in out and "ragged-all-to-all x" in out
  assert compiled_lib.format_kernels({}).startswith("none")


def test_hbm_allocation_bytes_reads_memory_space_0(tmp_path):
  """Allocations of another memory space (VMEM, SMEM) and host programs are left out."""
  (tmp_path / "module_0000.jit_train_step.cl_1.after_optimizations-buffer-assignment.txt"
   ).write_text("BufferAssignment:\n"
                "allocation 0: size 512, thread-local:\n"
                "allocation 1: size 4096, parameter 0, shape |f32[1024]| at ShapeIndex {}:\n"
                "allocation 2: size 1048576, preallocated-temp:\n"
                "allocation 3: size 117440512, color 1, preallocated-temp:\n"
                "allocation 4: size 124, color 2, preallocated-temp:\n"
                " value: <1 fusion @0> (size=1048576,offset=0): f32[512,512]\n")
  (tmp_path / "module_0002.jit_seed.cpu_after_optimizations-buffer-assignment.txt"
   ).write_text("allocation 0: size 99999999, preallocated-temp:\n")
  assert compiled_lib.hbm_allocation_bytes(str(tmp_path)) == 512 + 4096 + 1048576
  assert compiled_lib.hbm_allocation_bytes(str(tmp_path / "none")) is None


def test_step_hlo_flops_count_every_layer_and_microbatch():
  """Scanned layers x 2 microbatches: the extrapolated per-step HLO FLOPs equal those of
  the same step compiled unrolled in one microbatch (every layer in the program once)."""
  config = DecoderConfig(vocab_size=512, d_model=128, num_layers=4, num_heads=4,
                         num_kv_heads=2, d_ff=256, scan_layers=True, remat_policy="full",
                         dtype="bfloat16", attention_impl="xla")
  mesh = PartitionerConfig(data=4, fsdp=True)
  scanned = compiled_lib.compile_train_step(
      DecoderOnlyModel(config), dataset=DATA, topology="v5p:2x2x1", partitioner=mesh,
      trainer=TrainerConfig(num_train_steps=1, num_microbatches=2))
  unrolled = compiled_lib.compile_train_step(
      DecoderOnlyModel(dataclasses.replace(config, scan_layers=False)), dataset=DATA,
      topology="v5p:2x2x1", partitioner=mesh, trainer=TrainerConfig(num_train_steps=1))
  assert unrolled.step_hlo_flops == unrolled.hlo_flops  # no loops: nothing to extrapolate
  assert scanned.step_hlo_flops == pytest.approx(unrolled.hlo_flops, rel=1e-3)
  assert scanned.hlo_flops < 0.5 * scanned.step_hlo_flops  # one layer, one microbatch
  # 6·N·T plus the remat forward; the HLO adds attention scores, norms, the softmax.
  assert 1.0 < scanned.step_hlo_flops / scanned.model_flops < 1.3
  assert "every layer and microbatch" in scanned.format()


def test_overflow_is_named():
  topo = compiled_lib.parse_topology("v5e-16")
  c = compiled_lib.CompiledPlan(topology=topo, mesh={"data": 16}, batch_per_device=1,
                                argument_bytes=10 * 2**30, output_bytes=10 * 2**30,
                                alias_bytes=10 * 2**30, temp_bytes=8 * 2**30, hlo_flops=1.0,
                                model_flops=1.0, compile_seconds=0.0)
  assert not c.fits
  assert "exceeds the 16 GiB of HBM by 2.00 GiB" in c.overflow_message()


def test_cli_compiles_a_gin_config():
  """``python -m moe_jax.plan --compile --topology=...`` as a user runs it."""
  out = subprocess.run(
      [sys.executable, "-m", "moe_jax.plan", "--compile", "--topology=v5p-8",
       "--gin_file=models/moe_decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
       "--gin.MIXTURE_OR_TASK_NAME='synthetic_mix'", "--gin.TASK_FEATURE_LENGTHS={'targets': 128}",
       "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=1", "--gin.MESH_EXPERT=2",
       "--gin.PartitionerConfig.fsdp=True", "--gin.TrainerConfig.num_microbatches=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "compiled for v5p-8 (4 chips v5p:2x2x1" in out.stdout
  assert "mesh data=2 x expert=2 x model=1" in out.stdout
  assert plan_cli.main(["--compile", "--gin_file=runs/pod_finetune.gin"]) == 2


def test_plan_on_a_topology_traces_its_devices(capsys):
  """``--topology`` without ``--compile``: the eval_shape plan on the slice's 4 chips."""
  code = plan_cli.main(["--topology=v5p-8", "--gin_file=models/moe_decoder_tiny.gin",
                        "--gin_file=runs/pretrain.gin", "--gin.MIXTURE_OR_TASK_NAME='any'",
                        "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.BATCH_SIZE=8",
                        "--gin.TRAIN_STEPS=1", "--gin.MESH_EXPERT=2",
                        "--gin.PartitionerConfig.fsdp=True"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "| 2 x 2 x 1 | 4 | 2 |" in out
