"""Upcycling into Qwen2-MoE (gated shared expert) and Qwen3-MoE: function-preserving init, the
export loads in transformers with our logits, and what cannot be expressed is refused."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import decoding  # noqa: E402
from moe_jax.checkpoints import export_hf, load_hf  # noqa: E402
from moe_jax.models.decoder import Decoder  # noqa: E402
from moe_jax.models.moe_decoder import MoeDecoder  # noqa: E402
from moe_jax.upcycle import methods  # noqa: E402

from hf_util import hf_valid_logits  # noqa: E402
from upcycle_helpers import (logits_of, make_branch, make_config, make_params,  # noqa: E402
                             sharpen_routers)


def _greedy(module, params, ids):
  return decoding.generate(module, params, np.asarray(ids), max_new_tokens=8).tokens_BN


@pytest.mark.parametrize("target,dense_kw", [("qwen2_moe", {}),
                                             ("qwen3_moe", dict(qk_norm=True,
                                                                hf_model_type="qwen3"))])
def test_upcycle_to_qwen_moe_preserves_function_and_exports(target, dense_kw, tmp_path, tokens):
  cfg = make_config(**dense_kw)
  dense = make_params(cfg)
  arch = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[target]
  # Exact copies: the MoE is the dense model (gates renormalised; shared expert = ½ FFN).
  moe_cfg, params = methods.upcycle("sparse", [cfg], [dense], num_experts=4, target=target)
  assert moe_cfg.hf_model_type == target
  assert (moe_cfg.moe.shared_hidden_dim is not None) == (target == "qwen2_moe")
  ours = logits_of(MoeDecoder(config=moe_cfg), params, tokens)
  base = logits_of(Decoder(config=cfg), dense, tokens)
  print(f"{target}: upcycled vs dense max |logit diff| {np.abs(ours - base).max():.2e}")
  np.testing.assert_allclose(ours, base, atol=1e-5)
  ids = tokens[0][:, :5]
  np.testing.assert_array_equal(_greedy(MoeDecoder(config=moe_cfg), params, ids),
                                _greedy(Decoder(config=cfg), dense, ids))
  # Diverse experts and confident routers: routing matters; transformers agrees.
  moe_cfg, params = methods.upcycle("sparse", [cfg], [dense], num_experts=4, target=target,
                                    noise_std=0.3)
  params = sharpen_routers(params)
  if target == "qwen2_moe":  # a trained-looking gate
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if "shared_expert_gate" in jax.tree_util.keystr(p) else x, params)
  ours = logits_of(MoeDecoder(config=moe_cfg), params, tokens)
  export_hf(tmp_path / target, moe_cfg, params)
  assert json.loads((tmp_path / target / "config.json").read_text())["architectures"] == [arch]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / target, attn_implementation="eager").eval()
  assert type(model).__name__ == arch
  diff = np.abs(hf_valid_logits(model, *tokens) - ours).max()
  print(f"{target}: exported upcycled model, transformers vs ours max |logit diff| {diff:.2e}")
  assert diff <= 1e-4, f"{target}: max |logit diff| {diff}"
  again = load_hf(tmp_path / target)
  np.testing.assert_allclose(logits_of(again.module, again.params, tokens), ours, atol=1e-5)


def test_btx_with_shared_expert_and_scale(tmp_path, tokens):
  cfg = make_config()
  seed = make_params(cfg)
  branches = [make_branch(seed, s, jitter=0.5) for s in (1, 2)]
  moe_cfg, params = methods.upcycle("btx", [cfg] * 2, branches, target="qwen2_moe",
                                    shared_expert_scale=0.2)
  mlp = params["layers_0"]["mlp"]
  ffn_wo = (branches[0]["layers_0"]["mlp"]["wo"]["kernel"]
            + branches[1]["layers_0"]["mlp"]["wo"]["kernel"]) / 2
  np.testing.assert_allclose(mlp["shared_expert"]["wo"]["kernel"], 0.2 * ffn_wo, rtol=1e-5)
  np.testing.assert_allclose(mlp["experts"]["wo"]["kernel"][1],
                             0.9 * branches[1]["layers_0"]["mlp"]["wo"]["kernel"], rtol=1e-5)
  assert not np.asarray(mlp["shared_expert_gate"]["kernel"]).any()
  export_hf(tmp_path / "btx", moe_cfg, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "btx", attn_implementation="eager").eval()
  ours = logits_of(MoeDecoder(config=moe_cfg), params, tokens)
  assert np.abs(hf_valid_logits(model, *tokens) - ours).max() <= 1e-4
  # DeepSeek-style (no gate) stays ours: the same function, no Qwen2-MoE export
  nogate, p2 = methods.upcycle("sparse", [cfg], [seed], num_experts=2, shared_expert=True,
                               shared_expert_gate=False)
  assert nogate.moe.shared_expert_gate is False and "shared_expert_gate" not in p2["layers_0"]["mlp"]
  np.testing.assert_allclose(logits_of(MoeDecoder(config=nogate), p2, tokens),
                             logits_of(Decoder(config=cfg), seed, tokens), atol=1e-5)


def test_what_a_target_cannot_express_is_refused():
  par = make_config(parallel_block=True, num_layers=1)
  with pytest.raises(ValueError, match=r"BAM \(method 'bam'\) cannot be written as "
                     r"Qwen2MoeForCausalLM: its attention experts"):
    methods.upcycle("bam", [par] * 2, [make_params(par)] * 2, target="qwen2_moe")
  with pytest.raises(ValueError, match=r"BAM \(method 'bam'\) cannot be written as "
                     r"MixtralForCausalLM"):
    methods.upcycle("bam", [par] * 2, [make_params(par)] * 2, target="mixtral")
  cfg = make_config()
  dense = make_params(cfg)
  with pytest.raises(ValueError, match="cannot be written as Qwen3MoeForCausalLM: it has no "
                     "q/k norms"):
    methods.upcycle("sparse", [cfg], [dense], num_experts=2, target="qwen3_moe")
  with pytest.raises(ValueError, match="has no shared expert"):
    methods.upcycle("sparse", [cfg], [dense], num_experts=2, target="mixtral",
                    shared_expert=True)
  with pytest.raises(ValueError, match="target must be one of"):
    methods.upcycle("sparse", [cfg], [dense], num_experts=2, target="deepseek_v3")
  with pytest.raises(ValueError, match=r"shared_expert_scale must be in \[0, 2\]"):
    methods.upcycle("sparse", [cfg], [dense], num_experts=2, target="qwen2_moe",
                    shared_expert_scale=3.0)


def test_cli_target_qwen2_moe_and_bam_refusal(tmp_path, tokens):
  """``python -m moe_jax.upcycle --target qwen2_moe --export_hf DIR`` as users run it."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  cfg = make_config(hf_model_type="llama")
  dense = make_params(cfg)
  export_hf(tmp_path / "llama", cfg, dense)
  par = make_config(parallel_block=True, num_layers=1)
  from moe_jax.checkpoints import save_model
  branches = [save_model(tmp_path / f"b{i}", par, make_params(par, seed=i)) for i in range(2)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}

  def run(*args):
    return subprocess.run([sys.executable, "-m", "moe_jax.upcycle", *map(str, args)],
                          cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600)

  out = run("--method", "sparse", "--num_experts", "4", "--target", "qwen2_moe",
            "--checkpoints", tmp_path / "llama", "--out", tmp_path / "moe",
            "--export_hf", tmp_path / "hf")
  assert out.returncode == 0, out.stderr[-3000:]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", attn_implementation="eager").eval()
  assert type(model).__name__ == "Qwen2MoeForCausalLM"
  base = logits_of(Decoder(config=cfg), dense, tokens)
  assert np.abs(hf_valid_logits(model, *tokens) - base).max() <= 1e-4  # function-preserving
  out = run("--method", "bam", "--checkpoints", *branches, "--out", tmp_path / "bam",
            "--target", "qwen2_moe", "--export_hf", tmp_path / "bam_hf")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert ("BAM (method 'bam') cannot be written as Qwen2MoeForCausalLM: its attention experts"
          in out.stderr), out.stderr
  assert not (tmp_path / "bam").exists() and not (tmp_path / "bam_hf").exists()


def test_api_upcycle_model_target(tmp_path):
  import moe_jax as mj
  from moe_jax.checkpoints.hf import LoadedModel

  cfg = make_config(qk_norm=True, hf_model_type="qwen3")
  dense = LoadedModel(config=cfg, module=Decoder(config=cfg), params=make_params(cfg),
                      source="qwen3")
  moe = mj.upcycle_model(dense, num_experts=2, target="qwen3_moe")
  mj.export_hf(moe, tmp_path / "q3")
  assert load_hf(tmp_path / "q3").config.hf_model_type == "qwen3_moe"
  par = make_config(parallel_block=True, num_layers=1)
  branch = LoadedModel(config=par, module=Decoder(config=par), params=make_params(par),
                       source="b")
  with pytest.raises(ValueError, match=r"upcycle_model: BAM \(method 'bam'\) cannot be written "
                     r"as Qwen3MoeForCausalLM"):
    mj.upcycle_model([branch, branch], method="bam", target="qwen3_moe")
