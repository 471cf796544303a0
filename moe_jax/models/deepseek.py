"""DeepSeek-V3 (and V2-style) decoders: latent attention + fine-grained routed and shared experts.

Legend: B batch, S cache slots, D model dim, H heads, R kv latent rank, P RoPE head dim.

A DeepSeek-V3 layer is a Llama-layout pre-norm block whose attention is
multi-head latent attention (:class:`~moe_jax.nn.latent_attention.LatentAttention`)
and whose FFN is, after the first ``first_k_dense_replace`` dense layers, an
:class:`~moe_jax.moe.layer.MoeLayer` with

* many narrow routed experts (``MoeConfig.expert_dim``, HF ``moe_intermediate_size``)
  plus always-on shared experts of the same width (``shared_expert_dim``,
  ``num_shared_experts``, no gate);
* the sigmoid router (``MoeConfig.scoring="sigmoid"``): correction bias for the
  choice (``score_bias``), group-limited top-k (``num_expert_groups``,
  ``topk_groups``), ``renormalize`` (``norm_topk_prob``) and
  ``routed_scaling_factor``.

Everything MoE is :class:`~moe_jax.models.moe_decoder.MoeDecoderConfig`'s;
:class:`DeepseekConfig` adds only the latent attention's sizes, and the
dense layers keep ``d_ff`` (HF ``intermediate_size``) through ``moe_layout``.
``num_heads`` is H; ``head_dim`` / ``num_kv_heads`` do not apply (MLA's head
dims are ``qk_nope_head_dim + qk_rope_head_dim`` for queries and keys and
``v_head_dim`` for values).

**Decoding cache.** :meth:`DeepseekDecoder.init_cache` gives every layer a
:class:`~moe_jax.nn.latent_attention.LatentCache`: the compressed latent
``[B, S, R]`` and the rotated shared key ``[B, S, P]`` -- ``R + P`` numbers per
token and layer, DeepSeek's own cache -- in the same
:class:`~moe_jax.models.decoder.DecodeCache` (slot bookkeeping, scanned
stacks) as every decoder here, so :mod:`moe_jax.decoding` runs it unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moe_jax.models.decoder import DecodeCache, layer_caches
from moe_jax.models.moe_decoder import MoeDecoder, MoeDecoderBlock, MoeDecoderConfig
from moe_jax.nn.latent_attention import LatentAttention, LatentCache, YarnRope


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepseekConfig(MoeDecoderConfig):
  """``MoeDecoderConfig`` whose attention is multi-head latent attention.

  Attributes:
    kv_lora_rank: R, the compressed KV latent.
    qk_nope_head_dim, qk_rope_head_dim: the position-free and the RoPE part of
      each query / key head.
    v_head_dim: value head dim.
    q_lora_rank: the query latent; ``None``: queries projected directly.
    rope_interleave: RoPE rotates adjacent pairs (DeepSeek's released weights).
    attention_bias: biases on the ``q_a``, ``kv_a`` and ``o`` projections (HF
      ``attention_bias``); ``qkv_bias`` / ``attn_out_bias`` do not apply.
    attn_scale: softmax scale; ``None``: ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``
      (times YaRN's ``softmax_factor``).
    rope_yarn: YaRN scaling of the RoPE dims (DeepSeek-V3's released configs);
      exclusive with ``rope_scaling``.
  """

  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  q_lora_rank: int | None = None
  rope_interleave: bool = True
  attention_bias: bool = False
  attn_scale: float | None = None
  rope_yarn: YarnRope | None = None

  def __post_init__(self):
    # DecoderConfig wants a head_dim when D is not a multiple of H; MLA never reads it.
    if self.head_dim is None and self.d_model % self.num_heads:
      object.__setattr__(self, "head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim)
    super().__post_init__()
    for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"DeepseekConfig.{name} must be positive, got {getattr(self, name)}")
    if self.qk_nope_head_dim < 0 or (self.q_lora_rank is not None and self.q_lora_rank <= 0):
      raise ValueError("DeepseekConfig: qk_nope_head_dim must be >= 0 and q_lora_rank "
                       "positive or None")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"DeepseekConfig.qk_rope_head_dim must be even, got "
                       f"{self.qk_rope_head_dim}")
    unsupported = [name for name in ("qkv_bias", "attn_out_bias", "parallel_block", "qk_norm",
                                     "post_sublayer_norms", "scale_embeddings")
                   if getattr(self, name)]
    unsupported += [name for name in ("sliding_window", "attn_logit_softcap",
                                      "query_pre_attn_scalar", "local_rope_theta")
                    if getattr(self, name) is not None]
    if self.rope_yarn is not None and self.rope_scaling is not None:
      unsupported.append("rope_scaling (with rope_yarn)")
    if self.num_kv_heads not in (None, self.num_heads):
      unsupported.append("num_kv_heads")
    if self.norm_scale_offset:
      unsupported.append("norm_scale_offset")
    if unsupported:
      raise ValueError(f"DeepseekConfig: {unsupported} do not apply to latent attention "
                       "(use attention_bias for HF's attention_bias)")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim


class DeepseekBlock(MoeDecoderBlock):
  """``MoeDecoderBlock`` with latent attention (same call contract, a ``LatentCache``)."""

  def make_attention(self) -> nn.Module:
    c = self.config
    if not isinstance(c, DeepseekConfig):
      raise TypeError(f"DeepseekBlock needs a DeepseekConfig, got {type(c).__name__}")
    return LatentAttention(
        num_heads=c.num_heads, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, out_features=c.d_model,
        q_lora_rank=c.q_lora_rank, use_bias=c.attention_bias, scale=c.attn_scale,
        rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, rope_interleave=c.rope_interleave,
        yarn=c.rope_yarn,
        norm_eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
        attention_impl=c.attention_impl)


def init_latent_cache(config: DeepseekConfig, batch: int, max_len: int | None = None,
                      dtype: Any = None) -> DecodeCache:
  """Empty compressed cache (a :class:`LatentCache` per layer) for ``batch`` sequences."""
  slots = max_len or config.max_seq_len
  dtype = jnp.dtype(dtype or config.dtype)
  return DecodeCache(
      layers=layer_caches(config, lambda i: LatentCache.zeros(
          batch, slots, config.kv_lora_rank, config.qk_rope_head_dim, dtype)),
      valid_BS=jnp.zeros((batch, slots), bool),
      index=jnp.zeros((), jnp.int32))


class DeepseekDecoder(MoeDecoder):
  """``MoeDecoder`` of :class:`DeepseekBlock` blocks with the compressed decode cache."""

  block_cls: type[MoeDecoderBlock] = DeepseekBlock

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None
                 ) -> DecodeCache:
    return init_latent_cache(self.config, batch, max_len, dtype)
