"""Pod-scale options: FSDP rules, gradient accumulation, frozen parameters in bfloat16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoderConfig
from moe_jax.moe.layer import MoeConfig
from moe_jax.train import microbatch
from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig, make_optimizer
from moe_jax.train.partitioner import Partitioner, PartitionerConfig
from moe_jax.train.partitioning import DEFAULT_RULES, merge_rules
from moe_jax.train.trainer import Trainer, TrainerConfig
from moe_jax.train.wrappers import DecoderOnlyModel

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
DEC = DecoderConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=32)
MOE = MoeDecoderConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                       d_ff=32, moe=MoeConfig(num_experts=4, num_selected=2))


def _batches(n, b=8, l=12, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    t = rng.integers(1, 64, (b, l)).astype(np.int32)
    out.append({"decoder_input_tokens": t, "decoder_target_tokens": np.roll(t, -1, 1),
                "decoder_loss_weights": (rng.random((b, l)) > 0.3).astype(np.int32)})
  return out


def _run(model, part_config, trainer_config, init, *, devices=None, trainable=None, steps=2,
         opt=None):
  params = nn.meta.unbox(model.abstract_boxed_params())
  opt = opt or OptimizerConfig(name="adamw", schedule=ScheduleConfig(lr=0.01), clip_grad_norm=1.0)
  optimizer = make_optimizer(opt, params, trainable=trainable)
  part = Partitioner(part_config, devices=devices)
  trainer = Trainer(model=model, optimizer=optimizer, partitioner=part, config=trainer_config)
  sharded = jax.tree.map(jax.device_put, init, trainer.state_shardings.params)
  state = trainer.state_from_params(sharded)
  metrics = []
  for batch in _batches(steps):
    state, m = trainer.train_step(state, batch)
    metrics.append(jax.device_get(m))
  return trainer, state, metrics


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                       np.asarray(y, np.float32),
                                                       atol=tol, rtol=tol), a, b)


def test_rules_accept_fsdp_and_reject_true_conflicts():
  merged = dict(merge_rules(DEFAULT_RULES, [("embed", "data")]))
  assert merged["embed"] == "data"
  # Position (priority) is the default's: batch still claims "data" first.
  assert [n for n, _ in merge_rules(DEFAULT_RULES, [("embed", "data")])] == \
      [n for n, _ in DEFAULT_RULES]
  with pytest.raises(ValueError, match="conflicting rules for logical axis 'vocab'"):
    merge_rules(DEFAULT_RULES, [("vocab", "data")])  # a sharded default re-mapped
  with pytest.raises(ValueError, match="conflicting rules for logical axis 'mlp'"):
    merge_rules(DEFAULT_RULES, [("mlp", None)])  # a sharded default un-sharded
  with pytest.raises(ValueError, match="conflicting rules for logical axis 'embed'"):
    merge_rules(DEFAULT_RULES, [("embed", "data"), ("embed", "model")])
  with pytest.raises(ValueError, match="conflicting rules for logical axis 'embed'"):
    PartitionerConfig(fsdp=True, rules=[("embed", "model")]).all_rules()
  assert PartitionerConfig(fsdp=True, rules=[("embed", "data")]).all_rules() == \
      PartitionerConfig(rules=[("embed", "data")]).all_rules()


@needs8
def test_fsdp_specs_compose_with_expert_and_model_parallelism():
  part = Partitioner(PartitionerConfig(data=2, expert=2, model=2, fsdp=True))
  specs = part.param_specs(DecoderOnlyModel(MOE).abstract_boxed_params())
  experts = specs["layers_0"]["mlp"]["experts"]
  assert experts["wi_0"]["kernel"] == P("expert", "data", "model")
  assert experts["wo"]["kernel"] == P("expert", "model", "data")
  assert specs["embed"]["embedding"] == P("model", "data")
  assert specs["layers_0"]["attn"]["q"]["kernel"] == P("data", "model", None)
  assert part.spec_for(("batch", "length", "embed"), (8, 4, 16)) == \
      P(("data", "expert"), None, None)  # activations keep d_model whole


@needs8
@pytest.mark.parametrize("config", [DEC, MOE], ids=["dense", "moe"])
def test_fsdp_train_step_equals_replicated(config, numpy_params):
  model = DecoderOnlyModel(config)
  init = numpy_params(model)
  tc = TrainerConfig(num_train_steps=2, progress_bar=False)
  mesh = dict(data=2, expert=2, model=2) if config is MOE else dict(data=8)
  _, s_rep, m_rep = _run(model, PartitionerConfig(**mesh), tc, init)
  tr, s_fsdp, m_fsdp = _run(model, PartitionerConfig(**mesh, fsdp=True), tc, init)
  kernel = s_fsdp.params["layers_0"]["attn"]["q"]["kernel"]
  assert "data" in tuple(kernel.sharding.spec)
  # Parameters and Adam moments are split over data: 1/2 (or 1/8) of the bytes.
  mu = jax.tree.leaves(s_fsdp.opt_state)[1]
  assert mu.addressable_shards[0].data.size < mu.size
  _close(jax.device_get(s_rep.params), jax.device_get(s_fsdp.params))
  _close(jax.device_get(s_rep.opt_state), jax.device_get(s_fsdp.opt_state))
  for a, b in zip(m_rep, m_fsdp):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


@needs8
@pytest.mark.parametrize("n", [2, 4])
def test_microbatches_equal_one_big_batch(n, numpy_params):
  """Gradients and metrics of N microbatches equal those of the whole batch (float32).

  Compared before the optimizer: Adam's first update is ~ lr * sign(grad), which
  turns a 1e-7 difference of a near-zero gradient into a full step.
  """
  model = DecoderOnlyModel(DEC)
  init = numpy_params(model)
  part = PartitionerConfig(data=2)
  devices = jax.devices()[:2]
  results = []
  for k in (1, n):
    tc = TrainerConfig(num_train_steps=1, progress_bar=False, num_microbatches=k)
    tr, state, metrics = _run(model, part, tc, init, devices=devices, steps=1)
    batch = _batches(1, seed=1)[0]
    fn = tr.partitioner.jit(tr._loss_and_grads)  # the train step's own gradient function
    (_, m), grads = fn(state.params, batch, jax.random.key(0))
    results.append((jax.device_get(grads), jax.device_get(m), metrics[0]))
  (g1, m1, s1), (gn, mn, sn) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, gn)
  for k in ("loss", "cross_entropy", "accuracy", "num_tokens"):
    np.testing.assert_allclose(m1[k], mn[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in ("loss", "accuracy", "num_tokens", "grad_norm"):
    np.testing.assert_allclose(s1[k], sn[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_microbatch_gradients_with_a_summed_loss_and_frozen_leaves():
  """Constant normalisation (the losses add up) and frozen leaves (zero gradient)."""
  w = {"a": jnp.arange(3.0), "b": jnp.ones(3)}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  batch = {"x": x, "decoder_target_tokens": jnp.zeros((8, 2), jnp.int32)}

  def loss_fn(p, b, rng=None):
    loss = jnp.sum((b["x"] @ p["a"]) ** 2 * p["b"][0]) / 7.0
    return loss, {"loss": loss, "num_tokens": jnp.float32(b["x"].shape[0] * 2)}

  (loss, metrics), grads = microbatch.accumulate_gradients(
      loss_fn, w, batch, None, num_microbatches=4, trainable_mask={"a": True, "b": False},
      token_weighted=False)
  ref_loss, ref_grad = jax.value_and_grad(lambda a: loss_fn({"a": a, "b": w["b"]}, batch)[0])(
      w["a"])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grads["a"], ref_grad, rtol=1e-6)
  np.testing.assert_array_equal(grads["b"], 0.0)
  assert metrics["num_tokens"] == 16


@needs8
def test_microbatches_must_divide_the_batch(numpy_params):
  model = DecoderOnlyModel(DEC)
  with pytest.raises(ValueError, match="num_microbatches=3"):
    _run(model, PartitionerConfig(data=2), TrainerConfig(
        num_train_steps=1, progress_bar=False, num_microbatches=3), numpy_params(model),
         devices=jax.devices()[:2], steps=1)


def test_frozen_parameters_in_bfloat16(numpy_params):
  model = DecoderOnlyModel(DEC)
  init = numpy_params(model)
  trainable = [r".*/mlp/.*"]
  tc = TrainerConfig(num_train_steps=2, progress_bar=False, frozen_param_dtype="bfloat16")
  tr, state, metrics = _run(model, PartitionerConfig(data=1), tc, init,
                            devices=jax.devices()[:1], trainable=trainable)
  mask = tr.optimizer.trainable_mask
  for p, a, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(tr.abstract_state.params),
                     jax.tree.leaves(mask)):
    assert p.dtype == (jnp.float32 if m else jnp.bfloat16) == a.dtype
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
             if x.ndim > 0)
  assert np.isfinite(metrics[-1]["loss"])
  # Frozen weights are the float32 ones rounded once, and never move.
  frozen = state.params["layers_0"]["attn"]["q"]["kernel"]
  np.testing.assert_array_equal(
      frozen, jnp.asarray(init["layers_0"]["attn"]["q"]["kernel"]).astype(jnp.bfloat16))
  fresh = tr.create_state(0)
  assert fresh.params["layers_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
  assert fresh.params["layers_0"]["mlp"]["wi_0"]["kernel"].dtype == jnp.float32
