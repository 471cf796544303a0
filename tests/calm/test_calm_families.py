"""CALM on the families users bring: Gemma 2 (the official CALM code's), Phi-3, Qwen3 and an
MoE decoder (Qwen3-MoE upcycled from Qwen3) and DeepSeek-V3 (latent attention), as anchor or augmenting model, loaded from tiny
``transformers`` checkpoints. Each composition starts as its anchor exactly, and KV-cached
greedy decoding equals greedy decoding by full recomputation once the composition is active."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoints"))
import test_hf_deepseek  # noqa: E402
from test_decoder_parity import make_hf  # noqa: E402

from calm_jax import compose_modules  # noqa: E402
from moe_jax import decoding  # noqa: E402
from moe_jax.checkpoints import LoadedModel  # noqa: E402
from moe_jax.checkpoints.hf import load_hf  # noqa: E402
from moe_jax.models import registry  # noqa: E402
from moe_jax.upcycle.sparse import sparse_upcycle  # noqa: E402


def _loaded(tmp_path_factory, variant):
  path = tmp_path_factory.mktemp(variant.replace(":", "_"))
  if variant.startswith("deepseek:"):
    test_hf_deepseek.make_hf(path, variant.removeprefix("deepseek:"))
  else:
    make_hf(path, variant)
  return load_hf(path)


def _moe(dense):
  """Qwen3 -> 4-expert top-2 MoE, the dense FFN copied into every expert."""
  config, params = sparse_upcycle(dense.config, dense.params, num_experts=4, num_selected=2)
  return LoadedModel(config=config, module=registry.build_module(config), params=params,
                     source="upcycled")


def _activate(params, seed=3):
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  return {k: (jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), v)
              if k.startswith("composition_") else v) for k, v in params.items()}


@pytest.mark.parametrize("anchor_variant,augment_variant", [
    ("gemma2_softcap", "phi3_fused"), ("moe:qwen3_qknorm", "gemma3_local_global"),
    ("deepseek:q_lora", "deepseek:q_direct")])
def test_compositions_of_brought_families(tmp_path_factory, anchor_variant, augment_variant):
  def get(variant):
    moe = variant.startswith("moe:")
    loaded = _loaded(tmp_path_factory, variant.removeprefix("moe:"))
    return _moe(loaded) if moe else loaded

  anchor, augment = get(anchor_variant), get(augment_variant)
  module, params = compose_modules(anchor, [augment], num_composition_layers=1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, anchor.config.vocab_size, (2, 7)))
  ours, _ = module.apply({"params": params}, tokens)
  ref, _ = anchor.module.apply({"params": anchor.params}, tokens)
  np.testing.assert_allclose(ours, ref, atol=1e-6)  # zero-initialised output: the anchor

  params = _activate(params)
  active, _ = module.apply({"params": params}, tokens)
  assert np.abs(np.asarray(active) - np.asarray(ref)).max() > 1e-3
  prompts = [[3, 4, 5, 6]]  # small: every recomputed length compiles anew
  out = decoding.generate(module, params, prompts, max_new_tokens=2)
  for row, prompt in zip(out.tokens_BN, prompts):
    seq = list(prompt)
    for _ in range(2):
      logits, _ = module.apply({"params": params}, jnp.array([seq]))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert list(row) == seq[len(prompt):]
