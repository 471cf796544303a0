"""Converter for Phi-3 causal LMs (``phi3``): a Llama layout with fused projections.

Phi-3 stores q/k/v as one ``qkv_proj.weight [(H + 2K) * Dh, D]`` (queries,
then keys, then values) and the FFN's gate and up projections as one
``gate_up_proj.weight [2F, D]`` (gate first). We keep separate ``q``/``k``/``v``
and ``wi_0``/``wi_1`` parameters -- the names PEFT and upcycling address in
every family -- and split / fuse at the checkpoint boundary, which is exact.
Its sliding window applies to every layer (Mistral-style). LongRoPE
(``rope_type`` ``longrope``, the 128k models) and partial rotary embeddings
are not supported and say so.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError, TensorGetter
from moe_jax.checkpoints.hf_llama import (LlamaConverter, base_config_fields, base_config_to_hf,
                                          decoder_params_to_hf, export_model_type, rope_to_hf)
from moe_jax.models.decoder import DecoderConfig


class Phi3Converter(LlamaConverter):
  model_types = ("phi3",)

  def config_from_hf(self, hf: Mapping[str, Any]) -> DecoderConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
      raise CheckpointError(f"config.json: phi3 partial_rotary_factor={partial} is not supported")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise CheckpointError(f"config.json: hidden_act {act!r} is not supported for phi3")
    sliding = hf.get("sliding_window")
    return DecoderConfig(**base_config_fields(hf),
                         sliding_window=None if sliding is None else int(sliding))

  def config_to_hf(self, c: DecoderConfig) -> dict[str, Any]:
    if export_model_type(c) != "phi3":
      raise CheckpointError("Phi3Converter cannot write this config; use "
                            "moe_jax.checkpoints.export_hf")
    hf = base_config_to_hf(c, "phi3")
    hf.update(hidden_act=c.activation, rope_theta=c.rope_theta, rope_parameters=rope_to_hf(c),
              sliding_window=c.sliding_window, original_max_position_embeddings=c.max_seq_len)
    return hf

  def attn_from_hf(self, get: TensorGetter, c: DecoderConfig, p: str) -> dict:
    d, h, k, dh = c.d_model, c.num_heads, c.kv_heads, c.dh
    qkv = get.get(p + "self_attn.qkv_proj.weight", ((h + 2 * k) * dh, d))
    q, kk, v = np.split(qkv, [h * dh, (h + k) * dh])
    o = get.get(p + "self_attn.o_proj.weight", (d, h * dh))
    return {"q": {"kernel": q.T.reshape(d, h, dh)}, "k": {"kernel": kk.T.reshape(d, k, dh)},
            "v": {"kernel": v.T.reshape(d, k, dh)}, "o": {"kernel": o.T.reshape(h, dh, d)}}

  def mlp_from_hf(self, get: TensorGetter, c: DecoderConfig, p: str) -> dict:
    d, f = c.d_model, c.d_ff
    gate_up = get.get(p + "mlp.gate_up_proj.weight", (2 * f, d))
    return {"wi_0": {"kernel": gate_up[:f].T}, "wi_1": {"kernel": gate_up[f:].T},
            "wo": {"kernel": get.get(p + "mlp.down_proj.weight", (d, f)).T}}

  def attn_to_hf(self, attn: Mapping, c: DecoderConfig, p: str) -> dict[str, np.ndarray]:
    d, h, dh = c.d_model, c.num_heads, c.dh
    parts = [np.asarray(attn[n]["kernel"]).reshape(d, -1).T for n in ("q", "k", "v")]
    return {p + "self_attn.qkv_proj.weight": np.concatenate(parts, axis=0),
            p + "self_attn.o_proj.weight": np.asarray(attn["o"]["kernel"]).reshape(h * dh, d).T}

  def params_to_hf(self, params: Mapping, c: DecoderConfig) -> dict[str, np.ndarray]:
    return decoder_params_to_hf(params, c, _mlp_to_hf, attn_to_hf=self.attn_to_hf)


def _mlp_to_hf(mlp: Mapping, c: DecoderConfig, prefix: str) -> dict[str, np.ndarray]:
  gate, up = (np.asarray(mlp[n]["kernel"]).T for n in ("wi_0", "wi_1"))
  return {prefix + "mlp.gate_up_proj.weight": np.concatenate([gate, up], axis=0),
          prefix + "mlp.down_proj.weight": np.asarray(mlp["wo"]["kernel"]).T}
