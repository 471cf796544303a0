"""python -m moe_jax.plan: per-device memory from shapes only, checked against real sharded arrays."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from moe_jax import plan
from moe_jax.cli import plan as plan_cli
from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoderConfig
from moe_jax.moe.layer import MoeConfig
from moe_jax.train.wrappers import DecoderOnlyModel
from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
from moe_jax.train.partitioner import Partitioner, PartitionerConfig
from moe_jax.train.trainer import DatasetConfig, Trainer, TrainerConfig

MOE = MoeDecoderConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                       d_ff=32, moe=MoeConfig(num_experts=4, num_selected=2))
DATA = DatasetConfig(mixture_or_task_name="unused", task_feature_lengths={"targets": 8},
                     batch_size=8)


def _device_bytes(tree) -> int:
  """Bytes of device 0's shards of a tree of sharded arrays."""
  return sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("optimizer,trainable", [
    ("adamw", None),
    ("adafactor", [r".*/mlp/.*"]),  # frozen attention: no optimizer state, no grads
])
def test_memory_matches_a_real_sharded_train_state(optimizer, trainable, numpy_params, place):
  model = DecoderOnlyModel(MOE)
  opt_config = OptimizerConfig(name=optimizer)
  mesh = PartitionerConfig(data=2, expert=2, model=2)
  result = plan.plan_run(model, dataset=DATA, optimizer=opt_config, partitioners=[mesh],
                         trainable=trainable)
  (m,) = result.meshes
  assert dict(m.mesh) == {"data": 2, "expert": 2, "model": 2} and m.batch_per_device == 2

  part = Partitioner(mesh, devices=jax.devices()[:8])
  abstract = nn.meta.unbox(model.abstract_boxed_params())
  opt = make_optimizer(opt_config, abstract, trainable=trainable)
  trainer = Trainer(model=model, optimizer=opt, partitioner=part,
                    config=TrainerConfig(num_train_steps=0, progress_bar=False))
  state = place(trainer, numpy_params(model))
  assert m.param_bytes == _device_bytes(state.params)
  assert m.opt_bytes == _device_bytes(state.opt_state)
  trainable_params = [p for p, t in zip(jax.tree.leaves(state.params),
                                        jax.tree.leaves(opt.trainable_mask)) if t]
  assert m.grad_bytes == _device_bytes(trainable_params)
  if trainable is not None:
    assert m.grad_bytes < m.param_bytes

  total = sum(x.size for x in jax.tree.leaves(abstract))
  experts = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(abstract)
                if "experts" in jax.tree_util.keystr(path))
  assert experts > 0
  c = result.counts
  assert (c.total, c.expert) == (total, experts)
  assert c.active == total - experts // 2  # top-2 of 4 experts
  assert c.trainable == sum(x.size for x, t in zip(jax.tree.leaves(abstract),
                                                    jax.tree.leaves(opt.trainable_mask)) if t)


def test_residuals_match_jax_saved_residuals():
  config = DecoderConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, d_ff=32)
  model = DecoderOnlyModel(config)
  abstract = nn.meta.unbox(model.abstract_boxed_params())
  batch, tokens = plan._dummy_batch(model, DATA, rows=2)  # pylint: disable=protected-access
  assert tokens == {"encoder": 0, "decoder": 8}
  mask = jax.tree.map(lambda _: True, abstract)
  ours = sum(plan._nbytes(a) for a in plan.residuals(model, abstract, mask, batch))
  reference = sum(plan._nbytes(a) for a, why in saved_residuals(
      lambda p, b: model.loss_fn(p, b)[0], abstract, batch) if "argument" not in why and "literal" not in why)
  assert ours == reference > 0
  # Freezing everything but the head keeps fewer activations for the backward pass.
  head_only = jax.tree_util.tree_map_with_path(
      lambda path, _: "lm_head" in jax.tree_util.keystr(path), abstract)
  frozen = sum(plan._nbytes(a) for a in plan.residuals(model, abstract, head_only, batch))
  assert 0 < frozen < ours


def test_activations_and_flops_scale_with_the_mesh():
  model = DecoderOnlyModel(MOE)
  result = plan.plan_run(model, dataset=DATA, partitioners=[
      PartitionerConfig(data=8), PartitionerConfig(data=4), PartitionerConfig(data=4, model=2)])
  eight, four, four_tp = result.meshes
  assert (eight.batch_per_device, four.batch_per_device) == (1, 2)
  assert four.activation_bytes > eight.activation_bytes
  assert four_tp.activation_bytes < four.activation_bytes  # heads / FFN split over 'model'
  assert eight.flops_per_device == pytest.approx(four.flops_per_device / 2)
  assert eight.flops_per_device == four_tp.flops_per_device
  text = result.format(peak_tflops=100.0, mfu=0.5)
  assert "| 8 x 1 x 1 | 8 | 1 |" in text and "| 4 x 1 x 2 | 8 | 2 |" in text


def test_mesh_errors_name_the_culprit():
  assert plan.parse_mesh("data=4,model=2") == PartitionerConfig(data=4, expert=1, model=2)
  with pytest.raises(ValueError, match="AXIS=SIZE"):
    plan.parse_mesh("data=4,tensor=2")
  with pytest.raises(ValueError, match="num_devices"):
    plan.plan_run(DecoderOnlyModel(MOE), dataset=DATA, partitioners=[PartitionerConfig()])
  with pytest.raises(ValueError, match="batch size 8 is not divisible by the 16"):
    plan.plan_run(DecoderOnlyModel(MOE), dataset=DATA, partitioners=[PartitionerConfig(data=16)])
  with pytest.raises(ValueError, match=r"embed/embedding: dimension 0 .logical .vocab., size 64. is not divisible"):
    plan.plan_run(DecoderOnlyModel(MOE), dataset=DATA, partitioners=[PartitionerConfig(data=1, model=3)])


def test_published_sizes(capsys):
  """Mixtral-8x7B (46.7B total / 12.9B active) and T5-v1.1-XL MoV-10 (~2.85B) from the pod gins."""
  code = plan_cli.main(["--gin_file=runs/pod_mixtral_8x7b_upcycled.gin",
                    "--gin.MIXTURE_OR_TASK_NAME='any'", "--mesh=data=32,expert=8",
                    "--mesh=data=8,expert=8,model=4"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "total 46.703B, active per token 12.880B" in out
  rows = [line for line in out.splitlines() if line.startswith("| 32 x 8 x 1 |")
          or line.startswith("| 8 x 8 x 4 |")]
  assert len(rows) == 2
  params_gib = [float(r.split("|")[4]) for r in rows]
  # Experts split 8 ways (and 4 more with model=4), and the config's FSDP splits every
  # parameter over data too (32 ways; 8 with model=4): both meshes split the state ~256 ways.
  assert params_gib[0] == pytest.approx((45.097e9 / 8 + 1.606e9) / 32 * 4 / 2**30, rel=1e-2)
  assert params_gib[1] < params_gib[0] * 4 / 3.5

  code = plan_cli.main(["--gin_file=runs/pod_t5_xl_mov10.gin", "--gin.MIXTURE_OR_TASK_NAME='any'",
                    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                    "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=1", "--mesh=data=8",
                    "--mesh=data=2,model=4"])
  out = capsys.readouterr().out
  assert code == 0, out
  total = float(out.split("parameters: total ")[1].split("B")[0])
  assert 2.8 < total < 2.9  # T5-v1.1-XL: 2.85B (the "3B" model)
  share = float(out.split("trainable ")[1].split("(")[1].split("%")[0])
  assert 0.1 < share < 1.0  # MoV-10 trains under 1% of the parameters


def test_cli_errors(capsys):
  assert plan_cli.main(["--gin_file=runs/pod_finetune.gin", "--mesh=data=x"]) == 2
  assert "size of 'data' is not an integer" in capsys.readouterr().err


def test_platform_picks_the_kernels_that_will_run(monkeypatch):
  """``platform=``: the plan traces through ``building_for``, the trainer's kernel choice."""
  from moe_jax.nn import attention_kernels

  seen = []
  original = attention_kernels.resolve_impl
  monkeypatch.setattr(attention_kernels, "resolve_impl", lambda impl, platform=None: seen.append(
      attention_kernels.target_platform()) or original(impl, platform))
  model = DecoderOnlyModel(MOE)
  mesh = [PartitionerConfig(data=4, expert=2)]
  tpu = plan.plan_run(model, dataset=DATA, partitioners=mesh, platform="tpu").meshes[0]
  assert "tpu" in seen  # the traced train step (parameter shapes are traced for any)
  seen.clear()
  cpu = plan.plan_run(model, dataset=DATA, partitioners=mesh).meshes[0]
  assert set(seen) == {jax.default_backend()}
  assert tpu.param_bytes == cpu.param_bytes and tpu.activation_bytes > 0
