"""Trainer partitioner: config, derived shardings, sharded train step == single device."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.t5 import T5Config
from moe_jax.train.wrappers import DecoderOnlyModel, EncoderDecoderModel
from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig, make_optimizer
from moe_jax.train.partitioner import (DistributedConfig, Partitioner, PartitionerConfig,
                                       initialize_distributed)
from moe_jax.train.trainer import Trainer, TrainerConfig

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
DEC = DecoderConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=32)


def test_config_and_rules():
  assert PartitionerConfig(model=2).mesh_shape(8) == {"data": 4, "expert": 1, "model": 2}
  assert PartitionerConfig(data=2, expert=-1).mesh_shape(8) == \
      {"data": 2, "expert": 4, "model": 1}
  with pytest.raises(ValueError, match="at most one"):
    PartitionerConfig(data=-1, model=-1)
  with pytest.raises(ValueError, match="not divisible"):
    PartitionerConfig(model=3).mesh_shape(8)
  with pytest.raises(ValueError, match=r"conflicting rules for logical axis 'vocab'"):
    Partitioner(PartitionerConfig(rules=[("vocab", "data")]))
  p = Partitioner(PartitionerConfig(rules=[("my_adapter_rank", None), ("vocab", "model")]))
  assert ("my_adapter_rank", None) in p.rules and ("relpos_buckets", None) in p.rules
  with pytest.raises(ValueError, match="mesh axes"):
    Partitioner(PartitionerConfig(rules=[("rank", "pipeline")]))


def test_distributed_flags_are_checked():
  assert initialize_distributed(DistributedConfig(auto_detect=False)) is False
  with pytest.raises(ValueError, match="coordinator_address"):
    initialize_distributed(DistributedConfig(process_count=2, process_id=0))
  with pytest.raises(ValueError, match="needs --process_count"):
    initialize_distributed(DistributedConfig(coordinator_address="localhost:1234"))


@needs8
def test_param_and_optimizer_specs_follow_logical_axes():
  p = Partitioner(PartitionerConfig(data=2, expert=2, model=2))
  model = EncoderDecoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32,
                                       num_layers=1, num_heads=2,
                                       feed_forward_proj="gated-gelu",
                                       tie_word_embeddings=False))
  boxed = model.abstract_boxed_params()
  specs = p.param_specs(boxed)
  assert specs["shared"]["embedding"] == P("model", None)
  assert specs["encoder"]["layers_0"]["attn"]["q"]["kernel"] == P(None, "model", None)
  assert specs["encoder"]["relpos_bias"]["embedding"] == P(None, "model")
  assert specs["decoder"]["layers_0"]["mlp"]["wo"]["kernel"] == P("model", None)
  assert specs["encoder"]["final_norm"]["scale"] == P(None)
  # Adafactor's factored statistics drop one dim; their spec drops the same one.
  params = nn.meta.unbox(boxed)
  tx = make_optimizer(OptimizerConfig(adafactor_min_dim_size_to_factor=8), params).tx
  opt_specs = p.derived_specs(jax.eval_shape(tx.init, params), params, specs)
  found = {}
  for path, s in jax.tree_util.tree_flatten_with_path(
      opt_specs, is_leaf=lambda x: isinstance(x, P))[0]:
    name = jax.tree_util.keystr(path)
    if name.endswith("['decoder']['layers_0']['mlp']['wi_0']['kernel']"):
      found[name.split("[")[1].split(".")[-1]] = s  # "v_row", "v_col", "v"
  # wi_0 is [D=16, F=32] with F over "model": v_row [D] replicated, v_col [F] sharded.
  assert found == {"v_row": P(None), "v_col": P("model"), "v": P()}
  # A dimension the mesh cannot divide is named.
  odd = EncoderDecoderModel(T5Config(vocab_size=63, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                     num_heads=2))
  with pytest.raises(ValueError, match=r"shared/embedding: dimension 0 \(logical 'vocab'"):
    p.param_specs(odd.abstract_boxed_params())


def _batches(n, b=8, l=12, vocab=64, seed=0, packed=True):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    t = rng.integers(1, vocab, (b, l)).astype(np.int32)
    batch = {"decoder_input_tokens": t, "decoder_target_tokens": np.roll(t, -1, 1),
             "decoder_loss_weights": (rng.random((b, l)) > 0.2).astype(np.int32)}
    if packed:
      seg = np.where(np.arange(l) < l // 2, 1, 2)[None].repeat(b, 0).astype(np.int32)
      seg[:, -2:] = 0
      pos = np.concatenate([np.arange(l // 2), np.arange(l - l // 2)])[None].repeat(b, 0)
      batch.update(decoder_segment_ids=seg, decoder_positions=pos.astype(np.int32))
    out.append(batch)
  return out


@needs8
def test_sharded_train_step_matches_single_device(numpy_params, place):
  model = DecoderOnlyModel(DEC)
  params = nn.meta.unbox(model.abstract_boxed_params())
  optimizer = make_optimizer(OptimizerConfig(name="adafactor", schedule=ScheduleConfig(lr=0.05),
                                             adafactor_min_dim_size_to_factor=8,
                                             clip_grad_norm=1.0), params)
  cfg = TrainerConfig(num_train_steps=2, log_every=1, progress_bar=False)
  batches = _batches(2)
  init = numpy_params(model)
  results = {}
  for name, mesh, devices in (("single", {"data": 1}, jax.devices()[:1]),
                              ("2x2x2", {"data": 2, "expert": 2, "model": 2}, None)):
    part = Partitioner(PartitionerConfig(**mesh), devices=devices)
    trainer = Trainer(model=model, optimizer=optimizer, partitioner=part, config=cfg)
    state = place(trainer, init)
    if name == "2x2x2":
      assert state.params["layers_0"]["mlp"]["wi_0"]["kernel"].sharding.spec == P(None, "model")
      assert len(state.params["embed"]["embedding"].sharding.device_set) == 8
    metrics = []
    for batch in batches:
      state, m = trainer.train_step(state, batch)
      metrics.append(jax.device_get(m))
    results[name] = (jax.device_get(state.params), jax.device_get(state.opt_state), metrics)
  (p1, o1, m1), (p8, o8, m8) = results["single"], results["2x2x2"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), p1, p8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), o1, o8)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


@needs8
def test_batch_must_divide_over_batch_shards():
  part = Partitioner(PartitionerConfig(data=4, expert=2))
  with pytest.raises(ValueError, match="global batch size 4 is not divisible by the 8"):
    part.shard_batch({"decoder_input_tokens": np.zeros((4, 3), np.int32)})
