"""DeepSeek-V3 in and out: tiny random transformers checkpoints (latent attention with and
without a q latent, dense first layer, group-limited sigmoid router with a non-zero correction
bias, a shared expert); our logits and greedy tokens (KV-cached) match theirs, and our export
reloads in transformers with the same logits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax.checkpoints import CheckpointError, export_hf, load_hf  # noqa: E402

import hf_util  # noqa: E402
from hf_util import our_logits  # noqa: E402

VOCAB = 67
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
              kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16,
              n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
              norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False,
              rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    # q_a -> norm -> q_b, interleaved RoPE with YaRN (rotated dims and softmax rescaled)
    "q_lora": dict(q_lora_rank=24, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
        beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=1.0)),
    "q_direct": dict(q_lora_rank=None, rope_interleave=False, attention_bias=True),
}


def _nonzero_correction_bias(model):
  for layer in model.model.layers[1:]:  # a buffer, zero at init
    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)


def make_hf(path, variant):
  return hf_util.make_hf(path, "DeepseekV3Config", "DeepseekV3ForCausalLM",
                         {**COMMON, **VARIANTS[variant]}, redraw=hf_util.MOE_REDRAW,
                         adjust=_nonzero_correction_bias)


def batch(rng, **kw):
  return hf_util.batch(rng, VOCAB, **kw)


checkpoint = hf_util.checkpoint_fixture(make_hf, VARIANTS)


def test_import_matches_transformers_and_export_reloads(checkpoint, tmp_path):
  variant, path, model = checkpoint
  loaded = load_hf(path)
  c = loaded.config
  m = c.moe
  assert c.moe_layout == (1, 2) and m.capacity_factor is None and m.scoring == "sigmoid"
  assert (m.num_expert_groups, m.topk_groups, m.routed_scaling_factor) == (4, 2, 2.5)
  assert m.shared_hidden_dim == 32 and m.expert_dim == 32 and c.d_ff == 96
  assert c.q_lora_rank == VARIANTS[variant]["q_lora_rank"]
  assert (c.rope_yarn is not None) == (variant == "q_lora")
  assert np.abs(loaded.params["layers_1"]["mlp"]["score_bias"]).max() > 0
  ids, mask = batch(np.random.default_rng(0))
  hf_util.assert_import_matches_and_export_reloads(
      model, loaded, ids, mask, tmp_path / "out", architecture="DeepseekV3ForCausalLM",
      label=variant)


def test_greedy_tokens_match_transformers(checkpoint):
  variant, path, model = checkpoint
  loaded = load_hf(path)
  cache = loaded.module.init_cache(2, 16)
  assert cache.layers[0].latent.shape == (2, 16, 16)  # the compressed cache: R + P per token
  ids, mask = batch(np.random.default_rng(1), length=6)
  hf_util.assert_greedy_matches(model, loaded, ids, mask, max_new_tokens=8, label=variant)


def test_fused_in_memory_layout_and_mtp_layers_load(checkpoint, tmp_path):
  """transformers 5's in-memory names (experts.gate_up_proj / down_proj) load like the saved
  ones; multi-token-prediction layers past num_hidden_layers are skipped."""
  import shutil

  from safetensors.torch import save_file

  variant, path, model = checkpoint
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  state["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)  # an MTP layer's tensor
  (tmp_path / "fused").mkdir()
  shutil.copy(path / "config.json", tmp_path / "fused" / "config.json")
  save_file(state, str(tmp_path / "fused" / "model.safetensors"))
  fused, saved = load_hf(tmp_path / "fused"), load_hf(path)
  ids, mask = batch(np.random.default_rng(2))
  np.testing.assert_array_equal(our_logits(fused, ids, mask), our_logits(saved, ids, mask))


def test_unsupported_fields_are_named(tmp_path):
  from moe_jax.checkpoints.hf_deepseek import DeepseekConverter

  conv = DeepseekConverter()
  base = {**COMMON, "model_type": "deepseek_v3", "q_lora_rank": 24}
  with pytest.raises(CheckpointError, match="rope_parameters.rope_type='longrope'"):
    conv.config_from_hf({**base, "rope_parameters": {"rope_type": "longrope"}})
  with pytest.raises(CheckpointError, match="need 'factor' and 'original_max_position"):
    conv.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 40.0}})
  with pytest.raises(CheckpointError, match="quantization_config"):
    conv.config_from_hf({**base, "quantization_config": {"quant_method": "fp8"}})
  with pytest.raises(CheckpointError, match="num_key_value_heads=2"):
    conv.config_from_hf({**base, "num_key_value_heads": 2})
  c = conv.config_from_hf(base)
  softmax = c.replace(moe=c.moe.replace(scoring="softmax", score_bias=False, num_expert_groups=1,
                                        topk_groups=1, routed_scaling_factor=1.0))
  with pytest.raises(CheckpointError, match="sigmoid scores"):
    export_hf(tmp_path / "x", softmax, {})
  assert not (tmp_path / "x").exists()


def test_scanned_stack_and_native_checkpoint(checkpoint, tmp_path):
  """A scanned stack (dense layer 0, MoE layers 1-2) and our own format give the same logits."""
  from moe_jax.checkpoints import load_checkpoint, save_model

  variant, path, _ = checkpoint
  loaded = load_hf(path)
  ids, mask = batch(np.random.default_rng(3))
  want = our_logits(loaded, ids, mask)
  scanned = load_hf(path, scan_layers=True)
  np.testing.assert_allclose(our_logits(scanned, ids, mask), want, atol=1e-5)
  save_model(tmp_path / "native", loaded.config, loaded.params)
  native = load_checkpoint(tmp_path / "native")
  assert native.config == loaded.config
  np.testing.assert_array_equal(our_logits(native, ids, mask), want)
