"""CALM with scanned frozen LMs: a scanned augmenting model composes like an unrolled one."""

import jax
import numpy as np
import pytest

from calm_jax import ComposedModel, CompositionConfig
from moe_jax import decoding
from moe_jax.checkpoints.layout import match_layout
from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig

V = 40
ANCHOR = DecoderConfig(vocab_size=V, d_model=24, num_layers=2, num_heads=4, d_ff=48,
                       remat_policy="full")
AUGMENT = DecoderConfig(vocab_size=V, d_model=16, num_layers=4, num_heads=2, d_ff=40)


def test_scanned_augment_reads_the_paired_layers():
  config = CompositionConfig(anchor=ANCHOR, augments=(AUGMENT,), layer_pairs=(((1, 0), (2, 1)),),
                             zero_init_output=False)
  scanned_config = config.replace(augments=(AUGMENT.replace(scan_layers=True),))
  module, scanned = ComposedModel(config=config), ComposedModel(config=scanned_config)
  params = registry.init_params(module, "calm", seed=3)
  stacked = match_layout(params, registry.param_shapes(scanned, "calm"))
  assert "layers" in stacked["augment_0"] and "layers_0" in stacked["anchor"]
  tokens = np.random.default_rng(0).integers(0, V, (2, 6))
  ref, _ = module.apply({"params": params}, tokens)
  got, _ = scanned.apply({"params": stacked}, tokens)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  out = decoding.generate(scanned, stacked, tokens, max_new_tokens=3)
  np.testing.assert_array_equal(out.tokens_BN,
                                decoding.generate(module, params, tokens,
                                                  max_new_tokens=3).tokens_BN)


def test_a_scanned_anchor_is_refused():
  with pytest.raises(ValueError, match="anchor must be unrolled"):
    CompositionConfig(anchor=ANCHOR.replace(scan_layers=True), augments=(AUGMENT,))
