"""Shared experts for upcycled models, and the Hugging Face architecture they are written as.

**Shared expert** (Qwen2-MoE / DeepSeek style): every MoE layer gets one
always-on SwiGLU expert initialised from the dense FFN (BTX: the average of
the branches' FFNs), optionally behind Qwen2-MoE's ``sigmoid(x · w)`` gate.
The gate kernel starts at zero, so the gate starts at g₀ = sigmoid(0) = ½
(g₀ = 1 without a gate). ``shared_expert_scale`` s is mergekit-moe's
``residual_scale``: the shared expert's down-projection is ``s · W_down``.
Unlike mergekit we keep the function: the routed experts' down-projections
are scaled by ``1 − g₀·s``, so with renormalised top-k gates (the upcycling
default) a sparse-upcycled layer computes exactly

    (1 − g₀·s) · FFN(x) + g₀·s · FFN(x) = FFN(x)

at initialisation, whatever the router; greedy decoding equals the dense
model's. The default s puts half of the FFN in the shared expert and half in
the routed ones (g₀·s = ½: s = 1 with the gate, ½ without); g₀·s = 1 makes the
routed experts start at zero output (and their routers at zero gradient until
the down-projections move), g₀·s = 0 leaves them exact copies with a shared
expert that starts silent.

**Targets**: the transformers architecture the upcycled model exports as
(``export_hf``): ``mixtral`` (no shared expert), ``qwen2_moe`` (a gated
shared expert in every MoE layer; a Llama backbone gets zero q/k/v biases in
the file) or ``qwen3_moe`` (a Qwen3 backbone: per-head q/k norms, no shared
expert). The choice is checked right after the surgery, before anything is
written; attention experts (BAM) fit none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from moe_jax.upcycle.common import average, check_against_model, flat_params

TARGETS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM"}


def target_incompatibilities(config: Any, target: str) -> list[str]:
  """Why ``config`` cannot be exported as ``target`` (empty when it can)."""
  from moe_jax.checkpoints.hf_mixtral import mixtral_incompatibilities
  from moe_jax.checkpoints.hf_qwen_moe import moe_incompatibilities

  if target == "mixtral":
    return mixtral_incompatibilities(config)
  return moe_incompatibilities(config, target)


def check_target(target: str | None, shared_expert: bool | None, *, label: str, name: str,
                 attention_experts: bool, owner: str) -> bool:
  """Checks the export target and shared-expert request before any surgery.

  Returns:
    whether to add a shared expert (default: the target has one).
  """
  if target is not None and target not in TARGETS:
    raise ValueError(f"{owner}: target must be one of {sorted(TARGETS)}, got {target!r}")
  if attention_experts and (target is not None or shared_expert):
    what = (f"be written as {TARGETS[target]}" if target is not None
            else "take a shared expert")
    raise ValueError(f"{owner}: {label} (method {name!r}) cannot {what}: its attention "
                     "experts have no counterpart in Mixtral, Qwen2-MoE or Qwen3-MoE, whose "
                     "attention is one dense attention per layer; save it as a moe-jax "
                     "checkpoint, or use method 'sparse' or 'btx'")
  if shared_expert is None:
    return target == "qwen2_moe"
  if target == "qwen2_moe" and not shared_expert:
    raise ValueError(f"{owner}: target 'qwen2_moe' has a shared expert in every MoE layer; "
                     "drop shared_expert=False (or pick target 'mixtral' / 'qwen3_moe')")
  if target in ("mixtral", "qwen3_moe") and shared_expert:
    raise ValueError(f"{owner}: target {target!r} ({TARGETS[target]}) has no shared expert; "
                     "use target 'qwen2_moe'")
  return bool(shared_expert)


def add_shared_expert(config: Any, params: Mapping, dense_params: Sequence[Mapping], *,
                      gate: bool = True, scale: float | None = None,
                      owner: str = "upcycle") -> tuple[Any, dict]:
  """Adds a shared expert from the dense FFN(s) to every MoE layer (module docstring).

  Args:
    config, params: the upcycled ``MoeDecoderConfig`` and its parameters.
    dense_params: the dense inputs (their FFNs are averaged).
    gate: Qwen2-MoE's sigmoid gate (zero-initialised: ½ at the start).
    scale: ``shared_expert_scale``; default ``½ / g₀``.
    owner: who is asking, for error messages.
  """
  g0 = 0.5 if gate else 1.0
  scale = 0.5 / g0 if scale is None else float(scale)
  if not 0.0 <= g0 * scale <= 1.0:
    raise ValueError(f"{owner}: shared_expert_scale must be in [0, {1 / g0:g}] "
                     f"({'with' if gate else 'without'} the sigmoid gate), got {scale}")
  flat = flat_params(params)
  dense = [flat_params(p) for p in dense_params]
  routed = 1.0 - g0 * scale
  for i in config.moe_layers:
    base = f"layers_{i}/mlp/"
    for proj in ("wi_0", "wi_1", "wo"):
      w = average([d[f"{base}{proj}/kernel"] for d in dense])
      factor = scale if proj == "wo" else 1.0
      flat[f"{base}shared_expert/{proj}/kernel"] = (np.asarray(w, np.float32) * factor
                                                    ).astype(w.dtype)
    wo = flat[f"{base}experts/wo/kernel"]
    flat[f"{base}experts/wo/kernel"] = (np.asarray(wo, np.float32) * routed).astype(wo.dtype)
    if gate:
      flat[f"{base}shared_expert_gate/kernel"] = np.zeros((config.d_model, 1), wo.dtype)
  moe = config.moe.replace(shared_expert_dim=config.d_ff, num_shared_experts=1,
                           shared_expert_gate=gate)
  config = dataclasses.replace(config, moe=moe)
  return config, check_against_model(config, flat, owner)


def retarget(config: Any, target: str, *, label: str, owner: str) -> Any:
  """``config`` marked for export as ``target``; a ``ValueError`` saying why it cannot be."""
  config = dataclasses.replace(config, hf_model_type=target)
  why = target_incompatibilities(config, target)
  if why:
    raise ValueError(f"{owner}: the {label} model cannot be written as {TARGETS[target]}: "
                     + "; ".join(why))
  return config
