"""Converter for Gemma 1, 2 and 3 (text) causal LMs: ``gemma``, ``gemma2``, ``gemma3_text``.

Gemma is a Llama layout with different settings, all of them
:class:`~moe_jax.models.decoder.DecoderConfig` fields: ``(1 + w)`` RMSNorm
scales (stored as ``w``: ``norm_scale_offset=1``), embeddings scaled by
``sqrt(d_model)``, GeGLU FFNs (tanh-approximated GELU) and tied heads. Gemma 2
adds norms on each sublayer's output (``pre/post_feedforward_layernorm``:
``post_sublayer_norms``), soft-capped attention and final logits,
``query_pre_attn_scalar`` and alternating local (sliding-window) / global
layers (``layer_types``). Gemma 3 adds q/k norms and a separate RoPE base for
its local layers (``rope_parameters["sliding_attention"]``), and drops
attention soft-capping (transformers ignores ``attn_logit_softcapping`` there,
so we read it as ``None``).

Tensor names are Llama's plus ``self_attn.{q,k}_norm`` and the four layer
norms (mapped in :mod:`hf_llama`). A full Gemma 3 (``Gemma3ForConditionalGeneration``,
``model_type`` ``gemma3``) has a vision tower and is not a decoder of ours;
its text-only checkpoints (``Gemma3ForCausalLM``) are.
"""

from __future__ import annotations

from typing import Any, Mapping

from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.hf_llama import (GELUS, LlamaConverter, _rope_from_hf,
                                          base_config_fields, base_config_to_hf, rope_to_hf)
from moe_jax.models.decoder import DecoderConfig

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _activation(hf: Mapping[str, Any], model_type: str) -> str:
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if model_type == "gemma" and act == "gelu":  # transformers reads Gemma 1's "gelu" as tanh
    act = "gelu_pytorch_tanh"
  if act not in GELUS + ("silu",):
    raise CheckpointError(f"config.json: hidden activation {act!r} is not supported for "
                          f"{model_type} (expected one of {GELUS})")
  return act


def _sliding_layers(hf: Mapping[str, Any], n: int, pattern: int) -> tuple[int, ...]:
  """Indices of the local layers, from ``layer_types`` or the family's default pattern."""
  types = hf.get("layer_types")
  if types is None:
    pattern = int(hf.get("sliding_window_pattern", pattern))
    types = [_SLIDING if (i + 1) % pattern else _FULL for i in range(n)]
  if len(types) != n or set(types) - {_SLIDING, _FULL}:
    raise CheckpointError(f"config.json: layer_types {types} is not {n} of "
                          f"{_SLIDING!r} / {_FULL!r}")
  return tuple(i for i, t in enumerate(types) if t == _SLIDING)


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
  """Global RoPE settings (as a flat HF dict) and the local layers' base."""
  params = hf.get("rope_parameters") or {}
  if _FULL in params or _SLIDING in params:
    full, local = dict(params.get(_FULL) or {}), dict(params.get(_SLIDING) or {})
  else:  # transformers < 5: rope_theta / rope_scaling / rope_local_base_freq
    full, local = {**(hf.get("rope_scaling") or {})}, {}
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local["rope_theta"] = hf.get("rope_local_base_freq", 10_000.0)
  if local.get("rope_type", "default") != "default":
    raise CheckpointError(f"config.json: scaled RoPE on {_SLIDING} layers is not supported")
  full.setdefault("rope_theta", 1_000_000.0)
  return {"rope_parameters": full}, float(local.get("rope_theta", 10_000.0))


class GemmaConverter(LlamaConverter):
  model_types = ("gemma", "gemma2", "gemma3_text")

  def config_from_hf(self, hf: Mapping[str, Any]) -> DecoderConfig:
    model_type = hf.get("model_type")
    if hf.get("use_bidirectional_attention"):
      raise CheckpointError("config.json: use_bidirectional_attention=true (an encoder) is "
                            "not supported")
    fields = base_config_fields(hf)
    fields.update(tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                  norm_scale_offset=1.0, scale_embeddings=True,
                  activation=_activation(hf, model_type))
    bias = bool(hf.get("attention_bias", False))
    fields.update(qkv_bias=bias, attn_out_bias=bias)
    if model_type == "gemma":
      return DecoderConfig(**fields)
    n = fields["num_layers"]
    sliding = hf.get("sliding_window")
    layers = _sliding_layers(hf, n, 2 if model_type == "gemma2" else 6)
    qpas = hf.get("query_pre_attn_scalar")
    fields.update(post_sublayer_norms=True, final_logit_softcap=hf.get("final_logit_softcapping"),
                  query_pre_attn_scalar=None if qpas is None else float(qpas),
                  sliding_window=int(sliding) if sliding and layers else None,
                  sliding_window_layers=(None if not sliding or not layers or len(layers) == n
                                         else layers))
    if model_type == "gemma2":
      fields["attn_logit_softcap"] = hf.get("attn_logit_softcapping")
      return DecoderConfig(**fields)
    rope, local_theta = _gemma3_rope(hf)
    fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(rope)
    fields.update(qk_norm=True, local_rope_theta=local_theta if fields["sliding_window"]
                  else None)
    return DecoderConfig(**fields)

  def config_to_hf(self, c: DecoderConfig) -> dict[str, Any]:
    model_type = self.export_model_type(c)
    hf = base_config_to_hf(c, model_type)
    hf.update(attention_bias=c.qkv_bias)
    if model_type == "gemma":
      hf.update(hidden_act=c.activation, rope_theta=c.rope_theta, rope_parameters=rope_to_hf(c))
      return hf
    qpas = c.query_pre_attn_scalar or c.dh
    hf.update(hidden_activation=c.activation,  # transformers wants an int scalar when it is one
              query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
              final_logit_softcapping=c.final_logit_softcap,
              sliding_window=c.sliding_window or c.max_seq_len,
              layer_types=[_SLIDING if c.is_sliding_layer(i) else _FULL
                           for i in range(c.num_layers)])
    if model_type == "gemma2":
      hf.update(attn_logit_softcapping=c.attn_logit_softcap, rope_theta=c.rope_theta,
                rope_parameters=rope_to_hf(c))
      return hf
    local = c.rope_theta if c.local_rope_theta is None else c.local_rope_theta
    hf.update(attn_logit_softcapping=None, use_bidirectional_attention=False,
              rope_parameters={_FULL: rope_to_hf(c), _SLIDING: rope_to_hf(c, local, False)})
    return hf
