"""Resuming a run in the other block-stack layout (unrolled <-> scanned layers).

The checkpoint of an unrolled run holds ``layers_{i}`` parameters *and*
optimizer moments; a resume with ``scan_layers=True`` restores both in the
checkpoint's layout and stacks them (moe_jax.checkpoints.layout), and the
reverse. The layouts compute the same math, so the resumed step's loss is the
uninterrupted run's.
"""

import json

import jax
import numpy as np
import pytest

from moe_jax.checkpoints import layout, orbax
from moe_jax.models.decoder import DecoderConfig
from moe_jax.train import trainer as trainer_lib
from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig
from moe_jax.train.partitioner import PartitionerConfig
from moe_jax.train.run import train
from moe_jax.train.wrappers import DecoderOnlyModel

CONFIG = DecoderConfig(vocab_size=384, d_model=16, num_layers=2, num_heads=2, d_ff=32)


def _run(model_dir, steps, *, scan):
  return train(
      model=DecoderOnlyModel(CONFIG.replace(scan_layers=scan)),
      train_dataset=trainer_lib.DatasetConfig(
          mixture_or_task_name="synthetic_lm_text", task_feature_lengths={"targets": 16},
          batch_size=4, seed=3),
      model_dir=str(model_dir),
      trainer=trainer_lib.TrainerConfig(num_train_steps=steps, log_every=1, progress_bar=False),
      optimizer=OptimizerConfig(name="adamw", schedule=ScheduleConfig(lr=1e-2, warmup_steps=1)),
      partitioner=PartitionerConfig(data=2),
      checkpoint=orbax.CheckpointConfig(save_every=2, async_save=False))


def _losses(model_dir):
  rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.parametrize("first,then", [(False, True), (True, False)],
                         ids=["unrolled_then_scanned", "scanned_then_unrolled"])
def test_resume_in_the_other_layout(tmp_path, first, then):
  straight = jax.device_get(_run(tmp_path / "straight", 3, scan=first))  # its own init
  _run(tmp_path / "switched", 2, scan=first)
  resumed = jax.device_get(_run(tmp_path / "switched", 3, scan=then))
  assert int(resumed.step) == 3
  want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "switched")
  assert abs(got[3] - want[3]) <= 1e-5, (got, want)
  # the whole state was carried over: parameters and both Adam moments
  like = lambda tree: layout.match_layout(tree, straight.params)  # noqa: E731
  assert ("layers" in resumed.params) == then
  adam = resumed.opt_state[0]
  for a, b in [(straight.params, resumed.params), (straight.opt_state[0].mu, adam.mu),
               (straight.opt_state[0].nu, adam.nu)]:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, like(b))
  # the newest checkpoint is in the new layout, the older one in the old: both load
  assert orbax.load_latest(tmp_path / "switched").config.scan_layers == then
  older = orbax.load_latest(tmp_path / "switched", step=2)
  assert ("layers" in older.params) == then


def test_operative_config_may_change_the_stack_options():
  old = "DecoderConfig.scan_layers = False\nDecoderConfig.remat_policy = 'none'\nX.y = 1\n"
  new = "DecoderConfig.scan_layers = True\nDecoderConfig.remat_policy = 'full'\nX.y = 1\n"
  assert orbax._comparable(old) == orbax._comparable(new)
  assert orbax._comparable(old) != orbax._comparable(new.replace("X.y = 1", "X.y = 2"))


def test_masked_optimizer_state_converts(tmp_path):
  """A PEFT-style trainable subset: optax.masked moments (MaskedNode leaves) relay out too."""
  import flax.linen as nn

  from moe_jax.train.optimizers import make_optimizer

  def state(scan):
    model = DecoderOnlyModel(CONFIG.replace(scan_layers=scan))
    abstract = nn.meta.unbox(model.abstract_boxed_params())
    opt = make_optimizer(OptimizerConfig(name="adamw"), abstract, trainable=[r".*mlp.*"])
    return abstract, opt.tx

  abstract, tx = state(False)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)
  opt_state = tx.init(params)
  opt_state = jax.tree.map(lambda x: x + 1.5 if x.dtype == np.float32 else x, opt_state)
  ckpt = orbax.Checkpointer(tmp_path, orbax.CheckpointConfig(async_save=False))
  ckpt.save(1, params=params, opt_state=opt_state)
  scanned, scanned_tx = state(True)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda t: jax.tree.map(  # noqa: E731
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), t)
  target_opt = jax.eval_shape(scanned_tx.init, scanned)
  got = ckpt.restore(abstract_params=place(scanned), abstract_opt_state=place(target_opt))
  ckpt.close()
  assert jax.tree.structure(got["opt_state"]) == jax.tree.structure(target_opt)
  want = layout.match_layout_within(opt_state, params, scanned)
  jax.tree.map(np.testing.assert_array_equal, got["opt_state"], want)
  jax.tree.map(np.testing.assert_array_equal, layout.unrolled(got["params"]), params)
