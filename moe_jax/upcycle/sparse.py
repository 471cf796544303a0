"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): one dense model -> MoE.

Every FFN of the MoE layers is copied into E experts (optionally with a
little noise, so the experts are not exact copies and can diverge faster);
each MoE layer gets a fresh router; attention, norms, embeddings and head
are the dense model's, unchanged.

With identical experts and gates that sum to one (renormalised top-k, the
default here) the MoE computes exactly the dense FFN for every token, whatever
the router: the upcycled model starts as the dense model and training only
has to learn to specialise.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoderConfig, moe_layer_indices
from moe_jax.moe.layer import MoeConfig
from moe_jax.upcycle.common import (FFN_TENSOR, assemble, check_against_model, dense_fields,
                                    load_inputs, random_router_kernel, upcycled_moe_config)


def sparse_upcycle(config: DecoderConfig, params: Mapping, *, num_experts: int,
                   num_selected: int = 2, moe_layout: str | Sequence[int] = "every",
                   noise_std: float = 0.0, seed: int = 0, moe: MoeConfig | None = None
                   ) -> tuple[MoeDecoderConfig, dict]:
  """Upcycles a dense decoder into a ``MoeDecoder``.

  Args:
    config: the dense model's config.
    params: its (unboxed) parameters.
    num_experts: E copies of each FFN.
    num_selected: top-k of the fresh routers.
    moe_layout: which layers become MoE (``"every"``, ``"every_other"``, indices).
    noise_std: relative noise on the copies: expert e's kernel is
      ``W + noise_std * std(W) * N(0, 1)`` (``0``: exact copies, exact function
      preservation). Expert 0 stays an exact copy either way.
    seed: NumPy seed of the routers and the noise.
    moe: full ``MoeConfig`` instead of :func:`~moe_jax.upcycle.common.upcycled_moe_config`
      (its ``num_experts`` must be ``num_experts``).

  Returns:
    ``(MoeDecoderConfig, params)``.
  """
  if num_experts < 1:
    raise ValueError(f"sparse_upcycle: num_experts must be >= 1, got {num_experts}")
  if noise_std < 0:
    raise ValueError(f"sparse_upcycle: noise_std must be >= 0, got {noise_std}")
  (flat,) = load_inputs([config], [params], None)
  moe = moe or upcycled_moe_config(num_experts, num_selected)
  if moe.num_experts != num_experts:
    raise ValueError(f"sparse_upcycle: moe.num_experts={moe.num_experts} but "
                     f"num_experts={num_experts}")
  layers = moe_layer_indices(moe_layout, config.num_layers)
  rng = np.random.default_rng(seed)
  experts = []
  for e in range(num_experts):
    if e == 0 or noise_std == 0:
      experts.append(flat)
      continue
    noisy = {}
    for name, w in flat.items():
      m = FFN_TENSOR.match(name)
      if m and int(m.group(1)) in layers:
        w32 = np.asarray(w, np.float32)
        noisy[name] = (w32 + noise_std * w32.std() * rng.standard_normal(w32.shape)
                       ).astype(np.asarray(w).dtype)
    experts.append({**flat, **noisy})
  out = assemble([flat], experts, moe_layers=layers)
  for i in layers:
    out[f"layers_{i}/mlp/router/kernel"] = random_router_kernel(rng, config.d_model, num_experts)
  moe_config = MoeDecoderConfig(**dense_fields(config), moe=moe, moe_layout=moe_layout)
  return moe_config, check_against_model(moe_config, out, "sparse_upcycle")

