"""Branch-Train-MiX (Sukhbaatar et al. 2024, arXiv 2403.07816): N dense experts -> one MoE.

A seed model is branched into N copies, each trained on its own domain; BTX
mixes them: in every MoE layer the N FFNs become the N routed experts, and
every other parameter (attention, norms, embeddings, head, and the FFNs of
non-MoE layers) is the *average* of the N models -- they share a seed, so
their weights stay close enough to average. Routers are fresh (BTX: top-2).

Averaging the attention is where BTX loses information the branches learned;
BAM (:mod:`moe_jax.upcycle.bam`) keeps it as attention experts instead.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoderConfig, moe_layer_indices
from moe_jax.moe.layer import MoeConfig
from moe_jax.upcycle.common import (assemble, check_against_model, dense_fields, load_inputs,
                                    random_router_kernel, upcycled_moe_config)


def btx_merge(configs: Sequence[DecoderConfig], params: Sequence[Mapping], *,
              num_selected: int = 2, moe_layout: str | Sequence[int] = "every", seed: int = 0,
              moe: MoeConfig | None = None, names: Sequence[str] | None = None
              ) -> tuple[MoeDecoderConfig, dict]:
  """Mixes N dense decoders of one architecture into a ``MoeDecoder`` with N experts.

  Args:
    configs, params: the dense models (same architecture; the first one's
      non-architecture fields -- dtype, special tokens -- are kept).
    num_selected: top-k of the fresh routers (BTX: 2).
    moe_layout: which layers become MoE; the others average their FFNs.
    seed: NumPy seed of the routers.
    moe: full ``MoeConfig`` (``num_experts`` must be N) instead of the defaults
      of :func:`~moe_jax.upcycle.common.upcycled_moe_config`.
    names: names of the inputs for error messages (e.g. their directories).

  Raises:
    UpcycleError: mismatched architectures; the message names the tensor (and
      both shapes) or the config field.
  """
  flats = load_inputs(configs, params, names)
  n = len(flats)
  moe = moe or upcycled_moe_config(n, min(num_selected, n))
  if moe.num_experts != n:
    raise ValueError(f"btx_merge: moe.num_experts={moe.num_experts} but {n} dense models")
  layers = moe_layer_indices(moe_layout, configs[0].num_layers)
  out = assemble(flats, flats, moe_layers=layers)
  rng = np.random.default_rng(seed)
  for i in layers:
    out[f"layers_{i}/mlp/router/kernel"] = random_router_kernel(rng, configs[0].d_model, n)
  config = MoeDecoderConfig(**dense_fields(configs[0]), moe=moe, moe_layout=moe_layout)
  return config, check_against_model(config, out, "btx_merge")
