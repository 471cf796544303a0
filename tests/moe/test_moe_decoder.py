"""MoE decoder: layouts pick the right layers; forward/backward with routed experts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models.decoder import Decoder, DecoderConfig
from moe_jax.models.moe_decoder import (MoeDecoder, MoeDecoderBlock, MoeDecoderConfig,
                                        moe_layer_indices)
from moe_jax.moe import AUX_LOSS_COLLECTION, METRICS_COLLECTION, MoeConfig, total_aux_loss

BASE = dict(vocab_size=32, d_model=16, num_layers=4, num_heads=2, d_ff=24)


def test_layout_indices():
  assert moe_layer_indices("every", 4) == (0, 1, 2, 3)
  assert moe_layer_indices("every_other", 5) == (1, 3)
  assert moe_layer_indices((2, 0), 4) == (0, 2)
  with pytest.raises(ValueError, match="outside"):
    moe_layer_indices((4,), 4)
  with pytest.raises(ValueError, match="unknown moe_layout"):
    moe_layer_indices("sometimes", 4)
  with pytest.raises(ValueError, match="outside"):
    MoeDecoderConfig(**BASE, moe=MoeConfig(num_experts=2), moe_layout=(7,))


@pytest.mark.parametrize("layout,want", [("every", (0, 1, 2, 3)), ("every_other", (1, 3)),
                                         ((0, 2), (0, 2))])
def test_layout_picks_layers(layout, want):
  cfg = MoeDecoderConfig(**BASE, moe=MoeConfig(num_experts=4, expert_dim=8), moe_layout=layout)
  tokens = jnp.zeros((2, 8), jnp.int32)
  shapes = jax.eval_shape(MoeDecoder(config=cfg).init, jax.random.key(0), tokens)
  params = nn.unbox(shapes["params"])
  for i in range(cfg.num_layers):
    mlp = params[f"layers_{i}"]["mlp"]
    if i in want:
      assert set(mlp) == {"router", "experts"}, i
      assert mlp["experts"]["wi_0"]["kernel"].shape == (4, 16, 8)
    else:
      assert set(mlp) == {"wi_0", "wi_1", "wo"}, i
      assert mlp["wi_0"]["kernel"].shape == (16, 24)
  # Everything outside the MoE FFNs is the dense decoder's tree, unchanged.
  dense = jax.eval_shape(Decoder(config=DecoderConfig(**BASE)).init, jax.random.key(0), tokens)
  strip = lambda t: {k: {kk: vv for kk, vv in v.items() if kk != "mlp"} if k.startswith("layers_")
                     else v for k, v in nn.unbox(t["params"]).items()}
  assert jax.tree.structure(strip(shapes)) == jax.tree.structure(strip(dense))


def test_forward_backward(init_params):
  cfg = MoeDecoderConfig(**{**BASE, "num_layers": 2},
                         moe=MoeConfig(num_experts=4, num_selected=2, shared_expert_dim=8),
                         moe_layout=(0,))
  model = MoeDecoder(config=cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
  params = init_params(model, tokens)

  @jax.jit
  def step(params):
    def loss(p):
      (logits, _), state = model.apply(p, tokens, mutable=[AUX_LOSS_COLLECTION,
                                                           METRICS_COLLECTION])
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
      return ce + total_aux_loss(state), state
    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, state), grads = step(params)
  assert np.isfinite(float(value))
  assert set(state[AUX_LOSS_COLLECTION]) == {"layers_0"}
  assert set(state[METRICS_COLLECTION]["layers_0"]["mlp"]) >= {"expert_usage", "dropped_fraction"}
  g = nn.unbox(grads["params"])
  for leaf in jax.tree.leaves(g):
    assert np.isfinite(np.asarray(leaf)).all()
  assert float(jnp.abs(g["layers_0"]["mlp"]["router"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["layers_0"]["mlp"]["experts"]["wo"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["layers_0"]["mlp"]["shared_expert"]["wo"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["layers_1"]["mlp"]["wo"]["kernel"]).sum()) > 0


def test_block_requires_layer_name_and_moe_config():
  block = MoeDecoderBlock(config=DecoderConfig(**BASE), name="layers_0")
  with pytest.raises(TypeError, match="MoeDecoderConfig"):
    block.init(jax.random.key(0), jnp.zeros((1, 2, 16)), mask_BLS=jnp.ones((1, 2, 2), bool),
               positions_BL=jnp.zeros((1, 2), jnp.int32))
