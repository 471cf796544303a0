"""Optimizers, schedules, and trainable masks (frozen parameters get no optimizer state)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.train import optimizers as opt


def _params():
  return {
      "embed": {"embedding": jnp.ones((16, 8))},
      "layers_0": {"attn": {"q": {"kernel": jnp.ones((8, 2, 4))}},
                   "mlp": {"wi_0": {"kernel": jnp.ones((8, 32))},
                           "lora_a": {"kernel": jnp.ones((8, 2))}},
                   "input_norm": {"scale": jnp.ones((8,))}},
  }


def test_schedules():
  const = opt.make_schedule(opt.ScheduleConfig(kind="constant", lr=0.1, warmup_steps=4))
  np.testing.assert_allclose([const(s) for s in (0, 3, 100)], [0.025, 0.1, 0.1], rtol=1e-6)
  rsqrt = opt.make_schedule(opt.ScheduleConfig(kind="rsqrt", lr=0.01, warmup_steps=100))
  np.testing.assert_allclose([rsqrt(99), rsqrt(400)], [0.01, 0.005], rtol=1e-6)
  t5x = opt.make_schedule(opt.ScheduleConfig(kind="rsqrt", lr=0.01, warmup_steps=10000,
                                             linear_warmup=False))
  np.testing.assert_allclose([t5x(0), t5x(40000)], [1 / np.sqrt(1e4), 1 / np.sqrt(4e4)],
                             rtol=1e-6)
  cos = opt.make_schedule(opt.ScheduleConfig(kind="cosine", lr=1.0, warmup_steps=10,
                                             decay_steps=110, end_lr=0.1))
  np.testing.assert_allclose([cos(9), cos(60), cos(110), cos(500)], [1.0, 0.55, 0.1, 0.1],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="decay_steps"):
    opt.ScheduleConfig(kind="cosine", warmup_steps=10)
  with pytest.raises(ValueError, match="kind"):
    opt.ScheduleConfig(kind="linear")


def test_regex_mask():
  mask = opt.trainable_mask_from_regexes(_params(), [r".*/lora_.*", r".*/attn/.*"])
  assert mask["layers_0"]["mlp"]["lora_a"]["kernel"]
  assert mask["layers_0"]["attn"]["q"]["kernel"]
  assert not mask["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert not mask["embed"]["embedding"]
  with pytest.raises(ValueError, match=r"match no parameter.*layers_0/attn/q/kernel"):
    opt.trainable_mask_from_regexes(_params(), [r".*lroa.*"])
  with pytest.raises(ValueError, match="selects no parameter"):
    opt.resolve_trainable_mask(_params(), jax.tree.map(lambda _: False, _params()))
  with pytest.raises(ValueError, match="structure"):
    opt.resolve_trainable_mask(_params(), {"embed": True})


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_frozen_params_have_no_optimizer_state(name):
  params = _params()
  config = opt.OptimizerConfig(name=name, schedule=opt.ScheduleConfig(lr=0.1),
                               clip_grad_norm=1.0, adafactor_min_dim_size_to_factor=4)
  full = opt.make_optimizer(config, params)
  peft = opt.make_optimizer(config, params, trainable=[r".*/lora_.*"])
  mask_fn = opt.make_optimizer(
      config, params, trainable=lambda p: jax.tree_util.tree_map_with_path(
          lambda path, _: "lora" in jax.tree_util.keystr(path), p))
  state_full = full.tx.init(params)
  state_peft = peft.tx.init(params)
  assert opt.count_state_elements(state_full) > 100
  # Only the 16-element LoRA kernel has moments (plus scalar step counters).
  per_param = 2 * 16 if name == "adamw" else 16
  assert per_param <= opt.count_state_elements(state_peft) <= per_param + 4
  assert opt.count_state_elements(mask_fn.tx.init(params)) == \
      opt.count_state_elements(state_peft)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = peft.tx.update(grads, state_peft, params)
  new = optax.apply_updates(params, updates)
  assert not np.allclose(new["layers_0"]["mlp"]["lora_a"]["kernel"], 1.0)
  for path in (("embed", "embedding"), ("layers_0", "mlp", "wi_0", "kernel"),
               ("layers_0", "input_norm", "scale")):
    leaf_new, leaf_old = new, params
    for k in path:
      leaf_new, leaf_old = leaf_new[k], leaf_old[k]
    np.testing.assert_array_equal(leaf_new, leaf_old)


def test_adafactor_uses_t5x_defaults_and_factors_large_dims():
  c = opt.OptimizerConfig()
  assert (c.name, c.adafactor_decay_rate, c.adafactor_min_dim_size_to_factor,
          c.adafactor_clipping_threshold, c.adafactor_multiply_by_parameter_scale) == \
      ("adafactor", 0.8, 128, 1.0, True)
  params = {"w": jnp.ones((256, 512)), "b": jnp.ones((512,))}
  state = opt.make_optimizer(c, params).tx.init(params)
  # Factored second moment of the 256x512 kernel: 256 + 512 numbers, not 131072.
  assert opt.count_state_elements(state) < 256 + 512 + 512 + 16


def test_weight_decay_skips_vectors():
  params = {"w": jnp.ones((4, 4)), "scale": jnp.ones((4,))}
  o = opt.make_optimizer(opt.OptimizerConfig(name="adamw", weight_decay=0.5,
                                             schedule=opt.ScheduleConfig(lr=1.0)), params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = o.tx.update(zero, o.tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5)
  np.testing.assert_allclose(updates["scale"], 0.0)
