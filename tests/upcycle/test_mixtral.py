"""Mixtral import/export: transformers reads our sparse-upcycled / BTX models with our logits."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax.checkpoints import CheckpointError, export_hf, load_hf  # noqa: E402
from moe_jax.checkpoints.hf_mixtral import mixtral_incompatibilities  # noqa: E402
from moe_jax.models.moe_decoder import MoeDecoder  # noqa: E402
from moe_jax.upcycle import bam_merge, btx_merge, sparse_upcycle  # noqa: E402

from hf_util import hf_valid_logits, make_hf  # noqa: E402
from upcycle_helpers import (logits_of, make_branch, make_config, make_params,  # noqa: E402
                             sharpen_routers)


def test_btx_and_sparse_exports_load_in_transformers(tmp_path, tokens):
  cfg = make_config()
  seed = make_params(cfg)
  branches = [make_branch(seed, s, jitter=0.5) for s in (1, 2, 3)]
  for name, (moe_cfg, params) in {
      "btx": btx_merge([cfg] * 3, branches),
      "sparse": sparse_upcycle(cfg, seed, num_experts=4, num_selected=2, noise_std=0.3)}.items():
    params = sharpen_routers(params)
    ours = logits_of(MoeDecoder(config=moe_cfg), params, tokens)
    export_hf(tmp_path / name, moe_cfg, params)
    hf_cfg = json.loads((tmp_path / name / "config.json").read_text())
    assert hf_cfg["architectures"] == ["MixtralForCausalLM"]
    assert hf_cfg["num_local_experts"] == moe_cfg.moe.num_experts
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / name, attn_implementation="eager").eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    diff = np.abs(hf_valid_logits(model, *tokens) - ours).max()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    # and it reads back into exactly what we wrote
    again = load_hf(tmp_path / name)
    assert again.config.moe.num_experts == moe_cfg.moe.num_experts
    assert again.config.moe.capacity_factor is None and again.config.moe.renormalize
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 again.params, params)


def test_import_transformers_mixtral_both_layouts(tmp_path, tokens):
  def sharpen(model):  # confident routers (see sharpen_routers)
    for name, p in model.named_parameters():
      if name.endswith("mlp.gate.weight"):
        p.mul_(30.0)

  model = make_hf(  # per-expert w1/w2/w3 names
      tmp_path / "legacy", "MixtralConfig", "MixtralForCausalLM",
      dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False),
      adjust=sharpen)
  loaded = load_hf(tmp_path / "legacy")
  assert loaded.config.moe.num_selected == 2 and loaded.config.hf_model_type == "mixtral"
  ours = logits_of(loaded.module, loaded.params, tokens)
  diff = np.abs(hf_valid_logits(model, *tokens) - ours).max()
  assert diff <= 1e-4, f"max |logit diff| {diff}"
  # transformers 5's fused in-memory names (gate_up_proj / down_proj) load too
  from safetensors.torch import save_file
  (tmp_path / "fused").mkdir()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / "fused" / "model.safetensors"))
  (tmp_path / "fused" / "config.json").write_text((tmp_path / "legacy" / "config.json").read_text())
  fused = load_hf(tmp_path / "fused")
  jax.tree.map(np.testing.assert_array_equal, fused.params, loaded.params)


def test_what_mixtral_cannot_express_is_refused(tmp_path):
  par = make_config(parallel_block=True, num_layers=1)
  dense = make_params(par)
  bam_cfg, bam_params = bam_merge([par] * 2, [dense] * 2)
  with pytest.raises(CheckpointError, match=r"cannot be exported as MixtralForCausalLM: it has "
                     r"attention experts \(BAM"):
    export_hf(tmp_path / "bam", bam_cfg, bam_params)
  assert not (tmp_path / "bam").exists()
  cfg = make_config()
  moe_cfg, _ = sparse_upcycle(cfg, make_params(cfg), num_experts=2, moe_layout=(1,))
  assert any("only layers (1,)" in w for w in mixtral_incompatibilities(moe_cfg))
  top1 = moe_cfg.replace(moe=moe_cfg.moe.replace(num_selected=1, renormalize=False),
                         moe_layout="every")
  assert any("not renormalised" in w for w in mixtral_incompatibilities(top1))
  assert any("parallel" in w for w in mixtral_incompatibilities(bam_cfg))
