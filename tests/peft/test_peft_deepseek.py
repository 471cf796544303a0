"""PEFT on a DeepSeek-V3 decoder: LoRA on the latent attention's q / o projections, the dense
FFN and the routed experts; identity adapters leave the logits unchanged, k / v are refused by
name; the folded LoRA exports to transformers, and the adapters as a peft directory, with
our logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import peft
from moe_jax.models.deepseek import DeepseekConfig, DeepseekDecoder
from moe_jax.moe.layer import MoeConfig

from peft_util import random_params, with_adapters  # noqa: E402

VOCAB = 61


def deepseek(q_lora_rank=12):
  moe = MoeConfig(num_experts=4, num_selected=2, renormalize=True, scoring="sigmoid",
                  score_bias=True, num_expert_groups=2, topk_groups=1,
                  routed_scaling_factor=2.0, capacity_factor=None, expert_dim=8,
                  shared_expert_dim=8)
  config = DeepseekConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, d_ff=24,
                          moe=moe, moe_layout=(1,), kv_lora_rank=8, qk_nope_head_dim=4,
                          qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=q_lora_rank)
  module = DeepseekDecoder(config=config)
  return config, module, random_params(module)


def _logits(module, params, tokens):
  return np.asarray(jax.jit(module.apply)({"params": params}, tokens)[0])


def test_lora_on_latent_attention_ffn_and_experts():
  config, module, base = deepseek()
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, VOCAB, (2, 7)))
  cfg = peft.PeftConfig(method="lora", rank=2, sites=("q", "o", "ffn_in", "expert_in"))
  model = peft.adapt(module, cfg)
  identity = with_adapters(model, base, identity=True)
  attn = identity["layers_0"]["attn"]
  assert {"peft_q", "peft_o"} <= set(attn)  # q is the q_b projection (after the q latent)
  assert attn["peft_q"]["lora_a"].shape == (12, 2)
  np.testing.assert_allclose(_logits(model, identity, tokens), _logits(module, base, tokens),
                             atol=1e-6)
  adapted = with_adapters(model, base)
  assert np.abs(_logits(model, adapted, tokens) - _logits(module, base, tokens)).max() > 1e-3
  with pytest.raises(ValueError, match=r"no separate \('v',\) projection"):
    bad = peft.adapt(module, peft.PeftConfig(method="lora", rank=2, sites=("q", "v")))
    jax.eval_shape(bad.init, jax.random.key(0), tokens)


def test_folded_lora_exports_to_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from moe_jax.checkpoints import export_hf

  config, module, base = deepseek(q_lora_rank=None)
  base["layers_1"]["mlp"]["score_bias"] = np.linspace(-0.2, 0.2, 4).astype(np.float32)
  cfg = peft.PeftConfig(method="lora", rank=2, sites=("q", "o", "ffn_in"))
  model = peft.adapt(module, cfg)
  params = with_adapters(model, base)
  tokens = np.random.default_rng(1).integers(2, VOCAB, (2, 7))
  ours = _logits(model, params, jnp.asarray(tokens))
  peft.merge_and_export_hf(tmp_path / "hf", config, params, cfg)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                         attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  # attention, dense-FFN and shared-expert adapters as a Hugging Face peft directory (q ->
  # q_proj here, q_b_proj with a q latent) on the exported base; the FFN modules go to
  # target_parameters, else peft (0.21) retargets gate_proj / up_proj / down_proj onto
  # transformers 5's fused experts.gate_up_proj / down_proj of the MoE layers.
  hf_peft = pytest.importorskip("peft")
  cfg = peft.PeftConfig(method="lora", rank=2, sites=("q", "o", "ffn_in", "ffn_out"))
  model = peft.adapt(module, cfg)
  params = with_adapters(model, base)
  ours = _logits(model, params, jnp.asarray(tokens))
  export_hf(tmp_path / "base", config, base)
  peft.export_peft(tmp_path / "adapter", config, params, cfg)
  meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert meta["target_modules"] == ["o_proj", "q_proj"]
  assert "model.layers.1.mlp.shared_experts.down_proj.weight" in meta["target_parameters"]
  plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                            attn_implementation="eager")
  with torch.no_grad():
    theirs = hf_peft.PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()(
        input_ids=torch.tensor(tokens)).logits.numpy()
  assert not any(".experts." in name for name, _ in plain.named_modules()
                 if "lora" in name)  # nothing landed on the routed experts
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
