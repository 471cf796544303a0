"""``python -m moe_jax.upcycle``: HF / native / training-dir inputs -> orbax + gin + generate."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import generate  # noqa: E402
from moe_jax.checkpoints import load_checkpoint, save_model  # noqa: E402
from moe_jax.cli.upcycle import main as upcycle_main  # noqa: E402

from upcycle_helpers import logits_of, make_branch, make_config, make_params  # noqa: E402

HF = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
          tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_branches(tmp_path_factory):
  """A tiny HF Llama seed and two 'domain branches' of it (perturbed copies)."""
  root = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**HF)
  seed = transformers.LlamaForCausalLM(cfg).eval()
  dirs = []
  for i in range(2):
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
      for (_, p), (_, q) in zip(model.named_parameters(), seed.named_parameters()):
        p.copy_(q + 0.02 * (i + 1) * torch.randn_like(q))
    model.save_pretrained(root / f"branch{i}")
    dirs.append(root / f"branch{i}")
  return dirs


def _run(capsys, argv):
  rc = upcycle_main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def test_sparse_from_hf_writes_orbax_gin_and_generates(tmp_path, capsys, hf_branches, tokens):
  out = tmp_path / "moe"
  rc, stdout, err = _run(capsys, ["--method", "sparse", "--num_experts", "4", "--top_k", "2",
                                  "--checkpoints", hf_branches[0], "--out", out])
  assert rc == 0, err
  assert "MoeDecoderConfig" in stdout
  for name in ("model_config.json", "finetune.gin", "upcycle.json", "checkpoints/0/params"):
    assert (out / name).exists(), name
  assert not (out / "params.safetensors").exists()  # orbax only, unless --safetensors
  dense = load_checkpoint(hf_branches[0])
  moe = load_checkpoint(out)
  assert moe.config.moe.num_experts == 4
  np.testing.assert_allclose(logits_of(moe.module, moe.params, tokens),
                             logits_of(dense.module, dense.params, tokens), atol=2e-5)
  # the orbax step-0 checkpoint holds the same weights
  from moe_jax.checkpoints.orbax import load_latest
  jax.tree.map(np.testing.assert_array_equal, load_latest(out).params, moe.params)
  # generate runs on the directory as it is
  assert generate.main(["--checkpoint", str(out), "--prompt_ids", "1 2 3",
                        "--max_new_tokens", "3"]) == 0
  assert len(capsys.readouterr().out.split()) == 3
  # the gin file parses with the trainer's configurables
  from moe_jax.cli import configurables
  gin_text = (out / "finetune.gin").read_text()
  assert f"INIT_CHECKPOINT = {str(out)!r}" in gin_text
  configurables.parse_gin([str(out / "finetune.gin")], [f"MODEL_DIR = {str(tmp_path / 't')!r}"])


def test_btx_with_prompt_routers_and_mixtral_export(tmp_path, capsys, hf_branches):
  prompts = tmp_path / "prompts.json"
  prompts.write_text(json.dumps([{"positive": [[5, 6, 7, 8], [9, 10, 11]],
                                  "negative": [[40, 41, 42]]},
                                 {"positive": [[40, 41, 42, 43]], "negative": [[5, 6, 7]]}]))
  rc, _, err = _run(capsys, ["--method", "btx", "--checkpoints", *hf_branches, "--out",
                             tmp_path / "btx", "--router_init", "prompts", "--prompts", prompts,
                             "--safetensors",
                             "--export_mixtral", tmp_path / "mixtral"])
  assert rc == 0, err
  assert (tmp_path / "btx" / "params.safetensors").exists()
  btx = load_checkpoint(tmp_path / "btx")
  router = np.asarray(btx.params["layers_1"]["mlp"]["router"]["kernel"])
  np.testing.assert_allclose(np.linalg.norm(router, axis=0), 1.0, rtol=1e-5)
  assert generate.main(["--checkpoint", str(tmp_path / "btx"), "--prompt_ids", "5 6 7",
                        "--max_new_tokens", "2"]) == 0
  mixtral = load_checkpoint(tmp_path / "mixtral")
  assert json.loads((tmp_path / "mixtral" / "config.json").read_text())["model_type"] == "mixtral"
  jax.tree.map(np.testing.assert_array_equal, mixtral.params, btx.params)


def test_bam_from_native_parallel_models(tmp_path, capsys):
  cfg = make_config(parallel_block=True)
  seed = make_params(cfg)
  dirs = [save_model(tmp_path / f"b{i}", cfg, make_branch(seed, i)) for i in range(3)]
  rc, _, err = _run(capsys, ["--method", "bam", "--shared_kv", "--checkpoints", *dirs,
                             "--out", tmp_path / "bam"])
  assert rc == 0, err
  bam = load_checkpoint(tmp_path / "bam")
  assert type(bam.config).__name__ == "BamDecoderConfig" and bam.config.attention.shared_kv
  assert bam.config.moe.num_selected == 1
  assert generate.main(["--checkpoint", str(tmp_path / "bam"), "--prompt_ids", "4 5",
                        "--max_new_tokens", "2"]) == 0
  # BAM cannot be a Mixtral: refused before anything is written
  rc, _, err = _run(capsys, ["--method", "bam", "--checkpoints", *dirs, "--out",
                             tmp_path / "bam2", "--export_mixtral", tmp_path / "mx"])
  assert rc == 2 and "attention experts" in err
  assert not (tmp_path / "bam2").exists() and not (tmp_path / "mx").exists()


def test_cli_errors_name_the_culprit(tmp_path, capsys, hf_branches):
  cfg = make_config(d_ff=40)  # same names as the HF branches, different FFN width
  other = save_model(tmp_path / "other", cfg, make_params(cfg))
  rc, _, err = _run(capsys, ["--method", "btx", "--checkpoints", hf_branches[0], other,
                             "--out", tmp_path / "x"])
  assert rc == 2
  assert "tensor 'layers_0/mlp/wi_0/kernel' has shape (32, 48)" in err and "(32, 40)" in err
  assert str(other) in err
  rc, _, err = _run(capsys, ["--method", "sparse", "--checkpoints", *hf_branches,
                             "--num_experts", "2", "--out", tmp_path / "x"])
  assert rc == 2 and "exactly one checkpoint" in err
  rc, _, err = _run(capsys, ["--method", "btx", "--shared_kv", "--checkpoints", *hf_branches,
                             "--out", tmp_path / "x"])
  assert rc == 2 and "BAM options" in err
  assert not (tmp_path / "x").exists()
