"""CALM composed model: function preservation, causality, caching, freezing, saving."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax import (ComposedModel, CompositionConfig, compose_modules, load_composition,
                      save_composition, select_layer_pairs, trainable_mask)
from calm_jax.composition import init_composition_params
from moe_jax import decoding
from moe_jax.checkpoints import LoadedModel, load_checkpoint, save_model
from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig

V = 40
ANCHOR = DecoderConfig(vocab_size=V, d_model=24, num_layers=4, num_heads=4, num_kv_heads=2,
                       d_ff=48)
AUGMENT = DecoderConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, d_ff=40,
                        parallel_block=True, tie_embeddings=True)


def _loaded(config, seed):
  module = registry.build_module(config)
  return LoadedModel(config=config, module=module,
                     params=registry.init_params(module, "decoder", seed=seed), source=f"s{seed}")


@pytest.fixture(scope="module")
def models():
  return _loaded(ANCHOR, 1), _loaded(AUGMENT, 2)


def _nonzero(module, params, seed=5):
  """Randomises the composition layers (including the zero-initialised output)."""
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  return {k: (jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), v)
              if k.startswith("composition_") else v) for k, v in params.items()}


def test_layer_selection_rule():
  assert select_layer_pairs(4, 8, 2) == ((1, 3), (3, 7))
  assert select_layer_pairs(6, 6, 3) == ((1, 1), (3, 3), (5, 5))
  with pytest.raises(ValueError, match="not divisible"):
    select_layer_pairs(5, 8, 2)
  c = CompositionConfig(anchor=ANCHOR, augments=(AUGMENT,), layer_pairs=(((0, 3), (1, 1)),))
  assert c.pairs == (((0, 3), (1, 1)),)
  with pytest.raises(ValueError, match=r"layer pair \(2, 3\).*out of range"):
    CompositionConfig(anchor=ANCHOR, augments=(AUGMENT,), layer_pairs=(((2, 3),),))


def test_tokenizers_must_agree():
  with pytest.raises(ValueError, match="tokenizers must agree"):
    CompositionConfig(anchor=ANCHOR, augments=(AUGMENT.replace(vocab_size=41),))


def test_zero_init_equals_anchor(models):
  anchor, aug = models
  module, params = compose_modules(anchor, [aug], num_composition_layers=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, V)
  ours, _ = module.apply({"params": params}, tokens)
  ref, _ = anchor.module.apply({"params": anchor.params}, tokens)
  np.testing.assert_array_equal(ours, ref)


def test_no_future_leak(models):
  anchor, aug = models
  module, params = compose_modules(anchor, [aug], zero_init_output=False)
  params = _nonzero(module, params)
  tokens = jax.random.randint(jax.random.key(0), (1, 9), 0, V)
  base, _ = module.apply({"params": params}, tokens)
  ref, _ = anchor.module.apply({"params": anchor.params}, tokens)
  assert np.abs(np.asarray(base) - np.asarray(ref)).max() > 1e-3  # composition is active
  for t in range(8):
    changed = tokens.at[0, t + 1:].set((tokens[0, t + 1:] + 7) % V)
    out, _ = module.apply({"params": params}, changed)
    np.testing.assert_allclose(out[0, :t + 1], base[0, :t + 1], atol=1e-6,
                               err_msg=f"logits at <= {t} depend on later tokens")


def test_padding_and_cache_equal_full(models):
  anchor, aug = models
  module, params = compose_modules(anchor, [aug, aug], zero_init_output=False,
                                   layer_pairs=(((0, 1), (1, 3)), ((1, 2),)))
  params = _nonzero(module, params)
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 1, V)
  full, _ = module.apply({"params": params}, tokens)
  cache = module.init_cache(2, 10)
  logits, cache = module.apply({"params": params}, tokens[:, :5], cache=cache)
  steps = [logits]
  for t in range(5, 8):
    logits, cache = module.apply({"params": params}, tokens[:, t:t + 1], cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
  # left padding changes nothing for the real tokens
  padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), tokens], 1)
  valid = jnp.concatenate([jnp.zeros((2, 3), bool), jnp.ones((2, 8), bool)], 1)
  out, _ = module.apply({"params": params}, padded, valid_BL=valid)
  np.testing.assert_allclose(out[:, 3:], full, atol=1e-5)


def test_generation_with_caches_equals_recompute(models):
  anchor, aug = models
  module, params = compose_modules(anchor, [aug], zero_init_output=False)
  params = _nonzero(module, params, seed=9)
  prompts = [[3, 4, 5, 6], [7, 8]]
  out = decoding.generate(module, params, prompts, max_new_tokens=6)
  for row, prompt in zip(out.tokens_BN, prompts):  # greedy by full recomputation
    seq = list(prompt)
    for _ in range(6):
      logits, _ = module.apply({"params": params}, jnp.array([seq]))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert list(row) == seq[len(prompt):]


def test_packed_segments_equal_separate_sequences(models):
  # Training packs examples; each segment must see only itself, at positions from 0.
  anchor, aug = models
  module, params = compose_modules(anchor, [aug], zero_init_output=False)
  params = _nonzero(module, params, seed=4)
  a = jax.random.randint(jax.random.key(1), (1, 5), 1, V)
  b = jax.random.randint(jax.random.key(2), (1, 4), 1, V)
  packed = jnp.concatenate([a, b], 1)
  segments = jnp.array([[1] * 5 + [2] * 4])
  out, _ = module.apply({"params": params}, packed, segment_ids_BL=segments)
  np.testing.assert_allclose(out[:, :5], module.apply({"params": params}, a)[0], atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], module.apply({"params": params}, b)[0], atol=1e-5)


def test_one_step_moves_only_composition(models):
  anchor, aug = models
  module, params = compose_modules(anchor, [aug])
  mask = trainable_mask(params)
  tx = optax.multi_transform({True: optax.adam(1e-2), False: optax.set_to_zero()},
                             jax.tree.map(lambda m: m, mask))
  state = tx.init(params)
  frozen_shapes = {x.shape for k in ("anchor", "augment_0") for x in jax.tree.leaves(params[k])}
  state_shapes = {x.shape for x in jax.tree.leaves(state) if hasattr(x, "shape") and x.ndim}
  comp_shapes = {x.shape for k, v in params.items() if k.startswith("composition_")
                 for x in jax.tree.leaves(v)}
  assert state_shapes <= comp_shapes and not (state_shapes - comp_shapes)
  assert not (frozen_shapes - comp_shapes) & state_shapes

  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, V)

  def loss(p):
    logits, _ = module.apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  for k in ("anchor", "augment_0"):
    jax.tree.map(np.testing.assert_array_equal, new[k], params[k])
  moved = [not np.array_equal(a, b) for k in params if k.startswith("composition_")
           for a, b in zip(jax.tree.leaves(new[k]), jax.tree.leaves(params[k]))]
  assert any(moved)


def test_save_and_load_composition(models, tmp_path):
  anchor, aug = models
  save_model(tmp_path / "anchor", anchor.config, anchor.params)
  save_model(tmp_path / "aug", aug.config, aug.params)
  a, g = load_checkpoint(tmp_path / "anchor"), load_checkpoint(tmp_path / "aug")
  module, params = compose_modules(a, [g], zero_init_output=False)
  params = _nonzero(module, params)
  save_composition(tmp_path / "comp", module.config, params,
                   anchor_checkpoint=str(tmp_path / "anchor"),
                   augment_checkpoints=[str(tmp_path / "aug")])
  files = {p.name: p.stat().st_size for p in (tmp_path / "comp").iterdir()}
  assert set(files) == {"composition.safetensors", "composition.json"}
  m2, p2, meta = load_composition(tmp_path / "comp")
  tokens = jax.random.randint(jax.random.key(0), (1, 5), 0, V)
  np.testing.assert_array_equal(module.apply({"params": params}, tokens)[0],
                                m2.apply({"params": p2}, tokens)[0])
  # the whole composed model also round-trips through our own checkpoint format
  save_model(tmp_path / "whole", module.config, params)
  whole = load_checkpoint(tmp_path / "whole")
  np.testing.assert_array_equal(whole.module.apply({"params": whole.params}, tokens)[0],
                                m2.apply({"params": p2}, tokens)[0])
  with pytest.raises(Exception, match="do not match"):
    load_composition(tmp_path / "comp", anchor=g, augments=[g])


def test_config_from_lists_is_hashable():
  # gin and JSON give lists; the config is a flax module attribute and must hash.
  a = DecoderConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32)
  b = DecoderConfig(vocab_size=32, d_model=24, num_layers=3, num_heads=2, d_ff=48)
  config = CompositionConfig(anchor=b, augments=[a], layer_pairs=[[[1, 0], [1, 2]]])
  assert config.pairs == (((1, 0), (1, 2)),)
  assert hash(ComposedModel(config=config)) == hash(ComposedModel(config=config))
