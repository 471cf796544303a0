"""The Python API: the README's example runs verbatim on tiny checkpoints, and each call
does what its CLI counterpart does (frozen backbones stay frozen, saves load back)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import moe_jax as mj
from moe_jax.checkpoints import export_hf
from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _tiny_llama(directory: Path, d_model: int, seed: int) -> str:
  config = DecoderConfig(vocab_size=384, d_model=d_model, num_layers=2, num_heads=2, d_ff=64,
                         max_seq_len=64, hf_model_type="llama", eos_token_id=1, pad_token_id=0)
  params = registry.init_params(registry.build_module(config), "decoder", seed=seed)
  return str(export_hf(directory, config, params))


def _readme_block(title: str) -> str:
  section = README.read_text().split(f"## {title}\n", 1)[1]
  return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def _leaves(tree, keep):
  return [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if keep(jax.tree_util.keystr(p))]


def test_import_is_cheap_and_names_do_not_shadow_subpackages():
  code = ("import sys, moe_jax; heavy = [m for m in ('jax', 'tensorflow', 'seqio', 'flax') "
          "if m in sys.modules]; assert not heavy, heavy; import moe_jax.train, moe_jax.generate, "
          "moe_jax.upcycle; assert callable(moe_jax.finetune) and callable(moe_jax.predict); "
          "assert callable(moe_jax.upcycle_model) and callable(moe_jax.compose); "
          "import moe_jax.train.trainer; assert callable(moe_jax.finetune)")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
  with pytest.raises(AttributeError, match="no attribute 'trian'"):
    mj.trian  # pylint: disable=pointless-statement


def test_readme_example(tmp_path, monkeypatch):
  base_dir = _tiny_llama(tmp_path / "base", 32, seed=0)
  aug_dir = _tiny_llama(tmp_path / "augmenting", 24, seed=1)
  code = _readme_block("Python API (notebooks)")
  code = code.replace('"path/to/checkpoint"', repr(base_dir))
  code = code.replace('"path/to/augmenting"', repr(aug_dir))
  monkeypatch.chdir(tmp_path)
  ns: dict = {}
  exec(compile(code, str(README), "exec"), ns)  # pylint: disable=exec-used

  # MoV-10: only the adapters moved; the loss was logged every step.
  base, model, run = ns["base"], ns["model"], ns["run"]
  steps, losses = ns["steps"], ns["losses"]
  assert steps.tolist() == list(range(1, 21)) and np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean()
  is_adapter = lambda name: "peft_" in name
  for a, b in zip(_leaves(model.params, lambda n: not is_adapter(n)),
                  _leaves(run.model.params, lambda n: not is_adapter(n))):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      _leaves(model.params, is_adapter), _leaves(run.model.params, is_adapter)))
  assert jax.tree.structure(base.params) != jax.tree.structure(model.params)

  probs = ns["probs"]
  assert len(probs) == 2 * 3  # two layers x (k, v, ffn) sites
  for site, p in probs.items():
    assert p.shape == (10,) and abs(p.sum() - 1) < 1e-4, site
  scores = ns["scores"]
  assert np.isfinite(scores["loss"]["loss"])
  assert "exact_match" in next(iter(scores["tasks"].values()))

  reloaded = ns["reloaded"]
  ids = [[0, 51, 46, 55, 64, 1]]
  assert mj.predict(reloaded, ids, max_new_tokens=4) == mj.predict(run.model, ids,
                                                                  max_new_tokens=4)
  assert json.loads((tmp_path / "out/mov10/adapter_config.json").read_text())["peft"][
      "num_experts"] == 10

  # Sparse upcycling preserves the function; the Mixtral export loads back.
  moe = ns["moe"]
  assert mj.predict(moe, ids, max_new_tokens=6) == mj.predict(base, ids, max_new_tokens=6)
  hf = json.loads((tmp_path / "out/mixtral/config.json").read_text())
  assert (hf["model_type"], hf["num_local_experts"], hf["num_experts_per_tok"]) == (
      "mixtral", 8, 2)
  assert mj.predict(mj.load(tmp_path / "out/mixtral"), ids, max_new_tokens=6) == \
      mj.predict(moe, ids, max_new_tokens=6)

  # CALM: the frozen models stay frozen, the composition layers train.
  composed, calm_run = ns["composed"], ns["calm_run"]
  for key in ("anchor", "augment_0"):
    for a, b in zip(jax.tree.leaves(composed.params[key]),
                    jax.tree.leaves(calm_run.model.params[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(calm_run.history) == 5


def test_ia3_folds_into_an_hf_export(tmp_path):
  base = mj.load(_tiny_llama(tmp_path / "base", 32, seed=0))
  model = mj.add_adapters(base, "ia3")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(  # move the (identity-initialised) scales
      lambda p, x: x * rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
      if "peft_" in jax.tree_util.keystr(p) else x, model.params)
  model = type(model)(**{**model.__dict__, "params": params})
  folded = mj.load(mj.export_hf(model, tmp_path / "ia3_hf"))
  tokens = np.array([[0, 51, 46, 55, 64, 1]], np.int32)
  want, _ = model.module.apply({"params": model.params}, tokens)
  got, _ = folded.module.apply({"params": folded.params}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="upcycle_model: method must be"):
    mj.upcycle_model(base, method="dense")
  with pytest.raises(ValueError, match="has no routers"):
    mj.router_probabilities(base, [[1, 2]])


def test_router_probabilities_is_the_mean_of_every_report_of_a_site():
  import flax.linen as nn
  import jax.numpy as jnp

  class Site(nn.Module):  # one routed site reporting three times (e.g. called thrice)
    @nn.compact
    def __call__(self, tokens):
      for usage in ([1.0, 0.0], [0.0, 1.0], [0.0, 1.0]):
        self.sow("moe_metrics", "expert_usage", jnp.asarray(usage))
      return tokens

  class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return Site(name="mix")(tokens)

  model = mj.LoadedModel(config=None, module=Model(), params={}, source="test")
  got = mj.router_probabilities(model, [[1, 2, 3]])
  assert list(got) == ["mix"]
  np.testing.assert_allclose(got["mix"], [1 / 3, 2 / 3], rtol=1e-6)  # not pairwise (1/4, 3/4)
