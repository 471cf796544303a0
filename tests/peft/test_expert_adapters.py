"""Adapters on the routed experts of an MoE layer: one LoRA / (IA)^3 vector per expert, on
every dispatch path, against a naive per-expert reference."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import peft
from moe_jax.models.decoder import Decoder, DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoder
from moe_jax.train.partitioning import DEFAULT_RULES, make_mesh
from moe_jax.upcycle import sparse_upcycle

from peft_util import check_adapted, random_params, randomize_adapters, with_adapters

VOCAB = 61
DENSE = DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=24, max_seq_len=32)
LORA = dict(method="lora", sites=("q", "expert_in", "expert_out"), rank=2, alpha=3.0)
IA3 = dict(method="ia3", sites=("k", "expert_ffn"))


@pytest.fixture(scope="module")
def upcycled():
  dense = random_params(Decoder(config=DENSE), seed=0)
  config, params = sparse_upcycle(DENSE, dense, num_experts=4, num_selected=2, moe_layout=(1,),
                                  noise_std=0.3)
  return config, params


def _tokens():
  rng = np.random.default_rng(3)
  valid = np.ones((2, 7), bool)
  valid[1, 5:] = False
  return jnp.asarray(rng.integers(2, VOCAB, (2, 7))), jnp.asarray(valid)


def _logits(module, params):
  tokens, valid = _tokens()
  out, _ = jax.jit(lambda p: module.apply({"params": p}, tokens, valid_BL=valid))(params)
  return np.asarray(out)


def _naive(params, cfg):
  """The backbone parameters with each expert's adapter applied by a loop over experts."""
  backbone, _ = peft.split_params(params)
  experts = {k: dict(v) for k, v in backbone["layers_1"]["mlp"]["experts"].items()}
  ad = params["layers_1"]["mlp"]["experts"]
  for name in experts:
    w = np.array(experts[name]["kernel"], np.float32)
    for e in range(w.shape[0]):
      if cfg.is_lora:
        a, b = (np.asarray(ad[f"peft_{name}"][k][e], np.float64) for k in ("lora_a", "lora_b"))
        w[e] = w[e] + cfg.scaling * (a @ b)
      elif name == "wo":
        w[e] = w[e] * np.asarray(ad["peft_hidden"]["scale"][e])[:, None]
    experts[name] = {"kernel": w}
  out = jax.tree.map(lambda x: x, backbone)
  out["layers_1"]["mlp"]["experts"] = experts
  return out


@pytest.mark.parametrize("kw", [LORA, IA3], ids=["lora", "ia3"])
def test_expert_adapters_train_alone_and_change_the_output(upcycled, kw):
  config, base = upcycled
  cfg = peft.PeftConfig(**kw)
  # names unchanged, identity at init, a step moves every adapter (expert ones included)
  # and leaves the backbone bit for bit
  model, params = check_adapted(MoeDecoder(config=config), base, cfg, *_tokens())
  _, adapters = peft.split_params(params)
  experts = adapters["layers_1"]["mlp"]["experts"]
  if cfg.is_lora:
    assert {k: v["lora_a"].shape for k, v in experts.items()} == {
        "peft_wi_0": (4, 16, 2), "peft_wi_1": (4, 16, 2), "peft_wo": (4, 24, 2)}
    assert experts["peft_wo"]["lora_b"].shape == (4, 2, 16)
  else:
    assert experts == {"peft_hidden": {"scale": experts["peft_hidden"]["scale"]}}
    assert experts["peft_hidden"]["scale"].shape == (4, 24)
  # gradients reach the expert adapters, and nothing else but adapters
  tokens, valid = _tokens()

  def loss(p):
    out, _ = model.apply({"params": p}, tokens, valid_BL=valid)
    return jnp.mean(out ** 2)

  grads = jax.grad(loss)(randomize_adapters(params))
  _, g_adapters = peft.split_params(grads)
  for leaf in jax.tree.leaves(g_adapters["layers_1"]["mlp"]["experts"]):
    assert np.abs(leaf).max() > 0
  axes = peft.logical_axes(model)["layers_1"]["mlp"]["experts"]
  key = "peft_wo" if cfg.is_lora else "peft_hidden"
  assert tuple(jax.tree.leaves(axes[key], is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec))[0])[0] == "expert"  # sharded with the experts


@pytest.mark.parametrize("dispatch", ["sorted", "ragged", "onehot"])
@pytest.mark.parametrize("kw", [LORA, IA3], ids=["lora", "ia3"])
def test_every_dispatch_path_equals_the_naive_per_expert_computation(upcycled, kw, dispatch):
  config, base = upcycled
  config = config.replace(moe=dataclasses.replace(config.moe, dispatch=dispatch))
  module = MoeDecoder(config=config)
  cfg = peft.PeftConfig(**kw).replace(sites=tuple(s for s in kw["sites"] if "expert" in s))
  model = peft.adapt(module, cfg)
  params = with_adapters(model, base, seed=2)
  ours = _logits(model, params)
  assert np.abs(ours - _logits(module, base)).max() > 1e-3
  np.testing.assert_allclose(ours, _logits(module, _naive(params, cfg)), atol=2e-5)
  folded = peft.fold_adapters(params, cfg)
  assert jax.tree.structure(folded) == jax.tree.structure(base)
  np.testing.assert_allclose(_logits(module, folded), ours, atol=2e-5)


def test_expert_sites_refuse_mixtures_and_the_peft_format(upcycled, tmp_path):
  with pytest.raises(ValueError, match=r"expert_in.*a mixture of 3 adapters cannot sit there"):
    peft.PeftConfig(method="molora", num_experts=3, sites=("q", "expert_in"))
  config, base = upcycled
  single = peft.PeftConfig(method="molora", num_experts=1, sites=("expert_out",))
  model = peft.adapt(MoeDecoder(config=config), single)
  params = with_adapters(model, base, seed=4)
  np.testing.assert_allclose(_logits(MoeDecoder(config=config), peft.fold_adapters(
      params, single)), _logits(model, params), atol=2e-5)
  with pytest.raises(ValueError, match=r"layers_1/mlp/experts/peft_wo: adapters on stacked "
                                       r"expert weights.*merge_and_export_hf"):
    peft.export_peft(tmp_path / "x", config, params, single)
  dense = peft.adapt(Decoder(config=DENSE),
                     peft.PeftConfig(method="ia3", sites=("k", "expert_ffn")))
  with pytest.raises(ValueError, match="site 'expert_ffn' of ia3 matches no module"):
    peft.init_adapter_params(dense, random_params(Decoder(config=DENSE)), jax.random.key(0))


def test_expert_parallel_runs_the_adapted_experts(upcycled):
  config, base = upcycled
  config = config.replace(moe=dataclasses.replace(config.moe, expert_parallel=True))
  model = peft.adapt(MoeDecoder(config=config), peft.PeftConfig(**LORA))
  params = with_adapters(model, base, seed=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, VOCAB, (8, 8)))
  fn = lambda p: model.apply({"params": p}, tokens)[0]  # noqa: E731
  single = np.asarray(jax.jit(fn)(params))
  with jax.set_mesh(make_mesh({"data": 2, "expert": 4})), nn.logical_axis_rules(DEFAULT_RULES):
    compiled = jax.jit(fn).lower(params).compile()
  assert "all-to-all" in compiled.as_text()
  np.testing.assert_allclose(np.asarray(compiled(params)), single, atol=2e-5)
