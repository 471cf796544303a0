"""Adapted backbones: identity at initialisation, unchanged parameter tree, freezing, routing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import peft
from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.train.partitioning import DEFAULT_RULES

from peft_util import (backbone, inputs, logits, randomize_adapters, rng_key,
                       with_adapters)

ALL_LORA = ("q", "k", "v", "o", "ffn_in", "ffn_out")
CASES = [
    ("decoder", dict(method="ia3")),
    ("decoder", dict(method="molora", num_experts=3, sites=ALL_LORA, top_k=2,
                     router="sentence")),
    ("decoder_parallel", dict(method="mov", num_experts=4, sites=("q", "k", "v", "ffn"))),
    ("t5_v1_0", dict(method="lora", sites=ALL_LORA)),
    ("t5_v1_1", dict(method="mov", num_experts=4, router="sentence", top_k=2,
                     renormalize=False, sites=("q", "k", "v", "ffn"))),
]


def _adapted(kind, **kw):
  """``(config, backbone, base params, peft config, adapted model, initialised params)``."""
  return _adapted_cached(kind, peft.PeftConfig(**kw))


def _quick(kind, identity=False, **kw):
  """Like :func:`_adapted` with NumPy-made adapters (no initialiser compiled)."""
  config, module, base = backbone(kind)
  cfg = peft.PeftConfig(**kw)
  model = peft.adapt(module, cfg)
  return config, module, base, cfg, model, with_adapters(model, base, identity=identity)


@functools.lru_cache(maxsize=None)
def _adapted_cached(kind, cfg):
  config, module, base = backbone(kind)
  model = peft.adapt(module, cfg)
  params = peft.init_adapter_params(model, base, rng_key())
  return config, module, base, cfg, model, params


@pytest.mark.parametrize("kind, kw", CASES, ids=[f"{k}-{v['method']}-{i}"
                                                 for i, (k, v) in enumerate(CASES)])
def test_starts_exactly_at_the_backbone_and_keeps_its_tree(kind, kw):
  _, module, base, cfg, model, params = _adapted(kind, **kw)
  backbone_part, adapters = peft.split_params(params)
  # The backbone's parameters are there under their own names, untouched.
  assert jax.tree.structure(backbone_part) == jax.tree.structure(base)
  for got, want in zip(jax.tree.leaves(backbone_part), jax.tree.leaves(base)):
    assert got is want
  assert adapters
  mask = peft.trainable_mask(params)
  assert sum(jax.tree.leaves(mask)) == len(jax.tree.leaves(adapters))
  # Identity at initialisation: vectors of one, B = 0 (bit for bit: see the next test).
  ref = logits(module, base, kind)
  got = logits(model, params, kind)
  if kw.get("top_k") and not kw.get("renormalize", True):
    assert np.abs(got - ref).max() > 1e-3  # top-k without renormalisation scales by Σw < 1
  else:
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
  # ... and trained adapters do change the output.
  moved = logits(model, randomize_adapters(params), kind)
  assert np.abs(moved - ref).max() > 1e-3


@pytest.mark.parametrize("kw", [
    dict(method="molora", num_experts=3, sites=ALL_LORA, top_k=2, router="sentence"),
    dict(method="mov", num_experts=4, sites=("q", "k", "v", "ffn")),
])
def test_initial_logits_are_bit_identical_op_by_op(kw):
  # Op by op, adding B = 0 and scaling by ones is exact. (Under jit, XLA may fuse
  # those ops into the projections' kernels and round the last bit differently.)
  # The decoder only: T5 runs the same adapted layers, and T5 op by op takes ~30 s.
  _, module, base, _, model, params = _quick("decoder", identity=True, **kw)
  np.testing.assert_array_equal(logits(model, params, "decoder", jit=False),
                                logits(module, base, "decoder", jit=False))


def test_every_adapter_parameter_has_known_logical_axes():
  _, _, _, _, model, params = _quick("t5_v1_1", method="molora", num_experts=3,
                                       sites=ALL_LORA)
  _, axes = peft.split_params(peft.logical_axes(model))
  _, adapters = peft.split_params(params)
  known = {name for name, _ in DEFAULT_RULES}
  specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree.leaves(adapters)
  assert len(specs) == len(shapes)
  for spec, x in zip(specs, shapes):
    assert len(spec) == np.ndim(x) and set(spec) <= known, (spec, np.shape(x))


def test_parameter_report_counts_adapters_and_share():
  config, _, base, _, _, params = _adapted("decoder", method="ia3")
  report = peft.parameter_report(params)
  c = config
  per_layer = 2 * c.kv_heads * c.dh + c.d_ff
  assert report["trainable"] == c.num_layers * per_layer
  assert report["backbone"] == sum(np.size(x) for x in jax.tree.leaves(base))
  assert report["share"] == pytest.approx(report["trainable"] / report["backbone"])
  assert set(report["by_site"]) == {"peft_k", "peft_v", "peft_hidden"}

  config, _, _, cfg, _, params = _quick("decoder", method="molora", num_experts=5, rank=2,
                                          sites=("q", "o"))
  d, h, dh, e, r = c.d_model, c.num_heads, c.dh, 5, 2
  per_site = e * r * (d + h * dh) + d * e  # A, B and the router
  assert peft.parameter_report(params)["trainable"] == c.num_layers * 2 * per_site


@pytest.mark.parametrize("kind, kw", [
    ("decoder", dict(method="molora", num_experts=3, sites=ALL_LORA, load_balance_coef=0.1)),
    ("t5_v1_0", dict(method="mov", num_experts=4, z_loss_coef=1e-3)),
])
def test_one_optimizer_step_moves_only_the_adapters(kind, kw):
  _, _, base, _, model, params = _quick(kind, identity=True, **kw)
  mask = peft.trainable_mask(params)
  args, call_kw = inputs(kind)
  targets = jnp.asarray(np.random.default_rng(0).integers(0, 61, args[-1].shape))

  def loss_fn(p):
    (out, _), state = model.apply({"params": p}, *args, **call_kw,
                                  mutable=[peft.AUX_LOSS_COLLECTION, peft.METRICS_COLLECTION])
    ce = optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()
    return ce + peft.total_aux_loss(state)

  tx = peft.masked_optimizer(optax.adam(1e-2), mask)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    grads = jax.grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return peft.apply_masked_updates(p, updates, mask), s

  new, opt_state = step(params, opt_state)
  new_backbone, new_adapters = peft.split_params(new)
  for got, want in zip(jax.tree.leaves(new_backbone), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                  np.asarray(want).view(np.uint32))
  _, old_adapters = peft.split_params(params)

  def moved(path, a, b):
    name = str(path[-1].key)
    # At step 0 only B (LoRA) and the vectors (MoV) have a gradient: with B = 0 or
    # identical vectors, A and the router do not yet affect the output.
    if name in ("lora_b", "scale"):
      assert not np.array_equal(a, b), jax.tree_util.keystr(path)

  jax.tree_util.tree_map_with_path(moved, new_adapters, old_adapters)
  # The optimizer holds state for the adapters only.
  state_arrays = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
  adapter_shapes = {np.shape(x) for x in jax.tree.leaves(old_adapters)}
  frozen_shapes = {np.shape(x) for x in jax.tree.leaves(base)} - adapter_shapes
  assert not [np.shape(x) for x in state_arrays if np.shape(x) in frozen_shapes]
  n_adapter = sum(np.size(x) for x in jax.tree.leaves(old_adapters))
  assert sum(np.size(x) for x in state_arrays) == 2 * n_adapter  # Adam's mu and nu


def test_router_metrics_and_aux_losses_are_sown_per_site():
  _, _, _, _, model, params = _quick("decoder", method="mov", num_experts=4,
                                       load_balance_coef=0.01, z_loss_coef=0.001)
  args, kw = inputs("decoder")
  _, state = model.apply({"params": params}, *args, **kw,
                         mutable=[peft.AUX_LOSS_COLLECTION, peft.METRICS_COLLECTION])
  aux = state[peft.AUX_LOSS_COLLECTION]
  assert set(aux["layers_1"]["mlp"]["peft_hidden"]["router"]) == {"load_balancing_loss",
                                                                  "router_z_loss"}
  n_sites = 2 * 3  # layers x (k, v, ffn)
  assert len(jax.tree.leaves(aux)) == 2 * n_sites
  summary = peft.summarize_metrics(state)
  assert set(summary) == {"load_balancing_loss", "router_z_loss", "usage_entropy",
                          "router_confidence"}
  assert 0 < float(summary["usage_entropy"]) <= np.log(4) + 1e-6
  assert 0.25 <= float(summary["router_confidence"]) <= 1.0
  assert float(peft.total_aux_loss(state)) > 0


def test_cached_decoding_with_token_routing_equals_full_pass():
  from moe_jax.models.decoder import init_cache
  config, _, _, _, model, params = _quick("decoder", method="molora", num_experts=3,
                                            sites=ALL_LORA)
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, 61, (2, 6)))
  apply = jax.jit(model.apply)
  full, _ = apply({"params": params}, tokens)
  cache = init_cache(config, 2, 8)
  steps = []
  for t in range(6):
    out, cache = apply({"params": params}, tokens[:, t:t + 1], cache=cache)
    steps.append(out)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


def test_t5_incremental_decoding_with_adapted_cross_attention():
  from moe_jax.models.t5 import T5
  _, _, _, _, model, params = _quick("t5_v1_1", method="mov", num_experts=3,
                                       sites=("k", "v", "ffn"))
  (enc, dec), kw = inputs("t5_v1_1")
  v = {"params": params}
  full, _ = jax.jit(model.apply)(v, enc, dec, enc_valid_BL=kw["enc_valid_BL"])
  cache = jax.jit(lambda v: model.apply(
      v, model.apply(v, enc, kw["enc_valid_BL"], method=T5.encode), kw["enc_valid_BL"], 8,
      method=T5.init_decode_cache))(v)
  step = jax.jit(lambda v, tok, cache: model.apply(v, tok, cache=cache, method=T5.decode))
  steps = []
  for t in range(dec.shape[1]):
    out, cache = step(v, dec[:, t:t + 1], cache)
    steps.append(out)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


def test_sentence_routing_respects_padding_segments_and_causality():
  _, _, _, _, model, params = _quick("decoder", method="mov", num_experts=4, router="sentence",
                                     sites=("q", "k", "v", "ffn"))
  a, b = [3, 4, 5, 6, 7], [8, 9, 10]
  rows = [a + [11, 12, 13], a + [50, 51, 52], a + b, a[:3] + [11, 12, 13, 14, 15],
          b + [11, 12, 13, 14, 15]]
  segs = [[1] * 5 + [0] * 3, [1] * 5 + [0] * 3, [1] * 5 + [2] * 3, [1] * 3 + [0] * 5,
          [1] * 3 + [0] * 5]
  out, _ = jax.jit(model.apply)({"params": params}, jnp.array(rows),
                                segment_ids_BL=jnp.array(segs))
  np.testing.assert_allclose(out[0, :5], out[1, :5], atol=1e-5)  # padding is not pooled
  np.testing.assert_allclose(out[2, :5], out[0, :5], atol=1e-5)  # a segment pools itself
  np.testing.assert_allclose(out[2, 5:], out[4, :3], atol=1e-5)
  np.testing.assert_allclose(out[3, :3], out[0, :3], atol=1e-5)  # causal: no peeking ahead


def test_t5_sentence_routing_pools_the_source_sentence():
  _, _, _, _, model, params = _quick("t5_v1_0", method="mov", num_experts=3,
                                       router="sentence")
  enc = jnp.array([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 40, 41]])
  dec = jnp.array([[0, 9, 10], [0, 9, 10]])
  out, _ = jax.jit(model.apply)({"params": params}, enc, dec,
                                enc_valid_BL=jnp.array([[True] * 4 + [False] * 2] * 2))
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)  # padding is not pooled


def test_sentence_routing_refuses_incremental_decoding():
  from moe_jax.models.decoder import init_cache
  from moe_jax.models.t5 import T5
  config, _, _, _, model, params = _quick("decoder", method="mov", num_experts=2,
                                            router="sentence")
  with pytest.raises(ValueError, match="full sequences only"):
    model.apply({"params": params}, jnp.array([[3, 4]]), cache=init_cache(config, 1, 4))
  _, _, _, _, model, params = _quick("t5_v1_0", method="mov", num_experts=2,
                                       router="sentence")
  enc = jnp.zeros((1, 3, 16))
  with pytest.raises(ValueError, match="cross_attn: sentence-level routing"):
    model.apply({"params": params}, enc, None, 4, method=T5.init_decode_cache)


def test_errors_name_the_problem():
  _, module, base, _, model, _ = _adapted("decoder", method="ia3")
  with pytest.raises(TypeError, match="already adapted"):
    peft.adapt(model, peft.PeftConfig(method="lora"))
  with pytest.raises(TypeError, match="unsupported model Dense"):
    peft.adapt(nn.Dense(3), peft.PeftConfig(method="lora"))
  broken = jax.tree.map(lambda x: x, base)
  broken["layers_1"]["mlp"]["wo"]["kernel"] = np.zeros((3, 3), np.float32)
  with pytest.raises(CheckpointError, match=r"layers_1/mlp/wo/kernel' has shape \(3, 3\)"):
    peft.init_adapter_params(model, broken, rng_key())
  del broken["layers_1"]["mlp"]["wo"]
  with pytest.raises(CheckpointError, match=r"missing parameter\(s\) \['layers_1/mlp/wo/kernel"):
    peft.init_adapter_params(model, broken, rng_key())
