"""Upcycling scanned dense models: surgery reads either layout, the MoE comes back scanned."""

import numpy as np

from moe_jax.checkpoints.layout import match_layout, unrolled
from moe_jax.models import registry
from moe_jax.models.decoder import Decoder
from moe_jax.models.moe_decoder import MoeDecoder
from moe_jax.upcycle import (ExpertPrompts, bam_merge, init_routers_from_vectors,
                             prompt_router_vectors, sparse_upcycle)

from upcycle_helpers import logits_of, make_config, make_params


def test_sparse_upcycle_of_a_scanned_model_is_scanned_and_preserves_the_function(tokens):
  cfg = make_config(num_layers=4)
  dense = make_params(cfg)
  want = logits_of(Decoder(config=cfg), dense, tokens)
  scanned_cfg = cfg.replace(scan_layers=True, remat_policy="full")
  scanned = match_layout(dense, registry.param_shapes(Decoder(config=scanned_cfg), "decoder"))
  moe_cfg, params = sparse_upcycle(scanned_cfg, scanned, num_experts=3, num_selected=1,
                                   moe_layout="every_other")
  assert moe_cfg.scan_layers and set(params["layers"]) == {"block_0", "block_1"}
  assert params["layers"]["block_1"]["mlp"]["experts"]["wi_0"]["kernel"].shape == (2, 3, 32, 48)
  np.testing.assert_allclose(logits_of(MoeDecoder(config=moe_cfg), params, tokens), want,
                             atol=2e-5, rtol=0)


def test_router_init_on_scanned_models():
  cfg = make_config(parallel_block=True)
  dense = make_params(cfg)
  scanned_cfg = cfg.replace(scan_layers=True)
  scanned = match_layout(dense, registry.param_shapes(Decoder(config=scanned_cfg), "decoder"))
  rng = np.random.default_rng(0)
  experts = [ExpertPrompts(positive=rng.integers(lo, lo + 15, size=(3, 6))) for lo in (1, 21)]
  vectors = prompt_router_vectors(Decoder(config=scanned_cfg), scanned, experts)
  np.testing.assert_allclose(vectors["mlp"], prompt_router_vectors(Decoder(config=cfg), dense,
                                                                   experts)["mlp"], atol=1e-5)
  bam_cfg, params = bam_merge([scanned_cfg] * 2, [scanned] * 2)
  assert bam_cfg.scan_layers and "layers" in params
  params = init_routers_from_vectors(params, vectors)
  assert "layers" in params
  np.testing.assert_allclose(unrolled(params)["layers_1"]["attn"]["router"]["kernel"],
                             vectors["attn"][1].T, rtol=1e-6)
