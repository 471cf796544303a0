"""Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma 1-2-3 parity with transformers on tiny
random checkpoints."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax import decoding  # noqa: E402
from moe_jax.checkpoints.hf import export_hf, load_hf  # noqa: E402
from moe_jax.checkpoints.hf_common import CheckpointError  # noqa: E402

import hf_util  # noqa: E402
from hf_util import hf_logits, our_logits  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)

VARIANTS = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_key_value_heads=2, tie_word_embeddings=False,
                              rope_theta=5000.0)),
    "llama_tied_mqa_rope3": ("LlamaConfig", "LlamaForCausalLM",
                             dict(num_key_value_heads=1, tie_word_embeddings=True,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16})),
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       dict(num_key_value_heads=2, sliding_window=5,
                            tie_word_embeddings=False)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # q/k norms, a head_dim other than hidden / heads
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM",
                     dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    # fused qkv_proj / gate_up_proj, sliding window on every layer
    "phi3_fused": ("Phi3Config", "Phi3ForCausalLM",
                   dict(num_key_value_heads=2, sliding_window=6, tie_word_embeddings=False)),
    # (1 + w) norms, sqrt(D) embeddings, GeGLU, tied head
    "gemma_geglu": ("GemmaConfig", "GemmaForCausalLM",
                    dict(num_key_value_heads=1, head_dim=8, hidden_act="gelu_pytorch_tanh")),
    # + sandwich norms, both soft-caps, query_pre_attn_scalar, alternating local layers
    "gemma2_softcap": ("Gemma2Config", "Gemma2ForCausalLM",
                       dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=8,
                            sliding_window=4, query_pre_attn_scalar=16,
                            attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    # + q/k norms, local / global RoPE bases (global scaled), explicit layer types
    "gemma3_local_global": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                            dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=8,
                                 sliding_window=4, query_pre_attn_scalar=16,
                                 final_logit_softcapping=5.0,
                                 layer_types=["sliding_attention", "full_attention",
                                              "sliding_attention"],
                                 rope_parameters={
                                     "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 100000.0},
                                     "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 1000.0}})),
}
# Parameters that start at a constant, randomised so a mistaken mapping cannot hide: the
# biases (zeros) and the norm scales (ones, or zeros for Gemma's 1 + w).
REDRAW = {"qwen2_bias": (("bias$", 0, 0.5),)}
REDRAW.update(dict.fromkeys(("qwen3_qknorm", "phi3_fused", "gemma_geglu", "gemma2_softcap",
                             "gemma3_local_global"), (("norm", 0, 0.5),)))


def make_hf(path, variant, dtype=None, seed=0, **save_kw):
  cfg_name, model_name, extra = VARIANTS[variant]
  return hf_util.make_hf(path, cfg_name, model_name, {**COMMON, **extra},
                         redraw=REDRAW.get(variant, ()), seed=seed, dtype=dtype, **save_kw)


checkpoint = hf_util.checkpoint_fixture(make_hf, VARIANTS)


def _batch(rng, b=3, length=12):
  return hf_util.batch(rng, VOCAB, b=b, length=length, left_pad=(0, 4, 7))


def test_logits_match_transformers(checkpoint):
  variant, path, model = checkpoint
  loaded = load_hf(path)
  ids, mask = _batch(np.random.default_rng(0))
  ours = our_logits(loaded, ids, mask)
  ref = hf_logits(model, ids, mask)
  valid = mask.astype(bool)
  diff = np.abs(ours[valid] - ref[valid]).max()
  assert diff <= 1e-4, f"{variant}: max |logit diff| {diff}"


def test_greedy_generation_matches_transformers(checkpoint):
  variant, path, model = checkpoint
  loaded = load_hf(path)
  ids, mask = _batch(np.random.default_rng(1), length=8)
  hf_util.assert_greedy_matches(model, loaded, ids, mask, max_new_tokens=20, label=variant)


def test_cached_decoding_equals_full_recompute(checkpoint):
  variant, path, _ = checkpoint
  loaded = load_hf(path)
  from moe_jax.models.decoder import init_cache
  ids, mask = _batch(np.random.default_rng(2), length=10)
  full = our_logits(loaded, ids, mask)
  cache = init_cache(loaded.config, ids.shape[0], 16)
  step_logits = []
  split = 6  # prefill 6 tokens, then one token at a time
  logits, cache = loaded.module.apply({"params": loaded.params}, jnp.asarray(ids[:, :split]),
                                      valid_BL=jnp.asarray(mask[:, :split], bool), cache=cache)
  step_logits.append(logits)
  for t in range(split, ids.shape[1]):
    logits, cache = loaded.module.apply({"params": loaded.params}, jnp.asarray(ids[:, t:t + 1]),
                                        valid_BL=jnp.asarray(mask[:, t:t + 1], bool),
                                        cache=cache)
    step_logits.append(logits)
  inc = np.concatenate([np.asarray(x) for x in step_logits], axis=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(inc[valid], np.asarray(full)[valid], atol=1e-5, rtol=0,
                             err_msg=variant)


def test_export_roundtrip_is_identity(checkpoint, tmp_path):
  variant, path, model = checkpoint
  loaded = load_hf(path)
  export_hf(tmp_path / "out", loaded.config, loaded.params)
  again = load_hf(tmp_path / "out")
  assert again.config == loaded.config
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
  # transformers itself reads the export and gives the same logits.
  reread = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  ids, mask = _batch(np.random.default_rng(3))
  np.testing.assert_allclose(hf_logits(reread, ids, mask), hf_logits(model, ids, mask),
                             atol=1e-6)


def test_right_padding_gives_same_continuation(tmp_path):
  make_hf(tmp_path, "llama_gqa_untied")
  loaded = load_hf(tmp_path)
  prompts = [[5, 6, 7, 8, 9], [11, 12]]
  left = decoding.generate(loaded.module, loaded.params, prompts, pad_side="left",
                           max_new_tokens=6)
  right = decoding.generate(loaded.module, loaded.params, prompts, pad_side="right",
                            max_new_tokens=6)
  single = [decoding.generate(loaded.module, loaded.params, [p], max_new_tokens=6).tokens_BN[0]
            for p in prompts]
  np.testing.assert_array_equal(left.tokens_BN, np.stack(single))
  np.testing.assert_array_equal(right.tokens_BN, np.stack(single))


def test_bfloat16_and_sharded_checkpoints(tmp_path):
  model = make_hf(tmp_path / "bf16", "llama_gqa_untied", dtype=torch.bfloat16,
                  max_shard_size="40KB")
  assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
  loaded = load_hf(tmp_path / "bf16")
  assert loaded.config.param_dtype == "bfloat16"
  emb = np.asarray(loaded.params["embed"]["embedding"])
  assert emb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(emb.astype(np.float32),
                                model.model.embed_tokens.weight.detach().float().numpy())
  f32 = load_hf(tmp_path / "bf16", dtype="float32")
  assert np.asarray(f32.params["embed"]["embedding"]).dtype == np.float32
  export_hf(tmp_path / "out", loaded.config, loaded.params, max_shard_bytes=30_000)
  again = load_hf(tmp_path / "out")
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)


def test_bad_checkpoints_name_the_culprit(tmp_path):
  import json
  from safetensors.numpy import load_file, save_file

  make_hf(tmp_path / "ok", "llama_gqa_untied")
  # wrong shape
  tensors = load_file(tmp_path / "ok" / "model.safetensors")
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = tensors[name][:-1]
  (tmp_path / "bad").mkdir()
  save_file(tensors, tmp_path / "bad" / "model.safetensors")
  (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
  with pytest.raises(CheckpointError, match=r"up_proj.weight.*\(63, 32\).*\(64, 32\)"):
    load_hf(tmp_path / "bad")
  # missing tensor
  del tensors[name]
  save_file(tensors, tmp_path / "bad" / "model.safetensors")
  with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj"):
    load_hf(tmp_path / "bad")
  # unsupported architecture
  cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
    load_hf(tmp_path / "bad")
  # unreadable files
  (tmp_path / "bad" / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="config.json: unreadable JSON"):
    load_hf(tmp_path / "bad")
  (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
  (tmp_path / "bad" / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
    load_hf(tmp_path / "bad")


def test_failed_export_leaves_previous_checkpoint(tmp_path, monkeypatch):
  make_hf(tmp_path / "src", "llama_gqa_untied")
  loaded = load_hf(tmp_path / "src")
  export_hf(tmp_path / "out", loaded.config, loaded.params)
  before = sorted(p.name for p in (tmp_path / "out").iterdir())
  import moe_jax.checkpoints.hf as hf

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(hf, "write_safetensors", boom)
  with pytest.raises(OSError, match="disk full"):
    export_hf(tmp_path / "out", loaded.config, loaded.params)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
  assert load_hf(tmp_path / "out").config == loaded.config
