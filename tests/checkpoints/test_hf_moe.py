"""Qwen2-MoE, Qwen3-MoE and OLMoE in and out: tiny random transformers checkpoints, our logits
and greedy tokens match theirs, and our export reloads in transformers with the same logits."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax.checkpoints import CheckpointError, export_hf, load_hf  # noqa: E402

import hf_util  # noqa: E402
from hf_util import hf_logits, our_logits  # noqa: E402

VOCAB = 67
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
              num_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-6)
VARIANTS = {
    # layer 0 dense (mlp_only_layers), layer 1 routed + gated shared expert, q/k/v biases
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=56, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, mlp_only_layers=[0])),
    # per-head q/k norms, renormalised top-k
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=56, moe_intermediate_size=24, head_dim=8,
                       norm_topk_prob=True)),
    # q/k norms over the full projected width, raw softmax gates
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, norm_topk_prob=False, pad_token_id=0,
                   eos_token_id=2)),
}


def make_hf(path, variant):
  cfg_cls, model_cls, extra = VARIANTS[variant]
  return hf_util.make_hf(path, cfg_cls, model_cls, {**COMMON, **extra},
                         redraw=hf_util.MOE_REDRAW)


def batch(rng, **kw):
  return hf_util.batch(rng, VOCAB, **kw)


checkpoint = hf_util.checkpoint_fixture(make_hf, VARIANTS)


def test_import_matches_transformers_and_export_reloads(checkpoint, tmp_path):
  variant, path, model = checkpoint
  loaded = load_hf(path)
  c = loaded.config
  assert c.hf_model_type == variant and c.moe.capacity_factor is None
  if variant == "qwen2_moe":
    assert c.moe_layout == (1,) and c.moe.shared_expert_gate and c.moe.shared_expert_dim == 40
    assert not c.moe.renormalize and c.qkv_bias and not c.attn_out_bias
  if variant == "olmoe":
    assert c.qk_norm and c.qk_norm_full_width and c.moe.shared_hidden_dim is None
  ids, mask = batch(np.random.default_rng(0))
  hf_util.assert_import_matches_and_export_reloads(
      model, loaded, ids, mask, tmp_path / "out", architecture=VARIANTS[variant][1], label=variant)


def test_greedy_tokens_match_transformers(checkpoint):
  variant, path, model = checkpoint
  loaded = load_hf(path)
  ids, mask = batch(np.random.default_rng(1), length=6)
  hf_util.assert_greedy_matches(model, loaded, ids, mask, max_new_tokens=8, label=variant)


def test_unsupported_fields_are_named(tmp_path):
  from moe_jax.checkpoints.hf_qwen_moe import QwenMoeConverter, moe_layout_from_hf

  conv = QwenMoeConverter()
  base = {**COMMON, "model_type": "olmoe", "intermediate_size": 24}
  with pytest.raises(CheckpointError, match="clip_qkv"):
    conv.config_from_hf({**base, "clip_qkv": 8.0})
  assert moe_layout_from_hf({"num_experts": 4, "decoder_sparse_step": 2}, 4) == (1, 3)
  assert moe_layout_from_hf({"num_experts": 4, "decoder_sparse_step": 2,
                             "mlp_only_layers": [3]}, 4) == (1,)
  with pytest.raises(CheckpointError, match="mlp_only_layers"):
    moe_layout_from_hf({"num_experts": 4, "mlp_only_layers": [0, 1]}, 2)
  with pytest.raises(CheckpointError, match="mlp_only_layers names layers"):
    moe_layout_from_hf({"num_experts": 4, "mlp_only_layers": [5]}, 2)
  # a Qwen3-MoE config is no OLMoE: the export says what differs, writes nothing
  qwen3 = conv.config_from_hf({**COMMON, "model_type": "qwen3_moe", "intermediate_size": 56,
                               "moe_intermediate_size": 24})
  with pytest.raises(CheckpointError, match="OlmoeForCausalLM: it has q/k norms per head"):
    export_hf(tmp_path / "x", qwen3.replace(hf_model_type="olmoe"), {})
  assert not (tmp_path / "x").exists()


def test_fused_in_memory_layout_loads(checkpoint, tmp_path):
  """transformers 5's in-memory names (experts.gate_up_proj / down_proj) load like the saved ones."""
  import shutil

  from safetensors.torch import save_file

  variant, path, model = checkpoint
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  (tmp_path / "fused").mkdir()
  shutil.copy(path / "config.json", tmp_path / "fused" / "config.json")
  save_file(state, str(tmp_path / "fused" / "model.safetensors"))
  fused, saved = load_hf(tmp_path / "fused"), load_hf(path)
  import jax
  jax.tree.map(np.testing.assert_array_equal, fused.params, saved.params)


def test_qwen2_moe_without_shared_expert_round_trips(tmp_path):
  # shared_expert_intermediate_size=0: transformers still builds a zero-wide shared expert
  # (and its gate), so the checkpoint holds [0, D] / [D, 0] tensors; we load it as no shared
  # expert and write it back the same way
  VARIANTS["qwen2_moe_0"] = ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                             dict(intermediate_size=56, moe_intermediate_size=24,
                                  shared_expert_intermediate_size=0, mlp_only_layers=[0]))
  try:
    model = make_hf(tmp_path / "in", "qwen2_moe_0")
  finally:
    del VARIANTS["qwen2_moe_0"]
  loaded = load_hf(tmp_path / "in")
  c = loaded.config
  assert c.moe.shared_expert_dim is None and not c.moe.shared_expert_gate
  assert "shared_expert" not in loaded.params["layers_1"]["mlp"]
  ids, mask = batch(np.random.default_rng(2))
  valid = mask.astype(bool)
  ours = our_logits(loaded, ids, mask)
  np.testing.assert_allclose(ours[valid], hf_logits(model, ids, mask)[valid], atol=1e-4)
  export_hf(tmp_path / "out", c, loaded.params)
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["shared_expert_intermediate_size"] == 0
  again = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  assert tuple(again.model.layers[1].mlp.shared_expert.down_proj.weight.shape) == (32, 0)
  np.testing.assert_allclose(hf_logits(again, ids, mask)[valid], ours[valid], atol=1e-4)
  assert load_hf(tmp_path / "out").config == c
