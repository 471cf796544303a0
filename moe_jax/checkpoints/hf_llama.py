"""Converter for Llama-family causal LMs: ``llama``, ``mistral``, ``qwen2``.

HF stores projections as ``[out, in]`` matrices; we store input-first kernels
with explicit heads: ``q_proj.weight [H*Dh, D] -> q.kernel [D, H, Dh]``,
``o_proj.weight [D, H*Dh] -> o.kernel [H, Dh, D]``, ``gate/up/down ->
wi_0/wi_1/wo``. HF's rotate-half RoPE layout is the one we use, so q/k need no
permutation (unlike Meta's original checkpoints).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError, TensorGetter, require
from moe_jax.models.decoder import Decoder, DecoderConfig
from moe_jax.nn.embeddings import RopeScaling

_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM"}


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads RoPE settings from either ``rope_parameters`` (transformers>=5) or the
  older ``rope_theta`` + ``rope_scaling`` fields."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling") or {}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in (None, "default"):
    return theta, None
  if kind == "linear":
    return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
        kind="llama3", factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  raise CheckpointError(f"config.json: unsupported rope scaling type {kind!r} "
                        "(supported: default, linear, llama3)")


def _export_model_type(c: DecoderConfig) -> str:
  """The HF family that expresses ``c``: its origin when possible, else the simplest."""
  biases = (c.qkv_bias, c.attn_out_bias)
  if c.hf_model_type == "qwen2" and biases == (True, False) and c.sliding_window is None:
    return "qwen2"
  if c.hf_model_type == "mistral" and biases == (False, False):
    return "mistral"
  if c.sliding_window is not None:
    if any(biases):
      raise CheckpointError("a sliding-window decoder with attention biases has no HF equivalent")
    return "mistral"
  if biases == (True, False):
    return "qwen2"
  if biases == (False, True):
    raise CheckpointError("an output-projection bias without q/k/v biases has no HF equivalent")
  return "llama"


class LlamaConverter:
  model_types = ("llama", "mistral", "qwen2")
  config_type = DecoderConfig

  def module(self, config: DecoderConfig) -> Decoder:
    return Decoder(config=config)

  def config_from_hf(self, hf: Mapping[str, Any]) -> DecoderConfig:
    model_type = hf.get("model_type")
    if hf.get("mlp_bias"):
      raise CheckpointError("config.json: mlp_bias=true is not supported")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise CheckpointError(f"config.json: hidden_act {act!r} is not supported for "
                            f"{model_type} (expected 'silu')")
    theta, scaling = _rope_from_hf(hf)
    sliding = None
    if model_type == "mistral":
      sliding = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
      raise CheckpointError("config.json: qwen2 use_sliding_window=true is not supported")
    heads = int(require(hf, "num_attention_heads"))
    d_model = int(require(hf, "hidden_size"))
    head_dim = hf.get("head_dim")
    if head_dim is not None and d_model % heads == 0 and int(head_dim) == d_model // heads:
      head_dim = None  # the default: keep configs canonical so round trips compare equal
    return DecoderConfig(
        vocab_size=int(require(hf, "vocab_size")),
        d_model=d_model,
        num_layers=int(require(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        d_ff=int(require(hf, "intermediate_size")),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        attn_out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
        else hf.get("eos_token_id"),
        hf_model_type=model_type,
    )

  def config_to_hf(self, c: DecoderConfig) -> dict[str, Any]:
    if c.parallel_block:
      raise CheckpointError("a parallel-block decoder has no Llama/Mistral/Qwen2 "
                            "equivalent in transformers; export it as our own checkpoint")
    model_type = _export_model_type(c)
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling is not None:
      rope.update(rope_type=c.rope_scaling.kind, factor=c.rope_scaling.factor)
      if c.rope_scaling.kind == "llama3":
        rope.update(low_freq_factor=c.rope_scaling.low_freq_factor,
                    high_freq_factor=c.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=
                    c.rope_scaling.original_max_position_embeddings)
    hf = {
        "architectures": [_ARCH[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.dh,
        "hidden_act": c.activation,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope_theta,
        "rope_parameters": rope,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple)
        else c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": c.param_dtype,
    }
    if c.rope_scaling is not None:
      hf["rope_scaling"] = dict(rope)
    if model_type == "llama":
      hf["attention_bias"] = c.qkv_bias
      hf["mlp_bias"] = False
    if model_type == "mistral":
      hf["sliding_window"] = c.sliding_window
    if model_type == "qwen2":
      hf["use_sliding_window"] = False
    return hf

  def params_from_hf(self, get: TensorGetter, c: DecoderConfig) -> dict:
    d, h, k, dh, f = c.d_model, c.num_heads, c.kv_heads, c.dh, c.d_ff
    params: dict[str, Any] = {
        "embed": {"embedding": get.get("model.embed_tokens.weight", (c.vocab_size, d))},
        "final_norm": {"scale": get.get("model.norm.weight", (d,))},
    }
    for i in range(c.num_layers):
      p = f"model.layers.{i}."

      def proj(name, heads, bias):
        w = get.get(p + f"self_attn.{name}_proj.weight", (heads * dh, d))
        out = {"kernel": w.T.reshape(d, heads, dh)}
        if bias:
          out["bias"] = get.get(p + f"self_attn.{name}_proj.bias", (heads * dh,)).reshape(heads, dh)
        return out

      o = {"kernel": get.get(p + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(h, dh, d)}
      if c.attn_out_bias:
        o["bias"] = get.get(p + "self_attn.o_proj.bias", (d,))
      layer = {
          "input_norm": {"scale": get.get(p + "input_layernorm.weight", (d,))},
          "attn": {"q": proj("q", h, c.qkv_bias), "k": proj("k", k, c.qkv_bias),
                   "v": proj("v", k, c.qkv_bias), "o": o},
          "mlp": {"wi_0": {"kernel": get.get(p + "mlp.gate_proj.weight", (f, d)).T},
                  "wi_1": {"kernel": get.get(p + "mlp.up_proj.weight", (f, d)).T},
                  "wo": {"kernel": get.get(p + "mlp.down_proj.weight", (d, f)).T}},
      }
      if not c.parallel_block:
        layer["post_attn_norm"] = {"scale": get.get(p + "post_attention_layernorm.weight", (d,))}
      params[f"layers_{i}"] = layer
    if not c.tie_embeddings:
      params["lm_head"] = {"kernel": get.get("lm_head.weight", (c.vocab_size, d)).T}
    return params

  def params_to_hf(self, params: Mapping, c: DecoderConfig) -> dict[str, np.ndarray]:
    return decoder_params_to_hf(params, c, _mlp_to_hf)


def _mlp_to_hf(mlp: Mapping, c: DecoderConfig, prefix: str) -> dict[str, np.ndarray]:
  return {prefix + "mlp.gate_proj.weight": np.asarray(mlp["wi_0"]["kernel"]).T,
          prefix + "mlp.up_proj.weight": np.asarray(mlp["wi_1"]["kernel"]).T,
          prefix + "mlp.down_proj.weight": np.asarray(mlp["wo"]["kernel"]).T}


def decoder_params_to_hf(params: Mapping, c: DecoderConfig,
                         ffn_to_hf: Callable[[Mapping, Any, str], dict[str, np.ndarray]]
                         ) -> dict[str, np.ndarray]:
  """HF tensors of a Llama-layout decoder; ``ffn_to_hf(layer["mlp"], c, prefix)`` maps the FFN.

  Shared by the dense (Llama / Mistral / Qwen2) and the Mixtral exporters,
  which differ only in their FFN.
  """
  d, h, k, dh = c.d_model, c.num_heads, c.kv_heads, c.dh
  a = np.asarray
  out = {"model.embed_tokens.weight": a(params["embed"]["embedding"]),
         "model.norm.weight": a(params["final_norm"]["scale"])}
  for i in range(c.num_layers):
    lp, p = params[f"layers_{i}"], f"model.layers.{i}."
    attn = lp["attn"]
    for name, heads in (("q", h), ("k", k), ("v", k)):
      out[p + f"self_attn.{name}_proj.weight"] = a(attn[name]["kernel"]).reshape(
          d, heads * dh).T
      if c.qkv_bias:
        out[p + f"self_attn.{name}_proj.bias"] = a(attn[name]["bias"]).reshape(heads * dh)
    out[p + "self_attn.o_proj.weight"] = a(attn["o"]["kernel"]).reshape(h * dh, d).T
    if c.attn_out_bias:
      out[p + "self_attn.o_proj.bias"] = a(attn["o"]["bias"])
    out[p + "input_layernorm.weight"] = a(lp["input_norm"]["scale"])
    out[p + "post_attention_layernorm.weight"] = a(lp["post_attn_norm"]["scale"])
    out.update(ffn_to_hf(lp["mlp"], c, p))
  if not c.tie_embeddings:
    out["lm_head.weight"] = a(params["lm_head"]["kernel"]).T
  return {name: np.ascontiguousarray(x) for name, x in out.items()}
