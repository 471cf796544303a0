"""Our own checkpoint format and the generate CLI on it."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe_jax.checkpoints import CheckpointError, load_checkpoint, save_model
from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig
from moe_jax.nn.embeddings import RopeScaling


@pytest.fixture
def saved(tmp_path):
  cfg = DecoderConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                      rope_scaling=RopeScaling(factor=2.0), eos_token_id=(1, 2),
                      param_dtype="bfloat16")
  module = registry.build_module(cfg)
  params = registry.init_params(module, "decoder")
  save_model(tmp_path / "ckpt", cfg, params)
  return tmp_path / "ckpt", cfg, params


def test_roundtrip_keeps_config_and_dtype(saved):
  path, cfg, params = saved
  loaded = load_checkpoint(path)
  assert loaded.config == cfg
  assert np.asarray(loaded.params["embed"]["embedding"]).dtype == jax.numpy.bfloat16
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)


def test_transposed_arrays_roundtrip(saved, tmp_path):
  """A Fortran-ordered leaf (an HF kernel imported as a ``.T`` view) keeps its values."""
  path, cfg, params = saved
  params = jax.tree.map(np.asarray, params)
  head = np.asarray(params["lm_head"]["kernel"])
  params["lm_head"]["kernel"] = np.asfortranarray(head)
  save_model(tmp_path / "f", cfg, params)
  np.testing.assert_array_equal(load_checkpoint(tmp_path / "f").params["lm_head"]["kernel"], head)


def test_shape_mismatch_names_tensor(saved):
  path, cfg, _ = saved
  data = json.loads((path / "model_config.json").read_text())
  data["config"]["d_ff"] = 48
  (path / "model_config.json").write_text(json.dumps(data))
  with pytest.raises(CheckpointError, match=r"'layers_0/mlp/wi_0/kernel' has shape \(16, 32\), "
                                            r"expected \(16, 48\)"):
    load_checkpoint(path)


def test_bad_config_fields(saved):
  path, _, _ = saved
  data = json.loads((path / "model_config.json").read_text())
  data["config"]["d_modle"] = 3
  (path / "model_config.json").write_text(json.dumps(data))
  with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['d_modle'\]"):
    load_checkpoint(path)
  data["kind"] = "gpt"
  (path / "model_config.json").write_text(json.dumps(data))
  with pytest.raises(CheckpointError, match="unknown model kind 'gpt'"):
    load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="neither a Hugging Face checkpoint"):
    load_checkpoint(tmp_path)
  with pytest.raises(CheckpointError, match="no such checkpoint directory"):
    load_checkpoint(tmp_path / "missing")


def test_generate_cli_prompt_ids(saved):
  path, _, _ = saved
  cmd = [sys.executable, "-m", "moe_jax.generate", "--checkpoint", str(path),
         "--prompt_ids", "3 4 5", "--prompt_ids", "6 7", "--max_new_tokens", "4"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  from moe_jax import decoding
  loaded = load_checkpoint(path)
  ref = decoding.generate(loaded.module, loaded.params, [[3, 4, 5], [6, 7]], max_new_tokens=4,
                          eos_id=(1, 2))
  assert [list(map(int, line.split())) for line in lines] == ref.to_lists()
  bad = subprocess.run(cmd[:5] + ["--prompt_ids", "3 x"], capture_output=True, text=True)
  assert bad.returncode != 0 and "expected space-separated integers" in bad.stderr
