"""Hugging Face Hub ids as checkpoint paths, offline, against a cache laid out as huggingface_hub does.

No network is used: the tiny checkpoints are written into a temporary
``HF_HUB_CACHE`` exactly as ``hf_hub_download`` stores them (content-addressed
``blobs/``, ``snapshots/<commit>/`` symlinks into them, ``refs/<branch or tag>``
holding the commit), and ``huggingface_hub.scan_cache_dir`` must read that
cache back before any test relies on it.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import jax  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

from moe_jax.checkpoints import CheckpointError, load_checkpoint  # noqa: E402
from moe_jax.checkpoints import hub  # noqa: E402

REPO = "tiny-org/tiny-qwen3"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def _tiny(path: Path, seed: int) -> None:
  torch.manual_seed(seed)
  cfg = transformers.Qwen3Config(vocab_size=61, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                                 tie_word_embeddings=False)
  transformers.Qwen3ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def _blob_name(data: bytes, lfs: bool) -> str:
  """The Hub's etag: sha256 for LFS files (weights), the git blob sha1 otherwise."""
  if lfs:
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_snapshot(cache: Path, repo_id: str, src: Path, commit: str, ref: str) -> None:
  """Stores ``src``'s files as revision ``ref`` (commit ``commit``) of ``repo_id`` in ``cache``."""
  storage = cache / huggingface_hub.file_download.repo_folder_name(repo_id=repo_id,
                                                                    repo_type="model")
  for file in sorted(src.iterdir()):
    data = file.read_bytes()
    blob = storage / "blobs" / _blob_name(data, file.suffix == ".safetensors")
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    pointer = storage / "snapshots" / commit / file.name
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
  (storage / "refs").mkdir(exist_ok=True)
  (storage / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
  """A cache holding REPO at ``main`` (seed 0) and tag ``v1`` (seed 1), plus local copies."""
  root = tmp_path_factory.mktemp("hub")
  cache = root / "cache"
  for seed, (ref, commit) in enumerate(COMMITS.items()):
    _tiny(root / ref, seed)
    cache_snapshot(cache, REPO, root / ref, commit, ref)
  info = huggingface_hub.scan_cache_dir(cache)
  (repo,) = info.repos
  assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == set(COMMITS.values())
  assert {ref for r in repo.revisions for ref in r.refs} == set(COMMITS)
  return root, cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
  """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=the test cache, for this process."""
  root, cache = hub_cache
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  return root, cache


def _same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_hub_id_loads_from_cache_offline(offline):
  root, cache = offline
  loaded = load_checkpoint(REPO)
  assert Path(loaded.source).resolve() == (cache / f"models--{REPO.replace('/', '--')}"
                                           / "snapshots" / COMMITS["main"]).resolve()
  assert loaded.config.qk_norm and loaded.config.hf_model_type == "qwen3"
  _same_params(loaded.params, load_checkpoint(root / "main").params)


def test_revisions_by_argument_suffix_and_commit(offline):
  root, _ = offline
  v1 = load_checkpoint(root / "v1").params
  _same_params(load_checkpoint(REPO, revision="v1").params, v1)
  _same_params(load_checkpoint(f"{REPO}@v1").params, v1)
  _same_params(load_checkpoint(REPO, revision=COMMITS["v1"]).params, v1)
  with pytest.raises(AssertionError):
    _same_params(load_checkpoint(REPO).params, v1)


def test_existing_local_path_wins_over_hub_id(offline, tmp_path, monkeypatch):
  root, _ = offline
  _tiny(tmp_path / REPO, seed=7)
  monkeypatch.chdir(tmp_path)
  local = load_checkpoint(REPO)
  assert Path(local.source) == Path(REPO)
  _same_params(local.params, load_checkpoint(tmp_path / REPO).params)


def test_model_config_and_init_params_resolve_hub_ids(offline):
  """The gin path: INIT_CHECKPOINT feeds model_from_checkpoint and InitFromCheckpoint."""
  from moe_jax.checkpoints.assignment import load_source_params
  from moe_jax.checkpoints.native import flatten
  from moe_jax.checkpoints.orbax import read_model_config

  root, _ = offline
  local = load_checkpoint(root / "v1")
  assert read_model_config(f"{REPO}@v1") == local.config
  flat = load_source_params(f"{REPO}@v1")
  assert sorted(flat) == sorted(flatten(local.params))


def test_missing_id_offline_names_it(offline):
  with pytest.raises(CheckpointError, match=r"tiny-org/nothing-here: HF_HUB_OFFLINE is set"):
    load_checkpoint("tiny-org/nothing-here")
  with pytest.raises(CheckpointError, match=r"tiny-org/tiny-qwen3 \(revision 'v9'\)"):
    load_checkpoint(REPO, revision="v9")


def test_network_failure_names_the_id(hub_cache, monkeypatch):
  _, cache = hub_cache
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
  with pytest.raises(CheckpointError, match=r"tiny-org/not-cached: .*could not be reached"):
    load_checkpoint("tiny-org/not-cached")


def test_not_a_path_nor_an_id():
  for bad in ("/no/such/dir", "no-such-dir", "a/b/c", "../x/y"):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
      load_checkpoint(bad)
  assert hub.parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
  assert hub.parse_hub_id("org/na--me") is None


def test_only_config_tokenizer_and_safetensors_are_fetched(monkeypatch, tmp_path):
  files = ["config.json", "generation_config.json", "model.safetensors",
           "model-00001-of-00002.safetensors", "model.safetensors.index.json",
           "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "tokenizer.model", "pytorch_model.bin", "model.gguf", "onnx/model.onnx",
           "original/consolidated.00.pth", "README.md", "flax_model.msgpack"]
  kept = set(filter_repo_objects(items=files, allow_patterns=list(hub.ALLOW_PATTERNS)))
  assert kept == {"config.json", "generation_config.json", "model.safetensors",
                  "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "tokenizer.model"}
  seen = {}

  def fake_snapshot_download(repo_id, **kw):
    seen.update(kw, repo_id=repo_id)
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  assert hub.resolve_checkpoint("org/name@dev") == tmp_path
  assert seen == {"repo_id": "org/name", "revision": "dev",
                  "allow_patterns": list(hub.ALLOW_PATTERNS)}


def test_cli_reads_hub_id_with_environment(hub_cache, tmp_path):
  """A user's run: HF_HUB_CACHE + HF_HUB_OFFLINE=1 in the environment, --checkpoint ORG/NAME."""
  root, cache = hub_cache
  env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
  cmd = [sys.executable, "-m", "moe_jax.generate", "--checkpoint", f"{REPO}@v1",
         "--prompt_ids", "3 4 5", "--max_new_tokens", "3"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  from moe_jax import decoding

  local = load_checkpoint(root / "v1")
  ref = decoding.generate(local.module, local.params, [[3, 4, 5]], max_new_tokens=3,
                          eos_id=local.config.eos_token_id)
  assert [list(map(int, line.split())) for line in out.stdout.strip().splitlines()] == \
      ref.to_lists()
