"""Partial restore by assignment map: a small checkpoint into a larger model, with dtype casts."""

import jax
import ml_dtypes
import numpy as np
import pytest

from moe_jax.checkpoints import CheckpointError, assignment, save_model
from moe_jax.checkpoints.native import flatten
from moe_jax.models.decoder import DecoderConfig
from moe_jax.train.wrappers import DecoderOnlyModel
from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
from moe_jax.train.partitioner import Partitioner, PartitionerConfig
from moe_jax.train.trainer import Trainer, TrainerConfig

SMALL = DecoderConfig(vocab_size=32, d_model=8, num_layers=1, num_heads=2, d_ff=16,
                      tie_embeddings=True, param_dtype="bfloat16")
LARGE = DecoderConfig(vocab_size=32, d_model=8, num_layers=2, num_heads=2, d_ff=16)


@pytest.fixture
def source_dir(tmp_path, numpy_params):
  params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16),
                        numpy_params(DecoderOnlyModel(SMALL.replace(param_dtype="float32"))))
  return save_model(tmp_path / "small", SMALL, params), flatten(params)


# Layer 1 is a copy of layer 0; the untied head (absent from the tied source) stays fresh.
MAP = ((r"layers_1/(.*)", r"layers_0/\1"), (r"lm_head/.*", None))


def test_assignment_map(source_dir):
  path, source = source_dir
  target = jax.eval_shape(lambda: DecoderOnlyModel(LARGE).init_params(jax.random.key(0)))
  values, report = assignment.apply_assignment_map(target, source, MAP)
  q0 = values["layers_0"]["attn"]["q"]["kernel"]
  assert q0.dtype == np.float32  # cast from bfloat16 to the target's dtype
  np.testing.assert_array_equal(q0, source["layers_0/attn/q/kernel"].astype(np.float32))
  np.testing.assert_array_equal(values["layers_1"]["attn"]["q"]["kernel"], q0)
  assert values["lm_head"]["kernel"] is None
  assert report.fresh == ["lm_head/kernel"]
  assert report.loaded["layers_1/mlp/wo/kernel"] == "layers_0/mlp/wo/kernel"
  assert report.unused_source == []

  with pytest.raises(CheckpointError,
                     match=r"'lm_head/kernel' <- 'lm_head/kernel'.*\(target_regex, None\)"):
    assignment.apply_assignment_map(target, source, MAP[:1])
  _, report = assignment.apply_assignment_map(target, source, MAP[:1], fallback_to_init=True)
  assert report.fresh == ["lm_head/kernel"]
  with pytest.raises(CheckpointError,
                     match=r"'layers_0/mlp/wo/kernel' has shape \(16, 8\), but target parameter "
                           r"'layers_1/mlp/wi_0/kernel' has shape \(8, 16\)"):
    assignment.apply_assignment_map(
        target, source, ((r"layers_1/mlp/wi_0/kernel", "layers_0/mlp/wo/kernel"),) + MAP)
  with pytest.raises(ValueError, match="assignment_map entry"):
    assignment.InitFromCheckpoint(path=str(path), assignment_map=[("a", 1)])


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")
def test_restore_into_sharded_state(source_dir, numpy_params, place):
  path, source = source_dir
  model = DecoderOnlyModel(LARGE)
  fresh = numpy_params(model, seed=5)
  tr = Trainer(model=model, optimizer=make_optimizer(OptimizerConfig(), fresh),
               partitioner=Partitioner(PartitionerConfig(data=2, model=2),
                                       devices=jax.devices()[:4]),
               config=TrainerConfig(num_train_steps=1))
  state = place(tr, fresh)
  params, report = assignment.restore_into(
      state.params, assignment.InitFromCheckpoint(path=str(path), assignment_map=MAP),
      tr.state_shardings.params)
  assert len(report.loaded) == len(flatten(fresh)) - 1
  head = params["lm_head"]["kernel"]
  np.testing.assert_array_equal(head, fresh["lm_head"]["kernel"])
  assert head.sharding == state.params["lm_head"]["kernel"].sharding
  wi = params["layers_1"]["mlp"]["wi_0"]["kernel"]
  assert wi.sharding.spec == tr.state_shardings.params["layers_1"]["mlp"]["wi_0"]["kernel"].spec
  np.testing.assert_array_equal(wi, source["layers_0/mlp/wi_0/kernel"].astype(np.float32))


def test_restore_into_initialises_only_when_needed(source_dir, numpy_params, place):
  path, source = source_dir
  for config, expect_calls in ((SMALL.replace(param_dtype="float32"), 0), (LARGE, 1)):
    model = DecoderOnlyModel(config)
    fresh = numpy_params(model, seed=1)
    tr = Trainer(model=model, optimizer=None,
                 partitioner=Partitioner(PartitionerConfig(), devices=jax.devices()[:1]),
                 config=TrainerConfig(num_train_steps=1))
    calls = []

    def fresh_fn():
      calls.append(1)
      return jax.tree.map(jax.device_put, fresh, tr.state_shardings.params)

    params, report = assignment.restore_into(
        fresh_fn, assignment.InitFromCheckpoint(path=str(path), assignment_map=MAP),
        abstract=tr.abstract_state.params)
    assert len(calls) == expect_calls
    assert params["embed"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(params["embed"]["embedding"],
                                  source["embed/embedding"].astype(np.float32))
