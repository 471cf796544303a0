"""Gemma and Qwen3 backbones downstream: LoRA adapters (and their HF export), sparse upcycling,
our own checkpoint format. Parity and KV-cached greedy decoding against transformers are in
test_decoder_parity.py (every family there runs the same four checks)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from hf_util import hf_logits  # noqa: E402
from test_decoder_parity import make_hf  # noqa: E402

from moe_jax import peft  # noqa: E402
from moe_jax.checkpoints import CheckpointError, load_checkpoint, save_model  # noqa: E402
from moe_jax.checkpoints.hf import export_hf, load_hf  # noqa: E402
from moe_jax.upcycle.sparse import sparse_upcycle  # noqa: E402

ALL_LORA = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@pytest.fixture(scope="module", params=["gemma3_local_global", "qwen3_qknorm"])
def family(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  return request.param, path, make_hf(path, request.param)


def _ids():
  return np.random.default_rng(0).integers(3, 97, (2, 9))


def _ours(module, params, ids):
  logits, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  return np.asarray(logits)


def test_lora_adapts_trains_and_folds_back_to_transformers(family, tmp_path):
  variant, path, _ = family
  loaded = load_hf(path)
  cfg = peft.PeftConfig(method="lora", sites=ALL_LORA, rank=3, alpha=5.0)
  model = peft.adapt(loaded, cfg)
  params = peft.init_adapter_params(model, loaded.params, jax.random.key(0))
  backbone, adapters = peft.split_params(params)
  assert jax.tree.structure(backbone) == jax.tree.structure(loaded.params)
  assert "peft_q" in adapters["layers_0"]["attn"] and "peft_wi_0" in adapters["layers_0"]["mlp"]
  ids = _ids()
  base = _ours(loaded.module, loaded.params, ids)
  np.testing.assert_allclose(_ours(model, params, ids), base, atol=1e-5)  # B = 0: identity

  def loss(adapters):
    logits, _ = model.apply({"params": peft.merge_params(backbone, adapters)}, jnp.asarray(ids))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  grads = jax.grad(loss)(adapters)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))

  rng = np.random.default_rng(1)  # trained-looking adapters
  adapters = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), adapters)
  params = peft.merge_params(backbone, adapters)
  ours = _ours(model, params, ids)
  assert np.abs(ours - base).max() > 1e-2, variant
  peft.merge_and_export_hf(tmp_path / "merged", loaded.config, params, cfg)
  reread = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", attn_implementation="eager").eval()
  mask = np.ones_like(ids)
  np.testing.assert_allclose(hf_logits(reread, ids, mask), ours, atol=1e-4, err_msg=variant)


def test_sparse_upcycling_preserves_the_function(family, tmp_path):
  variant, path, _ = family
  loaded = load_hf(path)
  moe_cfg, moe_params = sparse_upcycle(loaded.config, loaded.params, num_experts=4,
                                       num_selected=2)
  assert moe_cfg.norm_scale_offset == loaded.config.norm_scale_offset
  assert moe_cfg.qk_norm and "router" in moe_params["layers_0"]["mlp"]
  from moe_jax.models import registry

  module = registry.build_module(moe_cfg)
  ids = _ids()
  np.testing.assert_allclose(_ours(module, moe_params, ids),
                             _ours(loaded.module, loaded.params, ids), atol=2e-5,
                             err_msg=variant)
  # Our format keeps every new config field (tuples included); Mixtral refuses, saying why.
  save_model(tmp_path / "moe", moe_cfg, moe_params)
  again = load_checkpoint(tmp_path / "moe")
  assert again.config == moe_cfg
  with pytest.raises(CheckpointError, match="q/k norms"):
    export_hf(tmp_path / "mixtral", moe_cfg, moe_params)
  assert not (tmp_path / "mixtral").exists()


def test_export_picks_the_family_or_says_why(tmp_path):
  from moe_jax.checkpoints.hf_llama import export_model_type
  from moe_jax.models.decoder import DecoderConfig

  base = DecoderConfig(vocab_size=11, d_model=8, num_layers=2, num_heads=2, d_ff=16)
  gemma = base.replace(norm_scale_offset=1.0, scale_embeddings=True,
                       activation="gelu_pytorch_tanh")
  assert export_model_type(base) == "llama"
  assert export_model_type(base.replace(qk_norm=True)) == "qwen3"
  assert export_model_type(gemma) == "gemma"
  assert export_model_type(gemma.replace(post_sublayer_norms=True, attn_logit_softcap=5.0,
                                         sliding_window=3, sliding_window_layers=(0,))) == "gemma2"
  assert export_model_type(gemma.replace(post_sublayer_norms=True, qk_norm=True)) == \
      "gemma3_text"
  assert export_model_type(base.replace(hf_model_type="phi3", sliding_window=4)) == "phi3"
  odd = gemma.replace(qk_norm=True, attn_logit_softcap=5.0, post_sublayer_norms=True)
  with pytest.raises(CheckpointError, match="attention logit soft-capping"):
    export_hf(tmp_path / "odd", odd, {})
