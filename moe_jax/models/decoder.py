"""Decoder-only transformers: Llama 2/3, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3; optionally parallel.

Legend: B batch, L query length, S cache slots, D model dim, V vocab,
H query heads, K kv heads, Dh head dim, F ffn dim.

Padding and caching use one rule. Each sequence owns slots ``[0, S)``; a
boolean ``valid_BS`` says which slots hold real tokens. A query in slot ``t``
may attend slot ``s`` iff ``s <= t`` and ``valid[s]`` (and, with a sliding
window, ``t - s < window``). Positions count only valid tokens, so left- and
right-padded prompts both get RoPE positions ``0..n-1``. Training (no cache)
is the special case ``S = L``.

The families differ only in :class:`DecoderConfig` fields, never in
model-name branches: Gemma's ``(1 + w)`` norms (``norm_scale_offset``),
``sqrt(D)``-scaled embeddings, GeGLU (``activation``), sandwich norms around
each sublayer (``post_sublayer_norms``), soft-capped attention and final
logits, ``query_pre_attn_scalar``, alternating local / global layers
(``sliding_window_layers``, ``local_rope_theta``) and Qwen3 / Gemma 3's q/k
norms (``qk_norm``). Their defaults are the Llama architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.models import stack
from moe_jax.nn.attention import Attention, KVCache
from moe_jax.nn.attention_kernels import AttentionMask, check_impl
from moe_jax.nn.embeddings import Embed, RopeScaling
from moe_jax.nn.linear import Linear
from moe_jax.nn.mlp import Mlp
from moe_jax.nn.norms import RMSNorm

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
  """Architecture of a Llama-family decoder.

  Attributes:
    vocab_size, d_model, num_layers, num_heads, d_ff: sizes.
    num_kv_heads: K; equal to ``num_heads`` for MHA, 1 for MQA. ``None``: MHA.
    head_dim: Dh; ``None`` means ``d_model // num_heads``.
    rope_theta, rope_scaling: rotary embedding base and optional scaling.
    norm_eps: RMSNorm epsilon.
    qkv_bias: biases on q/k/v projections (Qwen2).
    attn_out_bias: bias on the attention output projection (Llama ``attention_bias``).
    tie_embeddings: output head shares the embedding table.
    embed_init_std: standard deviation of the embedding table's normal
      initialisation (1.0 as T5 / t5x; Hugging Face Llama's
      ``initializer_range`` is 0.02). Only affects fresh initialisation.
    parallel_block: attention and FFN read the same normed input and their
      outputs are summed into the residual (GPT-J / PaLM / BAM style). One
      norm per layer (``input_norm``).
    sliding_window: Mistral-style local attention window, ``None`` for global.
    activation: FFN activation of the gated branch.
    max_seq_len: default KV cache size.
    dtype, param_dtype: compute and storage dtype names.
    pad_token_id, bos_token_id, eos_token_id: special tokens (decoding defaults).
    hf_model_type: the HF ``model_type`` this config came from (export target).
    norm_scale_offset: every RMSNorm multiplies by ``norm_scale_offset + scale``
      (Gemma: 1, with ``scale`` stored as the offset from one).
    scale_embeddings: multiply the token embeddings by ``sqrt(d_model)`` (Gemma;
      the tied output head uses the unscaled table).
    post_sublayer_norms: norm each sublayer's output before its residual add
      (Gemma 2/3 "sandwich" norms: ``attn_out_norm``, ``ffn_out_norm``); the
      pre-FFN norm is ``post_attn_norm`` in every family.
    attn_logit_softcap: ``c * tanh(logits / c)`` on attention logits (Gemma 2).
    final_logit_softcap: the same on the output logits (Gemma 2/3).
    query_pre_attn_scalar: attention logits are scaled by
      ``query_pre_attn_scalar ** -0.5`` instead of ``Dh ** -0.5`` (Gemma 2/3).
    qk_norm: RMSNorm of each query / key head over ``Dh`` before RoPE (Qwen3,
      Gemma 3).
    qk_norm_full_width: with ``qk_norm``, normalise the whole projected
      query (``H·Dh``) and key (``K·Dh``) of a token instead of each head
      (OLMoE); scales ``[H·Dh]`` / ``[K·Dh]``.
    sliding_window_layers: the layers that use ``sliding_window`` (Gemma 2/3
      alternate local and global layers); ``None``: all of them.
    local_rope_theta: RoPE base of the sliding-window layers, which then use no
      ``rope_scaling`` (Gemma 3's local base); ``None``: same as global layers.
    attention_impl: ``"auto"`` (fused kernel by backend: splash on TPU, cuDNN
      on GPU, xla on CPU) | ``"xla"`` | ``"splash"`` | ``"flash"`` | ``"cudnn"``
      (:mod:`moe_jax.nn.attention_kernels`); decoding with a cache always uses xla.
    remat_policy: per-block rematerialisation (:data:`moe_jax.models.stack.REMAT_POLICIES`);
      ``"none"`` keeps every activation.
    scan_layers: run the blocks as one ``nn.scan`` with parameters stacked
      along a ``layers`` axis (:mod:`moe_jax.models.stack`): compile time
      independent of depth. Alternating local / global layers scan a period.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  attn_out_bias: bool = False
  tie_embeddings: bool = False
  embed_init_std: float = 1.0
  parallel_block: bool = False
  sliding_window: int | None = None
  activation: str = "silu"
  max_seq_len: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  hf_model_type: str | None = None
  norm_scale_offset: float = 0.0
  scale_embeddings: bool = False
  post_sublayer_norms: bool = False
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None
  qk_norm: bool = False
  qk_norm_full_width: bool = False
  sliding_window_layers: tuple[int, ...] | None = None
  local_rope_theta: float | None = None
  attention_impl: str = "auto"
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    check_impl(self.attention_impl, "DecoderConfig.attention_impl")
    stack.check_remat_policy(self.remat_policy, type(self).__name__)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
      if getattr(self, name) <= 0:
        raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
    if not self.embed_init_std > 0:
      raise ValueError(f"DecoderConfig.embed_init_std must be positive, got {self.embed_init_std}")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"DecoderConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.kv_heads}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"DecoderConfig: d_model={self.d_model} not divisible by "
                       f"num_heads={self.num_heads}; set head_dim explicitly")
    if self.qk_norm_full_width and not self.qk_norm:
      raise ValueError("DecoderConfig.qk_norm_full_width needs qk_norm=True")
    if self.post_sublayer_norms and self.parallel_block:
      raise ValueError("DecoderConfig: post_sublayer_norms needs sequential blocks "
                       "(parallel_block=False)")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"DecoderConfig.{name} must be positive or None, got {value}")
    if self.sliding_window_layers is not None:
      bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_layers]
      if bad or self.sliding_window is None:
        raise ValueError(f"DecoderConfig.sliding_window_layers={self.sliding_window_layers} "
                         f"needs a sliding_window and layer indices below {self.num_layers}")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dh(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def is_sliding_layer(self, i: int) -> bool:
    """Whether layer ``i`` attends through the sliding window."""
    return self.sliding_window is not None and (
        self.sliding_window_layers is None or i in self.sliding_window_layers)

  def layer_kind(self, i: int) -> tuple:
    """What must agree for layers to share a scanned block (see ``stack.find_period``)."""
    return (self.is_sliding_layer(i),)

  @property
  def has_global_layers(self) -> bool:
    """Whether some layer attends without the sliding window."""
    return not all(self.is_sliding_layer(i) for i in range(self.num_layers))

  def replace(self, **kw) -> "DecoderConfig":
    return dataclasses.replace(self, **kw)


@flax.struct.dataclass
class DecodeCache:
  """Per-layer KV caches plus the slot bookkeeping shared by all layers.

  Attributes:
    layers: one ``KVCache`` per layer, ``[B, S, K, Dh]``; for a scanned stack
      of period P, one per block of the period, stacked over its N/P
      occurrences: ``[N/P, B, S, K, Dh]``.
    valid_BS: which slots hold real (non-padding) tokens.
    index: next slot to write (same for every sequence in the batch).
  """

  layers: tuple[KVCache, ...]
  valid_BS: Array
  index: Array


def init_cache(config: DecoderConfig, batch: int, max_len: int | None = None,
               dtype: Any = None) -> DecodeCache:
  """Empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
  slots = max_len or config.max_seq_len
  dtype = jnp.dtype(dtype or config.dtype)
  return DecodeCache(
      layers=layer_caches(config, lambda i: KVCache.zeros(batch, slots, config.kv_heads,
                                                          config.dh, dtype)),
      valid_BS=jnp.zeros((batch, slots), bool),
      index=jnp.zeros((), jnp.int32))


def layer_caches(config: DecoderConfig, make: Callable[[int], Any]) -> tuple:
  """``make(i)`` for every layer, in the config's stack layout (see :class:`DecodeCache`)."""
  caches = [make(i) for i in range(config.num_layers)]
  if not config.scan_layers:
    return tuple(caches)
  p = stack.find_period([config.layer_kind(i) for i in range(config.num_layers)])
  return tuple(stack.stack_leading(caches[j::p]) for j in range(p))


def attention_mask(valid_BS: Array, q_slots_L: Array, sliding_window: int | None) -> Array:
  """``[B, L, S]``: causal over slots, padding-aware, optional sliding window."""
  s = jnp.arange(valid_BS.shape[1])
  causal_LS = s[None, :] <= q_slots_L[:, None]
  if sliding_window is not None:
    causal_LS &= (q_slots_L[:, None] - s[None, :]) < sliding_window
  return causal_LS[None] & valid_BS[:, None, :]


def layer_masks(c: DecoderConfig, valid_BS: Array, q_slots_L: Array | None,
                segment_ids_BL: Array | None = None) -> dict[bool, AttentionMask]:
  """``{is_sliding_layer: mask}`` for the kinds of layers ``c`` has.

  Structured masks (``AttentionMask.dense`` is :func:`attention_mask` with the
  segments): fused attention kernels read them without a ``[B, L, S]`` array.
  ``q_slots_L`` ``None``: the queries are the keys, at slots ``0..L-1`` (no cache).
  """
  kinds = {c.is_sliding_layer(i) for i in range(c.num_layers)}
  return {sliding: AttentionMask(
      kv_valid_BS=valid_BS, q_valid_BL=valid_BS if q_slots_L is None else None,
      q_segment_ids_BL=segment_ids_BL, kv_segment_ids_BS=segment_ids_BL, q_slots_L=q_slots_L,
      causal=True, window=c.sliding_window if sliding else None) for sliding in kinds}


def positions_from_segments(segment_ids_BL: Array) -> Array:
  """Positions restarting at 0 at every new segment of a packed row."""
  l = segment_ids_BL.shape[1]
  idx = jnp.arange(l)[None, :]
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BL[:, :1], bool),
                            segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return (idx - start_idx).astype(jnp.int32)


def positions_from_valid(valid_BL: Array, prior_count_B: Array | None = None) -> Array:
  """Positions counting only valid tokens, continuing after ``prior_count``."""
  pos = jnp.cumsum(valid_BL.astype(jnp.int32), axis=1) - 1
  if prior_count_B is not None:
    pos = pos + prior_count_B[:, None]
  return jnp.maximum(pos, 0)


def make_norm(c: DecoderConfig) -> RMSNorm:
  """An ``[D]`` RMSNorm of the config's kind (Gemma's ``1 + w`` or plain)."""
  return RMSNorm(eps=c.norm_eps, scale_offset=c.norm_scale_offset, dtype=c.dtype,
                 param_dtype=c.param_dtype)


def attention_options(c: DecoderConfig, layer: int | None) -> dict[str, Any]:
  """RoPE, scale, soft-cap and q/k-norm options of layer ``layer``'s attention.

  ``layer`` only matters with a ``local_rope_theta`` (``None``: a global layer).
  """
  local = (c.local_rope_theta is not None and layer is not None
           and c.is_sliding_layer(layer))
  return dict(
      rope_theta=c.local_rope_theta if local else c.rope_theta,
      rope_scaling=None if local else c.rope_scaling,
      scale=None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar ** -0.5,
      logit_softcap=c.attn_logit_softcap, qk_norm=c.qk_norm, qk_norm_eps=c.norm_eps,
      qk_norm_offset=c.norm_scale_offset, attention_impl=c.attention_impl,
      **({"qk_norm_full_width": True} if c.qk_norm_full_width else {}))


def softcap(x: Array, cap: float | None) -> Array:
  """``cap * tanh(x / cap)`` (identity for ``None``)."""
  return x if cap is None else cap * jnp.tanh(x / cap)


class DecoderBlock(nn.Module):
  """Pre-norm block: sequential (Llama) or parallel (attention ‖ FFN).

  ``layer``: the block's index in the stack; ``None`` reads it from the
  ``layers_{i}`` name (unrolled stacks).
  """

  config: DecoderConfig
  layer: int | None = None

  def setup(self):
    c = self.config
    self.input_norm = make_norm(c)
    self.attn = self.make_attention()
    if not c.parallel_block:
      self.post_attn_norm = make_norm(c)
    if c.post_sublayer_norms:
      self.attn_out_norm = make_norm(c)
      self.ffn_out_norm = make_norm(c)
    self.mlp = self.make_ffn()

  @property
  def layer_index(self) -> int:
    """This block's index in the stack (its ``layer`` or its ``layers_{i}`` name)."""
    if self.layer is not None:
      return self.layer
    return int(self.name.rsplit("_", 1)[1])

  def make_attention(self) -> nn.Module:
    """The attention of this block; PEFT / mixture-of-attention variants override this.

    The replacement must keep the ``Attention`` call contract and its
    parameter names so pretrained checkpoints still restore.
    """
    c = self.config
    return Attention(num_heads=c.num_heads, num_kv_heads=c.kv_heads, head_dim=c.dh,
                     out_features=c.d_model, qkv_bias=c.qkv_bias, out_bias=c.attn_out_bias,
                     dtype=c.dtype, param_dtype=c.param_dtype,
                     **attention_options(c, None if c.local_rope_theta is None
                                         else self.layer_index))

  def make_ffn(self) -> nn.Module:
    """The FFN of this block; PEFT / MoE variants override this."""
    c = self.config
    return Mlp(hidden_dim=c.d_ff, out_features=c.d_model, activation=c.activation, gated=True,
               dtype=c.dtype, param_dtype=c.param_dtype)

  def __call__(self, x_BLD: Array, *, mask_BLS: Array, positions_BL: Array,
               cache: KVCache | None = None, cache_index: Array | None = None
               ) -> tuple[Array, KVCache | None]:
    h = self.input_norm(x_BLD)
    attn_out, new_cache = self.attn(h, mask_BLS=mask_BLS, positions_BL=positions_BL,
                                    cache=cache, cache_index=cache_index)
    attn_out = stack.checkpoint_name(attn_out, "attn_out")
    ffn = lambda y: stack.checkpoint_name(self.mlp(y), "ffn_out")  # noqa: E731
    if self.config.parallel_block:
      x_BLD = x_BLD + attn_out + ffn(h)
    elif self.config.post_sublayer_norms:
      x_BLD = x_BLD + self.attn_out_norm(attn_out)
      x_BLD = x_BLD + self.ffn_out_norm(ffn(self.post_attn_norm(x_BLD)))
    else:
      x_BLD = x_BLD + attn_out
      x_BLD = x_BLD + ffn(self.post_attn_norm(x_BLD))
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
    return x_BLD, new_cache

  @staticmethod
  def stack_kwargs(config: DecoderConfig, layer: int, shared: dict, layer_in: dict) -> dict:
    """Call keywords of layer ``layer`` in a scanned stack (see ``stack.ScanPeriod``)."""
    return dict(mask_BLS=shared["masks"][config.is_sliding_layer(layer)],
                positions_BL=shared["positions_BL"], cache_index=shared["cache_index"],
                cache=layer_in.get("cache"))


class Decoder(nn.Module):
  """Decoder-only LM: embed -> blocks -> final norm -> head.

  ``__call__(tokens_BL)`` returns ``(logits_BLV, cache)``; ``cache`` is ``None``
  unless one was passed in. Hidden states after every layer are sown in the
  ``intermediates`` collection under ``hidden`` when ``sow_hidden`` is set.
  """

  config: DecoderConfig
  block_cls: type[DecoderBlock] = DecoderBlock

  def setup(self):
    c = self.config
    common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.embed = Embed(c.vocab_size, c.d_model,
                       embedding_init=nn.initializers.normal(stddev=c.embed_init_std), **common)
    self.layers = stack.make_blocks(self.block_cls, c, c.num_layers, scan=c.scan_layers,
                                    remat_policy=c.remat_policy,
                                    kinds=[c.layer_kind(i) for i in range(c.num_layers)])
    self.final_norm = make_norm(c)
    if not c.tie_embeddings:
      self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), **common)

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None
                 ) -> DecodeCache:
    """Empty decode cache (needs no parameters): the cache protocol every language model
    here shares (MoE / BAM decoders, T5, CALM compositions); ``moe_jax.decoding`` uses it."""
    return init_cache(self.config, batch, max_len, dtype)

  def __call__(self, tokens_BL: Array, *, valid_BL: Array | None = None,
               positions_BL: Array | None = None, segment_ids_BL: Array | None = None,
               cache: DecodeCache | None = None, sow_hidden: bool = False,
               after_layer: Callable[[int, Array], Array] | None = None,
               ) -> tuple[Array, DecodeCache | None]:
    """Logits ``[B, L, V]`` and the updated cache (``None`` without one).

    Args:
      tokens_BL: token ids.
      valid_BL: real (non-padding) tokens; default all.
      positions_BL: RoPE positions; default counts valid tokens (per segment
        when ``segment_ids_BL`` is given).
      segment_ids_BL: packed training rows: tokens attend only within their
        segment (seqio's ``decoder_segment_ids``; 0 marks padding). Not
        combinable with ``cache``.
      cache: a :class:`DecodeCache` for incremental decoding.
      sow_hidden: sow every layer's output in ``intermediates/hidden``.
      after_layer: ``f(i, x_BLD) -> x_BLD`` called on layer ``i``'s output
        before it feeds layer ``i + 1``: the hook composition methods (CALM)
        use to read or add to the residual stream without restructuring the
        backbone's parameters. A scanned stack (``scan_layers``) runs its
        layers inside one scan, so there ``after_layer`` may only read: it
        must return ``x_BLD`` itself.
    """
    c = self.config
    b, l = tokens_BL.shape
    if valid_BL is None:
      valid_BL = (jnp.ones((b, l), bool) if segment_ids_BL is None
                  else jnp.asarray(segment_ids_BL) > 0)
    valid_BL = valid_BL.astype(bool)
    if segment_ids_BL is not None and cache is not None:
      raise ValueError("segment_ids_BL (packing) is for training; it cannot be used with a cache")
    if cache is None:
      valid_BS, index, prior = valid_BL, jnp.zeros((), jnp.int32), None
    else:
      index = cache.index
      prior = cache.valid_BS.sum(axis=1).astype(jnp.int32)
      valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, valid_BL, (0, index))
    if positions_BL is None:
      positions_BL = (positions_from_valid(valid_BL, prior) if segment_ids_BL is None
                      else positions_from_segments(segment_ids_BL))
    masks = layer_masks(c, valid_BS, None if cache is None else index + jnp.arange(l),
                        segment_ids_BL)

    x = self.embed(tokens_BL)
    if c.scale_embeddings:  # sqrt(D) rounded to the parameter dtype, as HF's Gemma
      x = x * jnp.asarray(c.d_model ** 0.5, jnp.dtype(c.param_dtype)).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if c.scan_layers:
      x, new_layers = self._scanned(x, masks, positions_BL, cache, index, sow_hidden, after_layer)
    else:
      new_layers = []
      for i, layer in enumerate(self.layers):
        x, layer_cache = layer(x, mask_BLS=masks[c.is_sliding_layer(i)],
                               positions_BL=positions_BL,
                               cache=None if cache is None else cache.layers[i],
                               cache_index=index)
        new_layers.append(layer_cache)
        if after_layer is not None:
          x = after_layer(i, x)
        if sow_hidden:
          self.sow("intermediates", "hidden", x)
    x = self.final_norm(x)
    logits = self.embed.attend(x) if c.tie_embeddings else self.lm_head(x)
    logits = softcap(logits, c.final_logit_softcap)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    new_cache = None
    if cache is not None:
      new_cache = DecodeCache(layers=tuple(new_layers), valid_BS=valid_BS, index=index + l)
    return logits, new_cache

  def _scanned(self, x, masks, positions_BL, cache, index, sow_hidden, after_layer):
    """The scanned stack: ``(x, new per-block stacked caches)``; hooks read the layer outputs."""
    shared = dict(masks=masks, positions_BL=positions_BL, cache_index=index)
    layer_in = None if cache is None else tuple({"cache": lc} for lc in cache.layers)
    x, extras, hidden = stack.run_scanned(self.layers, x, layer_in, shared)
    for i, h in enumerate(hidden):
      if after_layer is not None and after_layer(i, h) is not h:
        raise ValueError("after_layer changed the residual stream of a scanned stack "
                         "(scan_layers=True); only an unrolled stack can be modified between "
                         "layers (e.g. CALM's anchor must use scan_layers=False)")
      if sow_hidden:
        self.sow("intermediates", "hidden", h)
    return x, extras
