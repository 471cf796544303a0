"""Converter for Mixtral (``MixtralForCausalLM``) <-> :class:`MoeDecoderConfig` models.

A Mixtral layer is a Llama/Mistral layer whose FFN is a routed mixture of
SwiGLU experts: ``softmax(x · W_gate) -> top-k -> renormalise`` (the router
runs on the post-attention-normed hidden state, like ours), dropless. So a
sparse-upcycled or BTX :class:`~moe_jax.models.moe_decoder.MoeDecoder` *is* a
Mixtral when

* every layer is MoE (``moe_layout`` covers all layers), blocks are
  sequential, attention has no biases;
* routing is tokens-choose top-k with renormalised gates (with k = 1 that
  means gate 1; our Switch-style un-renormalised top-1 is another function);
* there is no shared expert.

Anything else raises :class:`CheckpointError` saying what Mixtral cannot
express -- notably BAM's attention experts and parallel blocks -- instead of
writing a checkpoint that computes something else. Capacity is a training
choice, not a weight: Mixtral (and vLLM, llama.cpp) serve dropless, which
equals our model with ``capacity_factor=None``; the exported config therefore
describes the dropless model, and importing sets ``capacity_factor=None``.

Weight layouts. We export the per-expert layout transformers' own
``save_pretrained`` writes and vLLM / llama.cpp's converters read::

    model.layers.{i}.block_sparse_moe.gate.weight          [E, D]  = router.kernel.T
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight [F, D]  gate  (wi_0[e].T)
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight [F, D]  up    (wi_1[e].T)
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight [D, F]  down  (wo[e].T)

and import that or transformers 5's fused in-memory layout
(``mlp.gate.weight``, ``mlp.experts.gate_up_proj [E, 2F, D]`` = gate then
up, ``mlp.experts.down_proj [E, D, F]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import (CheckpointError, TensorGetter,
                                           moe_decoder_incompatibilities, refuse_export)
from moe_jax.checkpoints.hf_llama import _FEATURES, LlamaConverter, decoder_params_to_hf
from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoder, MoeDecoderConfig
from moe_jax.moe.layer import MoeConfig


def mixtral_incompatibilities(c: MoeDecoderConfig) -> list[str]:
  """Why ``c`` is not a Mixtral (empty when it is)."""
  why = moe_decoder_incompatibilities(
      c, "Mixtral", bias="none",
      features={k: v for k, v in _FEATURES.items() if k not in ("parallel", "sliding")})
  if c.moe_layers != tuple(range(c.num_layers)):
    why.append(f"only layers {c.moe_layers} of {c.num_layers} are MoE; every Mixtral layer is")
  m = c.moe
  if m.router == "tokens_choose" and not m.renormalize:
    why.append("its top-k gates are not renormalised; Mixtral renormalises them (set "
               "MoeConfig.renormalize=True)")
  if m.shared_hidden_dim is not None:
    why.append("it has a shared expert; Mixtral has none")
  return why


class MixtralConverter:
  model_types = ("mixtral",)
  config_type = MoeDecoderConfig

  def module(self, config: MoeDecoderConfig) -> MoeDecoder:
    return MoeDecoder(config=config)

  def config_from_hf(self, hf: Mapping[str, Any]) -> MoeDecoderConfig:
    # The dense part reads like a Mistral (sliding window included).
    base = LlamaConverter().config_from_hf({**hf, "model_type": "mistral"})
    for key in ("num_local_experts", "num_experts_per_tok"):
      if key not in hf:
        raise CheckpointError(f"config.json: missing required field {key!r}")
    moe = MoeConfig(num_experts=int(hf["num_local_experts"]),
                    num_selected=int(hf["num_experts_per_tok"]), renormalize=True,
                    capacity_factor=None,
                    jitter_noise=float(hf.get("router_jitter_noise") or 0.0),
                    load_balancing_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DecoderConfig)}
    fields["hf_model_type"] = "mixtral"
    return MoeDecoderConfig(**fields, moe=moe, moe_layout="every")

  def config_to_hf(self, c: MoeDecoderConfig) -> dict[str, Any]:
    refuse_export(c, "MixtralForCausalLM", mixtral_incompatibilities(c))
    dense = DecoderConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(DecoderConfig)})
    hf = LlamaConverter().config_to_hf(dense.replace(hf_model_type="mistral"))
    hf.pop("use_sliding_window", None)
    hf.update({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": c.moe.expert_dim or c.d_ff,
        "num_local_experts": c.moe.num_experts,
        "num_experts_per_tok": c.moe.num_selected,
        "router_aux_loss_coef": c.moe.load_balancing_loss_coef,
        "router_jitter_noise": c.moe.jitter_noise,
        "output_router_logits": False,
        "sliding_window": c.sliding_window,
    })
    return hf

  def params_from_hf(self, get: TensorGetter, c: MoeDecoderConfig) -> dict:
    d, h, k, dh = c.d_model, c.num_heads, c.kv_heads, c.dh
    e, f = c.moe.num_experts, c.moe.expert_dim or c.d_ff
    params: dict[str, Any] = {
        "embed": {"embedding": get.get("model.embed_tokens.weight", (c.vocab_size, d))},
        "final_norm": {"scale": get.get("model.norm.weight", (d,))},
    }
    for i in range(c.num_layers):
      p = f"model.layers.{i}."
      attn = {name: {"kernel": get.get(p + f"self_attn.{name}_proj.weight", (n * dh, d))
                     .T.reshape(d, n, dh)} for name, n in (("q", h), ("k", k), ("v", k))}
      o = get.get(p + "self_attn.o_proj.weight", (d, h * dh))
      attn["o"] = {"kernel": o.T.reshape(h, dh, d)}
      params[f"layers_{i}"] = {
          "input_norm": {"scale": get.get(p + "input_layernorm.weight", (d,))},
          "post_attn_norm": {"scale": get.get(p + "post_attention_layernorm.weight", (d,))},
          "attn": attn,
          "mlp": self._moe_from_hf(get, p, e, f, d),
      }
    if not c.tie_embeddings:
      params["lm_head"] = {"kernel": get.get("lm_head.weight", (c.vocab_size, d)).T}
    return params

  @staticmethod
  def _moe_from_hf(get: TensorGetter, p: str, e: int, f: int, d: int) -> dict:
    if get.has(p + "mlp.experts.gate_up_proj"):  # transformers 5 fused layout
      gate_up = get.get(p + "mlp.experts.gate_up_proj", (e, 2 * f, d))
      down = get.get(p + "mlp.experts.down_proj", (e, d, f))
      router = get.get(p + "mlp.gate.weight", (e, d))
      wi_0, wi_1 = gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1)
      wo = down.transpose(0, 2, 1)
    else:
      q = p + "block_sparse_moe."
      router = get.get(q + "gate.weight", (e, d))
      wi_0 = np.stack([get.get(q + f"experts.{j}.w1.weight", (f, d)).T for j in range(e)])
      wi_1 = np.stack([get.get(q + f"experts.{j}.w3.weight", (f, d)).T for j in range(e)])
      wo = np.stack([get.get(q + f"experts.{j}.w2.weight", (d, f)).T for j in range(e)])
    # Routers are float32 in our model whatever the checkpoint dtype (routing.py).
    return {"router": {"kernel": np.asarray(router, np.float32).T},
            "experts": {"wi_0": {"kernel": wi_0}, "wi_1": {"kernel": wi_1},
                        "wo": {"kernel": wo}}}

  def params_to_hf(self, params: Mapping, c: MoeDecoderConfig) -> dict[str, np.ndarray]:
    return decoder_params_to_hf(params, c, _moe_to_hf)


def _moe_to_hf(mlp: Mapping, c: MoeDecoderConfig, prefix: str) -> dict[str, np.ndarray]:
  q = prefix + "block_sparse_moe."
  out = {q + "gate.weight": np.asarray(mlp["router"]["kernel"]).T}
  experts = mlp["experts"]
  for j in range(c.moe.num_experts):
    out[q + f"experts.{j}.w1.weight"] = np.asarray(experts["wi_0"]["kernel"][j]).T
    out[q + f"experts.{j}.w3.weight"] = np.asarray(experts["wi_1"]["kernel"][j]).T
    out[q + f"experts.{j}.w2.weight"] = np.asarray(experts["wo"]["kernel"][j]).T
  return out
