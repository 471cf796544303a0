"""Checkpoints in and out: HF Llama into the adapted model, folded (IA)^3/LoRA back out to
transformers, and the small adapter files of MoV/MoLoRA."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import peft  # noqa: E402
from moe_jax.checkpoints import export_hf, load_hf  # noqa: E402
from moe_jax.checkpoints.hf_common import CheckpointError  # noqa: E402

from peft_util import (backbone, check_adapted, randomize_adapters, rng_key,  # noqa: E402
                       with_adapters)

VOCAB = 97
ALL_LORA = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)
  cfg._attn_implementation = "eager"
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def _tokens():
  ids = np.random.default_rng(0).integers(3, VOCAB, (2, 9))
  return ids


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _ours(module, params, ids):
  out, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  return np.asarray(out)


def test_hf_llama_restores_into_the_adapted_model_unchanged(llama):
  path, hf_model = llama
  loaded = load_hf(path)
  cfg = peft.PeftConfig(method="mov", num_experts=4)
  model = peft.adapt(loaded, cfg)
  params = peft.init_adapter_params(model, loaded.params, rng_key())
  backbone_part, adapters = peft.split_params(params)
  for got, want in zip(jax.tree.leaves(backbone_part), jax.tree.leaves(loaded.params)):
    assert got is want  # the checkpoint's arrays, under their own names
  assert jax.tree.structure(backbone_part) == jax.tree.structure(loaded.params)
  ids = _tokens()
  ours = _ours(model, params, ids)
  np.testing.assert_allclose(ours, _ours(loaded.module, loaded.params, ids), rtol=0, atol=2e-6)
  np.testing.assert_allclose(ours, _hf_logits(hf_model, ids), atol=1e-4)
  report = peft.parameter_report(params)
  assert report["trainable"] == sum(np.size(x) for x in jax.tree.leaves(adapters))
  assert report["share"] < 0.1


@pytest.mark.parametrize("kw", [dict(method="ia3", sites=("q", "k", "v", "ffn")),
                                dict(method="lora", sites=ALL_LORA, rank=3, alpha=5.0)],
                         ids=["ia3", "lora"])
def test_folded_export_reloads_in_transformers_with_our_logits(llama, tmp_path, kw):
  path, _ = llama
  loaded = load_hf(path)
  cfg = peft.PeftConfig(**kw)
  model = peft.adapt(loaded, cfg)
  params = with_adapters(model, loaded.params, seed=4)  # trained-looking adapters
  ids = _tokens()
  ours = _ours(model, params, ids)
  assert np.abs(ours - _ours(loaded.module, loaded.params, ids)).max() > 1e-2
  peft.merge_and_export_hf(tmp_path / "merged", loaded.config, params, cfg)
  assert not any("peft" in k for k in json.loads(
      (tmp_path / "merged" / "config.json").read_text()))
  reread = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_logits(reread, ids), ours, atol=1e-4)
  again = load_hf(tmp_path / "merged")
  np.testing.assert_allclose(_ours(again.module, again.params, ids), ours, atol=1e-5)


@pytest.mark.parametrize("kind, kw", [
    ("t5_v1_0", dict(method="ia3", sites=("q", "k", "v", "ffn"))),
    ("t5_v1_1", dict(method="lora", sites=ALL_LORA)),
])
def test_t5_folded_export_matches_transformers(tmp_path, kind, kw):
  config, module, base = backbone(kind)
  cfg = peft.PeftConfig(**kw)
  model = peft.adapt(module, cfg)
  params = with_adapters(model, base, seed=5)
  enc = np.random.default_rng(1).integers(2, 61, (2, 6))
  dec = np.random.default_rng(2).integers(2, 61, (2, 4))
  ours, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  peft.merge_and_export_hf(tmp_path / "t5", config, params, cfg)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / "t5", attn_implementation="eager").eval()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


def test_single_expert_mixtures_fold_and_larger_ones_refuse():
  config, module, base = backbone("decoder")
  ids = _tokens() % 61
  cfg = peft.PeftConfig(method="mov", num_experts=1, sites=("q", "k", "v", "ffn"))
  model = peft.adapt(module, cfg)
  params = with_adapters(model, base, seed=6)
  folded = peft.fold_adapters(params, cfg)
  assert jax.tree.structure(folded) == jax.tree.structure(base)
  np.testing.assert_allclose(_ours(module, folded, ids), _ours(model, params, ids), atol=1e-5)
  cfg = peft.PeftConfig(method="molora", num_experts=3)
  params = with_adapters(peft.adapt(module, cfg), base)
  with pytest.raises(ValueError, match="layers_0/attn/peft_q: a mixture of 3 experts"):
    peft.fold_adapters(params, cfg)


def test_adapters_save_small_and_reload_onto_their_base(llama, tmp_path):
  path, _ = llama
  loaded = load_hf(path)
  cfg = peft.PeftConfig(method="molora", num_experts=3, sites=("q", "v", "ffn_out"), top_k=2)
  model = peft.adapt(loaded, cfg)
  params = with_adapters(model, loaded.params, seed=7)
  # The base is referenced relative to the adapter directory.
  base_dir = tmp_path / "base"
  export_hf(base_dir, loaded.config, loaded.params)
  out = peft.save_adapters(tmp_path / "adapters", params, cfg, base_checkpoint="../base",
                           metadata={"task": "unit-test"})
  assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                    "adapters.safetensors"]
  _, adapters = peft.split_params(params)
  n_adapter = sum(np.size(x) for x in jax.tree.leaves(adapters))
  meta = json.loads((out / "adapter_config.json").read_text())
  assert meta["num_parameters"] == n_adapter
  assert (out / "adapters.safetensors").stat().st_size < 4 * n_adapter + 4096  # float32 + header
  saved = peft.load_adapters(out)
  assert saved.peft == cfg and saved.base_checkpoint == "../base"
  assert saved.metadata == {"task": "unit-test"}
  jax.tree.map(np.testing.assert_array_equal, saved.params, adapters)
  restored = peft.load_adapted(out)
  assert peft.peft_config_of(restored.module) == cfg
  ids = _tokens()
  np.testing.assert_array_equal(_ours(restored.module, restored.params, ids),
                                _ours(model, params, ids))


def test_adapter_files_fail_loudly_and_atomically(llama, tmp_path, monkeypatch):
  path, _ = llama
  loaded = load_hf(path)
  cfg = peft.PeftConfig(method="mov", num_experts=2)
  params = with_adapters(peft.adapt(loaded, cfg), loaded.params)
  out = peft.save_adapters(tmp_path / "ad", params, cfg, base_checkpoint=str(path))
  # adapters that do not fit the base (config says 3 experts, file holds 2)
  meta = json.loads((out / "adapter_config.json").read_text())
  meta["peft"]["num_experts"] = 3
  (out / "adapter_config.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"adapters.safetensors: parameter "
                                            r"'layers_0/attn/peft_k/router/kernel' has shape"):
    peft.load_adapted(out)
  meta["peft"]["method"] = "adapter"
  (out / "adapter_config.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="adapter_config.json: peft: PeftConfig.method"):
    peft.load_adapters(out)
  with pytest.raises(ValueError, match="no adapter parameters"):
    peft.save_adapters(tmp_path / "none", loaded.params, cfg, base_checkpoint=str(path))
  # a failed write leaves the previous directory as it was
  good = peft.save_adapters(tmp_path / "ad", params, cfg, base_checkpoint=str(path))
  before = {p.name: p.read_bytes() for p in good.iterdir()}
  import moe_jax.peft.export as export

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(export, "write_safetensors", boom)
  with pytest.raises(OSError, match="disk full"):
    peft.save_adapters(tmp_path / "ad", randomize_adapters(params), cfg,
                       base_checkpoint=str(path))
  assert {p.name: p.read_bytes() for p in good.iterdir()} == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_on_an_imported_mixtral_folds_into_a_checkpoint_transformers_reads(tmp_path):
  torch.manual_seed(0)
  hf_cfg = transformers.MixtralConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
      max_position_embeddings=64, tie_word_embeddings=False)
  hf_cfg._attn_implementation = "eager"
  hf_model = transformers.MixtralForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # confident routers: no near-ties in top-2 that rounding could flip
    for name, p in hf_model.named_parameters():
      if name.endswith("mlp.gate.weight"):
        p.mul_(30.0)
  hf_model.save_pretrained(tmp_path / "mixtral")
  loaded = load_hf(tmp_path / "mixtral")
  ids = jnp.asarray(_tokens())
  valid = jnp.ones(ids.shape, bool)
  cfg = peft.PeftConfig(method="lora", sites=("q", "k", "v", "o"), rank=3, alpha=5.0)
  # Names unchanged, identity at initialisation, backbone bit-identical after a step.
  model, params = check_adapted(loaded.module, loaded.params, cfg, ids, valid)
  assert type(model).__name__ == "PeftMoeDecoder"
  params = randomize_adapters(params, seed=4)  # trained-looking adapters
  ours = _ours(model, params, ids)
  peft.merge_and_export_hf(tmp_path / "merged", loaded.config, params, cfg)
  reread = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", attn_implementation="eager").eval()
  assert type(reread).__name__ == "MixtralForCausalLM"
  np.testing.assert_allclose(_hf_logits(reread, np.asarray(ids)), ours, atol=1e-4)
