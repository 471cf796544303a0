"""BAM decoder (arXiv 2408.08274): routed FFN experts *and* a mixture of attention experts.

Legend: B batch, S cache slots, D model dim, E experts, K kv heads, Dh head dim.

``BamDecoder(config=BamDecoderConfig(..., moe=MoeConfig(...),
attention=AttentionMixtureConfig(...)))`` is the :class:`~moe_jax.models.moe_decoder.MoeDecoder` whose MoE layers also
replace their attention by an :class:`~moe_jax.moe.attention_mixture.AttentionMixture`
(the same layers, ``moe_layout``). The BAM paper uses a *parallel* block
(``parallel_block=True``: attention and FFN read the same normed input), so
the attention experts and FFN experts run side by side and the extra
attention compute hides behind the FFN's; the sequential block works too.

Both routers of a parallel block read the same normed hidden state, but are
separate parameters (``attn/router`` and ``mlp/router``): BAM routes
attention softly and the FFN top-1, and one router would couple them.

Decoding follows :class:`~moe_jax.models.decoder.DecodeCache`: one
``KVCache`` per layer, ``[B, S, E*K, Dh]`` in expert-KV mixture layers (E
sets of keys/values), ``[B, S, K, Dh]`` in shared-KV mixture layers and
dense layers. :meth:`BamDecoder.init_cache` (used by ``moe_jax.decoding``)
builds it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moe_jax.models.decoder import DecodeCache, layer_caches
from moe_jax.models.moe_decoder import MoeDecoder, MoeDecoderBlock, MoeDecoderConfig
from moe_jax.moe.attention_mixture import AttentionMixture, AttentionMixtureConfig
from moe_jax.moe.layer import MoeConfig  # noqa: F401  (type hint resolution in the registry)
from moe_jax.nn.attention import KVCache


@dataclasses.dataclass(frozen=True, kw_only=True)
class BamDecoderConfig(MoeDecoderConfig):
  """``MoeDecoderConfig`` plus the attention experts of the MoE layers.

  Attributes:
    attention: the mixture of attention in every layer of ``moe_layout``; its
      ``num_experts`` may differ from the FFN's (``moe.num_experts``).
  """

  attention: AttentionMixtureConfig

  def cache_kv_heads(self, layer: int) -> int:
    """kv heads of layer ``layer``'s cache (``E*K`` for expert-KV mixture layers)."""
    if layer in self.moe_layers and not self.attention.shared_kv:
      return self.kv_heads * self.attention.num_experts
    return self.kv_heads


def init_cache(config: BamDecoderConfig, batch: int, max_len: int | None = None,
               dtype: Any = None) -> DecodeCache:
  """Empty decode cache: E k/v sets in expert-KV layers, one in shared-KV and dense layers."""
  slots = max_len or config.max_seq_len
  dtype = jnp.dtype(dtype or config.dtype)
  return DecodeCache(
      layers=layer_caches(config, lambda i: KVCache.zeros(batch, slots, config.cache_kv_heads(i),
                                                          config.dh, dtype)),
      valid_BS=jnp.zeros((batch, slots), bool),
      index=jnp.zeros((), jnp.int32))


class BamDecoderBlock(MoeDecoderBlock):
  """``MoeDecoderBlock`` whose MoE layers mix attention experts too."""

  def make_attention(self) -> nn.Module:
    c = self.config
    if not isinstance(c, BamDecoderConfig):
      raise TypeError(f"BamDecoderBlock needs a BamDecoderConfig, got {type(c).__name__}")
    if self.layer_index not in c.moe_layers:
      return super().make_attention()
    unsupported = [name for name in ("qk_norm", "attn_logit_softcap", "query_pre_attn_scalar",
                                     "local_rope_theta") if getattr(c, name)]
    if unsupported:
      raise ValueError(f"BAM attention experts do not implement {unsupported} (Gemma / Qwen3 "
                       "attention); upcycle this backbone's FFNs only (sparse upcycling, BTX)")
    return AttentionMixture(config=c.attention, num_heads=c.num_heads, num_kv_heads=c.kv_heads,
                            head_dim=c.dh, out_features=c.d_model, qkv_bias=c.qkv_bias,
                            out_bias=c.attn_out_bias, rope_theta=c.rope_theta,
                            rope_scaling=c.rope_scaling, dtype=c.dtype,
                            param_dtype=c.param_dtype)


class BamDecoder(MoeDecoder):
  """``Decoder`` built from ``BamDecoderBlock`` (takes a ``BamDecoderConfig``)."""

  block_cls: type[MoeDecoderBlock] = BamDecoderBlock

  def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None
                 ) -> DecodeCache:
    """Empty decode cache for this model (needs no parameters)."""
    return init_cache(self.config, batch, max_len, dtype)
