"""Token loss with z-loss and normalisation; the aux-loss / metrics collection convention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.train import losses


def _reference(logits, targets, weights, z):
  """Obviously-correct float64 loop."""
  ce = zl = 0.0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      row = logits[b, t].astype(np.float64)
      log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
      ce += weights[b, t] * (log_z - row[targets[b, t]])
      zl += weights[b, t] * z * log_z ** 2
  return ce, zl


def test_token_loss_matches_reference_and_normalisations():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  ce, zl = _reference(logits, targets, weights, 1e-2)
  n = weights.sum()
  for factor, norm in (("num_target_tokens", n), (None, 1.0), (10.0, 10.0)):
    out = losses.token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                            losses.LossConfig(z_loss=1e-2, loss_normalizing_factor=factor))
    np.testing.assert_allclose(out.cross_entropy, ce / norm, rtol=1e-5)
    np.testing.assert_allclose(out.z_loss, zl / norm, rtol=1e-5)
    np.testing.assert_allclose(out.loss, (ce + zl) / norm, rtol=1e-5)
    assert float(out.num_tokens) == n
  correct = ((logits.argmax(-1) == targets) * weights).sum()
  assert float(out.num_correct) == correct


def test_bfloat16_logits_are_computed_in_float32():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 11)), jnp.bfloat16)
  ce, z = losses.cross_entropy_with_z_loss(logits, jnp.zeros((1, 3), jnp.int32), z_loss=1e-4)
  assert ce.dtype == jnp.float32 and z.dtype == jnp.float32


def test_loss_config_errors():
  with pytest.raises(ValueError, match="loss_normalizing_factor"):
    losses.LossConfig(loss_normalizing_factor="per_sequence")
  with pytest.raises(ValueError, match="z_loss"):
    losses.LossConfig(z_loss=-1.0)


class _Sower(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      self.sow("aux_loss", "load_balancing_loss", 0.5 * (i + 1) * jnp.ones(()))
      self.sow("intermediates", "metrics_router_confidence", jnp.asarray(float(i)))
      self.sow("moe_metrics", "dropped_fraction", jnp.asarray(0.1 * i))
      self.sow("moe_metrics", "expert_usage", jnp.ones((4,)))  # vector: not logged
    self.sow("intermediates", "hidden", x)  # not a metric
    self.sow("aux_loss", "lora_l2", jnp.asarray(0.25))
    return x


def test_aux_losses_are_summed_and_metrics_averaged():
  _, state = _Sower().apply({}, jnp.ones((2,)), mutable=list(losses.MUTABLE_COLLECTIONS))
  total, by_name = losses.collect_aux_losses(state)
  np.testing.assert_allclose(total, 0.5 + 1.0 + 0.25)
  np.testing.assert_allclose(by_name["load_balancing_loss"], 1.5)
  np.testing.assert_allclose(by_name["lora_l2"], 0.25)
  metrics = losses.collect_metrics(state)
  assert set(metrics) == {"metrics_router_confidence", "dropped_fraction"}
  np.testing.assert_allclose(metrics["metrics_router_confidence"], 0.5)
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.05)
  assert losses.collect_aux_losses({})[0] == 0.0


def test_model_loss_adds_aux_losses(numpy_params):
  from moe_jax.models.decoder import Decoder, DecoderBlock, DecoderConfig
  from moe_jax.train.wrappers import DecoderOnlyModel

  class AuxBlock(DecoderBlock):
    def __call__(self, x, **kw):
      self.sow("aux_loss", "penalty", jnp.asarray(0.125))
      self.sow("intermediates", "metrics", jnp.asarray(2.0))
      return super().__call__(x, **kw)

  cfg = DecoderConfig(vocab_size=16, d_model=8, num_layers=2, num_heads=2, d_ff=16)
  plain = DecoderOnlyModel(cfg)
  aux = DecoderOnlyModel(cfg, module=Decoder(config=cfg, block_cls=AuxBlock))
  params = numpy_params(plain)
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % 16
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": (tokens + 1) % 16,
           "decoder_loss_weights": np.ones_like(tokens)}
  loss0, m0 = jax.jit(plain.loss_fn)(params, batch)
  loss1, m1 = jax.jit(aux.loss_fn)(params, batch)
  np.testing.assert_allclose(loss1, loss0 + 2 * 0.125, rtol=1e-6)
  np.testing.assert_allclose(m1["aux_loss/penalty"], 0.25)
  np.testing.assert_allclose(m1["model/metrics"], 2.0)
  assert "aux_loss" not in m0


def test_router_metrics_per_layer_are_the_same_scanned_and_unrolled():
  """A scanned stack's [N/P]-stacked leaves are split into the unrolled stack's layers."""
  import dataclasses

  from moe_jax.checkpoints import layout
  from moe_jax.models.moe_decoder import MoeDecoderConfig
  from moe_jax.moe.layer import MoeConfig
  from moe_jax.train.wrappers import DecoderOnlyModel

  config = MoeDecoderConfig(vocab_size=64, d_model=16, num_layers=4, num_heads=2, d_ff=32,
                            moe=MoeConfig(num_experts=4, num_selected=2),
                            moe_layout="every_other")
  unrolled = DecoderOnlyModel(config)
  scanned = DecoderOnlyModel(dataclasses.replace(config, scan_layers=True))
  params = jax.jit(unrolled.init_params)(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(1, 64, (2, 8)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}
  _, a = jax.jit(unrolled.loss_fn)(params, batch)
  _, b = jax.jit(scanned.loss_fn)(layout.stack_layers(params, 2), batch)
  per_layer = {k for k in a if k.startswith("router/")}
  assert per_layer == {k for k in b if k.startswith("router/")}
  assert {k.split("/")[1] for k in per_layer} == {"layer_1", "layer_3"}  # the MoE layers
  assert np.shape(a["router/layer_3/mlp/expert_usage"]) == (4,)
  for k in per_layer | {k for k in a if k.startswith("model/")}:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert not np.allclose(a["router/layer_1/mlp/expert_usage"], a["router/layer_3/mlp/expert_usage"])
