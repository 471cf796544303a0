"""Converter for DeepSeek-V3 (``DeepseekV3ForCausalLM``) <-> :class:`DeepseekConfig` models.

What maps to what (see :mod:`moe_jax.models.deepseek`):

=============================  ==============================================
HF config                      ours
=============================  ==============================================
``q_lora_rank`` (or null)      ``DeepseekConfig.q_lora_rank``
``kv_lora_rank``,              ``kv_lora_rank``, ``qk_nope_head_dim``,
``qk_{nope,rope}_head_dim``,   ``qk_rope_head_dim``, ``v_head_dim``,
``v_head_dim``,                ``rope_interleave``, ``attention_bias``
``rope_interleave``,
``attention_bias``
``first_k_dense_replace``      ``moe_layout = (k, ..., num_layers - 1)``
``intermediate_size``          ``d_ff`` (the dense layers)
``moe_intermediate_size``      ``MoeConfig.expert_dim`` = ``shared_expert_dim``
``n_shared_experts``           ``MoeConfig.num_shared_experts``
``n_routed_experts``,          ``num_experts``, ``num_selected``
``num_experts_per_tok``
``n_group``, ``topk_group``    ``num_expert_groups``, ``topk_groups``
``norm_topk_prob``             ``renormalize``
``routed_scaling_factor``      ``routed_scaling_factor`` (``scoring="sigmoid"``,
                               ``score_bias=True``)
=============================  ==============================================

Routing is dropless (``capacity_factor=None``), as transformers and the
serving stacks run it. RoPE is the default or YaRN (the released V3's
``rope_type: "yarn"``: :class:`~moe_jax.nn.latent_attention.YarnRope`,
``DeepseekConfig.rope_yarn``, whose ``mscale_all_dim`` also rescales the
softmax); another ``rope_parameters.rope_type`` is refused by name, as are
FP8 checkpoints (``quantization_config``: dequantize first).
The multi-token-prediction layers of released checkpoints
(``model.layers.{num_hidden_layers + j}.*``, ``num_nextn_predict_layers``)
are not part of the causal LM and are skipped on load; export writes none.

Weight layouts (HF ``[out, in]`` -> ours, input dims first)::

    self_attn.q_proj.weight             [H·Q, D]    q/kernel [D, H, Q]     (no q latent)
    self_attn.q_a_proj.weight           [Rq, D]     q_a/kernel [D, Rq]
    self_attn.q_a_layernorm.weight      [Rq]        q_a_norm/scale
    self_attn.q_b_proj.weight           [H·Q, Rq]   q/kernel [Rq, H, Q]
    self_attn.kv_a_proj_with_mqa.weight [R+P, D]    kv_a/kernel [D, R+P]
    self_attn.kv_a_layernorm.weight     [R]         kv_a_norm/scale
    self_attn.kv_b_proj.weight          [H·(N+V), R] kv_b/kernel [R, H, N+V]
    self_attn.o_proj.weight             [D, H·V]    o/kernel [H, V, D]
    mlp.gate.weight                     [E, D]      router/kernel [D, E]   (float32)
    mlp.gate.e_score_correction_bias    [E]         score_bias             (float32)
    mlp.experts.{e}.{gate,up,down}_proj.weight      experts/{wi_0,wi_1,wo}/kernel[e]
    mlp.shared_experts.{gate,up,down}_proj.weight   shared_expert/{wi_0,wi_1,wo}
    mlp.{gate,up,down}_proj.weight                  mlp/{wi_0,wi_1,wo} (dense layers)

Export writes the per-expert names ``save_pretrained`` writes; import also
reads transformers 5's fused ``mlp.experts.gate_up_proj [E, 2F, D]`` (gate
then up) and ``mlp.experts.down_proj [E, D, F]``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import (CheckpointError, TensorGetter,
                                           moe_decoder_incompatibilities, refuse_export,
                                           require)
from moe_jax.checkpoints.hf_llama import (_FEATURES, _mlp_to_hf, base_config_fields,
                                          decoder_params_to_hf)
from moe_jax.models.deepseek import DeepseekConfig, DeepseekDecoder
from moe_jax.moe.layer import MoeConfig
from moe_jax.nn.latent_attention import YarnRope

_GLU = (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj"))


_YARN_KEYS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")


def _yarn_from_hf(hf: Mapping[str, Any]) -> YarnRope | None:
  """The YaRN settings of ``rope_parameters`` (or legacy ``rope_scaling``); ``None``: default."""
  rope = {**dict(hf.get("rope_scaling") or {}), **dict(hf.get("rope_parameters") or {})}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind in (None, "default"):
    return None
  if kind != "yarn":
    raise CheckpointError(
        f"config.json: rope_parameters.rope_type={kind!r} is not supported for deepseek_v3 "
        "(implemented: 'default', 'yarn')")
  factor = rope.get("factor")
  if factor is None or "original_max_position_embeddings" not in rope:
    raise CheckpointError("config.json: rope_parameters of rope_type 'yarn' need 'factor' and "
                          "'original_max_position_embeddings'")
  return YarnRope(factor=float(factor),
                  original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                  truncate=bool(rope.get("truncate", True)),
                  **{k: float(rope[k]) for k in _YARN_KEYS if rope.get(k) is not None})


def _rope_to_hf(c: DeepseekConfig) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
  y = c.rope_yarn
  if y is not None:
    rope.update(rope_type="yarn", factor=y.factor, truncate=y.truncate,
                original_max_position_embeddings=y.original_max_position_embeddings,
                **{k: getattr(y, k) for k in _YARN_KEYS if getattr(y, k) is not None})
  return rope


def deepseek_incompatibilities(c: DeepseekConfig) -> list[str]:
  """Why ``c`` is not a DeepSeek-V3 transformers can build (empty when it is)."""
  why = moe_decoder_incompatibilities(
      c, "DeepSeek-V3", bias=None,  # its biases: DeepseekConfig.attention_bias
      features={k: v for k, v in _FEATURES.items() if k != "parallel"})
  m = c.moe
  if c.rope_scaling is not None:
    why.append(f"it scales RoPE ({c.rope_scaling.kind}); DeepSeek-V3 has default or YaRN RoPE "
               "(DeepseekConfig.rope_yarn)")
  if c.attn_scale is not None:
    why.append(f"its softmax scale is set ({c.attn_scale}); DeepSeek-V3's follows from its head "
               "dims and YaRN")
  k = c.moe_layers[0] if c.moe_layers else c.num_layers
  if c.moe_layers != tuple(range(k, c.num_layers)):
    why.append(f"its MoE layers {c.moe_layers} are not all the layers after the first "
               "dense ones (first_k_dense_replace)")
  if m.scoring != "sigmoid":
    why.append(f"its router has {m.scoring!r} scores; DeepSeek-V3's tokens choose by sigmoid "
               "scores (MoeConfig.scoring='sigmoid')")
  f = m.expert_dim or c.d_ff
  if m.shared_hidden_dim is not None and m.shared_hidden_dim % f:
    why.append(f"its shared experts ({m.shared_hidden_dim} wide) are not a multiple of the "
               f"routed experts' width {f} (n_shared_experts x moe_intermediate_size)")
  if m.shared_expert_gate:
    why.append("its shared experts have a sigmoid gate; DeepSeek-V3's have none")
  return why


class DeepseekConverter:
  model_types = ("deepseek_v3",)
  config_type = DeepseekConfig

  def module(self, config: DeepseekConfig) -> DeepseekDecoder:
    return DeepseekDecoder(config=config)

  def config_from_hf(self, hf: Mapping[str, Any]) -> DeepseekConfig:
    if hf.get("quantization_config"):
      raise CheckpointError("config.json: quantization_config is set (an FP8 checkpoint); "
                            "dequantize it to bfloat16 / float32 first")
    yarn = _yarn_from_hf(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (expected 'silu')")
    base = base_config_fields({**hf, "rope_parameters": {"rope_theta": _theta(hf)},
                               "rope_scaling": None, "head_dim": None})
    heads = base["num_heads"]
    if base.pop("num_kv_heads") != heads:
      raise CheckpointError(f"config.json: num_key_value_heads={hf.get('num_key_value_heads')} "
                            f"!= num_attention_heads={heads}; MLA expands every head")
    n = base["num_layers"]
    k = min(int(hf.get("first_k_dense_replace") or 0), n)
    f = int(require(hf, "moe_intermediate_size"))
    shared = int(hf.get("n_shared_experts") or 0)
    moe = MoeConfig(
        num_experts=int(require(hf, "n_routed_experts")),
        num_selected=int(require(hf, "num_experts_per_tok")),
        renormalize=bool(hf.get("norm_topk_prob", True)), scoring="sigmoid", score_bias=True,
        num_expert_groups=int(hf.get("n_group") or 1), topk_groups=int(hf.get("topk_group") or 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        capacity_factor=None, expert_dim=f, shared_expert_dim=f if shared else None,
        num_shared_experts=shared, load_balancing_loss_coef=float(hf.get("aux_loss_alpha", 1e-4)),
        z_loss_coef=0.0)
    q_lora = hf.get("q_lora_rank")
    return DeepseekConfig(
        **base, moe=moe, moe_layout=tuple(range(k, n)),
        kv_lora_rank=int(require(hf, "kv_lora_rank")),
        qk_nope_head_dim=int(require(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(require(hf, "qk_rope_head_dim")),
        v_head_dim=int(require(hf, "v_head_dim")),
        q_lora_rank=None if q_lora is None else int(q_lora),
        rope_interleave=bool(hf.get("rope_interleave", True)),
        attention_bias=bool(hf.get("attention_bias", False)), rope_yarn=yarn)

  def config_to_hf(self, c: DeepseekConfig) -> dict[str, Any]:
    refuse_export(c, "DeepseekV3ForCausalLM", deepseek_incompatibilities(c))
    m = c.moe
    f = m.expert_dim or c.d_ff
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "moe_intermediate_size": f, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_heads,
        "n_shared_experts": (m.shared_hidden_dim or 0) // f, "n_routed_experts": m.num_experts,
        "routed_scaling_factor": m.routed_scaling_factor, "kv_lora_rank": c.kv_lora_rank,
        "q_lora_rank": c.q_lora_rank, "qk_rope_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim, "qk_nope_head_dim": c.qk_nope_head_dim,
        "n_group": m.num_expert_groups, "topk_group": m.topk_groups,
        "num_experts_per_tok": m.num_selected,
        "first_k_dense_replace": c.moe_layers[0] if c.moe_layers else c.num_layers,
        "norm_topk_prob": m.renormalize, "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple)
        else c.eos_token_id,
        "pad_token_id": c.pad_token_id, "rope_interleave": c.rope_interleave,
        "rope_parameters": _rope_to_hf(c),
        "rope_theta": c.rope_theta, "attention_bias": c.attention_bias,
        "num_nextn_predict_layers": 0, "torch_dtype": c.param_dtype,
    }

  # -- tensors

  def params_from_hf(self, get: TensorGetter, c: DeepseekConfig) -> dict:
    d = c.d_model
    _skip_mtp_layers(get, c.num_layers)
    params: dict[str, Any] = {
        "embed": {"embedding": get.get("model.embed_tokens.weight", (c.vocab_size, d))},
        "final_norm": {"scale": get.get("model.norm.weight", (d,))},
    }
    for i in range(c.num_layers):
      p = f"model.layers.{i}."
      mlp = (_moe_from_hf(get, c, p) if i in c.moe_layers else
             {ours: {"kernel": get.get(p + f"mlp.{theirs}.weight",
                                       (d, c.d_ff) if ours == "wo" else (c.d_ff, d)).T}
              for ours, theirs in _GLU})
      params[f"layers_{i}"] = {
          "input_norm": {"scale": get.get(p + "input_layernorm.weight", (d,))},
          "post_attn_norm": {"scale": get.get(p + "post_attention_layernorm.weight", (d,))},
          "attn": _attn_from_hf(get, c, p), "mlp": mlp}
    if not c.tie_embeddings:
      params["lm_head"] = {"kernel": get.get("lm_head.weight", (c.vocab_size, d)).T}
    return params

  def params_to_hf(self, params: Mapping, c: DeepseekConfig) -> dict[str, np.ndarray]:
    return decoder_params_to_hf(params, c, _ffn_to_hf, attn_to_hf=_attn_to_hf)


def _theta(hf: Mapping[str, Any]) -> float:
  params = dict(hf.get("rope_parameters") or {})
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _skip_mtp_layers(get: TensorGetter, num_layers: int) -> None:
  """Marks the multi-token-prediction layers (indices >= ``num_layers``) as read: not ours."""
  layer = re.compile(r"^model\.layers\.(\d+)\.")
  for name in get.names:
    m = layer.match(name)
    if m and int(m.group(1)) >= num_layers:
      get.used.add(name)


def _attn_from_hf(get: TensorGetter, c: DeepseekConfig, p: str) -> dict:
  d, h, q, r = c.d_model, c.num_heads, c.qk_head_dim, c.kv_lora_rank
  a = p + "self_attn."

  def linear(name: str, out: int, inp: int, bias: bool) -> dict:
    w = {"kernel": get.get(a + name + ".weight", (out, inp)).T}
    if bias:
      w["bias"] = get.get(a + name + ".bias", (out,))
    return w

  attn: dict[str, Any] = {}
  if c.q_lora_rank is None:
    attn["q"] = {"kernel": linear("q_proj", h * q, d, False)["kernel"].reshape(d, h, q)}
  else:
    rq = c.q_lora_rank
    attn["q_a"] = linear("q_a_proj", rq, d, c.attention_bias)
    attn["q_a_norm"] = {"scale": get.get(a + "q_a_layernorm.weight", (rq,))}
    attn["q"] = {"kernel": linear("q_b_proj", h * q, rq, False)["kernel"].reshape(rq, h, q)}
  attn["kv_a"] = linear("kv_a_proj_with_mqa", r + c.qk_rope_head_dim, d, c.attention_bias)
  attn["kv_a_norm"] = {"scale": get.get(a + "kv_a_layernorm.weight", (r,))}
  x = c.qk_nope_head_dim + c.v_head_dim
  attn["kv_b"] = {"kernel": linear("kv_b_proj", h * x, r, False)["kernel"].reshape(r, h, x)}
  o = linear("o_proj", d, h * c.v_head_dim, c.attention_bias)
  o["kernel"] = o["kernel"].reshape(h, c.v_head_dim, d)
  attn["o"] = o
  return attn


def _attn_to_hf(attn: Mapping, c: DeepseekConfig, p: str) -> dict[str, np.ndarray]:
  a = p + "self_attn."
  t = np.asarray
  out = {}

  def put(name: str, w: Mapping, in_dims: int = 1) -> None:
    k = t(w["kernel"])
    k = k.reshape(int(np.prod(k.shape[:in_dims])), -1)
    out[a + name + ".weight"] = k.T
    if "bias" in w:
      out[a + name + ".bias"] = t(w["bias"]).reshape(-1)

  if c.q_lora_rank is None:
    put("q_proj", attn["q"])
  else:
    put("q_a_proj", attn["q_a"])
    out[a + "q_a_layernorm.weight"] = t(attn["q_a_norm"]["scale"])
    put("q_b_proj", attn["q"])
  put("kv_a_proj_with_mqa", attn["kv_a"])
  out[a + "kv_a_layernorm.weight"] = t(attn["kv_a_norm"]["scale"])
  put("kv_b_proj", attn["kv_b"])
  put("o_proj", attn["o"], in_dims=2)
  return out


def _moe_from_hf(get: TensorGetter, c: DeepseekConfig, p: str) -> dict:
  m, d = c.moe, c.d_model
  e, f = m.num_experts, m.expert_dim or c.d_ff
  q = p + "mlp."
  if get.has(q + "experts.gate_up_proj"):  # transformers 5 fused layout
    gate_up = get.get(q + "experts.gate_up_proj", (e, 2 * f, d))
    down = get.get(q + "experts.down_proj", (e, d, f))
    experts = {"wi_0": gate_up[:, :f].transpose(0, 2, 1),
               "wi_1": gate_up[:, f:].transpose(0, 2, 1), "wo": down.transpose(0, 2, 1)}
  else:
    experts = {ours: np.stack([
        get.get(q + f"experts.{j}.{theirs}.weight", (d, f) if ours == "wo" else (f, d)).T
        for j in range(e)]) for ours, theirs in _GLU}
  out = {"router": {"kernel": np.asarray(get.get(q + "gate.weight", (e, d)), np.float32).T},
         "score_bias": np.asarray(get.get(q + "gate.e_score_correction_bias", (e,)), np.float32),
         "experts": {name: {"kernel": k} for name, k in experts.items()}}
  s = m.shared_hidden_dim
  if s is not None:
    out["shared_expert"] = {
        ours: {"kernel": get.get(q + f"shared_experts.{theirs}.weight",
                                 (d, s) if ours == "wo" else (s, d)).T} for ours, theirs in _GLU}
  return out


def _ffn_to_hf(mlp: Mapping, c: DeepseekConfig, p: str) -> dict[str, np.ndarray]:
  if "router" not in mlp:  # a dense layer
    return _mlp_to_hf(mlp, c, p)
  q, a = p + "mlp.", np.asarray
  out = {q + "gate.weight": a(mlp["router"]["kernel"]).T,
         q + "gate.e_score_correction_bias": a(mlp.get("score_bias",
                                                       np.zeros(c.moe.num_experts, np.float32)))}
  for ours, theirs in _GLU:
    kernel = a(mlp["experts"][ours]["kernel"])
    for j in range(c.moe.num_experts):
      out[q + f"experts.{j}.{theirs}.weight"] = kernel[j].T
    if "shared_expert" in mlp:
      out[q + f"shared_experts.{theirs}.weight"] = a(mlp["shared_expert"][ours]["kernel"]).T
  return out
