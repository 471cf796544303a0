"""Converter for Qwen2-MoE, Qwen3-MoE and OLMoE <-> :class:`MoeDecoderConfig` models.

The three are Llama-layout decoders whose FFN is a routed mixture of SwiGLU
experts, ``softmax(x · W_gate) -> top-k -> (renormalise iff norm_topk_prob)``
run dropless on the post-attention-normed hidden state, like ours with
``capacity_factor=None`` and ``MoeConfig.renormalize = norm_topk_prob``.
They differ in:

============  =======================  =========================  ========================
              Qwen2-MoE                Qwen3-MoE                  OLMoE
============  =======================  =========================  ========================
attention     q/k/v biases             q/k RMSNorm per head [Dh]  q/k RMSNorm over the
                                       (like Qwen3)               whole projection [H·Dh]
shared        one SwiGLU expert        none                       none
expert        ``shared_expert_inter-
              mediate_size`` wide,
              times ``sigmoid(x·w)``
MoE layers    ``decoder_sparse_step``  same                       every layer
              minus ``mlp_only_layers``
============  =======================  =========================  ========================

Our config expresses all of it with fields, never model names:
``MoeConfig.shared_expert_dim`` + ``shared_expert_gate`` (Qwen2-MoE's gated
shared expert), ``DecoderConfig.qk_norm`` / ``qk_norm_full_width`` (Qwen3 /
OLMoE norms) and ``moe_layout`` (the layers ``decoder_sparse_step`` and
``mlp_only_layers`` leave sparse; dense layers keep ``intermediate_size``,
experts ``moe_intermediate_size``). A config the target cannot express raises
:class:`CheckpointError` saying what is missing; OLMoE's ``clip_qkv`` (no
field of ours) is refused on import by name.

``shared_expert_intermediate_size: 0`` is a Qwen2-MoE without a shared expert
(ours: ``shared_expert_dim=None``): transformers still builds one, zero wide,
with its gate, so the checkpoint holds ``shared_expert.*_proj.weight`` of shape
``[0, D]`` / ``[D, 0]`` and a ``[1, D]`` gate that scales zeros. Import reads
and drops them; export writes a model with no shared expert that way.

Export writes Qwen2-MoE attention biases always: a model without them (a
Llama upcycled into Qwen2-MoE) gets zero biases and ``qkv_bias: true``, which
every reader (transformers 4 and 5, vLLM) builds, and which compute the same.

Weight layouts. We write the per-expert names transformers' ``save_pretrained``
writes (and vLLM / llama.cpp read)::

    model.layers.{i}.mlp.gate.weight                         [E, D]   router.kernel.T
    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight   [F, D]   wi_0[e].T, wi_1[e].T
    model.layers.{i}.mlp.experts.{e}.down_proj.weight        [D, F]   wo[e].T
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight     shared_expert/wi_0...
    model.layers.{i}.mlp.shared_expert_gate.weight           [1, D]   shared_expert_gate.kernel.T
    model.layers.{i}.mlp.{gate,up,down}_proj.weight          (dense layers: the Llama names)

and read those or transformers 5's fused in-memory layout
(``mlp.experts.gate_up_proj [E, 2F, D]``, ``mlp.experts.down_proj [E, D, F]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import (CheckpointError, TensorGetter,
                                           moe_decoder_incompatibilities, refuse_export,
                                           require)
from moe_jax.checkpoints.hf_llama import (_FEATURES, LlamaConverter, _attn_to_hf,
                                          base_config_fields, base_config_to_hf,
                                          decoder_params_to_hf, rope_to_hf)
from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.moe_decoder import MoeDecoder, MoeDecoderConfig
from moe_jax.moe.layer import MoeConfig

ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
NAMES = {"qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE"}
# The q/k norm each family has: None, "head" ([Dh]) or "full" ([H·Dh]).
_QK_NORM = {"qwen2_moe": None, "qwen3_moe": "head", "olmoe": "full"}


def moe_incompatibilities(c: MoeDecoderConfig, model_type: str) -> list[str]:
  """Why HF ``model_type`` (``qwen2_moe``, ``qwen3_moe``, ``olmoe``) cannot express ``c``."""
  why = moe_decoder_incompatibilities(
      c, NAMES[model_type], bias="qkv" if model_type == "qwen2_moe" else "one",
      features={k: v for k, v in _FEATURES.items()
                if k not in ("parallel", "qk_norm", "qk_norm_full")})
  qk = ("full" if c.qk_norm_full_width else "head") if c.qk_norm else None
  if qk != _QK_NORM[model_type]:
    want = {None: "no q/k norms", "head": "q/k norms per head",
            "full": "q/k norms over the full projected width"}
    why.append(f"it has {want[qk]}; {model_type} has {want[_QK_NORM[model_type]]}")
  m = c.moe
  if model_type == "olmoe" and c.moe_layers != tuple(range(c.num_layers)):
    why.append(f"only layers {c.moe_layers} of {c.num_layers} are MoE; every OLMoE layer is")
  if not c.moe_layers:
    why.append("it has no MoE layer")
  if model_type == "qwen2_moe":  # no shared expert: shared_expert_intermediate_size=0
    if m.shared_hidden_dim is not None and not m.shared_expert_gate:
      why.append("its shared expert has no sigmoid gate; Qwen2-MoE's has one")
  elif m.shared_hidden_dim is not None:
    why.append(f"it has a shared expert; {model_type} has none (qwen2_moe has)")
  return why


def moe_layout_from_hf(hf: Mapping[str, Any], num_layers: int) -> str | tuple[int, ...]:
  """Our ``moe_layout`` for Qwen-MoE's ``decoder_sparse_step`` and ``mlp_only_layers``."""
  step = int(hf.get("decoder_sparse_step") or 1)
  if step < 1:
    raise CheckpointError(f"config.json: decoder_sparse_step must be >= 1, got {step}")
  dense = [int(i) for i in hf.get("mlp_only_layers") or []]
  bad = [i for i in dense if not 0 <= i < num_layers]
  if bad:
    raise CheckpointError(f"config.json: mlp_only_layers names layers {bad} outside "
                          f"[0, {num_layers})")
  layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
  experts = hf.get("num_experts", hf.get("num_local_experts"))
  if not layers or not experts:
    raise CheckpointError(f"config.json: no MoE layer (num_experts={experts}, "
                          f"decoder_sparse_step={step}, mlp_only_layers={dense}); load it "
                          "as a dense model")
  return "every" if layers == tuple(range(num_layers)) else layers


class QwenMoeConverter:
  """``qwen2_moe``, ``qwen3_moe`` and ``olmoe`` (see the module docstring)."""

  model_types = tuple(ARCHITECTURES)
  config_type = MoeDecoderConfig

  def module(self, config: MoeDecoderConfig) -> MoeDecoder:
    return MoeDecoder(config=config)

  def config_from_hf(self, hf: Mapping[str, Any]) -> MoeDecoderConfig:
    mt = hf.get("model_type")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise CheckpointError(f"config.json: hidden_act {act!r} is not supported for {mt} "
                            "(expected 'silu')")
    if hf.get("use_sliding_window"):
      raise CheckpointError(f"config.json: {mt} use_sliding_window=true is not supported")
    if hf.get("clip_qkv") is not None:
      raise CheckpointError(f"config.json: {mt} clip_qkv={hf['clip_qkv']} is not supported "
                            "(no q/k/v clipping in moe-jax); set it to null only if the "
                            "activations never reach it")
    fields = base_config_fields(hf)
    bias = bool(hf.get("attention_bias", False))
    if mt == "qwen2_moe":
      fields.update(qkv_bias=bool(hf.get("qkv_bias", True)), attn_out_bias=False)
    else:
      fields.update(qkv_bias=bias, attn_out_bias=bias, qk_norm=True,
                    qk_norm_full_width=mt == "olmoe")
    require(hf, "num_experts_per_tok")
    num_experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 Qwen3-MoE
    if num_experts is None:
      raise CheckpointError("config.json: missing required field 'num_experts'")
    expert_dim = int(hf["moe_intermediate_size"] if mt != "olmoe" else fields["d_ff"])
    shared = None
    if mt == "qwen2_moe" and int(hf.get("shared_expert_intermediate_size") or 0) > 0:
      shared = int(hf["shared_expert_intermediate_size"])
    moe = MoeConfig(num_experts=int(num_experts),
                    num_selected=int(hf["num_experts_per_tok"]),
                    renormalize=bool(hf.get("norm_topk_prob", False)), capacity_factor=None,
                    expert_dim=None if expert_dim == fields["d_ff"] else expert_dim,
                    shared_expert_dim=shared, shared_expert_gate=shared is not None,
                    load_balancing_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    layout = "every" if mt == "olmoe" else moe_layout_from_hf(hf, fields["num_layers"])
    return MoeDecoderConfig(**fields, moe=moe, moe_layout=layout)

  def config_to_hf(self, c: MoeDecoderConfig) -> dict[str, Any]:
    mt = c.hf_model_type
    if mt not in ARCHITECTURES:
      raise CheckpointError(f"{type(self).__name__} writes {sorted(ARCHITECTURES)}, not "
                            f"hf_model_type={mt!r}")
    refuse_export(c, ARCHITECTURES[mt], moe_incompatibilities(c, mt))
    dense = DecoderConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(DecoderConfig)})
    hf = base_config_to_hf(dense, "llama")
    m, expert_dim = c.moe, c.moe.expert_dim or c.d_ff
    hf.update({
        "architectures": [ARCHITECTURES[mt]], "model_type": mt, "hidden_act": c.activation,
        "rope_theta": c.rope_theta, "rope_parameters": rope_to_hf(c),
        "num_experts": m.num_experts, "num_experts_per_tok": m.num_selected,
        "norm_topk_prob": m.renormalize, "router_aux_loss_coef": m.load_balancing_loss_coef,
        "output_router_logits": False,
    })
    if c.rope_scaling is not None:
      hf["rope_scaling"] = dict(hf["rope_parameters"])
    if mt == "olmoe":
      hf.update(intermediate_size=expert_dim, attention_bias=c.qkv_bias, clip_qkv=None)
      return hf
    hf.update(moe_intermediate_size=expert_dim, use_sliding_window=False,
              decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(c.num_layers) if i not in c.moe_layers])
    if mt == "qwen2_moe":
      hf.update(qkv_bias=True, shared_expert_intermediate_size=m.shared_hidden_dim or 0)
    else:
      hf["attention_bias"] = c.qkv_bias
    return hf

  # -- tensors

  def params_from_hf(self, get: TensorGetter, c: MoeDecoderConfig) -> dict:
    d = c.d_model
    params: dict[str, Any] = {
        "embed": {"embedding": get.get("model.embed_tokens.weight", (c.vocab_size, d))},
        "final_norm": {"scale": get.get("model.norm.weight", (d,))},
    }
    llama, plain = LlamaConverter(), c.replace(qk_norm=False, qk_norm_full_width=False)
    for i in range(c.num_layers):
      p = f"model.layers.{i}."
      attn = llama.attn_from_hf(get, plain, p)
      if c.qk_norm:
        full = c.qk_norm_full_width
        for name, heads in (("q", c.num_heads), ("k", c.kv_heads)):
          width = heads * c.dh if full else c.dh
          attn[f"{name}_norm"] = {"scale": get.get(p + f"self_attn.{name}_norm.weight",
                                                    (width,))}
      mlp = (_moe_from_hf(get, c, p) if i in c.moe_layers
             else llama.mlp_from_hf(get, c, p))
      params[f"layers_{i}"] = {
          "input_norm": {"scale": get.get(p + "input_layernorm.weight", (d,))},
          "post_attn_norm": {"scale": get.get(p + "post_attention_layernorm.weight", (d,))},
          "attn": attn, "mlp": mlp}
    if not c.tie_embeddings:
      params["lm_head"] = {"kernel": get.get("lm_head.weight", (c.vocab_size, d)).T}
    return params

  def params_to_hf(self, params: Mapping, c: MoeDecoderConfig) -> dict[str, np.ndarray]:
    return decoder_params_to_hf(params, c, _ffn_to_hf, attn_to_hf=_qwen_attn_to_hf)


def _mlp_from_hf(get: TensorGetter, p: str, f: int, d: int) -> dict:
  return {"wi_0": {"kernel": get.get(p + "gate_proj.weight", (f, d)).T},
          "wi_1": {"kernel": get.get(p + "up_proj.weight", (f, d)).T},
          "wo": {"kernel": get.get(p + "down_proj.weight", (d, f)).T}}


def _moe_from_hf(get: TensorGetter, c: MoeDecoderConfig, p: str) -> dict:
  d, m = c.d_model, c.moe
  e, f, q = m.num_experts, m.expert_dim or c.d_ff, p + "mlp."
  if get.has(q + "experts.gate_up_proj"):  # transformers 5 fused layout
    gate_up = get.get(q + "experts.gate_up_proj", (e, 2 * f, d))
    experts = {"wi_0": {"kernel": gate_up[:, :f].transpose(0, 2, 1)},
               "wi_1": {"kernel": gate_up[:, f:].transpose(0, 2, 1)},
               "wo": {"kernel": get.get(q + "experts.down_proj", (e, d, f)).transpose(0, 2, 1)}}
  else:
    per = [_mlp_from_hf(get, q + f"experts.{j}.", f, d) for j in range(e)]
    experts = {name: {"kernel": np.stack([x[name]["kernel"] for x in per])}
               for name in ("wi_0", "wi_1", "wo")}
  # Routers are float32 in our model whatever the checkpoint dtype (routing.py).
  out = {"router": {"kernel": np.asarray(get.get(q + "gate.weight", (e, d)), np.float32).T},
         "experts": experts}
  if m.shared_hidden_dim is not None:
    out["shared_expert"] = _mlp_from_hf(get, q + "shared_expert.", m.shared_hidden_dim, d)
  elif get.has(q + "shared_expert.gate_proj.weight"):
    # shared_expert_intermediate_size=0: transformers still builds the shared expert, zero
    # wide (it adds zeros), and its gate; read (and check) them as the nothing they are
    _mlp_from_hf(get, q + "shared_expert.", 0, d)
    if get.has(q + "shared_expert_gate.weight"):
      get.get(q + "shared_expert_gate.weight", (1, d))
  if m.shared_expert_gate:
    out["shared_expert_gate"] = {"kernel": get.get(q + "shared_expert_gate.weight", (1, d)).T}
  return out


def _mlp_to_hf(mlp: Mapping, p: str) -> dict[str, np.ndarray]:
  return {p + "gate_proj.weight": np.asarray(mlp["wi_0"]["kernel"]).T,
          p + "up_proj.weight": np.asarray(mlp["wi_1"]["kernel"]).T,
          p + "down_proj.weight": np.asarray(mlp["wo"]["kernel"]).T}


def _ffn_to_hf(mlp: Mapping, c: MoeDecoderConfig, prefix: str) -> dict[str, np.ndarray]:
  q = prefix + "mlp."
  if "router" not in mlp:  # a dense layer (mlp_only_layers)
    return _mlp_to_hf(mlp, q)
  out = {q + "gate.weight": np.asarray(mlp["router"]["kernel"]).T}
  experts = mlp["experts"]
  for j in range(c.moe.num_experts):
    out.update(_mlp_to_hf({k: {"kernel": experts[k]["kernel"][j]} for k in experts},
                          q + f"experts.{j}."))
  if "shared_expert" in mlp:
    out.update(_mlp_to_hf(mlp["shared_expert"], q + "shared_expert."))
  if "shared_expert_gate" in mlp:
    out[q + "shared_expert_gate.weight"] = np.asarray(mlp["shared_expert_gate"]["kernel"]).T
  elif c.hf_model_type == "qwen2_moe":  # shared_expert_intermediate_size=0: what HF builds
    dtype, d = np.asarray(experts["wo"]["kernel"]).dtype, c.d_model
    out.update({q + "shared_expert.gate_proj.weight": np.zeros((0, d), dtype),
                q + "shared_expert.up_proj.weight": np.zeros((0, d), dtype),
                q + "shared_expert.down_proj.weight": np.zeros((d, 0), dtype),
                q + "shared_expert_gate.weight": np.zeros((1, d), dtype)})
  return out


def _qwen_attn_to_hf(attn: Mapping, c: MoeDecoderConfig, p: str) -> dict[str, np.ndarray]:
  out = _attn_to_hf(attn, c.replace(qk_norm=False, qk_norm_full_width=False), p)
  if c.qk_norm:
    for name in ("q", "k"):
      out[p + f"self_attn.{name}_norm.weight"] = np.asarray(attn[f"{name}_norm"]["scale"])
  if c.hf_model_type == "qwen2_moe" and not c.qkv_bias:  # see the module docstring
    dtype = np.asarray(attn["q"]["kernel"]).dtype
    for name, heads in (("q", c.num_heads), ("k", c.kv_heads), ("v", c.kv_heads)):
      out[p + f"self_attn.{name}_proj.bias"] = np.zeros((heads * c.dh,), dtype)
  return out
