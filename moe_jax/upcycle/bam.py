"""Branch-Attend-Mix (Zhang et al. 2024, arXiv 2408.08274): FFN *and* attention experts.

Like BTX (:mod:`moe_jax.upcycle.btx`), N dense models of one architecture
(a seed and its domain branches) become one MoE, but the branches' attention
is not averaged away: every MoE layer gets a mixture of N attention experts
(:class:`~moe_jax.moe.attention_mixture.AttentionMixture`) made of the N
models' attention layers, next to the N FFN experts. Two variants:

* **expert-KV** (``shared_kv=False``): each attention expert keeps its own
  q, k, v and o. Most expressive; E key/value sets per layer in the cache.
* **shared-KV** (``shared_kv=True``): per-expert q and o, and one k and v,
  the average of the N models'. One KV cache per layer, as the dense model:
  the variant to serve at long context.

Attention routing is soft (every expert, softmax weights) by default, top-k
optional; FFN routing top-1 by default, with load-balancing and z-losses.
Norms, embeddings and head are averaged; both routers are fresh. The paper
uses a parallel-attention block (attention and FFN read the same input), so
the dense models should be ``parallel_block=True`` decoders; sequential ones
work too.

Function preservation: N copies of one dense model give back that model's
function exactly (soft attention weights sum to one, renormalised FFN gates
too), whatever the routers. With top-1, renormalised gates are all 1, so the
FFN router learns from the balancing and z-losses (and its initialisation)
only; Switch gates (``moe=upcycled_moe_config(N, 1, renormalize=False)``)
let the LM loss train it at the price of an FFN scaled by its gate at the
start -- see :func:`~moe_jax.upcycle.common.upcycled_moe_config` and the
``bam_ekv_switch`` row of ``experiments/bam_vs_btx``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from moe_jax.models.bam_decoder import BamDecoderConfig
from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import moe_layer_indices
from moe_jax.moe.attention_mixture import AttentionMixtureConfig
from moe_jax.moe.layer import MoeConfig
from moe_jax.upcycle.common import (assemble, check_against_model, dense_fields, load_inputs,
                                    random_router_kernel, upcycled_moe_config)


def bam_merge(configs: Sequence[DecoderConfig], params: Sequence[Mapping], *,
              shared_kv: bool = False, num_selected: int = 1,
              attention_top_k: int | None = None, moe_layout: str | Sequence[int] = "every",
              seed: int = 0, moe: MoeConfig | None = None,
              attention: AttentionMixtureConfig | None = None,
              names: Sequence[str] | None = None) -> tuple[BamDecoderConfig, dict]:
  """Mixes N dense decoders into a ``BamDecoder`` with N FFN and N attention experts.

  Args:
    configs, params: the dense models (same architecture).
    shared_kv: the shared-KV variant (one averaged k/v per layer).
    num_selected: top-k of the FFN routers (BAM: 1).
    attention_top_k: ``None`` for soft attention routing (BAM's best), else top-k.
    moe_layout: layers with FFN and attention experts; the others are averaged.
    seed: NumPy seed of the routers.
    moe: full FFN ``MoeConfig`` instead of
      :func:`~moe_jax.upcycle.common.upcycled_moe_config` (``num_experts`` = N).
    attention: full ``AttentionMixtureConfig`` instead of the one built from
      ``shared_kv`` and ``attention_top_k`` (``num_experts`` = N).
    names: names of the inputs for error messages.

  Raises:
    UpcycleError: mismatched architectures (the message names the tensor or field).
  """
  flats = load_inputs(configs, params, names)
  n = len(flats)
  moe = moe or upcycled_moe_config(n, min(num_selected, n))
  attention = attention or AttentionMixtureConfig(num_experts=n, num_selected=attention_top_k,
                                                  shared_kv=shared_kv)
  for what, e in (("moe", moe.num_experts), ("attention", attention.num_experts)):
    if e != n:
      raise ValueError(f"bam_merge: {what}.num_experts={e} but {n} dense models")
  layers = moe_layer_indices(moe_layout, configs[0].num_layers)
  out = assemble(flats, flats, moe_layers=layers, attention_experts=True,
                 shared_kv=attention.shared_kv)
  rng = np.random.default_rng(seed)
  d = configs[0].d_model
  for i in layers:
    out[f"layers_{i}/mlp/router/kernel"] = random_router_kernel(rng, d, n)
    out[f"layers_{i}/attn/router/kernel"] = random_router_kernel(rng, d, n)
  config = BamDecoderConfig(**dense_fields(configs[0]), moe=moe, moe_layout=moe_layout,
                            attention=attention)
  return config, check_against_model(config, out, "bam_merge")
