"""Hugging Face ``T5ForConditionalGeneration`` (model_type ``t5``) <-> :class:`moe_jax.models.t5.T5`.

Layouts. HF stores ``nn.Linear`` weights ``[out, in]`` with heads flattened:

=====================================================  =======================  ==================
HF tensor                                              HF shape                 ours
=====================================================  =======================  ==================
``shared.weight``                                      ``[V, D]``               ``shared/embedding``
``{enc,dec}.block.i.layer.0.SelfAttention.{q,k,v}``    ``[H*Dh, D]``            ``kernel [D, H, Dh]``
``{enc,dec}.block.i.layer.0.SelfAttention.o``          ``[D, H*Dh]``            ``kernel [H, Dh, D]``
``*.block.0.layer.0.SelfAttention.relative_attention_bias``  ``[R, H]``         ``relpos_bias/embedding``
``*.DenseReluDense.{wi,wi_0,wi_1}``                    ``[F, D]``               ``kernel [D, F]``
``*.DenseReluDense.wo``                                ``[D, F]``               ``kernel [F, D]``
``*.layer_norm`` / ``*.final_layer_norm``              ``[D]``                  ``scale``
``lm_head.weight`` (v1.1)                              ``[V, D]``               ``lm_head/kernel [D, V]``
=====================================================  =======================  ==================

Encoder blocks have ``layer.0`` (self-attention) and ``layer.1`` (FFN);
decoder blocks ``layer.0`` (self), ``layer.1`` (``EncDecAttention``), ``layer.2`` (FFN).

Tied vs untied head. In transformers < 5, ``tie_word_embeddings`` meant both
"share the head with the embedding" and "scale the decoder output by
``d_model**-0.5``". transformers >= 5 always ties on construction, keeps a
checkpoint's own ``lm_head.weight`` when it differs from ``shared.weight``, and
moves the scaling to ``scale_decoder_outputs`` (saving
``tie_word_embeddings: true`` even for v1.1). We therefore read the head kind
from ``scale_decoder_outputs`` when present, else from ``tie_word_embeddings``,
and write both. An untied config whose checkpoint has no ``lm_head.weight``
uses ``shared.weight`` for the head, as transformers >= 5 does.

Export writes every key of ``T5ForConditionalGeneration.state_dict()``
(including the ``embed_tokens`` and, when tied, ``lm_head`` copies of
``shared.weight``), so both ``load_state_dict(strict=True)`` and
``from_pretrained`` accept it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError, TensorGetter, require
from moe_jax.models.t5 import FEED_FORWARD_PROJ, T5, T5Config

# ``get(name, hf_shape) -> array``: TensorGetter.get, which checks presence and shape.
GetFn = Callable[[str, tuple[int, ...]], np.ndarray]

# Present in some checkpoints, unused by the model (HF ignores it too).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _attn_from_hf(get: GetFn, prefix: str, c: T5Config) -> dict:
  d, h, dh = c.d_model, c.num_heads, c.d_kv
  out = {}
  for name in ("q", "k", "v"):
    w = get(f"{prefix}.{name}.weight", (h * dh, d))
    out[name] = {"kernel": w.T.reshape(d, h, dh)}
  w = get(f"{prefix}.o.weight", (d, h * dh))
  out["o"] = {"kernel": w.T.reshape(h, dh, d)}
  return out


def _attn_to_hf(p: Mapping, prefix: str, c: T5Config) -> dict[str, np.ndarray]:
  d, h, dh = c.d_model, c.num_heads, c.d_kv
  out = {}
  for name in ("q", "k", "v"):
    out[f"{prefix}.{name}.weight"] = np.asarray(p[name]["kernel"]).reshape(d, h * dh).T
  out[f"{prefix}.o.weight"] = np.asarray(p["o"]["kernel"]).reshape(h * dh, d).T
  return out


def _ffn_names(c: T5Config) -> tuple[str, ...]:
  return ("wi_0", "wi_1") if c.gated else ("wi",)


def _ffn_from_hf(get: GetFn, prefix: str, c: T5Config) -> dict:
  out = {name: {"kernel": get(f"{prefix}.{name}.weight", (c.d_ff, c.d_model)).T}
         for name in _ffn_names(c)}
  out["wo"] = {"kernel": get(f"{prefix}.wo.weight", (c.d_model, c.d_ff)).T}
  return out


def _ffn_to_hf(p: Mapping, prefix: str, c: T5Config) -> dict[str, np.ndarray]:
  out = {f"{prefix}.{name}.weight": np.asarray(p[name]["kernel"]).T for name in _ffn_names(c)}
  out[f"{prefix}.wo.weight"] = np.asarray(p["wo"]["kernel"]).T
  return out


def _norm_from_hf(get: GetFn, name: str, c: T5Config) -> dict:
  return {"scale": get(name, (c.d_model,))}


# A block's HF sub-layers in order (``{stack}.block.{i}.layer.{j}``): our pre-norm, our
# sub-layer and the HF module under it.
_BLOCKS = {
    "encoder": (("pre_attn_norm", "attn", "SelfAttention"),
                ("pre_mlp_norm", "mlp", "DenseReluDense")),
    "decoder": (("pre_self_attn_norm", "self_attn", "SelfAttention"),
                ("pre_cross_attn_norm", "cross_attn", "EncDecAttention"),
                ("pre_mlp_norm", "mlp", "DenseReluDense")),
}
_RELPOS = "{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _stack_from_hf(get: TensorGetter, stack: str, num_layers: int, c: T5Config) -> dict:
  """Our ``encoder`` / ``decoder`` parameters from HF's ``{stack}.*`` tensors."""
  out: dict[str, Any] = {}
  for i in range(num_layers):
    layer = out[f"layers_{i}"] = {}
    for j, (norm, sub, module) in enumerate(_BLOCKS[stack]):
      prefix = f"{stack}.block.{i}.layer.{j}"
      layer[norm] = _norm_from_hf(get.get, f"{prefix}.layer_norm.weight", c)
      from_hf = _ffn_from_hf if module == "DenseReluDense" else _attn_from_hf
      layer[sub] = from_hf(get.get, f"{prefix}.{module}", c)
  out["relpos_bias"] = {"embedding": get.get(
      _RELPOS.format(stack), (c.relative_attention_num_buckets, c.num_heads))}
  out["final_norm"] = _norm_from_hf(get.get, f"{stack}.final_layer_norm.weight", c)
  return out


def _stack_to_hf(p: Mapping, stack: str, num_layers: int, c: T5Config) -> dict[str, np.ndarray]:
  """HF's ``{stack}.*`` tensors from our ``encoder`` / ``decoder`` parameters."""
  out: dict[str, np.ndarray] = {}
  for i in range(num_layers):
    layer = p[f"layers_{i}"]
    for j, (norm, sub, module) in enumerate(_BLOCKS[stack]):
      prefix = f"{stack}.block.{i}.layer.{j}"
      out[f"{prefix}.layer_norm.weight"] = np.asarray(layer[norm]["scale"])
      to_hf = _ffn_to_hf if module == "DenseReluDense" else _attn_to_hf
      out.update(to_hf(layer[sub], f"{prefix}.{module}", c))
  out[_RELPOS.format(stack)] = np.asarray(p["relpos_bias"]["embedding"])
  out[f"{stack}.final_layer_norm.weight"] = np.asarray(p["final_norm"]["scale"])
  return out


class T5Converter:
  """Converter for HF ``model_type == "t5"`` (T5 v1.0, v1.1, LM-adapted, Flan-T5)."""

  model_types = ("t5",)
  config_type = T5Config

  # ------------------------------------------------------------------ config

  def config_from_hf(self, hf_config: Mapping[str, Any]) -> T5Config:
    src = "config.json"
    model_type = hf_config.get("model_type", "t5")
    if model_type not in self.model_types:
      raise CheckpointError(f"{src}: model_type {model_type!r} is not handled by the T5 "
                            f"converter (expects one of {self.model_types})")
    ffp = hf_config.get("feed_forward_proj", "relu")
    if ffp not in FEED_FORWARD_PROJ:
      raise CheckpointError(f"{src}: feed_forward_proj={ffp!r} is not supported; expected one "
                            f"of {sorted(FEED_FORWARD_PROJ)}")
    gated, act = FEED_FORWARD_PROJ[ffp]
    # transformers lets explicit is_gated_act / dense_act_fn override feed_forward_proj.
    for key, implied in (("is_gated_act", gated), ("dense_act_fn", act)):
      if key in hf_config and hf_config[key] != implied:
        raise CheckpointError(
            f"{src}: {key}={hf_config[key]!r} contradicts feed_forward_proj={ffp!r} (which "
            f"implies {implied!r}); transformers would use {key}, which is not supported")
    tied = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
    num_layers = require(hf_config, "num_layers", src)
    eos = hf_config.get("eos_token_id", 1)
    pad = hf_config.get("pad_token_id", 0)
    try:
      return T5Config(
          vocab_size=require(hf_config, "vocab_size", src),
          d_model=require(hf_config, "d_model", src),
          d_kv=require(hf_config, "d_kv", src),
          d_ff=require(hf_config, "d_ff", src),
          num_layers=num_layers,
          num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
          num_heads=require(hf_config, "num_heads", src),
          relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
          relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
          feed_forward_proj=ffp,
          tie_word_embeddings=bool(tied),
          layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
          pad_token_id=0 if pad is None else pad,
          eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (1 if eos is None else eos),
          decoder_start_token_id=hf_config.get("decoder_start_token_id",
                                               0 if pad is None else pad),
          max_seq_len=hf_config.get("n_positions", 512))
    except ValueError as e:
      raise CheckpointError(f"{src}: {e}") from e

  def config_to_hf(self, config: T5Config) -> dict[str, Any]:
    c = config
    gated, act = FEED_FORWARD_PROJ[c.feed_forward_proj]
    eos = list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.d_kv,
        "d_ff": c.d_ff,
        "num_layers": c.num_layers,
        "num_decoder_layers": c.decoder_layers,
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "feed_forward_proj": c.feed_forward_proj,
        "is_gated_act": gated,
        "dense_act_fn": act,
        # See the module docstring: < 5 reads tie_word_embeddings, >= 5 scale_decoder_outputs.
        "tie_word_embeddings": c.tie_word_embeddings,
        "scale_decoder_outputs": c.tie_word_embeddings,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "dropout_rate": 0.1,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": eos,
        "decoder_start_token_id": c.decoder_start_token_id,
        "n_positions": c.max_seq_len,
        "torch_dtype": str(jnp.dtype(c.param_dtype)),
        "dtype": str(jnp.dtype(c.param_dtype)),
    }

  # ------------------------------------------------------------------ params

  def params_from_hf(self, get: TensorGetter, config: T5Config) -> dict:
    c = config
    vd = (c.vocab_size, c.d_model)
    rh = (c.relative_attention_num_buckets, c.num_heads)
    embed_name = next((n for n in ("shared.weight", "encoder.embed_tokens.weight",
                                   "decoder.embed_tokens.weight") if get.has(n)),
                      "shared.weight")
    shared = get.get(embed_name, vd)
    for dup in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      if dup != embed_name and get.has(dup):
        get.get(dup, vd)  # a copy of shared.weight; read only to check and mark it used
    for name in _IGNORED:
      if get.has(name):
        get.get(name, rh)

    encoder = _stack_from_hf(get, "encoder", c.num_layers, c)
    decoder = _stack_from_hf(get, "decoder", c.decoder_layers, c)
    params: dict[str, Any] = {"shared": {"embedding": shared}, "encoder": encoder,
                              "decoder": decoder}
    if get.has("lm_head.weight"):
      head = get.get("lm_head.weight", vd)
      if not c.tie_word_embeddings:
        params["lm_head"] = {"kernel": head.T}
      elif not np.array_equal(head, shared):
        raise CheckpointError(
            f"{get.source}: config says the head is tied (scaled by d_model**-0.5) but "
            f"'lm_head.weight' differs from {embed_name!r}; a scaled untied head is not supported")
    elif not c.tie_word_embeddings:
      params["lm_head"] = {"kernel": shared.T}  # transformers >= 5 ties a missing head
    # Arrays keep the file's dtype: the loader picks and casts to the parameter dtype.
    return params

  def params_to_hf(self, params: Mapping, config: T5Config) -> dict[str, np.ndarray]:
    c = config
    out: dict[str, np.ndarray] = {}
    shared = np.asarray(params["shared"]["embedding"])
    out["shared.weight"] = shared
    out["encoder.embed_tokens.weight"] = shared
    out["decoder.embed_tokens.weight"] = shared
    out.update(_stack_to_hf(params["encoder"], "encoder", c.num_layers, c))
    out.update(_stack_to_hf(params["decoder"], "decoder", c.decoder_layers, c))
    if c.tie_word_embeddings:
      out["lm_head.weight"] = shared
    else:
      out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    # The embed_tokens / tied lm_head entries alias shared.weight (no copies); treat as read-only.
    return {k: np.ascontiguousarray(v) for k, v in out.items()}

  def module(self, config: T5Config) -> T5:
    return T5(config=config)


CONVERTER = T5Converter()
