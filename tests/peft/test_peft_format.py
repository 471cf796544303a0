"""Adapters exported as Hugging Face ``peft`` directories: ``PeftModel.from_pretrained`` on the
HF base gives our logits."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

import moe_jax as mj  # noqa: E402
from moe_jax import peft  # noqa: E402
from moe_jax.checkpoints import export_hf, load_hf  # noqa: E402
from moe_jax.checkpoints.hf_common import CheckpointError  # noqa: E402

from peft_util import _train_step, backbone, randomize_adapters, with_adapters  # noqa: E402

VOCAB = 97


def _save_hf(path, cls, cfg):
  torch.manual_seed(0)
  cfg._attn_implementation = "eager"
  cls(cfg).eval().save_pretrained(path, safe_serialization=True)
  return load_hf(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)
  return _save_hf(tmp_path_factory.mktemp("llama"), transformers.LlamaForCausalLM, cfg)


def _ids():
  return np.random.default_rng(0).integers(3, VOCAB, (2, 9))


def _ours(module, params, ids):
  out, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  return np.asarray(out)


def _peft_logits(base_dir, adapter_dir, ids):
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
  model = hf_peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def test_trained_lora_loads_with_peft_model_from_pretrained(llama, tmp_path):
  cfg = peft.PeftConfig(method="lora", sites=("q", "k", "v", "o", "ffn_in", "ffn_out"), rank=3,
                        alpha=5.0)
  model = peft.adapt(llama, cfg)
  params = peft.init_adapter_params(model, llama.params, jax.random.key(0))
  ids = _ids()
  tokens, valid = jnp.asarray(ids), jnp.ones(ids.shape, bool)
  for _ in range(3):  # a few real training steps: B moves off zero
    params = _train_step(model, params, tokens, valid)
  ours = _ours(model, params, ids)
  assert np.abs(ours - _ours(llama.module, llama.params, ids)).max() > 1e-3
  export_hf(tmp_path / "base", llama.config, llama.params)
  out = peft.export_peft(tmp_path / "adapter", llama.config, params, cfg,
                         base_model_name_or_path=str(tmp_path / "base"))
  assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                    "adapter_model.safetensors"]
  meta = json.loads((out / "adapter_config.json").read_text())
  assert meta["peft_type"] == "LORA" and meta["r"] == 3 and meta["lora_alpha"] == 5.0
  assert sorted(meta["target_modules"]) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  theirs = _peft_logits(tmp_path / "base", out, ids)
  diff = np.abs(theirs - ours).max()
  print(f"peft LoRA logits max |diff| = {diff:.2e}")
  assert diff < 1e-4
  # the folded export is the same function
  peft.merge_and_export_hf(tmp_path / "merged", llama.config, params, cfg)
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  with torch.no_grad():
    folded = merged(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(folded, theirs, atol=1e-4)


def test_ia3_and_single_expert_mov_load_with_peft(llama, tmp_path):
  export_hf(tmp_path / "base", llama.config, llama.params)
  ids = _ids()
  for i, kw in enumerate([dict(method="ia3", sites=("q", "k", "v", "ffn")),
                          dict(method="mov", num_experts=1)]):
    cfg = peft.PeftConfig(**kw)
    model = peft.adapt(llama, cfg)
    params = with_adapters(model, llama.params, seed=3 + i)
    out = peft.export_peft(tmp_path / f"ia3_{i}", llama.config, params, cfg)
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "IA3" and meta["feedforward_modules"] == ["down_proj"]
    np.testing.assert_allclose(_peft_logits(tmp_path / "base", out, ids),
                               _ours(model, params, ids), atol=1e-4)


def test_scanned_model_exports_per_layer(llama, tmp_path):
  scanned = load_hf(llama.source, scan_layers=True)
  cfg = peft.PeftConfig(method="lora", rank=2)
  model = peft.adapt(scanned, cfg)
  params = with_adapters(model, scanned.params, seed=5)
  export_hf(tmp_path / "base", scanned.config, scanned.params)
  adapted = dataclasses.replace(scanned, module=model, params=params)
  out = mj.export_peft(adapted, tmp_path / "adapter")  # the Python API
  np.testing.assert_allclose(_peft_logits(tmp_path / "base", out, _ids()),
                             _ours(model, params, _ids()), atol=1e-4)


def test_phi3_fused_projections_export_exactly(tmp_path):
  cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64,
                                pad_token_id=0, tie_word_embeddings=False)
  loaded = _save_hf(tmp_path / "phi3", transformers.Phi3ForCausalLM, cfg)
  lora = peft.PeftConfig(method="lora", sites=("q", "v", "ffn_in"), rank=2)
  model = peft.adapt(loaded, lora)
  params = with_adapters(model, loaded.params, seed=6)
  out = peft.export_peft(tmp_path / "adapter", loaded.config, params, lora)
  meta = json.loads((out / "adapter_config.json").read_text())
  assert meta["target_modules"] == ["gate_up_proj", "qkv_proj"]
  assert meta["rank_pattern"] == {"model.layers.0.mlp.gate_up_proj": 4,
                                  "model.layers.0.self_attn.qkv_proj": 4}
  ids = _ids()
  np.testing.assert_allclose(_peft_logits(tmp_path / "phi3", out, ids),
                             _ours(model, params, ids), atol=1e-4)


def test_what_peft_cannot_express_says_so(llama, tmp_path):
  cfg = peft.PeftConfig(method="molora", num_experts=3)
  params = with_adapters(peft.adapt(llama, cfg), llama.params)
  with pytest.raises(ValueError, match=r"layers_0/attn/peft_q: a molora mixture of 3 experts "
                                       r"has no Hugging Face peft equivalent.*save_adapters"):
    peft.export_peft(tmp_path / "x", llama.config, params, cfg)
  assert not (tmp_path / "x").exists()
  with pytest.raises(ValueError, match="no adapter parameters"):
    peft.export_peft(tmp_path / "x", llama.config, llama.params, cfg)
  with pytest.raises(ValueError, match="the model has no adapters"):
    mj.export_peft(llama, tmp_path / "x")
  # our own adapter files are not peft's, and a peft directory is not ours
  peft.export_peft(tmp_path / "lora", llama.config, with_adapters(
      peft.adapt(llama, peft.PeftConfig(method="lora")), llama.params), peft.PeftConfig(
          method="lora"))
  with pytest.raises(CheckpointError, match="a Hugging Face peft adapter.*PeftModel"):
    peft.load_adapters(tmp_path / "lora")


def test_t5_lora_loads_with_peft(tmp_path):
  config, module, base = backbone("t5_v1_1")
  cfg = peft.PeftConfig(method="lora", sites=("q", "v", "ffn_out"))
  model = peft.adapt(module, cfg)
  params = randomize_adapters(with_adapters(model, base, seed=8))
  export_hf(tmp_path / "base", config, base)
  out = peft.export_peft(tmp_path / "adapter", config, params, cfg)
  meta = json.loads((out / "adapter_config.json").read_text())
  assert meta["task_type"] == "SEQ_2_SEQ_LM" and meta["target_modules"] == ["q", "v", "wo"]
  enc = np.random.default_rng(1).integers(2, 61, (2, 6))
  dec = np.random.default_rng(2).integers(2, 61, (2, 4))
  ours, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  hf = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / "base", attn_implementation="eager")
  hf = hf_peft.PeftModel.from_pretrained(hf, out).eval()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_moe_dense_and_shared_ffn_lora_loads_with_peft(variant, tmp_path):
  # transformers 5 fuses the experts (mlp.experts.gate_up_proj); peft retargets LoRA named
  # gate_proj / up_proj / down_proj onto them (Qwen3-MoE), so the dense layer's FFN adapters
  # are written as target_parameters and must land on those Linear weights only; Qwen2-MoE's
  # dense layer and shared expert load as target_modules
  common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                num_experts=4, num_experts_per_tok=2, intermediate_size=48,
                moe_intermediate_size=16, mlp_only_layers=[0])
  if variant == "qwen2_moe":
    cfg = transformers.Qwen2MoeConfig(**common, shared_expert_intermediate_size=24)
    cls = transformers.Qwen2MoeForCausalLM
  else:
    cfg = transformers.Qwen3MoeConfig(**common, head_dim=8)
    cls = transformers.Qwen3MoeForCausalLM
  loaded = _save_hf(tmp_path / "base", cls, cfg)
  lora = peft.PeftConfig(method="lora", sites=("q", "v", "ffn_in", "ffn_out"), rank=2)
  model = peft.adapt(loaded, lora)
  params = randomize_adapters(with_adapters(model, loaded.params, seed=9))
  out = peft.export_peft(tmp_path / "adapter", loaded.config, params, lora)
  meta = json.loads((out / "adapter_config.json").read_text())
  if variant == "qwen3_moe":
    assert meta["target_modules"] == ["q_proj", "v_proj"]
    assert "model.layers.0.mlp.gate_proj.weight" in meta["target_parameters"]
  else:  # peft 0.21 leaves Qwen2-MoE's full-name targets alone
    assert "model.layers.1.mlp.shared_expert.gate_proj" in meta["target_modules"]
  ids = _ids()
  ours = _ours(model, params, ids)
  assert np.abs(ours - _ours(loaded.module, loaded.params, ids)).max() > 1e-3
  np.testing.assert_allclose(_peft_logits(tmp_path / "base", out, ids), ours, atol=1e-4)
