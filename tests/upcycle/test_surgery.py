"""Sparse upcycling, BTX and BAM surgery: function preservation, averaging, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.checkpoints.native import flatten
from moe_jax.models.bam_decoder import BamDecoder, BamDecoderConfig
from moe_jax.models.decoder import Decoder
from moe_jax.models.moe_decoder import MoeDecoder, MoeDecoderConfig
from moe_jax.upcycle import (ExpertPrompts, UpcycleError, bam_merge, btx_merge,
                             init_routers_from_vectors, prompt_router_vectors, sparse_upcycle)

from upcycle_helpers import logits_of, make_branch, make_config, make_params


def test_sparse_upcycle_preserves_the_dense_function(tokens):
  cfg = make_config()
  dense = make_params(cfg)
  want = logits_of(Decoder(config=cfg), dense, tokens)
  moe_cfg, params = sparse_upcycle(cfg, dense, num_experts=4, num_selected=2, seed=3)
  assert isinstance(moe_cfg, MoeDecoderConfig) and moe_cfg.moe.num_experts == 4
  mlp = params["layers_1"]["mlp"]
  assert mlp["experts"]["wi_0"]["kernel"].shape == (4, 32, 48)
  assert mlp["router"]["kernel"].shape == (32, 4)
  np.testing.assert_array_equal(mlp["experts"]["wo"]["kernel"][3],
                                dense["layers_1"]["mlp"]["wo"]["kernel"])
  assert params["layers_0"]["attn"] is not None
  got = logits_of(MoeDecoder(config=moe_cfg), params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # Any router: a different seed (and top-1) still gives the dense model.
  moe_cfg, params = sparse_upcycle(cfg, dense, num_experts=3, num_selected=1, seed=9,
                                   moe_layout="every_other")
  assert set(params["layers_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}
  np.testing.assert_allclose(logits_of(MoeDecoder(config=moe_cfg), params, tokens), want,
                             atol=2e-5, rtol=0)


def test_sparse_upcycle_noise_perturbs_all_but_expert_zero():
  cfg = make_config(num_layers=1)
  dense = make_params(cfg)
  _, params = sparse_upcycle(cfg, dense, num_experts=3, noise_std=0.01)
  k = params["layers_0"]["mlp"]["experts"]["wi_1"]["kernel"]
  w = dense["layers_0"]["mlp"]["wi_1"]["kernel"]
  np.testing.assert_array_equal(k[0], w)
  for e in (1, 2):
    rel = np.std(k[e] - w) / np.std(w)
    assert 0.005 < rel < 0.02, rel
  assert not np.array_equal(k[1], k[2])


def test_btx_equals_numpy_reference():
  cfg = make_config()
  seed = make_params(cfg)
  branches = [make_branch(seed, s) for s in (1, 2, 3)]
  moe_cfg, params = btx_merge([cfg] * 3, branches, moe_layout=(1,))
  assert moe_cfg.moe.num_experts == 3 and moe_cfg.moe.num_selected == 2
  flat = flatten(params)
  refs = [flatten(b) for b in branches]
  for name, value in flat.items():
    if "/router/" in name:
      assert value.shape == (32, 3)
    elif name.startswith("layers_1/mlp/experts/"):
      src = name.replace("experts/", "")
      np.testing.assert_array_equal(value, np.stack([r[src] for r in refs]))
    else:  # attention, norms, embeddings, head, and layer 0's dense FFN: the mean
      ref = (refs[0][name].astype(np.float64) + refs[1][name] + refs[2][name]) / 3
      np.testing.assert_allclose(value, ref, rtol=1e-6, atol=1e-7, err_msg=name)
  assert set(flat) - {n for n in flat if "/router/" in n or "/experts/" in n} <= set(refs[0])


@pytest.mark.parametrize("shared_kv", [False, True])
def test_bam_from_copies_reproduces_the_parallel_dense_model(tokens, shared_kv):
  cfg = make_config(parallel_block=True)
  dense = make_params(cfg, seed=1)
  want = logits_of(Decoder(config=cfg), dense, tokens)
  bam_cfg, params = bam_merge([cfg] * 3, [dense] * 3, shared_kv=shared_kv, seed=5)
  assert isinstance(bam_cfg, BamDecoderConfig)
  assert bam_cfg.moe.num_selected == 1 and bam_cfg.attention.num_selected is None
  attn = params["layers_0"]["attn"]
  assert attn["q"]["kernel"].shape == (3, 32, 4, 8)
  assert attn["o"]["kernel"].shape == (3, 4, 8, 32)
  assert attn["k"]["kernel"].shape == ((32, 2, 8) if shared_kv else (3, 32, 2, 8))
  got = logits_of(BamDecoder(config=bam_cfg), params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # top-k attention routing (renormalised) preserves it too
  bam_cfg, params = bam_merge([cfg] * 3, [dense] * 3, shared_kv=shared_kv, attention_top_k=2)
  got = logits_of(BamDecoder(config=bam_cfg), params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_bam_averages_non_experts_and_shared_kv():
  cfg = make_config(parallel_block=True, num_layers=1)
  seed = make_params(cfg)
  branches = [make_branch(seed, s) for s in (1, 2)]
  _, params = bam_merge([cfg] * 2, branches, shared_kv=True)
  a = params["layers_0"]["attn"]
  mean = lambda f: (f(branches[0]).astype(np.float64) + f(branches[1])) / 2  # noqa: E731
  np.testing.assert_allclose(a["k"]["kernel"], mean(lambda b: b["layers_0"]["attn"]["k"]["kernel"]),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(a["q"]["kernel"][1], branches[1]["layers_0"]["attn"]["q"]["kernel"])
  np.testing.assert_allclose(params["layers_0"]["input_norm"]["scale"],
                             mean(lambda b: b["layers_0"]["input_norm"]["scale"]), rtol=1e-6)
  np.testing.assert_allclose(params["embed"]["embedding"],
                             mean(lambda b: b["embed"]["embedding"]), rtol=1e-6, atol=1e-7)


def test_mismatched_inputs_name_the_tensor_or_field():
  cfg = make_config()
  a = make_params(cfg)
  wide = make_config(d_ff=40)
  with pytest.raises(UpcycleError, match=r"tensor 'layers_0/mlp/wi_0/kernel' has shape "
                     r"\(32, 48\) in a but \(32, 40\) in b"):
    btx_merge([cfg, wide], [a, make_params(wide)], names=["a", "b"])
  other = make_config(rope_theta=500.0)
  with pytest.raises(UpcycleError, match="config field 'rope_theta' is 10000.0 in input 0 but "
                     "500.0 in input 1"):
    bam_merge([cfg, other], [a, a])
  par = make_config(parallel_block=True)
  with pytest.raises(UpcycleError, match="lacks tensor 'layers_0/post_attn_norm/scale'"):
    btx_merge([cfg, par], [a, make_params(par)])
  moe_cfg, moe_params = sparse_upcycle(cfg, a, num_experts=2)
  with pytest.raises(UpcycleError, match="dense decoders"):
    btx_merge([moe_cfg, moe_cfg], [moe_params, moe_params])


def test_router_init_from_prompts_routes_each_domain_to_its_expert():
  cfg = make_config(parallel_block=True)
  dense = make_params(cfg)
  rng = np.random.default_rng(0)
  # three "domains": disjoint token ranges
  domains = [rng.integers(lo, lo + 15, size=(6, 8)) for lo in (1, 21, 41)]
  experts = [ExpertPrompts(positive=d[:4], negative=np.concatenate(
      [o[:2] for j, o in enumerate(domains) if j != i])) for i, d in enumerate(domains)]
  vectors = prompt_router_vectors(Decoder(config=cfg), dense, experts)
  assert vectors["mlp"].shape == (2, 3, 32) and vectors["attn"].shape == (2, 3, 32)
  np.testing.assert_allclose(np.linalg.norm(vectors["mlp"], axis=-1), 1.0, rtol=1e-5)
  bam_cfg, params = bam_merge([cfg] * 3, [dense] * 3)
  params = init_routers_from_vectors(params, vectors)
  np.testing.assert_allclose(params["layers_1"]["attn"]["router"]["kernel"],
                             vectors["attn"][1].T, rtol=1e-6)
  # Held-out prompts of each domain pick their own expert in every layer's FFN router.
  model = BamDecoder(config=bam_cfg)
  metrics = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["moe_metrics"])[1])
  for i, d in enumerate(domains):
    state = metrics(params, jnp.asarray(d[4:], jnp.int32))
    for layer in ("layers_0", "layers_1"):
      usage = np.asarray(state["moe_metrics"][layer]["mlp"]["expert_usage"][0])
      assert usage.argmax() == i, (i, layer, usage)
      weight = np.asarray(state["moe_metrics"][layer]["attn"]["attention_expert_weight"][0])
      assert weight.argmax() == i, (i, layer, weight)
  with pytest.raises(ValueError, match=r"router 'layers_0/mlp/router/kernel' has shape"):
    init_routers_from_vectors(params, {"mlp": vectors["mlp"][:, :2]})
