"""Remat policies and scanned layers (moe_jax.models.stack) on every family; layout conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.checkpoints import layout
from moe_jax.models import registry, stack
from moe_jax.models.bam_decoder import BamDecoderConfig
from moe_jax.models.decoder import DecoderConfig, init_cache
from moe_jax.models.moe_decoder import MoeDecoderConfig
from moe_jax.models.t5 import T5Config
from moe_jax.moe.attention_mixture import AttentionMixtureConfig
from moe_jax.moe.layer import MoeConfig

DENSE = DecoderConfig(vocab_size=61, d_model=32, num_layers=4, num_heads=4, d_ff=48,
                      num_kv_heads=2)
# Gemma-style alternating local / global layers with their own RoPE base: a period of 2.
GEMMA = DENSE.replace(sliding_window=3, sliding_window_layers=(0, 2), local_rope_theta=100.0,
                      qk_norm=True, post_sublayer_norms=True, norm_scale_offset=1.0)
MOE = MoeDecoderConfig(**{f: getattr(DENSE, f) for f in ("vocab_size", "d_model", "num_layers",
                                                          "num_heads", "d_ff", "num_kv_heads")},
                       moe=MoeConfig(num_experts=4, num_selected=2, dispatch="onehot"),
                       moe_layout="every_other")
BAM = BamDecoderConfig(**{f: getattr(DENSE, f) for f in ("vocab_size", "d_model", "num_layers",
                                                          "num_heads", "d_ff", "num_kv_heads")},
                       moe=MoeConfig(num_experts=2, num_selected=1, dispatch="onehot"),
                       attention=AttentionMixtureConfig(num_experts=2), parallel_block=True)
T5C = T5Config(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2,
               num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
CONFIGS = {"dense": DENSE, "gemma": GEMMA, "moe": MOE, "bam": BAM, "t5": T5C}


def _tokens(config, seed=0):
  rng = np.random.default_rng(seed)
  toks = [jnp.asarray(rng.integers(0, config.vocab_size, (2, 7)))]
  return toks * 2 if isinstance(config, T5Config) else toks


def _init(config):
  kind = registry.kind_of(config)
  module = registry.build_module(config, kind)
  return module, nn.meta.unbox(module.init(jax.random.key(0), *_tokens(config))["params"])


def _logits_and_grads(config, params):
  module = registry.build_module(config)
  toks = _tokens(config, 1)

  def loss(p):
    logits, _ = module.apply({"params": p}, *toks, mutable=["aux_loss"])[0]
    return jnp.mean(logits ** 2), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_defaults_keep_the_unrolled_tree():
  _, params = _init(DENSE)
  assert sorted(k for k in params if k.startswith("layers")) == [f"layers_{i}" for i in range(4)]
  assert DENSE.remat_policy == "none" and not DENSE.scan_layers


def test_unknown_remat_policy_names_the_field():
  with pytest.raises(ValueError, match="remat_policy"):
    DENSE.replace(remat_policy="sometimes")


@pytest.mark.parametrize("policy", [p for p in stack.REMAT_POLICIES if p != "none"])
def test_remat_gradients_equal_plain(policy):
  _, params = _init(DENSE)
  ref_logits, ref = _logits_and_grads(DENSE, params)
  logits, grads = _logits_and_grads(DENSE.replace(remat_policy=policy), params)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6, rtol=1e-6)  # fusion order only
  assert _max_diff(grads, ref) <= 1e-6


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_scanned_equals_unrolled(family):
  """Same logits (1e-5) and gradients, remat inside the scan; layouts convert both ways."""
  config = CONFIGS[family]
  _, params = _init(config)
  scanned = config.replace(scan_layers=True, remat_policy="dots_no_batch")
  _, fresh = _init(scanned)
  stacked = layout.match_layout(params, fresh)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), stacked, fresh)
  ref_logits, ref_grads = _logits_and_grads(config, params)
  logits, grads = _logits_and_grads(scanned, stacked)
  assert _max_diff(logits, ref_logits) <= 1e-5
  assert _max_diff(layout.match_layout(grads, params), ref_grads) <= 1e-5
  jax.tree.map(np.testing.assert_array_equal, layout.unrolled(stacked), params)


def test_period_of_alternating_and_moe_layouts():
  _, gemma = _init(GEMMA.replace(scan_layers=True))
  assert set(gemma["layers"]) == {"block_0", "block_1"}
  assert gemma["layers"]["block_0"]["attn"]["q"]["kernel"].shape[0] == 2
  _, moe = _init(MOE.replace(scan_layers=True))
  assert "experts" in moe["layers"]["block_1"]["mlp"] and "wi_0" in moe["layers"]["block_0"]["mlp"]
  assert stack.find_period([1, 2, 1, 2, 1, 2]) == 2 and stack.find_period([1, 1, 2]) == 3


def test_boxed_metadata_gains_and_loses_the_layers_axis():
  module = registry.build_module(DENSE)
  boxed = module.init(jax.random.key(0), *_tokens(DENSE))["params"]
  stacked = layout.stack_layers(boxed)
  assert stacked["layers"]["attn"]["q"]["kernel"].names == ("layers", "embed", "heads", "kv")
  scanned = registry.build_module(DENSE.replace(scan_layers=True))
  native = scanned.init(jax.random.key(0), *_tokens(DENSE))["params"]
  assert native["layers"]["attn"]["q"]["kernel"].names == ("layers", "embed", "heads", "kv")
  back = layout.unstack_layers(stacked)
  assert back["layers_3"]["attn"]["q"]["kernel"].names == ("embed", "heads", "kv")


def _decode_stepwise(config, params, toks):
  module = registry.build_module(config)
  cache = module.init_cache(2, 10) if hasattr(module, "init_cache") else init_cache(config, 2, 10)
  outs = []
  for t in range(toks.shape[1]):
    (logits, cache), _ = module.apply({"params": params}, toks[:, t:t + 1], cache=cache,
                                      mutable=["aux_loss"])
    outs.append(logits)
  return np.concatenate(outs, 1), cache


@pytest.mark.parametrize("family", ["gemma", "bam"])
def test_cached_decoding_on_a_scanned_stack(family):
  """Stacked caches; token by token, the scanned model gives the unrolled one's logits."""
  config = CONFIGS[family]
  module, params = _init(config)
  scanned = config.replace(scan_layers=True)
  toks = _tokens(config, 2)[0]
  ref, _ = _decode_stepwise(config, params, toks)
  _, fresh = _init(scanned)
  got, cache = _decode_stepwise(scanned, layout.match_layout(params, fresh), toks)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert len(cache.layers) == (2 if family == "gemma" else 1)
  assert cache.layers[0].k.shape[:2] == (4 // len(cache.layers), 2)
  if family == "gemma":  # and equals the full forward
    full, _ = module.apply({"params": params}, toks)
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)


def test_after_layer_may_only_read_a_scanned_stack():
  module, params = _init(DENSE.replace(scan_layers=True))
  seen = []
  module.apply({"params": params}, _tokens(DENSE)[0],
               after_layer=lambda i, x: seen.append(i) or x)
  assert seen == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="scan_layers"):
    module.apply({"params": params}, _tokens(DENSE)[0], after_layer=lambda i, x: x + 1)


def test_checkpoints_restore_in_the_other_layout(tmp_path):
  from moe_jax.checkpoints import load_checkpoint, save_model
  from moe_jax.checkpoints.assignment import apply_assignment_map
  from moe_jax.checkpoints.native import flatten

  _, params = _init(GEMMA)
  save_model(tmp_path / "unrolled", GEMMA, params)
  scanned = load_checkpoint(tmp_path / "unrolled", scan_layers=True)
  assert scanned.config.scan_layers and "layers" in scanned.params
  save_model(tmp_path / "scanned", scanned.config, scanned.params)
  back = load_checkpoint(tmp_path / "scanned", scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, back.params, params)
  # partial restore (assignment map) from an unrolled checkpoint into a scanned target
  tree, report = apply_assignment_map(scanned.params, flatten(params))
  assert not report.fresh and not report.unused_source
  jax.tree.map(np.testing.assert_array_equal, tree, scanned.params)


def test_orbax_training_checkpoint_restores_in_the_other_layout(tmp_path):
  from moe_jax.checkpoints import load_checkpoint
  from moe_jax.checkpoints.orbax import CheckpointConfig, Checkpointer, write_model_config

  _, params = _init(DENSE)
  write_model_config(tmp_path / "run", DENSE)
  ckpt = Checkpointer(tmp_path / "run", CheckpointConfig(async_save=False))
  ckpt.save(1, params=params, opt_state={"count": np.zeros((), np.int32)})
  ckpt.close()
  loaded = load_checkpoint(tmp_path / "run", scan_layers=True)
  assert loaded.config.scan_layers and loaded.params["layers"]["attn"]["q"]["kernel"].shape[0] == 4
  jax.tree.map(np.testing.assert_array_equal, layout.unrolled(loaded.params), params)
