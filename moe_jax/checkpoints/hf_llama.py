"""Converter for Llama-family causal LMs: ``llama``, ``mistral``, ``qwen2``, ``qwen3``.

Also the shared machinery of every Llama-layout family (:mod:`hf_gemma`,
:mod:`hf_phi3`, :mod:`hf_mixtral`): the :data:`FAMILIES` table says which
architecture features (``_FEATURES``: Gemma's norms, soft-capping, q/k norms,
sliding windows...) each HF ``model_type`` can express, and
:func:`export_model_type` picks the family an exported
:class:`~moe_jax.models.decoder.DecoderConfig` becomes: its origin when that
can express it, else the first that can, else a :class:`CheckpointError`
saying what is missing (never a checkpoint that computes something else).

HF stores projections as ``[out, in]`` matrices; we store input-first kernels
with explicit heads: ``q_proj.weight [H*Dh, D] -> q.kernel [D, H, Dh]``,
``o_proj.weight [D, H*Dh] -> o.kernel [H, Dh, D]``, ``gate/up/down ->
wi_0/wi_1/wo``. HF's rotate-half RoPE layout is the one we use, so q/k need no
permutation (unlike Meta's original checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError, TensorGetter, require
from moe_jax.models.decoder import Decoder, DecoderConfig
from moe_jax.nn.embeddings import RopeScaling

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


GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu")

# Architecture features beyond the plain Llama layer, by the name the families use.
_FEATURES: dict[str, tuple[str, Callable[[DecoderConfig], bool]]] = {
    "parallel": ("parallel attention/FFN blocks", lambda c: c.parallel_block),
    "norm_offset": ("(1 + w) RMSNorm scales", lambda c: c.norm_scale_offset != 0.0),
    "embed_scale": ("sqrt(d_model)-scaled embeddings", lambda c: c.scale_embeddings),
    "sandwich": ("post-sublayer (sandwich) norms", lambda c: c.post_sublayer_norms),
    "attn_softcap": ("attention logit soft-capping", lambda c: c.attn_logit_softcap is not None),
    "final_softcap": ("final logit soft-capping", lambda c: c.final_logit_softcap is not None),
    "qpas": ("a query_pre_attn_scalar other than head_dim",
             lambda c: c.query_pre_attn_scalar not in (None, c.dh)),
    "qk_norm": ("q/k norms", lambda c: c.qk_norm),
    "qk_norm_full": ("q/k norms over the full projected width (OLMoE)",
                     lambda c: getattr(c, "qk_norm_full_width", False)),
    "sliding": ("a sliding attention window", lambda c: c.sliding_window is not None),
    "mixed_sliding": ("sliding-window layers mixed with global ones",
                      lambda c: c.sliding_window is not None and c.has_global_layers),
    "local_rope": ("a separate RoPE base for the sliding-window layers",
                   lambda c: c.local_rope_theta is not None and any(
                       c.is_sliding_layer(i) for i in range(c.num_layers))
                   and (c.local_rope_theta != c.rope_theta or c.rope_scaling is not None)),
}


@dataclasses.dataclass(frozen=True)
class Family:
  """What one HF ``model_type`` can express.

  Attributes:
    arch: its ``architectures`` entry.
    required: features (keys of ``_FEATURES``) every model of the family has.
    allowed: features it may have.
    biases: ``"equal"`` (one ``attention_bias`` for q/k/v/o), ``"none"`` or
      ``"qkv"`` (q/k/v biased, o not: Qwen2).
    activations: FFN activations its config can name.
  """

  arch: str
  required: frozenset[str] = frozenset()
  allowed: frozenset[str] = frozenset()
  biases: str = "equal"
  activations: tuple[str, ...] = ("silu",)


_GEMMA = frozenset({"norm_offset", "embed_scale"})
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM", allowed=frozenset({"sliding"}), biases="none"),
    "qwen2": Family("Qwen2ForCausalLM", biases="qkv"),
    "qwen3": Family("Qwen3ForCausalLM", required=frozenset({"qk_norm"})),
    "phi3": Family("Phi3ForCausalLM", allowed=frozenset({"sliding"}), biases="none"),
    "gemma": Family("GemmaForCausalLM", required=_GEMMA, activations=GELUS),
    "gemma2": Family("Gemma2ForCausalLM", required=_GEMMA | {"sandwich"}, activations=GELUS,
                     allowed=frozenset({"attn_softcap", "final_softcap", "qpas", "sliding",
                                        "mixed_sliding"})),
    "gemma3_text": Family("Gemma3ForCausalLM", required=_GEMMA | {"sandwich", "qk_norm"},
                          activations=GELUS,
                          allowed=frozenset({"final_softcap", "qpas", "sliding", "mixed_sliding",
                                             "local_rope"})),
}
_EXPORT_ORDER = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def family_incompatibilities(c: DecoderConfig, model_type: str) -> list[str]:
  """Why HF ``model_type`` cannot express ``c`` (empty when it can)."""
  fam = FAMILIES[model_type]
  has = {name for name, (_, test) in _FEATURES.items() if test(c)}
  why = [f"it has {_FEATURES[n][0]}" for n in sorted(has - fam.required - fam.allowed)]
  why += [f"it lacks {_FEATURES[n][0]}" for n in sorted(fam.required - has)]
  biases = (c.qkv_bias, c.attn_out_bias)
  ok = {"equal": biases[0] == biases[1], "none": biases == (False, False),
        "qkv": biases == (True, False)}[fam.biases]
  if not ok:
    why.append(f"its attention biases (q/k/v {biases[0]}, output {biases[1]}) do not fit")
  if c.activation not in fam.activations:
    why.append(f"its FFN activation is {c.activation!r} (expected one of {fam.activations})")
  if (model_type == "gemma3_text" and c.rope_scaling is not None and c.local_rope_theta is None
      and any(c.is_sliding_layer(i) for i in range(c.num_layers))):
    why.append("its sliding-window layers use rope_scaling (Gemma 3 scales global layers only)")
  return why


def export_model_type(c: DecoderConfig) -> str:
  """The HF family that expresses ``c``: its origin when possible, else the first that can."""
  order = ((c.hf_model_type,) if c.hf_model_type in FAMILIES else ()) + _EXPORT_ORDER
  for model_type in order:
    if not family_incompatibilities(c, model_type):
      return model_type
  origin = c.hf_model_type if c.hf_model_type in FAMILIES else "llama"
  raise CheckpointError(
      f"no transformers architecture expresses this decoder ({FAMILIES[origin].arch}: "
      + "; ".join(family_incompatibilities(c, origin))
      + "); export it as our own checkpoint (moe_jax.checkpoints.save_model)")


def rope_to_hf(c: DecoderConfig, theta: float | None = None, scaled: bool = True
               ) -> dict[str, Any]:
  """transformers 5 ``rope_parameters`` of base ``theta`` (default the config's)."""
  rope: dict[str, Any] = {"rope_theta": c.rope_theta if theta is None else theta,
                          "rope_type": "default"}
  if scaled and c.rope_scaling is not None:
    rope.update(rope_type=c.rope_scaling.kind, factor=c.rope_scaling.factor)
    if c.rope_scaling.kind == "llama3":
      rope.update(low_freq_factor=c.rope_scaling.low_freq_factor,
                  high_freq_factor=c.rope_scaling.high_freq_factor,
                  original_max_position_embeddings=
                  c.rope_scaling.original_max_position_embeddings)
  return rope


def base_config_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The DecoderConfig fields every Llama-layout family reads the same way."""
  theta, scaling = _rope_from_hf(hf)
  heads = int(require(hf, "num_attention_heads"))
  d_model = int(require(hf, "hidden_size"))
  head_dim = hf.get("head_dim")
  if head_dim is not None and d_model % heads == 0 and int(head_dim) == d_model // heads:
    head_dim = None  # the default: keep configs canonical so round trips compare equal
  return dict(
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
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      pad_token_id=hf.get("pad_token_id"),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
      else hf.get("eos_token_id"),
      hf_model_type=hf.get("model_type"),
  )


def base_config_to_hf(c: DecoderConfig, model_type: str) -> dict[str, Any]:
  """The HF config keys every Llama-layout family writes the same way."""
  return {
      "architectures": [FAMILIES[model_type].arch],
      "model_type": model_type,
      "vocab_size": c.vocab_size,
      "hidden_size": c.d_model,
      "intermediate_size": c.d_ff,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.kv_heads,
      "head_dim": c.dh,
      "max_position_embeddings": c.max_seq_len,
      "rms_norm_eps": c.norm_eps,
      "tie_word_embeddings": c.tie_embeddings,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple)
      else c.eos_token_id,
      "pad_token_id": c.pad_token_id,
      "torch_dtype": c.param_dtype,
  }


class LlamaConverter:
  """Llama, Mistral, Qwen2 and Qwen3; the base of the other Llama-layout converters.

  Tensor names the dense families share are mapped here, driven by the
  config: q/k norms (``self_attn.{q,k}_norm.weight``) and Gemma 2/3's four
  layer norms. Subclasses change the config translation and, for fused
  layouts (Phi-3), :meth:`attn_from_hf` / :meth:`mlp_from_hf` and their inverses.
  """

  model_types = ("llama", "mistral", "qwen2", "qwen3")
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
    sliding = None
    if model_type == "mistral":
      sliding = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      raise CheckpointError(f"config.json: {model_type} use_sliding_window=true is not supported")
    bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        **base_config_fields(hf),
        qkv_bias=model_type == "qwen2" or bias,
        attn_out_bias=model_type != "qwen2" and bias,
        sliding_window=sliding,
        qk_norm=model_type == "qwen3",
    )

  def export_model_type(self, c: DecoderConfig) -> str:
    """The HF ``model_type`` ``c`` exports as; an error when this converter cannot write it."""
    model_type = export_model_type(c)
    if model_type not in self.model_types:
      raise CheckpointError(f"{type(self).__name__} cannot write {model_type!r}; use "
                            "moe_jax.checkpoints.export_hf")
    return model_type

  def config_to_hf(self, c: DecoderConfig) -> dict[str, Any]:
    model_type = self.export_model_type(c)
    hf = base_config_to_hf(c, model_type)
    rope = rope_to_hf(c)
    hf.update(hidden_act=c.activation, rope_theta=c.rope_theta, rope_parameters=rope)
    if c.rope_scaling is not None:
      hf["rope_scaling"] = dict(rope)
    if model_type in ("llama", "qwen3"):
      hf["attention_bias"] = c.qkv_bias
    if model_type == "llama":
      hf["mlp_bias"] = False
    if model_type == "mistral":
      hf["sliding_window"] = c.sliding_window
    if model_type in ("qwen2", "qwen3"):
      hf["use_sliding_window"] = False
    return hf

  # -- tensors

  def attn_from_hf(self, get: TensorGetter, c: DecoderConfig, p: str) -> dict:
    """``attn`` parameters of the layer whose HF names start with ``p``."""
    d, h, k, dh = c.d_model, c.num_heads, c.kv_heads, c.dh

    def proj(name, heads, bias):
      w = get.get(p + f"self_attn.{name}_proj.weight", (heads * dh, d))
      out = {"kernel": w.T.reshape(d, heads, dh)}
      if bias:
        out["bias"] = get.get(p + f"self_attn.{name}_proj.bias", (heads * dh,)).reshape(heads, dh)
      return out

    o = {"kernel": get.get(p + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(h, dh, d)}
    if c.attn_out_bias:
      o["bias"] = get.get(p + "self_attn.o_proj.bias", (d,))
    attn = {"q": proj("q", h, c.qkv_bias), "k": proj("k", k, c.qkv_bias),
            "v": proj("v", k, c.qkv_bias), "o": o}
    if c.qk_norm:
      for name in ("q", "k"):
        attn[f"{name}_norm"] = {"scale": get.get(p + f"self_attn.{name}_norm.weight", (dh,))}
    return attn

  def mlp_from_hf(self, get: TensorGetter, c: DecoderConfig, p: str) -> dict:
    d, f = c.d_model, c.d_ff
    return {"wi_0": {"kernel": get.get(p + "mlp.gate_proj.weight", (f, d)).T},
            "wi_1": {"kernel": get.get(p + "mlp.up_proj.weight", (f, d)).T},
            "wo": {"kernel": get.get(p + "mlp.down_proj.weight", (d, f)).T}}

  def params_from_hf(self, get: TensorGetter, c: DecoderConfig) -> dict:
    d = c.d_model
    params: dict[str, Any] = {
        "embed": {"embedding": get.get("model.embed_tokens.weight", (c.vocab_size, d))},
        "final_norm": {"scale": get.get("model.norm.weight", (d,))},
    }
    for i in range(c.num_layers):
      p = f"model.layers.{i}."
      layer = {"attn": self.attn_from_hf(get, c, p), "mlp": self.mlp_from_hf(get, c, p)}
      for ours, theirs in layer_norm_names(c):
        layer[ours] = {"scale": get.get(p + theirs + ".weight", (d,))}
      params[f"layers_{i}"] = layer
    if not c.tie_embeddings:
      params["lm_head"] = {"kernel": get.get("lm_head.weight", (c.vocab_size, d)).T}
    return params

  def attn_to_hf(self, attn: Mapping, c: DecoderConfig, p: str) -> dict[str, np.ndarray]:
    """Inverse of :meth:`attn_from_hf`."""
    return _attn_to_hf(attn, c, p)

  def params_to_hf(self, params: Mapping, c: DecoderConfig) -> dict[str, np.ndarray]:
    return decoder_params_to_hf(params, c, _mlp_to_hf, attn_to_hf=self.attn_to_hf)


def layer_norm_names(c: DecoderConfig) -> list[tuple[str, str]]:
  """``(our name, HF name)`` of a layer's norms: Llama's two, or Gemma 2/3's four."""
  if c.post_sublayer_norms:
    return [("input_norm", "input_layernorm"), ("attn_out_norm", "post_attention_layernorm"),
            ("post_attn_norm", "pre_feedforward_layernorm"),
            ("ffn_out_norm", "post_feedforward_layernorm")]
  names = [("input_norm", "input_layernorm")]
  if not c.parallel_block:
    names.append(("post_attn_norm", "post_attention_layernorm"))
  return names


def _mlp_to_hf(mlp: Mapping, c: DecoderConfig, prefix: str) -> dict[str, np.ndarray]:
  return {prefix + "mlp.gate_proj.weight": np.asarray(mlp["wi_0"]["kernel"]).T,
          prefix + "mlp.up_proj.weight": np.asarray(mlp["wi_1"]["kernel"]).T,
          prefix + "mlp.down_proj.weight": np.asarray(mlp["wo"]["kernel"]).T}


def _attn_to_hf(attn: Mapping, c: DecoderConfig, p: str) -> dict[str, np.ndarray]:
  d, h, k, dh = c.d_model, c.num_heads, c.kv_heads, c.dh
  a = np.asarray
  out = {}
  for name, heads in (("q", h), ("k", k), ("v", k)):
    out[p + f"self_attn.{name}_proj.weight"] = a(attn[name]["kernel"]).reshape(d, heads * dh).T
    if c.qkv_bias:
      out[p + f"self_attn.{name}_proj.bias"] = a(attn[name]["bias"]).reshape(heads * dh)
  out[p + "self_attn.o_proj.weight"] = a(attn["o"]["kernel"]).reshape(h * dh, d).T
  if c.attn_out_bias:
    out[p + "self_attn.o_proj.bias"] = a(attn["o"]["bias"])
  if c.qk_norm:
    for name in ("q", "k"):
      out[p + f"self_attn.{name}_norm.weight"] = a(attn[f"{name}_norm"]["scale"])
  return out


def decoder_params_to_hf(params: Mapping, c: DecoderConfig,
                         ffn_to_hf: Callable[[Mapping, Any, str], dict[str, np.ndarray]],
                         attn_to_hf: Callable[[Mapping, Any, str], dict[str, np.ndarray]]
                         = _attn_to_hf) -> dict[str, np.ndarray]:
  """HF tensors of a Llama-layout decoder; ``ffn_to_hf(layer["mlp"], c, prefix)`` maps the FFN.

  Shared by the dense (Llama / Mistral / Qwen / Gemma / Phi-3) and the Mixtral
  exporters, which differ only in their FFN (and Phi-3 in its fused q/k/v).
  """
  a = np.asarray
  out = {"model.embed_tokens.weight": a(params["embed"]["embedding"]),
         "model.norm.weight": a(params["final_norm"]["scale"])}
  for i in range(c.num_layers):
    lp, p = params[f"layers_{i}"], f"model.layers.{i}."
    out.update(attn_to_hf(lp["attn"], c, p))
    for ours, theirs in layer_norm_names(c):
      out[p + theirs + ".weight"] = a(lp[ours]["scale"])
    out.update(ffn_to_hf(lp["mlp"], c, p))
  if not c.tie_embeddings:
    out["lm_head.weight"] = a(params["lm_head"]["kernel"]).T
  return {name: np.ascontiguousarray(x) for name, x in out.items()}
