"""Adapters on every model family: sparse-upcycled MoE and BAM decoders, CALM compositions.

Each case checks what the adapters promise on a dense decoder (tests/peft/
test_peft_models.py): the backbone's parameter names and values unchanged, the
backbone's logits at initialisation, a training step that leaves the backbone
bit for bit, and trained adapters that change the output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import ComposedModel, CompositionConfig
from moe_jax import peft
from moe_jax.models.bam_decoder import BamDecoder
from moe_jax.models.decoder import Decoder, DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoder
from moe_jax.peft import adapters as adapters_lib
from moe_jax.peft import config as config_lib
from moe_jax.upcycle import bam_merge, sparse_upcycle

from peft_util import VOCAB, check_adapted, random_params, randomize_adapters, rng_key

ALL_LORA = ("q", "k", "v", "o", "ffn_in", "ffn_out")
DENSE = DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=24, max_seq_len=32)


def _tokens(seed=3, shape=(2, 7)):
  rng = np.random.default_rng(seed)
  valid = np.ones(shape, bool)
  valid[1, 5:] = False
  return jnp.asarray(rng.integers(2, VOCAB, shape)), jnp.asarray(valid)


def _adapter_paths(params):
  _, adapters = peft.split_params(params)
  return {jax.tree_util.keystr(p, simple=True, separator="/")
          for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}


# ----------------------------------------------------------------------------- sparse upcycling


@pytest.fixture(scope="module")
def upcycled():
  dense = random_params(Decoder(config=DENSE), seed=0)
  config, params = sparse_upcycle(DENSE, dense, num_experts=4, num_selected=2, moe_layout=(1,),
                                  noise_std=0.3)
  return MoeDecoder(config=config), params


@pytest.mark.parametrize("kw", [
    dict(method="mov", num_experts=4, sites=("k", "v", "ffn"), load_balance_coef=0.01),
    dict(method="molora", num_experts=3, sites=ALL_LORA, top_k=2, router="sentence"),
])
def test_mov_and_molora_on_a_sparse_upcycled_moe_decoder(upcycled, kw):
  module, base = upcycled
  _, params = check_adapted(module, base, peft.PeftConfig(**kw), *_tokens())
  paths = _adapter_paths(params)
  # The dense layer's FFN is adapted; the MoE layer's routed experts are not a site.
  ffn = "layers_0/mlp/peft_hidden" if kw["method"] == "mov" else "layers_0/mlp/peft_wo"
  assert any(p.startswith(ffn) for p in paths)
  assert not any(p.startswith("layers_1/mlp/") for p in paths)
  assert any(p.startswith("layers_1/attn/peft_v/") for p in paths)


def test_a_site_that_matches_nothing_is_refused(upcycled):
  module, base = upcycled
  config = module.config.replace(moe_layout="every")
  model = peft.adapt(MoeDecoder(config=config), peft.PeftConfig(method="mov"))
  with pytest.raises(ValueError, match="site 'ffn' of mov matches no module of PeftMoeDecoder"):
    peft.init_adapter_params(model, {**base, "layers_0": base["layers_1"]}, rng_key())


# ----------------------------------------------------------------------------- BAM


@pytest.fixture(scope="module")
def bam_parts():
  par = DENSE.replace(parallel_block=True)
  dense = [random_params(Decoder(config=par), seed=s) for s in (0, 1)]
  return {shared: bam_merge([par] * 2, dense, shared_kv=shared, num_selected=1)
          for shared in (False, True)}


@pytest.mark.parametrize("shared_kv, kw", [
    (False, dict(method="mov", num_experts=3, sites=("q", "k", "v"), router="sentence")),
    (True, dict(method="molora", num_experts=3, sites=("q", "k", "v"), z_loss_coef=1e-3)),
])
def test_mov_and_molora_on_a_bam_decoder(bam_parts, shared_kv, kw):
  config, base = bam_parts[shared_kv]
  module = BamDecoder(config=config)
  cfg = peft.PeftConfig(**kw)
  model, params = check_adapted(module, base, cfg, *_tokens())
  assert any(p.startswith("layers_0/attn/peft_q/") for p in _adapter_paths(params))
  if cfg.router == "token":  # the KV cache holds adapted keys / values
    params = randomize_adapters(params)
    tokens, _ = _tokens()
    apply = jax.jit(model.apply)
    full, _ = apply({"params": params}, tokens)
    cache = model.init_cache(tokens.shape[0], 8)
    steps = []
    for t in range(tokens.shape[1]):
      out, cache = apply({"params": params}, tokens[:, t:t + 1], cache=cache)
      steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


def test_the_fused_output_projection_of_attention_experts_is_refused(bam_parts):
  config, base = bam_parts[False]
  model = peft.adapt(BamDecoder(config=config), peft.PeftConfig(method="lora", sites=("o",)))
  with pytest.raises(ValueError, match=r"attn: AttentionMixture has no separate \('o',\)"):
    peft.init_adapter_params(model, base, rng_key())


# ----------------------------------------------------------------------------- CALM


def test_adapters_on_a_calm_composition():
  anchor = DENSE.replace(num_layers=3)
  augment = DENSE.replace(d_model=8, num_heads=2, num_kv_heads=1, parallel_block=True)
  module = ComposedModel(config=CompositionConfig(anchor=anchor, augments=(augment,),
                                                  layer_pairs=(((0, 1), (1, 2)),)))
  base = random_params(module, seed=0)
  cfg = peft.PeftConfig(method="mov", num_experts=2, sites=("q", "k", "v", "ffn"),
                        router="sentence")
  model, params = check_adapted(module, base, cfg, *_tokens())
  paths = _adapter_paths(params)
  for prefix in ("anchor/layers_2/mlp/peft_hidden/", "augment_0/layers_0/attn/peft_k/",
                 "composition_a0_l1_b2/cross_attn/peft_v/"):
    assert any(p.startswith(prefix) for p in paths), prefix
  # Sentence routing stays causal through the composition's cross-attention.
  tokens, _ = _tokens()
  params = randomize_adapters(params)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % VOCAB)
  np.testing.assert_allclose(apply(params, changed)[:, :-1], apply(params, tokens)[:, :-1],
                             atol=1e-6)


# ----------------------------------------------------------------------------- a new method


class BiasAdapter(nn.Module):
  """A toy method: a learned bias added to the projection's output (zero at first)."""

  peft: peft.PeftConfig
  out_axes: tuple

  @nn.compact
  def __call__(self, y):
    feat = y.shape[y.ndim - len(self.out_axes):]
    return y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               self.out_axes), feat)


def test_a_new_method_is_one_registry_entry_plus_its_math(monkeypatch):
  method = config_lib.Method(name="bias", adapter="bias", sites=("q", "k", "v", "o"),
                             default_sites=("v",))
  monkeypatch.setitem(config_lib._REGISTRY, "bias", method)
  monkeypatch.setitem(adapters_lib.ADAPTERS, "bias", adapters_lib.AdapterFamily(
      build=lambda p, proj, parent: BiasAdapter(peft=p, out_axes=proj.out_axes, parent=parent),
      apply=lambda adapter, x, y, route_x, valid: adapter(y)))
  module = Decoder(config=DENSE)
  base = random_params(module)
  _, params = check_adapted(module, base, peft.PeftConfig(method="bias"), *_tokens())
  assert _adapter_paths(params) == {f"layers_{i}/attn/peft_v/bias" for i in range(2)}


def test_adapted_modules_keep_their_fields_and_methods():
  model = peft.adapt(Decoder(config=DENSE), peft.PeftConfig(method="lora"))
  assert isinstance(model, Decoder) and model.config == DENSE
  assert type(model).__name__ == "PeftDecoder"
  assert peft.adapt(Decoder(config=DENSE), peft.PeftConfig(method="lora")) == model


# ----------------------------------------------------------------------------- stacks


@pytest.mark.parametrize("stack", [dict(remat_policy="full"),
                                   dict(scan_layers=True, remat_policy="sublayer_outputs")])
def test_adapters_in_rematerialised_and_scanned_stacks(stack):
  module = Decoder(config=DENSE.replace(**stack))
  cfg = peft.PeftConfig(method="mov", num_experts=3, router="sentence")
  _, params = check_adapted(module, random_params(module), cfg, *_tokens())
  if stack.get("scan_layers"):  # adapters are stacked over the layers like the backbone
    assert params["layers"]["attn"]["peft_k"]["scale"].shape == (2, 3, 2, 4)
